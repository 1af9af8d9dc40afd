"""Speed of ``dynamic_s2.merge`` against a per-image loop written the way NVILA writes it.

Setting: SigLIP-so400m width, i.e. 32x32 tokens per tile and C = 1152 channels, scales
(448, 896, 1344), ``policy="nvila"`` (1 + 4 tiles at the lower scales, up to 12 at the last), over a
batch of mixed-size images (the size list is printed and stored).

Baseline (:func:`nvila_loop_merge`, written here from the description of NVILA's
``merge_features_for_dynamic_s2``): for each image, take its tiles of every scale, rearrange the
tokens of each tile into a channels-first map ``[C, 32, 32]``, stitch the k x k (lower scales) or
rows x cols (last scale) tiles with ``torch.cat``, resample every scale's map with
``F.interpolate(mode="area")`` in float32 to the last scale's map size, cast back, and
``torch.cat`` the scales on channels.

Candidates: ``merge(...)`` returning packed tokens (``out.pack()``), and ``merge(...).features``,
which also builds the padded ``[B, Hmax, Wmax, C_total]`` view. All three are timed round after
round in one process with alternating order. Target: merge >= 5x faster than the loop on a CPU
(>= 10x on a GPU).

The work is memory-bound, so the benchmark also reports the bytes each image reads (its tile
features) and writes (its merged map), and the machine's copy bandwidth measured in the same run
(a large ``Tensor.copy_`` into a warm buffer, and ``clone()`` into a fresh allocation, which also
pays the page faults of new memory). ``(input + output bytes) / bandwidth`` is a lower bound on
the merge time. A torch.profiler table of one merge call says which ops take the time.

Run: ``python benchmarks/merge_speed.py [--quick]``; writes ``benchmarks/results/merge_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

import dynamic_s2
from dynamic_s2.merge import plan_layouts, split_prefix, stitch_resample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    IMAGE_SIZES,
    device_and_dtype,
    fmt_ms,
    interleaved,
    machine_info,
    machine_line,
    markdown_table,
    median,
    paired_ratio,
    report,
    spread,
    synchronizer,
    time_once,
)

SCALES = (448, 896, 1344)
TOKENS_PER_SIDE = 32
CHANNELS = 1152
MAX_TILES = 12
TARGET_CPU = 5.0
TARGET_GPU = 10.0


def _stitch_channels_first(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[rows·cols, h·w, C]`` tokens of one image's scale -> ``[1, C, rows·h, cols·w]``."""
    side = math.isqrt(tiles.shape[1])
    maps = rearrange(tiles, "n (h w) c -> n c h w", h=side, w=side)
    strips = [
        torch.cat([maps[r * cols + c : r * cols + c + 1] for c in range(cols)], dim=-1)
        for r in range(rows)
    ]
    return torch.cat(strips, dim=-2)


def nvila_loop_merge(
    features: torch.Tensor, last_grids: Sequence[tuple[int, int]], scales: Sequence[int]
) -> list[torch.Tensor]:
    """The per-image loop: one ``[1, S·C, H, W]`` channels-first map per image.

    ``features`` are ``[T, h·w, C]`` tokens in NVILA's tile order (image-major, scale ascending,
    row-major); ``last_grids`` the ``(rows, cols)`` of every image's last scale.
    """
    merged = []
    start = 0
    for rows, cols in last_grids:
        per_scale = []
        for scale in scales[:-1]:
            k = scale // scales[0]
            per_scale.append(_stitch_channels_first(features[start : start + k * k], k, k))
            start += k * k
        per_scale.append(_stitch_channels_first(features[start : start + rows * cols], rows, cols))
        start += rows * cols
        size = per_scale[-1].shape[-2:]
        merged.append(
            torch.cat(
                [
                    F.interpolate(m.to(torch.float32), size=size, mode="area").to(m.dtype)
                    for m in per_scale
                ],
                dim=1,
            )
        )
    return merged


def _self_time(event: object, device: torch.device) -> float:
    names = ("self_cpu_time_total",)
    if device.type == "cuda":
        names = ("self_device_time_total", "self_cuda_time_total")
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_merge(features: torch.Tensor, plans: list, device: torch.device) -> list[dict]:
    """The ops of one ``merge(...).pack()`` call, by self time (torch.profiler), top 10."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        dynamic_s2.merge(features, plans).pack()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = sorted(prof.key_averages(), key=lambda e: _self_time(e, device), reverse=True)
    total = sum(_self_time(e, device) for e in events) or 1.0
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": _self_time(e, device) / 1e3,
            "share": _self_time(e, device) / total,
        }
        for e in events[:10]
    ]


def area_taps(size_in: int, size_out: int) -> int:
    """Largest number of source cells one output cell averages, along one axis (area mode)."""
    return max(
        -(-(o + 1) * size_in // size_out) - (o * size_in) // size_out for o in range(size_out)
    )


def per_scale_breakdown(
    features: torch.Tensor, plans: list, repeats: int, sync: Callable[[], None]
) -> list[dict]:
    """Time the merge one scale at a time (``stitch_resample`` on that scale alone)."""
    _, maps = split_prefix(features, 0)
    layouts = plan_layouts(plans, TOKENS_PER_SIDE)
    out_sizes = [row[-1].valid for row in layouts]
    rows = []
    for s, scale in enumerate(SCALES):
        lay = [[row[s]] for row in layouts]
        taps = sorted(
            {
                area_taps(row[s].valid[0], oh) * area_taps(row[s].valid[1], ow)
                for row, (oh, ow) in zip(layouts, out_sizes, strict=True)
            }
        )
        seconds = median(
            [
                time_once(lambda lay=lay: stitch_resample([maps], lay, out_sizes), sync)
                for _ in range(repeats)
            ]
        )
        column_mb = sum(h * w for h, w in out_sizes) * CHANNELS * features.element_size() / 1e6
        rows.append(
            {"scale": scale, "tap_counts": taps, "seconds": seconds, "output_MB": column_mb}
        )
    return rows


def measure(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> dict:
    """Agreement, timings, bytes, bandwidth and profile for the first ``n`` sizes."""
    sync = synchronizer(device)
    sizes = list(IMAGE_SIZES[:n])
    plans = [
        dynamic_s2.plan_tiles(h, w, SCALES, policy="nvila", max_tiles=MAX_TILES) for h, w in sizes
    ]
    total_tiles = sum(p.num_tiles for p in plans)
    gen = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(
        (total_tiles, TOKENS_PER_SIDE**2, CHANNELS), generator=gen, device=device, dtype=dtype
    )
    last_grids = [p.scales[-1].grid for p in plans]

    # Agreement, once (this also warms every path up).
    reference = nvila_loop_merge(features, last_grids, SCALES)
    ours = dynamic_s2.merge(features, plans)
    pairs = list(zip(reference, ours.unpad(), strict=True))
    shapes_agree = all(tuple(ref.shape[-2:]) == tuple(mine.shape[:2]) for ref, mine in pairs)
    max_diff = max(
        (ref[0].permute(1, 2, 0).float() - mine.float()).abs().max().item() for ref, mine in pairs
    )
    elem = features.element_size()
    per_image = [
        {
            "size_hw": list(p.image_size),
            "grids": [list(g) for g in p.grids],
            "tiles": p.num_tiles,
            "output_hw": list(mine.shape[:2]),
            "input_MB": p.num_tiles * TOKENS_PER_SIDE**2 * CHANNELS * elem / 1e6,
            "output_MB": mine.numel() * elem / 1e6,
        }
        for p, (_, mine) in zip(plans, pairs, strict=True)
    ]
    padded_MB = ours.features.numel() * elem / 1e6
    del reference, ours, pairs

    # Reference copies of the output's size, timed in the same rounds: a copy into a warm buffer
    # (memory bandwidth) and a clone into a fresh allocation (bandwidth + first-touch page faults).
    out_elems = int(sum(r["output_MB"] for r in per_image) * 1e6 / elem)
    ref = {"src": torch.ones(out_elems, dtype=dtype, device=device)}
    ref["dst"] = torch.zeros_like(ref["src"])
    times = interleaved(
        {
            "loop": lambda: nvila_loop_merge(features, last_grids, SCALES),
            "merge_packed": lambda: dynamic_s2.merge(features, plans).pack(),
            "merge_padded": lambda: dynamic_s2.merge(features, plans).features,
            "copy_output_warm": lambda: ref["dst"].copy_(ref["src"]),
            "clone_output_fresh": lambda: ref["src"].clone(),
        },
        repeats=repeats,
        warmup=0,
        sync=sync,
    )
    ref.clear()
    ops = profile_merge(features, plans, device)
    scales_split = per_scale_breakdown(features, plans, repeats, sync)
    input_MB = sum(r["input_MB"] for r in per_image)
    output_MB = sum(r["output_MB"] for r in per_image)
    t_copy, t_clone = median(times["copy_output_warm"]), median(times["clone_output_fresh"])
    bandwidth = {
        "copy_warm_GBps": 2 * output_MB / 1e3 / t_copy,
        "clone_fresh_GBps": 2 * output_MB / 1e3 / t_clone,
        "fresh_memory_s_per_GB": max(t_clone - t_copy, 0.0) / (output_MB / 1e3),
        "buffer_MB": output_MB,
    }
    bound_warm = (input_MB + output_MB) / 1e3 / bandwidth["copy_warm_GBps"]
    bound_fresh = bound_warm + output_MB / 1e3 * bandwidth["fresh_memory_s_per_GB"]
    return {
        "image_sizes": sizes,
        "total_tiles": total_tiles,
        "repeats": repeats,
        "times_s": times,
        "median_s": {k: median(v) for k, v in times.items()},
        "spread": {k: spread(v) for k, v in times.items()},
        "speedup_packed": paired_ratio(times["loop"], times["merge_packed"]),
        "speedup_padded": paired_ratio(times["loop"], times["merge_padded"]),
        "max_abs_diff_vs_loop": max_diff,
        "shapes_agree": shapes_agree,
        "per_image": per_image,
        "bytes": {
            "input_MB": input_MB,
            "output_MB": output_MB,
            "padded_MB": padded_MB,
            "lower_bound_s_warm_memory": bound_warm,
            "lower_bound_s_fresh_output": bound_fresh,
        },
        "bandwidth": bandwidth,
        "merge_over_output_clone": paired_ratio(times["merge_packed"], times["clone_output_fresh"]),
        "profile_top_ops": ops,
        "per_scale": scales_split,
    }


#: Extra CPU runs, each in a subprocess with its own environment (Linux only). On a CPU most of
#: the merge's time can be first-touch page faults of its fresh output: glibc serves large blocks
#: with mmap and returns them on free, so every call pays the kernel for new pages. These runs show
#: what the figure becomes when memory is cheaper to get.
REGIMES: dict[str, tuple[str, dict[str, str]]] = {
    "thp": (
        "transparent huge pages (THP_MEM_ALLOC_ENABLE=1)",
        {"THP_MEM_ALLOC_ENABLE": "1"},
    ),
    "keep": (
        "allocator keeps freed memory (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=2^62)",
        {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)},
    ),
}


def _run_child(args: argparse.Namespace, env_extra: dict[str, str]) -> dict | None:
    """Re-run the measurement in a subprocess with ``env_extra`` in its environment."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--device",
            "cpu",
            "--images",
            str(args.n),
            "--repeats",
            str(args.r),
            "--child-json",
            str(out),
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE",)}
        env = {**env, **env_extra}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            print(proc.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(out.read_text())


def _regime_rows(label: str, m: dict, n: int) -> list[list[str]]:
    med, spr = m["median_s"], m["spread"]
    return [
        [
            label,
            "NVILA-style per-image loop (baseline)",
            fmt_ms(med["loop"]),
            fmt_ms(med["loop"] / n),
            "1.00",
            f"{spr['loop']:.0%}",
        ],
        [
            label,
            "`merge(...).pack()`",
            fmt_ms(med["merge_packed"]),
            fmt_ms(med["merge_packed"] / n),
            f"**{m['speedup_packed']:.2f}x**",
            f"{spr['merge_packed']:.0%}",
        ],
        [
            label,
            "`merge(...).features` (+ padded view)",
            fmt_ms(med["merge_padded"]),
            fmt_ms(med["merge_padded"] / n),
            f"**{m['speedup_padded']:.2f}x**",
            f"{spr['merge_padded']:.0%}",
        ],
    ]


def _bound_row(label: str, m: dict) -> list[str]:
    b, bw = m["bytes"], m["bandwidth"]
    return [
        label,
        f"{bw['copy_warm_GBps']:.1f}",
        f"{bw['fresh_memory_s_per_GB'] * 1e3:.0f}",
        fmt_ms(b["lower_bound_s_warm_memory"]),
        fmt_ms(b["lower_bound_s_fresh_output"]),
        fmt_ms(m["median_s"]["merge_packed"]),
        f"{m['merge_over_output_clone']:.1f}",
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 images, 3 rounds, one extra run")
    parser.add_argument("--images", type=int, default=None, help="batch size (default 8)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 5)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--regimes",
        default=None,
        help="extra CPU runs with other memory settings, comma list of thp,keep ('' for none); "
        "default thp,keep (--quick: keep)",
    )
    parser.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args.device)
    info = machine_info(device, dtype)  # at the start: load average, time
    args.n = args.images or (4 if args.quick else 8)
    args.r = args.repeats or (3 if args.quick else 5)
    torch.set_grad_enabled(False)
    main_run = measure(device, dtype, args.n, args.r)
    if args.child_json:
        Path(args.child_json).write_text(json.dumps(main_run))
        return main_run
    extra: dict[str, dict] = {}
    if device.type == "cpu" and sys.platform.startswith("linux"):
        regimes = (
            args.regimes if args.regimes is not None else ("keep" if args.quick else "thp,keep")
        )
        for key in filter(None, regimes.split(",")):
            if key not in REGIMES:
                raise SystemExit(f"unknown regime {key!r}: use {sorted(REGIMES)}")
            child = _run_child(args, REGIMES[key][1])
            if child is not None:
                extra[key] = child

    target = TARGET_GPU if device.type == "cuda" else TARGET_CPU
    n = args.n
    label = "CUDA caching allocator" if device.type == "cuda" else "default (glibc malloc)"
    runs = [(label, main_run)] + [(REGIMES[k][0], m) for k, m in extra.items()]
    rows = [row for name, m in runs for row in _regime_rows(name, m, n)]
    size_rows = [
        [
            f"{r['size_hw'][0]}x{r['size_hw'][1]}",
            " / ".join(f"{g[0]}x{g[1]}" for g in r["grids"]),
            r["tiles"],
            f"{r['output_hw'][0]}x{r['output_hw'][1]}",
            f"{r['input_MB']:.0f}",
            f"{r['output_MB']:.0f}",
        ]
        for r in main_run["per_image"]
    ]
    b = main_run["bytes"]
    op_names = [o["op"] for o in main_run["profile_top_ops"][:6]]
    op_rows = []
    for op in op_names:
        row = [f"`{op}`"]
        for _, m in runs:
            found = {o["op"]: o for o in m["profile_top_ops"]}.get(op)
            row.append(
                f"{fmt_ms(found['self_ms'] / 1e3)} ({found['share']:.0%}, {found['calls']} calls)"
                if found
                else "-"
            )
        op_rows.append(row)
    table = "\n\n".join(
        [
            markdown_table(
                ["memory", "", "median (ms)", "per image (ms)", "**speed-up vs loop**", "spread"],
                rows,
            ),
            f"Target >= {target:g}x (packed, {label}): "
            f"**{'met' if main_run['speedup_packed'] >= target else 'not met'}** "
            f"({main_run['speedup_packed']:.2f}x). Max abs difference merge vs loop: "
            f"{main_run['max_abs_diff_vs_loop']:.3g}.",
            markdown_table(
                ["image (h x w)", "grids", "tiles", "merged map", "input MB", "output MB"],
                size_rows,
            ),
            f"Bytes: {b['input_MB']:.0f} MB of tile features in, {b['output_MB']:.0f} MB of "
            f"merged features out (packed); the padded view is {b['padded_MB']:.0f} MB. "
            "Bounds, from a copy of the output's size into a warm buffer (bandwidth, counting "
            "bytes read + written) and a clone into fresh memory, timed in the same rounds:",
            markdown_table(
                [
                    "memory",
                    "copy bandwidth (GB/s)",
                    "fresh memory (ms/GB)",
                    "bound, warm (ms)",
                    "bound, fresh output (ms)",
                    "merge, packed (ms)",
                    "merge / clone of its output",
                ],
                [_bound_row(name, m) for name, m in runs],
            ),
            "Top ops of one `merge(...).pack()` call (torch.profiler, self time):",
            markdown_table(["op", *(name for name, _ in runs)], op_rows),
            "The merge one scale at a time (`stitch_resample` on that scale alone, "
            f"{label}); a scale whose images need different tap counts takes the general path "
            "(temporaries, then `index_copy_`), one tap count writes into the output directly:",
            markdown_table(
                ["scale", "taps per output cell (distinct)", "column written (MB)", "time (ms)"],
                [
                    [
                        r["scale"],
                        ", ".join(map(str, r["tap_counts"])),
                        f"{r['output_MB']:.0f}",
                        fmt_ms(r["seconds"]),
                    ]
                    for r in main_run["per_scale"]
                ],
            ),
            machine_line(info),
        ]
    )
    data = {
        "name": "merge_speed",
        "machine": info,
        "config": {
            "scales": SCALES,
            "policy": "nvila",
            "max_tiles": MAX_TILES,
            "tokens_per_tile": TOKENS_PER_SIDE**2,
            "channels": CHANNELS,
            "image_sizes": main_run["image_sizes"],
            "repeats": args.r,
            "quick": args.quick,
        },
        "target_speedup": target,
        "target_met": main_run["speedup_packed"] >= target,
        "speedup_packed": main_run["speedup_packed"],
        "default": main_run,
        "regimes": {
            k: {"label": REGIMES[k][0], "env": REGIMES[k][1], **m} for k, m in extra.items()
        },
        "table": table,
    }
    report("merge_speed", data, table)
    return data


if __name__ == "__main__":
    main()
