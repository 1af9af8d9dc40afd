"""The ``"aspect"`` policy's search: the best grid of every tile count, and a dynamic programme
over the scales that picks one count per scale.

Pure functions of sizes, caps and prices; :mod:`dynamic_s2.plan` holds the prices, validates the
arguments and builds the :class:`~dynamic_s2.plan.TilePlan`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["area_price", "aspect_dp", "aspect_table", "aspect_tables"]


def area_price(excess: float, up: float, down: float) -> float:
    """Area price of ``excess = log(n / k²)``: ``up · excess`` above 0, ``down · -excess`` below."""
    return up * excess if excess > 0 else -down * excess


Table = list[tuple[int, float, int, int]]


@lru_cache(maxsize=256)
def _grids_by_count(cap: int) -> tuple[tuple[tuple[int, int, float], ...], ...]:
    """Entry ``n``: every grid of ``n`` tiles as ``(rows, cols, log cols - log rows)``, squarest
    first, then fewer rows (the tie-break among equal misfits)."""
    logs = [0.0, *(math.log(i) for i in range(1, cap + 1))]
    out: list[list[tuple[int, int, float]]] = [[] for _ in range(cap + 1)]
    for r in range(1, cap + 1):
        for c in range(1, cap // r + 1):
            out[r * c].append((r, c, logs[c] - logs[r]))
    return tuple(tuple(sorted(g, key=lambda x: (abs(x[2]), x[0]))) for g in out)


def aspect_table(h: int, w: int, cap: int, fit: str, limit: tuple[int, int] | None) -> Table:
    """The best grid of every tile count ``n ≤ cap`` inside ``limit`` (rows, cols), by ``n``:
    ``(n, misfit, rows, cols)``. Misfit: ``|log(grid aspect / image aspect)|`` (stretch) or the
    padded fraction (pad); ties go to the squarer grid, then fewer rows."""
    max_rows, max_cols = limit if limit is not None else (cap, cap)
    log_aspect = math.log(w) - math.log(h)
    table: Table = []
    for n, grids in enumerate(_grids_by_count(cap)):
        best, best_r, best_c = math.inf, 0, 0
        for r, c, d in grids:
            # d is exactly antisymmetric under transposition, so the plans are symmetric too
            misfit = abs(d - log_aspect)
            if misfit < best and r <= max_rows and c <= max_cols:
                best, best_r, best_c = misfit, r, c
        if best_r:
            table.append((n, -math.expm1(-best) if fit == "pad" else best, best_r, best_c))
    return table


def aspect_tables(
    h: int,
    w: int,
    sc: tuple[int, ...],
    t: int,
    caps: Sequence[int],
    fit: str,
    limit: tuple[int, int] | None = None,
    prices: tuple[float, float, float] | None = None,
) -> list[tuple[float, Table, int]]:
    """Per scale: ``log k²``, the :func:`aspect_table` under that scale's cap, and the most tiles
    the scale allows. With ``prices``, caps above :data:`CUT_ABOVE` are first cut to the counts
    that can still be optimal at those prices."""
    if limit is not None:
        caps = [min(cap, limit[0] * limit[1]) for cap in caps]
    tops: Sequence[int] | None = None
    if prices is not None and max(caps) > CUT_ABOVE:
        targets = [(s / t) ** 2 for s in sc]
        cut = _cut_caps(math.log(w) - math.log(h), targets, caps, fit == "pad", prices, limit)
        if cut is not None:
            caps, tops = cut
    out = []
    for i, (s, cap) in enumerate(zip(sc, caps, strict=True)):
        table = aspect_table(h, w, cap, fit, limit)
        out.append((2.0 * math.log(s / t), table, table[-1][0] if tops is None else tops[i]))
    return out


#: Caps above this many tiles are cut to the counts that can still be optimal (see
#: :func:`_cut_caps`); below it the search is exhaustive anyway.
CUT_ABOVE = 1024


def _cut_caps(
    log_aspect: float,
    targets: Sequence[float],
    caps: Sequence[int],
    pad: bool,
    prices: tuple[float, float, float],
    limit: tuple[int, int] | None,
) -> tuple[list[int], list[int]] | None:
    """Caps that no optimal plan exceeds, and the scales' true tops, or None (no cut found).

    A feasible plan (``1, 2, 3, …`` tiles in one row or column) costs ``bound``; every term of
    the cost is >= 0, so a count whose area and tile prices alone exceed ``bound`` never wins.
    ``targets`` are the scales' ``k²``.
    """
    up, down, tile_price = prices
    max_rows, max_cols = limit if limit is not None else (caps[-1], caps[-1])
    bound = 0.0
    for i, (k2, cap) in enumerate(zip(targets, caps, strict=True)):
        n = min(i + 1, cap)
        if n > max(max_rows, max_cols):
            return None
        d = math.log(n) if n <= max_cols else -math.log(n)
        misfit = abs(d - log_aspect)
        excess = math.log(n) - math.log(k2)
        bound += (-math.expm1(-misfit) if pad else misfit) + tile_price * n
        bound += up * excess if excess > 0 else -down * excess
    if tile_price <= 0 and up <= 0:
        return None
    cut, tops = [], []
    for k2, cap in zip(targets, caps, strict=True):
        most = cap
        if tile_price > 0:
            most = min(most, math.floor(bound / tile_price) + 1)
        if up > 0:
            most = min(most, math.ceil(k2 * math.exp(bound / up)) + 1)
        cut.append(max(most, min(len(caps), cap)))
        if limit is None:
            tops.append(cap)  # 1 × cap
        else:
            tops.append(max(r * min(max_cols, cap // r) for r in range(1, min(max_rows, cap) + 1)))
    return cut, tops


def aspect_dp(
    tables: Sequence[tuple[float, Table, int]], prices: tuple[float, float, float]
) -> list[tuple[int, int]]:
    """The dynamic programme of the ``"aspect"`` policy (see :func:`dynamic_s2.plan_tiles`).

    A state is the tile count of the last planned scale with the cheapest ``(cost, tiles)`` that
    reaches it. A count ``n`` follows a smaller count, or the same count when ``n`` is the most
    the scale allows. ``tests/test_plan_budget.py`` checks the result against an enumeration of
    every combination of grids.
    """
    up, down, tile_price = prices
    counts, costs, tiles = [0], [0.0], [0]
    history: list[tuple[list[int], list[int]]] = []  # per scale: its counts, their links back
    for log_k2, table, top in tables:
        n_prev = len(counts)
        new_counts: list[int] = []
        new_costs: list[float] = []
        new_tiles: list[int] = []
        links: list[int] = []
        i, best, best_cost, best_tiles = 0, -1, math.inf, 0  # best state with a count < n
        for n, misfit, _, _ in table:
            while i < n_prev and counts[i] < n:
                if costs[i] < best_cost or (costs[i] == best_cost and tiles[i] < best_tiles):
                    best, best_cost, best_tiles = i, costs[i], tiles[i]
                i += 1
            j, j_cost, j_tiles = best, best_cost, best_tiles
            same = n == top and i < n_prev and counts[i] == n  # a repeat: only at the top count
            if same and (costs[i] < j_cost or (costs[i] == j_cost and tiles[i] < j_tiles)):
                j, j_cost, j_tiles = i, costs[i], tiles[i]
            if j < 0:
                continue
            excess = math.log(n) - log_k2
            price = up * excess if excess > 0 else -down * excess
            new_counts.append(n)
            new_costs.append(j_cost + misfit + price + tile_price * n)
            new_tiles.append(j_tiles + n)
            links.append(j)
        history.append((new_counts, links))
        counts, costs, tiles = new_counts, new_costs, new_tiles
    end = min(range(len(counts)), key=lambda k: (costs[k], tiles[k]))
    grids: list[tuple[int, int]] = []
    for (_, table, _), (scale_counts, links) in zip(
        reversed(tables), reversed(history), strict=True
    ):
        n = scale_counts[end]
        grids.append(next((r, c) for m, _, r, c in table if m == n))
        end = links[end]
    return grids[::-1]
