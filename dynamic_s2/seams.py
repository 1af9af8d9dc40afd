"""Seam-aware encoding: what turns the backbone's outputs into ordinary per-tile features.

Two ways to keep tile seams out of the features, both between encoding and merging, so the merge
sees per-tile features of the plan's interior size and nothing else changes:

* **halo** (a plan option, see :func:`~dynamic_s2.plan.plan_tiles`): tiles are cut with ``halo``
  pixels of their neighbours on each side; :func:`drop_halo` drops the features of those cells,
  so every output cell comes from a tile in which it is interior.
* **canvas** (an encode option): :func:`encode_canvases` reassembles each scale's canvas from its
  tiles (they partition it exactly), runs the backbone once per canvas, and cuts the resulting
  map back into per-tile maps. The stitched result is the backbone's map of the resized canvas
  itself. Only for backbones that take any input size and return maps
  (:attr:`~dynamic_s2.backbones.Backbone.maps`).

All sizes come from the plans (:meth:`~dynamic_s2.plan.ScalePlan.interior`, ``grid``); index
maps are host arithmetic.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from einops import rearrange

from .backbones import Backbone
from .merge import split_prefix
from .plan import TilePlan

__all__ = ["drop_halo", "encode_canvases", "image_groups"]


def drop_halo(
    features: torch.Tensor, plans: Sequence[TilePlan], num_prefix_tokens: int | None = None
) -> tuple[torch.Tensor, int | None]:
    """Drop the halo cells of every tile's features; return them and their prefix token count.

    ``features`` are the backbone's outputs for tiles of ``plans[0].input_size`` px: ``[T, C, n,
    n]`` maps or ``[T, P + n², C]`` tokens. The result has the interior cells only (``[T, C, m,
    m]`` or ``[T, P + m², C]``, ``m`` from :meth:`~dynamic_s2.plan.ScalePlan.interior`) and the
    prefix count ``P`` found (``None`` for maps), to be given to the merge. Plans without a halo
    return ``features`` and ``num_prefix_tokens`` as they are.

    Raises:
        ValueError: the halo does not fall on the backbone's cell boundaries.

    Examples:
        >>> from dynamic_s2 import plan_tiles
        >>> plan = plan_tiles(64, 64, (32,), halo=8)  # 32-px tiles every 16 px
        >>> maps = torch.rand(plan.num_tiles, 5, 4, 4)  # 8-px cells: 1 halo cell per side
        >>> out, prefix = drop_halo(maps, [plan])
        >>> out.shape, prefix, torch.equal(out, maps[:, :, 1:3, 1:3])
        (torch.Size([4, 5, 2, 2]), None, True)
    """
    halo = plans[0].halo
    if halo == 0:
        return features, num_prefix_tokens
    if {p.halo for p in plans} != {halo}:
        raise ValueError(f"plans must share one halo, got {sorted({p.halo for p in plans})}")
    prefix, maps = split_prefix(features, num_prefix_tokens)  # [T, n, n, C]
    cut, m = plans[0].scales[0].interior(maps.shape[1])
    inner = maps[:, cut : cut + m, cut : cut + m]
    if features.dim() == 4:
        return inner.permute(0, 3, 1, 2), None
    count = 0 if prefix is None else prefix.shape[1]
    tokens = inner.flatten(1, 2)
    return (tokens if prefix is None else torch.cat([prefix, tokens], dim=1)), count


def image_groups(plans: Sequence[TilePlan], chunk: int | None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` runs of whole images of at most ``chunk`` tiles (at least one image).

    Examples:
        >>> from dynamic_s2 import plan_tiles
        >>> plans = [plan_tiles(32, 64, (32,))] * 3   # 2 tiles each
        >>> list(image_groups(plans, 5))
        [(0, 2), (2, 3)]
    """
    start, used = 0, 0
    for i, p in enumerate(plans):
        if chunk is not None and i > start and used + p.num_tiles > chunk:
            yield start, i
            start, used = i, 0
        used += p.num_tiles
    yield start, len(plans)


def encode_canvases(
    backbone: Backbone, tiles: torch.Tensor, plans: Sequence[TilePlan], chunk: int | None = None
) -> torch.Tensor:
    """Per-tile feature maps from one backbone pass over each scale's canvas.

    The canvases are reassembled from ``tiles`` (``[T, C, t, t]``, the order of
    :func:`~dynamic_s2.tiling.tile_images`), canvases of one grid go through the backbone
    together, at most ``chunk`` tiles' worth per call (at least one canvas), and every output map
    of ``R·n × Q·n`` cells is cut into the ``R·Q`` per-tile maps of ``n × n`` the merge expects,
    in tile order. Stitched back, they are exactly the backbone's map of the canvas.

    Raises:
        ValueError: plans with a halo, or a backbone that does not return maps whose size is
            a whole number of cells per tile.

    Examples:
        >>> from dynamic_s2 import plan_tiles, tile_images
        >>> conv = torch.nn.Conv2d(3, 4, 3, padding=1)   # sees across tile seams
        >>> plan = plan_tiles(32, 64, (16, 32))
        >>> batch = tile_images([torch.rand(3, 32, 64)], [plan])
        >>> maps = encode_canvases(Backbone(conv, maps=True), batch.tiles, [plan])
        >>> maps.shape
        torch.Size([10, 4, 16, 16])
    """
    if any(p.halo for p in plans):
        raise ValueError(
            f"canvas=True runs whole canvases, which need no halo, but the plans have "
            f"halo={max(p.halo for p in plans)}: prepare the batch with halo=0"
        )
    jobs: dict[tuple[int, int], list[int]] = defaultdict(list)  # grid -> first tile of canvases
    start = 0
    for p in plans:
        for sp in p.scales:
            jobs[sp.grid].append(start)
            start += sp.num_tiles
    order: list[np.ndarray] = []
    pieces: list[torch.Tensor] = []
    for (rows, cols), firsts in jobs.items():
        n = rows * cols
        per_call = len(firsts) if chunk is None else max(1, chunk // n)
        for a in range(0, len(firsts), per_call):
            ids = (np.asarray(firsts[a : a + per_call])[:, None] + np.arange(n)).reshape(-1)
            index = torch.from_numpy(ids).to(tiles.device)
            canvas = rearrange(
                tiles.index_select(0, index), "(g r q) c h w -> g c (r h) (q w)", r=rows, q=cols
            )
            out = _check_map(backbone(canvas), canvas, (rows, cols), backbone)
            pieces.append(rearrange(out, "g c (r h) (q w) -> (g r q) c h w", r=rows, q=cols))
            order.append(ids)
    sides = {tuple(piece.shape[1:]) for piece in pieces}
    if len(sides) > 1:
        raise ValueError(
            f"the backbone's maps give tiles of different sizes {sorted(sides)} at different "
            "scales: canvas=True needs maps whose cells do not depend on the input size"
        )
    inverse = np.empty(start, dtype=np.int64)
    inverse[np.concatenate(order)] = np.arange(start)
    out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return out.index_select(0, torch.from_numpy(inverse).to(out.device))


def _check_map(
    out: object, canvas: torch.Tensor, grid: tuple[int, int], backbone: Backbone
) -> torch.Tensor:
    """The backbone's map of ``canvas``, or a ``ValueError`` saying why it cannot be cut."""
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != canvas.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"canvas=True needs [n, C, h, w] maps from backbone {backbone.name!r}, got {shape} "
            f"for canvases {tuple(canvas.shape)}"
        )
    rows, cols = grid
    h, w = out.shape[-2:]
    if h % rows or w % cols or h // rows != w // cols:
        raise ValueError(
            f"canvas=True: backbone {backbone.name!r} maps a {canvas.shape[-2]}×"
            f"{canvas.shape[-1]} canvas of {rows}×{cols} tiles to {h}×{w} cells, which is not "
            "the same whole number of cells per tile on both axes: the tile size must be a "
            "multiple of the backbone's stride"
        )
    return out
