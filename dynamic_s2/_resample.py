"""The merge's one kernel: 1-D taps, and every merged cell written by strided copies.

Area and bilinear resampling are separable: along each axis every output position takes a few
source positions (its *taps*) with weights. This module owns those taps (:func:`axis_taps`) and the
one way they are applied, shared by the padded map, the packed tokens and the fused ``k × k``
tokens (:mod:`dynamic_s2.merge`, :mod:`dynamic_s2._fused`):

* an axis maps a logical position to a memory offset, on both sides: a source position ``i`` of a
  stitched map of tiles is ``(i // side)·tile_stride + (i % side)·cell_stride``, an output position
  ``o`` is ``(o // k)·block_stride + (o % k)·cell_stride`` (``k = 1`` for the packed and the
  padded layouts, ``k`` for NVILA's ``k × k`` tokens). Both are separable in ``y`` and ``x``;
* along each axis the output positions are cut into *runs*: arithmetic progressions whose output
  offsets and tap offsets all advance by constant steps and whose taps have the same weights
  (:func:`axis_runs`). Runs that repeat at a constant offset are stacked into one run with another
  dimension: an integer upsampling becomes one run whose source stride is 0 on the repeat
  dimension (a broadcast view), a stitched map one run with a tile dimension;
* a ``(y run, x run)`` pair is then one strided copy of ``[..., C]`` views (``Tensor.copy_``,
  no index map), or, where a cell averages several taps, a sum of strided views in the reference's
  order divided by the window sides (area) or weighted (bilinear). Channel-major tiles are first
  transposed one by one (torch's blocked 2-D transpose, several times faster than a strided copy
  of them) into a reused buffer holding the scale's tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "Axis",
    "Run",
    "axis_runs",
    "axis_taps",
    "gather",
    "row_strides",
    "source_axes",
    "tap_rows",
    "write_image",
    "write_pairs",
]

#: Largest period (output positions per repeat of the tap pattern) resampled by strided copies;
#: an axis with a longer one (a size that shares no large factor with its output, e.g. a cropped
#: ``fit="pad"`` map) is gathered through index maps instead.
MAX_PERIOD = 16
#: Most ``(y run, x run)`` pairs written straight from the tiles; past it the tiles of the scale are
#: stitched into one reused buffer first (one copy), which joins the runs that tile edges cut.
MAX_PAIRS = 8


@lru_cache(maxsize=4096)
def axis_taps(size_in: int, size_out: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights ``[size_out, L]`` of a 1-D area or bilinear resample.

    Area windows are those of ``F.interpolate(mode="area")``; a window shorter than ``L`` is padded
    with its last index and weight 0. Cached: the arrays are shared and must not be modified.

    Examples:
        >>> index, weight = axis_taps(2, 3, "area")
        >>> index.tolist(), weight.tolist()
        ([[0, 1], [0, 1], [1, 1]], [[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    """
    out = np.arange(size_out)
    if size_in == size_out:
        return out[:, None], np.ones((size_out, 1))
    if mode == "area":  # adaptive average pooling windows, as F.interpolate(mode="area")
        start = (out * size_in) // size_out
        end = -((-(out + 1) * size_in) // size_out)
        length = end - start
        taps = int(length.max())
        index = start[:, None] + np.arange(taps)[None, :]
        weight = (np.arange(taps)[None, :] < length[:, None]) / length[:, None]
        return np.minimum(index, size_in - 1), weight
    # bilinear, align_corners=False
    src = np.maximum((out + 0.5) * (size_in / size_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    frac = src - i0
    return np.stack([i0, i1], 1), np.stack([1.0 - frac, frac], 1)


def tap_rows(
    tile_ids: np.ndarray,
    row_taps: tuple[np.ndarray, np.ndarray],
    col_taps: tuple[np.ndarray, np.ndarray],
    side: tuple[int, int],
    strides: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Source feature rows and weights of separable taps over a stitched grid of tiles.

    ``row_taps``/``col_taps`` are ``(indices, weights)`` into the stitched map's rows and columns,
    shaped to broadcast against each other; ``tile_ids[r, c]`` is the tile at grid position
    ``(r, c)``, ``side`` the ``(h, w)`` of one tile's map and ``strides`` the flat-row strides of
    (tile, y, x). The index maps of the gathers that autograd runs through.

    Examples:
        >>> ids = np.arange(2).reshape(1, 2)  # two tiles side by side, 2 x 2 cells each
        >>> rows, w = tap_rows(ids, (np.array([[1]]), np.ones((1, 1))),
        ...                    (np.array([[3]]), np.ones((1, 1))), (2, 2), (4, 2, 1))
        >>> int(rows[0, 0])  # tile 1, y 1, x 1 -> 4 + 2 + 1
        7
    """
    (ri, rw), (ci, cw) = row_taps, col_taps
    tile = tile_ids[ri // side[0], ci // side[1]]
    rows = tile * strides[0] + (ri % side[0]) * strides[1] + (ci % side[1]) * strides[2]
    return rows, rw * cw


def row_strides(maps: torch.Tensor) -> tuple[int, int, int] | None:
    """Strides of ``[T, h, w, C]`` maps in units of feature rows, when rows are contiguous.

    Examples:
        >>> row_strides(torch.zeros(2, 3, 3, 4))
        (9, 3, 1)
    """
    channels = maps.shape[-1]
    # The stride of a size-1 dim is arbitrary (never used to step), so treat it as 0.
    st = [0 if n == 1 else x for n, x in zip(maps.shape, maps.stride(), strict=True)]
    if (channels > 1 and st[3] != 1) or any(x % channels for x in st[:3]):
        return None
    return st[0] // channels, st[1] // channels, st[2] // channels


@dataclass(frozen=True)
class Axis:
    """Memory offsets (in elements) of one axis: position ``p`` is at
    ``(p // block)·block_stride + (p % block)·cell_stride``."""

    block: int
    block_stride: int
    cell_stride: int

    def offsets(self, positions: np.ndarray) -> np.ndarray:
        return (positions // self.block) * self.block_stride + (positions % self.block) * (
            self.cell_stride
        )


@dataclass(frozen=True)
class Run:
    """Output positions ``dst + Σ_d i_d·dst_strides[d]`` (``i_d < sizes[d]``) of one axis, whose
    taps ``j`` are at ``src[j] + Σ_d i_d·src_strides[d]`` with weight ``weights[j]``; ``window`` is
    the area window's length (its divisor), 0 for bilinear weights."""

    sizes: tuple[int, ...]
    dst_strides: tuple[int, ...]
    src_strides: tuple[int, ...]
    dst: int
    src: tuple[int, ...]
    weights: tuple[float, ...]
    window: int


def _cells(size_in: int, size_out: int, mode: str) -> list[tuple[tuple[int, ...], tuple, int]]:
    """Per output position: its source indices, weights and area window (zero taps dropped)."""
    index, weight = axis_taps(size_in, size_out, mode)
    cells = []
    for o in range(size_out):
        used = weight[o] != 0
        taps = tuple(int(i) for i in index[o][used])
        if mode == "area":
            cells.append((taps, (1.0,) * len(taps), len(taps)))
        else:
            cells.append((taps, tuple(float(w) for w in weight[o][used]), 0))
    return cells


def _progressions(
    positions: list[int], dst: np.ndarray, src: list[tuple[int, ...]], key: list
) -> list[Run]:
    """Cut ``positions`` (one residue class, ascending) into runs of constant steps and key."""
    runs: list[Run] = []
    start = 0
    while start < len(positions):
        p0 = positions[start]
        end = start + 1
        if end < len(positions) and key[positions[end]] == key[p0]:
            p1 = positions[end]
            step = (
                int(dst[p1] - dst[p0]),
                tuple(b - a for a, b in zip(src[p0], src[p1], strict=True)),
            )
            while end + 1 < len(positions):
                a, b = positions[end], positions[end + 1]
                same = key[b] == key[p0] and int(dst[b] - dst[a]) == step[0]
                if not same or tuple(y - x for x, y in zip(src[a], src[b], strict=True)) != step[1]:
                    break
                end += 1
            end += 1
        n = end - start
        d_step = int(dst[positions[start + 1]] - dst[p0]) if n > 1 else 0
        s_steps = (
            tuple(b - a for a, b in zip(src[p0], src[positions[start + 1]], strict=True))
            if n > 1
            else (0,) * len(src[p0])
        )
        if len(set(s_steps)) > 1:  # taps that step differently cannot share one view
            for p in positions[start:end]:
                runs.append(_single(p, dst, src, key))
        else:
            weights, window = key[p0]
            runs.append(Run((n,), (d_step,), (s_steps[0],), int(dst[p0]), src[p0], weights, window))
        start = end
    return runs


def _single(p: int, dst: np.ndarray, src: list[tuple[int, ...]], key: list) -> Run:
    weights, window = key[p]
    return Run((1,), (0,), (0,), int(dst[p]), src[p], weights, window)


def _stack(runs: list[Run]) -> list[Run]:
    """Stack runs of one shape that repeat at constant offsets into runs with one more dim."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(
            (r.sizes, r.dst_strides, r.src_strides, r.weights, r.window, len(r.src)), []
        ).append(r)
    out: list[Run] = []
    for group in groups.values():
        group.sort(key=lambda r: r.dst)
        i = 0
        while i < len(group):
            j = i + 1
            if j < len(group):
                step = (group[j].dst - group[i].dst, _delta(group[i], group[j]))
                while (
                    j + 1 < len(group)
                    and (
                        group[j + 1].dst - group[j].dst,
                        _delta(group[j], group[j + 1]),
                    )
                    == step
                ):
                    j += 1
                j += 1
            first, n = group[i], j - i
            if n == 1 or len(set(step[1])) > 1:
                out.extend(group[i:j])
            else:
                out.append(
                    Run(
                        (n, *first.sizes),
                        (step[0], *first.dst_strides),
                        (step[1][0], *first.src_strides),
                        first.dst,
                        first.src,
                        first.weights,
                        first.window,
                    )
                )
            i = j
    return out


def _delta(a: Run, b: Run) -> tuple[int, ...]:
    return tuple(y - x for x, y in zip(a.src, b.src, strict=True))


@lru_cache(maxsize=4096)
def axis_runs(size_in: int, size_out: int, mode: str, src: Axis, dst: Axis) -> tuple[Run, ...]:
    """The runs of one axis resampled from ``size_in`` to ``size_out`` positions (cached).

    Examples:
        >>> one = Axis(4, 4, 1)  # a 4-cell tile, contiguous
        >>> [r.sizes for r in axis_runs(4, 8, "area", one, Axis(1, 1, 1))]  # 2x: a broadcast
        [(2, 4)]
    """
    cells = _cells(size_in, size_out, mode)
    dst_off = dst.offsets(np.arange(size_out))
    src_off = [tuple(int(x) for x in src.offsets(np.array(t))) for t, _, _ in cells]
    key = [(w, window) for _, w, window in cells]
    period = size_out // math.gcd(size_in, size_out)
    period = period * dst.block // math.gcd(period, dst.block)
    runs: list[Run] = []
    for residue in range(min(period, size_out)):
        runs += _progressions(list(range(residue, size_out, period)), dst_off, src_off, key)
    for _ in range(3):
        stacked = _stack(runs)
        if len(stacked) == len(runs):
            break
        runs = stacked
    return tuple(runs)


def _view(base: torch.Tensor, offset: int, sizes: tuple, strides: tuple) -> torch.Tensor:
    return base.as_strided(sizes, strides, offset)


def write_pairs(
    dst: torch.Tensor,
    dst_base: int,
    src: torch.Tensor,
    src_base: int,
    channels: tuple[int, int],
    y_runs: tuple[Run, ...],
    x_runs: tuple[Run, ...],
    scratch: dict[str, torch.Tensor],
) -> None:
    """Write every ``(y run, x run)`` pair of one image's scale from ``src`` into ``dst``.

    ``dst`` and ``src`` are addressed through their storages (``as_strided`` offsets, elements):
    ``dst_base``/``src_base`` are the image's offsets, ``channels`` the ``(count, src stride)`` of
    the channel axis (the output's is 1). ``scratch`` keeps the float32 buffers of half precision
    sums between calls (see :func:`buffer`).
    """
    c, c_stride = channels
    half = dst.dtype not in (torch.float32, torch.float64)
    for ry in y_runs:
        for rx in x_runs:
            sizes = (*ry.sizes, *rx.sizes, c)
            out = _view(
                dst, dst_base + ry.dst + rx.dst, sizes, (*ry.dst_strides, *rx.dst_strides, 1)
            )
            s_strides = (*ry.src_strides, *rx.src_strides, c_stride)
            taps = [
                (_view(src, src_base + sy + sx, sizes, s_strides), wy * wx)
                for sy, wy in zip(ry.src, ry.weights, strict=True)
                for sx, wx in zip(rx.src, rx.weights, strict=True)
            ]
            if len(taps) == 1:
                out.copy_(taps[0][0])
            elif half:  # float32 sums, as the reference: no mixed-dtype op (they copy inputs)
                acc = buffer(scratch, "acc", sizes, out, torch.float32)
                tmp = buffer(scratch, "tmp", sizes, out, torch.float32)
                acc.copy_(taps[0][0])
                if ry.window * rx.window == 0:
                    acc.mul_(taps[0][1])
                for view, weight in taps[1:]:
                    tmp.copy_(view)
                    _accumulate(acc, tmp, ry.window * rx.window == 0, weight)
                _finish(acc, (ry.window, rx.window))
                out.copy_(acc)
            else:
                _combine(out, taps, (ry.window, rx.window))


def buffer(
    scratch: dict[str, torch.Tensor],
    name: str,
    sizes: tuple[int, ...],
    like: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A contiguous ``sizes`` view of the reused buffer ``scratch[name]``, grown on demand."""
    need = math.prod(sizes)
    held = scratch.get(name)
    if held is None or held.numel() < need or held.dtype != dtype:
        held = scratch[name] = like.new_empty(need, dtype=dtype)
    return held[:need].view(sizes)


def _accumulate(acc: torch.Tensor, view: torch.Tensor, weighted: bool, weight: float) -> None:
    if weighted:
        acc.add_(view, alpha=weight)
    else:
        acc.add_(view)


def _finish(acc: torch.Tensor, windows: tuple[int, int]) -> None:
    """Area: divide the sum by the window's sides, as ``F.interpolate`` (``sum / kh / kw``)."""
    for side in windows:
        if side > 1:
            acc.div_(side)


def _combine(
    out: torch.Tensor, taps: list[tuple[torch.Tensor, float]], windows: tuple[int, int]
) -> None:
    """``out`` = the taps' sum in raster order over the window's sides (area) or their weighted
    sum (bilinear, ``windows`` 0), computed in place in ``out``'s dtype."""
    weighted = windows[0] * windows[1] == 0
    if weighted:
        torch.mul(taps[0][0], taps[0][1], out=out)
    else:
        torch.add(taps[0][0], taps[1][0], out=out)
    for view, weight in taps[1 if weighted else 2 :]:
        _accumulate(out, view, weighted, weight)
    if not weighted:
        _finish(out, windows)


def source_axes(maps: torch.Tensor, tile_ids: np.ndarray) -> tuple[int, Axis, Axis, int] | None:
    """Where ``maps [T, h, w, C]`` keeps the stitched map of ``tile_ids``: the storage offset of
    its first cell, its y and x axes and the channel stride; ``None`` when the tile ids are not an
    affine grid (``first + a·row + b·col``)."""
    rows, cols = tile_ids.shape
    first = int(tile_ids[0, 0])
    a = int(tile_ids[1, 0]) - first if rows > 1 else 0
    b = int(tile_ids[0, 1]) - first if cols > 1 else 0
    grid = first + a * np.arange(rows)[:, None] + b * np.arange(cols)[None, :]
    if not np.array_equal(grid, tile_ids):
        return None
    st = maps.stride()
    base = int(maps.storage_offset()) + first * st[0]
    return base, Axis(maps.shape[1], a * st[0], st[1]), Axis(maps.shape[2], b * st[0], st[2]), st[3]


def _regular(size_in: int, size_out: int) -> bool:
    return size_out // math.gcd(size_in, size_out) <= MAX_PERIOD


def gather(
    maps: torch.Tensor,
    tile_ids: np.ndarray,
    valid: tuple[int, int],
    out_hw: tuple[int, int],
    mode: str,
) -> torch.Tensor:
    """One image's scale resampled to ``[H·W, C]`` through index maps (the weighted sum of its taps,
    in float32 for half precision): the path of irregular sizes."""
    ids = torch.from_numpy(np.ascontiguousarray(tile_ids).ravel()).to(maps.device)
    tiles = maps.index_select(0, ids).contiguous()
    side = (tiles.shape[1], tiles.shape[2])
    ri, rw = axis_taps(valid[0], out_hw[0], mode)
    ci, cw = axis_taps(valid[1], out_hw[1], mode)
    local = np.arange(tile_ids.size).reshape(tile_ids.shape)
    strides = (side[0] * side[1], side[1], 1)
    rows, weight = tap_rows(
        local,
        (ri[:, None, :, None], rw[:, None, :, None]),
        (ci[None, :, None, :], cw[None, :, None, :]),
        side,
        strides,
    )
    taps = rows.shape[2] * rows.shape[3]
    rows_t = torch.from_numpy(rows.reshape(-1, taps)).to(maps.device)
    weight = weight.reshape(-1, taps)
    src = tiles.view(-1, tiles.shape[-1])
    if taps == 1:
        return src.index_select(0, rows_t[:, 0])
    compute = maps.dtype if maps.dtype in (torch.float32, torch.float64) else torch.float32
    weight_t = torch.from_numpy(weight).to(maps.device, compute)
    value = src.index_select(0, rows_t[:, 0]).to(compute) * weight_t[:, :1]
    for k in range(1, taps):
        value = value + src.index_select(0, rows_t[:, k]).to(compute) * weight_t[:, k : k + 1]
    return value.to(maps.dtype)


def write_image(
    dst: torch.Tensor,
    dst_base: int,
    dst_axes: tuple[Axis, Axis],
    maps: torch.Tensor,
    tile_ids: np.ndarray,
    valid: tuple[int, int],
    out_hw: tuple[int, int],
    mode: str,
    scratch: dict[str, torch.Tensor],
) -> None:
    """Resample one image's scale (its tiles ``tile_ids`` of ``maps [T, h, w, C]``, cropped to
    ``valid``) to ``out_hw`` and write it at ``dst_base`` of ``dst``'s storage along ``dst_axes``.

    Regular sizes (every merge of the library's plans with ``fit="stretch"``) are strided copies
    straight from the tiles; others, and tiles that are not an affine grid, are gathered first
    (:func:`gather`) and then copied the same way.
    """
    c = maps.shape[-1]
    found = source_axes(maps, tile_ids)
    regular = _regular(valid[0], out_hw[0]) and _regular(valid[1], out_hw[1])
    rows = _token_rows(maps) if found is not None and regular else None
    if rows is not None:  # channel-major: tile by tile, torch's blocked 2-D transpose
        tiles = buffer(scratch, "tiles", (tile_ids.size, rows, c), maps, maps.dtype)
        for i, t in enumerate(tile_ids.ravel()):
            _transpose_tile(maps, int(t), rows, tiles[i])
        maps = tiles[:, rows - maps.shape[1] * maps.shape[2] :].unflatten(1, maps.shape[1:3])
        tile_ids = np.arange(tile_ids.size).reshape(tile_ids.shape)
        found = source_axes(maps, tile_ids)
    if found is None or not regular:
        value = gather(maps, tile_ids, valid, out_hw, mode)
        h, w = out_hw
        found = (int(value.storage_offset()), Axis(h, 0, w * c), Axis(w, 0, c), 1)
        maps, valid = value, out_hw
    base, src_y, src_x, c_stride = found
    y_runs = axis_runs(valid[0], out_hw[0], mode, src_y, dst_axes[0])
    x_runs = axis_runs(valid[1], out_hw[1], mode, src_x, dst_axes[1])
    if len(y_runs) * len(x_runs) > MAX_PAIRS and tile_ids.size > 1 and c_stride == 1:
        # Tile edges that cut the tap pattern (e.g. 96 -> 128 over 32-cell tiles) split the runs
        # into many small copies: stitch the tiles once, so that runs cross the edges.
        rows, cols = tile_ids.shape
        h, w = maps.shape[1], maps.shape[2]
        grid = (rows, h, cols, w, c)
        strides = (src_y.block_stride, src_y.cell_stride, src_x.block_stride, src_x.cell_stride, 1)
        stitched = buffer(scratch, "stitched", grid, maps, maps.dtype)
        stitched.copy_(maps.as_strided(grid, strides, base))
        maps, base = stitched, int(stitched.storage_offset())
        src_y, src_x = Axis(rows * h, 0, cols * w * c), Axis(cols * w, 0, c)
        y_runs = axis_runs(valid[0], out_hw[0], mode, src_y, dst_axes[0])
        x_runs = axis_runs(valid[1], out_hw[1], mode, src_x, dst_axes[1])
    write_pairs(dst, dst_base, maps, base, (c, c_stride), y_runs, x_runs, scratch)


def _token_rows(maps: torch.Tensor) -> int | None:
    """For channel-major maps (HF's ``hidden_states``: a tile's tokens are ``[N, C]`` with strides
    ``(1, N)``), ``N``: every tile is then one 2-D block that ``Tensor.copy_`` transposes in cache
    blocks (a strided copy of it is several times slower). ``None`` for other layouts."""
    _, h, w, c = maps.shape
    st = maps.stride()
    if c == 1 or st[3] == 1 or st[2] != 1 or st[1] != w or st[3] < h * w:
        return None
    first = maps.storage_offset() - (st[3] - h * w)
    last = maps.storage_offset() + (maps.shape[0] - 1) * st[0] + h * w - 1 + (c - 1) * st[3]
    if first < 0 or last >= maps.untyped_storage().nbytes() // maps.element_size():
        return None
    return st[3]


def _transpose_tile(maps: torch.Tensor, t: int, rows: int, out: torch.Tensor) -> None:
    """``out [rows, C]`` (contiguous) = tile ``t``'s ``[rows, C]`` token block, its cells last."""
    _, h, w, c = maps.shape
    offset = maps.storage_offset() + t * maps.stride(0) - (rows - h * w)
    out.copy_(maps.as_strided((rows, c), (1, rows), offset))
