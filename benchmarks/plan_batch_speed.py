"""How long does ``plan_batch`` take for 256 images, and how well does it spend a tile budget?

A batch of 256 image sizes (the sizes of ``benchmarks/tiling_quality.py``'s mix, then seeded
random sizes from 32 px to 6000 px per side), scales 448/896/1344, budgets of 100%, 75% and 50%
of the tiles the per-image plans would use. Timed, CPU time of this process, medians over rounds
of interleaved loops (see ``benchmarks/plan_speed.py``):

- **baseline**: ``[plan_tiles(h, w, scales) for ...]`` on cached sizes: what a collate function
  does today, per image;
- **warm**: ``plan_batch`` with its per-size ladders already cached (sizes seen before, e.g. from
  the second epoch on);
- **cold**: ``plan_batch`` after clearing every planning cache (all 256 sizes new), against
  ``plan_tiles`` with a cleared cache.

Quality, at each budget: tiles used, and the batch's total cost (``dynamic_s2.budget.plan_cost``,
the planner's misfit plus area price) against the simplest alternative, one ``max_tiles`` for the
whole batch (the largest that fits the budget).

Run from the repository root::

    python benchmarks/plan_batch_speed.py [--rounds 15]

Writes ``benchmarks/results/plan_batch_speed.json`` and ``benchmarks/results/plan_batch_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from plan_speed import machine  # noqa: E402
from tiling_quality import SIZES as MIX_SIZES  # noqa: E402

import dynamic_s2.budget as budget_module  # noqa: E402
import dynamic_s2.plan as plan_module  # noqa: E402
from dynamic_s2 import plan_batch, plan_tiles  # noqa: E402

SCALES = (448, 896, 1344)
BATCH = 256
FRACTIONS = (1.0, 0.75, 0.5)


def batch_sizes(n: int = BATCH, seed: int = 12) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = list(MIX_SIZES)
    while len(sizes) < n:
        sizes.append((rng.randint(32, 6000), rng.randint(32, 6000)))
    return sizes[:n]


def clear() -> None:
    plan_module._plan_cached.cache_clear()
    budget_module._ladder.cache_clear()


def cpu_ms(fn: Callable[[], object], rounds: int, before: Callable[[], None] | None) -> list[float]:
    out = []
    for _ in range(rounds):
        if before is not None:
            before()
        start = time.process_time()
        fn()
        out.append((time.process_time() - start) * 1e3)
    return out


def uniform_cap(sizes: Sequence[tuple[int, int]], budget: int) -> list[Any]:
    """Plans with one ``max_tiles`` for the whole batch: the largest whose total fits."""
    best = [plan_tiles(h, w, SCALES, max_tiles=(1, 1, 1)) for h, w in sizes]
    for m in range(1, 28):
        plans = [plan_tiles(h, w, SCALES, max_tiles=m) for h, w in sizes]
        if sum(p.num_tiles for p in plans) <= budget:
            best = plans
    return best


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    sizes = batch_sizes()
    free = [plan_tiles(h, w, SCALES) for h, w in sizes]
    total = sum(p.num_tiles for p in free)
    rows = []
    for fraction in FRACTIONS:
        budget = int(total * fraction)
        loops: dict[str, tuple[Callable[[], object], Callable[[], None] | None]] = {
            "baseline": (lambda: [plan_tiles(h, w, SCALES) for h, w in sizes], None),
            "warm": (lambda b=budget: plan_batch(sizes, SCALES, tile_budget=b), None),
            "baseline_cold": (lambda: [plan_tiles(h, w, SCALES) for h, w in sizes], clear),
            "cold": (lambda b=budget: plan_batch(sizes, SCALES, tile_budget=b), clear),
        }
        plan_batch(sizes, SCALES, tile_budget=budget)  # fill the caches for "warm"
        times: dict[str, list[float]] = {k: [] for k in loops}
        for _ in range(args.rounds):  # interleaved: one of each per round
            for name, (fn, before) in loops.items():
                times[name] += cpu_ms(fn, 1, before)
            plan_batch(sizes, SCALES, tile_budget=budget)  # refill after a cold round
        med = {k: statistics.median(v) for k, v in times.items()}
        plans = plan_batch(sizes, SCALES, tile_budget=budget)
        uniform = uniform_cap(sizes, budget)
        cost = sum(budget_module.plan_cost(p) for p in plans)
        rows.append(
            {
                "budget_fraction": fraction,
                "tile_budget": budget,
                "ms": med,
                "warm_over_baseline": med["warm"] / med["baseline"],
                "cold_over_baseline_cold": med["cold"] / med["baseline_cold"],
                "tiles_used": sum(p.num_tiles for p in plans),
                "cost": cost,
                "uniform_max_tiles_tiles": sum(p.num_tiles for p in uniform),
                "uniform_max_tiles_cost": sum(budget_module.plan_cost(p) for p in uniform),
                "free_cost": sum(budget_module.plan_cost(p) for p in free),
            }
        )
    result = {"machine": machine(), "images": BATCH, "free_tiles": total, "rows": rows}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_batch_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"{BATCH} images, scales 448/896/1344, {total} tiles unconstrained; CPU ms, median of "
        f"{args.rounds} rounds; {result['machine'].get('cpu', '')}.",
        "",
        "| budget | plan_batch warm | per-image plan_tiles (cached) | ratio | plan_batch cold "
        "| plan_tiles cold | ratio | tiles used | cost | cost, one max_tiles for all (tiles) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['tile_budget']} ({r['budget_fraction']:.0%}) | {ms['warm']:.2f} | "
            f"{ms['baseline']:.2f} | {r['warm_over_baseline']:.1f}× | {ms['cold']:.0f} | "
            f"{ms['baseline_cold']:.0f} | {r['cold_over_baseline_cold']:.1f}× | {r['tiles_used']} "
            f"| {r['cost']:.1f} | {r['uniform_max_tiles_cost']:.1f} "
            f"({r['uniform_max_tiles_tiles']}) |"
        )
    text = "\n".join(lines)
    (out / "plan_batch_speed.md").write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
