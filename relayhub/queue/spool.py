"""Message body files: exclusive 0600 creation, fsync of file and directory, removal and aging."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import BinaryIO

from relayhub.queue.ids import is_queue_id

# Large enough that a DATA stream becomes few write(2) calls, small enough to never matter
# for memory with thousands of sessions.
BUFFER_SIZE = 64 * 1024

FileIdentity = tuple[int, int]  # (st_dev, st_ino)


def create_exclusive(path: Path) -> BinaryIO:
    """Create `path` (0600, must not exist) and return it as a buffered binary writer (its
    descriptor also reads, for `insert_front`)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        return os.fdopen(fd, "wb", buffering=BUFFER_SIZE)
    except BaseException:
        os.close(fd)
        raise


def sync_and_close(file: BinaryIO) -> FileIdentity:
    """Flush and fsync `file`, then close it; returns which file it was, for `is_same_file`."""
    with file:
        file.flush()
        # fdatasync: the data and the size needed to read it back, without the timestamps'
        # extra journal write; the directory entry is made durable by the caller.
        os.fdatasync(file.fileno())
        st = os.fstat(file.fileno())
    return st.st_dev, st.st_ino


def complete(file: BinaryIO, rest: bytes, front: bytes) -> None:
    """Blocking: finish a body file being written: `rest` at its end, then `front` in front
    of all of it (see SpooledIncoming.body_parts)."""
    if rest:
        file.write(rest)
    if front:
        file.flush()
        insert_front(file, front)


def insert_front(file: BinaryIO, data: bytes, chunk: int = 1024 * 1024) -> None:
    """Put `data` in front of the content of `file` (open for reading and writing), moving
    the content up from its end so that no more than `chunk` bytes are held at once."""
    if not data:
        return
    fd = file.fileno()
    end = os.fstat(fd).st_size
    while end > 0:
        start = max(0, end - chunk)
        _write_at(fd, os.pread(fd, end - start, start), start + len(data))
        end = start
    _write_at(fd, data, 0)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    if os.pwrite(fd, data, offset) != len(data):  # a regular file: only when the disk is full
        raise OSError(28, "short write", "body file")


def is_same_file(path: Path, identity: FileIdentity) -> bool:
    """True when `path` still names the file we wrote (not removed or replaced meanwhile)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == identity


def open_directory(path: Path) -> int:
    """A file descriptor on `path` that can be fsync'd to persist entries created in it."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def fsync_directory(path: Path) -> None:
    """Persist the entries of directory `path` (files or directories created in it)."""
    fd = open_directory(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path | str) -> None:
    """Unlink `path`; already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def close_quietly(file: BinaryIO) -> OSError | None:
    """Close `file`, returning rather than raising the error of its final flush."""
    try:
        file.close()
    except OSError as exc:
        return exc
    return None


def stale_bodies(directory: Path, older_than: float) -> list[str]:
    """Queue IDs of body files in `directory` not modified for `older_than` seconds."""
    cutoff = time.time() - older_than
    stale: list[str] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not is_queue_id(entry.name):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    stale.append(entry.name)
            except FileNotFoundError:
                continue
    return stale
