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
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import _checks, store
from ._images import IMAGE_SUFFIXES as IMAGE_SUFFIXES
from ._images import find_images, read_image
from ._optional import require
from .api import prepare, run
from .backbones import Backbone, as_backbone, load_backbone
from .options import BATCH_OPTIONS, S2Options, default_scales, make_options
from .plan import TilePlan
from .store import CONFIG as CONFIG
from .store import ERRORS, MANIFEST, load_features, read_manifest
from .tiling import TileBatch, collate

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "EXIT_SOME_FAILED",
    "IMAGE_SUFFIXES",
    "ExtractResult",
    "ExtractWarning",
    "extract",
    "find_images",
    "load_features",
    "read_manifest",
]

#: Exit status of ``dynamic-s2 extract`` when some images could not be read.
EXIT_SOME_FAILED = 3

#: Default ``max_pixels`` (also of ``extract_ray`` and the command): 45-MP photos and 8K frames
#: pass; a 236 KB PNG declaring 9000 x 9000 (81 MP, 1.7 GB to tile) does not. Pillow warns at 89.
DEFAULT_MAX_PIXELS = 50_000_000

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
    options: S2Options  # resolved: scales, tile size and normalisation known
    max_pixels: int | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> _Loaded | _Failed:
        job = self.jobs[i]
        try:
            batch = prepare(
                [read_image(job.path, max_pixels=self.max_pixels)], options=self.options
            )
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


def _resolve_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    return _DTYPES[_checks.one_of("dtype", dtype, tuple(_DTYPES))]


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in _DTYPES.items() if v == dtype)


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was requested but CUDA is not available here")
    return dev


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The checked run settings of :func:`extract` (everything but the pipeline options)."""

    out: Path
    batch_images: int
    device: torch.device
    dtype: torch.dtype
    workers: int
    shard_size: int
    overwrite: bool
    progress: bool
    max_pixels: int | None


def check_out_dir(out_dir: Any) -> Path:
    """The absolute output folder; ``TypeError``/``ValueError`` for a non-path or a file."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a folder path, got {type(out_dir).__name__}")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {os.fspath(out_dir)!r} exists and is not a folder")
    return out


def list_inputs(inputs: Any, options: S2Options) -> list[Path]:
    """The images to extract (:func:`find_images`), and the options an extraction can honour.

    Images are planned one at a time in the readers, so ``tile_budget`` (a whole batch's budget)
    cannot apply: it raises rather than being ignored; ``max_tiles`` caps each image."""
    for name, value in ((n, getattr(options, n)) for n in BATCH_OPTIONS if getattr(options, n)):
        raise ValueError(
            f"{name}={value!r} plans a batch as a whole, but extraction plans every image on its "
            "own: use max_tiles (per image) or max_upscale instead"
        )
    paths = find_images(inputs)
    if not paths:
        raise ValueError(f"inputs: no image files found in {inputs!r}")
    return paths


def _settings(out_dir: Any, **run: Any) -> _Settings:
    return _Settings(
        check_out_dir(out_dir),
        _checks.positive_int("batch_images", run["batch_images"]),
        _resolve_device(run["device"]),
        _resolve_dtype(run["dtype"]),
        _checks.non_negative_int("workers", run["workers"]),
        _checks.positive_int("shard_size", run["shard_size"]),
        _checks.boolean("overwrite", run["overwrite"]),
        bool(run["progress"]),
        _checks.optional(_checks.positive_int, "max_pixels", run["max_pixels"]),
    )


def _load_model(backbone: Any, device: torch.device, dtype: torch.dtype) -> tuple[Backbone, str]:
    """The backbone and the name ``extract.json`` records for it."""
    if isinstance(backbone, str):
        return load_backbone(backbone, device=device, dtype=dtype), backbone
    return as_backbone(backbone), f"<{type(backbone).__module__}.{type(backbone).__qualname__}>"


def _open_folder(settings: _Settings, config: dict[str, Any], ctx: _Dist) -> int | None:
    """Create the folder and take its lock (rank 0), refuse other settings (unless overwriting),
    write ``extract.json``. Returns the lock, for :func:`dynamic_s2.store.release_lock`."""
    settings.out.mkdir(parents=True, exist_ok=True)
    lock = store.acquire_lock(settings.out) if ctx.rank == 0 else None  # one run per folder
    try:
        if not settings.overwrite:
            store.check_config(settings.out, config)
        ctx.barrier()
        if ctx.rank == 0:
            store.prepare(settings.out, config, overwrite=settings.overwrite)
        ctx.barrier()
    except BaseException:
        store.release_lock(lock)
        raise
    return lock


def _job_list(
    paths: Sequence[Path], ctx: _Dist, done: set[Any]
) -> tuple[list[_Job], int, list[_Failed]]:
    """This rank's images still to do, how many are done already, and those that vanished."""
    jobs: list[_Job] = []
    skipped = 0
    missing: list[_Failed] = []
    for index in range(ctx.rank, len(paths), ctx.world_size):
        path = paths[index]
        try:
            st = path.stat()
        except OSError as exc:
            missing.append(_Failed(_Job(index, str(path), -1, -1), type(exc).__name__, str(exc)))
            continue
        job = _Job(index, str(path), st.st_size, st.st_mtime_ns)
        if (job.path, job.nbytes, job.mtime_ns) in done:
            skipped += 1
        else:
            jobs.append(job)
    return jobs, skipped, missing


def _loader(jobs: list[_Job], options: S2Options, settings: _Settings) -> Any:
    return torch.utils.data.DataLoader(
        _ImageDataset(jobs, options, settings.max_pixels),
        batch_size=settings.batch_images,
        shuffle=False,
        num_workers=settings.workers,
        collate_fn=_collate,
        pin_memory=settings.device.type == "cuda",
        worker_init_fn=_worker_init if settings.workers else None,
    )


@dataclasses.dataclass
class _Counts:
    extracted: int = 0
    failed: int = 0


def _record_failure(out: Path, rank: int | None, item: _Failed, counts: _Counts) -> None:
    counts.failed += 1
    text = f"skipping {item.job.path}: {item.error}: {item.message}"
    warnings.warn(_checks.printable(text), ExtractWarning, stacklevel=3)
    store.append_error(out, rank, item.job.path, item.error, item.message)


def _write_batch(
    model: Backbone,
    batch: _Batch,
    options: S2Options,
    settings: _Settings,
    writer: store.ShardWriter,
    compute_dtype: torch.dtype,
) -> int:
    """Encode and merge one loaded batch and hand every image to the writer."""
    if batch.tiles is None:
        return 0
    with torch.inference_mode():
        tiles = batch.tiles.to(settings.device, compute_dtype, non_blocking=True)
        merged = run(model, TileBatch(tiles, batch.plans), options=options)
        maps = merged.unpad()
    for i, (job, plan, fmap) in enumerate(zip(batch.jobs, batch.plans, maps, strict=True)):
        stored = fmap.to(device="cpu", dtype=settings.dtype, copy=True)
        p = None
        if merged.prefix is not None:
            p = merged.prefix[i].to(device="cpu", dtype=settings.dtype, copy=True)
        writer.add(  # writes the shard when it is full
            job.index,
            stored,
            p,
            path=job.path,
            nbytes=job.nbytes,
            mtime_ns=job.mtime_ns,
            plan=plan,
        )
    return len(maps)


def _loop(
    model: Backbone,
    options: S2Options,
    settings: _Settings,
    ctx: _Dist,
    jobs: list[_Job],
    missing: list[_Failed],
    writer: store.ShardWriter,
) -> _Counts:
    """Read, encode and write every job of this rank, with a progress bar."""
    tqdm = require("tqdm", "demo").tqdm
    rank = ctx.rank if ctx.active else None
    compute_dtype = settings.dtype if settings.device.type == "cuda" else torch.float32
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    counts = _Counts()
    bar = tqdm(
        total=len(jobs) + len(missing),
        unit="img",
        desc=f"extract r{ctx.rank}" if ctx.active else "extract",
        position=ctx.rank if ctx.active else None,
        disable=not settings.progress,
        dynamic_ncols=True,
    )
    with writer, bar:
        for item in missing:
            _record_failure(settings.out, rank, item, counts)
            bar.update(1)
        for batch in _loader(jobs, options, settings) if jobs else ():
            for item in batch.failed:
                _record_failure(settings.out, rank, item, counts)
            counts.extracted += _write_batch(model, batch, options, settings, writer, compute_dtype)
            bar.update(len(batch.jobs) + len(batch.failed))
            if counts.failed:
                bar.set_postfix(failed=counts.failed, refresh=False)
            if delay:
                time.sleep(delay)
        writer.flush()
    return counts


def extract(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    backbone: Any = "efficientnet-lite0",
    batch_images: int = 8,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    workers: int = 2,
    shard_size: int = 100,
    overwrite: bool = False,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    options: S2Options | None = None,
    **kwargs: Any,
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
        batch_images: images per DataLoader batch.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default cuda when available. Under
            torchrun, ``"cuda"`` means the rank's ``LOCAL_RANK`` GPU.
        dtype: dtype of the stored features: ``"float32"``, ``"float16"`` or ``"bfloat16"``. On
            cuda the backbone also runs in it; on cpu it runs in float32 and the output is cast.
        workers: DataLoader worker processes (0 reads images in the main process).
        shard_size: most images per shard (a shard is also closed at 1 GiB).
        overwrite: delete earlier results in ``out_dir`` and start afresh.
        progress: show a tqdm progress bar.
        max_pixels: the most pixels (``h * w``, read from the header) of an image, else it is
            listed in ``errors.jsonl``: :data:`DEFAULT_MAX_PIXELS`, ``None`` for Pillow's guard.
        options: an :class:`~dynamic_s2.options.S2Options` (``kwargs`` override its fields).
        **kwargs: any field of :class:`~dynamic_s2.options.S2Options` (``scales``, ``policy``,
            ``max_batch_tiles``, ...), as in :func:`dynamic_s2.forward`. The fields that change the
            features are recorded in ``extract.json``.

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
    settings = _settings(
        out_dir,
        batch_images=batch_images,
        device=device,
        dtype=dtype,
        workers=workers,
        shard_size=shard_size,
        overwrite=overwrite,
        progress=progress,
        max_pixels=max_pixels,
    )
    opts = make_options(options, kwargs, where="extract()")
    paths = list_inputs(inputs, opts)
    for module in ("tqdm", "safetensors.torch", "PIL.Image"):
        require(module, "demo")

    lock: int | None = None
    ctx, dev = _setup_dist(settings.device)
    settings = dataclasses.replace(settings, device=dev)
    try:
        compute_dtype = settings.dtype if dev.type == "cuda" else torch.float32
        model, spec = _load_model(backbone, dev, compute_dtype)
        opts = opts.resolve(model)
        if opts.scales is None:
            default_scales(model)  # raises, naming the backbone
        config = {"format": store.FORMAT, "backbone": spec, **opts.to_config()}
        config["dtype"] = _dtype_name(settings.dtype)
        lock = _open_folder(settings, config, ctx)
        # This rank's files (shard-r{r}-*, manifest-r{r}.jsonl, errors-r{r}.jsonl under
        # torch.distributed), cleaned of what a crash left, and the images already done.
        own_rank = ctx.rank if ctx.active else None
        done, next_shard = store.recover(settings.out, own_rank)
        jobs, skipped, missing = _job_list(paths, ctx, done)
        writer = store.ShardWriter(
            settings.out,
            rank=own_rank,
            first_index=next_shard,
            shard_size=settings.shard_size,
            metadata={"format": store.FORMAT, "backbone": spec},
        )
        counts = _loop(model, opts, settings, ctx, jobs, missing, writer)
        failed_total = ctx.all_sum(counts.failed)  # also waits for every rank to finish
        if ctx.rank == 0:
            store.merge_parts(settings.out)
        ctx.barrier()
    finally:
        store.release_lock(lock)
        if ctx.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return ExtractResult(
        settings.out,
        counts.extracted,
        skipped,
        counts.failed,
        failed_total,
        tuple(writer.written),
        time.perf_counter() - start,
        ctx.rank,
        ctx.world_size,
    )
