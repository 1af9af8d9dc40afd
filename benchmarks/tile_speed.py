"""The tile stage against its memory bound: uint8 images -> normalised float32 NVILA tiles.

``nvila.preprocess_batch`` on uint8 tensors (one ``tile_images`` call: torch's integer bicubic
resize per scale, then one pass that converts, normalises and cuts into ``[T, 3, 448, 448]``
float32 tiles), for the benchmarks' size mix. Its memory bound is the images read plus the tiles
written at the copy bandwidth, plus the first touch of the (fresh) tiles, measured in the same
rounds (a copy of the tiles' size into a warm buffer, and a clone into fresh memory). A profile of
one call splits the time into the resize (compute: antialiased bicubic filters) and the rest.

Run: ``python benchmarks/tile_speed.py [--images 6] [--repeats 3]``; writes
``benchmarks/results/tile_speed.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

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
    random_images,
    report,
)
from merge_speed import profile_call

SCALES = (448, 896, 1344)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6, help="batch size (default 6)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args(argv)
    info = machine_info("cpu", torch.float32)
    torch.set_grad_enabled(False)
    sizes = list(IMAGE_SIZES[: args.images])
    images = random_images(sizes)
    tiles = nvila.preprocess_batch(images, SCALES).tiles
    in_bytes = sum(im.numel() for im in images)
    out_bytes = tiles.numel() * tiles.element_size()
    ref = {"src": torch.ones_like(tiles), "dst": torch.zeros_like(tiles)}
    times = interleaved(
        {
            "stage": lambda: nvila.preprocess_batch(images, SCALES),
            "copy_warm": lambda: ref["dst"].copy_(ref["src"]),
            "clone_fresh": lambda: ref["src"].clone(),
        },
        repeats=args.repeats,
        warmup=0,
    )
    ref.clear()
    t_copy, t_clone = median(times["copy_warm"]), median(times["clone_fresh"])
    bandwidth = 2 * out_bytes / t_copy
    first_touch = max(t_clone - t_copy, 0.0) / out_bytes
    bound = (in_bytes + out_bytes) / bandwidth + out_bytes * first_touch
    stage = median(times["stage"])
    ops = profile_call(lambda: nvila.preprocess_batch(images, SCALES), torch.device("cpu"))
    total_ms = sum(o["self_ms"] for o in ops) / max(sum(o["share"] for o in ops), 1e-9)
    resize_ms = sum(o["self_ms"] for o in ops if "upsample" in o["op"])
    rest = max(stage - resize_ms / 1e3 * stage / (total_ms / 1e3), 1e-9)
    rows = [
        [
            len(sizes),
            tiles.shape[0],
            fmt_ms(stage),
            fmt_ms(stage / len(sizes)),
            fmt_ms(bound),
            f"**{bound / stage:.2f}**",
            f"{resize_ms / total_ms:.0%}",
            fmt_ms(rest),
            f"{bound / rest:.2f}",
        ]
    ]
    table = "\n\n".join(
        [
            markdown_table(
                [
                    "images",
                    "tiles",
                    "stage (ms)",
                    "per image (ms)",
                    "bound (ms)",
                    "fraction of bound",
                    "resize share (profile)",
                    "rest (ms)",
                    "bound / rest",
                ],
                rows,
            ),
            f"Bytes: {in_bytes / 1e6:.0f} MB of uint8 images read, {out_bytes / 1e6:.0f} MB of "
            f"float32 tiles written; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write), "
            f"first touch {first_touch * 1e12:.0f} ms/GB, measured in the same rounds.",
            markdown_table(
                ["op", "self (ms)", "share", "calls"],
                [
                    [f"`{o['op']}`", fmt_ms(o["self_ms"] / 1e3), f"{o['share']:.0%}", o["calls"]]
                    for o in ops[:6]
                ],
            ),
            "Images (h, w): " + ", ".join(f"{h}x{w}" for h, w in sizes) + ".",
            machine_line(info),
        ]
    )
    data = {
        "name": "tile_speed",
        "machine": info,
        "config": {"scales": SCALES, "image_sizes": sizes, "repeats": args.repeats},
        "times_s": times,
        "bytes": {"input": in_bytes, "tiles": out_bytes},
        "copy_GBps": bandwidth / 1e9,
        "first_touch_ms_per_GB": first_touch * 1e12,
        "bound_s": bound,
        "stage_s": stage,
        "fraction_of_bound": bound / stage,
        "resize_share": resize_ms / total_ms,
        "profile": ops,
        "table": table,
    }
    report("tile_speed", data, table)
    return data


if __name__ == "__main__":
    main()
