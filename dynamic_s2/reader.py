"""Reading an extraction folder: the manifest and shards of :func:`dynamic_s2.extract.extract`,
or the Parquet rows of :func:`dynamic_s2.ray.extract_ray`; :mod:`dynamic_s2.store` writes them.

:func:`open_features` (also :func:`dynamic_s2.store.open_features`) opens the folder that
:func:`dynamic_s2.extract.extract` (``manifest.jsonl`` and safetensors shards) or
:func:`dynamic_s2.ray.extract_ray` (``parquet/*.parquet``, see :mod:`dynamic_s2.parquet`) wrote,
as a :class:`torch.utils.data.Dataset` of :class:`FeatureItem`. Images are in the order of their
keys (their paths), whichever the format, so the same inputs give the same positions.

Examples:
    >>> import tempfile, os, torch
    >>> from PIL import Image
    >>> from dynamic_s2.extract import extract
    >>> folder = tempfile.mkdtemp()
    >>> Image.new("RGB", (64, 32), "teal").save(os.path.join(folder, "a.png"))
    >>> out = os.path.join(tempfile.mkdtemp(), "features")
    >>> _ = extract(folder, out, backbone=torch.nn.AvgPool2d(8), scales=(32, 64), workers=0,
    ...             progress=False)
    >>> data = open_features(out)
    >>> len(data), data.format, data[0].features.shape, data[0].image_size
    (1, 'safetensors', torch.Size([8, 16, 6]), (32, 64))
    >>> data[os.path.join(folder, "a.png")].plan.scales[1].grid
    (2, 4)

A key is the image's path as the extraction stored it (absolute); a path given relative to the
current directory finds the same image:

    >>> here = os.getcwd()
    >>> os.chdir(folder)
    >>> data["a.png"].key == data[0].key == os.path.join(folder, "a.png"), "a.png" in data
    (True, True)
    >>> os.chdir(here)
"""

from __future__ import annotations

import bisect
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from . import _checks, parquet
from ._folder import open_regular, read_bytes
from ._optional import require
from ._shards import _SHARD_RE, MANIFEST, _part_rank, verify_shard
from .plan import TilePlan

__all__ = [
    "FeatureDataset",
    "FeatureItem",
    "ManifestWarning",
    "load_features",
    "open_features",
    "read_manifest",
]


class ManifestWarning(UserWarning):
    """Warned when a line of a manifest or an errors file is unusable; the line is skipped (its
    image is simply extracted again)."""


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (none if it is missing).

    A torn last line (a crash) is skipped silently; any other unusable line (bad UTF-8, not JSON,
    not an object) is skipped with a :class:`ManifestWarning`.
    """
    data = read_bytes(path)
    if not data:
        return
    lines = data.split(b"\n")
    for number, raw in enumerate(lines[:-1], start=1):  # lines[-1]: empty, or a torn tail
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            _skip_line(path, number, f"{type(exc).__name__}: {exc}")
            continue
        if isinstance(entry, dict):
            yield entry
        else:
            _skip_line(path, number, f"a JSON {type(entry).__name__}, not an object")


def _skip_line(path: Path, number: int, why: str) -> None:
    warnings.warn(
        _checks.printable(f"{os.fspath(path)}: line {number} skipped ({why})"),
        ManifestWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------------------------
# the manifest


def _manifest_files(out_dir: Path) -> list[Path]:
    parts = sorted(out_dir.glob("manifest-r*.jsonl"), key=_part_rank)
    return [out_dir / MANIFEST, *[p for p in parts if _part_rank(p) >= 0]]


def read_manifest(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the manifest of an extraction folder: one dict per image, in file order.

    Each entry holds:

    - ``path``: the absolute path of the image; ``bytes`` and ``mtime_ns``: its file size and
      modification time when it was read (the resume key, with ``path``);
    - ``size``: ``[h, w]`` of the image after EXIF orientation;
    - ``shard`` and ``key``: the safetensors file (a bare file name in the folder) and the tensor
      name; ``shard_bytes`` and ``shard_sha256``: the shard's size and SHA-256, checked on resume
      (:func:`verify_shard`);
    - ``shape``: ``[h, w, C_total]`` of the feature grid; ``dtype``: its dtype name;
    - ``grids``: the ``[rows, cols]`` tile grid of every scale; ``prefix``: ``[P, C_total]`` of
      the prefix tokens stored under ``key + ".prefix"``, or ``None``;
    - ``plan``: the :class:`~dynamic_s2.plan.TilePlan` as ``to_dict()``.

    Manifest parts of a distributed run that was stopped before rank 0 merged them are read too.
    When an image appears more than once (it changed and was extracted again), the last entry wins.
    A line that is not a usable entry (bad UTF-8 or JSON, a field of the wrong type, a ``shard``
    that is not a shard file name of this folder) is skipped with a :class:`ManifestWarning`.

    Examples:
        >>> import tempfile
        >>> from dynamic_s2.extract import read_manifest
        >>> read_manifest(tempfile.mkdtemp())
        []
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a folder path, got {type(out_dir).__name__}")
    latest: dict[str, dict[str, Any]] = {}
    for path in _manifest_files(Path(out_dir)):
        for entry in _entries(path)[0]:
            latest.pop(entry["path"], None)
            latest[entry["path"]] = entry
    return list(latest.values())


def _entries(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The usable entries of one manifest file, and whether some line was skipped."""
    data = read_bytes(path) or b""
    complete = sum(1 for line in data.split(b"\n")[:-1] if line.strip())
    entries = []
    for number, entry in enumerate(_iter_jsonl(path), start=1):
        problem = _entry_problem(entry)
        if problem is None:
            entries.append(entry)
        else:
            _skip_line(path, number, problem)
    return entries, len(entries) != complete


#: The fields a manifest entry needs to be resumed and read, with their types.
_ENTRY_FIELDS: dict[str, type] = {"path": str, "bytes": int, "mtime_ns": int, "key": str}


def _entry_problem(entry: dict[str, Any]) -> str | None:
    """Why ``entry`` is not a usable manifest entry, or ``None``."""
    for name, kind in _ENTRY_FIELDS.items():
        value = entry.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{name!r} must be a {kind.__name__}, got {value!r}"
    shard = entry.get("shard")
    if not isinstance(shard, str) or _SHARD_RE.match(shard) is None:
        return f"'shard' must be a shard file name such as 'shard-00000.safetensors', got {shard!r}"
    return None


def load_features(
    out_dir: str | os.PathLike[str],
    entry: dict[str, Any],
    *,
    prefix: bool = False,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Load the features of one manifest entry: ``[h, w, C_total]`` (or the ``[P, C_total]``
    prefix tokens with ``prefix=True``).

    Examples:
        >>> import tempfile
        >>> from dynamic_s2.extract import load_features
        >>> load_features(tempfile.mkdtemp(), {"shard": 3})
        Traceback (most recent call last):
            ...
        ValueError: entry: expected a manifest entry with string 'shard' and 'key', got {'shard': 3}
    """
    if not isinstance(entry, dict) or not all(
        isinstance(entry.get(k), str) for k in ("shard", "key")
    ):
        raise ValueError(
            f"entry: expected a manifest entry with string 'shard' and 'key', got {entry!r}"
        )
    if _SHARD_RE.match(entry["shard"]) is None:  # confined to the folder: a bare shard name
        raise ValueError(
            f"entry: 'shard' must be a shard file name in the folder, got {entry['shard']!r}"
        )
    safetensors = require("safetensors", "demo")
    key = entry["key"] + (".prefix" if prefix else "")
    shard = Path(out_dir) / entry["shard"]
    os.close(open_regular(shard, os.O_RDONLY))  # a regular file, not a link or a FIFO
    with safetensors.safe_open(os.fspath(shard), framework="pt", device=str(device)) as f:
        tensor: torch.Tensor = f.get_tensor(key)
    return tensor


# ----------------------------------------------------------------------------------------------
# one dataset over both formats


@dataclass(frozen=True)
class FeatureItem:
    """The stored features of one image.

    Attributes:
        key: the image's path, absolute, as the extraction stored it (the extraction was given
            folders or files, relative or absolute; their paths are made absolute).
        features: ``[h, w, C_total]``, in the stored dtype.
        prefix: ``[P, C_total]`` prefix tokens (CLS, registers), or ``None``.
        plan: the :class:`~dynamic_s2.plan.TilePlan` the image was tiled with.
        image_size: ``(h, w)`` of the image after EXIF orientation.

    Examples:
        >>> from dynamic_s2 import plan_tiles
        >>> plan = plan_tiles(32, 32, (32,))
        >>> item = FeatureItem("/a.png", torch.zeros(4, 4, 3), None, plan, (32, 32))
        >>> item.features.shape
        torch.Size([4, 4, 3])
    """

    key: str
    features: torch.Tensor
    prefix: torch.Tensor | None
    plan: TilePlan
    image_size: tuple[int, int]


class FeatureDataset(torch.utils.data.Dataset[FeatureItem]):
    """The images of an extraction folder, by position (``data[0]``) or by key (``data[path]``).

    Items vary in size: use ``DataLoader(data, collate_fn=list)`` (or your own collate).

    What is checked, and when: a safetensors shard is checked against the size and SHA-256 its
    manifest lines record, once per shard and process, when its first item is read (the whole
    shard is read and hashed once); a Parquet page against the CRC-32 written with it
    (:data:`~dynamic_s2.parquet.WRITE_OPTIONS`), on every read of its row group (files written
    without page checksums are not checked). A mismatch raises ``ValueError`` naming the file;
    nothing is deleted. ``verify=False`` skips both checks.

    Args:
        out_dir: an extraction folder (safetensors or Parquet), or its ``parquet`` subfolder.
        verify: check every shard and page before its features are returned.

    Attributes:
        format: ``"safetensors"`` or ``"parquet"``.
        keys: the image paths, in item order (sorted).

    Raises:
        ValueError: ``out_dir`` holds no extraction, is a file, or (on reading an item) a shard
            or page does not match its checksum.

    Examples:
        >>> import tempfile
        >>> FeatureDataset(tempfile.mkdtemp())
        Traceback (most recent call last):
            ...
        ValueError: out_dir must be an extraction folder (manifest.jsonl or parquet/*.parquet), ...
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, verify: bool = True) -> None:
        if not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(f"out_dir must be a folder path, got {type(out_dir).__name__}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(
                "out_dir must be an extraction folder (manifest.jsonl or parquet/*.parquet), "
                f"got the file {os.fspath(out_dir)!r}"
            )
        self.verify = _checks.boolean("verify", verify)
        self._verified: set[str] = set()  # shards checked in this process
        files = parquet.parquet_files(self.out_dir / parquet.PARQUET_DIR) or parquet.parquet_files(
            self.out_dir
        )
        self.format: Literal["safetensors", "parquet"]
        if files:
            self.format = "parquet"
            self._files = files
            self._rows = _parquet_index(files)  # key -> (file index, row)
            self.keys = sorted(self._rows)
        else:
            entries = read_manifest(self.out_dir)
            if not entries and not (self.out_dir / MANIFEST).exists():
                raise ValueError(
                    "out_dir must be an extraction folder (manifest.jsonl or parquet/*.parquet), "
                    f"got {os.fspath(out_dir)!r}"
                )
            self.format = "safetensors"
            self._entries = {e["path"]: e for e in entries}
            self.keys = sorted(self._entries)
        self._positions = {key: i for i, key in enumerate(self.keys)}
        self._readers: dict[int, _RowGroups] = {}  # opened on first use, per process

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = {}  # open files stay in their process (DataLoader workers reopen)
        state["_verified"] = set()
        return state

    def __len__(self) -> int:
        return len(self.keys)

    def index(self, key: str | os.PathLike[str]) -> int:
        """The position of the image ``key``: its path as given to the extraction, absolute or
        relative to the current directory.

        Raises:
            KeyError: no such image.
        """
        for candidate in _key_candidates(key):
            position = self._positions.get(candidate)
            if position is not None:
                return position
        raise KeyError(f"key {os.fspath(key)!r} is not in {os.fspath(self.out_dir)!r}")

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (str, os.PathLike)):
            return False
        return any(c in self._positions for c in _key_candidates(key))

    def __getitem__(self, index: int | str | os.PathLike[str]) -> FeatureItem:
        if isinstance(index, (str, os.PathLike)):
            key = self.keys[self.index(index)]
        elif isinstance(index, int) and not isinstance(index, bool):
            if not -len(self) <= index < len(self):
                raise IndexError(f"index {index} is out of range for {len(self)} images")
            key = self.keys[index]
        else:
            raise TypeError(f"index must be an int or a key (a path), got {type(index).__name__}")
        if self.format == "parquet":
            file, row = self._rows[key]
            if file not in self._readers:
                self._readers[file] = _RowGroups(self._files[file], self.verify)
            return _parquet_item(self._readers[file], row)
        entry = self._entries[key]
        if self.verify and entry["shard"] not in self._verified:
            if not verify_shard(self.out_dir, entry):
                raise ValueError(
                    f"out_dir: shard {entry['shard']!r} of {os.fspath(self.out_dir)!r} does not "
                    "match the size and SHA-256 its manifest records: it was changed or damaged "
                    "after it was written; delete it and re-run the extraction to redo its "
                    "images, or read it anyway with open_features(..., verify=False)"
                )
            self._verified.add(entry["shard"])
        prefix = None
        if entry.get("prefix") is not None:
            prefix = load_features(self.out_dir, entry, prefix=True)
        return FeatureItem(
            key,
            load_features(self.out_dir, entry),
            prefix,
            TilePlan.from_dict(entry["plan"]),
            (int(entry["size"][0]), int(entry["size"][1])),
        )

    def __repr__(self) -> str:
        return f"FeatureDataset({os.fspath(self.out_dir)!r}, format={self.format!r}, n={len(self)})"


def _key_candidates(key: str | os.PathLike[str]) -> list[str]:
    """The stored keys that ``key`` may stand for: itself, then made absolute as the extraction
    made its inputs absolute (``Path.absolute``, which keeps ``..``), then normalised.

    Examples:
        >>> here = os.getcwd()
        >>> _key_candidates("photos/../a.png") == [
        ...     "photos/../a.png", f"{here}/photos/../a.png", f"{here}/a.png"]
        True
    """
    given = os.fspath(key)
    absolute = str(Path(given).expanduser().absolute())
    return list(dict.fromkeys([given, absolute, os.path.normpath(absolute)]))


def _parquet_index(files: list[Path]) -> dict[str, tuple[int, int]]:
    """Where the current row of every key is: the successful row of the highest run."""
    best: dict[str, tuple[int, int, int]] = {}  # key -> (run, file, row)
    for fi, (_, cols) in enumerate(parquet.read_columns(files, ["key", "run", "error"])):
        for row, (key, run, error) in enumerate(zip(*cols.values(), strict=True)):
            if error is None and (key not in best or run >= best[key][0]):
                best[key] = (run, fi, row)
    return {key: (fi, row) for key, (_, fi, row) in best.items()}


class _RowGroups:
    """Row access to one Parquet file, a row group at a time (the last one read is kept)."""

    def __init__(self, path: Path, verify: bool = True) -> None:
        self.path = path
        self.file = require("pyarrow.parquet", "ray").ParquetFile(
            path, page_checksum_verification=verify
        )
        meta = self.file.metadata
        self.starts = [0]
        for g in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(g).num_rows)
        self._kept: tuple[int, Any] = (-1, None)

    def row(self, index: int) -> dict[str, Any]:
        g = bisect.bisect_right(self.starts, index) - 1
        if self._kept[0] != g:
            try:
                self._kept = (g, self.file.read_row_group(g))
            except OSError as exc:  # a page whose CRC-32 does not match
                raise ValueError(
                    f"out_dir: {os.fspath(self.path)!r} is damaged (row group {g}): {exc}; "
                    "re-extract its images, or read it anyway with open_features(..., "
                    "verify=False)"
                ) from exc
        rows: list[dict[str, Any]] = self._kept[1].slice(index - self.starts[g], 1).to_pylist()
        return rows[0]


def _parquet_item(reader: _RowGroups, index: int) -> FeatureItem:
    row = reader.row(index)
    prefix = None
    if row["prefix"] is not None:
        prefix = parquet.decode_tensor(row["prefix"], row["dtype"], row["prefix_shape"])
    return FeatureItem(
        row["key"],
        parquet.decode_tensor(row["features"], row["dtype"], row["shape"]),
        prefix,
        TilePlan.from_dict(json.loads(row["plan"])),
        (int(row["height"]), int(row["width"])),
    )


def open_features(out_dir: str | os.PathLike[str], *, verify: bool = True) -> FeatureDataset:
    """Open an extraction folder (safetensors or Parquet) as a :class:`FeatureDataset`.

    ``verify`` (default) checks every shard's SHA-256 and every Parquet page's CRC-32 before
    their features are returned (see :class:`FeatureDataset`).

    Examples:
        >>> import tempfile
        >>> open_features(tempfile.mkdtemp())
        Traceback (most recent call last):
            ...
        ValueError: out_dir must be an extraction folder ...
    """
    return FeatureDataset(out_dir, verify=verify)
