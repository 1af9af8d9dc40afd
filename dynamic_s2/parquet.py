"""The Parquet format of an extraction folder: one row per image, self-contained.

:func:`dynamic_s2.ray.extract_ray` writes ``OUT/parquet/*.parquet`` (plus ``OUT/extract.json``, the
settings, and ``OUT/errors.jsonl``, the images that the latest run could not read, both as
:mod:`dynamic_s2.store` describes). Every row is one image and carries everything needed to use
its features, so the files can be read with plain ``pyarrow.parquet.read_table("OUT/parquet")``,
``ray.data.read_parquet("OUT/parquet")``, pandas, DuckDB or Spark, as well as with
:func:`dynamic_s2.store.open_features`. The columns (:func:`schema`):

| column | type | meaning |
|---|---|---|
| `key` | string | absolute path of the image |
| `bytes` | int64 | its file size when it was read (-1: it could not be stat'ed) |
| `mtime_ns` | int64 | its modification time in ns (with `key` and `bytes`: the resume key) |
| `run` | int32 | the run that wrote the row: 0, then 1, 2, ... for each resume |
| `height`, `width` | int32 | image size after EXIF orientation (null on error rows) |
| `plan` | string | the `TilePlan` as JSON (`to_dict()`) |
| `shape` | list<int64> | `[h, w, C_total]` of the feature grid |
| `dtype` | string | torch dtype name of the tensors: `float32`, `bfloat16`, ... |
| `features` | large_binary | the `[h, w, C_total]` tensor, C-order, little-endian bytes |
| `prefix_shape` | list<int64> | `[P, C_total]` of the prefix tokens, or null |
| `prefix` | large_binary | the prefix tokens' bytes (same dtype), or null |
| `error` | string | null, or the exception type when the image could not be read |
| `message` | string | null, or the exception's message |

A row with ``error`` set has null features and stands for an image that failed; readers skip it.
When a key has several rows (an image that changed and was extracted again on resume), the row of
the highest ``run`` is the current one. Decoding a tensor is :func:`decode_tensor` (or, without
this library, ``numpy.frombuffer(row["features"], dtype).reshape(row["shape"])``; bfloat16 needs
``torch.frombuffer``).

pyarrow comes with the ``ray`` extra: ``pip install "dynamic_s2[ray]"``.

Examples:
    >>> import torch
    >>> from dynamic_s2 import plan_tiles
    >>> row = feature_row("/a.png", 10, 5, 0, plan_tiles(64, 64, (32, 64)),
    ...                   torch.ones(8, 8, 6), None)
    >>> row["shape"], row["dtype"], len(row["features"])
    ([8, 8, 6], 'float32', 1536)
    >>> decode_tensor(row["features"], row["dtype"], row["shape"]).sum().item()
    384.0
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ._optional import require
from .plan import TilePlan

__all__ = [
    "FORMAT",
    "PARQUET_DIR",
    "WRITE_OPTIONS",
    "decode_tensor",
    "encode_tensor",
    "error_row",
    "feature_row",
    "parquet_files",
    "read_columns",
    "schema",
]

#: The ``format`` recorded in ``extract.json`` of a Parquet extraction folder.
FORMAT = "dynamic_s2.parquet/1"
#: The subfolder of the extraction folder that holds the Parquet files.
PARQUET_DIR = "parquet"

#: How the files are written (``pyarrow.parquet.write_table`` keywords): every data page carries a
#: CRC-32, which :func:`read_columns` and the reader verify: flipped bytes raise, never read back.
WRITE_OPTIONS: dict[str, Any] = {"write_page_checksum": True}


def schema() -> Any:
    """The ``pyarrow.Schema`` of the rows (see the module documentation).

    Examples:
        >>> schema().names[:4]
        ['key', 'bytes', 'mtime_ns', 'run']
    """
    pa = require("pyarrow", "ray")
    shape = pa.list_(pa.int64())
    return pa.schema(
        [
            ("key", pa.string()),
            ("bytes", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("run", pa.int32()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("plan", pa.string()),
            ("shape", shape),
            ("dtype", pa.string()),
            ("features", pa.large_binary()),
            ("prefix_shape", shape),
            ("prefix", pa.large_binary()),
            ("error", pa.string()),
            ("message", pa.string()),
        ]
    )


def encode_tensor(tensor: torch.Tensor) -> tuple[bytes, str, list[int]]:
    """A tensor as ``(raw bytes, dtype name, shape)``: exact for every dtype, bfloat16 included.

    Examples:
        >>> data, dtype, shape = encode_tensor(torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16))
        >>> len(data), dtype, shape
        (4, 'bfloat16', [1, 2])
    """
    t = tensor.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return raw.numpy().tobytes(), str(t.dtype).removeprefix("torch."), list(t.shape)


def decode_tensor(data: bytes, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """The tensor of :func:`encode_tensor`'s ``(raw bytes, dtype name, shape)``.

    Raises:
        ValueError: an unknown dtype name, or bytes that do not fit the shape.

    Examples:
        >>> t = torch.randn(2, 3, 4).to(torch.bfloat16)
        >>> torch.equal(decode_tensor(*encode_tensor(t)), t)
        True
        >>> decode_tensor(b"1234", "float33", [1])
        Traceback (most recent call last):
            ...
        ValueError: dtype must be a torch dtype name such as 'float32', got 'float33'
    """
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype name such as 'float32', got {dtype!r}")
    size = [int(s) for s in shape]
    count = 1
    for s in size:
        count *= s
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    if len(data) != count * itemsize:
        raise ValueError(
            f"data must hold {count} {dtype} values for shape {size}, got {len(data)} bytes"
        )
    if count == 0:
        return torch.empty(size, dtype=torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(size)


def feature_row(
    key: str,
    nbytes: int,
    mtime_ns: int,
    run: int,
    plan: TilePlan,
    features: torch.Tensor,
    prefix: torch.Tensor | None,
) -> dict[str, Any]:
    """The row of one extracted image: its ``[h, w, C]`` features and ``[P, C]`` prefix (or
    ``None``), with its key, resume key, run and plan.

    Examples:
        >>> from dynamic_s2 import plan_tiles
        >>> row = feature_row("/b.png", 1, 2, 3, plan_tiles(40, 80, (32,)), torch.zeros(4, 8, 2),
        ...                   torch.zeros(1, 2))
        >>> row["height"], row["width"], row["prefix_shape"], row["error"]
        (40, 80, [1, 2], None)
    """
    data, dtype, shape = encode_tensor(features)
    prefix_data, prefix_shape = None, None
    if prefix is not None:
        prefix_data, _, prefix_shape = encode_tensor(prefix.to(features.dtype))
    h, w = plan.image_size
    return {
        "key": key,
        "bytes": nbytes,
        "mtime_ns": mtime_ns,
        "run": run,
        "height": h,
        "width": w,
        "plan": json.dumps(plan.to_dict()),
        "shape": shape,
        "dtype": dtype,
        "features": data,
        "prefix_shape": prefix_shape,
        "prefix": prefix_data,
        "error": None,
        "message": None,
    }


def error_row(
    key: str, nbytes: int, mtime_ns: int, run: int, error: str, message: str
) -> dict[str, Any]:
    """The row of an image that could not be read: no features, ``error`` and ``message`` set.

    Examples:
        >>> row = error_row("/c.png", 0, 0, 0, "OSError", "truncated")
        >>> row["features"], row["error"]
        (None, 'OSError')
    """
    row: dict[str, Any] = dict.fromkeys(schema().names)
    row.update(key=key, bytes=nbytes, mtime_ns=mtime_ns, run=run, error=error, message=message)
    return row


def parquet_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``*.parquet`` files directly in ``folder``, sorted by name (none if it is missing).

    Examples:
        >>> import tempfile
        >>> parquet_files(tempfile.mkdtemp())
        []
    """
    path = Path(folder)
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.suffix == ".parquet" and p.is_file())


def read_columns(
    files: Sequence[Path], columns: Sequence[str]
) -> Iterator[tuple[Path, dict[str, list[Any]]]]:
    """``columns`` of every file, as ``(file, {column: values})``, reading only those columns.

    Examples:
        >>> import tempfile, pathlib, pyarrow, pyarrow.parquet
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.parquet"
        >>> table = pyarrow.Table.from_pylist([error_row("/x.png", 0, 0, 0, "E", "m")], schema())
        >>> pyarrow.parquet.write_table(table, path)
        >>> [(f.name, c["key"]) for f, c in read_columns([path], ["key"])]
        [('a.parquet', ['/x.png'])]
    """
    pq = require("pyarrow.parquet", "ray")
    for path in files:
        try:
            table = pq.read_table(path, columns=list(columns), page_checksum_verification=True)
        except OSError as exc:  # a page whose CRC-32 does not match, or an unreadable file
            raise ValueError(f"out_dir: {os.fspath(path)!r} is damaged: {exc}") from exc
        yield path, {name: table.column(name).to_pylist() for name in columns}
