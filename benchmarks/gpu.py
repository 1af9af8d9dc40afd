"""One GPU run, under 5 minutes: features → tokens, tiling, and images → tokens, in bfloat16.

On a CUDA machine (the card is recorded with ``torch.cuda.get_device_name``) it measures, each
against its baseline in the same rounds:

1. **features → tokens** at SigLIP-so400m width (6 mixed images, NVILA grids, C = 1152):
   VILA's path (``tokens_speed.vila_tokens``) against ``nvila.merge_and_pack`` fresh and with
   ``out=`` reused, on contiguous and on HF's channel-major features; with ``merge(...).pack()``
   and ``merge(...).features`` (the merge kernel's other two outputs), every path as the fraction
   of its memory bound (features read + output written at the card's copy bandwidth, measured in
   the same rounds);
2. **tiling**: ``nvila.preprocess_batch`` on uint8 tensors already on the device (one
   ``tile_images`` call) against PIL preprocessing on the host plus the copy to the device;
3. **images → tokens** with a SigLIP-so400m-shaped random tower (27 layers, 1152 wide, 16 heads,
   MLP 4304, patch 14, 448 px): NVILA's path (PIL, one tower call, loop merge, ``DownSampleBlock``)
   against dynamic_s2's (device tiling, ``encode_tiles``, ``merge_and_pack``), the latter plain,
   with fixed chunk shapes (``max_batch_tiles`` + ``pad_to_multiple``), and with
   ``DynamicS2.compile_backbone()`` on top of those chunks.

It writes ``benchmarks/results/gpu.json`` and prints a table. ``--smoke`` runs the same code on the
CPU at tiny sizes in float32 in seconds (the test suite runs it) and writes to ``--out`` (default: a
``gpu_smoke.json`` beside ``gpu.json``). Without CUDA and without ``--smoke`` it says so and exits.

Run: ``python benchmarks/gpu.py [--smoke] [--out PATH] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import dynamic_s2
from dynamic_s2 import encode_tiles, nvila

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    IMAGE_SIZES,
    RESULTS,
    fmt_ms,
    interleaved,
    machine_info,
    machine_line,
    markdown_table,
    median,
    paired_ratio,
    random_images,
    synchronizer,
)
from tokens_e2e import make_tower, measure, stage_fns, stage_table, to_pil
from tokens_speed import vila_tokens

FULL = {
    "scales": (448, 896, 1344),
    "channels": 1152,
    "images": 6,
    "tower": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
    },
    "chunk": 32,
    "compile": {},
}
SMOKE = {
    "scales": (56, 112, 168),
    "channels": 16,
    "images": 2,
    "image_sizes": ((150, 200), (96, 128)),
    "tower": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "image_size": 56},
    "chunk": 8,
    "compile": {"backend": "eager"},
}


def _sizes(cfg: dict) -> list[tuple[int, int]]:
    return list(cfg.get("image_sizes") or IMAGE_SIZES[: cfg["images"]])


def features_to_tokens(cfg: dict, device: torch.device, dtype: torch.dtype, repeats: int) -> list:
    """Section 1: VILA's path against ``merge_and_pack``, and ``merge(...).pack()`` /
    ``.features`` (the merge kernel's three outputs), both layouts, each beside its memory bound:
    (features read + output written) at the card's copy bandwidth, measured in the same rounds."""
    sizes = _sizes(cfg)
    plans = [dynamic_s2.plan_tiles(h, w, cfg["scales"], policy="nvila") for h, w in sizes]
    grids = [p.scales[-1].grid for p in plans]
    total = sum(p.num_tiles for p in plans)
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = (cfg["scales"][0] // 14) ** 2
    base = torch.randn((total, tokens, cfg["channels"]), generator=gen, device=device, dtype=dtype)
    rows = []
    for layout in ("contiguous", "channel-major"):
        feats = (
            base if layout == "contiguous" else base.transpose(1, 2).contiguous().transpose(1, 2)
        )
        buffer = nvila.merge_and_pack(feats, plans)[0]
        merged = dynamic_s2.merge(feats, plans)
        elem = feats.element_size()
        out_bytes = {
            "fresh": buffer.numel() * elem,
            "out": buffer.numel() * elem,
            "pack": merged.tokens.numel() * elem,
            "features": merged.features.numel() * elem + merged.mask.numel(),
        }
        del merged
        copy = {"src": torch.ones_like(buffer), "dst": torch.empty_like(buffer)}
        fns: dict[str, Callable[[], object]] = {
            "vila": lambda f=feats: vila_tokens(f, grids, cfg["scales"]),
            "fresh": lambda f=feats: nvila.merge_and_pack(f, plans),
            "out": lambda f=feats, b=buffer: nvila.merge_and_pack(f, plans, out=b),
            "pack": lambda f=feats: dynamic_s2.merge(f, plans).pack(),
            "features": lambda f=feats: dynamic_s2.merge(f, plans).features,
            "copy": lambda c=copy: c["dst"].copy_(c["src"]),
        }
        times = interleaved(fns, repeats=repeats, warmup=1, sync=synchronizer(device))
        bandwidth = 2 * out_bytes["out"] / median(times["copy"])  # read + write, bytes/s
        in_bytes = feats.numel() * elem
        bound = {k: (in_bytes + b) / bandwidth for k, b in out_bytes.items()}
        equal = bool(torch.equal(torch.cat(vila_tokens(feats, grids, cfg["scales"])), buffer))
        rows.append(
            {
                "layout": layout,
                "median_s": {k: median(v) for k, v in times.items()},
                "speedup_fresh": paired_ratio(times["vila"], times["fresh"]),
                "speedup_out": paired_ratio(times["vila"], times["out"]),
                "copy_GBps": bandwidth / 1e9,
                "bound_s": bound,
                "fraction_of_bound": {k: bound[k] / median(times[k]) for k in bound},
                "equal_to_vila": equal,
            }
        )
        copy.clear()
    return rows


def tiling(cfg: dict, device: torch.device, repeats: int) -> dict:
    """Section 2: uint8 tiling on the device against PIL preprocessing (+ copy to the device)."""
    sizes = _sizes(cfg)
    host = random_images(sizes)
    on_device = [im.to(device) for im in host]
    pils = to_pil(host)
    fns: dict[str, Callable[[], object]] = {
        "pil": lambda: nvila.preprocess_batch(pils, cfg["scales"])[0].to(device),
        "device": lambda: nvila.preprocess_batch(on_device, cfg["scales"]),
    }
    times = interleaved(fns, repeats=repeats, warmup=1, sync=synchronizer(device))
    return {
        "median_s": {k: median(v) for k, v in times.items()},
        "speedup": paired_ratio(times["pil"], times["device"]),
    }


def end_to_end(cfg: dict, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """Section 3: images → tokens, NVILA's path and dynamic_s2's plain / chunked / compiled."""
    sizes = _sizes(cfg)
    tensors = [im.to(device) for im in random_images(sizes)]
    tower = make_tower(device, dtype, **cfg["tower"])
    chunk = cfg["chunk"]
    chunked = dynamic_s2.DynamicS2(
        tower, scales=cfg["scales"], feature_layer=-2, max_batch_tiles=chunk, pad_to_multiple=chunk
    )
    compiled = dynamic_s2.DynamicS2(
        tower, scales=cfg["scales"], feature_layer=-2, max_batch_tiles=chunk, pad_to_multiple=chunk
    )
    t0 = time.perf_counter()
    compiled.compile_backbone(**cfg["compile"])
    results = {}
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
        "plain": None,
        "chunked": lambda t: encode_tiles(
            chunked.adapter, t.to(dtype), max_batch_tiles=chunk, pad_to_multiple=chunk
        ),
        "compiled": lambda t: encode_tiles(
            compiled.adapter, t.to(dtype), max_batch_tiles=chunk, pad_to_multiple=chunk
        ),
    }
    for name, encode in variants.items():
        pils = to_pil(tensors) if name == "plain" else None
        paths = stage_fns(tower, tensors, pils, encode, cfg["scales"])
        measured = measure(paths, repeats, device)
        results[name] = {
            "paths": measured,
            "table": stage_table(measured, "NVILA as shipped" if pils else None),
        }
    results["compile_and_first_calls_s"] = time.perf_counter() - t0
    return results


def report(data: dict) -> str:
    """The printed table."""
    f2t = markdown_table(
        [
            "features",
            "VILA (ms)",
            "fresh (ms)",
            "out= (ms)",
            "fresh speed-up",
            "out= speed-up",
            "copy GB/s",
            "fraction of bound: fresh / out= / pack() / .features",
        ],
        [
            [
                r["layout"],
                fmt_ms(r["median_s"]["vila"]),
                fmt_ms(r["median_s"]["fresh"]),
                fmt_ms(r["median_s"]["out"]),
                f"**{r['speedup_fresh']:.1f}x**",
                f"**{r['speedup_out']:.1f}x**",
                f"{r['copy_GBps']:.0f}",
                " / ".join(
                    f"{r['fraction_of_bound'][k]:.2f}" for k in ("fresh", "out", "pack", "features")
                ),
            ]
            for r in data["features_to_tokens"]
        ],
    )
    til = data["tiling"]
    e2e = data["end_to_end"]
    parts = [
        f"features → tokens ({data['dtype']}):",
        f2t,
        f"tiling: PIL + copy {fmt_ms(til['median_s']['pil'])} ms, uint8 on the device "
        f"{fmt_ms(til['median_s']['device'])} ms: **{til['speedup']:.1f}x**.",
        "images → tokens, plain (one tower call per path):",
        e2e["plain"]["table"],
        f"with max_batch_tiles = pad_to_multiple = {data['config']['chunk']}:",
        e2e["chunked"]["table"],
        "with compile_backbone() on the same chunks:",
        e2e["compiled"]["table"],
        machine_line(data["machine"]),
    ]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, seconds")
    parser.add_argument("--out", default=None, help="JSON path (default results/gpu.json)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3, smoke 1)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here; nothing measured (use --smoke for the CPU check)")
        return None
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16  # bf16 matmuls are slow on CPUs
    cfg = SMOKE if args.smoke else FULL
    repeats = args.repeats or (1 if args.smoke else 3)
    info = machine_info(device, dtype)
    torch.set_grad_enabled(False)
    data = {
        "name": "gpu_smoke" if args.smoke else "gpu",
        "machine": info,
        "dtype": str(dtype).replace("torch.", ""),
        "config": {**cfg, "repeats": repeats, "smoke": args.smoke},
        "features_to_tokens": features_to_tokens(cfg, device, dtype, repeats),
        "tiling": tiling(cfg, device, repeats),
        "end_to_end": end_to_end(cfg, device, dtype, repeats),
    }
    data["table"] = report(data)
    path = Path(args.out) if args.out else RESULTS / f"{data['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(data["table"])
    print(f"\nwrote {path}", file=sys.stderr)
    return data


if __name__ == "__main__":
    main()
