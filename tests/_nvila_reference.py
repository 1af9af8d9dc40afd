"""Plain, independent references for NVILA's Dynamic-S2 pipeline, used by ``test_nvila.py``.

Written from the documented facts of NVILA's pipeline (NVlabs/VILA: ``llava/mm_utils.py``,
``llava/model/llava_arch.py``, ``llava/model/multimodal_projector/base_projector.py``), deliberately
simple and slow, and sharing no code with ``dynamic_s2``:

- :func:`nvila_grid`: the last-scale grid rule (candidate set, sort by tile count, tie rule);
- :func:`pil_preprocess`: convert to RGB, PIL ``resize`` (default filter) and ``crop`` per tile,
  then ``/255`` and ``(x - mean) / std``;
- :func:`loop_merge`: per image, stitch the tiles of every scale with ``torch.cat``, resample every
  map with ``F.interpolate(mode="area")`` in float32, cast back, concatenate on channels;
- :func:`pack_2x2`: 2×2 token packing by explicit strided slicing, zero-padding odd sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def nvila_grid(
    width: int, height: int, scales: Sequence[int] = (448, 896, 1344), max_tiles: int = 12
) -> tuple[int, int]:
    """NVILA's last-scale grid for a ``width`` × ``height`` image, as ``(rows, cols)``."""
    tile = scales[0]
    lowest = (scales[-1] // scales[0]) ** 2
    # Same set comprehension (same insertion order, hence the same iteration order) as NVILA.
    candidates = {
        (c, r)
        for n in range(lowest, max_tiles + 1)
        for c in range(1, n + 1)
        for r in range(1, n + 1)
        if lowest <= c * r <= max_tiles
    }
    ordered = sorted(candidates, key=lambda cr: cr[0] * cr[1])
    aspect = width / height
    best = (1, 1)
    best_diff = float("inf")
    for c, r in ordered:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best[1], best[0]


def _pil_tiles(image: Image.Image, cols: int, rows: int, tile: int) -> list[Image.Image]:
    resized = image.resize((cols * tile, rows * tile))  # PIL's default filter (bicubic for RGB)
    out = []
    for r in range(rows):
        for c in range(cols):
            out.append(resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)))
    return out


def pil_preprocess(
    image: Image.Image,
    scales: Sequence[int] = (448, 896, 1344),
    max_tiles: int = 12,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> tuple[torch.Tensor, tuple[int, int]]:
    """NVILA's preprocessing of one PIL image: ``([n, 3, t, t] float32, (rows, cols))``."""
    image = image.convert("RGB")
    tile = scales[0]
    pieces: list[Image.Image] = []
    for scale in scales[:-1]:
        k = scale // tile
        pieces += _pil_tiles(image, k, k, tile)
    rows, cols = nvila_grid(image.width, image.height, scales, max_tiles)
    pieces += _pil_tiles(image, cols, rows, tile)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    tensors = []
    for p in pieces:
        x = torch.from_numpy(np.asarray(p, dtype=np.float32) / 255.0).permute(2, 0, 1)
        tensors.append((x - m) / s)
    return torch.stack(tensors), (rows, cols)


def _stitch(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[rows*cols, C, h, w]`` row-major tiles -> ``[C, rows*h, cols*w]``."""
    lines = [torch.cat([tiles[r * cols + c] for c in range(cols)], dim=-1) for r in range(rows)]
    return torch.cat(lines, dim=-2)


def loop_merge(
    features: torch.Tensor,
    block_sizes: Sequence[tuple[int, int]],
    scales: Sequence[int] = (448, 896, 1344),
    output_scale: int = -1,
) -> list[torch.Tensor]:
    """NVILA's per-image merge of ``[T, N, C]`` tokens (square grid) or ``[T, C, h, w]`` maps."""
    if features.dim() == 3:
        side = math.isqrt(features.shape[1])
        features = features.reshape(features.shape[0], side, side, -1).permute(0, 3, 1, 2)
    out = []
    start = 0
    for rows, cols in block_sizes:
        grids = [(s // scales[0], s // scales[0]) for s in scales[:-1]] + [(rows, cols)]
        maps = []
        for r, c in grids:
            maps.append(_stitch(features[start : start + r * c], r, c))
            start += r * c
        size = maps[output_scale].shape[-2:]
        resized = [
            F.interpolate(m[None].to(torch.float32), size=size, mode="area")[0].to(m.dtype)
            for m in maps
        ]
        out.append(torch.cat(resized, dim=0))
    if start != features.shape[0]:
        raise ValueError(f"used {start} of {features.shape[0]} tiles")
    return out


def pack_2x2(feature_map: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]`` -> ``[ceil(H/2) * ceil(W/2), 4C]``, zero-padded at the bottom and right."""
    c, h, w = feature_map.shape
    x = torch.zeros(c, h + h % 2, w + w % 2, dtype=feature_map.dtype)
    x[:, :h, :w] = feature_map
    parts = [x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]]
    tokens = torch.cat(parts, dim=0)  # [4C, H/2, W/2]: (r0 c0, r0 c1, r1 c0, r1 c1) blocks of C
    return tokens.flatten(1).t().contiguous()
