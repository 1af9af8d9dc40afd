"""NVILA's Dynamic-S2 grid rule, reproduced exactly: pure arithmetic on sizes (no torch).

:mod:`dynamic_s2.plan` builds ``policy="nvila"`` plans from these grids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

__all__ = ["check_nvila_settings", "nvila_grids", "nvila_limited", "nvila_lower_grids"]


def nvila_lower_grids(sc: tuple[int, ...]) -> list[tuple[int, int]]:
    """NVILA's square ``k × k`` grids of every scale but the last, ``k = scale // scales[0]``."""
    return [(s // sc[0], s // sc[0]) for s in sc[:-1]]


@lru_cache(maxsize=256)
def _nvila_candidates(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    # NVILA builds a Python set with three nested loops (n, then i, j in 1..n, kept when
    # min_num <= i*j <= max_num) and sorts it by area; among equal areas the set's iteration order
    # decides. That order depends only on the order in which distinct pairs are first added, so
    # the same pairs are added in the same first-seen order, without the cubic loops: at n, the
    # new pairs are those with max(i, j) = n, met as (i, n) for i < n, then (n, j) for j <= n.
    ratios: set[tuple[int, int]] = set()
    for n in range(min_num, max_num + 1):
        if n == min_num:
            firsts = [(i, j) for i in range(1, n + 1) for j in range(1, n + 1)]
        else:
            firsts = [(i, n) for i in range(1, min(n - 1, max_num // n) + 1)]
            firsts += [(n, j) for j in range(1, min(n, max_num // n) + 1)]
        ratios.update(r for r in firsts if min_num <= r[0] * r[1] <= max_num)
    return tuple(sorted(ratios, key=lambda r: r[0] * r[1]))


def check_nvila_settings(
    sc: tuple[int, ...], caps: tuple[int, ...] | int | None, tile: int | None = None
) -> None:
    """``ValueError`` unless scales, ``max_tiles`` and the tile fit NVILA's rule: scales multiples
    of the first, ``max_tiles`` one int (NVILA's ``max_num``) of at least
    ``(scales[-1] // scales[0])²``, tiles of the first scale.

    Examples:
        >>> check_nvila_settings((448, 896, 1344), 12)
        >>> check_nvila_settings((448, 896, 1344), 8)
        Traceback (most recent call last):
            ...
        ValueError: max_tiles=8 is below the 9 tiles policy='nvila' needs at scale 1344 ...
    """
    base = sc[0]
    if tile is not None and tile != base:
        raise ValueError(
            f"tile_size must equal the first scale {base} under policy='nvila' (NVILA tiles at "
            f"its first scale), got {tile!r}"
        )
    if any(s % base for s in sc):
        raise ValueError(
            f"policy='nvila' needs every scale to be a multiple of the first, got {sc!r}"
        )
    if isinstance(caps, tuple):
        raise ValueError(
            f"policy='nvila' takes max_tiles as one int (NVILA's max_num), got {caps!r}"
        )
    min_num = (sc[-1] // base) ** 2
    max_num = 12 if caps is None else caps
    if max_num < min_num:
        raise ValueError(
            f"max_tiles={max_num} is below the {min_num} tiles policy='nvila' needs at scale "
            f"{sc[-1]} (({sc[-1]} // {base})²)"
        )


def nvila_grids(
    h: int,
    w: int,
    sc: tuple[int, ...],
    t: int,
    caps: tuple[int, ...] | int | None,
) -> list[tuple[int, int]]:
    min_num = (sc[-1] // sc[0]) ** 2
    max_num = caps if isinstance(caps, int) else 12  # checked by check_nvila_settings
    grids = nvila_lower_grids(sc)
    grids.append(_nvila_walk(h, w, t, _nvila_candidates(min_num, max_num)))
    return grids


def _nvila_walk(h: int, w: int, t: int, candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """NVILA's choice among ``(cols, rows)`` candidates, returned as ``(rows, cols)``."""
    aspect = w / h
    area = w * h
    best_diff = math.inf
    best = (1, 1)
    for i, j in candidates:  # i columns, j rows
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best_diff, best = diff, (i, j)
        elif diff == best_diff and area > 0.5 * t * t * i * j:
            best = (i, j)
    return (best[1], best[0])


def nvila_limited(
    h: int,
    w: int,
    sc: tuple[int, ...],
    t: int,
    caps: tuple[int, ...] | int | None,
    limit: tuple[int, int],
    bound: int,
) -> list[tuple[int, int]]:
    """``policy="nvila"`` under ``max_upscale``: where it departs from NVILA.

    Every scale but the last: ``k × k`` clipped to the limit. The last: NVILA's walk over its
    candidates inside the limit with at most ``bound`` tiles (the unlimited plan's count); when
    none is left, ``K × K`` clipped to the limit, ``K = scales[-1] // scales[0]``.
    """
    max_rows, max_cols = limit
    lower = [(min(r, max_rows), min(c, max_cols)) for r, c in nvila_lower_grids(sc)]
    base = sc[0]
    min_num = (sc[-1] // base) ** 2
    max_num = caps if isinstance(caps, int) else 12  # check_nvila_settings refused per-scale caps
    inside = [
        (i, j)
        for i, j in _nvila_candidates(min_num, max_num)
        if j <= max_rows and i <= max_cols and i * j <= bound
    ]
    k = sc[-1] // base
    last = _nvila_walk(h, w, t, inside) if inside else (min(k, max_rows), min(k, max_cols))
    return [*lower, last]
