"""Plans for a whole batch under one tile budget.

:func:`plan_batch` plans every image of a batch so that the batch's total tile count stays within
``tile_budget``, which keeps memory and step time flat from batch to batch. It only reads
:mod:`dynamic_s2.plan`: every plan it returns is one that the planner would make for that image
with a higher price per tile (or a tighter ``max_tiles``).

How it chooses:

* every distinct image size gets a *ladder* of plans, from the plan :func:`~dynamic_s2.plan_tiles`
  makes down to one tile per scale: the ``"aspect"`` policy's plans at rising tile prices
  (:data:`~dynamic_s2.plan.ASPECT_TILE_PRICE` times 1, √2, 2, … 512), then plans with tighter
  per-scale ``max_tiles``; ``policy="nvila"`` walks ``max_tiles`` down to NVILA's minimum. The
  ladder keeps the lower convex hull of (tiles, :func:`plan_cost`), so every step
  up buys less misfit per tile than the one before;
* all images start at the bottom of their ladder; the step with the largest fall in cost per tile,
  over the whole batch, is taken next (images of one size step together, ties go to the smaller
  size), until the next step does not fit the budget.

The order of steps does not depend on the budget, so a larger budget takes the same steps and
more: no image ever gets fewer tiles. A budget that is not reached returns the per-image plans.
"""

from __future__ import annotations

import heapq
import inspect
import math
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from . import _checks
from . import plan as _plan
from ._aspect import area_price, aspect_dp, aspect_tables
from .plan import TilePlan, check_scales, grid_aspect_error, plan_tiles

__all__ = ["plan_batch", "plan_cost"]

#: Tile prices of the ladder, as multiples of the default price: 1, √2, 2, … 512.
LADDER_PRICE_FACTORS: tuple[float, ...] = tuple(2.0 ** (j / 2) for j in range(19))

#: plan_tiles' keyword options, read off its signature (no second list of their names).
_OPTIONS = tuple(
    name
    for name, p in inspect.signature(plan_tiles).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


def plan_batch(
    sizes: Sequence[tuple[int, int]],
    scales: Sequence[int],
    *,
    tile_budget: int,
    **plan_options: Any,
) -> list[TilePlan]:
    """Plan a batch of images with at most ``tile_budget`` tiles in total.

    Args:
        sizes: ``(height, width)`` of every image.
        scales: the scales, as for :func:`~dynamic_s2.plan_tiles`.
        tile_budget: the most tiles the whole batch may have, over all images and scales. It
            must allow one tile per scale per image (under ``policy="nvila"``: NVILA's smallest
            plan per image).
        **plan_options: ``tile_size``, ``max_tiles``, ``policy``, ``fit``, ``max_upscale``,
            ``halo`` and ``halo_tiles``, as for :func:`~dynamic_s2.plan_tiles`. Every tile counts
            against the budget, so a ``halo`` with fixed-size tiles (more tiles) is priced in.

    Returns:
        One :class:`~dynamic_s2.TilePlan` per image, in the order of ``sizes``. When the
        per-image plans fit the budget they are returned unchanged; otherwise images get fewer
        tiles where that costs the least misfit (see the module's docstring). The result is
        deterministic, permuting ``sizes`` permutes the plans, and a larger budget never gives
        an image fewer tiles.

    Raises:
        TypeError: ``tile_budget`` is not an int, ``sizes`` is not a sequence of pairs of ints,
            or an unknown option.
        ValueError: ``tile_budget`` below one tile per scale per image, ``sizes`` empty or
            holding a non-positive size, or a bad option (as in ``plan_tiles``).

    Examples:
        >>> sizes = [(1080, 1920), (3000, 1000), (64, 64)]
        >>> [p.num_tiles for p in plan_batch(sizes, (448, 896, 1344), tile_budget=1000)]
        [16, 19, 14]
        >>> [p.num_tiles for p in plan_batch(sizes, (448, 896, 1344), tile_budget=30)]
        [5, 9, 14]
        >>> plan_batch(sizes, (448, 896, 1344), tile_budget=8)
        Traceback (most recent call last):
            ...
        ValueError: tile_budget=8 is below one tile per scale per image (3 images × 3 scales = 9)
    """
    pairs = _check_sizes(sizes)
    budget = _check_budget(tile_budget)
    sc = check_scales(scales)
    for key in plan_options:
        if key not in _OPTIONS:
            raise TypeError(f"plan_batch got an unknown option {key!r}; it takes {_OPTIONS}")
    options: tuple[tuple[str, Any], ...] = tuple(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(plan_options.items())
    )
    opts: dict[str, Any] = dict(options)
    top = {hw: plan_tiles(hw[0], hw[1], sc, **opts) for hw in set(pairs)}
    if sum(top[hw].num_tiles for hw in pairs) <= budget:
        return [top[hw] for hw in pairs]
    floor = len(pairs) * len(sc)
    if budget < floor:
        raise ValueError(
            f"tile_budget={budget} is below one tile per scale per image ({len(pairs)} images "
            f"× {len(sc)} scales = {floor})"
        )
    level = _choose_levels(Counter(pairs), sc, options, budget)
    return [_ladder(hw, sc, options)[level[hw]][2] for hw in pairs]


def _choose_levels(
    counts: Counter[tuple[int, int]],
    sc: tuple[int, ...],
    options: tuple[tuple[str, Any], ...],
    budget: int,
) -> dict[tuple[int, int], int]:
    """Ladder index per size: every size starts at the bottom, the best steps go first."""
    ladders = {hw: _ladder(hw, sc, options) for hw in counts}
    level = {hw: len(ladder) - 1 for hw, ladder in ladders.items()}
    used = sum(n * ladders[hw][-1][0] for hw, n in counts.items())
    if used > budget:
        raise ValueError(
            f"tile_budget={budget} is below the {used} tiles of the smallest plans "
            f"({dict(options).get('policy', 'aspect')!r} policy)"
        )
    heap: list[tuple[float, tuple[int, int]]] = []

    def push(hw: tuple[int, int]) -> None:
        i = level[hw]
        if i > 0:
            (lo_tiles, lo_cost, _), (up_tiles, up_cost, _) = ladders[hw][i], ladders[hw][i - 1]
            heapq.heappush(heap, ((up_cost - lo_cost) / (up_tiles - lo_tiles), hw))

    for hw in sorted(counts):
        push(hw)
    while heap:
        _, hw = heapq.heappop(heap)
        i = level[hw]
        extra = counts[hw] * (ladders[hw][i - 1][0] - ladders[hw][i][0])
        if used + extra > budget:
            break  # stopping here, not skipping, is what makes the result monotone in the budget
        used += extra
        level[hw] = i - 1
        push(hw)
    return level


@lru_cache(maxsize=16384)
def _ladder(
    hw: tuple[int, int], sc: tuple[int, ...], options: tuple[tuple[str, Any], ...]
) -> tuple[tuple[int, float, TilePlan], ...]:
    """``(tiles, cost, plan)`` of one size, most tiles first, on the lower convex hull."""
    opts = dict(options)
    h, w = hw
    top = plan_tiles(h, w, sc, **opts)
    rest = {k: v for k, v in opts.items() if k not in ("max_tiles", "policy")}
    if top.policy == "single":  # one tile per scale already: nothing to give up
        return ((top.num_tiles, plan_cost(top), top),)
    if top.policy == "nvila":
        lowest = (sc[-1] // sc[0]) ** 2
        plans = [top] + [
            plan_tiles(h, w, sc, max_tiles=m, policy="nvila", **rest)
            for m in range(top.scales[-1].num_tiles - 1, lowest - 1, -1)
        ]
    else:
        base = _plan.ASPECT_TILE_PRICE * _plan.tile_price_factor(
            top.tile_size, top.halo, opts.get("halo_tiles", "fixed")
        )
        prices = [base * f for f in LADDER_PRICE_FACTORS[1:]]
        plans = [top, *price_ladder(top, prices)]
        counts = [sp.num_tiles for sp in plans[-1].scales]
        plans += [  # below the cheapest plan with distinct counts: caps that repeat counts
            plan_tiles(h, w, sc, max_tiles=tuple(min(m, c) for c in counts), **rest)
            for m in range(counts[-1] - 1, 0, -1)
        ]
    kept = [plans[0]]
    for p in plans[1:]:  # strictly fewer tiles down the ladder
        if p.num_tiles < kept[-1].num_tiles:
            kept.append(p)
    return _lower_hull([(p.num_tiles, plan_cost(p), p) for p in kept])


def _lower_hull(
    points: list[tuple[int, float, TilePlan]],
) -> tuple[tuple[int, float, TilePlan], ...]:
    """The points (most tiles first) on the lower convex hull of (tiles, cost), both ends kept."""
    hull: list[tuple[int, float, TilePlan]] = []
    for point in reversed(points):  # fewest tiles first
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the segment to the new point
            if (y2 - y1) * (point[0] - x1) >= (point[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(point)
    return tuple(reversed(hull))


def plan_cost(plan: TilePlan) -> float:
    """The ``"aspect"`` policy's cost of a plan without the tile price: misfit plus area price.

    Summed over the scales; :func:`dynamic_s2.plan_batch` keeps its total over a batch low.

    Examples:
        >>> round(plan_cost(plan_tiles(448, 448, (448, 896))), 6)
        0.0
        >>> plan_cost(plan_tiles(1080, 1920, (448,))) > 0
        True
    """
    h, w = plan.image_size
    total = 0.0
    for sp in plan.scales:
        misfit = grid_aspect_error(h, w, sp.grid)
        if plan.fit == "pad":
            misfit = -math.expm1(-misfit)
        excess = math.log(sp.num_tiles) - 2.0 * math.log(sp.scale / plan.tile_size)
        total += misfit + area_price(excess, *_plan._prices(0.0)[:2])
    return total


def price_ladder(plan: TilePlan, tile_prices: Sequence[float]) -> list[TilePlan]:
    """``policy="aspect"`` plans of ``plan``'s image at other tile prices, each with at most
    ``plan``'s tiles at every scale (and inside its ``max_upscale`` limit): the rungs of
    :func:`dynamic_s2.plan_batch`'s ladders. The area prices are the module's."""
    (h, w), t = plan.image_size, plan.tile_size
    sc = tuple(sp.scale for sp in plan.scales)
    max_upscale = plan.max_upscale
    limit = None if max_upscale is None else _plan._upscale_limit(h, w, t, max_upscale)
    caps = [sp.num_tiles for sp in plan.scales]
    tables = aspect_tables(h, w, sc, t, caps, plan.fit, limit)
    return [
        _plan._make_plan(
            h,
            w,
            sc,
            t,
            aspect_dp(tables, _plan._prices(p)),
            "aspect",
            plan.fit,
            max_upscale,
            plan.halo,
        )
        for p in tile_prices
    ]


def _check_budget(tile_budget: Any) -> int:
    if isinstance(tile_budget, bool) or not isinstance(tile_budget, int):
        raise TypeError(
            f"tile_budget must be a positive int, got {tile_budget!r} "
            f"({type(tile_budget).__name__})"
        )
    if tile_budget <= 0:
        raise ValueError(f"tile_budget must be a positive int, got {tile_budget!r}")
    return tile_budget


def _check_sizes(sizes: Any) -> list[tuple[int, int]]:
    if isinstance(sizes, str | bytes) or not isinstance(sizes, Sequence):
        raise TypeError(f"sizes must be a sequence of (height, width) pairs, got {sizes!r}")
    if len(sizes) == 0:
        raise ValueError("sizes must not be empty; give one (height, width) per image")
    return [_checks.int_pair(f"sizes[{i}]", hw) for i, hw in enumerate(sizes)]
