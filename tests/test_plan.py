"""Tests of the tiling planner, ``dynamic_s2.plan`` (issue 2).

- Properties over thousands of sizes (1 px to 10⁴ px, extreme ratios): hypothesis draws sizes,
  scales, tile sizes and budgets, and a fixed sweep of ~2,700 sizes runs the same checks
  deterministically.
- Optimality of the ``"aspect"`` policy against a brute-force search written here from the rule in
  ``plan_tiles``'s docstring (it shares no code with ``plan.py``).
- The NVILA policy against the worked examples of the issue and an independent re-implementation of
  NVILA's rule, written from the issue text.
- JSON round trip, ``from_dict`` validation and every error path of ``plan_tiles``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import pytest
from _deps import need
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dynamic_s2.plan as plan_module
from dynamic_s2.plan import ScalePlan, TilePlan, plan_tiles

SCALES = (448, 896, 1344)
MAX_SIDE = 10_000
# Costs closer than this are ties; float noise in a few logs is ~1e-15, real differences between
# distinct costs of integer sizes <= 10⁴ are many orders of magnitude larger.
TIE_TOL = 1e-9


def _examples(n: int) -> int:
    """``n`` hypothesis examples locally; at most the CI profile's count (conftest.py) on CI."""
    if os.environ.get("CI"):
        return min(n, settings.default.max_examples)
    return n


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    """Start every test from an empty plan cache, so no test depends on what ran before it."""
    plan_module._plan_cached.cache_clear()


# ---------------------------------------------------------------------------------------------
# Sizes and configurations
# ---------------------------------------------------------------------------------------------


def _sweep_sizes() -> list[tuple[int, int]]:
    """~2,700 deterministic (h, w): a log-spaced grid, seeded random sizes, extreme ratios."""
    axis = sorted({round(10 ** (4 * i / 39)) for i in range(40)})  # 1 .. 10⁴, log-spaced
    sizes = {(h, w) for h in axis for w in axis}
    rng = random.Random(20260215)
    while len(sizes) < 2_400:
        sizes.add((rng.randint(1, MAX_SIDE), rng.randint(1, MAX_SIDE)))
    for short in (1, 2, 3, 7, 50, 99, 448):  # extreme ratios in both orientations
        for ratio in (8, 20, 100, 1000):
            if short * ratio <= MAX_SIDE:
                sizes.add((short, short * ratio))
                sizes.add((short * ratio, short))
    return sorted(sizes)


SWEEP = _sweep_sizes()

sides = st.integers(1, MAX_SIDE)
fits = st.sampled_from(["stretch", "pad"])
policies = st.sampled_from(["aspect", "nvila"])


@st.composite
def aspect_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Scales (1 to 4, up to 4× the tile), an optional explicit tile size and a budget."""
    tile = draw(st.sampled_from([16, 64, 224, 336, 448]))
    count = draw(st.integers(1, 4))
    scales = tuple(
        sorted(
            draw(st.lists(st.integers(tile, 4 * tile), min_size=count, max_size=count, unique=True))
        )
    )
    tile_size = draw(st.sampled_from([None, tile]))
    max_tiles = draw(
        st.one_of(
            st.none(),
            st.integers(1, 60),
            st.lists(st.integers(1, 60), min_size=count, max_size=count).map(
                lambda caps: tuple(sorted(caps))
            ),
        )
    )
    return {"scales": scales, "tile_size": tile_size, "max_tiles": max_tiles}


@st.composite
def nvila_configs(draw: st.DrawFn) -> dict[str, Any]:
    """NVILA scales (multiples of the first) and a ``max_tiles`` at or above NVILA's minimum."""
    base = draw(st.sampled_from([16, 224, 384, 448]))
    factors = draw(st.lists(st.integers(2, 4), max_size=3, unique=True))
    scales = tuple(base * f for f in [1, *sorted(factors)])
    lowest = (scales[-1] // base) ** 2
    max_tiles = draw(st.one_of(st.none(), st.integers(lowest, lowest + 10)))
    if max_tiles is None and lowest > 12:
        max_tiles = lowest
    return {"scales": scales, "max_tiles": max_tiles}


def _tile(config: dict[str, Any]) -> int:
    return config["scales"][0] if config.get("tile_size") is None else config["tile_size"]


def _caps(config: dict[str, Any]) -> list[int]:
    """The documented per-scale caps of the aspect policy, in exact integer arithmetic."""
    scales, t, budget = config["scales"], _tile(config), config.get("max_tiles")
    if budget is None:  # floor(3 k²), k = s / t
        return [max(1, (3 * s * s) // (t * t)) for s in scales]
    if isinstance(budget, int):  # the largest scale gets the budget, the others in proportion
        return [max(1, (budget * s * s) // (scales[-1] ** 2)) for s in scales]
    return list(budget)


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def reference_cost(h: int, w: int, grid: tuple[int, int], k2: float, fit: str) -> float:
    """The documented cost of a grid under ``policy="aspect"``, written from the docstring.

    misfit: ``|log((cols/rows) / (w/h))|`` under stretch, the padded fraction of the canvas under
    pad; area price: ``UP·log(n/k²)`` above the target ``k²`` tiles, ``DOWN·log(k²/n)`` below it.
    """
    rows, cols = grid
    q = (cols * h) / (rows * w)  # grid aspect over image aspect
    misfit = abs(math.log(q)) if fit == "stretch" else 1.0 - min(q, 1.0 / q)
    n = rows * cols
    if n > k2:
        price = plan_module.ASPECT_AREA_PRICE_UP * math.log(n / k2)
    else:
        price = plan_module.ASPECT_AREA_PRICE_DOWN * math.log(k2 / n)
    return misfit + price


def reference_nvila_grid(
    width: int, height: int, scales: Sequence[int], max_tiles: int = 12
) -> tuple[int, int]:
    """NVILA's last-scale rule, written from the issue text; returns ``(rows, cols)``."""
    t = scales[0]
    low, high = (scales[-1] // scales[0]) ** 2, max_tiles
    pool = set()  # the same loops, hence the same set iteration order, as NVILA
    for n in range(low, high + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if low <= i * j <= high:
                    pool.add((i, j))  # i columns, j rows
    chosen, chosen_diff = None, None
    for i, j in sorted(pool, key=lambda ij: ij[0] * ij[1]):
        diff = abs(width / height - i / j)
        if chosen_diff is None or diff < chosen_diff:
            chosen, chosen_diff = (i, j), diff
        elif diff == chosen_diff and width * height > 0.5 * t * t * i * j:
            chosen = (i, j)
    assert chosen is not None
    return (chosen[1], chosen[0])


# ---------------------------------------------------------------------------------------------
# Checks shared by hypothesis and the sweep
# ---------------------------------------------------------------------------------------------


def check_structure(plan: TilePlan, h: int, w: int, config: dict[str, Any], fit: str) -> None:
    """Fields, canvas, tile offsets and feature sizes of any plan."""
    t = _tile(config)
    assert plan.image_size == (h, w)
    assert plan.tile_size == t
    assert plan.fit == fit
    assert tuple(sp.scale for sp in plan.scales) == tuple(config["scales"])
    assert plan.num_tiles == sum(sp.num_tiles for sp in plan.scales)
    for sp in plan.scales:
        rows, cols = sp.grid
        assert isinstance(rows, int) and isinstance(cols, int)
        assert rows >= 1 and cols >= 1
        assert sp.tile_size == t
        assert sp.num_tiles == rows * cols
        assert sp.canvas_size == (rows * t, cols * t)
        offsets = sp.tile_offsets()
        assert len(offsets) == sp.num_tiles
        assert list(offsets) == [(r * t, c * t) for r in range(rows) for c in range(cols)]
        check_content(sp, h, w, fit)
        for n in (1, 7, 16, 32):
            fh, fw = sp.feature_size(n)
            assert (fh, fw) == (
                math.ceil(Fraction(sp.content_size[0] * n, t)),
                math.ceil(Fraction(sp.content_size[1] * n, t)),
            )
            assert 1 <= fh <= rows * n and 1 <= fw <= cols * n
    assert plan.feature_size(-1, 16) == plan.scales[-1].feature_size(16)


def check_content(sp: ScalePlan, h: int, w: int, fit: str) -> None:
    """stretch: content == canvas. pad: same aspect within rounding, inside, touching one side."""
    ch, cw = sp.canvas_size
    hc, wc = sp.content_size
    if fit == "stretch":
        assert (hc, wc) == (ch, cw)
        assert sp.padded_fraction == 0.0
        return
    assert 1 <= hc <= ch and 1 <= wc <= cw
    assert hc == ch or wc == cw, "pad content must touch the canvas on at least one side"
    # The free side is the exact aspect-preserving length, rounded to the nearest pixel (>= 1).
    if wc == cw and (hc < ch or w * ch >= h * cw):
        exact = Fraction(h * cw, w)
        assert abs(hc - exact) <= Fraction(1, 2) or (hc == 1 and exact < 1)
    else:
        exact = Fraction(w * ch, h)
        assert abs(wc - exact) <= Fraction(1, 2) or (wc == 1 and exact < 1)
    # hence the aspect ratio h/w is kept to within a pixel of the shorter content side
    assert abs(hc / wc - h / w) <= 1.0 / wc + 1e-12 or abs(wc / hc - w / h) <= 1.0 / hc + 1e-12
    assert 0.0 <= sp.padded_fraction < 1.0


def check_counts(plan: TilePlan, caps: Sequence[int]) -> None:
    counts = [sp.num_tiles for sp in plan.scales]
    assert all(c >= 1 for c in counts)
    assert counts == sorted(counts), f"tile counts decrease across scales: {counts}"
    assert all(c <= cap for c, cap in zip(counts, caps, strict=True)), (counts, caps)


def check_distinct(plan: TilePlan, caps: Sequence[int]) -> None:
    """Issue 12: counts strictly increase unless the scale's cap leaves no larger grid."""
    for (a, b), cap in zip(itertools.pairwise(plan.scales), caps[1:], strict=True):
        assert b.num_tiles > a.num_tiles or b.num_tiles == a.num_tiles == cap, (
            f"{plan.image_size}: {a.num_tiles} then {b.num_tiles} tiles under cap {cap}"
        )


def check_symmetric(plan: TilePlan, h: int, w: int, config: dict[str, Any], fit: str) -> None:
    """The transposed image gets exactly the transposed plan. A square image is its own
    transpose, so there the transposed plan only has to cost the same (issue 12: with strictly
    increasing counts a square image can need a non-square grid, and r×c ties with c×r)."""
    other = plan_tiles(w, h, fit=fit, **config)
    if h != w:
        assert other == plan.transpose()
        return
    assert other == plan
    k2s = [(sp.scale / plan.tile_size) ** 2 for sp in plan.scales]
    for sp, k2 in zip(plan.scales, k2s, strict=True):
        flipped = (sp.grid[1], sp.grid[0])
        assert reference_cost(h, w, sp.grid, k2, fit) == pytest.approx(
            reference_cost(h, w, flipped, k2, fit), abs=TIE_TOL
        )


def reference_best_total(
    h: int, w: int, scales: Sequence[int], t: int, caps: Sequence[int], fit: str
) -> float:
    """The least total documented cost over every admissible choice of grids, by a memoised
    search over (scale, previous count) that enumerates every grid: counts strictly increase
    unless no grid under the scale's cap has more tiles than the previous scale's."""
    price = plan_module.ASPECT_TILE_PRICE

    @functools.cache
    def best(i: int, prev: int) -> float:
        if i == len(scales):
            return 0.0
        k2 = (scales[i] / t) ** 2
        cap = caps[i]
        out = math.inf
        for r in range(1, cap + 1):
            for c in range(1, cap // r + 1):
                n = r * c
                if n > prev or (n == prev == cap):
                    cost = reference_cost(h, w, (r, c), k2, fit) + price * n
                    out = min(out, cost + best(i + 1, n))
        return out

    return best(0, 0)


def check_optimal(plan: TilePlan, h: int, w: int, caps: Sequence[int], fit: str) -> None:
    """No admissible combination of grids has a lower total cost (issue 12's rule)."""
    check_distinct(plan, caps)
    t = plan.tile_size
    scales = [sp.scale for sp in plan.scales]
    chosen = sum(
        reference_cost(h, w, sp.grid, (sp.scale / t) ** 2, fit)
        + plan_module.ASPECT_TILE_PRICE * sp.num_tiles
        for sp in plan.scales
    )
    best = reference_best_total(h, w, scales, t, caps, fit)
    assert chosen <= best + TIE_TOL, f"{h}x{w}: chose {plan.grids} at {chosen:.6f} > {best:.6f}"


# ---------------------------------------------------------------------------------------------
# "aspect" policy: properties
# ---------------------------------------------------------------------------------------------


@settings(max_examples=_examples(400))
@given(h=sides, w=sides, config=aspect_configs(), fit=fits)
@example(h=1, w=MAX_SIDE, config={"scales": SCALES}, fit="stretch")
@example(h=MAX_SIDE, w=1, config={"scales": SCALES}, fit="pad")
@example(h=1, w=1, config={"scales": SCALES}, fit="pad")
def test_aspect_properties(h: int, w: int, config: dict[str, Any], fit: str) -> None:
    plan = plan_tiles(h, w, fit=fit, **config)
    assert plan.policy == "aspect"
    check_structure(plan, h, w, config, fit)
    check_counts(plan, _caps(config))
    check_symmetric(plan, h, w, config, fit)
    assert plan.transpose().transpose() == plan


@settings(max_examples=_examples(400))
@given(h=sides, w=sides, config=aspect_configs(), fit=fits)
@example(h=600, w=800, config={"scales": (448, 672)}, fit="stretch")
@example(h=1, w=1, config={"scales": (16, 64), "max_tiles": (1, 3)}, fit="pad")
def test_aspect_is_optimal_against_brute_force(
    h: int, w: int, config: dict[str, Any], fit: str
) -> None:
    plan = plan_tiles(h, w, fit=fit, **config)
    check_optimal(plan, h, w, _caps(config), fit)


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_aspect_sweep(fit: str) -> None:
    """Every property and brute-force optimality over ~2,700 sizes with the default scales."""
    config = {"scales": SCALES}
    caps = _caps(config)
    assert caps == [3, 12, 27]
    for h, w in SWEEP:
        plan = plan_tiles(h, w, SCALES, fit=fit)
        check_structure(plan, h, w, config, fit)
        check_counts(plan, caps)
        check_optimal(plan, h, w, caps, fit)
        check_symmetric(plan, h, w, config, fit)


@settings(max_examples=_examples(200))
@given(h=sides, w=sides, config=aspect_configs(), fit=fits, policy=policies)
def test_deterministic(h: int, w: int, config: dict[str, Any], fit: str, policy: str) -> None:
    if policy == "nvila":
        config = {"scales": (448, 896, 1344)}
    first = plan_tiles(h, w, fit=fit, policy=policy, **config)
    plan_module._plan_cached.cache_clear()
    again = plan_tiles(h, w, fit=fit, policy=policy, **config)
    assert again == first
    assert again is not first  # really recomputed
    assert plan_tiles(h, w, fit=fit, policy=policy, **config) is again  # now cached


_POLICY_BUDGETS = (("aspect", None), ("nvila", 12), ("nvila", 16))


def test_deterministic_across_processes() -> None:
    """Plans do not depend on hash randomisation (NVILA's candidate order comes from a set)."""
    sizes = SWEEP[::97]
    code = (
        "import json, sys\n"
        "from dynamic_s2.plan import plan_tiles\n"
        "sizes = json.loads(sys.argv[1])\n"
        "print(json.dumps([[plan_tiles(h, w, (448, 896, 1344), policy=p, max_tiles=m).grids\n"
        "    for p, m in (('aspect', None), ('nvila', 12), ('nvila', 16))] for h, w in sizes]))\n"
    )
    here = [
        [plan_tiles(h, w, SCALES, policy=p, max_tiles=m).grids for p, m in _POLICY_BUDGETS]
        for h, w in sizes
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for seed in ("12345",):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": root}
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(sizes)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        there = json.loads(out)
        assert there == json.loads(json.dumps(here))


def test_aspect_budgets() -> None:
    """The three forms of max_tiles: default, one int (proportional), one cap per scale."""
    for h, w in SWEEP[::7]:
        assert max(sp.num_tiles for sp in plan_tiles(h, w, SCALES).scales) <= 27
        capped = plan_tiles(h, w, SCALES, max_tiles=12)
        check_counts(capped, [1, 5, 12])  # floor(12 · (s / 1344)²)
        check_counts(plan_tiles(h, w, SCALES, max_tiles=(2, 4, 9)), [2, 4, 9])
        check_counts(plan_tiles(h, w, SCALES, max_tiles=[1, 1, 1]), [1, 1, 1])
    # a cap of one tile per scale leaves a single grid
    assert plan_tiles(300, 4000, SCALES, max_tiles=(1, 1, 1)).grids == ((1, 1),) * 3
    # lists and tuples give the same (cached) plan
    assert plan_tiles(300, 4000, [448, 896], max_tiles=[3, 9]) == plan_tiles(
        300, 4000, (448, 896), max_tiles=(3, 9)
    )


def test_aspect_examples() -> None:
    """A few plans worth seeing written out (the docstring and docs quote these)."""
    assert plan_tiles(1080, 1920, SCALES).grids == ((1, 2), (2, 3), (2, 4))
    assert plan_tiles(1920, 1080, SCALES).grids == ((2, 1), (3, 2), (4, 2))
    assert plan_tiles(448, 448, SCALES).grids == ((1, 1), (2, 2), (3, 3))
    assert plan_tiles(480, 640, (224, 448, 672)).grids == ((1, 1), (2, 3), (3, 4))
    # a 1:3 receipt and an 8:1 banner follow their aspect ratio at every scale
    receipt = plan_tiles(3000, 1000, SCALES)
    assert all(sp.grid[0] > sp.grid[1] for sp in receipt.scales[1:])
    banner = plan_tiles(90, 728, SCALES)
    assert all(sp.grid[1] >= 2 * sp.grid[0] for sp in banner.scales)


# ---------------------------------------------------------------------------------------------
# "nvila" policy
# ---------------------------------------------------------------------------------------------

NVILA_EXAMPLES = [  # (W, H) -> (rows, cols) at the last scale; scales 448/896/1344, max 12
    ((448, 448), (3, 3)),
    ((1000, 600), (3, 4)),
    ((1920, 1080), (3, 4)),
    ((1080, 1920), (5, 2)),
    ((1100, 400), (2, 5)),
    ((2000, 300), (1, 9)),
    ((2750, 1000), (2, 6)),
    ((275, 100), (2, 5)),
]


@pytest.mark.parametrize(("wh", "grid"), NVILA_EXAMPLES)
@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_nvila_worked_examples(wh: tuple[int, int], grid: tuple[int, int], fit: str) -> None:
    width, height = wh
    plan = plan_tiles(height, width, SCALES, policy="nvila", max_tiles=12, fit=fit)
    assert plan.grids == ((1, 1), (2, 2), grid)
    assert plan.policy == "nvila"
    assert plan_tiles(height, width, SCALES, policy="nvila", fit=fit) == plan  # 12 is the default
    assert reference_nvila_grid(width, height, SCALES, 12) == grid  # the reference agrees too


def test_nvila_is_not_symmetric() -> None:
    """NVILA's rule is linear in W/H, so transposing the image need not transpose the plan."""
    wide = plan_tiles(1080, 1920, SCALES, policy="nvila").scales[-1].grid
    tall = plan_tiles(1920, 1080, SCALES, policy="nvila").scales[-1].grid
    assert wide == (3, 4) and tall == (5, 2)


@settings(max_examples=_examples(300))
@given(h=sides, w=sides, config=nvila_configs(), fit=fits)
def test_nvila_matches_reference(h: int, w: int, config: dict[str, Any], fit: str) -> None:
    scales, budget = config["scales"], config["max_tiles"]
    plan = plan_tiles(h, w, scales, policy="nvila", max_tiles=budget, fit=fit)
    base = scales[0]
    expected = [(s // base, s // base) for s in scales[:-1]]
    expected.append(reference_nvila_grid(w, h, scales, 12 if budget is None else budget))
    assert list(plan.grids) == expected
    caps = [(s // base) ** 2 for s in scales[:-1]] + [12 if budget is None else budget]
    check_counts(plan, caps)
    check_structure(plan, h, w, config, fit)


@pytest.mark.parametrize("max_tiles", range(9, 17))
def test_nvila_sweep(max_tiles: int) -> None:
    """The independent reference over ~2,700 sizes for every max_tiles from 9 to 16."""
    for h, w in SWEEP:
        grids = plan_tiles(h, w, SCALES, policy="nvila", max_tiles=max_tiles).grids
        assert grids[:2] == ((1, 1), (2, 2))
        assert grids[2] == reference_nvila_grid(w, h, SCALES, max_tiles), (h, w, max_tiles)


def test_nvila_tie_rule() -> None:
    """On an exactly equal |W/H - i/j| a later candidate wins only if W·H > 0.5·t²·i·j."""
    # Square image, max 16: 3x3 (9 tiles) and 4x4 (16 tiles) both fit exactly; 4x4 comes later and
    # wins only when W·H > 0.5 · 448² · 16 = 1,605,632 px, i.e. from a side of 1268 px.
    assert _nvila_last(1267, 1267, 16) == (3, 3)
    assert _nvila_last(1268, 1268, 16) == (4, 4)
    assert _nvila_last(1268, 1268, 12) == (3, 3)


def test_nvila_set_order() -> None:
    """Among equal tile counts, NVILA's candidates come in the iteration order of its Python set.

    With max 9 the 9-tile candidates iterate as (9, 1), (3, 3), (1, 9) (cols, rows), not in
    lexicographic order. A 5:1 image is 4 away from both 9/1 and 3/3: the first kept is 9×1 and
    3×3 replaces it only for an image of more than 0.5 · 448² · 9 = 903,168 px.
    """
    assert _nvila_last(5, 1, 9) == (1, 9)
    assert _nvila_last(500, 100, 9) == (1, 9)
    assert _nvila_last(2500, 500, 9) == (3, 3)
    for w, h in [(5, 1), (500, 100), (2500, 500)]:
        assert _nvila_last(w, h, 9) == reference_nvila_grid(w, h, SCALES, 9)


def _nvila_last(width: int, height: int, max_tiles: int) -> tuple[int, int]:
    return plan_tiles(height, width, SCALES, policy="nvila", max_tiles=max_tiles).scales[-1].grid


# ---------------------------------------------------------------------------------------------
# JSON round trip and from_dict
# ---------------------------------------------------------------------------------------------


@settings(max_examples=_examples(200))
@given(h=sides, w=sides, config=aspect_configs(), fit=fits, policy=policies)
def test_json_round_trip(h: int, w: int, config: dict[str, Any], fit: str, policy: str) -> None:
    if policy == "nvila":
        config = {"scales": (448, 896, 1344)}
    plan = plan_tiles(h, w, fit=fit, policy=policy, **config)
    text = json.dumps(plan.to_dict())
    back = TilePlan.from_dict(json.loads(text))
    assert back == plan
    assert hash(back) == hash(plan)
    assert {back, plan} == {plan}
    assert json.dumps(back.to_dict()) == text
    assert back.policy == policy and back.fit == fit


def _good_dict() -> dict[str, Any]:
    return json.loads(json.dumps(plan_tiles(600, 1000, SCALES, fit="pad").to_dict()))


def _set(path: Sequence[Any], value: Any) -> dict[str, Any]:
    data = _good_dict()
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def _drop(path: Sequence[Any]) -> dict[str, Any]:
    data = _good_dict()
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return data


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        ([1, 2], TypeError, "mapping"),
        ("plan", TypeError, "mapping"),
        (None, TypeError, "mapping"),
        (_drop(["image_size"]), ValueError, "image_size"),
        (_drop(["tile_size"]), ValueError, "tile_size"),
        (_drop(["scales"]), ValueError, "scales"),
        (_drop(["scales", 0, "grid"]), ValueError, "scales[0]"),
        (_drop(["scales", 1, "content_size"]), ValueError, "scales[1]"),
        (_set(["image_size"], [600]), TypeError, "image_size"),
        (_set(["image_size"], "ab"), TypeError, "image_size"),
        (_set(["image_size"], [600.0, 1000]), TypeError, "image_size"),
        (_set(["image_size"], [0, 1000]), ValueError, "image_size"),
        (_set(["tile_size"], "448"), TypeError, "tile_size"),
        (_set(["tile_size"], True), TypeError, "tile_size"),
        (_set(["tile_size"], -448), ValueError, "tile_size"),
        (_set(["scales"], []), ValueError, "scales"),
        (_set(["scales"], "448"), ValueError, "scales"),
        (_set(["scales", 0], [448, [1, 1], [448, 448]]), TypeError, "scales[0]"),
        (_set(["scales", 0, "scale"], 448.0), TypeError, "scales[0].scale"),
        (_set(["scales", 0, "grid"], [1, 1, 1]), TypeError, "scales[0].grid"),
        (_set(["scales", 0, "grid"], [0, 1]), ValueError, "scales[0].grid"),
        (_set(["scales", 2, "content_size"], [1345, 100]), ValueError, "scales[2].content_size"),
        (_set(["scales", 2, "content_size"], [100, 99999]), ValueError, "scales[2].content_size"),
        (_set(["scales", 0, "scale"], 2000), ValueError, "increasing"),
        (_set(["scales", 1, "scale"], 448), ValueError, "increasing"),
        (_set(["policy"], "llava"), ValueError, "policy"),
        (_set(["fit"], "crop"), ValueError, "fit"),
    ],
)
def test_from_dict_errors(data: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=_escaped(words)):
        TilePlan.from_dict(data)


def test_from_dict_defaults() -> None:
    """policy and fit are optional and default to the plan_tiles defaults."""
    data = json.loads(json.dumps(plan_tiles(600, 1000, SCALES).to_dict()))
    del data["policy"], data["fit"]
    assert TilePlan.from_dict(data) == plan_tiles(600, 1000, SCALES)


def test_scale_index() -> None:
    plan = plan_tiles(600, 1000, SCALES)
    assert plan.feature_size(0, 16) == plan.scales[0].feature_size(16)
    assert plan.feature_size(-3, 16) == plan.scales[0].feature_size(16)
    with pytest.raises(ValueError, match="out of range"):
        plan.feature_size(3, 16)
    with pytest.raises(TypeError, match="index"):
        plan.feature_size(True, 16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokens_per_side"):
        plan.scales[0].feature_size(0)
    with pytest.raises(TypeError, match="tokens_per_side"):
        plan.scales[0].feature_size(16.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Errors of plan_tiles
# ---------------------------------------------------------------------------------------------


def _escaped(words: str) -> str:
    import re

    return re.escape(words)


S2WRAPPER = "dynamic_s2.s2wrapper"

PLAN_ERRORS: list[tuple[dict[str, Any], type[Exception], Sequence[str]]] = [
    # sizes
    ({"height": 0}, ValueError, ["height", "0"]),
    ({"height": -5}, ValueError, ["height", "-5"]),
    ({"width": 0}, ValueError, ["width", "0"]),
    ({"width": -1}, ValueError, ["width", "-1"]),
    ({"height": 600.0}, TypeError, ["height", "600.0"]),
    ({"width": 1000.5}, TypeError, ["width", "1000.5"]),
    ({"height": True}, TypeError, ["height", "True"]),
    ({"width": False}, TypeError, ["width", "False"]),
    ({"height": "600"}, TypeError, ["height", "'600'"]),
    ({"height": None}, TypeError, ["height", "None"]),
    # scales
    ({"scales": ()}, ValueError, ["scales", "empty"]),
    ({"scales": []}, ValueError, ["scales", "empty"]),
    ({"scales": (896, 448)}, ValueError, ["scales", "(896, 448)"]),
    ({"scales": (448, 1344, 896)}, ValueError, ["scales", "increasing"]),
    ({"scales": (448, 448, 896)}, ValueError, ["scales", "duplicates"]),
    ({"scales": (1, 2)}, ValueError, ["pixel sizes", S2WRAPPER, "(1, 2)"]),
    ({"scales": (0.5, 1.0)}, ValueError, ["pixel sizes", S2WRAPPER, "(0.5, 1.0)"]),
    ({"scales": (1.0, 2.0)}, ValueError, ["pixel sizes", S2WRAPPER]),
    ({"scales": (1, 2, 3)}, ValueError, ["pixel sizes", S2WRAPPER]),
    ({"scales": (448.0, 896.0)}, ValueError, ["pixel sizes", S2WRAPPER]),
    ({"scales": (15, 30)}, ValueError, ["pixel sizes", S2WRAPPER]),
    ({"scales": (True, 448)}, TypeError, ["scales", "True"]),
    ({"scales": ("448", "896")}, TypeError, ["scales", "'448'"]),
    ({"scales": "448"}, TypeError, ["scales", "'448'"]),
    ({"scales": None}, TypeError, ["scales", "None"]),
    # tile_size
    ({"scales": (448, 896), "tile_size": 512}, ValueError, ["tile_size", "512", "(448, 896)"]),
    ({"tile_size": 0}, ValueError, ["tile_size", "0"]),
    ({"tile_size": 448.0}, TypeError, ["tile_size", "448.0"]),
    ({"tile_size": True}, TypeError, ["tile_size", "True"]),
    # nvila scales
    ({"scales": (448, 1000), "policy": "nvila"}, ValueError, ["nvila", "multiple", "(448, 1000)"]),
    ({"scales": (448, 672, 1344), "policy": "nvila"}, ValueError, ["nvila", "multiple"]),
    # policy and fit
    ({"policy": "llava"}, ValueError, ["policy", "'llava'"]),
    ({"policy": "Aspect"}, ValueError, ["policy", "'Aspect'"]),
    ({"policy": None}, ValueError, ["policy", "None"]),
    ({"fit": "crop"}, ValueError, ["fit", "'crop'"]),
    ({"fit": None}, ValueError, ["fit", "None"]),
    # max_tiles
    ({"max_tiles": 0}, ValueError, ["max_tiles", "0"]),
    ({"max_tiles": -3}, ValueError, ["max_tiles", "-3"]),
    ({"max_tiles": 12.0}, TypeError, ["max_tiles", "12.0"]),
    ({"max_tiles": True}, TypeError, ["max_tiles", "True"]),
    ({"max_tiles": "12"}, TypeError, ["max_tiles", "'12'"]),
    ({"max_tiles": (3, 12)}, ValueError, ["max_tiles", "(3, 12)", "3"]),
    ({"max_tiles": (3, 12, 27, 40)}, ValueError, ["max_tiles", "per scale"]),
    ({"max_tiles": (3, 0, 27)}, ValueError, ["max_tiles", "0"]),
    ({"max_tiles": (3, 12.0, 27)}, TypeError, ["max_tiles", "12.0"]),
    ({"max_tiles": (12, 3, 27)}, ValueError, ["max_tiles", "non-decreasing"]),
    ({"max_tiles": 8, "policy": "nvila"}, ValueError, ["max_tiles", "8", "9"]),
    ({"max_tiles": 1, "policy": "nvila"}, ValueError, ["max_tiles", "1"]),
    ({"max_tiles": (3, 6, 12), "policy": "nvila"}, ValueError, ["max_tiles", "nvila"]),
    ({"max_tiles": 0, "policy": "nvila"}, ValueError, ["max_tiles", "0"]),
]


def _error_id(case: tuple[dict[str, Any], type[Exception], Sequence[str]]) -> str:
    return ",".join(f"{k}={v!r}" for k, v in case[0].items())


ERROR_IDS = [_error_id(case) for case in PLAN_ERRORS]


@pytest.mark.parametrize(("override", "error", "words"), PLAN_ERRORS, ids=ERROR_IDS)
def test_plan_tiles_errors(
    override: dict[str, Any], error: type[Exception], words: Sequence[str]
) -> None:
    kwargs: dict[str, Any] = {"height": 600, "width": 1000, "scales": SCALES, **override}
    with pytest.raises(error) as info:
        plan_tiles(kwargs.pop("height"), kwargs.pop("width"), kwargs.pop("scales"), **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from the message: {message}"


@pytest.mark.parametrize(("override", "error", "words"), PLAN_ERRORS, ids=ERROR_IDS)
def test_plan_tiles_errors_after_a_cached_plan(
    override: dict[str, Any], error: type[Exception], words: Sequence[str]
) -> None:
    """Validation does not depend on the cache: a valid plan with equal-comparing arguments
    (``448 == 448.0 == np.int64(448)``, ``1 == True``) must not turn an error into a cache hit."""
    kwargs: dict[str, Any] = {"height": 600, "width": 1000, "scales": SCALES, **override}
    # Warm the cache with the valid twin of the bad call, where the bad values have one.
    twin = {k: _valid_twin(v) for k, v in kwargs.items()}
    with contextlib.suppress(TypeError, ValueError):  # no valid twin: nothing to warm
        plan_tiles(twin.pop("height"), twin.pop("width"), twin.pop("scales"), **twin)
    with pytest.raises(error):
        plan_tiles(kwargs.pop("height"), kwargs.pop("width"), kwargs.pop("scales"), **kwargs)


def _valid_twin(value: Any) -> Any:
    """The int that compares and hashes equal to a float or bool argument (448.0 -> 448)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, tuple):
        return tuple(_valid_twin(v) for v in value)
    return value


def test_numpy_sizes_do_not_depend_on_the_cache() -> None:
    """A NumPy integer is either accepted or rejected, whatever the cache holds."""
    np = need("numpy")

    def outcome() -> Any:
        try:
            return plan_tiles(np.int64(600), 1000, SCALES)
        except TypeError:
            return TypeError

    cold = outcome()
    plan_module._plan_cached.cache_clear()
    plan_tiles(600, 1000, SCALES)
    warm = outcome()
    assert cold == warm


def test_public_names() -> None:
    """The names the design promises, once the package's __init__ exports them."""
    import dynamic_s2

    if getattr(dynamic_s2, "__file__", None) is None:
        pytest.skip("dynamic_s2/__init__.py is not written yet")
    assert dynamic_s2.plan_tiles is plan_tiles
    assert dynamic_s2.TilePlan is TilePlan
    assert dynamic_s2.ScalePlan is ScalePlan
