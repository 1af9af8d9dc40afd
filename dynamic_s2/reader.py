"""One reader for every extraction folder: safetensors shards or Parquet rows.

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
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from . import _checks, parquet, store
from ._optional import require
from .plan import TilePlan

__all__ = ["FeatureDataset", "FeatureItem", "open_features"]


@dataclass(frozen=True)
class FeatureItem:
    """The stored features of one image.

    Attributes:
        key: the image's path.
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
            entries = store.read_manifest(self.out_dir)
            if not entries and not (self.out_dir / store.MANIFEST).exists():
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

    def index(self, key: str) -> int:
        """The position of the image ``key``.

        Raises:
            KeyError: no such image.
        """
        try:
            return self._positions[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in {os.fspath(self.out_dir)!r}") from None

    def __getitem__(self, index: int | str) -> FeatureItem:
        if isinstance(index, str):
            key = self.keys[self.index(index)]
        elif isinstance(index, int) and not isinstance(index, bool):
            if not -len(self) <= index < len(self):
                raise IndexError(f"index {index} is out of range for {len(self)} images")
            key = self.keys[index]
        else:
            raise TypeError(f"index must be an int or a key (str), got {type(index).__name__}")
        if self.format == "parquet":
            file, row = self._rows[key]
            if file not in self._readers:
                self._readers[file] = _RowGroups(self._files[file], self.verify)
            return _parquet_item(self._readers[file], row)
        entry = self._entries[key]
        if self.verify and entry["shard"] not in self._verified:
            if not store.verify_shard(self.out_dir, entry):
                raise ValueError(
                    f"out_dir: shard {entry['shard']!r} of {os.fspath(self.out_dir)!r} does not "
                    "match the size and SHA-256 its manifest records: it was changed or damaged "
                    "after it was written; delete it and re-run the extraction to redo its "
                    "images, or read it anyway with open_features(..., verify=False)"
                )
            self._verified.add(entry["shard"])
        prefix = None
        if entry.get("prefix") is not None:
            prefix = store.load_features(self.out_dir, entry, prefix=True)
        return FeatureItem(
            key,
            store.load_features(self.out_dir, entry),
            prefix,
            TilePlan.from_dict(entry["plan"]),
            (int(entry["size"][0]), int(entry["size"][1])),
        )

    def __repr__(self) -> str:
        return f"FeatureDataset({os.fspath(self.out_dir)!r}, format={self.format!r}, n={len(self)})"


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
