"""The body of a message being received, spooled to a file as DATA arrives: what every
queue backend's `IncomingMessage` shares (they differ only in how `commit` makes it durable).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from relayhub.queue import spool
from relayhub.queue.store import IncomingMessage


class QueueStateError(RuntimeError):
    """The store or message is used in the wrong state (not open, already committed)."""


class SpooledIncoming(IncomingMessage):
    """Writes go to the body file; a write error is kept for `commit` so that the SMTP
    session can read DATA to its end and only then answer 451 (or 452)."""

    def __init__(self, queue_id: str, path: Path, file: BinaryIO, arrival: float,
                 forget: Callable[[str], None]) -> None:
        self.queue_id = queue_id
        self._path = path
        self._file = file
        self._arrival = arrival
        self._forget = forget  # the store no longer receives this ID
        self._size = 0
        self._error: OSError | None = None
        self._finished = False

    def write(self, data: bytes) -> None:
        if self._finished:
            raise QueueStateError(f"{self.queue_id}: write after commit or abort")
        if self._error is not None:
            return
        try:
            self._file.write(data)
        except OSError as exc:
            self._error = exc
        self._size += len(data)

    def _finish(self, doing: str) -> None:
        """Mark the body finished (committing or aborting); a second time is an error."""
        if self._finished:
            raise QueueStateError(f"{self.queue_id}: {doing} after commit or abort")
        self._finished = True

    def abort(self) -> None:
        if not self._finished:
            self._finished = True
            self._discard()

    def _discard(self) -> None:
        spool.close_quietly(self._file)
        spool.remove(self._path)
        self._forget(self.queue_id)
