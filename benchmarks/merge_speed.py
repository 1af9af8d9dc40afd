"""Speed of ``dynamic_s2.merge`` against per-image loops written the way NVILA writes them.

Setting: SigLIP-so400m width, i.e. 32x32 tokens per tile and C = 1152 channels, scales
(448, 896, 1344), over a batch of mixed-size images (6 by default; the size list is printed and
stored), for two tiling policies: ``policy="nvila"`` (1 + 4 tiles at the lower scales, up to 12 at
the last) and the library's default ``policy="aspect"`` (every scale's grid follows the aspect
ratio, so its maps meet non-integer area factors such as 96 -> 128).

Baselines (:func:`loop_merge`, written here from the description of NVILA's
``merge_features_for_dynamic_s2``): for each image, take its tiles of every scale, rearrange the
tokens of each tile into a channels-first map ``[C, 32, 32]``, stitch them with ``torch.cat``,
resample every scale's map with ``F.interpolate(mode="area")`` in float32 to the last scale's map
size, cast back, and ``torch.cat`` the scales on channels; then either pad the maps into one
``[B, Hmax, Wmax, C]`` tensor with its mask (the baseline of ``merge(...).features``) or
concatenate them into ``[Σ h·w, C]`` tokens (the baseline of ``merge(...).pack()``).

Cases: contiguous float32, contiguous bfloat16, HF's channel-major float32 (strides
``(N·C, 1, N)``). Every path is timed round after round in one process with alternating order,
beside a copy of the packed output's size into a warm buffer (the copy bandwidth, bytes read +
written) and a clone into fresh memory (the first touch of new pages). The memory bound of a path
is ``(features read + output written) / bandwidth + output · first-touch time`` (fresh output);
each path is reported as the fraction of it it reaches. Targets (issue 21): padded ``.features``
>= 3x the padding loop, ``.pack()`` >= 5x the concatenating loop, both policies; every path >= 0.6
of its fresh-output bound.

Run: ``python benchmarks/merge_speed.py [--quick] [--images 6] [--repeats 3] [--regimes keep]``;
writes ``benchmarks/results/merge_speed.json``.
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
)

SCALES = (448, 896, 1344)
TOKENS_PER_SIDE = 32
CHANNELS = 1152
MAX_TILES = 12
TARGET_PACKED = 5.0
TARGET_PADDED = 3.0
TARGET_FRACTION_FRESH = 0.6
POLICIES = ("nvila", "aspect")
CASES = (
    ("contiguous", torch.float32),
    ("contiguous", torch.bfloat16),
    ("channel-major", torch.float32),
)


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


def loop_merge(features: torch.Tensor, plans: Sequence) -> list[torch.Tensor]:
    """:func:`nvila_loop_merge` for any plans: every scale's own grid, cropped to its valid map."""
    merged = []
    start = 0
    for p in plans:
        per_scale = []
        for sp in p.scales:
            rows, cols = sp.grid
            vh, vw = sp.feature_size(TOKENS_PER_SIDE)
            stitched = _stitch_channels_first(features[start : start + rows * cols], rows, cols)
            per_scale.append(stitched[..., :vh, :vw])
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


def loop_padded(features: torch.Tensor, plans: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop, then its maps padded into one ``[B, Hmax, Wmax, C]`` tensor and a mask."""
    maps = loop_merge(features, plans)
    hmax = max(m.shape[-2] for m in maps)
    wmax = max(m.shape[-1] for m in maps)
    out = maps[0].new_zeros((len(maps), hmax, wmax, maps[0].shape[1]))
    mask = torch.zeros((len(maps), hmax, wmax), dtype=torch.bool)
    for b, m in enumerate(maps):
        h, w = m.shape[-2:]
        out[b, :h, :w] = m[0].permute(1, 2, 0)
        mask[b, :h, :w] = True
    return out, mask


def loop_tokens(features: torch.Tensor, plans: Sequence) -> torch.Tensor:
    """The loop, then one concatenation of its maps into ``[Σ h·w, C]`` tokens."""
    maps = loop_merge(features, plans)
    return torch.cat([m[0].permute(1, 2, 0).reshape(-1, m.shape[1]) for m in maps])


def _self_time(event: object, device: torch.device) -> float:
    names = ("self_cpu_time_total",)
    if device.type == "cuda":
        names = ("self_device_time_total", "self_cuda_time_total")
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_call(fn: Callable[[], object], device: torch.device) -> list[dict]:
    """The ops of one call, by self time (torch.profiler), top 8."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
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
        for e in events[:8]
    ]


def make_features(
    plans: list, layout: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Random ``[T, 1024, C]`` tile features in ``layout`` (HF channel-major: ``(N·C, 1, N)``)."""
    total_tiles = sum(p.num_tiles for p in plans)
    gen = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(
        (total_tiles, TOKENS_PER_SIDE**2, CHANNELS), generator=gen, device=device
    ).to(dtype)
    if layout == "channel-major":
        features = features.transpose(1, 2).contiguous().transpose(1, 2)
    return features


def measure_case(
    policy: str, layout: str, dtype: torch.dtype, device: torch.device, n: int, repeats: int
) -> dict:
    """Agreement, timings, bounds and fractions of one (policy, layout, dtype) case."""
    sync = synchronizer(device)
    sizes = list(IMAGE_SIZES[:n])
    kwargs = {"policy": "nvila", "max_tiles": MAX_TILES} if policy == "nvila" else {}
    plans = [dynamic_s2.plan_tiles(h, w, SCALES, **kwargs) for h, w in sizes]
    features = make_features(plans, layout, dtype, device)

    # Agreement, once (this also warms every path up): bit for bit.
    out = dynamic_s2.merge(features, plans)
    ref_padded, ref_mask = loop_padded(features, plans)
    equal_padded = torch.equal(out.features, ref_padded) and torch.equal(out.mask, ref_mask)
    equal_packed = torch.equal(out.pack()[0], loop_tokens(features, plans))
    elem = features.element_size()
    in_bytes = features.numel() * elem
    packed_bytes = out.tokens.numel() * elem
    padded_bytes = out.features.numel() * elem + out.mask.numel()
    del out, ref_padded, ref_mask

    ref = {"src": torch.ones(packed_bytes // elem, dtype=dtype, device=device)}
    ref["dst"] = torch.zeros_like(ref["src"])
    times = interleaved(
        {
            "loop_padded": lambda: loop_padded(features, plans),
            "features": lambda: dynamic_s2.merge(features, plans).features,
            "loop_tokens": lambda: loop_tokens(features, plans),
            "pack": lambda: dynamic_s2.merge(features, plans).pack(),
            "copy_warm": lambda: ref["dst"].copy_(ref["src"]),
            "clone_fresh": lambda: ref["src"].clone(),
        },
        repeats=repeats,
        warmup=0,
        sync=sync,
    )
    ref.clear()
    t_copy, t_clone = median(times["copy_warm"]), median(times["clone_fresh"])
    bandwidth = 2 * packed_bytes / t_copy
    first_touch = max(t_clone - t_copy, 0.0) / packed_bytes
    bounds = {
        "features": (in_bytes + padded_bytes) / bandwidth + padded_bytes * first_touch,
        "pack": (in_bytes + packed_bytes) / bandwidth + packed_bytes * first_touch,
    }
    med = {k: median(v) for k, v in times.items()}
    return {
        "policy": policy,
        "layout": layout,
        "dtype": str(dtype).replace("torch.", ""),
        "image_sizes": sizes,
        "grids": [list(map(list, p.grids)) for p in plans],
        "tiles": sum(p.num_tiles for p in plans),
        "times_s": times,
        "median_s": med,
        "spread": {k: spread(v) for k, v in times.items()},
        "speedup_padded": paired_ratio(times["loop_padded"], times["features"]),
        "speedup_packed": paired_ratio(times["loop_tokens"], times["pack"]),
        "equal_padded": equal_padded,
        "equal_packed": equal_packed,
        "bytes": {"input": in_bytes, "packed": packed_bytes, "padded": padded_bytes},
        "copy_GBps": bandwidth / 1e9,
        "first_touch_ms_per_GB": first_touch * 1e12,
        "bound_s": bounds,
        "fraction_of_bound": {k: bounds[k] / med[k] for k in bounds},
    }


#: Extra CPU runs, each in a subprocess with its own environment (Linux only). On a CPU much of
#: a fresh output's cost is first-touch page faults: glibc serves large blocks with mmap and
#: returns them on free. These runs show the figures when memory is cheaper to get.
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


def _run_child(args: argparse.Namespace, env_extra: dict[str, str]) -> list[dict] | None:
    """Re-run the nvila float32 case in a subprocess with ``env_extra`` in its environment."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", "cpu"]
        cmd += ["--images", str(args.n), "--repeats", str(args.r), "--child-json", str(out)]
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        proc = subprocess.run(
            cmd, env={**env, **env_extra}, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not out.exists():
            print(proc.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(out.read_text())


def _rows(label: str, c: dict) -> list[list[str]]:
    med, frac, bound = c["median_s"], c["fraction_of_bound"], c["bound_s"]
    case = f"{label}{c['policy']}, {c['layout']} {c['dtype']}"
    eq = {"features": c["equal_padded"], "pack": c["equal_packed"]}
    rows = []
    for key, base, name, speed in (
        ("features", "loop_padded", "`merge(...).features` + mask", c["speedup_padded"]),
        ("pack", "loop_tokens", "`merge(...).pack()`", c["speedup_packed"]),
    ):
        rows.append(
            [
                case,
                name,
                fmt_ms(med[key]),
                fmt_ms(med[base]),
                f"**{speed:.2f}x**",
                fmt_ms(bound[key]),
                f"**{frac[key]:.2f}**",
                "yes" if eq[key] else "**no**",
            ]
        )
    return rows


def _verdicts(cases: list[dict]) -> list[str]:
    out = []
    for c in cases:
        name = f"{c['policy']} {c['layout']} {c['dtype']}"
        for key, target, speed in (
            ("padded", TARGET_PADDED, c["speedup_padded"]),
            ("packed", TARGET_PACKED, c["speedup_packed"]),
        ):
            out.append(
                f"{name} {key}: {speed:.2f}x (target {target:g}x, "
                f"{'met' if speed >= target else 'missed'})"
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 images, 2 rounds")
    parser.add_argument("--images", type=int, default=None, help="batch size (default 6)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--regimes",
        default=None,
        help="extra CPU runs with other memory settings, comma list of thp,keep ('' for none); "
        "default keep",
    )
    parser.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device, _ = device_and_dtype(args.device)
    info = machine_info(device, torch.float32)  # at the start: load average, time
    args.n = args.images or (3 if args.quick else 6)
    args.r = args.repeats or (2 if args.quick else 3)
    torch.set_grad_enabled(False)
    if args.child_json:
        child = [measure_case("nvila", "contiguous", torch.float32, device, args.n, args.r)]
        Path(args.child_json).write_text(json.dumps(child))
        return {"cases": child}
    cases = []
    for policy in POLICIES:
        for layout, dtype in CASES:
            cases.append(measure_case(policy, layout, dtype, device, args.n, args.r))
            print(_verdicts(cases[-1:]), file=sys.stderr, flush=True)
    extra: dict[str, list[dict]] = {}
    if device.type == "cpu" and sys.platform.startswith("linux"):
        for key in filter(None, (args.regimes if args.regimes is not None else "keep").split(",")):
            if key not in REGIMES:
                raise SystemExit(f"unknown regime {key!r}: use {sorted(REGIMES)}")
            child = _run_child(args, REGIMES[key][1])
            if child is not None:
                extra[key] = child
    nvila32 = cases[0]
    plans = [
        dynamic_s2.plan_tiles(h, w, SCALES, policy="nvila", max_tiles=MAX_TILES)
        for h, w in nvila32["image_sizes"]
    ]
    features = make_features(plans, "contiguous", torch.float32, device)
    profiles = {
        "pack": profile_call(lambda: dynamic_s2.merge(features, plans).pack(), device),
        "features": profile_call(lambda: dynamic_s2.merge(features, plans).features, device),
    }
    rows = [row for c in cases for row in _rows("", c)]
    rows += [row for k, cs in extra.items() for c in cs for row in _rows(f"{k}: ", c)]
    header = [
        "case",
        "path",
        "median (ms)",
        "loop (ms)",
        "speed-up vs loop",
        "bound (ms)",
        "fraction of bound",
        "bit-identical",
    ]
    prof_rows = [
        [name, f"`{o['op']}`", fmt_ms(o["self_ms"] / 1e3), f"{o['share']:.0%}", o["calls"]]
        for name, ops in profiles.items()
        for o in ops[:5]
    ]
    table = "\n\n".join(
        [
            markdown_table(header, rows),
            "Targets: " + "; ".join(_verdicts(cases)) + ".",
            "Bound: (features read + output written) at the copy bandwidth, plus the output's "
            "first touch, both measured in the same rounds: "
            + ", ".join(
                f"{c['policy']} {c['layout']} {c['dtype']}: {c['copy_GBps']:.1f} GB/s, "
                f"{c['first_touch_ms_per_GB']:.0f} ms/GB"
                for c in cases
            )
            + ". `keep:` rows: the same nvila float32 case in a subprocess whose allocator keeps "
            "freed memory (its first touch is then near 0).",
            "Top ops of one call (nvila, contiguous float32, torch.profiler self time):",
            markdown_table(["path", "op", "self (ms)", "share", "calls"], prof_rows),
            "Images (h, w): " + ", ".join(f"{h}x{w}" for h, w in nvila32["image_sizes"]) + ".",
            machine_line(info),
        ]
    )
    data = {
        "name": "merge_speed",
        "machine": info,
        "config": {
            "scales": SCALES,
            "policies": POLICIES,
            "max_tiles_nvila": MAX_TILES,
            "tokens_per_tile": TOKENS_PER_SIDE**2,
            "channels": CHANNELS,
            "images": args.n,
            "repeats": args.r,
            "quick": args.quick,
        },
        "target_speedup": TARGET_PACKED,
        "target_speedup_padded": TARGET_PADDED,
        "speedup_packed": min(c["speedup_packed"] for c in cases),
        "speedup_padded": min(c["speedup_padded"] for c in cases),
        "target_met": all(
            c["speedup_packed"] >= TARGET_PACKED and c["speedup_padded"] >= TARGET_PADDED
            for c in cases
        ),
        "cases": cases,
        "regimes": {
            k: {"label": REGIMES[k][0], "env": REGIMES[k][1], "cases": v} for k, v in extra.items()
        },
        "profiles": profiles,
        "table": table,
    }
    report("merge_speed", data, table)
    return data


if __name__ == "__main__":
    main()
