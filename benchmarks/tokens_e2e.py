"""uint8 images → LLM tokens, end to end: the project's path against NVILA's as shipped.

A small random HF SigLIP (patch 14, 448 px, so 32×32 tokens per tile; a few narrow layers) over
NVILA's scales (448, 896, 1344), ``policy="nvila"``, a mix of 4 image sizes by default.

- **NVILA as shipped**: PIL preprocessing (``convert("RGB")``, ``resize`` and crop per tile,
  ``/255``, normalise: ``nvila.preprocess_batch`` on PIL images, identical to NVILA's tiles),
  one tower call on all tiles, ``hidden_states[-2]``, the per-image loop merge and
  ``DownSampleBlock`` (``tokens_speed.vila_tokens``).
- **dynamic_s2**: ``nvila.preprocess_batch`` on uint8 tensors (one ``tile_images`` call), the tower
  through ``encode_tiles(..., feature_layer=-2)``, ``nvila.merge_and_pack`` on its channel-major
  hidden states.

Each stage is timed on its own, round after round with alternating order, and the table gives each
stage's share of its path and which stage bounds it.

Run: ``python benchmarks/tokens_e2e.py [--quick] [--images 4] [--repeats 2]``; writes
``benchmarks/results/tokens_e2e.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dynamic_s2
from dynamic_s2 import encode_tiles, nvila

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    IMAGE_SIZES,
    fmt_ms,
    interleaved,
    machine_info,
    machine_line,
    markdown_table,
    median,
    random_images,
    report,
    synchronizer,
)
from tokens_speed import vila_tokens

SCALES = (448, 896, 1344)
#: A small random SigLIP: NVILA's tile geometry (448 px, patch 14), narrow and shallow.
SMALL_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
STAGES = ("preprocess", "tower", "merge + pack")


def make_tower(device: torch.device, dtype: torch.dtype, **config: int) -> torch.nn.Module:
    """A random-weight HF ``SiglipVisionModel`` with 448 px tiles and patch 14."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    settings = {"image_size": 448, "patch_size": 14, "num_attention_heads": 2, **config}
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(**settings)).to(device, dtype).eval()


def to_pil(images: Sequence[torch.Tensor]) -> list[Any]:
    """The same images as PIL RGB images."""
    from PIL import Image

    return [
        Image.fromarray(np.ascontiguousarray(im.cpu().permute(1, 2, 0).numpy())) for im in images
    ]


def stage_fns(
    tower: torch.nn.Module,
    tensors: list[torch.Tensor],
    pils: list[Any] | None,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scales: Sequence[int] = SCALES,
) -> dict[str, dict[str, Callable[[], object]]]:
    """Per path, its stages as zero-argument calls on inputs made once (the previous stage's)."""
    device = next(tower.parameters()).device
    dtype = next(tower.parameters()).dtype
    plans = [
        dynamic_s2.plan_tiles(int(im.shape[1]), int(im.shape[2]), scales, policy="nvila")
        for im in tensors
    ]
    grids = [p.scales[-1].grid for p in plans]
    ours_tiles = nvila.preprocess_batch(tensors, scales)[0]
    run = encode or (lambda t: encode_tiles(tower, t.to(dtype), feature_layer=-2))
    ours_feats = run(ours_tiles)
    out: dict[str, dict[str, Callable[[], object]]] = {
        "dynamic_s2": {
            "preprocess": lambda: nvila.preprocess_batch(tensors, scales),
            "tower": lambda: run(ours_tiles),
            "merge + pack": lambda: nvila.merge_and_pack(ours_feats, plans),
        }
    }
    if pils is not None:
        ref_tiles = nvila.preprocess_batch(pils, scales)[0].to(device, dtype)
        ref_feats = tower(ref_tiles, output_hidden_states=True).hidden_states[-2]
        out["NVILA as shipped"] = {
            "preprocess": lambda: nvila.preprocess_batch(pils, scales)[0].to(device),
            "tower": lambda: tower(ref_tiles, output_hidden_states=True).hidden_states[-2],
            "merge + pack": lambda: torch.cat(vila_tokens(ref_feats, grids, scales)),
        }
    return out


def measure(
    paths: dict[str, dict[str, Callable[[], object]]], repeats: int, device: torch.device
) -> dict[str, dict]:
    """Time every stage of every path in interleaved rounds; shares and the bounding stage."""
    flat = {f"{p}|{s}": fn for p, stages in paths.items() for s, fn in stages.items()}
    times = interleaved(flat, repeats=repeats, warmup=1, sync=synchronizer(device))
    result: dict[str, dict] = {}
    for p, stages in paths.items():
        med = {s: median(times[f"{p}|{s}"]) for s in stages}
        total = sum(med.values())
        result[p] = {
            "median_s": med,
            "total_s": total,
            "share": {s: v / total for s, v in med.items()},
            "bound_by": max(med, key=lambda s: med[s]),
            "times_s": {s: times[f"{p}|{s}"] for s in stages},
        }
    return result


def stage_table(result: dict[str, dict], baseline: str | None) -> str:
    """One row per path: every stage's time and share, the total, and the bounding stage."""
    rows = []
    for p, r in result.items():
        cells = [f"{fmt_ms(r['median_s'][s])} ({r['share'][s]:.0%})" for s in r["median_s"]]
        speed = f"{result[baseline]['total_s'] / r['total_s']:.2f}x" if baseline in result else "—"
        rows.append([p, *cells, fmt_ms(r["total_s"]), speed, r["bound_by"]])
    header = ["path", *(f"{s} (ms, share)" for s in STAGES), "total (ms)", "speed-up", "bound by"]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 small images, 1 round")
    parser.add_argument("--images", type=int, default=None, help="batch size (default 4)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info("cpu", torch.float32)
    torch.set_grad_enabled(False)
    sizes = list(IMAGE_SIZES[3:7] if args.quick else IMAGE_SIZES[: args.images or 4])
    repeats = args.repeats or (1 if args.quick else 2)
    tensors = random_images(sizes)
    tower = make_tower(torch.device("cpu"), torch.float32, **SMALL_TOWER)
    paths = stage_fns(tower, tensors, to_pil(tensors))
    result = measure(paths, repeats, torch.device("cpu"))
    tiles = sum(dynamic_s2.plan_tiles(h, w, SCALES, policy="nvila").num_tiles for h, w in sizes)
    text = "\n\n".join(
        [
            stage_table(result, "NVILA as shipped"),
            f"{len(sizes)} images ({', '.join(f'{h}x{w}' for h, w in sizes)}), {tiles} tiles; "
            f"tower: random SigLIP {SMALL_TOWER}, 448 px, patch 14.",
            machine_line(info),
        ]
    )
    data = {
        "name": "tokens_e2e",
        "machine": info,
        "config": {"scales": SCALES, "image_sizes": sizes, "tiles": tiles, "tower": SMALL_TOWER},
        "paths": result,
        "table": text,
    }
    report("tokens_e2e", data, text)
    return data


if __name__ == "__main__":
    main()
