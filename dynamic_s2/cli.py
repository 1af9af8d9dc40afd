"""The ``dynamic-s2`` command: print and draw tiling plans, extract features, run the demo.

Run ``dynamic-s2 --help`` (or ``python -m dynamic_s2 --help``) and ``dynamic-s2 COMMAND --help``.

Exit status: 0 on success, 2 for invalid arguments, 3 when ``extract`` (or ``demo``) could not
read some images (listed in ``errors.jsonl``), 1 for other failures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import options
from ._checks import printable
from ._cli_args import (
    _add_option_flags,
    _non_negative_int,
    _options,
    _positive_int,
    _UsageError,
)
from ._optional import require
from .extract import DEFAULT_MAX_PIXELS
from .plan import TilePlan

NL = "\n"  # the one control character an error message may show

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3  # equals dynamic_s2.extract.EXIT_SOME_FAILED

DEMO_SCALES = (224, 448, 672)
_DEMO_BACKBONE = "efficientnet-lite0"


# ----------------------------------------------------------------------------------------------
# plan


def _image_size(spec: str) -> tuple[int, int]:
    """(h, w) of an image file after EXIF orientation, read from the header only; or of a literal
    ``HEIGHTxWIDTH`` such as ``1080x1920``."""
    path = Path(spec)
    if not path.exists():
        lowered = spec.lower().replace("×", "x")
        h_text, sep, w_text = lowered.partition("x")
        if sep and h_text.isdigit() and w_text.isdigit():
            return int(h_text), int(w_text)
        raise _UsageError(f"IMAGE: {spec!r} is neither a file nor a size HEIGHTxWIDTH")
    if not path.is_file():  # a FIFO or a device: opening it could block for ever
        raise _UsageError(f"IMAGE: {spec!r} is not a regular file")
    pil_image = require("PIL.Image", "demo")
    try:
        with pil_image.open(path) as image:
            w, h = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception as exc:
        raise _UsageError(f"IMAGE: cannot read {spec!r}: {exc}") from exc
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
        h, w = w, h
    return h, w


def _make_plans(sizes: Sequence[tuple[int, int]], opts: options.S2Options) -> list[TilePlan]:
    """The plans of images of ``sizes`` (planned together under ``--tile-budget``)."""
    if opts.scales is None:
        raise _UsageError("--scales is required, e.g. --scales 448,896,1344")
    try:
        return opts.plan(sizes)
    except (ValueError, TypeError) as exc:
        raise _UsageError(str(exc)) from exc


def format_plan(
    plan: TilePlan, *, name: str | None = None, tokens_per_side: int | None = None
) -> str:
    """A plan as a small text table: one row per scale (grid, canvas, content, tiles).

    With ``tokens_per_side`` (feature cells per tile side, e.g. 7 for 224-px EfficientNet tiles,
    16 for ViT-B/14 at 224), a ``features`` column gives the valid feature grid of every scale.

    Examples:
        >>> import dynamic_s2
        >>> from dynamic_s2.cli import format_plan
        >>> print(format_plan(dynamic_s2.plan_tiles(600, 600, (448, 896)), tokens_per_side=32))
        600×600 (h×w), policy aspect, fit stretch, tile 448 px
          scale  grid  canvas   content  tiles  features
            448  1×1   448×448  448×448      1  32×32
            896  2×2   896×896  896×896      4  64×64
          total                              5
    """
    h, w = plan.image_size
    header = f"{h}×{w} (h×w), policy {plan.policy}, fit {plan.fit}, tile {plan.tile_size} px"
    if plan.halo:
        header = header.replace(
            f"tile {plan.tile_size} px",
            f"stride {plan.tile_size} px, {plan.input_size}-px tiles (halo {plan.halo} px)",
        )
    if name is not None:
        header = f"{name}: {header}"
    columns = ["scale", "grid", "canvas", "content", "tiles"]
    if tokens_per_side is not None:
        columns.append("features")
    rows: list[list[str]] = []
    for sp in plan.scales:
        row = [
            str(sp.scale),
            "{}×{}".format(*sp.grid),
            "{}×{}".format(*sp.canvas_size),
            "{}×{}".format(*sp.content_size),
            str(sp.num_tiles),
        ]
        if tokens_per_side is not None:
            row.append("{}×{}".format(*sp.output_size(tokens_per_side)))
        rows.append(row)
    total = ["total", "", "", "", str(plan.num_tiles)] + ([""] if tokens_per_side else [])
    widths = [max(len(r[c]) for r in [columns, *rows, total]) for c in range(len(columns))]
    right = {0, 4}  # numbers are right-aligned

    def fmt(row: list[str]) -> str:
        cells = [
            cell.rjust(widths[c]) if c in right else cell.ljust(widths[c])
            for c, cell in enumerate(row)
        ]
        return ("  " + "  ".join(cells)).rstrip()

    return "\n".join([header, fmt(columns), *(fmt(r) for r in rows), fmt(total)])


def _cmd_plan(args: argparse.Namespace) -> int:
    opts = _options(args)
    results: list[dict[str, Any]] = []
    plans = _make_plans([_image_size(spec) for spec in args.images], opts)
    for spec, plan in zip(args.images, plans, strict=True):
        if args.json:
            results.append({"image": spec, "plan": plan.to_dict()})
        else:
            print(format_plan(plan, name=printable(spec), tokens_per_side=args.tokens_per_side))
            print()
    if args.json:
        print(json.dumps(results, indent=2))
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# draw


def _cmd_draw(args: argparse.Namespace) -> int:
    from .extract import read_image
    from .viz import draw_plan

    opts = _options(args)
    if opts.scales is None:
        raise _UsageError("--scales is required, e.g. --scales 448,896,1344")
    try:
        image = read_image(args.image)
    except FileNotFoundError as exc:
        raise _UsageError(f"IMAGE: {args.image!r} does not exist") from exc
    except ImportError:
        raise
    except Exception as exc:
        raise _UsageError(f"IMAGE: cannot read {args.image!r}: {exc}") from exc
    (plan,) = _make_plans([(int(image.shape[1]), int(image.shape[2]))], opts)
    draw_plan(image, plan, args.output)
    print(format_plan(plan, name=printable(args.image)))
    print(f"wrote {printable(args.output)}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# extract


def _cmd_extract(args: argparse.Namespace) -> int:
    from .extract import extract

    engine = extract if args.engine == "local" else _ray_engine(args)
    try:
        result = engine(
            args.inputs,
            args.out,
            backbone=args.backbone,
            batch_images=args.batch_images,
            device=args.device,
            dtype=args.dtype,
            workers=args.workers,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            max_pixels=args.max_pixels or None,
            options=_options(args),
        )
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise _UsageError(str(exc)) from exc
    who = f"rank {result.rank}/{result.world_size}: " if result.world_size > 1 else ""
    rate = result.extracted / result.seconds if result.seconds > 0 else 0.0
    print(
        f"{who}extracted {result.extracted} images ({result.skipped} already done, "
        f"{result.failed} failed) into {result.out_dir} in {result.seconds:.1f} s "
        f"({rate:.2f} images/s)"
    )
    if result.rank == 0:
        parquet_dir = getattr(result, "parquet_dir", None)  # the ray engine's result
        print(f"Parquet folder: {parquet_dir}" if parquet_dir else f"manifest: {result.manifest}")
        if result.errors is not None:
            print(f"{result.failed_total} images could not be read; see {result.errors}")
    return EXIT_SOME_FAILED if result.failed_total else EXIT_OK


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (or torchrun ranks), safetensors shards (default); ray: Ray "
        "Data: CPU tasks tile while GPU actors encode, Parquet in DIR/parquet (the ray extra)",
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="--engine ray: the cluster to join (auto, ray://HOST:PORT; default a local one)",
    )
    p.add_argument(
        "--num-gpus",
        type=float,
        default=None,
        metavar="G",
        help="--engine ray: GPUs per encoding actor (default 1 when the cluster has GPUs, else 0)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=1,
        metavar="N",
        help="--engine ray: encoding actors, e.g. the number of GPUs (1); --workers and "
        "--shard-size are for the local engine",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="--engine ray: show Ray's own INFO logs and a progress bar per stage (default: "
        "Ray's warnings only, and one progress bar)",
    )


def _ray_engine(args: argparse.Namespace) -> Any:
    """extract()'s call, run by :func:`dynamic_s2.ray.extract_ray` with the engine flags."""
    from .ray import extract_ray

    def engine(inputs: Any, out: Any, *, workers: int, shard_size: int, **kwargs: Any) -> Any:
        del workers, shard_size  # the local engine's; Ray sizes its own task pool
        engine_args = {"address": args.address, "num_gpus": args.num_gpus, "verbose": args.verbose}
        return extract_ray(inputs, out, concurrency=args.concurrency, **engine_args, **kwargs)

    return engine


# ----------------------------------------------------------------------------------------------
# demo


def find_example_images() -> Path | None:
    """The ``examples/images`` folder of a source checkout, or ``None`` when it is not there.

    It is looked for next to the package (an editable install or a clone) and in the current
    folder.

    Examples:
        >>> from dynamic_s2.cli import find_example_images
        >>> folder = find_example_images()
        >>> folder is None or folder.name == "images"
        True
    """
    candidates = [
        Path(__file__).resolve().parent.parent / "examples" / "images",
        Path.cwd() / "examples" / "images",
    ]
    for folder in candidates:
        if folder.is_dir():
            return folder
    return None


def _cmd_demo(args: argparse.Namespace) -> int:
    from .extract import extract, find_images, load_features, read_image, read_manifest
    from .viz import draw_features, draw_plan

    if args.images is not None:
        images_dir = Path(args.images)
        if not images_dir.is_dir():
            raise _UsageError(f"--images: {args.images!r} is not a folder")
    else:
        found = find_example_images()
        if found is None:
            print(
                "dynamic-s2 demo: the example photos (examples/images/) are not here. They ship "
                "with the source repository, not with the installed package. Clone the "
                'repository and run `pip install -e ".[demo]"` in it, or pass a folder of your '
                "own photos with --images DIR.",
                file=sys.stderr,
            )
            return EXIT_USAGE
        images_dir = found
    out = Path(args.out)
    features_dir = out / "features"
    plans_dir = out / "plans"
    pca_dir = out / "pca"
    photos = find_images(images_dir)
    if not photos:
        raise _UsageError(f"--images: no image files in {images_dir}")
    print(f"dynamic-s2 demo: {len(photos)} photos from {images_dir}")
    print(f"backbone {args.backbone}, scales {','.join(map(str, DEMO_SCALES))}")

    t0 = time.perf_counter()
    result = extract(
        [images_dir],
        features_dir,
        backbone=args.backbone,
        scales=DEMO_SCALES,
        device=args.device,
        workers=args.workers,
        overwrite=True,
        progress=not args.no_progress,
    )
    t_extract = time.perf_counter() - t0

    t1 = time.perf_counter()
    plans_dir.mkdir(parents=True, exist_ok=True)
    pca_dir.mkdir(parents=True, exist_ok=True)
    entries = sorted(read_manifest(features_dir), key=lambda e: e["path"])
    stems: dict[str, int] = {}
    for entry in entries:
        src = Path(entry["path"])
        stem = src.stem if src.stem not in stems else f"{src.stem}-{stems[src.stem]}"
        stems[src.stem] = stems.get(src.stem, 0) + 1
        plan = TilePlan.from_dict(entry["plan"])
        image = read_image(src)
        print()
        print(format_plan(plan, name=printable(src.name), tokens_per_side=7))
        draw_plan(image, plan, plans_dir / f"{stem}.png")
        features = load_features(features_dir, entry).float()
        draw_features(
            features,
            pca_dir / f"{stem}.png",
            scales=plan,
            image=image,
            title=f"{src.name}: PCA of {args.backbone} features, grid "
            f"{features.shape[0]}×{features.shape[1]}, {features.shape[2]} channels",
        )
    t_pictures = time.perf_counter() - t1

    print()
    print(
        f"features of {result.extracted} images: {features_dir} "
        f"(manifest.jsonl, {len(result.shards)} shard(s)), {t_extract:.1f} s"
    )
    print(f"plan pictures: {plans_dir}")
    print(f"PCA pictures:  {pca_dir}  ({t_pictures:.1f} s for all pictures)")
    if result.errors is not None:
        print(f"{result.failed_total} images could not be read; see {result.errors}")
        return EXIT_SOME_FAILED
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# parser and entry point


def _add_plan_command(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="print the tile grid of every scale for images or sizes",
        description="Print the tiling plan of each image: size, and per scale the tile grid, "
        "canvas, content box and tile count. IMAGE is an image file or a size HEIGHTxWIDTH "
        "(e.g. 1080x1920).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file or HEIGHTxWIDTH")
    _add_option_flags(p, "plan")
    p.add_argument(
        "--tokens-per-side",
        type=_positive_int,
        default=None,
        metavar="N",
        help="feature cells per tile side of your backbone (e.g. 7 for EfficientNet-Lite0 at "
        "224 px, 16 for ViT-B/14 at 224); adds the feature grid of every scale",
    )
    p.add_argument("--json", action="store_true", help="print the plans as JSON (to_dict)")
    p.set_defaults(func=_cmd_plan)


def _add_draw_command(sub: Any) -> None:
    p = sub.add_parser(
        "draw",
        help="draw an image at every scale with its tile grid",
        description="Draw the plan of one image: the image at each scale with the tile grid over "
        "it, side by side, padding shaded when --fit pad. Needs the demo extra.",
    )
    p.add_argument("image", metavar="IMAGE", help="image file")
    _add_option_flags(p, "plan")
    p.add_argument(
        "-o", "--output", default="plan.png", metavar="PATH", help="output picture (plan.png)"
    )
    p.set_defaults(func=_cmd_draw)


def _add_extract_command(sub: Any) -> None:
    p = sub.add_parser(
        "extract",
        help="extract multi-scale features of image files and folders into safetensors shards",
        description="Extract multi-scale features into DIR/shard-*.safetensors with one line per "
        "image in DIR/manifest.jsonl. Re-running resumes: images already in the manifest (same "
        "path, size and modification time) are skipped. Unreadable images are listed in "
        "DIR/errors.jsonl and the exit status is 3. Under torchrun the inputs are split across "
        "ranks. Needs the demo extra.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file or folder (recursive)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--backbone",
        default=_DEMO_BACKBONE,
        metavar="NAME",
        help="efficientnet-lite0 (default, offline ImageNet weights), hf:NAME_OR_PATH or timm:NAME",
    )
    _add_option_flags(p, *options.STAGES, without=options.BATCH_OPTIONS)
    p.add_argument(
        "--batch-images", type=_positive_int, default=8, metavar="N", help="images per batch (8)"
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default cuda when available)"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="dtype of the stored features; on cuda the backbone runs in it (default float32)",
    )
    p.add_argument(
        "--workers",
        type=_non_negative_int,
        default=2,
        metavar="N",
        help="DataLoader workers that read and tile images (2; 0 = in the main process)",
    )
    p.add_argument(
        "--shard-size",
        type=_positive_int,
        default=100,
        metavar="N",
        help="most images per shard (100; a shard also closes at 1 GiB)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete earlier results in DIR, start afresh"
    )
    p.add_argument(
        "--max-pixels",
        type=_non_negative_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="list images of more than N pixels (read from the header, before decoding) in "
        f"DIR/errors.jsonl instead of extracting them (default {DEFAULT_MAX_PIXELS}; 0: no cap "
        "but Pillow's own)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_engine_options(p)
    p.set_defaults(func=_cmd_extract)


def _add_demo_command(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="extract features of the example photos and draw plans and PCA pictures",
        description="Run extract on the photos in examples/images/ with the default backbone "
        f"(EfficientNet-Lite0, scales {','.join(map(str, DEMO_SCALES))}), then draw the tiling "
        "plan and a PCA picture of the features (first 3 principal components as RGB, per "
        "scale and merged) of every photo. Needs a source checkout and the demo extra.",
    )
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (demo-out)")
    p.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="your own folder of photos (default: examples/images of the checkout)",
    )
    p.add_argument("--backbone", default=_DEMO_BACKBONE, metavar="NAME", help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    p.add_argument(
        "--workers", type=_non_negative_int, default=2, metavar="N", help="DataLoader workers (2)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dynamic-s2`` (one sub-parser per command).

    Examples:
        >>> from dynamic_s2.cli import build_parser
        >>> args = build_parser().parse_args(["plan", "1080x1920", "--scales", "448,896"])
        >>> args.command, args.scales
        ('plan', (448, 896))
    """
    try:
        from importlib.metadata import version

        version_text = version("dynamic_s2")
    except Exception:
        version_text = "unknown"
    parser = argparse.ArgumentParser(
        prog="dynamic-s2",
        description="Dynamic-S2 multi-scale tiling: print and draw tiling plans, extract "
        "multi-scale features from folders of images, run a demo.",
        epilog="Run 'dynamic-s2 COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"dynamic_s2 {version_text}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_plan_command(sub)
    _add_draw_command(sub)
    _add_extract_command(sub)
    _add_demo_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dynamic-s2`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Examples:
        >>> from dynamic_s2.cli import main
        >>> main(["plan", "1080x1920", "--scales", "448,896", "--json"])  # doctest: +ELLIPSIS
        [
          {
            "image": "1080x1920",
            "plan": {
        ...
        0
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        status: int = args.func(args)
    except _UsageError as exc:
        parser.exit(EXIT_USAGE, f"{parser.prog} {args.command}: error: {printable(exc, keep=NL)}\n")
    except ImportError as exc:
        print(f"{parser.prog} {args.command}: {printable(exc, keep=NL)}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # e.g. a read-only output folder, a full disk, a missing model
        print(f"{parser.prog} {args.command}: error: {printable(exc, keep=NL)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    sys.stdout.flush()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
