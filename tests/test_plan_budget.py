"""Tests of issue 12: distinct scales, ``max_upscale`` and ``plan_batch``.

- Distinct scales: over thousands of sizes, tile counts strictly increase from scale to scale
  unless a cap leaves no larger grid, and the dynamic programme of ``policy="aspect"`` is optimal
  against an enumeration of every combination of grids written here (small caps).
- ``max_upscale``: the row and column limits hold at every scale, for both policies and fits; a
  capped plan never has more tiles than the uncapped one at any scale; counts never decrease.
- ``plan_batch``: a budget that does not bind returns the per-image plans; a larger budget never
  gives an image fewer tiles; the total stays within the budget; deterministic; permuting the
  sizes permutes the plans; errors name ``tile_budget`` / ``sizes``.

Planning is pure Python and cached, so these run thousands of examples cheaply.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_plan import _examples  # the example counts of the planner's other tests
from test_plan import reference_cost as area_cost

import dynamic_s2
import dynamic_s2.budget as budget_module
import dynamic_s2.plan as plan_module
from dynamic_s2 import TilePlan, plan_batch, plan_tiles

SCALES = (448, 896, 1344)


@pytest.fixture(autouse=True)
def _fresh_ladders() -> None:
    """Every test starts from empty plan and ladder caches."""
    plan_module._plan_cached.cache_clear()
    budget_module._ladder.cache_clear()


sides = st.integers(1, 10_000)
fits = st.sampled_from(["stretch", "pad"])
upscales = st.one_of(
    st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0]), st.floats(0.01, 8.0, allow_nan=False)
)


def reference_cost(h: int, w: int, grid: tuple[int, int], k2: float, fit: str) -> float:
    """Misfit + area price (``test_plan``'s reference, from the docstring) + the tile price."""
    return area_cost(h, w, grid, k2, fit) + plan_module.ASPECT_TILE_PRICE * grid[0] * grid[1]


def limits(h: int, w: int, t: int, u: float) -> tuple[int, int]:
    """The issue's bound: ``max(1, ⌊u·h / t⌋)`` rows and ``max(1, ⌊u·w / t⌋)`` columns."""
    return max(1, math.floor(u * h / t)), max(1, math.floor(u * w / t))


def counts(plan: TilePlan) -> list[int]:
    return [sp.num_tiles for sp in plan.scales]


# ---------------------------------------------------------------------------------------------
# Distinct scales
# ---------------------------------------------------------------------------------------------


@settings(max_examples=_examples(1000))
@given(h=sides, w=sides, fit=fits)
@example(h=300, w=451, fit="stretch")  # the issue's chelsea.jpg, at 448/896/1344 here
@example(h=4000, w=6000, fit="stretch")  # the issue's 1, 6, 6 photo
def test_default_scales_are_distinct(h: int, w: int, fit: str) -> None:
    c = counts(plan_tiles(h, w, SCALES, fit=fit))
    assert c[0] < c[1] < c[2], (h, w, c)
    assert c[2] <= 27


def test_issue_examples_are_distinct() -> None:
    assert len(set(counts(plan_tiles(300, 451, (224, 448, 672))))) == 3
    assert len(set(counts(plan_tiles(4000, 6000, SCALES)))) == 3


@settings(max_examples=_examples(1500))
@given(
    h=sides,
    w=sides,
    fit=fits,
    caps=st.lists(st.integers(1, 30), min_size=3, max_size=3).map(sorted),
    upscale=st.one_of(st.none(), upscales),
)
def test_repeats_only_where_a_cap_stops(
    h: int, w: int, fit: str, caps: list[int], upscale: float | None
) -> None:
    """A scale repeats the previous count only when no allowed grid has more tiles."""
    plan = plan_tiles(h, w, SCALES, max_tiles=tuple(caps), fit=fit, max_upscale=upscale)
    free = plan_tiles(h, w, SCALES, max_tiles=tuple(caps), fit=fit)
    rows, cols = limits(h, w, 448, upscale) if upscale is not None else (99, 99)
    for i, (a, b) in enumerate(itertools.pairwise(plan.scales), start=1):
        assert b.num_tiles >= a.num_tiles
        if b.num_tiles == a.num_tiles:
            bound = min(caps[i], free.scales[i].num_tiles) if upscale is not None else caps[i]
            larger = [
                (r, c)
                for r in range(1, min(rows, bound) + 1)
                for c in range(1, min(cols, bound // r) + 1)
                if a.num_tiles < r * c
            ]
            # with max_upscale a plan already inside the limit is kept as it is
            kept = upscale is not None and plan.grids == free.grids
            assert kept or not larger, (h, w, caps, upscale, plan.grids, larger[:3])


def brute_force(
    h: int,
    w: int,
    scales: tuple[int, ...],
    caps: tuple[int, ...],
    fit: str,
    rows: int = 10**9,
    cols: int = 10**9,
) -> float:
    """The least total cost over every combination of grids (one per scale), enumerated."""
    t = scales[0]
    pools = [
        [(r, c) for r in range(1, min(cap, rows) + 1) for c in range(1, min(cap // r, cols) + 1)]
        for cap in caps
    ]
    tops = [max(r * c for r, c in pool) for pool in pools]
    best = math.inf
    for combo in itertools.product(*pools):
        n = [r * c for r, c in combo]
        if all(b > a or b == a == tops[i + 1] for i, (a, b) in enumerate(itertools.pairwise(n))):
            cost = sum(
                reference_cost(h, w, g, (s / t) ** 2, fit)
                for g, s in zip(combo, scales, strict=True)
            )
            best = min(best, cost)
    return best


def total_cost(plan: TilePlan) -> float:
    h, w = plan.image_size
    t = plan.tile_size
    return sum(reference_cost(h, w, sp.grid, (sp.scale / t) ** 2, plan.fit) for sp in plan.scales)


small_scales = st.sampled_from([(448, 896), (448, 896, 1344), (448, 672, 896), (448, 560, 700)])


@settings(max_examples=_examples(400))
@given(
    h=sides,
    w=sides,
    fit=fits,
    scales=small_scales,
    data=st.data(),
)
def test_dp_is_optimal_against_enumeration(
    h: int, w: int, fit: str, scales: tuple[int, ...], data: st.DataObject
) -> None:
    caps = tuple(
        sorted(data.draw(st.lists(st.integers(1, 9), min_size=len(scales), max_size=len(scales))))
    )
    plan = plan_tiles(h, w, scales, max_tiles=caps, fit=fit)
    assert total_cost(plan) <= brute_force(h, w, scales, caps, fit) + 1e-9


@settings(max_examples=_examples(300))
@given(h=sides, w=sides, fit=fits, upscale=upscales)
def test_capped_dp_is_optimal_against_enumeration(h: int, w: int, fit: str, upscale: float) -> None:
    """Under max_upscale: the best plan inside the limit with at most the uncapped counts."""
    scales, caps = (448, 896), (3, 8)
    free = plan_tiles(h, w, scales, max_tiles=caps, fit=fit)
    plan = plan_tiles(h, w, scales, max_tiles=caps, fit=fit, max_upscale=upscale)
    rows, cols = limits(h, w, 448, upscale)
    if all(r <= rows and c <= cols for r, c in free.grids):
        assert plan.grids == free.grids
        return
    bound = tuple(min(a, b) for a, b in zip(caps, counts(free), strict=True))
    assert total_cost(plan) <= brute_force(h, w, scales, bound, fit, rows, cols) + 1e-9


# ---------------------------------------------------------------------------------------------
# max_upscale
# ---------------------------------------------------------------------------------------------


@settings(max_examples=_examples(1000))
@given(
    h=sides,
    w=sides,
    fit=fits,
    policy=st.sampled_from(["aspect", "nvila"]),
    upscale=upscales,
)
@example(h=64, w=64, fit="stretch", policy="aspect", upscale=2.0)
@example(h=64, w=64, fit="pad", policy="nvila", upscale=2.0)
@example(h=1, w=10_000, fit="stretch", policy="nvila", upscale=0.01)
def test_max_upscale_bounds(h: int, w: int, fit: str, policy: str, upscale: float) -> None:
    plan = plan_tiles(h, w, SCALES, fit=fit, policy=policy, max_upscale=upscale)  # type: ignore[arg-type]
    free = plan_tiles(h, w, SCALES, fit=fit, policy=policy)  # type: ignore[arg-type]
    rows, cols = limits(h, w, 448, upscale)
    for sp, fsp in zip(plan.scales, free.scales, strict=True):
        assert sp.grid[0] <= rows and sp.grid[1] <= cols, (sp.grid, rows, cols)
        assert sp.num_tiles <= fsp.num_tiles
    c = counts(plan)
    assert c == sorted(c)
    if all(r <= rows and c_ <= cols for r, c_ in free.grids):
        assert plan.grids == free.grids
    back = TilePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan
    assert back.max_upscale == float(upscale)


# ~1,700 fixed sizes, 1 px to 10⁴ px: a log-spaced grid and extreme ratios (runs on CI in full).
SWEEP = sorted(
    {(round(10 ** (4 * i / 39)), round(10 ** (4 * j / 39))) for i in range(40) for j in range(40)}
    | {(s, s * r) for s in (1, 3, 50, 448) for r in (8, 20, 100) if s * r <= 10_000}
    | {(s * r, s) for s in (1, 3, 50, 448) for r in (8, 20, 100) if s * r <= 10_000}
)


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_sweep_distinct_and_max_upscale(fit: str) -> None:
    """Distinct counts, and every max_upscale property at 1.0 / 1.5 / 2.0, over the sweep."""
    for h, w in SWEEP:
        free = {p: plan_tiles(h, w, SCALES, fit=fit, policy=p) for p in ("aspect", "nvila")}
        c = counts(free["aspect"])
        assert c[0] < c[1] < c[2], (h, w, c)
        for policy in ("aspect", "nvila"):
            for u in (1.0, 1.5, 2.0):
                plan = plan_tiles(h, w, SCALES, fit=fit, policy=policy, max_upscale=u)  # type: ignore[arg-type]
                rows, cols = limits(h, w, 448, u)
                assert all(r <= rows and c_ <= cols for r, c_ in plan.grids), (h, w, u, plan)
                capped = counts(plan)
                assert capped == sorted(capped)
                assert all(a <= b for a, b in zip(capped, counts(free[policy]), strict=True))


def test_max_upscale_examples() -> None:
    assert plan_tiles(64, 64, SCALES, max_upscale=2.0).grids == ((1, 1),) * 3
    assert plan_tiles(64, 64, SCALES, max_upscale=2.0, policy="nvila").grids == ((1, 1),) * 3
    big = plan_tiles(3000, 4000, SCALES)
    assert plan_tiles(3000, 4000, SCALES, max_upscale=1.0).grids == big.grids
    # int and float limits give the same plan; None is the default
    assert plan_tiles(500, 700, SCALES, max_upscale=1) == plan_tiles(
        500, 700, SCALES, max_upscale=1.0
    )
    assert plan_tiles(500, 700, SCALES, max_upscale=None) == plan_tiles(500, 700, SCALES)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (0.0, ValueError),
        (-1.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-float("inf"), ValueError),
        (True, TypeError),
        (False, TypeError),
        ("2", TypeError),
        ([2.0], TypeError),
    ],
)
@pytest.mark.parametrize("policy", ["aspect", "nvila"])
def test_max_upscale_errors(value: Any, error: type[Exception], policy: str) -> None:
    with pytest.raises(error) as info:
        plan_tiles(600, 800, SCALES, max_upscale=value, policy=policy)  # type: ignore[arg-type]
    assert "max_upscale" in str(info.value) and repr(value) in str(info.value)
    with pytest.raises(error):  # also through plan_batch
        plan_batch([(600, 800)], SCALES, tile_budget=100, max_upscale=value, policy=policy)


def test_from_dict_max_upscale_errors() -> None:
    data = plan_tiles(64, 64, SCALES, max_upscale=2.0).to_dict()
    assert data["max_upscale"] == 2.0
    for bad, error in ((0, ValueError), ("2", TypeError), (True, TypeError)):
        with pytest.raises(error, match="max_upscale"):
            TilePlan.from_dict({**data, "max_upscale": bad})
    assert "max_upscale" not in plan_tiles(64, 64, SCALES).to_dict()


# ---------------------------------------------------------------------------------------------
# plan_batch
# ---------------------------------------------------------------------------------------------

size_lists = st.lists(
    st.tuples(st.integers(16, 6000), st.integers(16, 6000)), min_size=1, max_size=10
).flatmap(
    lambda sizes: st.lists(st.sampled_from(sizes), min_size=0, max_size=4).map(
        lambda extra: sizes + extra  # some sizes repeated
    )
)
plan_opts = st.one_of(
    st.just({}),
    st.just({"fit": "pad"}),
    st.just({"max_upscale": 1.0}),
    st.just({"max_tiles": 12}),
    st.just({"policy": "nvila"}),
)


def _floor(sizes: list[tuple[int, int]], opts: dict[str, Any]) -> int:
    if opts.get("policy") == "nvila":
        return len(sizes) * (1 + 4 + 9)
    return len(sizes) * len(SCALES)


@settings(max_examples=_examples(400), deadline=None)
@given(sizes=size_lists, opts=plan_opts, data=st.data())
def test_plan_batch_properties(
    sizes: list[tuple[int, int]], opts: dict[str, Any], data: st.DataObject
) -> None:
    free = [plan_tiles(h, w, SCALES, **opts) for h, w in sizes]
    total = sum(p.num_tiles for p in free)
    floor = _floor(sizes, opts)
    # a budget that does not bind: exactly the per-image plans
    assert plan_batch(sizes, SCALES, tile_budget=total, **opts) == free
    assert plan_batch(sizes, SCALES, tile_budget=total + 7, **opts) == free
    lo = data.draw(st.integers(floor, max(floor, total)))
    hi = data.draw(st.integers(lo, max(lo, total)))
    small = plan_batch(sizes, SCALES, tile_budget=lo, **opts)
    large = plan_batch(sizes, SCALES, tile_budget=hi, **opts)
    for plans, budget in ((small, lo), (large, hi)):
        assert len(plans) == len(sizes)
        assert sum(p.num_tiles for p in plans) <= budget
        for p, f, hw in zip(plans, free, sizes, strict=True):
            assert p.image_size == hw and p.fit == f.fit and p.policy == f.policy
            assert p.num_tiles <= f.num_tiles
            c = counts(p)
            assert c == sorted(c)
            if "max_upscale" in opts:
                rows, cols = limits(*hw, 448, opts["max_upscale"])
                assert all(r <= rows and c_ <= cols for r, c_ in p.grids)
    # monotone: a larger budget never gives any image fewer tiles
    assert all(a.num_tiles <= b.num_tiles for a, b in zip(small, large, strict=True))
    # deterministic, and order-equivariant
    plan_module._plan_cached.cache_clear()
    budget_module._ladder.cache_clear()
    assert plan_batch(sizes, SCALES, tile_budget=lo, **opts) == small
    order = data.draw(st.permutations(range(len(sizes))))
    permuted = plan_batch([sizes[i] for i in order], SCALES, tile_budget=lo, **opts)
    assert permuted == [small[i] for i in order]


@settings(max_examples=_examples(60), deadline=None)
@given(sizes=size_lists)
def test_plan_batch_budget_sweep_is_monotone(sizes: list[tuple[int, int]]) -> None:
    """Every budget from the floor to the unconstrained total: per-image tiles never fall."""
    free_total = sum(plan_tiles(h, w, SCALES).num_tiles for h, w in sizes)
    previous = None
    for budget in range(len(sizes) * 3, free_total + 1):
        tiles = [p.num_tiles for p in plan_batch(sizes, SCALES, tile_budget=budget)]
        assert sum(tiles) <= budget
        if previous is not None:
            assert all(a <= b for a, b in zip(previous, tiles, strict=True))
        previous = tiles


def test_plan_batch_floor() -> None:
    sizes = [(1080, 1920), (3000, 1000), (64, 64)]
    assert [p.grids for p in plan_batch(sizes, SCALES, tile_budget=9)] == [((1, 1),) * 3] * 3
    with pytest.raises(ValueError, match="tile_budget=8"):
        plan_batch(sizes, SCALES, tile_budget=8)
    with pytest.raises(ValueError, match="tile_budget=41"):
        plan_batch(sizes, SCALES, tile_budget=41, policy="nvila")  # NVILA's floor is 3 · 14


def test_plan_batch_export() -> None:
    assert dynamic_s2.plan_batch is plan_batch


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"tile_budget": 0}, ValueError, ["tile_budget", "0"]),
        ({"tile_budget": -4}, ValueError, ["tile_budget", "-4"]),
        ({"tile_budget": 10.0}, TypeError, ["tile_budget", "10.0"]),
        ({"tile_budget": True}, TypeError, ["tile_budget", "True"]),
        ({"tile_budget": "10"}, TypeError, ["tile_budget", "'10'"]),
        ({"tile_budget": None}, TypeError, ["tile_budget", "None"]),
        ({"sizes": []}, ValueError, ["sizes", "empty"]),
        ({"sizes": ()}, ValueError, ["sizes", "empty"]),
        ({"sizes": [(0, 10)]}, ValueError, ["sizes[0]", "(0, 10)"]),
        ({"sizes": [(10, 10), (10, -3)]}, ValueError, ["sizes[1]", "(10, -3)"]),
        ({"sizes": [(10.0, 10)]}, TypeError, ["sizes[0]", "(10.0, 10)"]),
        ({"sizes": [(True, 10)]}, TypeError, ["sizes[0]", "True"]),
        ({"sizes": [(10, 10, 3)]}, TypeError, ["sizes[0]", "(10, 10, 3)"]),
        ({"sizes": [10]}, TypeError, ["sizes[0]", "10"]),
        ({"sizes": "ab"}, TypeError, ["sizes", "'ab'"]),
        ({"sizes": None}, TypeError, ["sizes", "None"]),
        ({"colour": 1}, TypeError, ["colour"]),
        ({"scales": (1, 2)}, ValueError, ["pixel sizes"]),
        ({"policy": "llava"}, ValueError, ["policy", "'llava'"]),
    ],
)
def test_plan_batch_errors(
    kwargs: dict[str, Any], error: type[Exception], words: list[str]
) -> None:
    args: dict[str, Any] = {"sizes": [(600, 800)], "scales": SCALES, "tile_budget": 100, **kwargs}
    with pytest.raises(error) as info:
        plan_batch(args.pop("sizes"), args.pop("scales"), **args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
