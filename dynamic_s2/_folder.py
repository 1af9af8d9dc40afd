"""Files of an extraction folder opened safely, and the folder's writer lock.

Everything :mod:`dynamic_s2.store` reads or writes in a folder goes through :func:`open_regular`:
a symbolic link planted at the path is never followed, a FIFO never blocks, and anything but a
regular file is refused with a ``ValueError``. :func:`acquire_lock` makes sure that one process at
a time writes a folder.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "LOCK",
    "FolderBusyError",
    "acquire_lock",
    "append_durable",
    "drop_torn_tail",
    "fsync_dir",
    "open_append",
    "open_regular",
    "read_bytes",
    "release_lock",
    "write_durable",
]

#: The lock file that names the one process writing a folder (see :func:`acquire_lock`).
LOCK = "extract.lock"


class FolderBusyError(ValueError):
    """Raised when another process holds the writer lock of an extraction folder."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def open_regular(path: Path, flags: int) -> int:
    """``os.open`` that never follows a symbolic link at ``path`` and never blocks on a FIFO;
    anything but a regular file raises ``ValueError``."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | getattr(os, "O_BINARY", 0), 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EMLINK):
            raise
        fd = -1
    if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd >= 0:
            os.close(fd)
        raise ValueError(
            f"out_dir: {os.fspath(path)!r} is a symbolic link or not a regular file; an "
            "extraction folder holds only the regular files it wrote: remove it"
        )
    return fd


def read_bytes(path: Path) -> bytes | None:
    """The content of the regular file ``path``, or ``None`` when it does not exist."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def open_append(path: Path) -> IO[str]:
    """Open (create) the regular file ``path`` for appending text, not following symlinks."""
    fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding="utf-8")


def acquire_lock(out_dir: Path) -> int | None:
    """Take the writer lock of ``out_dir`` (the file :data:`LOCK`) for this process.

    The lock is an ``flock`` on ``extract.lock``, which names the holder (pid, host, start time);
    the system releases it when the holder exits, even when it is killed. Returns the open file
    descriptor to pass to :func:`release_lock` (``None`` where ``fcntl`` is missing, e.g. Windows:
    no lock).

    Raises:
        FolderBusyError: another process holds the lock; the message names it.

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> fd = acquire_lock(out)
        >>> acquire_lock(out)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        dynamic_s2._folder.FolderBusyError: out_dir: '...' is being written by pid ... on host ...
        >>> release_lock(fd)
        >>> release_lock(acquire_lock(out))
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    path = out_dir / LOCK
    fd = open_regular(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
        os.close(fd)
        try:
            who = json.loads(holder)
            text = f"pid {who['pid']} on host {who['host']} (since {who['since']})"
        except (ValueError, TypeError, KeyError):
            text = f"another process ({holder!r})"
        raise FolderBusyError(
            f"out_dir: {os.fspath(out_dir)!r} is being written by {text}; one extraction per "
            "folder at a time: wait for it to finish, or use another folder"
        ) from None
    since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder + "\n").encode(), 0)
    return fd


def release_lock(fd: int | None) -> None:
    """Release a lock taken by :func:`acquire_lock` (``None``: nothing to release).

    Examples:
        >>> release_lock(None)
    """
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


# ----------------------------------------------------------------------------------------------
# durable writes


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename, fsync the folder.

    The temporary file is created afresh (``O_EXCL``, never through a symbolic link)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a crash, or a planted link: removed, not followed
    fd = open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_durable(f: IO[str], lines: Sequence[str]) -> None:
    """Append ``lines`` (each without its newline) to the open text file ``f`` and fsync it."""
    if not lines:
        return
    f.write("".join(line + "\n" for line in lines))
    f.flush()
    os.fsync(f.fileno())


def drop_torn_tail(path: Path) -> None:
    """Cut an incomplete last line (a write interrupted by a crash) off a JSON-lines file."""
    data = read_bytes(path)
    if data and not data.endswith(b"\n"):
        fd = open_regular(path, os.O_RDWR)
        try:
            os.ftruncate(fd, data.rfind(b"\n") + 1)
            os.fsync(fd)
        finally:
            os.close(fd)
