"""Overhead of ``dynamic_s2.forward`` over the backbone alone.

Candidate: ``dynamic_s2.forward(model, images, scales, max_batch_tiles=M)`` on a fixed list of
mixed-size uint8 images (plan + tile + encode + merge, packed output).
Baseline: the backbone alone on the same tiles, made beforehand with ``tile_images``, called in the
same chunks of ``M`` tiles (``model(tiles[i:i + M])`` and a ``torch.cat``).

Both run in the same process, round after round with alternating order; the figure is the
median over rounds of ``forward / baseline``. The stages are also timed on their own (planning
cold and cached, tiling, merging, building the padded ``.features`` view) and give a second
estimate, ``1 + (plan + tile + merge) / backbone``, which is far less noisy than the direct ratio
when the backbone takes seconds.

Backbones:

* ``vit-s``: ViT-S/16 width (HF ``ViTModel``: hidden 384, 12 layers, 6 heads, MLP 1536, patch 16,
  224 px; random init, eval, no_grad) at scales (224, 448, 672). Target: ratio <= 1.05.
* ``tiny``: a 16x16 stride-16 ``Conv2d`` patch embedding to 64 channels: nearly free, so its ratio
  shows the true cost of tiling and merging.

Run: ``python benchmarks/overhead.py [--quick]``; writes ``benchmarks/results/overhead.json``.
With ``--quick`` (8 images) the ViT-S backbone runs once, without the direct rounds, and its ratio
comes from the split only; the default (12 images, 3 rounds) takes about 3 minutes on a quiet
2-core machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import dynamic_s2
from dynamic_s2 import plan as plan_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    IMAGE_SIZES,
    TinyPatchEmbed,
    device_and_dtype,
    fmt_ms,
    interleaved,
    machine_info,
    machine_line,
    markdown_table,
    median,
    paired_ratio,
    random_images,
    report,
    spread,
    synchronizer,
    time_once,
)

SCALES = (224, 448, 672)
TARGET_VIT = 1.05


def build_vit_s() -> nn.Module:
    """ViT-S/16 width, random init, as an HF ``ViTModel`` without pooler."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=16,
        image_size=224,
    )
    torch.manual_seed(0)
    return ViTModel(config, add_pooling_layer=False)


def run_backbone(
    name: str,
    model: nn.Module,
    call: Callable[[torch.Tensor], torch.Tensor],
    images: list[torch.Tensor],
    *,
    max_batch_tiles: int,
    repeats: int,
    stage_repeats: int,
    device: torch.device,
) -> dict:
    sync = synchronizer(device)
    adapter = dynamic_s2.as_backbone(model)
    mean, std = adapter.mean, adapter.std
    plans = [dynamic_s2.plan_tiles(img.shape[-2], img.shape[-1], SCALES) for img in images]
    tiles = dynamic_s2.tile_images(images, plans, mean=mean, std=std).tiles
    num_tiles = tiles.shape[0]

    def baseline() -> torch.Tensor:
        return torch.cat(
            [call(tiles[i : i + max_batch_tiles]) for i in range(0, num_tiles, max_batch_tiles)]
        )

    def candidate() -> dynamic_s2.MultiScaleFeatures:
        return dynamic_s2.forward(model, images, SCALES, max_batch_tiles=max_batch_tiles)

    # Warm the backbone up on one chunk (first calls pick kernels); a full warm-up run of the
    # ViT would take as long as a round.
    call(tiles[:max_batch_tiles])
    sync()
    if repeats > 0:
        times = interleaved(
            {"baseline": baseline, "forward": candidate}, repeats=repeats, warmup=0, sync=sync
        )
    else:  # --quick with a slow backbone: time the backbone once, estimate from the split
        times = {"baseline": [time_once(baseline, sync)], "forward": []}

    # The stages on their own, interleaved too.
    features = baseline()
    num_prefix = adapter.num_prefix_tokens
    cache = getattr(plan_module, "_plan_cached", None)

    def plan_cold() -> list:
        if cache is not None:
            cache.cache_clear()
        return [dynamic_s2.plan_tiles(img.shape[-2], img.shape[-1], SCALES) for img in images]

    def plan_warm() -> list:
        return [dynamic_s2.plan_tiles(img.shape[-2], img.shape[-1], SCALES) for img in images]

    def tile() -> torch.Tensor:
        return dynamic_s2.tile_images(images, plans, mean=mean, std=std).tiles

    def merge() -> torch.Tensor:
        return dynamic_s2.merge(features, plans, num_prefix_tokens=num_prefix).pack()[0]

    merged = dynamic_s2.merge(features, plans, num_prefix_tokens=num_prefix)

    def padded() -> torch.Tensor:
        out = dynamic_s2.MultiScaleFeatures(merged.tokens, merged.sizes, plans, merged.prefix)
        return out.features

    stages = interleaved(
        {
            "plan_cold": plan_cold,
            "plan": plan_warm,
            "tile": tile,
            "merge": merge,
            "features": padded,
        },
        repeats=stage_repeats,
        warmup=1,
        sync=sync,
    )
    plan_warm()  # leave the cache filled
    split = {k: median(v) for k, v in stages.items()}
    encode = median(times["baseline"])
    estimated = 1.0 + (split["plan"] + split["tile"] + split["merge"]) / encode
    out_tokens = merged.tokens
    direct = bool(times["forward"])
    return {
        "backbone": name,
        "num_images": len(images),
        "num_tiles": num_tiles,
        "max_batch_tiles": max_batch_tiles,
        "tile_features_shape": list(features.shape),
        "output_shape_packed": list(out_tokens.shape),
        "output_bytes": out_tokens.numel() * out_tokens.element_size(),
        "forward_s": times["forward"],
        "baseline_s": times["baseline"],
        "forward_median_s": median(times["forward"]) if direct else None,
        "baseline_median_s": encode,
        "ratio_paired_median": (
            paired_ratio(times["forward"], times["baseline"]) if direct else None
        ),
        "ratio_of_medians": median(times["forward"]) / encode if direct else None,
        "ratio_from_split": estimated,
        "baseline_spread": spread(times["baseline"]),
        "split_median_s": {
            "plan_cold": split["plan_cold"],
            "plan_cached": split["plan"],
            "tile": split["tile"],
            "encode": encode,
            "merge_packed": split["merge"],
            "padded_features_view": split["features"],
        },
        "stage_repeats": stage_repeats,
        "repeats": repeats,
    }


def targets(results: list[dict]) -> dict:
    """The ViT-S target, judged on both figures: the direct ratio (paired median of forward /
    backbone) and the split estimate (1 + the stages timed alone / backbone). ``met`` is True or
    False when they agree and None (borderline) when they fall on either side of the target.
    """
    vit = [r for r in results if r["backbone"] == "vit-s"]
    if not vit:
        return {"vit-s forward / backbone": TARGET_VIT, "met": None}
    paired, split = vit[0]["ratio_paired_median"], vit[0]["ratio_from_split"]
    by_split = split <= TARGET_VIT
    by_direct = None if paired is None else paired <= TARGET_VIT
    return {
        "vit-s forward / backbone": TARGET_VIT,
        "met_by_direct_ratio": by_direct,
        "met_by_split_estimate": by_split,
        "met": by_split if by_direct in (None, by_split) else None,
        "borderline": by_direct is not None and by_direct != by_split,
    }


def build_table(data: dict) -> str:
    """The markdown table of a results dict (also used to re-render a saved JSON)."""
    results, config = data["results"], data["config"]
    header = [
        "backbone",
        "images / tiles",
        "backbone alone (ms)",
        "spread",
        "forward (ms)",
        "**forward / backbone**",
        "**1 + (plan+tile+merge) / backbone**",
        "rounds",
    ]
    rows = [
        [
            r["backbone"],
            f"{r['num_images']} / {r['num_tiles']}",
            fmt_ms(r["baseline_median_s"]),
            f"{spread(r['baseline_s']):.0%}",
            fmt_ms(r["forward_median_s"]) if r["forward_median_s"] is not None else "—",
            f"**{_fmt_ratio(r['ratio_paired_median'])}**",
            f"**{r['ratio_from_split']:.3f}**",
            r["repeats"],
        ]
        for r in results
    ]
    split_header = [
        "backbone",
        "plan, cold (ms)",
        "plan, cached (ms)",
        "tile (ms)",
        "encode (ms)",
        "merge, packed (ms)",
        "padded `.features` (ms)",
    ]
    keys = ("plan_cold", "plan_cached", "tile", "encode", "merge_packed", "padded_features_view")
    split_rows = [[r["backbone"]] + [fmt_ms(r["split_median_s"][k]) for k in keys] for r in results]
    t = data.get("targets", {})
    verdict = ""
    if "met_by_split_estimate" in t:
        status = "borderline" if t.get("borderline") else ("met" if t["met"] else "not met")
        vit = next(r for r in results if r["backbone"] == "vit-s")
        verdict = (
            f"ViT-S target forward / backbone <= {TARGET_VIT}: **{status}**; direct ratio "
            f"{_fmt_ratio(vit['ratio_paired_median'])} (only as good as the backbone's spread), "
            f"split estimate {vit['ratio_from_split']:.3f}.\n\n"
        )
    sizes = config["image_sizes"]
    return (
        markdown_table(header, rows)
        + "\n\n"
        + verdict
        + "Where the time goes (medians of the stages timed on their own):\n\n"
        + markdown_table(split_header, split_rows)
        + f"\n\nImages (h, w): {', '.join(f'{h}x{w}' for h, w in sizes)}; scales "
        + f"{tuple(config['scales'])}; max_batch_tiles={config['max_batch_tiles']}.\n\n"
        + machine_line(data["machine"])
    )


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="8 images; the ViT-S backbone runs once and its ratio comes from the split",
    )
    parser.add_argument("--images", type=int, default=None, help="number of images (8-16)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per backbone")
    parser.add_argument("--max-batch-tiles", type=int, default=32)
    parser.add_argument("--backbones", default="tiny,vit-s", help="comma list: tiny,vit-s")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args.device)
    info = machine_info(device, dtype)  # at the start: load average, time
    n = args.images or (8 if args.quick else 12)
    sizes = list(IMAGE_SIZES[:n])
    images = random_images(sizes, device=device)
    results = []
    torch.set_grad_enabled(False)
    for name in args.backbones.split(","):
        if name == "tiny":
            model: nn.Module = TinyPatchEmbed()
            reps = args.repeats or (3 if args.quick else 7)
            stage_reps = reps

            def call(x: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
                return model(x)

        elif name == "vit-s":
            model = build_vit_s()
            reps = (0 if args.quick else 3) if args.repeats is None else args.repeats
            stage_reps = 3 if args.quick else 5

            def call(x: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
                return model(pixel_values=x).last_hidden_state

        else:
            raise SystemExit(f"unknown backbone {name!r}: use tiny or vit-s")
        model = model.to(device=device, dtype=dtype).eval()
        t0 = time.perf_counter()
        row = run_backbone(
            name,
            model,
            call,
            images,
            max_batch_tiles=args.max_batch_tiles,
            repeats=reps,
            stage_repeats=stage_reps,
            device=device,
        )
        row["wall_s"] = time.perf_counter() - t0
        results.append(row)
        print(
            f"{name}: forward/backbone = {_fmt_ratio(row['ratio_paired_median'])} (paired "
            f"median), {row['ratio_from_split']:.3f} (from the split) in {row['wall_s']:.0f} s",
            file=sys.stderr,
        )

    data = {
        "name": "overhead",
        "machine": info,
        "config": {
            "image_sizes": sizes,
            "scales": SCALES,
            "max_batch_tiles": args.max_batch_tiles,
            "quick": args.quick,
        },
        "results": results,
    }
    data["targets"] = targets(results)
    data["table"] = build_table(data)
    table = data["table"]
    report("overhead", data, table)
    return data


if __name__ == "__main__":
    main()
