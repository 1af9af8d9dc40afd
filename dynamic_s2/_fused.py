"""Tile features + plans → packed LLM tokens in one pass (merge and ``k × k`` packing fused).

The merge resamples every scale of an image to one output grid ``(H, W)`` and concatenates the
scales on channels; NVILA's projector then packs every ``k × k`` block of that map into one token
of ``k²·S·C`` channels (zero padding at the bottom and right). Cell ``(y, x)`` of the merged map
is slot ``(y // k, x // k, y % k, x % k)`` of the tokens ``[nh, nw, k, k, S·C]``: an offset that
is separable in ``y`` and ``x``, so the merge's own kernel
(:func:`dynamic_s2._resample.write_image`)
writes every image's scales straight into the tokens by strided copies from the tiles (HF's
channel-major ``hidden_states`` transposed tile by tile first); the few padding slots
are zeroed at the end. Gradients flow through a custom autograd function whose backward is the
adjoint gather (``index_add``) over index maps built on the host from the same taps.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from ._resample import Axis, axis_taps, tap_rows, write_image
from .packing import packed_size
from .plan import TilePlan

__all__ = ["cu_seqlens", "fill_tokens", "pack_maps"]

#: One image's geometry: per scale ``(rows, cols, valid_h, valid_w)``, then the output grid.
Geometry = tuple[tuple[tuple[int, int, int, int], ...], tuple[int, int]]


def image_geometry(plan: TilePlan, side: int, out_index: int) -> Geometry:
    """The part of a plan the index maps depend on: grids, valid sizes and the output grid."""
    scales = tuple((*sp.grid, *sp.feature_size(side)) for sp in plan.scales)
    return scales, (scales[out_index][2], scales[out_index][3])


@lru_cache(maxsize=2048)
def _slot_cells(hw: tuple[int, int], factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slot (token-major, then block row, block column): its cell ``(y, x)`` and validity."""
    nh, nw = packed_size(hw, factor)
    th, tw, i, j = np.meshgrid(
        np.arange(nh), np.arange(nw), np.arange(factor), np.arange(factor), indexing="ij"
    )
    y, x = (th * factor + i).ravel(), (tw * factor + j).ravel()
    valid = (y < hw[0]) & (x < hw[1])
    return np.minimum(y, hw[0] - 1), np.minimum(x, hw[1] - 1), valid


@lru_cache(maxsize=4096)
def _scale_map(
    geometry: Geometry, s: int, side: int, factor: int, strides: tuple[int, int, int], mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Source rows and weights ``[slots, taps]`` of scale ``s`` for one image (its own tiles).

    Rows count from the image's first tile; padding slots get weight 0. Cached: read only.
    """
    scales, out_hw = geometry
    grid_rows, cols, vh, vw = scales[s]
    first_tile = sum(r * c for r, c, _, _ in scales[:s])
    tile_ids = first_tile + np.arange(grid_rows * cols).reshape(grid_rows, cols)
    y, x, valid = _slot_cells(out_hw, factor)
    ri, rw = axis_taps(vh, out_hw[0], mode)
    ci, cw = axis_taps(vw, out_hw[1], mode)
    rows, weight = tap_rows(  # per slot: [slots, Ly, Lx]
        tile_ids,
        (ri[y][:, :, None], rw[y][:, :, None]),
        (ci[x][:, None, :], cw[x][:, None, :]),
        (side, side),
        strides,
    )
    weight = weight * valid[:, None, None]
    taps = rows.shape[1] * rows.shape[2]
    rows, weight = rows.reshape(-1, taps), weight.reshape(-1, taps)
    rows.setflags(write=False)
    weight.setflags(write=False)
    return rows, weight


def _tiles(geometry: Geometry) -> int:
    return sum(r * c for r, c, _, _ in geometry[0])


def _slots(geometry: Geometry, factor: int) -> int:
    nh, nw = packed_size(geometry[1], factor)
    return nh * nw * factor * factor


@lru_cache(maxsize=64)
def _pad_slots(
    geometries: tuple[Geometry, ...], factor: int, device: torch.device
) -> torch.Tensor | None:
    """Every padding slot of the batch (cells past an image's map in its last tokens), or None."""
    pads, slot0 = [], 0
    for g in geometries:
        pads.append(slot0 + np.flatnonzero(~_slot_cells(g[1], factor)[2]))
        slot0 += _slots(g, factor)
    pad = np.concatenate(pads)
    return torch.from_numpy(pad).to(device) if len(pad) else None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype weighted sums are computed in: float32 for half precision."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def fill_tokens(
    maps: torch.Tensor, geometries: tuple[Geometry, ...], factor: int, mode: str, out: torch.Tensor
) -> None:
    """Write the packed tokens of ``maps [T, h, w, C]`` (any strides) into ``out`` (contiguous)."""
    c = maps.shape[-1]
    width = out.shape[1] // (factor * factor)  # S·C: one slot
    scratch: dict[str, torch.Tensor] = {}
    tile0 = slot0 = 0
    for scales, out_hw in geometries:
        nh, nw = packed_size(out_hw, factor)
        slot = factor * width
        axes = (Axis(factor, nw * factor * slot, slot), Axis(factor, factor * slot, width))
        for s, (rows, cols, vh, vw) in enumerate(scales):
            ids = tile0 + np.arange(rows * cols).reshape(rows, cols)
            base = int(out.storage_offset()) + slot0 * width + s * c
            write_image(out, base, axes, maps, ids, (vh, vw), out_hw, mode, scratch)
            tile0 += rows * cols
        slot0 += nh * nw * factor * factor
    pad = _pad_slots(geometries, factor, maps.device)
    if pad is not None:
        out.view(-1, width).index_fill_(0, pad, 0)


@lru_cache(maxsize=64)
def _dense_maps(
    geometries: tuple[Geometry, ...], side: int, factor: int, mode: str, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per scale, rows of contiguous ``[T·h·w, C]`` maps and weights ``[Σ slots, taps]``."""
    strides = (side * side, side, 1)
    out = []
    for s in range(len(geometries[0][0])):
        parts = [_scale_map(g, s, side, factor, strides, mode) for g in geometries]
        most = max(r.shape[1] for r, _ in parts)
        offsets = np.cumsum([0] + [_tiles(g) * side * side for g in geometries])
        rows = np.concatenate(
            [
                np.pad(r + o, ((0, 0), (0, most - r.shape[1])), mode="edge")
                for (r, _), o in zip(parts, offsets, strict=False)
            ]
        )
        weight = np.concatenate([np.pad(w, ((0, 0), (0, most - w.shape[1]))) for _, w in parts])
        out.append((torch.from_numpy(rows).to(device), torch.from_numpy(weight).to(device)))
    return tuple(out)


class _Pack(torch.autograd.Function):
    """:func:`fill_tokens` into a new tensor, with the adjoint gather as its backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        maps: torch.Tensor,
        geometries: tuple[Geometry, ...],
        factor: int,
        mode: str,
        count: int,
    ) -> torch.Tensor:
        out = maps.new_empty((count, factor * factor * len(geometries[0][0]) * maps.shape[-1]))
        fill_tokens(maps, geometries, factor, mode, out)
        ctx.meta = (tuple(maps.shape), geometries, factor, mode)  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        (t, h, w, c), geometries, factor, mode = ctx.meta  # type: ignore[attr-defined]
        compute = compute_dtype(grad.dtype)
        slots = grad.reshape(-1, grad.shape[1] // (factor * factor))
        total = torch.zeros((t * h * w, c), dtype=compute, device=grad.device)
        for s, (rows, weight) in enumerate(_dense_maps(geometries, h, factor, mode, grad.device)):
            g = slots[:, s * c : (s + 1) * c].to(compute)
            weight = weight.to(compute)
            for k in range(rows.shape[1]):
                total.index_add_(0, rows[:, k], g * weight[:, k : k + 1])
        return total.view(t, h, w, c).to(grad.dtype), None, None, None, None


def check_out(out: object, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """``out`` as a writable buffer for ``shape`` tokens like ``like``, or a ``ValueError``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out must be a {list(shape)} {like.dtype} tensor on {like.device}, got "
            f"{list(out.shape)} {out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    if out.untyped_storage().data_ptr() == like.untyped_storage().data_ptr():
        raise ValueError("out must not share memory with tile_features")
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError("out= does not support autograd: out requires grad")
    return out


def pack_maps(
    maps: torch.Tensor,
    plans: Sequence[TilePlan],
    out_index: int,
    factor: int,
    mode: str = "area",
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Packed tokens ``[Σ tokens, k²·S·C]`` of ``maps [T, h, h, C]`` and every token grid.

    With ``out`` the tokens are written into it (no autograd); otherwise a new tensor is made,
    through autograd when ``maps`` requires grad.
    """
    side = maps.shape[1]
    geometries = tuple(image_geometry(p, side, out_index) for p in plans)
    sizes = [packed_size(g[1], factor) for g in geometries]
    count = sum(h * w for h, w in sizes)
    width = factor * factor * len(geometries[0][0]) * maps.shape[-1]
    if out is not None:
        if torch.is_grad_enabled() and maps.requires_grad:
            raise ValueError("out= does not support autograd: tile_features require grad")
        fill_tokens(maps, geometries, factor, mode, check_out(out, (count, width), maps))
        return out, sizes
    if torch.is_grad_enabled() and maps.requires_grad:
        return _Pack.apply(maps, geometries, factor, mode, count), sizes
    tokens = maps.new_empty((count, width))
    fill_tokens(maps, geometries, factor, mode, tokens)
    return tokens, sizes


def cu_seqlens(sizes: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """``int32 [B + 1]`` cumulative token counts of token grids ``sizes``."""
    counts = np.cumsum([0] + [h * w for h, w in sizes])
    return torch.tensor(counts, dtype=torch.int32, device=device)
