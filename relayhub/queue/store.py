"""The queue store interface: what the SMTP server, queue manager and relayhubctl may ask of
a queue backend, and the records they exchange.

Backends (SQLite now, PostgreSQL later) implement `QueueStore`. Every method that touches
the database or fsyncs returns a Deferred and does its blocking work off the reactor thread.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred

from relayhub.delivery.results import AttemptResult


class RecipientStatus(enum.StrEnum):
    """Per-recipient state (SPEC §4). `delivered` and `bounced` are final."""

    QUEUED = "queued"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"


@dataclass(frozen=True)
class RecipientRequest:
    """One accepted RCPT TO, with its RFC 3461 DSN parameters."""

    address: str
    orcpt: str | None = None  # "rfc822;addr" exactly as given (xtext decoded)
    notify: tuple[str, ...] = ()  # () = not given; else NEVER or SUCCESS/FAILURE/DELAY
    # The envelope sender for this recipient when it is not the message's: a list member
    # expanded through an alias that has an owner-LIST gets the owner, so bounces reach it.
    sender: str | None = None


@dataclass(frozen=True)
class Envelope:
    """Everything known about a message apart from its body."""

    sender: str  # "" is the null reverse-path <>
    recipients: tuple[RecipientRequest, ...]
    body_type: str = "7BIT"  # "7BIT" | "8BITMIME"
    smtputf8: bool = False
    ret: str | None = None  # "FULL" | "HDRS" | None
    envid: str | None = None
    client_name: str = ""  # reverse DNS or HELO-less "unknown"
    client_address: str = ""
    helo: str = ""
    protocol: str = "ESMTP"  # RFC 3848 keyword
    auth_user: str | None = None


@dataclass(frozen=True)
class StoredRecipient:
    """A recipient's row in the queue."""

    index: int
    address: str
    orcpt: str | None
    notify: tuple[str, ...]
    status: RecipientStatus
    attempts: int = 0
    next_attempt: float | None = None  # epoch seconds
    last_error: str | None = None
    delay_warned: bool = False  # a "delayed" notice has gone out for it
    sender: str | None = None  # see RecipientRequest.sender

    def return_path(self, message_sender: str) -> str:
        """The envelope sender to use (and to notify) for this recipient."""
        return message_sender if self.sender is None else self.sender

    @property
    def final(self) -> bool:
        return self.status in (RecipientStatus.DELIVERED, RecipientStatus.BOUNCED)


@dataclass(frozen=True)
class StoredMessage:
    """A queued message as listed or shown."""

    queue_id: str
    envelope: Envelope
    arrival: float  # epoch seconds
    size: int  # bytes of the stored body (with our Received: header)
    subject: str  # decoded for display, "" when absent
    held: bool
    recipients: tuple[StoredRecipient, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class DueWork:
    """A message with the recipients the queue manager has just leased for an attempt."""

    message: StoredMessage
    recipients: tuple[StoredRecipient, ...]


@dataclass(frozen=True)
class RecipientUpdate:
    """The outcome of one attempt for one recipient, as the queue manager records it."""

    index: int
    result: AttemptResult
    next_attempt: float | None = None  # when a deferred recipient is due again
    delay_warned: bool = False  # a delay notice was sent with this attempt


class IncomingMessage(abc.ABC):
    """A message being received: its body is streamed to disk, then committed durably.

    `write` appends to an ordinary file (the page cache; it does not wait for the disk),
    so it may be called on the reactor thread for each chunk of DATA. Only `commit` waits
    for the disk, and it does so off the reactor thread.
    """

    queue_id: str

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Append body bytes (CRLF line ends, dot-stuffing already undone)."""

    @abc.abstractmethod
    def commit(self, envelope: Envelope, subject: str = "") -> Deferred[None]:
        """Make body and envelope durable (fsync'd); fires when it is safe to say 250.

        Fails with `relayhub.errors.TemporaryFailure` when the store cannot take it.
        Commits that arrive while another is being written share the next fsync.
        """

    @abc.abstractmethod
    def abort(self) -> None:
        """Forget this message: its body file is removed and nothing is queued."""


class QueueStore(abc.ABC):
    """A durable queue that several processes may use at once."""

    @abc.abstractmethod
    def open(self) -> Deferred[None]:
        """Create or migrate the schema and directories; call once before use."""

    @abc.abstractmethod
    def close(self) -> Deferred[None]:
        """Finish pending commits and release the database."""

    @abc.abstractmethod
    def incoming(self) -> IncomingMessage:
        """Allocate a queue ID and open its body file for writing."""

    @abc.abstractmethod
    def get_message(self, queue_id: str) -> Deferred[StoredMessage | None]:
        """One message with its recipients, or None when the ID is not queued."""

    @abc.abstractmethod
    def list_messages(self) -> Deferred[Sequence[StoredMessage]]:
        """Every queued message with its recipients, oldest first."""

    @abc.abstractmethod
    def collect_orphans(self, older_than: float) -> Deferred[int]:
        """Remove body files of sessions that died before commit; returns how many.

        Only files older than `older_than` seconds go: another process may be writing a
        fresh one right now.
        """

    @abc.abstractmethod
    def body_path(self, queue_id: str) -> str:
        """Path of the stored body file (read-only use)."""

    # -- for the queue manager ----------------------------------------------------------

    @abc.abstractmethod
    def claim_due(self, now: float, limit: int, lease: float) -> Deferred[list[DueWork]]:
        """Lease up to `limit` recipients that are due (not final, not held, next attempt
        reached, no live lease) for `lease` seconds, grouped by message."""

    @abc.abstractmethod
    def release_leases(self) -> Deferred[int]:
        """End every lease: called when the (single) queue manager starts, since leases
        left by a crashed one would otherwise delay those recipients until they expire."""

    @abc.abstractmethod
    def next_due(self) -> Deferred[float | None]:
        """The earliest next attempt among unleased, unheld, non-final recipients."""

    @abc.abstractmethod
    def record_attempts(
        self, queue_id: str, updates: Sequence[RecipientUpdate], now: float
    ) -> Deferred[bool]:
        """Store results and history, end the leases; when every recipient is final the
        message leaves the queue. Fires True when it did."""
