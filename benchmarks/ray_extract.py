"""Images/s of ``extract_ray`` (Ray Data, Parquet) against the single-process ``extract``.

Both engines extract the same folder of JPEG photos (the benchmarks' size mix: phone photos,
portraits, frames, panoramas, thumbnails) through the same small backbone (a 16x16 stride-16 patch
embedding, so that reading, tiling and writing, not the backbone, dominate), at the same scales,
into a fresh output folder each time, round after round with the order alternating. The local
engine reads and tiles in ``--workers`` DataLoader workers and writes safetensors; the Ray engine
runs on a local cluster started once beforehand (its start-up is reported apart), with one
encoding actor, CPU tasks reading and tiling, and Parquet writes. The figure is the paired
ratio of images/s, Ray over local.

Run: ``python benchmarks/ray_extract.py [--quick] [--images 24] [--rounds 3]``; writes
``benchmarks/results/ray_extract.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    IMAGE_SIZES,
    TinyPatchEmbed,
    interleaved,
    machine_info,
    machine_line,
    markdown_table,
    median,
    paired_ratio,
    random_images,
    report,
    spread,
)


def make_folder(root: Path, count: int) -> Path:
    """``count`` JPEG photos of the benchmarks' size mix (cycling through the first 8 sizes)."""
    from PIL import Image

    folder = root / "images"
    folder.mkdir()
    sizes = [IMAGE_SIZES[i % 8] for i in range(count)]
    for i, image in enumerate(random_images(sizes)):
        # smooth content compresses like a photo; pure noise would make JPEG decoding the test
        small = torch.nn.functional.interpolate(image[None].float(), scale_factor=1 / 16)
        photo = torch.nn.functional.interpolate(small, size=image.shape[1:], mode="bilinear")
        pixels = photo[0].clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"photo{i:03d}.jpg", quality=90)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 images, 2 rounds")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="local engine's DataLoader workers")
    parser.add_argument("--batch-images", type=int, default=8)
    parser.add_argument("--scales", default="224,448")
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds = 12, 2
    scales = tuple(int(s) for s in args.scales.split(","))

    import ray

    from dynamic_s2.extract import extract
    from dynamic_s2.ray import extract_ray

    torch.manual_seed(0)
    model = TinyPatchEmbed().eval()
    root = Path(tempfile.mkdtemp(prefix="ray_extract_"))
    folder = make_folder(root, args.images)
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    info = machine_info("cpu", torch.float32)
    info["ray"] = ray.__version__
    info["ray_cpus"] = ray.cluster_resources().get("CPU")
    runs = {"local": 0, "ray": 0}

    def fresh(name: str) -> Path:
        runs[name] += 1
        out = root / f"{name}-{runs[name]}"
        shutil.rmtree(out, ignore_errors=True)
        return out

    common = {"backbone": model, "scales": scales, "batch_images": args.batch_images}
    fns = {
        "local": lambda: extract(
            folder, fresh("local"), workers=args.workers, progress=False, **common
        ),
        "ray": lambda: extract_ray(folder, fresh("ray"), progress=False, **common),
    }
    try:
        times = interleaved(fns, repeats=args.rounds, warmup=1)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    n = args.images
    rate = {name: [n / t for t in ts] for name, ts in times.items()}
    ratio = paired_ratio(rate["ray"], rate["local"])
    rows = [
        [
            "local `extract`" + f" (workers={args.workers}, safetensors)",
            f"{median(rate['local']):.2f}",
            f"{median(times['local']):.2f}",
            f"{spread(times['local']):.2f}",
            "1.00",
        ],
        [
            "Ray `extract_ray` (1 actor, Parquet)",
            f"{median(rate['ray']):.2f}",
            f"{median(times['ray']):.2f}",
            f"{spread(times['ray']):.2f}",
            f"{ratio:.2f}",
        ],
    ]
    header = ["engine", "images/s", "seconds per run", "spread", "images/s vs local (paired)"]
    table = (
        f"{n} JPEG photos (the benchmarks' size mix), scales {','.join(map(str, scales))}, "
        f"a 16x16 patch-embedding backbone, batches of {args.batch_images} images, "
        f"{args.rounds} rounds; Ray {ray.__version__} local cluster "
        f"({info['ray_cpus']:.0f} CPUs) started once beforehand in {ray_start:.1f} s.\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        + machine_line(info)
    )
    data = {
        "machine": info,
        "images": n,
        "scales": list(scales),
        "batch_images": args.batch_images,
        "local_workers": args.workers,
        "ray_start_seconds": ray_start,
        "seconds": times,
        "images_per_second": rate,
        "ray_over_local_paired": ratio,
        "ray_over_local_of_medians": median(rate["ray"]) / median(rate["local"]),
        "table": table,
    }
    report("ray_extract", data, table)


if __name__ == "__main__":
    main()
