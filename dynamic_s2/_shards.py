"""The file names of an extraction folder, and the writer of its shards.

:mod:`dynamic_s2.store` describes the folder and re-exports everything here.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from ._folder import append_durable, open_append, read_bytes, write_durable
from ._optional import require

if TYPE_CHECKING:
    from .plan import TilePlan

__all__ = ["CONFIG", "ERRORS", "FORMAT", "MANIFEST", "SHARD_MAX_BYTES", "ShardWriter"]

MANIFEST = "manifest.jsonl"
ERRORS = "errors.jsonl"
CONFIG = "extract.json"
#: The ``format`` written into ``extract.json`` and into every shard's metadata.
FORMAT = "dynamic_s2.extract/1"
#: A shard is closed when it holds ``shard_size`` images or this many bytes, whichever comes first.
SHARD_MAX_BYTES = 1 << 30
_SHARD_RE = re.compile(r"^shard-(?:r(\d+)-)?(\d+)\.safetensors$")
_PART_RE = re.compile(r"^(manifest|errors)-r(\d+)\.jsonl$")

#: The resume key of an image: its path, file size and modification time (ns).
DoneKey = tuple[str, int, int]


def _part_rank(path: Path) -> int:
    match = _PART_RE.match(path.name)
    return int(match.group(2)) if match else -1


def _shard_name(rank: int | None, index: int) -> str:
    tag = "" if rank is None else f"r{rank}-"
    return f"shard-{tag}{index:05d}.safetensors"


def _manifest_path(out_dir: Path, rank: int | None) -> Path:
    return out_dir / (MANIFEST if rank is None else f"manifest-r{rank}.jsonl")


def _errors_path(out_dir: Path, rank: int | None) -> Path:
    return out_dir / (ERRORS if rank is None else f"errors-r{rank}.jsonl")


def _save_shard(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[int, str]:
    """Save ``tensors`` as safetensors at ``path`` like ``write_durable``; return the file's
    size and SHA-256 (hex)."""
    safetensors_torch = require("safetensors.torch", "demo")
    data: bytes = safetensors_torch.save(tensors, metadata=metadata)
    write_durable(path, data)
    return len(data), hashlib.sha256(data).hexdigest()


class ShardWriter:
    """Collects features into shards; writes each shard durably, and only then its manifest lines.

    Opening the writer opens (creates) the manifest, ``manifest.jsonl`` or rank ``rank``'s part,
    for appending. :meth:`add` writes the shard being filled once it is full; :meth:`flush` writes
    it whatever its size. Closing does not flush: a run that fails half-way leaves no partial shard.

    Args:
        out_dir: the extraction folder.
        rank: the rank of a distributed run, or ``None`` without torch.distributed.
        first_index: the number of the first shard to write (from :func:`recover`).
        shard_size: the most images per shard.
        metadata: safetensors metadata of every shard.
        max_bytes: the most tensor bytes per shard (checked after each image).

    Attributes:
        written: the shard files written so far.

    Examples:
        >>> import tempfile, pathlib, torch
        >>> from dynamic_s2 import plan_tiles
        >>> from dynamic_s2.store import load_features, read_manifest
        >>> out, plan = pathlib.Path(tempfile.mkdtemp()), plan_tiles(64, 64, (32, 64))
        >>> with ShardWriter(out, shard_size=2) as writer:
        ...     for i in range(3):
        ...         features = torch.full((8, 8, 6), float(i))
        ...         writer.add(i, features, None, path=f"/{i}.png", nbytes=1, mtime_ns=1, plan=plan)
        ...     writer.flush()
        >>> [p.name for p in writer.written]
        ['shard-00000.safetensors', 'shard-00001.safetensors']
        >>> entry = read_manifest(out)[2]
        >>> entry["shard"], entry["key"], entry["shape"], entry["dtype"], entry["grids"]
        ('shard-00001.safetensors', 'img-000002', [8, 8, 6], 'float32', [[1, 1], [2, 2]])
        >>> load_features(out, entry)[0, 0]
        tensor([2., 2., 2., 2., 2., 2.])
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        rank: int | None = None,
        first_index: int = 0,
        shard_size: int = 100,
        metadata: dict[str, str] | None = None,
        max_bytes: int = SHARD_MAX_BYTES,
    ) -> None:
        self.out_dir = out_dir
        self.rank = rank
        self.shard_size = shard_size
        self.metadata = {} if metadata is None else metadata
        self.max_bytes = max_bytes
        self.written: list[Path] = []
        self._index = first_index
        self._tensors: dict[str, torch.Tensor] = {}
        self._lines: list[dict[str, Any]] = []
        self._bytes = 0
        self._manifest = open_append(_manifest_path(out_dir, rank))

    @property
    def shard_name(self) -> str:
        """The file name of the shard being filled."""
        return _shard_name(self.rank, self._index)

    def add(
        self,
        index: int,
        features: torch.Tensor,
        prefix: torch.Tensor | None,
        *,
        path: str,
        nbytes: int,
        mtime_ns: int,
        plan: TilePlan,
    ) -> None:
        """Add image ``index`` (its position in the sorted input list): its ``[h, w, C_total]``
        features, its ``[P, C_total]`` prefix tokens or ``None``, and its manifest entry (the
        image's ``path``, file size ``nbytes``, ``mtime_ns`` and ``plan``). Writes the shard when
        it is full."""
        key = f"img-{index:06d}"
        self._tensors[key] = features.contiguous()
        if prefix is not None:
            self._tensors[key + ".prefix"] = prefix.contiguous()
            self._bytes += prefix.numel() * prefix.element_size()
        self._bytes += features.numel() * features.element_size()
        entry = {
            "path": path,
            "bytes": nbytes,
            "mtime_ns": mtime_ns,
            "size": list(plan.image_size),
            "shard": self.shard_name,
            "key": key,
            "shape": list(features.shape),
            "dtype": str(features.dtype).removeprefix("torch."),
            "grids": [list(sp.grid) for sp in plan.scales],
            "prefix": None if prefix is None else list(prefix.shape),
            "plan": plan.to_dict(),
        }
        self._lines.append(entry)
        if len(self._lines) >= self.shard_size or self._bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the shard being filled (if it holds anything), then append its manifest lines."""
        if not self._tensors:
            return
        path = self.out_dir / self.shard_name
        nbytes, sha256 = _save_shard(path, self._tensors, self.metadata)
        lines = [
            json.dumps({**e, "shard_bytes": nbytes, "shard_sha256": sha256}) for e in self._lines
        ]
        append_durable(self._manifest, lines)  # only after the shard is durable
        self.written.append(path)
        self._index += 1
        self._tensors, self._lines, self._bytes = {}, [], 0

    def close(self) -> None:
        """Close the manifest file; what was added since the last shard was written is dropped."""
        self._manifest.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def verify_shard(out_dir: Path, entry: dict[str, Any]) -> bool:
    """Whether the shard of manifest ``entry`` is intact: a regular file (not a link) whose size and
    SHA-256 are the ``shard_bytes`` and ``shard_sha256`` of the entry.

    Entries of older folders, without these two fields, only need the shard to exist.

    Examples:
        >>> import tempfile, pathlib, hashlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (out / "shard-00000.safetensors").write_bytes(b"features")
        >>> entry = {"shard": "shard-00000.safetensors", "shard_bytes": 8,
        ...          "shard_sha256": hashlib.sha256(b"features").hexdigest()}
        >>> verify_shard(out, entry)
        True
        >>> _ = (out / "shard-00000.safetensors").write_bytes(b"featureS")  # one bit flipped
        >>> verify_shard(out, entry)
        False
    """
    try:
        data = read_bytes(out_dir / entry["shard"])
    except (ValueError, OSError):
        return False
    if data is None:
        return False
    nbytes, sha256 = entry.get("shard_bytes"), entry.get("shard_sha256")
    if nbytes is None and sha256 is None:
        return True
    return len(data) == nbytes and hashlib.sha256(data).hexdigest() == sha256
