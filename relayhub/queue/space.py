"""Free space in the state directory: the `[queue] min_free_space` check at MAIL (and for
the SIZE a client announces), and which store errors mean "no space" (452 4.3.1) rather
than another local problem (451 4.3.0)."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from relayhub.errors import InsufficientStorage, TemporaryFailure

# How long one statvfs answer is used: MAIL may come thousands of times a second, and free
# space that changes within a second changes the answer of a few sessions at most.
CACHE_SECONDS = 1.0
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_out_of_space(error: BaseException | None) -> bool:
    """ENOSPC/EDQUOT from the file system, or SQLite's "database or disk is full"."""
    if isinstance(error, OSError):
        return error.errno in _NO_SPACE_ERRNOS
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return False


def storage_failure(error: BaseException | None) -> TemporaryFailure:
    """The reply for a store operation that failed with `error`."""
    return InsufficientStorage() if is_out_of_space(error) else TemporaryFailure()


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged process may still write under `path`; None when unknown."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class FreeSpace:
    """Refuses new mail (InsufficientStorage) while the file system holding `path` has less
    than `minimum` bytes free, or too little for the message size a client announced.

    One statvfs at most every CACHE_SECONDS (it is cheap, but MAIL is the hottest command);
    `clock` gives seconds (the reactor's)."""

    def __init__(self, path: Path, minimum: int, clock: Callable[[], float],
                 measure: Callable[[Path], int | None] = free_bytes) -> None:
        self.path = path
        self.minimum = minimum
        self._clock = clock
        self._measure = measure
        self._free: int | None = None
        self._measured_at: float | None = None

    def free(self) -> int | None:
        now = self._clock()
        if self._measured_at is None or not 0 <= now - self._measured_at < CACHE_SECONDS:
            self._free, self._measured_at = self._measure(self.path), now
        return self._free

    def check(self, size: int = 0) -> None:
        """Raise InsufficientStorage unless `size` more bytes leave `minimum` free. An
        unknown free space (statvfs failed) refuses nothing: the write will tell."""
        free = self.free()
        if free is not None and free - size < self.minimum:
            raise InsufficientStorage()
