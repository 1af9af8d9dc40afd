"""Features → LLM tokens: the fused ``nvila.merge_and_pack`` against VILA's path, side by side.

Setting: SigLIP-so400m width (32×32 = 1024 tokens per tile, C = 1152), scales (448, 896, 1344),
``policy="nvila"`` (at most 12 tiles at the last scale), 6 mixed images by default.

Baseline, VILA's path re-implemented here: the per-image loop of ``merge_features_for_dynamic_s2``
(``merge_speed.nvila_loop_merge``: stitch each scale's tiles with ``torch.cat``,
``F.interpolate(mode="area")`` in float32, ``torch.cat`` on channels), then per image
``DownSampleBlock``'s ``flat_square`` on the ``[1, H, W, C]`` map (zero rows / columns appended
by concatenation, ``view``/``permute``/``contiguous`` twice).

Candidates, timed in the same rounds with alternating order: the two-pass path
(``merge_features`` + ``pack_tokens_batch``), ``merge_and_pack`` into fresh memory, and
``merge_and_pack(..., out=buffer)`` into a buffer reused across rounds. Cases: contiguous features
and HF's channel-major layout (strides ``(N·C, 1, N)``), float32 and bfloat16.

Beside the ratios: bytes each path allocates (≈ writes; torch.profiler with memory), its op
count, and the memory-bandwidth bound measured in the same rounds (a copy of the output's size into
a warm buffer, and a clone into fresh memory), with the fraction of it each fused path reaches
(issue 21: ≥ 0.6 fresh, first touch counted; ≥ 0.7 with ``out=``).

Run: ``python benchmarks/tokens_speed.py [--quick] [--images 6] [--repeats 2] [--threads N]``;
writes ``benchmarks/results/tokens_speed.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from einops import rearrange

import dynamic_s2
from dynamic_s2 import nvila

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    IMAGE_SIZES,
    fmt_ms,
    interleaved,
    machine_info,
    machine_line,
    markdown_table,
    median,
    paired_ratio,
    report,
)
from merge_speed import CHANNELS, MAX_TILES, SCALES, TOKENS_PER_SIDE, nvila_loop_merge

#: Targets of issues 15 and 21 (VILA path / candidate), per case and candidate.
TARGETS = {
    ("contiguous", "float32", "fresh"): 10.0,
    ("contiguous", "float32", "out"): 25.0,
    ("channel-major", "float32", "out"): 12.0,
    ("contiguous", "bfloat16", "out"): 15.0,
}
#: Fraction of the memory bound (issue 21): fresh output (first touch counted), reused ``out=``.
FRACTION_TARGETS = {"fresh": 0.6, "out": 0.7}
CASES = (
    ("contiguous", torch.float32),
    ("channel-major", torch.float32),
    ("contiguous", torch.bfloat16),
    ("channel-major", torch.bfloat16),
)


def flat_square(x: torch.Tensor) -> torch.Tensor:
    """VILA's ``DownSampleBlock.flat_square`` on ``[n, w, h, c]`` (VILA's names for the axes)."""
    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.concat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1).contiguous()
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.concat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2).contiguous()
        n, w, h, c = x.size()
    x = x.contiguous()
    x = x.view(n, w, int(h / 2), int(c * 2))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h / 2), int(w / 2), int(c * 4))
    return x.permute(0, 2, 1, 3).contiguous()


def vila_tokens(
    features: torch.Tensor, grids: list[tuple[int, int]], scales: Sequence[int] = SCALES
) -> list[torch.Tensor]:
    """VILA's path: loop merge, then ``DownSampleBlock`` per image: ``[n_b, 4·S·C]`` each."""
    merged = nvila_loop_merge(features, grids, scales)
    return [flat_square(rearrange(m, "1 c h w -> 1 h w c")).flatten(0, 2) for m in merged]


def count_ops_and_bytes(fn: Callable[[], object]) -> dict[str, float]:
    """Top-level aten ops of one call and the bytes their outputs allocated (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    top = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
    return {"ops": len(top), "allocated_GB": allocated / 1e9}


def measure_case(
    features: torch.Tensor, plans: list, layout: str, dtype: torch.dtype, repeats: int
) -> dict:
    """Agreement, timings, bytes, ops and bounds of one (layout, dtype) case."""
    feats = features.to(dtype)
    if layout == "channel-major":
        feats = feats.transpose(1, 2).contiguous().transpose(1, 2)
    grids = [p.scales[-1].grid for p in plans]
    reference = torch.cat(vila_tokens(feats, grids))
    tokens, _ = nvila.merge_and_pack(feats, plans)
    max_diff = (reference.float() - tokens.float()).abs().max().item()
    equal = bool(torch.equal(reference, tokens))
    buffer = torch.empty_like(tokens)
    out_bytes = tokens.numel() * tokens.element_size()
    in_bytes = feats.numel() * feats.element_size()
    del reference, tokens
    copy_src = torch.ones_like(buffer)
    copy_dst = torch.zeros_like(buffer)
    fns: dict[str, Callable[[], object]] = {
        "vila": lambda: vila_tokens(feats, grids),
        "two_pass": lambda: nvila.pack_tokens_batch(
            nvila.merge_features(feats, grids, scales=SCALES)
        ),
        "fresh": lambda: nvila.merge_and_pack(feats, plans),
        "out": lambda: nvila.merge_and_pack(feats, plans, out=buffer),
        "copy_warm": lambda: copy_dst.copy_(copy_src),
        "clone_fresh": lambda: copy_src.clone(),
    }
    times = interleaved(fns, repeats=repeats, warmup=0)
    profiles = {k: count_ops_and_bytes(fns[k]) for k in ("vila", "two_pass", "fresh", "out")}
    profiles["out"]["allocated_GB"] += out_bytes / 1e9  # written into the reused buffer
    t_copy, t_clone = median(times["copy_warm"]), median(times["clone_fresh"])
    bandwidth = 2 * out_bytes / t_copy / 1e9  # bytes read + written per second, warm
    fresh_s_per_byte = max(t_clone - t_copy, 0.0) / out_bytes
    bound_warm = (in_bytes + out_bytes) / 1e9 / bandwidth
    bound_fresh = bound_warm + out_bytes * fresh_s_per_byte
    return {
        "layout": layout,
        "dtype": str(dtype).replace("torch.", ""),
        "equal_to_vila": equal,
        "max_abs_diff_vs_vila": max_diff,
        "times_s": times,
        "median_s": {k: median(v) for k, v in times.items()},
        "speedup": {k: paired_ratio(times["vila"], times[k]) for k in ("two_pass", "fresh", "out")},
        "profile": profiles,
        "bytes": {"input_GB": in_bytes / 1e9, "output_GB": out_bytes / 1e9},
        "bandwidth": {
            "copy_warm_GBps": bandwidth,
            "fresh_memory_s_per_GB": fresh_s_per_byte * 1e9,
            "bound_warm_s": bound_warm,
            "bound_fresh_s": bound_fresh,
        },
        "fraction_of_bound": {
            "fresh": bound_fresh / median(times["fresh"]),
            "out": bound_warm / median(times["out"]),
        },
    }


def table(cases: list[dict], info: dict, sizes: list) -> str:
    rows, targets = [], []
    names = {
        "vila": "VILA path (baseline)",
        "two_pass": "`merge_features` + `pack_tokens_batch`",
        "fresh": "`merge_and_pack`",
        "out": "`merge_and_pack(..., out=)`",
    }
    for c in cases:
        for key, label in names.items():
            speed = 1.0 if key == "vila" else c["speedup"][key]
            prof = c["profile"][key]
            target = TARGETS.get((c["layout"], c["dtype"], key))
            if target is not None:
                met = "met" if speed >= target else "**missed**"
                targets.append(f"{c['layout']} {c['dtype']} {label}: ≥ {target:g}x, {met}")
            bound = c["bandwidth"]["bound_warm_s" if key == "out" else "bound_fresh_s"]
            frac = c["fraction_of_bound"].get(key)
            if frac is not None:
                goal = FRACTION_TARGETS[key]
                met = "met" if frac >= goal else "**missed**"
                targets.append(f"{c['layout']} {c['dtype']} {label}: ≥ {goal:g} of bound, {met}")
            rows.append(
                [
                    f"{c['layout']}, {c['dtype']}",
                    label,
                    fmt_ms(c["median_s"][key]),
                    f"**{speed:.2f}x**" + (f" (target {target:g}x)" if target else ""),
                    f"{prof['allocated_GB']:.2f}",
                    prof["ops"],
                    fmt_ms(bound) if key in ("fresh", "out") else "",
                    f"**{frac:.2f}**" if frac is not None else "",
                ]
            )
    header = [
        "features",
        "path",
        "median (ms)",
        "speed-up vs VILA",
        "GB written",
        "ops",
        "bound (ms)",
        "fraction of bound",
    ]
    agree = ", ".join(
        f"{c['layout']} {c['dtype']}: "
        + ("bit-identical" if c["equal_to_vila"] else f"max diff {c['max_abs_diff_vs_vila']:.2g}")
        for c in cases
    )
    bw = cases[0]["bandwidth"]
    return "\n\n".join(
        [
            markdown_table(header, rows),
            "Targets: " + "; ".join(targets) + ".",
            f"Agreement with the VILA path: {agree}. Bound: (input + output bytes) at the warm "
            f"copy bandwidth ({bw['copy_warm_GBps']:.1f} GB/s read + write), plus, for fresh "
            f"output, its first touch ({bw['fresh_memory_s_per_GB'] * 1e3:.0f} ms/GB), measured "
            "in the same rounds of each case (figures of the float32 case). GB written: bytes "
            "the ops' outputs allocated (torch.profiler), plus the buffer for `out=`. Ops: "
            "top-level aten ops of one call.",
            "Images (h, w): " + ", ".join(f"{h}x{w}" for h, w in sizes) + ".",
            machine_line(info),
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 images, 2 rounds")
    parser.add_argument("--images", type=int, default=None, help="batch size (default 6)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info("cpu", torch.float32)
    n = args.images or (3 if args.quick else 6)
    repeats = args.repeats or 2
    torch.set_grad_enabled(False)
    sizes = list(IMAGE_SIZES[:n])
    plans = [
        dynamic_s2.plan_tiles(h, w, SCALES, policy="nvila", max_tiles=MAX_TILES) for h, w in sizes
    ]
    gen = torch.Generator().manual_seed(0)
    total = sum(p.num_tiles for p in plans)
    features = torch.randn((total, TOKENS_PER_SIDE**2, CHANNELS), generator=gen)
    cases = []
    for layout, dtype in CASES:
        cases.append(measure_case(features, plans, layout, dtype, repeats))
        print(f"{layout} {dtype}: {cases[-1]['speedup']}", file=sys.stderr, flush=True)
    text = table(cases, info, sizes)
    data = {
        "name": "tokens_speed",
        "machine": info,
        "config": {
            "scales": SCALES,
            "channels": CHANNELS,
            "tokens_per_tile": TOKENS_PER_SIDE**2,
            "image_sizes": sizes,
            "grids": [p.grids for p in plans],
            "repeats": repeats,
        },
        "targets": {" ".join(k): v for k, v in TARGETS.items()},
        "cases": cases,
        "table": text,
    }
    report("tokens_speed", data, text)
    return data


if __name__ == "__main__":
    main()
