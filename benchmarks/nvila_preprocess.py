"""NVILA preprocessing: the torch uint8 path against the PIL path, on the same images.

Candidates (all ``dynamic_s2.nvila``, scales 448/896/1344, ``max_tiles`` 12, SigLIP normalisation):

* ``pil`` (baseline): ``preprocess(pil_image)`` per image: PIL ``resize`` + crop, as NVILA;
* ``torch``: ``preprocess(uint8_tensor)`` per image (``tile_images``, bicubic antialias, float32);
* ``torch-batch``: one ``preprocess_batch(uint8_tensors)`` call for all images;
* ``torch-1thread``: ``torch`` with ``torch.set_num_threads(1)``, since PIL runs on one core;
* ``cuda`` / ``cuda-batch`` (when a GPU is present): the torch path on GPU-resident uint8 images.
* ``nvila-hf`` (when transformers is installed, ``--no-hf`` skips it): NVILA's own processing as
  shipped, PIL resize + crop and then ``SiglipImageProcessor`` per tile, for context.

Images: the photos in ``examples/images`` plus photo crops resized (PIL) to a few common sizes,
decoded and converted beforehand (no file I/O or decoding is timed). Every path must report the
same grids. All paths run in one process, round after round with alternating order; the figures
are medians over rounds and the paired ratio ``pil / candidate``. The issue's target: torch path
at least 3x faster than the PIL path on CPU.

Run: ``python benchmarks/nvila_preprocess.py [--repeats N] [--no-hf]``; writes
``benchmarks/results/nvila_preprocess.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dynamic_s2 import nvila, plan_tiles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    fmt_ms,
    interleaved,
    machine_info,
    machine_line,
    markdown_table,
    median,
    paired_ratio,
    spread,
    synchronizer,
    write_result,
)

IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"
#: Extra sizes (w, h), filled with photo content: 1000x600 (the issue's example), full-HD frames in
#: both orientations, a wide banner, a 12 MP phone photo.
EXTRA_SIZES: tuple[tuple[int, int], ...] = (
    (1000, 600),
    (1920, 1080),
    (1080, 1920),
    (2750, 1000),
    (4032, 3024),
)
TARGET = 3.0


def load_images() -> tuple[list[str], list]:
    """Names and RGB PIL images: the example photos and photo content at ``EXTRA_SIZES``."""
    from PIL import Image

    names, images = [], []
    paths = sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    for p in paths:
        with Image.open(p) as im:
            names.append(p.name)
            images.append(im.convert("RGB"))
    rng = np.random.default_rng(0)
    for w, h in EXTRA_SIZES:
        src = images[int(rng.integers(len(paths)))]
        x0, y0 = int(rng.integers(0, src.width // 4)), int(rng.integers(0, src.height // 4))
        names.append(f"photo crop {w}x{h}")
        images.append(src.crop((x0, y0, src.width, src.height)).resize((w, h)))
    return names, images


def hf_nvila(images: list) -> Callable[[], object] | None:
    """NVILA's processing as shipped: PIL resize + crop, then SiglipImageProcessor per tile."""
    try:
        import transformers
    except ImportError:
        return None
    # transformers 5 names the PIL/numpy processor SiglipImageProcessorPil; earlier versions
    # call it SiglipImageProcessor.
    cls = (
        getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    )
    processor = cls(size={"height": 448, "width": 448}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    plans = [
        plan_tiles(im.height, im.width, nvila.DEFAULT_SCALES, max_tiles=12, policy="nvila")
        for im in images
    ]

    def run() -> object:
        out = []
        for im, plan in zip(images, plans, strict=True):
            tiles = []
            for sp in plan.scales:
                canvas = im.resize((sp.canvas_size[1], sp.canvas_size[0]))
                for y, x in sp.tile_offsets():
                    tiles.append(canvas.crop((x, y, x + 448, y + 448)))
            pixels = [
                processor.preprocess(t, return_tensors="pt")["pixel_values"][0] for t in tiles
            ]
            out.append(torch.stack(pixels))
        return torch.cat(out)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-hf", action="store_true", help="skip the NVILA-as-shipped path")
    args = parser.parse_args()

    names, pils = load_images()
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in pils]

    # Same grids on every path (and the PIL path's block sizes are NVILA's).
    pil_blocks = [nvila.preprocess(im)[1] for im in pils]
    torch_tiles, torch_blocks = nvila.preprocess_batch(tensors)
    if pil_blocks != torch_blocks:
        raise SystemExit(f"grids differ: PIL {pil_blocks} vs torch {torch_blocks}")
    pil_tiles = torch.cat([nvila.preprocess(im)[0] for im in pils])
    mean_abs_diff = float((torch_tiles - pil_tiles).abs().mean())
    del torch_tiles, pil_tiles

    def run_pil() -> object:
        return [nvila.preprocess(im) for im in pils]

    def run_torch() -> object:
        return [nvila.preprocess(t) for t in tensors]

    def run_batch() -> object:
        return nvila.preprocess_batch(tensors)

    def run_torch_1thread() -> object:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [nvila.preprocess(t) for t in tensors]
        finally:
            torch.set_num_threads(threads)

    fns: dict[str, Callable[[], object]] = {
        "pil": run_pil,
        "torch": run_torch,
        "torch-batch": run_batch,
        "torch-1thread": run_torch_1thread,
    }
    hf = None if args.no_hf else hf_nvila(pils)
    if hf is not None:
        fns["nvila-hf"] = hf
    info = machine_info("cpu", torch.float32)
    times = interleaved(fns, repeats=args.repeats)

    cuda: dict[str, object] | None = None
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        on_gpu = [t.to(dev) for t in tensors]
        sync = synchronizer(dev)
        gpu_fns: dict[str, Callable[[], object]] = {
            "cuda": lambda: [nvila.preprocess(t) for t in on_gpu],
            "cuda-batch": lambda: nvila.preprocess_batch(on_gpu),
            "cuda-batch+h2d": lambda: nvila.preprocess_batch([t.to(dev) for t in tensors]),
        }
        gpu_times = interleaved(gpu_fns, repeats=max(args.repeats, 10), sync=sync)
        times.update(gpu_times)
        cuda = {"device_name": torch.cuda.get_device_name(dev), "torch_cuda": torch.version.cuda}

    n = len(pils)
    tiles = sum(1 + 4 + r * c for r, c in pil_blocks)
    rows = []
    for name, values in times.items():
        rows.append(
            [
                name,
                fmt_ms(median(values)),
                fmt_ms(median(values) / n),
                f"{paired_ratio(times['pil'], values):.2f}x"
                if name in fns
                else f"{median(times['pil']) / median(values):.2f}x",
                f"{spread(values):.0%}",
            ]
        )
    header = ["path", "all images (ms)", "per image (ms)", "speed-up vs pil", "spread"]
    result = {
        "machine": info,
        "cuda": cuda,
        "scales": list(nvila.DEFAULT_SCALES),
        "max_tiles": nvila.DEFAULT_MAX_TILES,
        "images": [
            {"name": nm, "size_wh": [im.width, im.height], "block_size": list(b)}
            for nm, im, b in zip(names, pils, pil_blocks, strict=True)
        ],
        "total_tiles": tiles,
        "mean_abs_diff_torch_vs_pil": mean_abs_diff,
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": {k: median(v) for k, v in times.items()},
        "speedup_vs_pil": {
            k: (paired_ratio(times["pil"], v) if k in fns else median(times["pil"]) / median(v))
            for k, v in times.items()
        },
        "target_speedup_cpu": TARGET,
    }
    path = write_result("nvila_preprocess", result)

    print(
        f"{n} images, {tiles} tiles of 448 x 448; same grids on every path; mean |torch - pil| "
        f"= {mean_abs_diff:.4f} (normalised units)\n"
    )
    print(markdown_table(header, rows))
    print()
    print(machine_line(info))
    if cuda is not None:
        print(
            f"GPU: {cuda['device_name']} (CUDA {cuda['torch_cuda']}); GPU rows compare with the "
            "CPU PIL median."
        )
    best = result["speedup_vs_pil"]["torch-batch"]
    print(
        f"\nCPU target: torch path >= {TARGET:.0f}x the PIL path; measured (torch-batch) "
        f"{best:.2f}x -> {'met' if best >= TARGET else 'NOT met'}"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
