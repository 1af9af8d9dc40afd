"""NVILA's token packing: every ``factor × factor`` block of a merged map becomes one LLM token.

:mod:`dynamic_s2.nvila` re-exports :func:`pack_tokens` and :func:`pack_tokens_batch`; the fused
merge-and-pack of :func:`dynamic_s2.nvila.merge_and_pack` writes the same tokens in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from . import _checks
from .plan import TilePlan

__all__ = ["num_image_tokens", "pack_tokens", "pack_tokens_batch", "packed_size"]


def packed_size(hw: tuple[int, int], factor: int) -> tuple[int, int]:
    """Token grid ``(⌈H / k⌉, ⌈W / k⌉)`` of an ``(H, W)`` map packed by ``factor`` (zero-padded
    edges): the one place this count is made.

    Examples:
        >>> packed_size((5, 8), 2)
        (3, 4)
    """
    return -(-hw[0] // factor), -(-hw[1] // factor)


def num_image_tokens(
    plan: TilePlan, tokens_per_side: int, *, pack: int | None = None, output_scale: int = -1
) -> int:
    """Rows the model side makes for an image: its merged map, packed by ``pack``.

    The merged map is the output scale's valid feature grid
    (:meth:`~dynamic_s2.plan.ScalePlan.output_size`, what :func:`dynamic_s2.run` gives; with a
    ``halo`` the halo cells are dropped first);
    ``pack=k`` turns every ``k × k`` block into one row (:func:`packed_size`). This is the count
    every token question of the library answers from (the HF processors' placeholders,
    :func:`dynamic_s2.nvila.num_tokens`), so it cannot differ from what
    ``run(..., pack=k)`` makes for the same plan.

    Args:
        plan: the image's plan, made with the batch (under a ``tile_budget`` the batch decides).
        tokens_per_side: feature cells per tile side the backbone makes (32 for SigLIP-448/14;
            with a halo, per cut tile).
        pack: the packing block side (NVILA: 2), or ``None`` for no packing.
        output_scale: index of the merge's output scale.

    Examples:
        >>> from dynamic_s2 import plan_tiles
        >>> plan = plan_tiles(1080, 1920, (448, 896, 1344), policy="nvila")
        >>> num_image_tokens(plan, 32, pack=2)
        3072
        >>> num_image_tokens(plan_tiles(300, 500, (448, 896), policy="single"), 32, pack=2)
        256
    """
    if not isinstance(plan, TilePlan):
        raise TypeError(f"plan must be a TilePlan, got {type(plan).__name__}")
    grid = plan.scales[plan.scale_index(output_scale, "output_scale")].output_size(tokens_per_side)
    k = _checks.optional(_checks.positive_int, "pack", pack)
    rows, cols = grid if k is None else packed_size(grid, k)
    return rows * cols


def _check_map(name: str, feature_map: Any) -> torch.Tensor:
    if not isinstance(feature_map, torch.Tensor):
        raise TypeError(f"{name} must be a [C, H, W] tensor, got {type(feature_map).__name__}")
    if feature_map.dim() != 3:
        raise ValueError(f"{name} must be a [C, H, W] tensor, got shape {tuple(feature_map.shape)}")
    return feature_map


def _pad_tiles(fmap: torch.Tensor, side: int, f: int) -> torch.Tensor:
    """NVILA's per-tile rule: cut ``[C, R·n, Q·n]`` into ``n × n`` tiles (``n = side``), pad each
    at the bottom and right to a multiple of ``f``, and put them back together."""
    c, h, w = fmap.shape
    if not _checks.is_int(side) or side <= 0 or h % side or w % side:
        raise ValueError(
            f"tokens_per_tile_side must be a positive int dividing the map's {h}x{w} cells, "
            f"got {side!r}"
        )
    padded = -(-side // f) * f
    if padded == side:
        return fmap
    rows, cols = h // side, w // side
    out = fmap.new_zeros((c, rows, padded, cols, padded))
    out[:, :, :side, :, :side] = fmap.view(c, rows, side, cols, side)
    return out.view(c, rows * padded, cols * padded)


def pack_tokens(
    feature_map: torch.Tensor, factor: int = 2, *, tokens_per_tile_side: int | None = None
) -> torch.Tensor:
    """Pack every ``factor × factor`` block of a ``[C, H, W]`` map into one token, as NVILA does.

    The map is zero-padded at the bottom and right to multiples of ``factor`` (as NVILA's
    ``DownSampleBlock``), then every block becomes one token of ``factor² · C`` channels, ordered
    row-major inside the block: for ``factor=2``, ``(row0 col0, row0 col1, row1 col0, row1 col1)``,
    ``C`` channels each. Tokens run in raster order over the whole map.

    NVILA itself cuts the merged map back into its tiles and packs each tile on its own: with an
    odd number of cells per tile side (27 for SigLIP-384 checkpoints), every tile is padded
    (27 → 28) before packing. Pass ``tokens_per_tile_side`` for that rule (and
    ``num_tokens(..., per_tile=True)`` for its count); for an even side the two rules agree.

    Args:
        feature_map: ``[C, H, W]``, e.g. one output of :func:`merge_features`.
        factor: block side (NVILA: 2).
        tokens_per_tile_side: cells per tile side, to pad every tile as NVILA does.

    Returns:
        ``[ceil(H / factor) · ceil(W / factor), factor² · C]`` (per tile: ``rows · cols ·
        ceil(n / factor)²`` tokens), same dtype and device.

    Examples:
        >>> import torch
        >>> x = torch.arange(12.0).view(1, 3, 4)      # C=1, H=3, W=4
        >>> pack_tokens(x)
        tensor([[ 0.,  1.,  4.,  5.],
                [ 2.,  3.,  6.,  7.],
                [ 8.,  9.,  0.,  0.],
                [10., 11.,  0.,  0.]])
    """
    fmap = _check_map("feature_map", feature_map)
    f = _checks.positive_int("factor", factor)
    if tokens_per_tile_side is not None:
        fmap = _pad_tiles(fmap, tokens_per_tile_side, f)
    pad_h, pad_w = -fmap.shape[1] % f, -fmap.shape[2] % f
    if pad_h or pad_w:
        fmap = F.pad(fmap, (0, pad_w, 0, pad_h))
    return rearrange(fmap, "c (h i) (w j) -> (h w) (i j c)", i=f, j=f)


@lru_cache(maxsize=1024)
def _pack_index(h: int, w: int, f: int) -> np.ndarray:
    """Row of the flattened ``[h·w, C]`` map feeding each token slot, ``-1`` for zero padding."""
    hp, wp = -(-h // f) * f, -(-w // f) * f
    y = np.arange(hp)[:, None]
    x = np.arange(wp)[None, :]
    src = np.where((y < h) & (x < w), y * w + x, -1)  # [hp, wp]
    idx = src.reshape(hp // f, f, wp // f, f).transpose(0, 2, 1, 3).reshape(-1)
    idx.setflags(write=False)
    return idx


def pack_tokens_batch(
    feature_maps: Sequence[torch.Tensor],
    factor: int = 2,
    *,
    tokens_per_tile_side: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_tokens` for a list of maps: packed tokens plus ``cu_seqlens``.

    One gather over all maps (index maps built on the host and cached per size), no loop of
    tensor ops per image. The layout is what varlen attention kernels expect.

    Args:
        feature_maps: non-empty list of ``[C, H_b, W_b]`` maps with the same ``C``, dtype and
            device, e.g. the output of :func:`merge_features`.
        factor: block side (NVILA: 2).
        tokens_per_tile_side: pad every tile as NVILA does (see :func:`pack_tokens`).

    Returns:
        ``(tokens [sum_b n_b, factor² · C], cu_seqlens int32 [B + 1])``, where image ``b``'s
        tokens are ``tokens[cu_seqlens[b]:cu_seqlens[b + 1]]`` and equal ``pack_tokens(maps[b])``.

    Examples:
        >>> import torch
        >>> tokens, cu = pack_tokens_batch([torch.randn(8, 4, 6), torch.randn(8, 3, 3)])
        >>> tokens.shape, cu.tolist()
        (torch.Size([10, 32]), [0, 6, 10])
    """
    if isinstance(feature_maps, torch.Tensor) or not isinstance(feature_maps, Sequence):
        raise TypeError(
            f"feature_maps must be a list of [C, H, W] tensors, got {type(feature_maps).__name__}"
        )
    if len(feature_maps) == 0:
        raise ValueError("feature_maps must not be empty")
    f = _checks.positive_int("factor", factor)
    maps = [_check_map(f"feature_maps[{b}]", m) for b, m in enumerate(feature_maps)]
    if tokens_per_tile_side is not None:
        maps = [_pad_tiles(m, tokens_per_tile_side, f) for m in maps]
    first = maps[0]
    c = first.shape[0]
    for b, m in enumerate(maps):
        if m.shape[0] != c or m.dtype != first.dtype or m.device != first.device:
            raise ValueError(
                f"feature_maps[{b}] has {m.shape[0]} channels, {m.dtype} on {m.device}; "
                f"feature_maps[0] has {c} channels, {first.dtype} on {first.device}"
            )

    sizes = [(int(m.shape[1]), int(m.shape[2])) for m in maps]
    total = sum(h * w for h, w in sizes)
    index_parts = []
    counts = [0]
    offset = 0
    for h, w in sizes:
        local = _pack_index(h, w, f)
        index_parts.append(np.where(local >= 0, local + offset, total))  # total: the zero row
        offset += h * w
        counts.append(counts[-1] + len(local) // (f * f))
    index = torch.from_numpy(np.concatenate(index_parts)).to(first.device)

    rows = [m.permute(1, 2, 0).reshape(-1, c) for m in maps]  # views for channels-last maps
    rows.append(first.new_zeros(1, c))
    flat = torch.cat(rows)
    tokens = flat.index_select(0, index).view(-1, f * f * c)
    cu_seqlens = torch.tensor(counts, dtype=torch.int32, device=first.device)
    return tokens, cu_seqlens
