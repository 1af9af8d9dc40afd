"""The chain in two halves: :func:`prepare` (plan + tile) and :func:`run` (encode + merge).

:func:`forward` is ``run(model, prepare(images, ...), ...)`` in one call, and :class:`DynamicS2`
wraps it in an ``nn.Module``. The public stages check their arguments; the chain checks once, here
and in :class:`~dynamic_s2.options.S2Options`, then calls the stages' unchecked cores.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .backbones import Backbone, as_backbone
from .encode import _encode, check_chunk_shape, check_chunking
from .merge import MultiScaleFeatures, _merge, check_plan_list
from .options import S2Options, default_scales, make_options
from .plan import TilePlan
from .seams import drop_halo, encode_canvases, image_groups
from .tiling import TileBatch, _affine, _tile, check_images, check_plans

__all__ = ["DynamicS2", "default_scales", "forward", "prepare", "run"]


def _with_scales(kwargs: Mapping[str, Any], scales: Any) -> dict[str, Any]:
    out = dict(kwargs)
    if scales is not None:
        out["scales"] = scales
    return out


def _plans(
    items: Sequence[torch.Tensor],
    opts: S2Options,
    plans: Sequence[TilePlan] | TilePlan | None,
    given: Mapping[str, Any],
) -> tuple[TilePlan, ...]:
    """The plan of every image: made from the options, or ``plans`` checked against them."""
    if plans is None:
        return tuple(opts.plan([(int(img.shape[-2]), int(img.shape[-1])) for img in items]))
    plan_list = check_plans(plans, items)
    for i, p in enumerate(plan_list):
        _check_plan_agrees(i, p, opts, given)
    if len({p.num_scales for p in plan_list}) > 1:
        raise ValueError("plans must all have the same number of scales")
    return plan_list


def _check_plan_agrees(i: int, plan: TilePlan, opts: S2Options, given: Mapping[str, Any]) -> None:
    """``ValueError`` when a planning option the caller gave disagrees with ``plans[i]``, which
    would otherwise be silently ignored."""
    made = {
        "scales": tuple(sp.scale for sp in plan.scales),
        "tile_size": plan.input_size if opts.halo_tiles == "fixed" else plan.tile_size,
        "policy": plan.policy,
        "fit": plan.fit,
        "halo": plan.halo,
    }
    for name, value in given.items():
        if value is None:
            continue
        if name in made and getattr(opts, name) != made[name]:
            raise ValueError(
                f"{name}={value!r} disagrees with plans[{i}], made with {name}={made[name]!r}: "
                "give one or the other"
            )
        if name == "tile_budget":
            raise ValueError(
                f"tile_budget={value!r} has no effect with plans=, which fix the tiles: give one "
                "or the other"
            )
    caps = {k: getattr(opts, k) for k in ("max_tiles", "max_upscale") if given.get(k) is not None}
    if caps:  # the plan must be the one these caps give
        again = opts.replace(**made, **caps, tile_budget=None).plan([plan.image_size])[0]
        if again.grids != plan.grids:
            raise ValueError(
                f"{', '.join(f'{k}={v!r}' for k, v in caps.items())} disagrees with plans[{i}], "
                f"whose grids {plan.grids} are not the ones it gives ({again.grids}): give one "
                "or the other"
            )


def _tiler(
    items: Sequence[torch.Tensor], plans: Sequence[TilePlan], opts: S2Options
) -> Callable[[int, int], torch.Tensor]:
    """Tiles of images ``a:b``, made on demand."""
    scale, shift = _affine(opts.mean, opts.std, items[0].shape[0])
    scale, shift = scale.to(items[0].device), shift.to(items[0].device)

    def tiles(a: int, b: int) -> torch.Tensor:
        return _tile(items[a:b], tuple(plans[a:b]), scale, shift, 0.0, opts.uint8_resize).tiles

    return tiles


def prepare(
    images: torch.Tensor | Sequence[torch.Tensor],
    scales: Sequence[int] | None = None,
    *,
    plans: Sequence[TilePlan] | TilePlan | None = None,
    model: Any = None,
    options: S2Options | None = None,
    **kwargs: Any,
) -> TileBatch:
    """Plan and tile a batch of images: the CPU half of the chain, with no model call.

    Fit for DataLoader workers (``collate_fn=functools.partial(prepare, scales=...)``); the
    result pickles and moves with ``.to(device)``.

    Args:
        images: a list of ``[C, H, W]`` tensors of any sizes, or a ``[B, C, H, W]`` tensor.
        scales: pixel sizes, e.g. ``(448, 896, 1344)``.
        plans: one :class:`~dynamic_s2.plan.TilePlan` per image, instead of planning.
        model: a backbone to take defaults from (scales, tile size, mean/std); it is not called.
        options: an :class:`~dynamic_s2.options.S2Options` (``kwargs`` override its fields).
        **kwargs: any field of :class:`~dynamic_s2.options.S2Options`.

    Returns:
        A :class:`~dynamic_s2.tiling.TileBatch`.

    Examples:
        >>> batch = prepare([torch.rand(3, 48, 64), torch.rand(3, 90, 30)], scales=(32, 64))
        >>> batch.tiles.shape, batch.tile_counts
        (torch.Size([22, 3, 32, 32]), (7, 15))
    """
    given = _with_scales(kwargs, scales)
    opts = make_options(options, given, where="prepare()")
    if model is not None:
        opts = opts.resolve(as_backbone(model))
    items = check_images(images)
    plan_list = _plans(items, opts, plans, given)
    return TileBatch(_tiler(items, plan_list, opts)(0, len(items)), plan_list)


def run(
    model: Any,
    batch: TileBatch | Mapping[str, Any],
    *,
    options: S2Options | None = None,
    **kwargs: Any,
) -> MultiScaleFeatures:
    """Encode and merge a prepared batch: the model half of the chain.

    With ``max_batch_tiles`` the backbone sees full chunks of that many tiles and every image is
    merged as soon as its tiles are encoded.

    Args:
        model: the backbone (see :func:`~dynamic_s2.backbones.as_backbone`).
        batch: a :class:`~dynamic_s2.tiling.TileBatch` from :func:`prepare`, on the model's device,
            or the ``BatchFeature`` of :class:`~dynamic_s2.hf.DynamicS2ImageProcessor`.
        options: an :class:`~dynamic_s2.options.S2Options`; only its encode and merge fields are
            read.
        **kwargs: encode and merge fields of :class:`~dynamic_s2.options.S2Options`
            (``max_batch_tiles``, ``pad_to_multiple``, ``feature_layer``, ``output_scale``,
            ``resample``, ``num_prefix_tokens``, ``pack``).

    Returns:
        :class:`~dynamic_s2.merge.MultiScaleFeatures`.

    Examples:
        >>> model = torch.nn.Conv2d(3, 8, kernel_size=8, stride=8)
        >>> batch = prepare([torch.rand(3, 48, 64)], scales=(32, 64))
        >>> run(model, batch, max_batch_tiles=4).sizes
        [(8, 12)]
    """
    opts = make_options(options, kwargs, where="run()", stages=("encode", "merge"))
    if isinstance(batch, Mapping):  # a BatchFeature from dynamic_s2.hf.DynamicS2ImageProcessor
        batch = TileBatch.from_features(batch)
    if not isinstance(batch, TileBatch):
        raise TypeError(f"batch must be a TileBatch (from prepare), got {type(batch).__name__}")
    tiles = batch.tiles
    if not isinstance(tiles, torch.Tensor) or tiles.dim() != 4 or not batch.plans:
        raise ValueError(f"batch must hold [T, C, t, t] tiles and plans, got {batch!r}")
    if tiles.shape[0] != sum(batch.tile_counts):
        raise ValueError(
            f"batch has {tiles.shape[0]} tiles but its plans need {sum(batch.tile_counts)}"
        )
    check_plan_list(batch.plans)  # one tile size and one number of scales (collate can mix)
    backbone = as_backbone(model, feature_layer=opts.feature_layer)
    opts = opts.resolve(backbone, planning=False)
    ends = [0, *itertools.accumulate(batch.tile_counts)]
    return _run(backbone, batch.plans, lambda a, b: tiles[ends[a] : ends[b]], opts)


def _run(
    backbone: Backbone,
    plans: Sequence[TilePlan],
    tiles: Callable[[int, int], torch.Tensor],
    opts: S2Options,
) -> MultiScaleFeatures:
    """Encode and merge, in one backbone call or in a stream of full chunks."""
    out_index = plans[0].scale_index(opts.output_scale, "output_scale")
    chunk, multiple = check_chunking(opts.max_batch_tiles, opts.pad_to_multiple)

    def combine(features: torch.Tensor, part: Sequence[TilePlan]) -> MultiScaleFeatures:
        features, prefix = drop_halo(features, part, opts.num_prefix_tokens)
        return _merge(features, part, out_index, opts.resample, prefix, opts.pack)

    if opts.canvas:  # one backbone pass per canvas, in runs of whole images
        return MultiScaleFeatures.cat(
            [
                combine(encode_canvases(backbone, tiles(a, b), plans[a:b], chunk), plans[a:b])
                for a, b in image_groups(plans, chunk)
            ]
        )
    if chunk is None:  # everything in one backbone call
        return combine(_encode(backbone, tiles(0, len(plans)), None, multiple), plans)
    return MultiScaleFeatures.cat(list(_stream(backbone, plans, chunk, multiple, tiles, combine)))


def forward(
    model: Any,
    images: torch.Tensor | Sequence[torch.Tensor],
    scales: Sequence[int] | None = None,
    *,
    plans: Sequence[TilePlan] | TilePlan | None = None,
    options: S2Options | None = None,
    **kwargs: Any,
) -> MultiScaleFeatures:
    """Multi-scale features of a batch of images of any sizes, through any backbone.

    Exactly ``run(model, prepare(images, scales, model=model, ...), ...)``: plans the tiles of
    every image (:func:`~dynamic_s2.plan.plan_tiles`), cuts them
    (:func:`~dynamic_s2.tiling.tile_images`), runs the backbone over all tiles in chunks
    (:func:`~dynamic_s2.encode.encode_tiles`) and merges them (:func:`~dynamic_s2.merge.merge`).
    With ``max_batch_tiles``, images are tiled just ahead of the backbone, so memory holds about
    one chunk of tiles.

    Args:
        model: the backbone (see :func:`~dynamic_s2.backbones.as_backbone`).
        images: a list of ``[C, H, W]`` tensors of any sizes, or a ``[B, C, H, W]`` tensor.
        scales: pixel sizes, e.g. ``(448, 896, 1344)``. Default: ``(t, 2t, 3t)`` from the
            backbone's declared input size ``t``.
        plans: one :class:`~dynamic_s2.plan.TilePlan` per image, instead of ``scales``.
        options: an :class:`~dynamic_s2.options.S2Options` (``kwargs`` override its fields).
        **kwargs: any field of :class:`~dynamic_s2.options.S2Options`: ``tile_size``,
            ``max_tiles``, ``policy``, ``fit``, ``mean``, ``std``, ``uint8_resize``,
            ``feature_layer``, ``max_batch_tiles``, ``pad_to_multiple``, ``output_scale``,
            ``resample``, ``num_prefix_tokens``.

    Returns:
        :class:`~dynamic_s2.merge.MultiScaleFeatures`.

    Examples:
        >>> model = torch.nn.Conv2d(3, 8, kernel_size=8, stride=8)  # 32-px tiles -> 4x4 maps
        >>> images = [torch.rand(3, 48, 64), torch.rand(3, 90, 30)]
        >>> out = forward(model, images, scales=(32, 64))
        >>> out.features.shape, out.mask.sum(dim=(1, 2)).tolist()
        (torch.Size([2, 24, 12, 16]), [96, 192])
    """
    given = _with_scales(kwargs, scales)
    opts = make_options(options, given, where="forward()")
    backbone = as_backbone(model, feature_layer=opts.feature_layer)
    return _forward(backbone, check_images(images), plans, opts.resolve(backbone), given)


def _forward(
    backbone: Backbone,
    items: Sequence[torch.Tensor],
    plans: Sequence[TilePlan] | TilePlan | None,
    opts: S2Options,
    given: Mapping[str, Any],
) -> MultiScaleFeatures:
    if plans is None and opts.scales is None:
        default_scales(backbone)  # raises, naming the backbone
    plan_list = _plans(items, opts, plans, given)
    return _run(backbone, plan_list, _tiler(items, plan_list, opts), opts)


def _stream(
    backbone: Backbone,
    plans: Sequence[TilePlan],
    chunk: int,
    multiple: int | None,
    tile: Callable[[int, int], torch.Tensor],
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
    shape: tuple[int, ...] | None = None  # per-tile output shape of the first chunk
    total = ends[-1]
    while encoded < total:
        # Tile whole images until a full chunk (or everything left) is queued.
        need = min(chunk, total - encoded)
        if queued < need:
            stop = tiled
            while queued < need:
                queued += counts[stop]
                stop += 1
            queue.append(tile(tiled, stop))
            tiled = stop
        tiles = torch.cat(queue) if len(queue) > 1 else queue[0]
        take = min(chunk, tiles.shape[0])
        done.append(_encode(backbone, tiles[:take], None, multiple))
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
        options: an :class:`~dynamic_s2.options.S2Options` (``kwargs`` override its fields).
        **kwargs: any field of :class:`~dynamic_s2.options.S2Options`, validated here, once.

    Attributes:
        options: the resolved :class:`~dynamic_s2.options.S2Options` used on every call.

    Examples:
        >>> layer = DynamicS2(torch.nn.Conv2d(3, 4, 8, stride=8), scales=(32, 64))
        >>> out = layer([torch.rand(3, 40, 40)])
        >>> out.unpad()[0].shape
        torch.Size([8, 8, 8])
    """

    def __init__(
        self,
        backbone: Any,
        scales: Sequence[int] | None = None,
        *,
        options: S2Options | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if "plans" in kwargs:
            raise TypeError("DynamicS2 makes plans per call; pass plans= to forward() instead")
        opts = make_options(options, _with_scales(kwargs, scales), where="DynamicS2()")
        self.adapter = as_backbone(backbone, feature_layer=opts.feature_layer)
        self.backbone = self.adapter.module
        self.options = opts.resolve(self.adapter)
        if self.options.scales is None:
            default_scales(self.adapter)  # raises, naming the backbone
        self.scales: tuple[int, ...] = self.options.scales or ()
        # what a call's plans= must agree with
        self._fixed = {"scales": self.scales, "tile_size": self.options.tile_size}

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor] | TileBatch | Mapping[str, Any],
        plans: Sequence[TilePlan] | None = None,
    ) -> MultiScaleFeatures:
        """Run :func:`forward` on ``images`` (and optional ``plans``).

        ``images`` may also be a prepared batch: a :class:`~dynamic_s2.tiling.TileBatch` or the
        ``BatchFeature`` of :class:`~dynamic_s2.hf.DynamicS2ImageProcessor`, which is then
        encoded and merged as :func:`run` does (its plans decide the tiles).
        """
        if self.backbone is not self.adapter.module:  # replaced, e.g. by torch.compile
            self.adapter = self.adapter.with_module(self.backbone)
        if isinstance(images, TileBatch | Mapping) and plans is None:
            return run(self.adapter, images, options=self.options)
        return _forward(self.adapter, check_images(images), plans, self.options, self._fixed)

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
