"""The ``"aspect"`` policy's search: the best grid of every tile count, and a dynamic programme
over the scales that picks one count per scale.

Pure functions of sizes, caps and prices; :mod:`dynamic_s2.plan` holds the prices, validates the
arguments and builds the :class:`~dynamic_s2.plan.TilePlan`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["area_price", "aspect_grids", "aspect_options"]


def area_price(excess: float, up: float, down: float) -> float:
    """Area price of ``excess = log(n / k²)``: ``up · excess`` above 0, ``down · -excess`` below."""
    return up * excess if excess > 0 else -down * excess


def aspect_options(
    h: int, w: int, cap: int, fit: str, limit: tuple[int, int] | None
) -> dict[int, tuple[float, float, int, int]]:
    """The best grid of every tile count ``n ≤ cap``: ``n -> (misfit, squareness, rows, cols)``."""
    max_rows, max_cols = limit if limit is not None else (cap, cap)
    log_aspect = math.log(w) - math.log(h)
    logs = _logs(cap)
    pad = fit == "pad"
    best: dict[int, tuple[float, float, int, int]] = {}
    for r in range(1, min(max_rows, cap) + 1):
        log_r = logs[r]
        for c in range(1, min(max_cols, cap // r) + 1):
            d = logs[c] - log_r  # exactly antisymmetric under transposition, so plans are too
            misfit = abs(d - log_aspect)
            key = (-math.expm1(-misfit) if pad else misfit, abs(d), r, c)
            n = r * c
            old = best.get(n)
            if old is None or key < old:
                best[n] = key
    return best


@lru_cache(maxsize=64)
def _logs(n: int) -> tuple[float, ...]:
    return (0.0, *(math.log(i) for i in range(1, n + 1)))


def aspect_grids(
    h: int,
    w: int,
    sc: tuple[int, ...],
    t: int,
    caps: Sequence[int],
    fit: str,
    prices: tuple[float, float, float],
    limit: tuple[int, int] | None = None,
) -> list[tuple[int, int]]:
    """The dynamic programme of the ``"aspect"`` policy (see :func:`dynamic_s2.plan_tiles`).

    A state is the tile count of the last planned scale, holding the cheapest ``(cost, tiles,
    grids)`` that reaches it. A scale's count ``n`` follows a smaller count, or the same count
    when ``n`` is the most the scale allows. ``tests/test_plan_budget.py`` checks the result
    against an enumeration of every combination of grids.
    """
    up, down, tile_price = prices
    states: list[tuple[int, float, int, tuple[tuple[int, int], ...]]] = [(0, 0.0, 0, ())]
    for s, cap in zip(sc, caps, strict=True):
        log_k2 = 2.0 * math.log(s / t)
        options = aspect_options(h, w, cap, fit, limit)
        top = max(options)
        nxt: list[tuple[int, float, int, tuple[tuple[int, int], ...]]] = []
        i, below = 0, None  # below: the cheapest state with a count < n
        for n in sorted(options):
            while i < len(states) and states[i][0] < n:
                if below is None or states[i][1:3] < below[1:3]:
                    below = states[i]
                i += 1
            pred = below
            same = i < len(states) and states[i][0] == n  # allowed only at the scale's top count
            if same and n == top and (pred is None or states[i][1:3] < pred[1:3]):
                pred = states[i]
            if pred is None:
                continue
            misfit, _, r, c = options[n]
            cost = pred[1] + misfit + area_price(math.log(n) - log_k2, up, down) + tile_price * n
            nxt.append((n, cost, pred[2] + n, (*pred[3], (r, c))))
        states = nxt
    return list(min(states, key=lambda st: st[1:3])[3])
