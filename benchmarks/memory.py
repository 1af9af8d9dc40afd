"""Peak memory of ``dynamic_s2.forward`` with ``max_batch_tiles`` fixed: 8 vs 64 images.

The claim to check: with the chunk size fixed, peak memory grows with the output only, not with
the number of tiles. The same size mix (the first 8 sizes of the benchmarks' list) is used 1x and
8x; a small backbone keeps the run short (``conv``: a 16x16 stride-16 patch embedding to 64
channels; ``vit-tiny``: HF ViT, hidden 192, 12 layers, 3 heads, random init).

Every configuration is measured in its own subprocess:

* CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the call, minus the same figure from a
  baseline subprocess that does everything else (imports, making the inputs and the model, and one
  forward over a single 32x32 image so that libraries and kernels are loaded) and stops there;
* CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus what was allocated before.

A third subprocess per configuration runs the stages by hand, one after the other over the whole
batch (tile everything, encode everything, merge everything: the composition without the
streaming that ``forward`` does), and records each stage's own peak above the memory it started
from, so that the growth can be attributed. The figure of merit is ``Δpeak / Δoutput`` between 8
and 64 images: about 1 when the peak grows with the output only; the same table gives the growth
of the other large tensors (the tiles, the tile features) to compare with.

Run: ``python benchmarks/memory.py [--quick]``; writes ``benchmarks/results/memory.json``.

``--big`` measures one large uint8 image instead (default 10000x10000): the peak of ``forward``
above a baseline subprocess that holds the same image and model, as a multiple of the image's
bytes, with the CPU tiling widening the image to float32 in bands (now) and whole (before), in the
same run; writes ``benchmarks/results/memory_big.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    IMAGE_SIZES,
    TinyPatchEmbed,
    device_and_dtype,
    machine_info,
    machine_line,
    markdown_table,
    random_images,
    report,
    write_result,
)

SCALES = (224, 448, 672)
MIX = IMAGE_SIZES[:8]


def build_model(name: str) -> torch.nn.Module:
    if name == "conv":
        return TinyPatchEmbed()
    if name == "vit-tiny":
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(
            hidden_size=192,
            num_hidden_layers=12,
            num_attention_heads=3,
            intermediate_size=768,
            patch_size=16,
            image_size=224,
        )
        return ViTModel(config, add_pooling_layer=False)
    raise SystemExit(f"unknown backbone {name!r}: use conv or vit-tiny")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def _current_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 1e6
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def _window_peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def _reset_window_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM) of the process
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")


@contextlib.contextmanager
def _stage(stages: dict, name: str, device: torch.device) -> Iterator[None]:
    """Record a stage's transient peak above its starting memory, and what it leaves held."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    before = _current_mb(device)
    _reset_window_peak(device)
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stages[name] = {
        "transient_peak_MB": _window_peak_mb(device) - before,
        "held_MB": _current_mb(device) - before,
    }


def child(mode: str, n: int, backbone: str, chunk: int, device_name: str) -> dict:
    """One measurement: ``mode`` is ``base``, ``forward`` or ``stages``."""
    import dynamic_s2

    device, dtype = device_and_dtype(device_name)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    sizes = [MIX[i % len(MIX)] for i in range(n)]
    images = random_images(sizes, device=device)
    model = build_model(backbone).to(device=device, dtype=dtype).eval()
    # Load libraries and kernels with one tiny call, in every mode alike.
    dynamic_s2.forward(model, [images[0][:, :32, :32]], SCALES, max_batch_tiles=chunk)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device) / 1e6
        torch.cuda.reset_peak_memory_stats(device)
    else:
        start = 0.0
    result: dict = {"mode": mode, "images": n, "start_MB": start}
    if mode == "base":
        result["peak_MB"] = _peak_mb(device) - start
        return result
    t0 = time.perf_counter()
    if mode == "forward":
        out = dynamic_s2.forward(model, images, SCALES, max_batch_tiles=chunk)
        result["peak_MB"] = _peak_mb(device) - start
    else:
        adapter = dynamic_s2.as_backbone(model)
        stages: dict[str, dict[str, float]] = {}
        plans = [dynamic_s2.plan_tiles(im.shape[-2], im.shape[-1], SCALES) for im in images]
        with _stage(stages, "tile", device):
            tiles = dynamic_s2.tile_images(images, plans, mean=adapter.mean, std=adapter.std).tiles
        with _stage(stages, "encode", device):
            feats = dynamic_s2.encode_tiles(adapter, tiles, max_batch_tiles=chunk)
        with _stage(stages, "merge", device):
            out = dynamic_s2.merge(feats, plans, num_prefix_tokens=adapter.num_prefix_tokens)
        result["stages"] = stages
        result["tiles_MB"] = tiles.numel() * tiles.element_size() / 1e6
        result["tile_features_MB"] = feats.numel() * feats.element_size() / 1e6
        result["num_tiles"] = tiles.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result["seconds"] = time.perf_counter() - t0
    tokens = out.pack()[0]
    result["output_MB"] = tokens.numel() * tokens.element_size() / 1e6
    result["input_MB"] = sum(im.numel() * im.element_size() for im in images) / 1e6
    return result


def big_child(mode: str, side: int, band: str, chunk: int) -> dict:
    """One large-image measurement: ``mode`` is ``base`` or ``forward``; ``band`` the rows
    widened at a time (``none``: the whole image, the former path)."""
    import dynamic_s2
    from dynamic_s2 import tiling

    tiling._BAND = None if band == "none" else int(band)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, side, side), dtype=torch.uint8)
    model = build_model("conv").eval()
    dynamic_s2.forward(model, [image[:, :32, :32]], SCALES, max_batch_tiles=chunk)
    result: dict = {"mode": mode, "band": band, "image_MB": image.numel() / 1e6}
    if mode == "forward":
        out = dynamic_s2.forward(model, [image], SCALES, max_batch_tiles=chunk)
        result["checksum"] = float(out.tokens.double().sum())
    result["peak_MB"] = _peak_mb(torch.device("cpu"))
    return result


def big(args: argparse.Namespace, info: dict) -> dict:
    """Peak of ``forward`` on one large uint8 image, banded widening vs whole, same run."""
    rows = {}
    for band in ("none", "256"):  # before, now
        runs = {}
        for mode in ("base", "forward"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--big-child", mode]
            cmd += ["--big-side", str(args.big_side), "--big-band", band]
            cmd += ["--max-batch-tiles", str(args.max_batch_tiles)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"big child {mode} {band} failed:\n{proc.stderr[-3000:]}")
            runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        peak = runs["forward"]["peak_MB"] - runs["base"]["peak_MB"]
        rows[band] = {
            "image_MB": runs["forward"]["image_MB"],
            "peak_above_baseline_MB": peak,
            "peak_over_image": peak / runs["forward"]["image_MB"],
            "checksum": runs["forward"]["checksum"],
        }
    before, now = rows["none"], rows["256"]
    header = ["uint8 image widened to float32", "image (MB)", "peak above baseline (MB)",
              "peak / image bytes"]  # fmt: skip
    table_rows = [
        [
            label,
            f"{r['image_MB']:.0f}",
            f"{r['peak_above_baseline_MB']:.0f}",
            f"**{r['peak_over_image']:.1f}x**",
        ]
        for label, r in (("whole, before", before), ("in bands of 256 rows, now", now))
    ]
    table = (
        markdown_table(header, table_rows)
        + f"\n\nOne {args.big_side}x{args.big_side} uint8 image through `forward` (backbone "
        + f"`conv`, scales {SCALES}, max_batch_tiles={args.max_batch_tiles}), CPU; peak RSS "
        + "(ru_maxrss) above a baseline subprocess that holds the same image and model. The "
        + "outputs are identical (checksums "
        + ("equal" if before["checksum"] == now["checksum"] else "DIFFER")
        + ").\n\n"
        + machine_line(info)
    )
    data = {"machine": info, "side": args.big_side, "rows": rows, "table": table}
    write_result("memory_big", data)
    print(table)
    return data


def run_child(mode: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--child-images",
        str(n),
        "--backbone",
        args.backbone,
        "--max-batch-tiles",
        str(args.max_batch_tiles),
        "--device",
        args.device_name,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} {n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the per-stage runs")
    parser.add_argument("--counts", default="8,64", help="numbers of images, comma list")
    parser.add_argument("--backbone", default="conv", help="conv or vit-tiny")
    parser.add_argument("--max-batch-tiles", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-images", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--big", action="store_true", help="one large image: banded vs whole")
    parser.add_argument("--big-side", type=int, default=10000, help="side of the --big image")
    parser.add_argument("--big-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--big-band", default="256", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.big_child:
        print(json.dumps(big_child(args.big_child, args.big_side, args.big_band, 16)))
        return {}
    device, dtype = device_and_dtype(args.device)
    info = machine_info(device, dtype)  # at the start: load average, time
    args.device_name = str(device)
    if args.child:
        print(
            json.dumps(
                child(
                    args.child, args.child_images, args.backbone, args.max_batch_tiles, str(device)
                )
            )
        )
        return {}
    if args.big:
        return big(args, info)

    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    for n in counts:
        base = run_child("base", n, args)
        fwd = run_child("forward", n, args)
        row = {
            "images": n,
            "baseline_MB": base["peak_MB"],
            "forward_peak_MB": fwd["peak_MB"] - base["peak_MB"],
            "output_MB": fwd["output_MB"],
            "input_MB": fwd["input_MB"],
            "forward_seconds": fwd["seconds"],
        }
        if not args.quick:
            st = run_child("stages", n, args)
            row["num_tiles"] = st["num_tiles"]
            row["tiles_MB"] = st["tiles_MB"]
            row["tile_features_MB"] = st["tile_features_MB"]
            row["stages"] = st["stages"]
        else:
            import dynamic_s2

            sizes = [MIX[i % len(MIX)] for i in range(n)]
            row["num_tiles"] = sum(dynamic_s2.plan_tiles(h, w, SCALES).num_tiles for h, w in sizes)
        rows.append(row)
        print(
            f"{n} images: peak +{row['forward_peak_MB']:.0f} MB, output {row['output_MB']:.0f} MB",
            file=sys.stderr,
        )

    lo, hi = rows[0], rows[-1]
    growth = {
        "peak_MB": hi["forward_peak_MB"] - lo["forward_peak_MB"],
        "output_MB": hi["output_MB"] - lo["output_MB"],
        "tiles": hi["num_tiles"] - lo["num_tiles"],
    }
    growth["peak_over_output"] = growth["peak_MB"] / growth["output_MB"]
    if "tiles_MB" in hi:
        growth["tiles_MB"] = hi["tiles_MB"] - lo["tiles_MB"]
        growth["tile_features_MB"] = hi["tile_features_MB"] - lo["tile_features_MB"]
        for k in ("tile", "encode", "merge"):
            growth[f"{k}_stage_peak_MB"] = (
                hi["stages"][k]["transient_peak_MB"] - lo["stages"][k]["transient_peak_MB"]
            )
    # "Output only" allows the output plus a fixed working set: Δpeak within 1.5x of Δoutput.
    grows_with_output_only = growth["peak_over_output"] <= 1.5

    header = [
        "images",
        "tiles",
        "peak above baseline (MB)",
        "output, packed (MB)",
        "peak / output",
        "peak per tile (MB)",
    ]
    has_stages = "tiles_MB" in hi
    if has_stages:
        header += [
            "tiles tensor (MB)",
            "tile features (MB)",
            "stages by hand, not streamed: peak of tile / encode / merge above its start (MB)",
        ]
    table_rows = []
    for r in rows:
        line = [
            r["images"],
            r["num_tiles"],
            f"{r['forward_peak_MB']:.0f}",
            f"{r['output_MB']:.0f}",
            f"{r['forward_peak_MB'] / r['output_MB']:.1f}",
            f"{r['forward_peak_MB'] / r['num_tiles']:.2f}",
        ]
        if has_stages:
            sp = r["stages"]
            line += [
                f"{r['tiles_MB']:.0f}",
                f"{r['tile_features_MB']:.0f}",
                " / ".join(
                    f"{sp[k]['transient_peak_MB']:.0f}" for k in ("tile", "encode", "merge")
                ),
            ]
        table_rows.append(line)
    extra = ""
    if has_stages:
        extra = (
            f", tiles tensor +{growth['tiles_MB']:.0f} MB, tile features "
            f"+{growth['tile_features_MB']:.0f} MB; stage peaks: tile "
            f"+{growth['tile_stage_peak_MB']:.0f} MB, encode +{growth['encode_stage_peak_MB']:.0f}"
            f" MB, merge +{growth['merge_stage_peak_MB']:.0f} MB"
        )
    table = (
        markdown_table(header, table_rows)
        + f"\n\nFrom {lo['images']} to {hi['images']} images: peak +{growth['peak_MB']:.0f} MB, "
        + f"output +{growth['output_MB']:.0f} MB{extra}; **Δpeak / Δoutput = "
        + f"{growth['peak_over_output']:.1f}**: the peak "
        + ("grows with the output only" if grows_with_output_only else "does not grow with the")
        + ("" if grows_with_output_only else " output only")
        + f". Backbone `{args.backbone}`, max_batch_tiles={args.max_batch_tiles}, scales "
        + f"{SCALES}, the size mix {', '.join(f'{h}x{w}' for h, w in MIX)} repeated. "
        + ("Peak RSS (ru_maxrss)" if device.type == "cpu" else "torch.cuda.max_memory_allocated")
        + " above a baseline subprocess that makes the same inputs and model.\n\n"
        + machine_line(info)
    )
    data = {
        "name": "memory",
        "machine": info,
        "config": {
            "backbone": args.backbone,
            "max_batch_tiles": args.max_batch_tiles,
            "scales": SCALES,
            "size_mix": MIX,
            "counts": counts,
            "measure": "ru_maxrss" if device.type == "cpu" else "cuda.max_memory_allocated",
            "quick": args.quick,
        },
        "results": rows,
        "growth": growth,
        "grows_with_output_only": grows_with_output_only,
        "table": table,
    }
    report("memory", data, table)
    return data


if __name__ == "__main__":
    main()
