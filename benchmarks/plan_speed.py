"""How long does planning take, uncached and cached, relative to building plain tuples?

For both policies and both fits, over many random image sizes (1 px to 10⁴ px per side) with
scales 448/896/1344:

- **uncached**: ``dynamic_s2.plan._plan_uncached`` (what ``plan_tiles`` runs on a cache miss: the
  validation, the grid search and the ``TilePlan`` construction);
- **cached**: ``plan_tiles`` on sizes already in its ``lru_cache``;
- **baseline**: building one plain tuple per size, ``(h, w, scales, policy, fit)``, in the same
  loop, the same run.

Times are CPU time of this process (``time.process_time``), not wall time: on a shared machine a
loop that is preempted by other processes would otherwise look several times slower than it is.
Every figure is the median over rounds of the mean time per call in a round (each round runs every
size once through each of the three loops, interleaved), so timer overhead and a busy machine's
outliers do not dominate; ratios are medians of the per-round ratios. The minimum over rounds is
reported too: on a shared machine it is the round least disturbed by other processes. Ratios to the
baseline are what to compare across machines; the µs are for this machine only.

Run from the repository root::

    python benchmarks/plan_speed.py [--sizes 2000] [--rounds 15]

Writes ``benchmarks/results/plan_speed.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dynamic_s2.plan as plan_module  # noqa: E402
from dynamic_s2.plan import plan_tiles  # noqa: E402

SCALES = (448, 896, 1344)
TARGET_UNCACHED_US = 50.0


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def interleaved(
    loops: dict[str, Callable[[], None]], calls: int, rounds: int
) -> dict[str, list[float]]:
    """µs per call of every loop, one run of each per round, interleaved within the round, so a
    machine that slows down for a while slows all of them down alike."""
    for loop in loops.values():
        loop()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            start = time.process_time()
            loop()
            times[name].append((time.process_time() - start) / calls * 1e6)
    return times


def bench(policy: str, fit: str, sizes: Sequence[tuple[int, int]], rounds: int) -> dict[str, Any]:
    uncached = plan_module._plan_uncached
    n = len(sizes)

    def baseline() -> None:
        for h, w in sizes:
            (h, w, SCALES, policy, fit)  # noqa: B018 - building the tuple is the point

    def run_uncached() -> None:
        for h, w in sizes:
            uncached(h, w, SCALES, None, None, policy, fit)

    def run_cached() -> None:
        for h, w in sizes:
            plan_tiles(h, w, SCALES, policy=policy, fit=fit)  # type: ignore[arg-type]

    plan_module._plan_cached.cache_clear()
    run_cached()  # fill the cache (it holds 65,536 plans, more than the sizes here)
    info = plan_module._plan_cached.cache_info()
    if info.currsize < n:
        raise RuntimeError(f"cache holds {info.currsize} plans, fewer than the {n} sizes")
    t = interleaved(
        {"baseline": baseline, "uncached": run_uncached, "cached": run_cached}, n, rounds
    )
    med = statistics.median

    def ratio(a: str, b: str) -> float:
        return med(x / y for x, y in zip(t[a], t[b], strict=True))

    return {
        "policy": policy,
        "fit": fit,
        "baseline_tuple_us": med(t["baseline"]),
        "uncached_us": med(t["uncached"]),
        "uncached_us_min": min(t["uncached"]),
        "cached_us": med(t["cached"]),
        "cached_us_min": min(t["cached"]),
        "baseline_tuple_us_min": min(t["baseline"]),
        "uncached_over_baseline": ratio("uncached", "baseline"),
        "cached_over_baseline": ratio("cached", "baseline"),
        "uncached_over_cached": ratio("uncached", "cached"),
        "uncached_target_us": TARGET_UNCACHED_US,
        "uncached_target_met": med(t["uncached"]) <= TARGET_UNCACHED_US,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, default=2000, help="random image sizes per round")
    parser.add_argument("--rounds", type=int, default=25, help="timed rounds per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/plan_speed.json")
    args = parser.parse_args(argv)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    rng = random.Random(args.seed)
    # Sides log-uniform in [1, 10⁴]: thumbnails, photos and extreme ratios all appear.
    sizes = [
        (round(10 ** rng.uniform(0, 4)), round(10 ** rng.uniform(0, 4))) for _ in range(args.sizes)
    ]
    sizes = list(dict.fromkeys(sizes))  # distinct, so every uncached call is a real miss
    rows = [
        bench(policy, fit, sizes, args.rounds)
        for policy in ("aspect", "nvila")
        for fit in ("stretch", "pad")
    ]
    results = {
        "machine": {**machine(), "load_average_at_start": load},
        "scales": list(SCALES),
        "sizes": len(sizes),
        "rounds": args.rounds,
        "seed": args.seed,
        "method": "CPU time (time.process_time); median over rounds of the mean time per call; "
        "every round runs every size once through the baseline, uncached and cached loops, "
        "interleaved; ratios are medians of the per-round ratios",
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")

    m = results["machine"]
    print(
        f"{len(sizes)} random sizes, {args.rounds} rounds, scales 448/896/1344; "
        f"{m['cpu']} ({m['logical_cpus']} logical CPUs), Python {m['python']}\n"
    )
    print(
        "| policy | fit | uncached µs (min) | cached µs | tuple µs | uncached / tuple "
        "| cached / tuple | uncached / cached |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['policy']} | {r['fit']} | {r['uncached_us']:.1f} ({r['uncached_us_min']:.1f}) "
            f"| {r['cached_us']:.2f} "
            f"| {r['baseline_tuple_us']:.3f} | {r['uncached_over_baseline']:.0f}× "
            f"| {r['cached_over_baseline']:.1f}× | {r['uncached_over_cached']:.0f}× |"
        )
    print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
