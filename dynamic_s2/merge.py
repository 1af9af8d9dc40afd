"""Tile features + plans → one multi-scale feature map per image.

For every image and scale the tile features are stitched into one map and cropped to the valid
region the plan gives; every scale is resampled to the grid of one output scale and the scales are
concatenated on channels in ascending order.

The result is built packed (image after image, raster order) by the merge kernel of
:mod:`dynamic_s2._resample`: every image's scale is written straight from its tiles into its rows
and channel slice by strided copies (integer factors as broadcast views, area averages summed in
the reference's order), with no index map. Under autograd the same taps run as weighted gathers
whose backward is the adjoint. The padded ``[B, H, W, C]`` view and its mask are only built when
asked for.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import _checks
from ._fused import pack_maps
from ._resample import Axis, axis_taps, row_strides, tap_rows, write_image
from .multiscale import MultiScaleFeatures
from .plan import TilePlan

__all__ = [
    "MultiScaleFeatures",
    "PrefixGuessWarning",
    "TileLayout",
    "mean_prefix",
    "merge",
    "split_prefix",
    "stitch_resample",
]

RESAMPLE_MODES = ("area", "bilinear")


class PrefixGuessWarning(UserWarning):
    """Warned when a prefix token count inferred from the token count is implausible."""


@dataclass(frozen=True, eq=False)
class TileLayout:
    """Where the tiles of one image at one scale are, and which part of their stitched map counts.

    Attributes:
        tile_ids: ``[rows, cols]`` int array: index of each tile in the first dim of the scale's
            maps tensor.
        valid: ``(h, w)`` of the top-left region of the stitched ``[rows·h_s, cols·w_s]`` map
            that is kept.
    """

    tile_ids: np.ndarray
    valid: tuple[int, int]


def split_prefix(
    features: torch.Tensor, num_prefix_tokens: int | None = None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Split backbone output into prefix tokens and channels-last spatial maps.

    A 4-D ``[T, C, h, w]`` output is a feature map (ConvNet) with no prefix. A 3-D ``[T, N, C]``
    output is tokens: the first ``num_prefix_tokens`` are the prefix (CLS, registers), the rest a
    square grid. Undeclared (``None``), the count is inferred as ``N - ⌊√N⌋²``; a guess of more
    prefix tokens than ``⌊√N⌋`` (one row of the grid: CLS and registers, not half a grid), e.g.
    15 tokens read as 6 + 3 × 3, warns with :class:`PrefixGuessWarning`. Integer features are
    converted to float (float64 for 32- and 64-bit integers, else float32): resampling averages.

    Returns:
        ``(prefix [T, P, C] or None, maps [T, h, w, C])``; ``maps`` may be a view.

    Examples:
        >>> prefix, maps = split_prefix(torch.zeros(2, 17, 8))
        >>> prefix.shape, maps.shape
        (torch.Size([2, 1, 8]), torch.Size([2, 4, 4, 8]))
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"tile features must be a torch.Tensor, got {type(features).__name__}")
    _checks.optional(_checks.non_negative_int, "num_prefix_tokens", num_prefix_tokens)
    if features.dim() in (3, 4) and features.shape[-1 if features.dim() == 3 else 1] == 0:
        raise ValueError(f"tile_features have no channels: shape {tuple(features.shape)}")
    if not features.is_floating_point():  # averaging integers in integers would truncate
        wide = features.dtype in (torch.int32, torch.int64)
        features = features.to(torch.float64 if wide else torch.float32)
    if features.dim() == 4:
        if num_prefix_tokens:
            raise ValueError(
                f"num_prefix_tokens={num_prefix_tokens} but the features are 4-D maps "
                f"{tuple(features.shape)}, which have no prefix tokens"
            )
        return None, features.permute(0, 2, 3, 1)
    if features.dim() != 3:
        raise ValueError(
            f"tile features must be [T, N, C] tokens or [T, C, h, w] maps, got shape "
            f"{tuple(features.shape)}"
        )
    n_tokens = features.shape[1]
    prefix_count = (
        n_tokens - math.isqrt(n_tokens) ** 2 if num_prefix_tokens is None else num_prefix_tokens
    )
    side = math.isqrt(max(n_tokens - prefix_count, 0))
    if num_prefix_tokens is None and prefix_count > side:
        warnings.warn(
            f"tile features have {n_tokens} tokens, read as {prefix_count} prefix tokens and a "
            f"{side}x{side} grid: a guess (more prefix tokens than a grid row is no usual "
            "layout); pass num_prefix_tokens= (the backbone's CLS and register count) to say",
            PrefixGuessWarning,
            stacklevel=3,
        )
    if prefix_count >= n_tokens or side * side != n_tokens - prefix_count:
        raise ValueError(
            f"tile features have {n_tokens} tokens, which is not a square grid plus "
            f"{prefix_count} prefix tokens (num_prefix_tokens={num_prefix_tokens})"
        )
    prefix = features[:, :prefix_count] if prefix_count else None
    return prefix, features[:, prefix_count:].unflatten(1, (side, side))


def _flat_rows(maps: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A ``[R, C]`` tensor and the row strides that address every ``(tile, y, x)`` of ``maps``."""
    strides = row_strides(maps)
    if strides is None or (maps.requires_grad and not maps.is_contiguous()):
        maps = maps.contiguous()
        strides = row_strides(maps)
        if strides is None:  # pragma: no cover - a contiguous tensor always has row strides
            raise ValueError(f"cannot address maps of shape {tuple(maps.shape)}")
    if maps.is_contiguous():
        return maps.reshape(-1, maps.shape[-1]), strides
    t, h, w, c = maps.shape
    rows = (t - 1) * strides[0] + (h - 1) * strides[1] + (w - 1) * strides[2] + 1
    return maps.as_strided((rows, c), (c, 1)), strides


def stitch_resample(
    maps: Sequence[torch.Tensor],
    layouts: Sequence[Sequence[TileLayout]],
    out_sizes: Sequence[tuple[int, int]],
    *,
    resample: str = "area",
) -> torch.Tensor:
    """Stitch, crop, resample and concatenate every scale of every image, packed.

    Args:
        maps: one ``[T_s, h_s, w_s, C]`` tensor per scale (channels last; views are fine).
        layouts: ``layouts[b][s]``: the :class:`TileLayout` of image ``b`` at scale ``s``.
        out_sizes: the output grid ``(H_b, W_b)`` of every image.
        resample: ``"area"`` (exactly ``F.interpolate(mode="area")``) or ``"bilinear"``
            (``align_corners=False``), computed in float32 for half precision inputs.

    Returns:
        ``[Σ H_b·W_b, S·C]``: image after image in raster order, scales concatenated on channels
        in the order given.

    Examples:
        >>> import numpy as np
        >>> maps = [torch.arange(4.).view(1, 2, 2, 1), torch.ones(4, 2, 2, 1)]
        >>> layouts = [[TileLayout(np.array([[0]]), (2, 2)),
        ...             TileLayout(np.arange(4).reshape(2, 2), (4, 4))]]
        >>> stitch_resample(maps, layouts, [(4, 4)]).shape
        torch.Size([16, 2])
    """
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
    _check_maps(maps)
    dtype, device = maps[0].dtype, maps[0].device
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    grad = torch.is_grad_enabled() and any(m.requires_grad for m in maps)
    if not grad:
        return _write_packed(maps, layouts, out_sizes, resample)
    columns: list[torch.Tensor] = []
    for s, fmap in enumerate(maps):  # autograd: the weighted gathers of every image at once
        src, strides = _flat_rows(fmap)
        rows_np, weight_np = _scale_taps(
            fmap, strides, [row[s] for row in layouts], out_sizes, resample
        )
        rows_t = torch.from_numpy(rows_np).to(device, non_blocking=True)
        columns.append(_gather(src, rows_t, weight_np, compute))
    return torch.cat(columns, dim=1)


def _write_packed(
    maps: Sequence[torch.Tensor],
    layouts: Sequence[Sequence[TileLayout]],
    out_sizes: Sequence[tuple[int, int]],
    resample: str,
) -> torch.Tensor:
    """:func:`stitch_resample` without autograd: every image's scale written straight from its
    tiles into its rows and channel slice of the packed output (:func:`_resample.write_image`)."""
    channels = maps[0].shape[-1]
    width = len(maps) * channels
    total = sum(h * w for h, w in out_sizes)
    out = maps[0].new_empty((total, width))
    scratch: dict[str, torch.Tensor] = {}
    row = 0
    for b, (oh, ow) in enumerate(out_sizes):
        axes = (Axis(1, ow * width, ow * width), Axis(1, width, width))
        for s, fmap in enumerate(maps):
            layout = layouts[b][s]
            base = int(out.storage_offset()) + row * width + s * channels
            write_image(
                out, base, axes, fmap, layout.tile_ids, layout.valid, (oh, ow), resample, scratch
            )
        row += oh * ow
    return out


def _check_maps(maps: Sequence[torch.Tensor]) -> None:
    channels, dtype, device = maps[0].shape[-1], maps[0].dtype, maps[0].device
    for s, m in enumerate(maps):
        if m.shape[-1] != channels or m.dtype != dtype or m.device != device:
            raise ValueError(
                f"maps[{s}] has {m.shape[-1]} channels, {m.dtype} on {m.device}, but maps[0] has "
                f"{channels}, {dtype} on {device}: the backbone must give every scale the same "
                "channels, dtype and device"
            )


def _scale_taps(
    fmap: torch.Tensor,
    strides: tuple[int, int, int],
    layouts: Sequence[TileLayout],
    out_sizes: Sequence[tuple[int, int]],
    resample: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Host arithmetic for one scale: for every output cell of every image (in output order), the
    source rows and weights of its taps, padded with zero weights to the largest tap count."""
    side = (fmap.shape[1], fmap.shape[2])
    rows_list, weight_list = [], []
    for layout, (oh, ow) in zip(layouts, out_sizes, strict=True):
        vh, vw = layout.valid
        ri, rw = axis_taps(vh, oh, resample)
        ci, cw = axis_taps(vw, ow, resample)
        rows, weight = tap_rows(
            layout.tile_ids,
            (ri[:, None, :, None], rw[:, None, :, None]),
            (ci[None, :, None, :], cw[None, :, None, :]),
            side,
            strides,
        )
        taps = rows.shape[2] * rows.shape[3]
        rows_list.append(rows.reshape(-1, taps))
        weight_list.append(weight.reshape(-1, taps))
    most = max(r.shape[1] for r in rows_list)
    rows_np = np.concatenate(
        [np.pad(r, ((0, 0), (0, most - r.shape[1])), mode="edge") for r in rows_list]
    )
    weight_np = np.concatenate([np.pad(w, ((0, 0), (0, most - w.shape[1]))) for w in weight_list])
    return rows_np, weight_np


def _gather(
    src: torch.Tensor, rows_t: torch.Tensor, weight_np: np.ndarray, compute: torch.dtype
) -> torch.Tensor:
    """The weighted sum of the taps as a new tensor (autograd, or half precision in float32)."""
    if weight_np.shape[1] == 1:
        return src.index_select(0, rows_t[:, 0])
    weight_t = torch.from_numpy(weight_np).to(src.device, compute, non_blocking=True)
    value = src.index_select(0, rows_t[:, 0]).to(compute) * weight_t[:, :1]
    for k in range(1, weight_np.shape[1]):
        value = value + src.index_select(0, rows_t[:, k]).to(compute) * weight_t[:, k : k + 1]
    return value.to(src.dtype)


def mean_prefix(
    prefixes: Sequence[torch.Tensor], layouts: Sequence[Sequence[TileLayout]]
) -> torch.Tensor:
    """Per image and scale, the mean prefix token over the image's tiles; scales on channels.

    Args:
        prefixes: one ``[T_s, P, C]`` tensor per scale.
        layouts: ``layouts[b][s]`` as for :func:`stitch_resample`.

    Returns:
        ``[B, P, S·C]``.

    Examples:
        >>> import numpy as np
        >>> layouts = [[TileLayout(np.array([[0, 1]]), (1, 2))]]
        >>> mean_prefix([torch.tensor([[[1.0]], [[3.0]]])], layouts)
        tensor([[[2.]]])
    """
    num_images = len(layouts)
    columns = []
    for s, prefix in enumerate(prefixes):
        ids = [layouts[b][s].tile_ids.ravel() for b in range(num_images)]
        segment = np.concatenate([np.full(len(i), b) for b, i in enumerate(ids)])
        counts = np.array([len(i) for i in ids], dtype=np.float64)
        device = prefix.device
        compute = prefix.dtype if prefix.dtype == torch.float64 else torch.float32
        gathered = prefix.index_select(0, torch.from_numpy(np.concatenate(ids)).to(device))
        total = torch.zeros((num_images, *prefix.shape[1:]), dtype=compute, device=device)
        total = total.index_add(0, torch.from_numpy(segment).to(device), gathered.to(compute))
        scale = torch.from_numpy(1.0 / counts).to(device, compute).view(-1, 1, 1)
        columns.append((total * scale).to(prefix.dtype))
    return torch.cat(columns, dim=-1)


def plan_layouts(plans: Sequence[TilePlan], tokens_per_side: int) -> list[list[TileLayout]]:
    """The :class:`TileLayout` of every image and scale for tiles in the library's order.

    Tiles are image-major, then scale ascending, then row-major; the valid region of each scale is
    the plan's :meth:`~dynamic_s2.plan.ScalePlan.feature_size`.
    """
    layouts = []
    offset = 0
    for p in plans:
        row = []
        for sp in p.scales:
            rows, cols = sp.grid
            ids = offset + np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
            row.append(TileLayout(ids, sp.feature_size(tokens_per_side)))
            offset += rows * cols
        layouts.append(row)
    return layouts


def check_plan_list(plans: object) -> list[TilePlan]:
    """Validate a non-empty list of plans with one tile size and one number of scales."""
    if isinstance(plans, TilePlan):
        plans = [plans]
    if not isinstance(plans, Sequence) or isinstance(plans, str | bytes):
        raise TypeError(f"plans must be a TilePlan or a sequence of them, got {plans!r}")
    if not plans:
        raise ValueError(f"plans must not be empty, got {plans!r}: give one TilePlan per image")
    for i, p in enumerate(plans):
        if not isinstance(p, TilePlan):
            raise TypeError(f"plans[{i}] must be a TilePlan, got {type(p).__name__}")
    counts = {len(p.scales) for p in plans}
    if len(counts) > 1:
        raise ValueError(f"plans must all have the same number of scales, got {sorted(counts)}")
    tiles = {p.tile_size for p in plans}
    if len(tiles) > 1:
        raise ValueError(f"plans must share one tile_size, got {sorted(tiles)}")
    return list(plans)


def merge(
    tile_features: torch.Tensor,
    plans: Sequence[TilePlan] | TilePlan,
    *,
    output_scale: int = -1,
    resample: str = "area",
    num_prefix_tokens: int | None = None,
    pack: int | None = None,
) -> MultiScaleFeatures:
    """Merge per-tile backbone features into one multi-scale map per image.

    Args:
        tile_features: ``[T, N, C]`` tokens (a square grid after ``num_prefix_tokens`` prefix
            tokens, inferred as ``N - ⌊√N⌋²`` when ``None``, see :func:`split_prefix`) or
            ``[T, C, h, w]`` maps, for the tiles in the library's order (image-major, scale
            ascending, row-major). Integer features are merged as float.
        plans: the plan of every image, in order.
        output_scale: index of the scale whose grid every scale is resampled to: -1 (the largest,
            NVILA's choice) by default, 0 reproduces the S2 paper.
        resample: ``"area"`` (exactly ``F.interpolate(mode="area")``) or ``"bilinear"``.
        num_prefix_tokens: number of prefix tokens (CLS, registers) of token features.
        pack: when set to ``k``, every ``k × k`` block of each merged map (zero-padded at the
            bottom and right) becomes one cell of ``k²·S·C`` channels, blocks row-major, as
            NVILA's projector packs tokens; merge and packing run as one pass that writes each
            output element once. ``sizes`` are then the packed grids; ``prefix`` keeps ``S·C``.

    Returns:
        :class:`MultiScaleFeatures` with ``C_total = S·C`` channels (``k²·S·C`` with ``pack``),
        scales ascending.

    Examples:
        >>> from dynamic_s2 import plan_tiles
        >>> plans = [plan_tiles(60, 80, (32, 64)), plan_tiles(64, 32, (32, 64))]
        >>> feats = torch.randn(sum(p.num_tiles for p in plans), 1 + 16, 8)  # CLS + 4x4 tokens
        >>> out = merge(feats, plans)
        >>> out.features.shape, out.prefix.shape, out.sizes
        (torch.Size([2, 16, 12, 16]), torch.Size([2, 1, 16]), [(8, 12), (16, 8)])
        >>> merge(feats, plans, pack=2).sizes
        [(4, 6), (8, 4)]
    """
    plan_list = check_plan_list(plans)
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
    total = sum(p.num_tiles for p in plan_list)
    if not isinstance(tile_features, torch.Tensor):
        raise TypeError(f"tile_features must be a torch.Tensor, got {type(tile_features).__name__}")
    if tile_features.dim() not in (3, 4) or tile_features.shape[0] != total:
        raise ValueError(
            f"tile_features must be [T, N, C] or [T, C, h, w] with T = {total} tiles (the plans' "
            f"total), got shape {tuple(tile_features.shape)}"
        )
    out_index = plan_list[0].scale_index(output_scale, "output_scale")
    pack = _checks.optional(_checks.positive_int, "pack", pack)
    return _merge(tile_features, plan_list, out_index, resample, num_prefix_tokens, pack)


def _merge(
    tile_features: torch.Tensor,
    plan_list: Sequence[TilePlan],
    out_index: int,
    resample: str,
    num_prefix_tokens: int | None,
    pack: int | None = None,
) -> MultiScaleFeatures:
    """:func:`merge` on checked arguments (the chain calls this directly)."""
    prefix, maps = split_prefix(tile_features, num_prefix_tokens)
    if maps.shape[1] != maps.shape[2]:
        raise ValueError(
            f"square tiles must give square feature maps, got {maps.shape[1]}x{maps.shape[2]} "
            f"per tile (tile_features shape {tuple(tile_features.shape)})"
        )
    if pack is not None:
        return _merge_packed(maps, prefix, plan_list, out_index, resample, pack)
    layouts = plan_layouts(plan_list, maps.shape[1])
    num_scales = len(plan_list[0].scales)
    out_sizes = [row[out_index].valid for row in layouts]
    tokens = stitch_resample([maps] * num_scales, layouts, out_sizes, resample=resample)
    merged_prefix = None if prefix is None else mean_prefix([prefix] * num_scales, layouts)
    return MultiScaleFeatures(tokens, out_sizes, plan_list, merged_prefix)


def _merge_packed(
    maps: torch.Tensor,
    prefix: torch.Tensor | None,
    plans: Sequence[TilePlan],
    out_index: int,
    resample: str,
    pack: int,
) -> MultiScaleFeatures:
    """``merge(..., pack=k)``: the fused merge-and-pack of :mod:`dynamic_s2._fused`."""
    tokens, sizes = pack_maps(maps, list(plans), out_index, pack, resample)
    num_scales = len(plans[0].scales)
    layouts = plan_layouts(plans, maps.shape[1]) if prefix is not None else []
    merged_prefix = None if prefix is None else mean_prefix([prefix] * num_scales, layouts)
    return MultiScaleFeatures(tokens, sizes, plans, merged_prefix)
