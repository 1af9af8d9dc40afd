"""Tile features + plans → packed LLM tokens in one pass (merge and ``k × k`` packing fused).

The merge resamples every scale of an image to one output grid ``(H, W)`` and concatenates the
scales on channels; NVILA's projector then packs every ``k × k`` block of that map into one token
of ``k²·S·C`` channels (zero padding at the bottom and right). The token order is a permutation of
the merged cells, so one gather can write the tokens directly:

* the output ``[Σ tokens, k²·S·C]`` is viewed as *slots* ``[Σ tokens·k², S·C]`` (token-major,
  then the block's row, then its column); scale ``s`` owns the channel slice ``s·C:(s+1)·C``;
* for every slot the source feature rows and weights of its area (or bilinear) taps are computed on
  the host from the plans (the same 1-D taps as :mod:`dynamic_s2.merge`) and cached per geometry;
* single-tap scales (integer upsampling, the identity) are one ``index_select`` per run of images
  straight into the output; on a multi-tap scale (a non-integer area factor, bilinear) every slot
  first takes its first non-zero tap the same way, then only the slots that really sum several
  taps are summed (in float32 for half precision) and written over with one ``index_copy_``;
  padding slots are zeroed at the end.

Features whose rows are not contiguous (HF SigLIP's channel-major ``hidden_states``, strides
``(N·C, 1, N)``) are transposed one image at a time into a reused scratch and gathered from there.
Gradients flow through a custom autograd function whose backward is the adjoint gather
(``index_add``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .merge import _axis_taps, _row_strides, tap_rows
from .packing import packed_size
from .plan import TilePlan

__all__ = ["cu_seqlens", "fill_tokens", "pack_maps"]

#: One image's geometry: per scale ``(rows, cols, valid_h, valid_w)``, then the output grid.
Geometry = tuple[tuple[tuple[int, int, int, int], ...], tuple[int, int]]


@dataclass(frozen=True, eq=False)
class _Segment:
    """Slots ``[lo, hi)`` of scale ``scale``: each gathered from ``rows``; where a slot sums more
    than one tap (the slots ``mixed``), the sum over ``mixed_rows`` with ``mixed_weights``."""

    scale: int
    lo: int
    hi: int
    rows: torch.Tensor
    mixed: torch.Tensor | None = None
    mixed_rows: torch.Tensor | None = None
    mixed_weights: torch.Tensor | None = None


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
    ri, rw = _axis_taps(vh, out_hw[0], mode)
    ci, cw = _axis_taps(vw, out_hw[1], mode)
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
def _segments(
    geometries: tuple[Geometry, ...],
    side: int,
    factor: int,
    strides: tuple[int, int, int],
    mode: str,
    batched: bool,
    device: torch.device,
    compute: torch.dtype,
) -> tuple[tuple[tuple[_Segment, ...], ...], torch.Tensor | None]:
    """Per image, the segments that fill its slots, and all padding slots (``None`` if none).

    ``batched``: rows address the whole batch (tile offsets added) and a run of consecutive
    single-tap images shares one segment (kept with the run's last image); otherwise rows are
    image-local. Cached per geometry, layout, device and compute dtype: the tensors are shared.
    """
    num_scales = len(geometries[0][0])
    groups: list[list[_Segment]] = []
    pending: list[list[tuple[int, int, np.ndarray]]] = [[] for _ in range(num_scales)]

    def flush(row: list[_Segment], s: int) -> None:
        if pending[s]:
            rows = torch.from_numpy(np.concatenate([r for _, _, r in pending[s]])).to(device)
            row.append(_Segment(s, pending[s][0][0], pending[s][-1][1], rows))
            pending[s].clear()

    slot0, tile0, pads = 0, 0, []
    for g in geometries:
        n_slots = _slots(g, factor)
        row: list[_Segment] = []
        for s in range(num_scales):
            rows, weight = _scale_map(g, s, side, factor, strides, mode)
            rows = rows + tile0 * strides[0] if batched else rows
            if rows.shape[1] == 1:
                pending[s].append((slot0, slot0 + n_slots, rows[:, 0]))
                if not batched:
                    flush(row, s)
                continue
            flush(row, s)
            row.append(_multi_tap_segment(s, slot0, rows, weight, device, compute))
        groups.append(row)
        pads.append(slot0 + np.flatnonzero(~_slot_cells(g[1], factor)[2]))
        slot0 += n_slots
        tile0 += _tiles(g)
    for s in range(num_scales):
        flush(groups[-1], s)
    pad = np.concatenate(pads)
    return tuple(tuple(r) for r in groups), (torch.from_numpy(pad).to(device) if len(pad) else None)


def _multi_tap_segment(
    s: int, lo: int, rows: np.ndarray, weight: np.ndarray, device: torch.device, dtype: torch.dtype
) -> _Segment:
    """A segment whose slots take their first non-zero tap, then the sums where there are more."""
    used = weight != 0
    first = rows[np.arange(len(rows)), used.argmax(1)]
    mixed = np.flatnonzero(used.sum(1) > 1)
    return _Segment(
        s,
        lo,
        lo + len(rows),
        torch.from_numpy(first).to(device),
        torch.from_numpy(mixed).to(device),
        torch.from_numpy(rows[mixed]).to(device),
        torch.from_numpy(weight[mixed]).to(device, dtype),
    )


def _fill(src: torch.Tensor, slots: torch.Tensor, seg: _Segment, scratch: list) -> None:
    """Write one segment into ``slots [n, S·C]`` from the rows ``src [R, C]``.

    ``scratch``: ``[gathered taps (src dtype), sums (compute dtype)]`` with enough rows.
    """
    c = src.shape[1]
    column = slots[seg.lo : seg.hi, seg.scale * c : (seg.scale + 1) * c]
    torch.index_select(src, 0, seg.rows, out=column)
    if seg.mixed is None or seg.mixed_rows is None or seg.mixed_weights is None:
        return
    m = len(seg.mixed)
    tmp, acc = scratch[0][:m], scratch[1][:m]
    for k in range(seg.mixed_rows.shape[1]):
        torch.index_select(src, 0, seg.mixed_rows[:, k], out=tmp)
        if k == 0:
            torch.mul(tmp, seg.mixed_weights[:, :1], out=acc)
        else:
            acc.addcmul_(tmp, seg.mixed_weights[:, k : k + 1])
    column.index_copy_(0, seg.mixed, acc if acc.dtype == column.dtype else acc.to(column.dtype))


def _scratch(
    groups: Sequence[Sequence[_Segment]], like: torch.Tensor, compute: torch.dtype
) -> list:
    """Buffers for the largest multi-tap sum of ``groups``, allocated once per call."""
    most = max((len(g.mixed) for row in groups for g in row if g.mixed is not None), default=0)
    c = like.shape[-1]
    return [like.new_empty((most, c)), like.new_empty((most, c), dtype=compute)]


def _rows_view(maps: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]] | None:
    """``maps [T, h, w, C]`` as ``[R, C]`` rows plus row strides, when its rows are contiguous."""
    strides = _row_strides(maps)
    if strides is None:
        return None
    t, h, w, c = maps.shape
    count = (t - 1) * strides[0] + (h - 1) * strides[1] + (w - 1) * strides[2] + 1
    return maps.as_strided((count, c), (c, 1)), strides


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype weighted sums are computed in: float32 for half precision."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def fill_tokens(
    maps: torch.Tensor, geometries: tuple[Geometry, ...], factor: int, mode: str, out: torch.Tensor
) -> None:
    """Write the packed tokens of ``maps [T, h, w, C]`` (any strides) into ``out`` (contiguous)."""
    c, side = maps.shape[-1], maps.shape[1]
    slots = out.view(-1, out.shape[1] // (factor * factor))
    compute = compute_dtype(maps.dtype)
    view = _rows_view(maps)
    batched = view is not None
    # Rows the batch's maps can be read from as they are, or (channel-major) rows of one image's
    # tiles at a time, transposed into a reused buffer.
    strides = view[1] if view is not None else (side * side, side, 1)
    key = (geometries, side, factor, strides, mode, batched, maps.device, compute)
    groups, pad = _segments(*key)
    scratch = _scratch(groups, maps, compute)
    if view is not None:
        for seg in (seg for row in groups for seg in row):
            _fill(view[0], slots, seg, scratch)
    else:
        buffer = maps.new_empty((max(_tiles(g) for g in geometries), side, side, c))
        tile0 = 0
        for g, row in zip(geometries, groups, strict=True):
            n = _tiles(g)
            buffer[:n].copy_(maps[tile0 : tile0 + n])
            for seg in row:
                _fill(buffer[:n].view(-1, c), slots, seg, scratch)
            tile0 += n
    if pad is not None:
        slots.index_fill_(0, pad, 0)


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
