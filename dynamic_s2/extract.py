"""Folder of images → sharded multi-scale features: crash-safe, resumable and distributed.

:func:`extract` reads images with Pillow in :class:`torch.utils.data.DataLoader` workers (EXIF
orientation applied, converted to RGB), plans and tiles them there, encodes and merges the tiles in
the main process, and writes safetensors shards, ``manifest.jsonl`` (one line per image, see
:func:`read_manifest`), ``errors.jsonl`` (images that could not be read) and ``extract.json`` (the
settings) into the output folder. :mod:`dynamic_s2.store` describes these files and how they stay
consistent when a run is killed: at most the images of the shard being filled are lost.
Re-running the same command skips every image whose path, file size and modification time are
already in the manifest; ``overwrite=True`` starts afresh.

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set, ``WORLD_SIZE > 1``) the sorted input list is
split across ranks (image ``i`` goes to rank ``i % world_size``), every rank writes its own shards
(``shard-r{rank}-00000.safetensors``) and manifest part (``manifest-r{rank}.jsonl``), and rank 0
merges the parts into ``manifest.jsonl`` at the end.

Pillow, safetensors and tqdm come with the ``demo`` extra: ``pip install "dynamic_s2[demo]"``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import stat
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import store
from .backbones import _require, as_backbone, load_backbone
from .encode import encode_tiles
from .merge import merge
from .plan import TilePlan, plan_tiles
from .store import CONFIG as CONFIG
from .store import ERRORS, MANIFEST, load_features, read_manifest
from .tiling import TileBatch, collate, tile_images

__all__ = [
    "EXIT_SOME_FAILED",
    "IMAGE_SUFFIXES",
    "ExtractResult",
    "ExtractWarning",
    "extract",
    "find_images",
    "load_features",
    "read_manifest",
]

#: File suffixes (lower case) that :func:`find_images` treats as images.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
#: Exit status of ``dynamic-s2 extract`` when some images could not be read.
EXIT_SOME_FAILED = 3

#: Testing aid: seconds to sleep after every batch, so that a test can kill a run mid-way.
_DELAY_ENV = "DYNAMIC_S2_EXTRACT_DELAY"
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ExtractWarning(UserWarning):
    """Warned when an image cannot be read; the run goes on without it."""


# ----------------------------------------------------------------------------------------------
# inputs


def find_images(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """List the image files named by ``inputs``: files, and folders searched recursively.

    Folders contribute every regular file whose suffix is in :data:`IMAGE_SUFFIXES`
    (case-insensitive); hidden files and folders (names starting with ``.``) and anything that is
    not a regular file (a FIFO, a socket, a device) are skipped. Symbolic links are followed, but
    every folder is searched once (a link loop ends) and every file is listed once (under its
    first path in sorted order). A file named explicitly is kept whatever its suffix or kind
    (:func:`read_image` reports a non-regular one). Paths are made absolute, de-duplicated and
    sorted, so the list (and the split across ranks) is the same on every run.

    Args:
        inputs: one path or a sequence of paths.

    Returns:
        Sorted absolute paths.

    Raises:
        FileNotFoundError: an input does not exist.
        TypeError: ``inputs`` is not a path or a sequence of paths.

    Examples:
        >>> import tempfile, pathlib
        >>> from dynamic_s2.extract import find_images
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("b.PNG", "a/c.jpg", "a/notes.txt"):
        ...     (root / name).parent.mkdir(parents=True, exist_ok=True)
        ...     _ = (root / name).write_bytes(b"")
        >>> [p.relative_to(root).as_posix() for p in find_images(root)]
        ['a/c.jpg', 'b.PNG']
    """
    if isinstance(inputs, (str, os.PathLike)):
        items: list[Any] = [inputs]
    elif isinstance(inputs, Sequence):
        items = list(inputs)
    else:
        raise TypeError(
            f"inputs: expected a path or a sequence of paths, got {type(inputs).__name__}"
        )
    found: set[Path] = set()
    searched: set[tuple[int, int]] = set()  # (device, inode) of every folder searched
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"inputs: expected paths, got an item of type {type(item).__name__}")
        path = Path(item).expanduser().absolute()
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
                st = os.stat(dirpath)
                if (st.st_dev, st.st_ino) in searched:  # a link loop, or a folder seen before
                    dirnames[:] = []
                    continue
                searched.add((st.st_dev, st.st_ino))
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in filenames:
                    file = Path(dirpath) / name
                    wanted = not name.startswith(".") and file.suffix.lower() in IMAGE_SUFFIXES
                    if wanted and file.is_file():  # regular files (after links) only
                        found.add(file)
        elif path.exists():
            found.add(path)
        else:
            raise FileNotFoundError(f"inputs: {os.fspath(item)!r} does not exist")
    unique: dict[str, Path] = {}  # the real file -> its first path in sorted order
    for p in sorted(found, key=lambda p: p.as_posix()):
        unique.setdefault(os.path.realpath(p), p)
    return sorted(unique.values(), key=lambda p: p.as_posix())


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> torch.Tensor:
    """Read an image file as a uint8 ``[3, H, W]`` tensor, the way :func:`extract` does.

    Pillow opens the file, applies its EXIF orientation and converts it to RGB (greyscale, CMYK,
    palette and alpha images become three channels). 16-bit greyscale (Pillow modes ``I;16*``,
    and ``I`` holding values up to 65535) is scaled to 8 bits (``round(v / 257)``), not clipped.

    Args:
        path: the image file; it must be a regular file (a FIFO or a device is refused, never
            opened).
        max_pixels: refuse images of more than this many pixels, checked from the file's header
            before anything is decoded.

    Raises:
        ValueError: ``path`` is not a regular file, or the image has more than ``max_pixels``.

    Examples:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> from dynamic_s2.extract import read_image
        >>> path = os.path.join(tempfile.mkdtemp(), "grey.png")
        >>> Image.new("L", (5, 3), 128).save(path)
        >>> read_image(path).shape
        torch.Size([3, 3, 5])
    """
    pil_image = _require("PIL.Image", "demo")
    image_ops = _require("PIL.ImageOps", "demo")
    if not stat.S_ISREG(os.stat(path).st_mode):  # opening a FIFO would block for ever
        raise ValueError(f"path: {os.fspath(path)!r} is not a regular file")
    with pil_image.open(path) as opened:
        width, height = opened.size  # from the header: nothing is decoded yet
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(
                f"max_pixels: {os.fspath(path)!r} is {width}x{height} = {width * height} pixels, "
                f"more than max_pixels={max_pixels}"
            )
        image = image_ops.exif_transpose(opened)
        if image is None:  # older Pillow with in_place semantics
            image = opened
        array = _rgb_array(image)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _rgb_array(image: Any) -> Any:
    """``[H, W, 3]`` uint8 numpy array of a PIL image; 16-bit greyscale scaled, not clipped."""
    np = _require("numpy", "demo")
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            return np.array(image.convert("RGB"), dtype=np.uint8, copy=True)  # not 16-bit data
        grey = np.rint(values / 257.0).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    return np.array(image.convert("RGB"), dtype=np.uint8, copy=True)


# ----------------------------------------------------------------------------------------------
# data loading (runs in DataLoader workers)


@dataclasses.dataclass(frozen=True)
class _Job:
    index: int  # position in the sorted list of all inputs (gives the key)
    path: str
    nbytes: int
    mtime_ns: int


@dataclasses.dataclass
class _Loaded:
    job: _Job
    batch: TileBatch


@dataclasses.dataclass
class _Failed:
    job: _Job
    error: str
    message: str


@dataclasses.dataclass
class _Batch:
    jobs: list[_Job]
    plans: tuple[TilePlan, ...]
    tiles: torch.Tensor | None
    failed: list[_Failed]

    def pin_memory(self) -> _Batch:
        tiles = None if self.tiles is None else self.tiles.pin_memory()
        return _Batch(self.jobs, self.plans, tiles, self.failed)


@dataclasses.dataclass(eq=False)
class _ImageDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    jobs: list[_Job]
    scales: tuple[int, ...]
    tile_size: int | None
    max_tiles: int | tuple[int, ...] | None
    policy: str
    fit: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    max_pixels: int | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> _Loaded | _Failed:
        job = self.jobs[i]
        try:
            image = read_image(job.path, max_pixels=self.max_pixels)
            plan = plan_tiles(
                int(image.shape[1]),
                int(image.shape[2]),
                self.scales,
                tile_size=self.tile_size,
                max_tiles=self.max_tiles,
                policy=self.policy,  # type: ignore[arg-type]
                fit=self.fit,  # type: ignore[arg-type]
            )
            batch = tile_images([image], [plan], mean=self.mean, std=self.std)
        except Exception as exc:  # one bad file never stops the run
            return _Failed(job, type(exc).__name__, str(exc))
        return _Loaded(job, batch)


def _collate(items: list[_Loaded | _Failed]) -> _Batch:
    loaded = [x for x in items if isinstance(x, _Loaded)]
    failed = [x for x in items if isinstance(x, _Failed)]
    if not loaded:
        return _Batch([], (), None, failed)
    joined = collate([x.batch for x in loaded])
    return _Batch([x.job for x in loaded], tuple(joined.plans), joined.tiles, failed)


def _worker_init(worker_id: int) -> None:
    del worker_id
    torch.set_num_threads(1)  # the workers only tile; leave the cores to the encoder


# ----------------------------------------------------------------------------------------------
# distributed


@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False  # a process group is used
    owned: bool = False  # we initialised it (and destroy it)
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    def all_sum(self, value: int) -> int:
        """Sum ``value`` over ranks; also a barrier."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t)
        return int(t.cpu()[0])

    def barrier(self) -> None:
        self.all_sum(0)


def _setup_dist(device: torch.device) -> tuple[_Dist, torch.device]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        ctx = _Dist(dist.get_rank(), dist.get_world_size(), local_rank, active=True)
    else:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1 or "RANK" not in os.environ:
            return _Dist(), device
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            backend = "gloo"
        # Ranks finish at different times; the final barrier must not time out on a big job.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(days=7))
        ctx = _Dist(dist.get_rank(), dist.get_world_size(), local_rank, True, True)
    if dist.get_backend() == "nccl":
        if device.type != "cuda":
            raise ValueError(f"device: the process group uses nccl, which needs cuda, got {device}")
        ctx.device = device
    return ctx, device


# ----------------------------------------------------------------------------------------------
# the run


@dataclasses.dataclass(frozen=True)
class ExtractResult:
    """What :func:`extract` did in this process.

    Attributes:
        out_dir: the output folder.
        extracted: images encoded and written by this process in this run.
        skipped: images of this process found in the manifest and not redone.
        failed: images of this process that could not be read (listed in ``errors.jsonl``).
        failed_total: failed images over all ranks (equals ``failed`` without torch.distributed).
        shards: shard files written by this process in this run.
        seconds: wall-clock time of the run.
        rank: this process's rank (0 without torch.distributed).
        world_size: the number of ranks (1 without torch.distributed).
    """

    out_dir: Path
    extracted: int
    skipped: int
    failed: int
    failed_total: int
    shards: tuple[Path, ...]
    seconds: float
    rank: int = 0
    world_size: int = 1

    @property
    def manifest(self) -> Path:
        """The merged manifest, ``out_dir / "manifest.jsonl"``."""
        return self.out_dir / MANIFEST

    @property
    def errors(self) -> Path | None:
        """``out_dir / "errors.jsonl"`` when some image failed, else ``None``."""
        return self.out_dir / ERRORS if self.failed_total else None


def _positive_int(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> Any:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _resolve_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in _DTYPES.items() if v == dtype)


def extract(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    backbone: Any = "efficientnet-lite0",
    scales: Sequence[int] | None = None,
    tile_size: int | None = None,
    max_tiles: int | Sequence[int] | None = None,
    policy: str = "aspect",
    fit: str = "stretch",
    output_scale: int = -1,
    resample: str = "area",
    batch_images: int = 8,
    max_batch_tiles: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    workers: int = 2,
    shard_size: int = 100,
    overwrite: bool = False,
    progress: bool = True,
    max_pixels: int | None = None,
) -> ExtractResult:
    """Extract multi-scale features of every image under ``inputs`` into sharded safetensors.

    See the module documentation for the files written. Images that cannot be read are skipped
    with an :class:`ExtractWarning` and listed in ``out_dir/errors.jsonl``; the run goes on.

    Args:
        inputs: image files and folders (searched recursively, see :func:`find_images`).
        out_dir: output folder, created if needed.
        backbone: a spec for :func:`dynamic_s2.backbones.load_backbone` (``"efficientnet-lite0"``,
            ``"hf:NAME_OR_PATH"``, ``"timm:NAME"``) or a model accepted by
            :func:`dynamic_s2.backbones.as_backbone` (used as it is, on its own device).
        scales: pixel scales; default ``(t, 2t, 3t)`` with ``t`` the backbone's input size.
        tile_size: tile side; default the backbone's input size.
        max_tiles: as in :func:`dynamic_s2.plan_tiles`.
        policy: as in :func:`dynamic_s2.plan_tiles`.
        fit: as in :func:`dynamic_s2.plan_tiles`.
        output_scale: as in :func:`dynamic_s2.merge`.
        resample: as in :func:`dynamic_s2.merge`.
        batch_images: images per DataLoader batch.
        max_batch_tiles: most tiles per backbone call (``None``: a whole batch at once).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default cuda when available. Under
            torchrun, ``"cuda"`` means the rank's ``LOCAL_RANK`` GPU.
        dtype: dtype of the stored features: ``"float32"``, ``"float16"`` or ``"bfloat16"``. On
            cuda the backbone also runs in it; on cpu it runs in float32 and the output is cast.
        workers: DataLoader worker processes (0 reads images in the main process).
        shard_size: most images per shard (a shard is also closed at 1 GiB).
        overwrite: delete earlier results in ``out_dir`` and start afresh.
        progress: show a tqdm progress bar.
        max_pixels: the most pixels (``h * w``, from the file's header, before decoding) of an
            image; larger images are listed in ``errors.jsonl`` instead (``None``: no cap beyond
            Pillow's own decompression-bomb guard).

    Returns:
        An :class:`ExtractResult`; ``result.failed_total > 0`` means some images failed.

    Raises:
        ValueError, TypeError: invalid arguments, no images found, or ``out_dir`` holding
            results of other settings (without ``overwrite``).

    Examples:
        >>> import tempfile, os, torch
        >>> from PIL import Image
        >>> from dynamic_s2.extract import extract, read_manifest, load_features
        >>> folder = tempfile.mkdtemp()
        >>> Image.new("RGB", (64, 64), "teal").save(os.path.join(folder, "a.png"))
        >>> out = os.path.join(tempfile.mkdtemp(), "features")
        >>> pool = torch.nn.AvgPool2d(8)   # a stand-in backbone: [T, 3, 32, 32] -> [T, 3, 4, 4]
        >>> result = extract(folder, out, backbone=pool, scales=(32, 64), workers=0,
        ...                  progress=False)
        >>> result.extracted, result.failed
        (1, 0)
        >>> entry = read_manifest(out)[0]
        >>> entry["grids"], entry["shape"], entry["shard"]
        ([[1, 1], [2, 2]], [8, 8, 6], 'shard-00000.safetensors')
        >>> load_features(out, entry).shape
        torch.Size([8, 8, 6])
        >>> extract(folder, out, backbone=pool, scales=(32, 64), workers=0,
        ...         progress=False).skipped
        1
    """
    start = time.perf_counter()
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a folder path, got {type(out_dir).__name__}")
    batch_images = _positive_int("batch_images", batch_images)
    max_batch_tiles = _positive_int("max_batch_tiles", max_batch_tiles, allow_none=True)
    workers = _positive_int("workers", workers, minimum=0)
    shard_size = _positive_int("shard_size", shard_size)
    max_pixels = _positive_int("max_pixels", max_pixels, allow_none=True)
    out_dtype = _resolve_dtype(dtype)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected a bool, got {type(overwrite).__name__}")
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} was requested but CUDA is not available here")
    paths = find_images(inputs)
    if not paths:
        raise ValueError(f"inputs: no image files found in {inputs!r}")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {os.fspath(out_dir)!r} exists and is not a folder")
    tqdm = _require("tqdm", "demo").tqdm
    _require("safetensors.torch", "demo")
    _require("PIL.Image", "demo")

    lock: int | None = None
    ctx, dev = _setup_dist(dev)
    try:
        compute_dtype = out_dtype if dev.type == "cuda" else torch.float32
        if isinstance(backbone, str):
            spec = backbone
            model = load_backbone(backbone, device=dev, dtype=compute_dtype)
        else:
            spec = f"<{type(backbone).__module__}.{type(backbone).__qualname__}>"
            model = as_backbone(backbone)
        input_size = getattr(model, "input_size", None)
        if tile_size is None and input_size:
            tile_size = int(input_size)
        if scales is None:
            if not tile_size:
                raise ValueError(
                    "scales: the backbone does not say its input size; pass scales explicitly"
                )
            scales = (tile_size, 2 * tile_size, 3 * tile_size)
        scale_tuple = tuple(scales)
        caps = tuple(max_tiles) if isinstance(max_tiles, Sequence) else max_tiles
        # Fail early (in this process) on bad planning arguments, rather than once per image.
        plan_tiles(
            scale_tuple[-1],
            scale_tuple[-1],
            scale_tuple,
            tile_size=tile_size,
            max_tiles=caps,
            policy=policy,  # type: ignore[arg-type]
            fit=fit,  # type: ignore[arg-type]
        )
        config = {
            "format": store.FORMAT,
            "backbone": spec,
            "scales": list(scale_tuple),
            "tile_size": tile_size,
            "max_tiles": list(caps) if isinstance(caps, tuple) else caps,
            "policy": policy,
            "fit": fit,
            "output_scale": output_scale,
            "resample": resample,
            "dtype": _dtype_name(out_dtype),
        }
        out.mkdir(parents=True, exist_ok=True)
        lock = store.acquire_lock(out) if ctx.rank == 0 else None  # one run per folder
        if not overwrite:
            store.check_config(out, config)
        ctx.barrier()
        if ctx.rank == 0:
            store.prepare(out, config, overwrite=overwrite)
        ctx.barrier()

        # This rank's files (shard-r{r}-*, manifest-r{r}.jsonl, errors-r{r}.jsonl under
        # torch.distributed), cleaned of what a crash left, and the images already done.
        own_rank = ctx.rank if ctx.active else None
        done, next_shard = store.recover(out, own_rank)

        jobs: list[_Job] = []
        skipped = 0
        missing: list[_Failed] = []
        for index in range(ctx.rank, len(paths), ctx.world_size):
            path = paths[index]
            try:
                st = path.stat()
            except OSError as exc:
                missing.append(
                    _Failed(_Job(index, str(path), -1, -1), type(exc).__name__, str(exc))
                )
                continue
            job = _Job(index, str(path), st.st_size, st.st_mtime_ns)
            if (job.path, job.nbytes, job.mtime_ns) in done:
                skipped += 1
            else:
                jobs.append(job)

        dataset = _ImageDataset(
            jobs,
            scale_tuple,
            tile_size,
            caps,
            policy,
            fit,
            getattr(model, "mean", None),
            getattr(model, "std", None),
            max_pixels,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_images,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=dev.type == "cuda",
            worker_init_fn=_worker_init if workers else None,
        )
        delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
        num_prefix = getattr(model, "num_prefix_tokens", None)
        metadata = {"format": store.FORMAT, "backbone": spec}
        extracted = 0
        failed = 0

        def record_failure(item: _Failed) -> None:
            nonlocal failed
            failed += 1
            warnings.warn(
                f"skipping {item.job.path}: {item.error}: {item.message}",
                ExtractWarning,
                stacklevel=2,
            )
            store.append_error(out, own_rank, item.job.path, item.error, item.message)

        writer = store.ShardWriter(
            out,
            rank=own_rank,
            first_index=next_shard,
            shard_size=shard_size,
            metadata=metadata,
        )
        bar = tqdm(
            total=len(jobs) + len(missing),
            unit="img",
            desc=f"extract r{ctx.rank}" if ctx.active else "extract",
            position=ctx.rank if ctx.active else None,
            disable=not progress,
            dynamic_ncols=True,
        )
        with writer, bar:
            for item in missing:
                record_failure(item)
                bar.update(1)
            for batch in loader if jobs else ():
                for item in batch.failed:
                    record_failure(item)
                if batch.tiles is not None:
                    with torch.inference_mode():
                        tiles = batch.tiles.to(dev, compute_dtype, non_blocking=True)
                        feats = encode_tiles(model, tiles, max_batch_tiles=max_batch_tiles)
                        merged = merge(
                            feats,
                            list(batch.plans),
                            output_scale=output_scale,
                            resample=resample,  # type: ignore[arg-type]
                            num_prefix_tokens=num_prefix,
                        )
                        maps = merged.unpad()
                        prefix = merged.prefix
                    for i, (job, plan, fmap) in enumerate(
                        zip(batch.jobs, batch.plans, maps, strict=True)
                    ):
                        stored = fmap.to(device="cpu", dtype=out_dtype, copy=True)
                        p = None
                        if prefix is not None:
                            p = prefix[i].to(device="cpu", dtype=out_dtype, copy=True)
                        writer.add(  # writes the shard when it is full
                            job.index,
                            stored,
                            p,
                            path=job.path,
                            nbytes=job.nbytes,
                            mtime_ns=job.mtime_ns,
                            plan=plan,
                        )
                        extracted += 1
                bar.update(len(batch.jobs) + len(batch.failed))
                if failed:
                    bar.set_postfix(failed=failed, refresh=False)
                if delay:
                    time.sleep(delay)
            writer.flush()

        failed_total = ctx.all_sum(failed)  # also waits for every rank to finish
        if ctx.rank == 0:
            store.merge_parts(out)
        ctx.barrier()
    finally:
        store.release_lock(lock)
        if ctx.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return ExtractResult(
        out,
        extracted,
        skipped,
        failed,
        failed_total,
        tuple(writer.written),
        time.perf_counter() - start,
        ctx.rank,
        ctx.world_size,
    )
