"""``forward`` and ``DynamicS2``: plan → tile → encode → merge in one call."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .backbones import Backbone, as_backbone
from .encode import check_chunk_shape, check_chunking, encode_tiles
from .merge import RESAMPLE_MODES, MultiScaleFeatures, check_plan_list, merge
from .plan import Fit, Policy, TilePlan, plan_tiles
from .tiling import TileBatch, _affine, check_images, check_plans, tile_images

__all__ = ["DynamicS2", "default_scales", "forward"]


def default_scales(backbone: Backbone) -> tuple[int, int, int]:
    """``(t, 2t, 3t)`` from the backbone's declared input size ``t`` (the S2 and NVILA standard).

    Raises:
        ValueError: the backbone declares no input size.

    Examples:
        >>> default_scales(Backbone(lambda x: x, input_size=224))
        (224, 448, 672)
    """
    t = backbone.input_size
    if t is None:
        raise ValueError(
            f"scales were not given and the backbone ({backbone.name}) declares no input size "
            "(HF config.image_size or timm pretrained_cfg['input_size']): pass scales=, e.g. "
            "scales=(448, 896, 1344)"
        )
    return (t, 2 * t, 3 * t)


def _make_plans(
    images: Sequence[torch.Tensor],
    backbone: Backbone,
    scales: Sequence[int] | None,
    plans: Sequence[TilePlan] | TilePlan | None,
    tile_size: int | None,
    max_tiles: int | Sequence[int] | None,
    policy: Policy,
    fit: Fit,
) -> list[TilePlan]:
    if plans is not None:
        plan_list = check_plan_list(check_plans(plans, images))
        for i, p in enumerate(plan_list):
            _check_plan_agrees(i, p, policy, fit, max_tiles)
            if tile_size is not None and p.tile_size != tile_size:
                raise ValueError(
                    f"tile_size={tile_size!r} disagrees with plans[{i}], made for tile_size "
                    f"{p.tile_size}: give one or the other"
                )
            if scales is not None and tuple(sp.scale for sp in p.scales) != tuple(scales):
                raise ValueError(
                    f"scales={tuple(scales)!r} disagrees with plans[{i}], made for scales "
                    f"{tuple(sp.scale for sp in p.scales)}: give one or the other"
                )
        return plan_list
    if scales is None:
        scales = default_scales(backbone)
        if tile_size is None:
            tile_size = backbone.input_size
    return [
        plan_tiles(
            img.shape[-2],
            img.shape[-1],
            scales,
            tile_size=tile_size,
            max_tiles=max_tiles,
            policy=policy,
            fit=fit,
        )
        for img in images
    ]


def _check_plan_agrees(
    i: int,
    plan: TilePlan,
    policy: Policy,
    fit: Fit,
    max_tiles: int | Sequence[int] | None,
) -> None:
    """Raise ``ValueError`` when a ``policy`` or ``fit`` other than the default, or a
    ``max_tiles``, disagrees with ``plans[i]`` (instead of being ignored).

    (``forward`` cannot tell an explicit ``policy="aspect"`` from the default; the options object
    of the refactor can, with ``None`` for "not given".)"""
    defaults = (("policy", policy, plan.policy, "aspect"), ("fit", fit, plan.fit, "stretch"))
    for name, value, made, default in defaults:
        if value != default and value != made:
            raise ValueError(
                f"{name}={value!r} disagrees with plans[{i}], made with {name}={made!r}: give "
                "one or the other"
            )
    if max_tiles is not None:
        h, w = plan.image_size
        scales = [sp.scale for sp in plan.scales]
        again = plan_tiles(
            h, w, scales, tile_size=plan.tile_size, max_tiles=max_tiles,
            policy=plan.policy, fit=plan.fit,  # type: ignore[arg-type]
        )  # fmt: skip
        if again.grids != plan.grids:
            raise ValueError(
                f"max_tiles={max_tiles!r} disagrees with plans[{i}], whose grids {plan.grids} "
                f"are not the ones max_tiles gives ({again.grids}): give one or the other"
            )


def forward(
    model: Any,
    images: torch.Tensor | Sequence[torch.Tensor],
    scales: Sequence[int] | None = None,
    *,
    plans: Sequence[TilePlan] | TilePlan | None = None,
    tile_size: int | None = None,
    max_tiles: int | Sequence[int] | None = None,
    policy: Policy = "aspect",
    fit: Fit = "stretch",
    output_scale: int = -1,
    resample: str = "area",
    num_prefix_tokens: int | None = None,
    max_batch_tiles: int | None = None,
    pad_to_multiple: int | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    feature_layer: int | None = None,
) -> MultiScaleFeatures:
    """Multi-scale features of a batch of images of any sizes, through any backbone.

    Plans the tiles of every image (:func:`~dynamic_s2.plan.plan_tiles`), cuts them
    (:func:`~dynamic_s2.tiling.tile_images`), runs the backbone over all tiles in chunks
    (:func:`~dynamic_s2.encode.encode_tiles`) and merges them
    (:func:`~dynamic_s2.merge.merge`).

    Args:
        model: the backbone (see :func:`~dynamic_s2.backbones.as_backbone`).
        images: a list of ``[C, H, W]`` tensors of any sizes, or a ``[B, C, H, W]`` tensor.
        scales: pixel sizes, e.g. ``(448, 896, 1344)``. Default: ``(t, 2t, 3t)`` from the
            backbone's declared input size ``t``.
        plans: one :class:`~dynamic_s2.plan.TilePlan` per image, instead of ``scales``.
        tile_size: tile side (default ``scales[0]``, or the backbone's size with default scales).
        max_tiles: tile budget, see :func:`~dynamic_s2.plan.plan_tiles`.
        policy: ``"aspect"`` or ``"nvila"``. With ``plans``, leave ``policy``, ``fit`` and
            ``max_tiles`` out or give the plans' own: a disagreeing one raises ``ValueError``.
        fit: ``"stretch"`` or ``"pad"``.
        output_scale: the scale whose grid all scales are resampled to (-1: the largest).
        resample: ``"area"`` or ``"bilinear"``.
        num_prefix_tokens: prefix tokens of token outputs; default from the backbone, else
            inferred.
        max_batch_tiles: the most tiles per backbone call.
        pad_to_multiple: pad the last chunk to a multiple of this many tiles.
        mean: normalisation for uint8 images; default from the backbone.
        std: normalisation for uint8 images; default from the backbone.
        feature_layer: HF models: ``hidden_states[feature_layer]`` instead of the last layer.

    Returns:
        :class:`~dynamic_s2.merge.MultiScaleFeatures`.

    Examples:
        >>> model = torch.nn.Conv2d(3, 8, kernel_size=8, stride=8)  # 32-px tiles -> 4x4 maps
        >>> images = [torch.rand(3, 48, 64), torch.rand(3, 90, 30)]
        >>> out = forward(model, images, scales=(32, 64))
        >>> out.features.shape, out.mask.sum(dim=(1, 2)).tolist()
        (torch.Size([2, 12, 12, 16]), [96, 48])
    """
    backbone = as_backbone(model, feature_layer=feature_layer)
    items = check_images(images)
    plan_list = _make_plans(items, backbone, scales, plans, tile_size, max_tiles, policy, fit)
    chunk, multiple = check_chunking(max_batch_tiles, pad_to_multiple)
    tile = functools.partial(
        tile_images,
        mean=backbone.mean if mean is None else mean,
        std=backbone.std if std is None else std,
    )
    combine = functools.partial(
        merge,
        output_scale=output_scale,
        resample=resample,
        num_prefix_tokens=(
            backbone.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens
        ),
    )
    if chunk is None:  # everything in one backbone call
        features = encode_tiles(backbone, tile(items, plan_list).tiles, pad_to_multiple=multiple)
        return combine(features, plan_list)
    return MultiScaleFeatures.cat(
        list(_stream(backbone, items, plan_list, chunk, multiple, tile, combine))
    )


def _stream(
    backbone: Backbone,
    images: Sequence[torch.Tensor],
    plans: Sequence[TilePlan],
    chunk: int,
    multiple: int | None,
    tile: Callable[[Sequence[torch.Tensor], Sequence[TilePlan]], TileBatch],
    combine: Callable[[torch.Tensor, Sequence[TilePlan]], MultiScaleFeatures],
) -> Iterator[MultiScaleFeatures]:
    """Tile, encode and merge in a stream of full chunks of ``chunk`` tiles.

    Images are tiled just ahead of the backbone and merged as soon as all their tiles are encoded,
    so memory holds the output plus about one chunk of tiles and features, however many images
    there are. Chunk boundaries do not depend on image boundaries: every backbone call but the
    last gets exactly ``chunk`` tiles.
    """
    counts = [p.num_tiles for p in plans]
    ends = list(itertools.accumulate(counts))  # tile index just past each image
    tiled = merged = 0  # images tiled so far; images merged so far
    queue: list[torch.Tensor] = []  # tiles made but not yet encoded
    queued = 0
    done: list[torch.Tensor] = []  # features of encoded tiles of images not yet merged
    encoded = 0  # tiles encoded so far
    total = ends[-1]
    shape: tuple[int, ...] | None = None  # per-tile output shape of the first chunk
    while encoded < total:
        # Tile whole images until a full chunk (or everything left) is queued.
        need = min(chunk, total - encoded)
        if queued < need:
            stop = tiled
            while queued < need:
                queued += counts[stop]
                stop += 1
            queue.append(tile(images[tiled:stop], plans[tiled:stop]).tiles)
            tiled = stop
        tiles = torch.cat(queue) if len(queue) > 1 else queue[0]
        take = min(chunk, tiles.shape[0])
        done.append(encode_tiles(backbone, tiles[:take], pad_to_multiple=multiple))
        shape = check_chunk_shape(shape, done[-1])
        rest = tiles[take:]
        queue, queued = ([rest] if rest.shape[0] else []), rest.shape[0]
        encoded += take
        # Merge every image whose tiles are all encoded.
        ready = merged
        while ready < len(plans) and ends[ready] <= encoded:
            ready += 1
        if ready > merged:
            features = torch.cat(done) if len(done) > 1 else done[0]
            used = ends[ready - 1] - (ends[merged - 1] if merged else 0)
            yield combine(features[:used], plans[merged:ready])
            left = features[used:]
            done = [left] if left.shape[0] else []
            merged = ready


def _check_options(scales: tuple[int, ...], options: dict[str, Any]) -> None:
    """Validate :class:`DynamicS2`'s options up front, with the same checks the stages make."""
    dry = plan_tiles(
        64,
        64,
        scales,
        tile_size=options.get("tile_size"),
        max_tiles=options.get("max_tiles"),
        policy=options.get("policy", "aspect"),
        fit=options.get("fit", "stretch"),
    )
    dry.scale_index(options.get("output_scale", -1), "output_scale")
    resample = options.get("resample", "area")
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
    check_chunking(options.get("max_batch_tiles"), options.get("pad_to_multiple"))


#: Adapters whose backbones return ``[n, C, h, w]`` maps, which have no prefix tokens.
_MAP_ADAPTERS = ("torchvision", "extract_features", "efficientnet-lite0")


def _check_declarations(adapter: Backbone, options: dict[str, Any]) -> None:
    """Validate the options that depend on the backbone (``mean``/``std`` against each other and
    the model's channels, ``num_prefix_tokens`` against a map backbone), before any image."""
    mean = adapter.mean if options.get("mean") is None else options["mean"]
    std = adapter.std if options.get("std") is None else options["std"]
    lengths = {
        len(v) for v in (mean, std) if isinstance(v, Sequence) and not isinstance(v, str | bytes)
    }
    config = getattr(adapter.module, "config", None)
    channels = getattr(config, "num_channels", None)
    if len(lengths) > 1 or (isinstance(channels, int) and lengths and lengths != {channels}):
        expected = f"{channels} values each (the model's channels)" if channels else "one length"
        raise ValueError(f"mean and std need {expected}, got mean={mean!r}, std={std!r}")
    _affine(mean, std, lengths.pop() if lengths else 1)  # numbers only, std without zeros
    prefix = options.get("num_prefix_tokens")
    if prefix and adapter.name in _MAP_ADAPTERS:
        raise ValueError(
            f"num_prefix_tokens={prefix} but backbone {adapter.name!r} returns feature maps, "
            "which have no prefix tokens"
        )


_OPTIONS = {
    "tile_size",
    "max_tiles",
    "policy",
    "fit",
    "output_scale",
    "resample",
    "num_prefix_tokens",
    "max_batch_tiles",
    "pad_to_multiple",
    "mean",
    "std",
    "feature_layer",
}


class DynamicS2(nn.Module):
    """An ``nn.Module`` that runs :func:`forward` over its backbone.

    The backbone is registered as a submodule when it is an ``nn.Module``, so ``.to()``,
    ``state_dict``, DDP and FSDP see it, and gradients flow into it. To compile the backbone, use
    :meth:`compile_backbone`; for backbones called through ``forward`` (HF models, plain
    modules), ``layer.backbone = torch.compile(layer.backbone)`` works too and keeps the
    adapter's declarations (:meth:`~dynamic_s2.backbones.Backbone.with_module`).

    Args:
        backbone: the backbone (see :func:`~dynamic_s2.backbones.as_backbone`).
        scales: pixel sizes; default ``(t, 2t, 3t)`` from the backbone's input size.
        **options: any keyword argument of :func:`forward` except ``plans``.

    Examples:
        >>> layer = DynamicS2(torch.nn.Conv2d(3, 4, 8, stride=8), scales=(32, 64))
        >>> out = layer([torch.rand(3, 40, 40)])
        >>> out.unpad()[0].shape
        torch.Size([8, 8, 8])
    """

    def __init__(self, backbone: Any, scales: Sequence[int] | None = None, **options: Any) -> None:
        super().__init__()
        if "plans" in options:
            raise TypeError("DynamicS2 makes plans per call; pass plans= to forward() instead")
        unknown = set(options) - _OPTIONS
        if unknown:
            raise TypeError(
                f"DynamicS2 got unknown options {sorted(unknown)}; known: {sorted(_OPTIONS)}"
            )
        self.feature_layer = options.pop("feature_layer", None)
        self.adapter = as_backbone(
            backbone,
            feature_layer=self.feature_layer,
            num_prefix_tokens=options.get("num_prefix_tokens"),
        )
        self.backbone = self.adapter.module
        self.scales: tuple[int, ...]
        if scales is None:
            self.scales = default_scales(self.adapter)
            options.setdefault("tile_size", self.adapter.input_size)
        else:
            self.scales = (scales,) if isinstance(scales, int) else tuple(scales)
        _check_options(self.scales, options)
        _check_declarations(self.adapter, options)
        self.options = options

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        plans: Sequence[TilePlan] | None = None,
    ) -> MultiScaleFeatures:
        """Run :func:`forward` on ``images`` (and optional ``plans``)."""
        if self.backbone is not self.adapter.module:  # replaced, e.g. by torch.compile
            self.adapter = self.adapter.with_module(self.backbone)
        return forward(self.adapter, images, self.scales, plans=plans, **self.options)

    def compile_backbone(self, **options: Any) -> DynamicS2:
        """Compile the backbone call with ``torch.compile(**options)``; returns ``self``.

        This compiles exactly what the adapter calls (``forward``, ``forward_features``,
        ``extract_features`` or an HF call), so it works for every backbone family, whereas
        ``layer.backbone = torch.compile(layer.backbone)`` only compiles ``forward``. Tiles reach
        the backbone in chunks of ``max_batch_tiles`` (the last padded with ``pad_to_multiple``),
        so the compiled graph sees few shapes.

        Examples:
            >>> layer = DynamicS2(torch.nn.Conv2d(3, 4, 8, stride=8), scales=(32,))
            >>> layer = layer.compile_backbone(backend="eager")
            >>> layer([torch.rand(3, 40, 40)]).sizes
            [(4, 4)]
        """
        self.adapter = replace(self.adapter, fn=torch.compile(self.adapter.fn, **options))
        return self

    def extra_repr(self) -> str:
        return f"scales={self.scales}, options={self.options}"
