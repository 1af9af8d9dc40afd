"""How well do tile grids follow the image's aspect ratio, and at what cost in tiles?

Compares ``policy="aspect"`` with ``policy="nvila"`` on a fixed, realistic mix of image sizes
(photos, phone screenshots, documents, receipts, panoramas, web banners, thumbnails, squares) with
scales 448/896/1344, and reports:

- the mean |log aspect error| over all (image, scale) pairs under ``fit="stretch"``:
  ``|log((cols / rows) / (w / h))|``, 0 for a perfect fit, the same for an image and its transpose;
- the scale fidelity, the mean ``|log(tiles / k²)|`` over all (image, scale) pairs: 0 when every
  scale gets exactly its target area;
- the scale steps that repeat the previous scale's tile count (the issue-12 rule allows none);
- the mean number of tiles and of LLM tokens per image (NVILA's count: SigLIP-448, 32 × 32
  patches per tile, 2 × 2 merged, on the last scale's map), and their ratio to NVILA's;
- the mean padded fraction of the canvas over all (image, scale) pairs under ``fit="pad"``;
- the same per category of image;
- the error-versus-tiles trade-off of the aspect rule, by sweeping its three prices
  (``ASPECT_AREA_PRICE_UP`` / ``ASPECT_AREA_PRICE_DOWN`` / ``ASPECT_TILE_PRICE``);
- an exhaustive-search frontier for reference (see :func:`exhaustive_frontier` for the exact
  search space and constraint);
- the tiles and tokens that ``max_upscale`` 1.0, 1.5 and 2.0 save, for both policies.

Run from the repository root::

    python benchmarks/tiling_quality.py            # JSON, markdown table and figure
    python benchmarks/tiling_quality.py --no-plot  # without matplotlib

Writes ``benchmarks/results/tiling_quality.json`` and ``docs/img/tiling_tradeoff.png`` and prints
the markdown table used on the docs' "Tiling plans" page. Everything here is deterministic: no
timing, no randomness.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dynamic_s2.plan as plan_module  # noqa: E402
from dynamic_s2.plan import TilePlan, plan_tiles  # noqa: E402

SCALES = (448, 896, 1344)
TILE = SCALES[0]
TARGET_ERROR = 0.135  # issue 12, with zero repeated counts
TARGET_TILE_RATIO = 1.15
TARGET_PAD = 0.12
TOKENS_PER_TILE_SIDE, TOKEN_MERGE = 32, 2  # NVILA: SigLIP-448 (patch 14), 2 × 2 token merge
UPSCALES = (1.0, 1.5, 2.0)

# (h, w) of every image of the mix, by category. The list is the lead engineer's, so that numbers
# can be compared across runs; the categories are the issue's.
MIX: dict[str, list[tuple[int, int]]] = {
    "photo 4:3": [(3024, 4032), (1200, 1600), (480, 640), (4032, 3024), (1600, 1200), (640, 480)],
    "photo 3:2": [(4000, 6000), (1000, 1500), (6000, 4000), (1500, 1000)],
    "photo 16:9": [(1080, 1920), (2160, 3840), (720, 1280), (1920, 1080), (1280, 720)],
    "screenshot": [(2532, 1170), (2400, 1080), (2778, 1284), (1334, 750), (1170, 2532)],
    "document": [(3508, 2480), (1754, 1240), (3300, 2550), (1650, 1275), (2480, 3508)],
    "receipt": [(1800, 600), (2000, 576), (3200, 800), (1792, 512)],
    "panorama": [(1500, 4000), (2000, 6000), (2000, 8000), (2000, 10000), (1000, 3000)],
    "banner": [(90, 728), (120, 970), (200, 1600)],
    "thumbnail": [(64, 64), (72, 96), (60, 80), (64, 48), (56, 100), (32, 32)],
    "square": [(512, 512), (1024, 1024)],
}
SIZES: list[tuple[int, int]] = [hw for sizes in MIX.values() for hw in sizes]
CATEGORY = {hw: name for name, sizes in MIX.items() for hw in sizes}

# The sweep of the aspect rule's three prices (the trade-off curve).
SWEEP_UP = [0.0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.5]
SWEEP_DOWN = [0.1, 0.2, 0.35, 0.5, 0.8, 1.2]
SWEEP_TILE = [0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.06, 0.1]


def log_aspect_error(h: int, w: int, grid: tuple[int, int]) -> float:
    """``|log((cols / rows) / (w / h))|`` of one grid."""
    rows, cols = grid
    return abs(math.log((cols * h) / (rows * w)))


def plans_for(policy: str, fit: str, max_upscale: float | None = None) -> list[TilePlan]:
    return [
        plan_tiles(h, w, SCALES, policy=policy, fit=fit, max_upscale=max_upscale)  # type: ignore[arg-type]
        for h, w in SIZES
    ]


def repeated_grids(plans: Iterable[TilePlan]) -> int:
    """Scales whose grid equals the previous scale's: identical canvases, so identical tiles."""
    return sum(a.grid == b.grid for plan in plans for a, b in pairwise(plan.scales))


def repeated_counts(plans: Iterable[TilePlan]) -> int:
    """Scales whose tile count equals the previous scale's."""
    return sum(a.num_tiles == b.num_tiles for plan in plans for a, b in pairwise(plan.scales))


def scale_fidelity(plans: Sequence[TilePlan]) -> float:
    """Mean ``|log(tiles / k²)|`` over all (image, scale) pairs."""
    values = [
        abs(math.log(sp.num_tiles / (sp.scale / plan.tile_size) ** 2))
        for plan in plans
        for sp in plan.scales
    ]
    return sum(values) / len(values)


def llm_tokens(plan: TilePlan) -> int:
    """NVILA's visual tokens of a plan: the last scale's valid feature map, 2 × 2 merged."""
    fh, fw = plan.feature_size(-1, TOKENS_PER_TILE_SIDE)
    return -(-fh // TOKEN_MERGE) * -(-fw // TOKEN_MERGE)


def summarise(
    stretch: Sequence[TilePlan], pad: Sequence[TilePlan], sizes: Sequence[tuple[int, int]]
) -> dict[str, Any]:
    """Mean error (stretch), tiles per image (stretch and pad) and padded fraction (pad)."""
    errors = [
        log_aspect_error(h, w, sp.grid)
        for (h, w), plan in zip(sizes, stretch, strict=True)
        for sp in plan.scales
    ]
    per_scale = [
        sum(
            log_aspect_error(h, w, plan.scales[i].grid)
            for (h, w), plan in zip(sizes, stretch, strict=True)
        )
        / len(sizes)
        for i in range(len(SCALES))
    ]
    pads = [sp.padded_fraction for plan in pad for sp in plan.scales]
    return {
        "repeated_grids": repeated_grids(stretch),
        "repeated_grids_pad": repeated_grids(pad),
        "repeated_counts": repeated_counts(stretch),
        "repeated_counts_pad": repeated_counts(pad),
        "scale_fidelity": scale_fidelity(stretch),
        "mean_tokens": sum(llm_tokens(p) for p in stretch) / len(stretch),
        "images": len(sizes),
        "mean_log_aspect_error": sum(errors) / len(errors),
        "mean_log_aspect_error_per_scale": per_scale,
        "max_log_aspect_error": max(errors),
        "mean_tiles": sum(p.num_tiles for p in stretch) / len(stretch),
        "mean_tiles_per_scale": [
            sum(p.scales[i].num_tiles for p in stretch) / len(stretch) for i in range(len(SCALES))
        ],
        "mean_tiles_pad": sum(p.num_tiles for p in pad) / len(pad),
        "mean_padded_fraction": sum(pads) / len(pads),
        "max_padded_fraction": max(pads),
    }


def evaluate(policy: str) -> dict[str, Any]:
    stretch, pad = plans_for(policy, "stretch"), plans_for(policy, "pad")
    out = summarise(stretch, pad, SIZES)
    out["categories"] = {}
    for name, sizes in MIX.items():
        idx = [SIZES.index(hw) for hw in sizes]
        out["categories"][name] = summarise([stretch[i] for i in idx], [pad[i] for i in idx], sizes)
    out["grids"] = {
        f"{w}x{h}": {"stretch": [list(g) for g in s.grids], "pad": [list(g) for g in p.grids]}
        for (h, w), s, p in zip(SIZES, stretch, pad, strict=True)
    }
    return out


def min_area_fraction(plans: Iterable[TilePlan]) -> float:
    """Smallest ``tiles / k²`` over all plans and scales (below 0.5: a scale lost half its area)."""
    return min(sp.num_tiles / (sp.scale / TILE) ** 2 for plan in plans for sp in plan.scales)


def with_prices(up: float, down: float, tile: float) -> dict[str, float]:
    """Error, tiles, padded fraction, repeats and smallest area fraction of the aspect rule with
    other prices (set on the module, cache cleared, restored afterwards)."""
    names = ("ASPECT_AREA_PRICE_UP", "ASPECT_AREA_PRICE_DOWN", "ASPECT_TILE_PRICE")
    old = tuple(getattr(plan_module, n) for n in names)
    for n, v in zip(names, (up, down, tile), strict=True):
        setattr(plan_module, n, v)
    plan_module._plan_cached.cache_clear()
    try:
        stretch, pad = plans_for("aspect", "stretch"), plans_for("aspect", "pad")
    finally:
        for n, v in zip(names, old, strict=True):
            setattr(plan_module, n, v)
        plan_module._plan_cached.cache_clear()
    s = summarise(stretch, pad, SIZES)
    return {
        "repeated_counts": s["repeated_counts"],
        "error": s["mean_log_aspect_error"],
        "tiles": s["mean_tiles"],
        "scale_fidelity": s["scale_fidelity"],
        "padded_fraction": s["mean_padded_fraction"],
        "min_area_fraction": min(min_area_fraction(stretch), min_area_fraction(pad)),
    }


def upscale_savings(nvila_tiles: float) -> dict[str, Any]:
    """Tiles and tokens per image with ``max_upscale`` 1.0 / 1.5 / 2.0, against none."""
    out: dict[str, Any] = {}
    for policy in ("aspect", "nvila"):
        free = plans_for(policy, "stretch")
        tiles0 = sum(p.num_tiles for p in free) / len(free)
        tokens0 = sum(llm_tokens(p) for p in free) / len(free)
        rows = []
        for u in UPSCALES:
            capped = plans_for(policy, "stretch", u)
            tiles = sum(p.num_tiles for p in capped) / len(capped)
            tokens = sum(llm_tokens(p) for p in capped) / len(capped)
            errors = [
                log_aspect_error(h, w, sp.grid)
                for (h, w), p in zip(SIZES, capped, strict=True)
                for sp in p.scales
            ]
            rows.append(
                {
                    "max_upscale": u,
                    "tiles": tiles,
                    "tokens": tokens,
                    "tiles_saved": 1.0 - tiles / tiles0,
                    "tokens_saved": 1.0 - tokens / tokens0,
                    "images_changed": sum(
                        a.grids != b.grids for a, b in zip(capped, free, strict=True)
                    ),
                    "error": sum(errors) / len(errors),
                    "tile_ratio": tiles / nvila_tiles,
                }
            )
        out[policy] = {"tiles": tiles0, "tokens": tokens0, "rows": rows}
    return out


def pareto(points: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points not beaten on both error and tiles, by ascending tiles."""
    front: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda p: (p["tile_ratio"], p["error"])):
        if not front or p["error"] < front[-1]["error"] - 1e-12:
            front.append(p)
    return front


def exhaustive_frontier(nvila_tiles: float, strict: bool = False) -> dict[str, Any]:
    """Lower convex hull of (mean error, mean tiles) over every admissible choice of grids.

    Search space, per image: at each scale ``s`` with ``k = s / 448`` any grid ``rows × cols`` with
    ``ceil(k² / 2) ≤ rows·cols ≤ 3k²`` (so 1–3, 2–12 and 5–27 tiles at 448, 896 and 1344), and tile
    counts non-decreasing across scales. The lower bound keeps every scale a real scale (at least
    half of its target area); without it the search would rather give the middle scale a single
    tile. For each λ of a log-spaced sweep, a dynamic program over the scales minimises, per image,
    ``Σ_scales |log aspect error| + λ · tiles``; images are independent, so the minimiser of the
    sum over the mix is the per-image minimisers together. Every λ gives one point of the lower
    convex hull of the achievable (error, tiles) set, which lower-bounds any deterministic rule
    with these constraints; points between hull vertices are interpolated linearly.

    With ``strict=True`` tile counts must strictly increase, which forbids giving two scales the
    same grid (two scales with the same grid have identical canvases, hence identical tiles).
    """
    per_scale_options = []
    for s in SCALES:
        k2 = (s / TILE) ** 2
        lo, hi = math.ceil(k2 / 2), math.floor(3 * k2)
        per_scale_options.append((lo, hi))

    def best_by_count(h: int, w: int, lo: int, hi: int) -> dict[int, float]:
        best: dict[int, float] = {}
        for rows in range(1, hi + 1):
            for cols in range(1, hi // rows + 1):
                n = rows * cols
                if n >= lo:
                    e = log_aspect_error(h, w, (rows, cols))
                    if e < best.get(n, math.inf):
                        best[n] = e
        return best

    tables = [[best_by_count(h, w, lo, hi) for lo, hi in per_scale_options] for h, w in SIZES]

    def solve(table: list[dict[int, float]], lam: float) -> tuple[float, int]:
        # state: tile count of the previous scale -> (cost, error, tiles)
        states: dict[int, tuple[float, float, int]] = {0: (0.0, 0.0, 0)}
        for options in table:
            nxt: dict[int, tuple[float, float, int]] = {}
            for n, e in options.items():
                cands = [v for p, v in states.items() if p < n or (p == n and not strict)]
                if not cands:
                    continue
                c, err, tiles = min(cands)
                nxt[n] = (c + e + lam * n, err + e, tiles + n)
            states = nxt
        _, err, tiles = min(states.values())
        return err, tiles

    n_pairs = len(SIZES) * len(SCALES)
    hull = []
    for i in range(161):
        lam = 10 ** (-4 + 4 * i / 160)  # 1e-4 .. 1
        err = tiles = 0.0
        for table in tables:
            e, t = solve(table, lam)
            err += e
            tiles += t
        hull.append(
            {
                "lambda": lam,
                "error": err / n_pairs,
                "tiles": tiles / len(SIZES),
                "tile_ratio": tiles / len(SIZES) / nvila_tiles,
            }
        )
    hull = pareto(hull)
    order = "strictly increasing" if strict else "non-decreasing"
    return {
        "constraint": f"per scale ceil(k^2/2) <= rows*cols <= floor(3k^2), counts {order} "
        "across scales; Lagrangian sweep of sum(|log aspect error|) + lambda * tiles",
        "points": hull,
        "error_at_target_ratio": interpolate(hull, TARGET_TILE_RATIO),
    }


def interpolate(front: Sequence[dict[str, Any]], ratio: float) -> float | None:
    """Error of a frontier at a tile ratio, interpolating linearly between its points."""
    for a, b in pairwise(front):
        if a["tile_ratio"] <= ratio <= b["tile_ratio"]:
            if b["tile_ratio"] == a["tile_ratio"]:
                return min(a["error"], b["error"])
            f = (ratio - a["tile_ratio"]) / (b["tile_ratio"] - a["tile_ratio"])
            return a["error"] + f * (b["error"] - a["error"])
    below = [p for p in front if p["tile_ratio"] <= ratio]
    return min(p["error"] for p in below) if below else None


def for_json(results: dict[str, Any]) -> dict[str, Any]:
    """The results with the sweep's points as one compact row each (columns named once)."""
    out = dict(results)
    sweep = dict(results["sweep"])
    columns = list(sweep["points"][0])
    sweep["points"] = {
        "columns": columns,
        "rows": [[p[c] for c in columns] for p in sweep["points"]],
    }
    out["sweep"] = sweep
    return out


def rounded(value: Any) -> Any:
    """Floats rounded to 6 decimals, for a JSON file of reasonable size."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def markdown(results: dict[str, Any]) -> str:
    a, n = results["aspect"], results["nvila"]
    steps = a["images"] * (len(SCALES) - 1)
    lines = [
        f"Mix of {a['images']} images, scales {'/'.join(map(str, SCALES))}, default budgets "
        f"(aspect: at most 3k² tiles per scale; NVILA: max_tiles 12). Tokens: NVILA's LLM "
        f"tokens ({TOKENS_PER_TILE_SIDE}² per tile, {TOKEN_MERGE}×{TOKEN_MERGE} merged, last "
        "scale).",
        "",
        "| | NVILA | aspect | target |",
        "|---|---|---|---|",
        f"| mean \\|log aspect error\\| (all scales) | {n['mean_log_aspect_error']:.3f} | "
        f"{a['mean_log_aspect_error']:.3f} | ≤ {TARGET_ERROR} |",
        "| … at 448 / 896 / 1344 | "
        + " / ".join(f"{x:.3f}" for x in n["mean_log_aspect_error_per_scale"])
        + " | "
        + " / ".join(f"{x:.3f}" for x in a["mean_log_aspect_error_per_scale"])
        + " | |",
        f"| scale fidelity, mean \\|log(tiles / k²)\\| | {n['scale_fidelity']:.3f} | "
        f"{a['scale_fidelity']:.3f} | |",
        f"| scale steps repeating the previous tile count (of {steps}) | "
        f"{n['repeated_counts']} | {a['repeated_counts']} | 0 |",
        f"| mean tiles per image | {n['mean_tiles']:.2f} | {a['mean_tiles']:.2f} | |",
        f"| tiles relative to NVILA | 1.000 | {results['tile_ratio']:.3f} | "
        f"≤ {TARGET_TILE_RATIO:.2f} |",
        f"| mean LLM tokens per image | {n['mean_tokens']:.0f} | {a['mean_tokens']:.0f} | |",
        f"| tokens relative to NVILA | 1.000 | {a['mean_tokens'] / n['mean_tokens']:.3f} | |",
        f'| mean padded fraction, `fit="pad"` | {n["mean_padded_fraction"]:.3f} | '
        f"{a['mean_padded_fraction']:.3f} | ≤ {TARGET_PAD} |",
        f'| mean tiles per image, `fit="pad"` | {n["mean_tiles_pad"]:.2f} | '
        f"{a['mean_tiles_pad']:.2f} | |",
        f'| scale steps repeating the previous tile count, `fit="pad"` | '
        f"{n['repeated_counts_pad']} | {a['repeated_counts_pad']} | 0 |",
        "",
        "| category | images | error NVILA | error aspect | tiles NVILA | tiles aspect "
        "| padded NVILA | padded aspect |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in MIX:
        cn, ca = n["categories"][name], a["categories"][name]
        lines.append(
            f"| {name} | {ca['images']} | {cn['mean_log_aspect_error']:.3f} | "
            f"{ca['mean_log_aspect_error']:.3f} | {cn['mean_tiles']:.1f} | {ca['mean_tiles']:.1f} "
            f"| {cn['mean_padded_fraction']:.3f} | {ca['mean_padded_fraction']:.3f} |"
        )
    ex, exs, sw = results["exhaustive"], results["exhaustive_strict"], results["sweep"]
    best = sw["best_within_target"]
    own = interpolate(exs["points"], results["tile_ratio"]) or math.nan
    lines += [
        "",
        f"Exhaustive search at {TARGET_TILE_RATIO:.2f}× NVILA's tiles (every scale ≥ k²/2 and "
        f"≤ 3k² tiles): error {ex['error_at_target_ratio']:.3f} with non-decreasing counts, "
        f"{exs['error_at_target_ratio']:.3f} with strictly increasing counts; at the aspect "
        f"rule's own {results['tile_ratio']:.3f}×, {own:.3f} with strictly increasing counts.",
        "",
        f"Best swept (up, down, tile) prices within {TARGET_TILE_RATIO:.2f}× (every scale ≥ k²/2 "
        "tiles): "
        + (
            f"error {best['error']:.3f} at {best['tile_ratio']:.3f}×, padded "
            f"{best['padded_fraction']:.3f}, {best['repeated_counts']} repeated counts "
            f"(up {best['up']}, down {best['down']}, tile {best['tile']})."
            if best
            else "none."
        ),
        "",
        "| policy | max_upscale | tiles / image | tokens / image | tiles saved | tokens saved "
        "| images changed | mean error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for policy, up in results["max_upscale"].items():
        err0 = results[policy]["mean_log_aspect_error"]
        lines.append(
            f"| {policy} | none | {up['tiles']:.2f} | {up['tokens']:.0f} | | | | {err0:.3f} |"
        )
        for r in up["rows"]:
            lines.append(
                f"| {policy} | {r['max_upscale']} | {r['tiles']:.2f} | {r['tokens']:.0f} | "
                f"{r['tiles_saved']:.1%} | {r['tokens_saved']:.1%} | {r['images_changed']} "
                f"of {a['images']} | {r['error']:.3f} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw, ex = results["sweep"], results["exhaustive"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=130)
    ax.add_patch(
        plt.Rectangle(
            (0.0, 0.0), TARGET_TILE_RATIO, TARGET_ERROR, color="tab:green", alpha=0.08, lw=0
        )
    )
    ok = [p for p in sw["points"] if p["floor_ok"] and not p["repeated_counts"]]
    bad = [p for p in sw["points"] if not p["floor_ok"] or p["repeated_counts"]]
    ax.scatter(
        [p["tile_ratio"] for p in ok],
        [p["error"] for p in ok],
        s=6,
        color="0.6",
        label="aspect rule, swept (up, down, tile) prices",
    )
    ax.scatter(
        [p["tile_ratio"] for p in bad],
        [p["error"] for p in bad],
        s=6,
        marker="x",
        lw=0.6,
        color="0.8",
        label="… repeating counts or giving a scale < k²/2 tiles (excluded)",
    )
    front = sw["pareto"]
    ax.plot(
        [p["tile_ratio"] for p in front],
        [p["error"] for p in front],
        "o-",
        ms=3,
        color="tab:blue",
        lw=1.2,
        label="aspect rule, best prices (Pareto front)",
    )
    ax.plot(
        [p["tile_ratio"] for p in ex["points"]],
        [p["error"] for p in ex["points"]],
        "--",
        color="tab:red",
        lw=1.2,
        label="exhaustive search, counts non-decreasing",
    )
    exs = results["exhaustive_strict"]
    ax.plot(
        [p["tile_ratio"] for p in exs["points"]],
        [p["error"] for p in exs["points"]],
        ":",
        color="tab:red",
        lw=1.2,
        label="exhaustive search, counts strictly increasing",
    )
    cur = results["aspect"]
    ax.plot(
        results["tile_ratio"],
        cur["mean_log_aspect_error"],
        "*",
        ms=13,
        color="tab:blue",
        mec="k",
        label=f"aspect, default prices (up {results['prices']['up']}, "
        f"down {results['prices']['down']}, tile {results['prices']['tile']})",
    )
    ax.plot(
        1.0,
        results["nvila"]["mean_log_aspect_error"],
        "s",
        ms=8,
        color="tab:orange",
        mec="k",
        label="NVILA",
    )
    ax.axvline(TARGET_TILE_RATIO, color="tab:green", lw=0.8, ls=":")
    ax.axhline(TARGET_ERROR, color="tab:green", lw=0.8, ls=":")
    ax.set_xlim(0.5, 1.7)
    ax.set_ylim(0.0, max(0.55, results["nvila"]["mean_log_aspect_error"] + 0.05))
    ax.set_xlabel("mean tiles per image, relative to NVILA")
    ax.set_ylabel("mean |log aspect error| over all scales")
    ax.set_title("Aspect error versus tiles, scales 448/896/1344 (green: target region)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks/results/tiling_quality.json"
    )
    parser.add_argument("--figure", type=Path, default=ROOT / "docs/img/tiling_tradeoff.png")
    parser.add_argument("--no-plot", action="store_true", help="skip the matplotlib figure")
    args = parser.parse_args(argv)

    plan_module._plan_cached.cache_clear()
    results: dict[str, Any] = {
        "scales": list(SCALES),
        "sizes_hw": [list(hw) for hw in SIZES],
        "categories": {name: [list(hw) for hw in sizes] for name, sizes in MIX.items()},
        "prices": {
            "up": plan_module.ASPECT_AREA_PRICE_UP,
            "down": plan_module.ASPECT_AREA_PRICE_DOWN,
            "tile": plan_module.ASPECT_TILE_PRICE,
        },
        "nvila": evaluate("nvila"),
        "aspect": evaluate("aspect"),
    }
    nvila_tiles = results["nvila"]["mean_tiles"]
    results["tile_ratio"] = results["aspect"]["mean_tiles"] / nvila_tiles
    results["targets"] = {
        "mean_log_aspect_error": TARGET_ERROR,
        "tile_ratio": TARGET_TILE_RATIO,
        "mean_padded_fraction": TARGET_PAD,
        "error_met": results["aspect"]["mean_log_aspect_error"] <= TARGET_ERROR,
        "repeats_met": results["aspect"]["repeated_counts"] == 0,
        "tiles_met": results["tile_ratio"] <= TARGET_TILE_RATIO,
        "pad_met": results["aspect"]["mean_padded_fraction"] <= TARGET_PAD,
    }

    points = []
    for up in SWEEP_UP:
        for down in SWEEP_DOWN:
            for tile in SWEEP_TILE:
                m = with_prices(up, down, tile)
                m["tile_ratio"] = m["tiles"] / nvila_tiles
                # the exhaustive search's floor: every scale keeps at least half of its k² tiles
                m["floor_ok"] = m["min_area_fraction"] >= 0.5
                points.append({"up": up, "down": down, "tile": tile, **m})
    admissible = [p for p in points if p["floor_ok"] and not p["repeated_counts"]]
    within = [p for p in admissible if p["tile_ratio"] <= TARGET_TILE_RATIO]
    results["sweep"] = {
        "up": SWEEP_UP,
        "down": SWEEP_DOWN,
        "tile": SWEEP_TILE,
        "note": "best_within_target, meeting_both_targets and pareto only count price triples "
        "whose plans give every scale of every image at least half of its k^2 tiles (floor_ok, "
        "the constraint of the exhaustive search) and repeat no tile count",
        "points": points,
        "pareto": pareto(admissible),
        "best_within_target": min(within, key=lambda p: (p["error"], p["tile_ratio"]))
        if within
        else None,
        "meeting_both_targets": [p for p in within if p["error"] <= TARGET_ERROR],
    }
    results["max_upscale"] = upscale_savings(nvila_tiles)
    results["exhaustive"] = exhaustive_frontier(nvila_tiles)
    results["exhaustive_strict"] = exhaustive_frontier(nvila_tiles, strict=True)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(rounded(for_json(results)), indent=1)
    # lists of numbers on one line each
    text = re.sub(r"\[[^\[\]{}]*\]", lambda m: re.sub(r"\s+", " ", m.group(0)), text)
    args.json.write_text(text + "\n")
    print(markdown(results))
    if not args.no_plot:
        plot(results, args.figure)
        print(f"\nwrote {args.json.relative_to(ROOT)} and {args.figure.relative_to(ROOT)}")
    return results


if __name__ == "__main__":
    main()
