"""The chain in two halves: :func:`prepare` (plan + tile) and :func:`run` (encode + merge).

:func:`forward` is ``run(model, prepare(images, ...), ...)`` in one call, and :class:`DynamicS2`
wraps it in an ``nn.Module``. The public stages check their arguments; the chain checks once, here
and in :class:`~dynamic_s2.options.S2Options`, then calls the stages' unchecked cores.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, as_backbone
from .encode import _encode, check_chunk_shape, check_chunking
from .merge import MultiScaleFeatures, _merge, check_plan_list
from .options import S2Options, default_scales, make_options, stage_fields
from .plan import TilePlan, shared_tiles
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
    single: Sequence[bool] | None = None,
) -> tuple[TilePlan, ...]:
    """The plan of every image: made from the options, or ``plans`` checked against them."""
    if plans is None:
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in items]
        return tuple(opts.plan(sizes, single))
    if single is not None:
        raise ValueError(
            "single has no effect with plans=, which fix the tiles: give one or the other"
        )
    plan_list = check_plans(plans, items)
    for i, p in enumerate(plan_list):
        _check_plan_agrees(i, p, opts, given)
    if len({p.num_scales for p in plan_list}) > 1:
        raise ValueError("plans must all have the same number of scales")
    return plan_list


def _check_plan_agrees(
    i: int, plan: TilePlan, opts: S2Options, given: Mapping[str, Any], prepared: bool = False
) -> None:
    """``ValueError`` when a planning option the caller gave disagrees with ``plans[i]``, which
    would otherwise be silently ignored. A ``policy="single"`` plan (one tile per scale, NVILA's
    multi-image mode, chosen per image) agrees with any policy and cap."""
    made = {
        "scales": tuple(sp.scale for sp in plan.scales),
        "tile_size": plan.input_size if opts.halo_tiles == "fixed" else plan.tile_size,
        "policy": plan.policy,
        "fit": plan.fit,
        "halo": plan.halo,
    }
    single = plan.policy == "single"
    for name, value in given.items():
        if value is None or (single and name == "policy"):
            continue
        if name in made and getattr(opts, name) != made[name]:
            raise ValueError(
                f"{name}={value!r} disagrees with plans[{i}], made with {name}={made[name]!r}: "
                "give one or the other"
            )
        if name == "tile_budget" and prepared:
            continue  # a prepared batch's budget is checked on its total, see _check_batch
        if name == "tile_budget":
            raise ValueError(
                f"tile_budget={value!r} has no effect with plans=, which fix the tiles: give one "
                "or the other"
            )
    caps = {k: getattr(opts, k) for k in ("max_tiles", "max_upscale") if given.get(k) is not None}
    if caps and not single:  # the plan must be the one these caps give
        again = opts.replace(**made, **caps, tile_budget=None).plan([plan.image_size])[0]
        # a prepared batch may have been planned under a budget: at most the caps' tiles
        within = all(
            p.num_tiles <= a.num_tiles for p, a in zip(plan.scales, again.scales, strict=True)
        )
        if (again.grids != plan.grids) if not prepared else not within:
            raise ValueError(
                f"{', '.join(f'{k}={v!r}' for k, v in caps.items())} disagrees with plans[{i}], "
                f"whose grids {plan.grids} are not the ones it gives ({again.grids}): give one "
                "or the other"
            )


def _check_batch(batch: TileBatch, opts: S2Options, given: Mapping[str, Any]) -> None:
    """``ValueError`` when a prepared batch disagrees with options the caller gave (scales, tile
    size, policy, fit, caps, budget)."""
    for i, plan in enumerate(batch.plans):
        _check_plan_agrees(i, plan, opts, given, prepared=True)
    budget = given.get("tile_budget")
    total = sum(batch.tile_counts)
    if budget is not None and total > budget:
        raise ValueError(
            f"tile_budget={budget} disagrees with the batch, whose plans hold {total} tiles"
        )


def _tiler(
    items: Sequence[torch.Tensor], plans: Sequence[TilePlan], opts: S2Options
) -> Callable[[int, int], torch.Tensor]:
    """Tiles of images ``a:b``, made on demand."""
    scale, shift = _affine(opts.mean, opts.std, items[0].shape[0])  # host tensors

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
    single: Sequence[bool] | None = None,
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
        single: per image, ``True`` for one tile at every scale (``policy="single"``: NVILA's
            mode for prompts with several images and for video frames), see
            :meth:`~dynamic_s2.options.S2Options.plan`.
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
    plan_list = _plans(items, opts, plans, given, single)
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
    merged as soon as its tiles are encoded. Tiles whose size is not the plans' raise
    ``ValueError``, and so does a batch that declares ``num_image_tokens`` (the HF processors')
    other than the rows this call makes per image.

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
    prepared, expected = _as_batch(batch)
    backbone = as_backbone(model, feature_layer=opts.feature_layer)
    return _run_batch(backbone, prepared, opts.resolve(backbone, planning=False), expected)


def _as_batch(batch: Any) -> tuple[TileBatch, list[int] | None]:
    """A prepared batch as a checked :class:`TileBatch`, and the image-token count of every
    image when the batch declares them (``num_image_tokens`` of the HF processors)."""
    expected = None
    if isinstance(batch, Mapping):  # a BatchFeature from dynamic_s2.hf
        counts = batch.get("num_image_tokens")
        expected = None if counts is None else [int(n) for n in counts]
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
    t = batch.plans[0].input_size  # the cut tile: tile_size, plus twice the halo
    if tuple(tiles.shape[-2:]) != (t, t):
        raise ValueError(
            f"batch tiles are {tuple(tiles.shape[-2:])} pixels but its plans were made for "
            f"{t}x{t} tiles"
        )
    if expected is not None and len(expected) != len(batch.plans):
        raise ValueError(
            f"batch declares num_image_tokens for {len(expected)} images but holds "
            f"{len(batch.plans)} plans"
        )
    return batch, expected


def _run_batch(
    backbone: Backbone, batch: TileBatch, opts: S2Options, expected: list[int] | None
) -> MultiScaleFeatures:
    """Encode and merge a checked batch; check the rows made against the declared counts."""
    tiles = batch.tiles
    ends = [0, *itertools.accumulate(batch.tile_counts)]
    out = _run(backbone, batch.plans, lambda a, b: tiles[ends[a] : ends[b]], opts)
    if expected is not None:
        made = [h * w for h, w in out.sizes]
        if made != expected:
            raise ValueError(
                f"the batch declares num_image_tokens {expected} (the prompt's placeholders) but "
                f"the model side made {made} rows per image with pack={opts.pack}, "
                f"output_scale={opts.output_scale}: build the processor with this layer's "
                "tokens_per_tile, pack and output_scale"
            )
    return out


def _sharing(plans: Sequence[TilePlan]) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """Per image, its distinct tiles (local indices) and, per tile, the row of its distinct
    tile (see :func:`~dynamic_s2.plan.shared_tiles`); ``None`` when every tile is distinct."""
    sources = [shared_tiles(p) for p in plans]
    if all(src == tuple(range(len(src))) for src in sources):
        return None
    keep, expand = [], []
    for src in sources:
        kept = np.unique(np.asarray(src, dtype=np.int64))
        keep.append(kept)
        expand.append(np.searchsorted(kept, src))
    return keep, expand


def _run(
    backbone: Backbone,
    plans: Sequence[TilePlan],
    tiles: Callable[[int, int], torch.Tensor],
    opts: S2Options,
) -> MultiScaleFeatures:
    """Encode and merge, in one backbone call or in a stream of full chunks.

    Tiles that a plan renders twice (scales with the same grid and content, see
    :func:`~dynamic_s2.plan.shared_tiles`) are encoded once and their features reused.
    """
    out_index = plans[0].scale_index(opts.output_scale, "output_scale")
    chunk, multiple = check_chunking(opts.max_batch_tiles, opts.pad_to_multiple)
    sharing = _sharing(plans)
    counts = [p.num_tiles for p in plans] if sharing is None else [len(k) for k in sharing[0]]

    def distinct(a: int, b: int) -> torch.Tensor:
        made = tiles(a, b)
        if sharing is None:
            return made
        rows = _rows(sharing[0][a:b], [p.num_tiles for p in plans[a:b]])
        return made.index_select(0, rows.to(made.device))

    def combine(features: torch.Tensor, a: int, b: int, shared: bool = True) -> MultiScaleFeatures:
        part = plans[a:b]
        if sharing is not None and shared:  # features of the distinct tiles only
            rows = _rows(sharing[1][a:b], counts[a:b])
            features = features.index_select(0, rows.to(features.device))
        declared = _prefix_tokens(features, opts.num_prefix_tokens)
        features, prefix = drop_halo(features, part, declared)
        return _merge(features, part, out_index, opts.resample, prefix, opts.pack)

    if opts.canvas:  # one backbone pass per canvas, in runs of whole images
        return MultiScaleFeatures.cat(
            [
                combine(encode_canvases(backbone, tiles(a, b), plans[a:b], chunk), a, b, False)
                for a, b in image_groups(plans, chunk)
            ]
        )
    if chunk is None:  # everything in one backbone call
        return combine(_encode(backbone, distinct(0, len(plans)), None, multiple), 0, len(plans))
    parts = _stream(backbone, counts, chunk, multiple, distinct, combine)
    return MultiScaleFeatures.cat(list(parts))


def _rows(local: Sequence[np.ndarray], sizes: Sequence[int]) -> torch.Tensor:
    """Local row indices of consecutive images, offset by the sizes of the images before."""
    offsets = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64)
    return torch.from_numpy(
        np.concatenate([o + idx for o, idx in zip(offsets, local, strict=True)])
    )


def _prefix_tokens(features: torch.Tensor, declared: int | None) -> int | None:
    """The prefix count of the backbone's tokens: ``declared``, or the one unambiguous reading of
    ``N`` tokens, ``N - ⌊√N⌋²`` when that is at most one grid row (CLS and registers).

    Anything else (15 tokens: 6 prefix + 3 × 3? 3 tokens: 2 + 1 × 1?) is not guessed: the
    ``ValueError`` asks for ``num_prefix_tokens``.
    """
    if declared is not None or features.dim() != 3:
        return declared
    n = features.shape[1]
    side = math.isqrt(n)
    if n - side * side > side:
        raise ValueError(
            f"num_prefix_tokens: the backbone returned {n} tokens per tile, which is no square "
            f"grid plus at most a grid row of prefix tokens (read as {n - side * side} + "
            f"{side}x{side}, that would be a guess): pass num_prefix_tokens= (its CLS and "
            "register count), got None"
        )
    return n - side * side


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
    counts: Sequence[int],
    chunk: int,
    multiple: int | None,
    tile: Callable[[int, int], torch.Tensor],
    combine: Callable[[torch.Tensor, int, int], MultiScaleFeatures],
) -> Iterator[MultiScaleFeatures]:
    """Tile, encode and merge in a stream of full chunks of ``chunk`` tiles.

    Images are tiled just ahead of the backbone and merged as soon as all their tiles are encoded,
    so memory holds the output plus about one chunk of tiles and features, however many images
    there are. Chunk boundaries do not depend on image boundaries: every backbone call but the
    last gets exactly ``chunk`` tiles.
    """
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
        while ready < len(counts) and ends[ready] <= encoded:
            ready += 1
        if ready > merged:
            features = torch.cat(done) if len(done) > 1 else done[0]
            used = ends[ready - 1] - (ends[merged - 1] if merged else 0)
            yield combine(features[:used], merged, ready)
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
        # what a prepared batch must agree with: the plan options this layer was given (as
        # keywords, or set in options=)
        given = _with_scales(kwargs, scales)
        defaults = S2Options()
        self._given = {
            name: getattr(opts, name)
            for name in stage_fields("plan")
            if name in given or getattr(opts, name) != getattr(defaults, name)
        }

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor] | TileBatch | Mapping[str, Any],
        plans: Sequence[TilePlan] | None = None,
    ) -> MultiScaleFeatures:
        """Run :func:`forward` on ``images`` (and optional ``plans``).

        ``images`` may also be a prepared batch: a :class:`~dynamic_s2.tiling.TileBatch` or the
        ``BatchFeature`` of :class:`~dynamic_s2.hf.DynamicS2ImageProcessor`, which is then
        encoded and merged as :func:`run` does (its plans decide the tiles). A plan option this
        layer was given (scales, tile size, policy, fit, caps, budget) that the batch's plans
        disagree with raises ``ValueError``, as ``plans=`` does, and so does a batch whose
        declared ``num_image_tokens`` differ from the rows this layer makes.
        """
        if self.backbone is not self.adapter.module:  # replaced, e.g. by torch.compile
            self.adapter = self.adapter.with_module(self.backbone)
        if isinstance(images, TileBatch | Mapping) and plans is None:
            batch, expected = _as_batch(images)
            _check_batch(batch, self.options, self._given)
            return _run_batch(self.adapter, batch, self.options, expected)
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
