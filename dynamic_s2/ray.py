"""Feature extraction on Ray Data: CPU tasks read and tile, a pool of GPU actors encodes.

The pieces a Ray user composes, built on :func:`dynamic_s2.prepare` and :func:`dynamic_s2.run`:

- :func:`tile_rows`, the CPU stage: reads the images of a batch of rows (``key`` = path), plans
  and tiles them; for ``Dataset.map_batches(tile_rows, batch_format="pyarrow", ...)``;
- :class:`Encoder`, the GPU stage: holds the backbone; each call encodes and merges a batch of
  tiled rows into :mod:`dynamic_s2.parquet` rows; for ``Dataset.map_batches(Encoder,
  concurrency=N, num_gpus=1, ...)``;
- :func:`extract_ray`, which wires them over ``ray.data`` for image folders or lists of paths and
  writes ``OUT/parquet/*.parquet`` (one row per image), ``OUT/extract.json`` and
  ``OUT/errors.jsonl``.

Ray Data streams the two stages: while the actors encode one batch, CPU tasks read and tile the
next ones, and the Parquet writes run behind them. An actor that dies is restarted and its batch
retried (``retries``); an image that cannot be read becomes an error row and a line of
``errors.jsonl``, never a failed job.

Re-running into the same folder **resumes**: images whose path, file size and modification time
are in a successful row are skipped, the others (new, changed or failed before) are extracted
and written as the next ``run``. The settings must match ``extract.json`` (else ``ValueError``);
``overwrite=True`` starts afresh.

Ray comes with the ``ray`` extra: ``pip install "dynamic_s2[ray]"``; reading images needs the
``demo`` extra (Pillow).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import _checks, parquet, store
from ._images import read_image
from ._optional import require
from .api import prepare, run
from .backbones import as_backbone, load_backbone
from .extract import (
    DEFAULT_MAX_PIXELS,
    ExtractResult,
    _dtype_name,
    _resolve_dtype,
    check_out_dir,
    list_inputs,
)
from .options import S2Options, make_options
from .plan import TilePlan
from .tiling import TileBatch

__all__ = ["Encoder", "RayExtractResult", "extract_ray", "tile_rows"]


def _tile_schema() -> Any:
    """The CPU stage's rows: the key columns, plan, tiles (raw float32) and error columns."""
    pa = require("pyarrow", "ray")
    rows = parquet.schema()
    tiles = [pa.field("tiles", pa.large_binary()), pa.field("tiles_shape", pa.list_(pa.int64()))]
    head = [rows.field(name) for name in ("key", "bytes", "mtime_ns", "plan")]
    return pa.schema(head + tiles + [rows.field("error"), rows.field("message")])


def tile_rows(batch: Any, *, options: S2Options, max_pixels: int | None = None) -> Any:
    """The CPU stage: read, plan and tile every image of a batch of rows.

    Args:
        batch: a ``pyarrow.Table`` with columns ``key`` (the image path), ``bytes`` and
            ``mtime_ns`` (``batch_format="pyarrow"``).
        options: resolved :class:`~dynamic_s2.options.S2Options` (scales, and mean/std when the
            backbone has them: ``S2Options(...).resolve(backbone)``).
        max_pixels: the most pixels of an image (from its header); larger ones are error rows.

    Returns:
        A ``pyarrow.Table``, one row per input row: the key columns, ``plan`` (JSON), ``tiles``
        (raw float32 bytes of the image's ``[n, C, t, t]`` tiles) and ``tiles_shape``; or, for an
        image that could not be read or tiled, ``error`` and ``message``.

    Examples:
        >>> import tempfile, os, pyarrow
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
        >>> Image.new("RGB", (64, 32)).save(path)
        >>> rows = pyarrow.Table.from_pylist([{"key": path, "bytes": 0, "mtime_ns": 0},
        ...                                   {"key": "/missing.png", "bytes": -1, "mtime_ns": -1}])
        >>> out = tile_rows(rows, options=S2Options(scales=(32, 64)))
        >>> out.column("tiles_shape").to_pylist()[0], out.column("error").to_pylist()
        ([10, 3, 32, 32], [None, 'FileNotFoundError'])
    """
    pa = require("pyarrow", "ray")
    rows = []
    for row in batch.select(["key", "bytes", "mtime_ns"]).to_pylist():
        try:
            image = read_image(row["key"], max_pixels=max_pixels)
            tiled = prepare([image], options=options)
            data, _, shape = parquet.encode_tensor(tiled.tiles)
            row.update(plan=json.dumps(tiled.plans[0].to_dict()), tiles=data, tiles_shape=shape)
        except Exception as exc:  # one bad file never stops the job
            row.update(error=type(exc).__name__, message=str(exc))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=_tile_schema())


class Encoder:
    """The GPU stage: a callable class for ``Dataset.map_batches`` that holds the backbone.

    Each call takes a batch of :func:`tile_rows` rows, encodes and merges the tiles of its readable
    images in one :func:`dynamic_s2.run` and returns :mod:`dynamic_s2.parquet` rows (error rows
    pass through).

    Args:
        backbone: a :func:`~dynamic_s2.backbones.load_backbone` spec (loaded here, in the actor)
            or a model accepted by :func:`~dynamic_s2.backbones.as_backbone` (moved to
            ``device``).
        options: the :class:`~dynamic_s2.options.S2Options` (only encode and merge fields are
            read).
        device: ``"cuda"`` or ``"cpu"``; default cuda when the actor sees a GPU.
        dtype: dtype of the stored features; on cuda the backbone also runs in it.
        run_index: the ``run`` column of the rows.

    Examples:
        >>> import tempfile, os, pyarrow
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
        >>> Image.new("RGB", (64, 32)).save(path)
        >>> opts = S2Options(scales=(32, 64))
        >>> rows = pyarrow.Table.from_pylist([{"key": path, "bytes": 0, "mtime_ns": 0}])
        >>> encoder = Encoder(torch.nn.AvgPool2d(8), options=opts, device="cpu")
        >>> out = encoder(tile_rows(rows, options=opts))
        >>> out.column("shape").to_pylist(), out.column("dtype").to_pylist()
        ([[8, 16, 6]], ['float32'])
    """

    def __init__(
        self,
        backbone: Any,
        *,
        options: S2Options,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        run_index: int = 0,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _resolve_dtype(dtype)
        compute = self.dtype if self.device.type == "cuda" else torch.float32
        if isinstance(backbone, str):
            self.model: Any = load_backbone(backbone, device=self.device, dtype=compute)
        else:
            if isinstance(backbone, torch.nn.Module):
                backbone = backbone.to(self.device, compute).eval()
            self.model = as_backbone(backbone)
        self.compute_dtype = compute
        self.options = options
        self.run_index = run_index

    def __call__(self, batch: Any) -> Any:
        pa = require("pyarrow", "ray")
        rows = batch.to_pylist()
        good = [r for r in rows if r["error"] is None]
        out: dict[int, dict[str, Any]] = {}
        if good:
            tiles = torch.cat(
                [parquet.decode_tensor(r["tiles"], "float32", r["tiles_shape"]) for r in good]
            )
            plans = tuple(TilePlan.from_dict(json.loads(r["plan"])) for r in good)
            with torch.inference_mode():
                merged = run(
                    self.model,
                    TileBatch(tiles.to(self.device, self.compute_dtype), plans),
                    options=self.options,
                )
                maps = merged.unpad()
            for i, (r, plan, fmap) in enumerate(zip(good, plans, maps, strict=True)):
                prefix = None if merged.prefix is None else merged.prefix[i].to(self.dtype)
                out[id(r)] = parquet.feature_row(
                    r["key"], r["bytes"], r["mtime_ns"], self.run_index, plan,
                    fmap.to(self.dtype), prefix,
                )  # fmt: skip
        result = [
            out.get(id(r))
            or parquet.error_row(
                r["key"], r["bytes"], r["mtime_ns"], self.run_index, r["error"], r["message"]
            )
            for r in rows
        ]
        return pa.Table.from_pylist(result, schema=parquet.schema())


@dataclasses.dataclass(frozen=True)
class RayExtractResult(ExtractResult):
    """What :func:`extract_ray` did; ``shards`` lists the Parquet files written in this run.

    Examples:
        >>> from pathlib import Path
        >>> RayExtractResult(Path("/out"), 1, 0, 0, 0, (), 1.0).manifest.as_posix()
        '/out/parquet'
    """

    @property
    def manifest(self) -> Path:
        """The Parquet folder, ``out_dir / "parquet"`` (the name the local engine's result uses
        for its manifest file); also :attr:`parquet_dir`."""
        return self.parquet_dir

    @property
    def parquet_dir(self) -> Path:
        """The Parquet folder, ``out_dir / "parquet"``."""
        return self.out_dir / parquet.PARQUET_DIR


def _recover(folder: Path) -> tuple[set[tuple[str, int, int]], int]:
    """Delete Parquet files torn by a crash; the resume keys of the stored images, next run."""
    pq = require("pyarrow.parquet", "ray")
    done: set[tuple[str, int, int]] = set()
    last = -1
    for path in parquet.parquet_files(folder):
        try:
            pq.read_metadata(path)
        except Exception:  # no footer: a write cut short by a crash; its rows were never done
            path.unlink()
            continue
        (_, cols), *_ = parquet.read_columns([path], ["key", "bytes", "mtime_ns", "run", "error"])
        for key, nbytes, mtime, run_index, error in zip(*cols.values(), strict=True):
            last = max(last, run_index)
            if error is None:
                done.add((key, nbytes, mtime))
    return done, last + 1


def _jobs(paths: Sequence[Path], done: set[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """The rows to extract: every image not already done (stat failures are read, and fail)."""
    jobs = []
    for path in paths:
        try:
            st = path.stat()
            nbytes, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            nbytes, mtime = -1, -1
        if (str(path), nbytes, mtime) not in done:
            jobs.append({"key": str(path), "bytes": nbytes, "mtime_ns": mtime})
    return jobs


def _resolve(backbone: Any, opts: S2Options) -> tuple[str, S2Options]:
    """The backbone's name for ``extract.json`` and the options with its defaults filled."""
    if isinstance(backbone, str):
        spec, model = backbone, load_backbone(backbone, device="cpu")
    else:
        spec = f"<{type(backbone).__module__}.{type(backbone).__qualname__}>"
        model = as_backbone(backbone)
    opts = opts.resolve(model)
    if opts.scales is None:
        raise ValueError(
            f"scales: the backbone ({spec}) does not say its input size; pass scales explicitly"
        )
    return spec, opts


def _run_job(
    ray: Any,
    jobs: list[dict[str, Any]],
    folder: Path,
    encoder_kwargs: dict[str, Any],
    *,
    batch_images: int,
    concurrency: int,
    num_gpus: float,
    retries: int,
    progress: bool,
    verbose: bool,
    max_pixels: int | None,
) -> None:
    """Read and tile in CPU tasks, encode in an actor pool, write Parquet: one streaming job."""
    context = ray.data.DataContext.get_current()
    bars = (context.enable_progress_bars, context.enable_operator_progress_bars)
    # One bar, the whole job's; a bar per stage too when verbose.
    context.enable_progress_bars, context.enable_operator_progress_bars = progress, verbose
    try:
        with warnings.catch_warnings():
            # Ray >= 2.5x deprecates the catch-all **ray_remote_args, but the retry settings of
            # tasks and actors have no named parameter yet.
            warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
            ds = ray.data.from_items(jobs)
            ds = ds.map_batches(
                tile_rows,
                batch_size=batch_images,
                batch_format="pyarrow",
                fn_kwargs={"options": encoder_kwargs["options"], "max_pixels": max_pixels},
                max_retries=retries,
            )
            ds = ds.map_batches(
                Encoder,
                batch_size=batch_images,
                batch_format="pyarrow",
                fn_constructor_kwargs=encoder_kwargs,
                compute=ray.data.ActorPoolStrategy(size=concurrency),
                num_gpus=num_gpus,
                max_restarts=retries,
                max_task_retries=retries,
            )
            ds.write_parquet(
                os.fspath(folder), row_group_size=batch_images, **parquet.WRITE_OPTIONS
            )
    finally:
        context.enable_progress_bars, context.enable_operator_progress_bars = bars


def _tally(out: Path, files: Sequence[Path], run_index: int) -> tuple[int, int]:
    """Images extracted and failed in run ``run_index``; the failures go to ``errors.jsonl``."""
    extracted = failed = 0
    for _, cols in parquet.read_columns(files, ["key", "run", "error", "message"]):
        for key, row_run, error, message in zip(*cols.values(), strict=True):
            if row_run != run_index:
                continue
            if error is None:
                extracted += 1
            else:
                failed += 1
                store.append_error(out, None, key, error, message or "")
    return extracted, failed


def extract_ray(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    backbone: Any = "efficientnet-lite0",
    options: S2Options | None = None,
    batch_images: int = 8,
    concurrency: int = 1,
    num_gpus: float | None = None,
    device: str | None = None,
    dtype: str | torch.dtype = "float32",
    retries: int = 3,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    verbose: bool = False,
    **kwargs: Any,
) -> RayExtractResult:
    """Extract multi-scale features of every image under ``inputs`` on Ray Data, into Parquet.

    Joins the running Ray cluster (``ray.init`` done by the caller), or the one at ``address``,
    or starts a local one (shut down at the end). See the module documentation for the stages,
    retries and resuming, and :mod:`dynamic_s2.parquet` for the files.

    Args:
        inputs: image files and folders (searched recursively, see
            :func:`~dynamic_s2.extract.find_images`).
        out_dir: output folder, created if needed.
        backbone: a :func:`~dynamic_s2.backbones.load_backbone` spec (each actor loads it; the
            driver loads it once on the CPU too, to read its input size and normalisation) or a
            model (pickled to each actor).
        options: an :class:`~dynamic_s2.options.S2Options` (``kwargs`` override its fields).
        batch_images: images per batch of both stages.
        concurrency: actors in the encoding pool (one per GPU with ``num_gpus=1``).
        num_gpus: GPUs per actor; default 1 when the cluster has GPUs, else 0.
        device: the actors' device; default cuda when an actor sees a GPU.
        dtype: dtype of the stored features: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        retries: restarts of a dead actor and retries of a failed task.
        address: the Ray cluster to join when Ray is not initialised (``"auto"``, ``"ray://..."``).
        overwrite: delete earlier results in ``out_dir`` and start afresh.
        progress: show one progress bar (Ray Data's bar of the whole job).
        max_pixels: as in :func:`dynamic_s2.extract.extract` (default 50 megapixels).
        verbose: show Ray's own INFO logs and a progress bar per stage; by default Ray's console
            logs are at WARNING (its log files under the session folder stay complete).
        **kwargs: any field of :class:`~dynamic_s2.options.S2Options` (``scales``, ``policy``,
            ``max_batch_tiles``, ...).

    Returns:
        A :class:`RayExtractResult`; ``failed_total > 0`` means some images failed.

    Raises:
        ValueError, TypeError: bad arguments, inputs without images, or an ``out_dir`` whose
            ``extract.json`` holds other settings (unless ``overwrite``).

    Examples:
        >>> import os, tempfile, torch
        >>> from PIL import Image
        >>> folder = tempfile.mkdtemp()
        >>> Image.new("RGB", (64, 32), "teal").save(os.path.join(folder, "a.png"))
        >>> extract_ray(folder, tempfile.mkdtemp(), backbone=torch.nn.AvgPool2d(8),
        ...             scales=(32, 64), batch_images=0)
        Traceback (most recent call last):
            ...
        ValueError: batch_images must be a positive int, got 0
    """
    start = time.perf_counter()
    batch_images = _checks.positive_int("batch_images", batch_images)
    concurrency = _checks.positive_int("concurrency", concurrency)
    retries = _checks.non_negative_int("retries", retries)
    dtype = _dtype_name(_resolve_dtype(dtype))
    overwrite = _checks.boolean("overwrite", overwrite)
    verbose = _checks.boolean("verbose", verbose)
    max_pixels = _checks.optional(_checks.positive_int, "max_pixels", max_pixels)
    out = check_out_dir(out_dir)
    opts = make_options(options, kwargs, where="extract_ray()")
    paths = list_inputs(inputs, opts)
    ray = require("ray", "ray")
    require("ray.data", "ray")
    spec, opts = _resolve(backbone, opts)
    config = {"format": parquet.FORMAT, "backbone": spec, **opts.to_config(), "dtype": dtype}
    out.mkdir(parents=True, exist_ok=True)
    lock = store.acquire_lock(out)  # one run per folder
    try:
        if not overwrite:
            store.check_config(out, config)
        folder = out / parquet.PARQUET_DIR
        if overwrite:
            for path in parquet.parquet_files(folder):
                path.unlink()
        store.prepare(out, config, overwrite=overwrite)
        done, run_index = _recover(folder)
        jobs = _jobs(paths, done)
        before = set(parquet.parquet_files(folder))
        if jobs:
            encoder_kwargs = {
                "backbone": backbone,
                "options": opts,
                "device": device,
                "dtype": dtype,
                "run_index": run_index,
            }
            with _ray_logs(verbose):
                _on_cluster(
                    ray, address, jobs, folder, encoder_kwargs, batch_images=batch_images,
                    concurrency=concurrency, num_gpus=num_gpus, retries=retries,
                    progress=progress, verbose=verbose, max_pixels=max_pixels,
                )  # fmt: skip
        written = tuple(p for p in parquet.parquet_files(folder) if p not in before)
        extracted, failed = _tally(out, written, run_index)
    finally:
        store.release_lock(lock)
    seconds = time.perf_counter() - start
    skipped = len(paths) - len(jobs)
    return RayExtractResult(out, extracted, skipped, failed, failed, written, seconds)


class _Quiet(logging.Filter):
    """Drops records below ``level``, and two warnings that our job causes and that ask
    nothing of the user: "the cluster does not have any available CPUs ... will hang", which fires
    as the job ends while our encoding actors still hold the CPUs (it does not hang), and
    "progress bars for operators disabled", which we did on purpose."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return False
        message = record.getMessage()
        return not any(
            text in message
            for text in ("does not have any available CPUs", "Progress bars for operators disabled")
        )


def _consoles(logger: logging.Logger) -> list[logging.Handler]:
    """The console handlers (streams, not files) that the records of ``logger`` and its children
    reach: its own and, while it propagates, its ancestors'."""
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        found += [
            h
            for h in current.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        current = current.parent if current.propagate else None
    return found


@contextlib.contextmanager
def _ray_logs(verbose: bool) -> Iterator[None]:
    """Ray Data's console logs at WARNING (unless ``verbose``) and without the noise of
    :class:`_Quiet`, for the duration of the job; its log files are untouched."""
    quiet = _Quiet(logging.NOTSET if verbose else logging.WARNING)
    consoles = _consoles(logging.getLogger("ray.data"))
    for handler in consoles:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(quiet)


def _on_cluster(
    ray: Any,
    address: str | None,
    *args: Any,
    num_gpus: float | None,
    verbose: bool,
    **kwargs: Any,
) -> None:
    """:func:`_run_job` on the running cluster, or on one started (and shut down) for it."""
    started = not ray.is_initialized()
    if started:  # Ray's driver logs ("Started a local Ray instance") at WARNING unless verbose
        ray.init(address=address, logging_level=logging.INFO if verbose else logging.WARNING)
    try:
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        _run_job(ray, *args, num_gpus=num_gpus, verbose=verbose, **kwargs)
    finally:
        if started:
            ray.shutdown()
