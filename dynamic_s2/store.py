"""The files of an extraction folder, and the crash-safe writes that keep them consistent.

:func:`dynamic_s2.extract.extract` fills one folder; this module owns its on-disk format:

- ``shard-00000.safetensors``, ``shard-00001.safetensors``, ...: one ``[h, w, C_total]`` tensor per
  image under a key such as ``"img-000123"`` (``123``: the image's position in the sorted input
  list), plus ``"img-000123.prefix"`` (``[P, C_total]``) for backbones with prefix tokens. The
  safetensors metadata holds ``format`` (:data:`FORMAT`) and ``backbone``. A shard is closed when
  it holds ``shard_size`` images or :data:`SHARD_MAX_BYTES` bytes, whichever comes first.
- ``manifest.jsonl``: one JSON object per line and image, with the fields ``path``, ``bytes``,
  ``mtime_ns``, ``size``, ``shard``, ``key``, ``shape``, ``dtype``, ``grids``, ``prefix`` and
  ``plan`` (described in :func:`read_manifest`).
- ``errors.jsonl``: one JSON object ``{"path", "error", "message"}`` per image that the latest run
  could not read; the file is there only when some image failed.
- ``extract.json``: the settings of the run (``format``, ``backbone``, ``scales``, ``tile_size``,
  ``max_tiles``, ``policy``, ``fit``, ``output_scale``, ``resample``, ``dtype``); a resumed run
  must match them (:func:`check_config`).

Rank ``r`` of a distributed run writes ``shard-r{r}-00000.safetensors``, ... and the parts
``manifest-r{r}.jsonl`` and ``errors-r{r}.jsonl``; rank 0 folds the parts into ``manifest.jsonl``
and ``errors.jsonl`` at the end (:func:`merge_parts`).

Crash safety, at any point a process may be killed:

- A whole file (a shard, ``extract.json``, a merged manifest) is written under ``NAME.tmp``, flushed
  to disk and atomically renamed over ``NAME``, and the folder is flushed too: a reader sees the
  old file or the new one, never half of one.
- The manifest lines of a shard are appended, and flushed to disk, only after the shard is durable
  (:class:`ShardWriter`). Every manifest line names a complete shard; a killed run loses at most
  the images of the shard it was filling.
- JSON-lines files grow by whole lines, each append flushed to disk. A line torn by a crash is
  skipped when reading and cut off before appending again: its image is simply extracted again.
- On resume, :func:`recover` deletes this rank's ``.tmp`` leftovers and the shards it wrote whose
  manifest lines never made it. An image is done when its path, file size and modification time
  are in the manifest and its shard exists.

This module writes the folder. Reading it (:func:`read_manifest`, :func:`load_features`,
:func:`open_features`) is :mod:`dynamic_s2.reader`'s job; those names are re-exported here. Writing
and reading shards needs safetensors, from the ``demo`` extra: ``pip install "dynamic_s2[demo]"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._folder import (
    LOCK,
    FolderBusyError,
    acquire_lock,
    append_durable,
    drop_torn_tail,
    fsync_dir,
    open_append,
    read_bytes,
    write_durable,
)
from ._folder import release_lock as release_lock
from ._shards import (
    _PART_RE,
    _SHARD_RE,
    CONFIG,
    ERRORS,
    FORMAT,
    MANIFEST,
    SHARD_MAX_BYTES,
    DoneKey,
    ShardWriter,
    _errors_path,
    _manifest_path,
    _part_rank,
    verify_shard,
)
from .parquet import PARQUET_DIR, parquet_files
from .reader import ManifestWarning as ManifestWarning
from .reader import _entries, _manifest_files
from .reader import load_features as load_features
from .reader import open_features as open_features
from .reader import read_manifest as read_manifest

__all__ = [
    "CONFIG",
    "ERRORS",
    "FORMAT",
    "LOCK",
    "MANIFEST",
    "SHARD_MAX_BYTES",
    "FolderBusyError",
    "ManifestWarning",
    "ShardWriter",
    "acquire_lock",
    "append_error",
    "check_config",
    "clean",
    "load_features",
    "merge_parts",
    "open_features",
    "prepare",
    "read_manifest",
    "recover",
    "release_lock",
    "verify_shard",
]

# ----------------------------------------------------------------------------------------------
# durable writes


def append_error(out_dir: Path, rank: int | None, path: str, error: str, message: str) -> None:
    """Append the failure of the image at ``path`` to ``errors.jsonl`` (or rank ``rank``'s part).

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> append_error(out, None, "/photos/a.png", "OSError", "truncated file")
        >>> print((out / ERRORS).read_text(), end="")
        {"path": "/photos/a.png", "error": "OSError", "message": "truncated file"}
    """
    line = json.dumps({"path": path, "error": error, "message": message})
    with open_append(_errors_path(out_dir, rank)) as f:
        append_durable(f, [line])


# ----------------------------------------------------------------------------------------------
# the folder: settings, resuming, cleaning, merging


def check_config(out_dir: Path, config: dict[str, Any]) -> None:
    """Raise ``ValueError`` when ``out_dir/extract.json`` holds settings other than ``config``.

    A missing ``extract.json`` passes when the folder holds no manifest and no shard (a new
    folder); a missing or unreadable one beside earlier results raises ``ValueError``: the
    settings of those results are unknown.

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> prepare(out, {"dtype": "float32"}, overwrite=False)
        >>> check_config(out, {"dtype": "float32"})
        >>> check_config(out, {"dtype": "float16"})
        Traceback (most recent call last):
            ...
        ValueError: out_dir: ... (dtype: 'float32' before, 'float16' now); pass overwrite=True ...
    """
    old = _read_config(out_dir)
    if old is None:
        return
    old, config = _effective(old), _effective(config)
    diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in sorted(diff.items()))
        raise ValueError(
            f"out_dir: {os.fspath(out_dir)!r} holds features extracted with other settings "
            f"({details}); pass overwrite=True (--overwrite) to start afresh, or use another folder"
        )


def _effective(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with an unset ``tile_size`` read as the tile it gives, the first scale (the
    planner's default), so that a run with defaults taken from the backbone and a run with the
    same sizes given compare equal, in either order."""
    scales = config.get("scales")
    if config.get("tile_size") is None and isinstance(scales, list) and scales:
        return {**config, "tile_size": scales[0]}
    return config


def _read_config(out_dir: Path) -> dict[str, Any] | None:
    """The settings in ``extract.json``; ``None`` for a folder without results and without them.

    Raises ``ValueError`` when shards or Parquet files exist but ``extract.json`` is missing or
    unreadable."""
    data = None
    try:
        data = read_bytes(out_dir / CONFIG)
        old = None if data is None else json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):  # also a link or a FIFO named extract.json
        old = None
    if isinstance(old, dict):
        return old
    shards = any(_SHARD_RE.match(p.name) for p in out_dir.iterdir())
    if not shards and not parquet_files(out_dir / PARQUET_DIR):
        return None
    state = "no" if data is None else "an unreadable"
    raise ValueError(
        f"out_dir: {os.fspath(out_dir)!r} holds features (safetensors shards or Parquet files) "
        f"but {state} {CONFIG}, so the settings "
        "they were extracted with are unknown; pass overwrite=True (--overwrite) to start "
        "afresh, or use another folder"
    )


def clean(out_dir: Path) -> None:
    """Remove every file an earlier extraction wrote (only ours; the folder and others stay).

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("manifest.jsonl", "shard-r1-00002.safetensors.tmp", "notes.txt"):
        ...     _ = (out / name).write_text("")
        >>> clean(out)
        >>> [p.name for p in out.iterdir()]
        ['notes.txt']
    """
    for path in out_dir.iterdir():
        name = path.name
        ours = (
            _SHARD_RE.match(name.removesuffix(".tmp"))
            or _PART_RE.match(name.removesuffix(".tmp"))
            or name.removesuffix(".tmp") in (MANIFEST, ERRORS, CONFIG)
        )
        if ours and path.is_file():
            path.unlink()
    fsync_dir(out_dir)


def prepare(out_dir: Path, config: dict[str, Any], *, overwrite: bool) -> None:
    """Rank 0 at the start of a run: :func:`clean` the folder with ``overwrite``, drop the errors
    of earlier runs (``errors.jsonl`` lists the latest run's only) and write ``extract.json``.

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (out / ERRORS).write_text('{"path": "/old.png"}\\n')
        >>> prepare(out, {"scales": [224, 448]}, overwrite=False)
        >>> sorted(p.name for p in out.iterdir())
        ['extract.json']
    """
    if overwrite:
        clean(out_dir)
    # errors.jsonl lists the failures of the latest run only.
    (out_dir / ERRORS).unlink(missing_ok=True)
    for part in out_dir.glob("errors-r*.jsonl"):
        part.unlink()
    write_durable(out_dir / CONFIG, (json.dumps(config, indent=1) + "\n").encode())


def recover(out_dir: Path, rank: int | None) -> tuple[set[DoneKey], int]:
    """Clean up what a crash of this rank left in ``out_dir`` and say what is already done.

    Cuts a torn last line off this rank's manifest, deletes this rank's ``.tmp`` shards and the
    shards it wrote that no manifest line names.

    Args:
        out_dir: the extraction folder.
        rank: the rank of a distributed run, or ``None`` without torch.distributed.

    Returns:
        The ``(path, bytes, mtime_ns)`` of every image whose features are stored (by any rank),
        and the number of this rank's next shard.

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (out / "shard-00000.safetensors").write_bytes(b"")  # no manifest line names it
        >>> _ = (out / "shard-00001.safetensors.tmp").write_bytes(b"")  # an interrupted write
        >>> _ = (out / MANIFEST).write_text('{"path": "/a.png", "sha')  # a torn line
        >>> recover(out, None)
        (set(), 1)
        >>> [p.name for p in out.iterdir()], (out / MANIFEST).read_text()
        (['manifest.jsonl'], '')
    """
    own_rank = "" if rank is None else str(rank)
    drop_torn_tail(_manifest_path(out_dir, rank))
    own_shards: dict[str, int] = {}
    for path in out_dir.iterdir():
        m = _SHARD_RE.match(path.name.removesuffix(".tmp"))
        if m is None or (m.group(1) or "") != own_rank:
            continue
        if path.name.endswith(".tmp"):
            path.unlink()  # an interrupted shard write
        else:
            own_shards[path.name] = int(m.group(2))
    done: set[DoneKey] = set()
    sound: dict[str, bool] = {}  # shard name -> it exists and matches its manifest lines
    used = -1  # the highest index of this rank's shards named by the manifest
    for entry in read_manifest(out_dir):
        shard = entry["shard"]
        if shard not in sound:
            sound[shard] = verify_shard(out_dir, entry)
        m = _SHARD_RE.match(shard)
        if m is not None and (m.group(1) or "") == own_rank:
            used = max(used, int(m.group(2)))  # never reuse a name that old lines still name
        if sound[shard]:
            done.add((entry["path"], entry["bytes"], entry["mtime_ns"]))
    for name in own_shards:
        if not sound.get(name, False):  # no manifest line names it, or it is damaged: redone
            (out_dir / name).unlink()
    return done, max(used, *own_shards.values(), -1) + 1


def merge_parts(out_dir: Path) -> None:
    """Rank 0 at the end: fold manifest parts into ``manifest.jsonl`` (the last entry per path
    wins) and error parts into ``errors.jsonl``.

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> def line(path):
        ...     entry = {"path": path, "bytes": 1, "mtime_ns": 1, "key": "img-000000"}
        ...     return json.dumps({**entry, "shard": "shard-r0-00000.safetensors"}) + "\\n"
        >>> _ = (out / "manifest-r0.jsonl").write_text(line("/a.png"))
        >>> _ = (out / "manifest-r1.jsonl").write_text(line("/b.png"))
        >>> merge_parts(out)
        >>> [p.name for p in out.iterdir()], [e["path"] for e in read_manifest(out)]
        (['manifest.jsonl'], ['/a.png', '/b.png'])
    """
    files = [p for p in _manifest_files(out_dir) if p.exists()]
    parts = files[1:] if files and files[0].name == MANIFEST else files
    # Which line of which file is the last entry for each path.
    last: dict[str, tuple[int, int]] = {}
    count, skipped = 0, False
    usable = []
    for fi, path in enumerate(files):
        entries, some_skipped = _entries(path)
        usable.append(entries)
        skipped = skipped or some_skipped
        for li, entry in enumerate(entries):
            count += 1
            last[entry["path"]] = (fi, li)
    if parts or skipped or count != len(last):
        keep = set(last.values())
        lines = [
            json.dumps(entry)
            for fi, entries in enumerate(usable)
            for li, entry in enumerate(entries)
            if (fi, li) in keep
        ]
        write_durable(out_dir / MANIFEST, "".join(line + "\n" for line in lines).encode())
        for part in parts:
            part.unlink()
        fsync_dir(out_dir)
    # Error parts are this run's (rank 0 removed older ones at the start).
    error_parts = sorted(out_dir.glob("errors-r*.jsonl"), key=_part_rank)
    if error_parts:
        data = b"".join(read_bytes(p) or b"" for p in error_parts)
        if data:
            write_durable(out_dir / ERRORS, data)
        for part in error_parts:
            part.unlink()
        fsync_dir(out_dir)
