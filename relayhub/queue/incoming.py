"""The body of a message being received, spooled to a file as DATA arrives: what every
queue backend's `IncomingMessage` shares (they differ only in how `commit` makes it durable).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from relayhub.mime import BodyMeter, BodyTraits
from relayhub.queue import spool
from relayhub.queue.store import IncomingMessage

# The start of a body is held in memory up to this much (as the file's own buffer would
# hold it anyway): a field prepended at the end of DATA (a DKIM signature) then costs no
# rewrite of the file for most messages, and their bytes reach the file in one write.
HOLD_LIMIT = spool.BUFFER_SIZE


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
        self._held: bytearray | None = bytearray()  # the start, until HOLD_LIMIT is passed
        self._front = b""  # prepended once the start had gone to the file
        self._meter = BodyMeter()

    def write(self, data: bytes) -> None:
        if self._finished:
            raise QueueStateError(f"{self.queue_id}: write after commit or abort")
        self._size += len(data)
        if self._error is not None:
            return
        self._meter.update(data)
        if self._held is not None:
            self._held += data
            if len(self._held) <= HOLD_LIMIT:
                return
            data, self._held = bytes(self._held), None
        try:
            self._file.write(data)
        except OSError as exc:
            self._error = exc

    def prepend(self, data: bytes) -> None:
        if self._finished:
            raise QueueStateError(f"{self.queue_id}: prepend after commit or abort")
        if self._held is not None:
            self._held[0:0] = data
        else:
            self._front = data + self._front
        self._size += len(data)
        self._meter.prepend(data)

    def traits(self) -> BodyTraits | None:
        """What the stored body is (see BodyMeter.traits), recorded with it at commit."""
        return self._meter.traits()

    def body_parts(self) -> tuple[bytes, bytes]:
        """At commit, for the store's thread (`spool.complete`): what is still to be written
        at the end of the file, and what to put in front of it."""
        rest = bytes(self._held) if self._held is not None else b""
        self._held = None
        return rest, self._front

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
        self._held = None
        spool.close_quietly(self._file)
        spool.remove(self._path)
        self._forget(self.queue_id)
