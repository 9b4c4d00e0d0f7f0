"""The queue store interface: what the SMTP server, queue manager and relayhubctl may ask of
a queue backend, and the records they exchange.

Backends (SQLite now, PostgreSQL later) implement `QueueStore`. Every method that touches
the database or fsyncs returns a Deferred and does its blocking work off the reactor thread.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed

from relayhub.delivery.results import AttemptResult
from relayhub.mime import BodyTraits


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
    # `relayhubctl queue bounce` gave up on it: the queue manager bounces it at its next
    # scan instead of attempting delivery (see QueueStore.bounce).
    give_up: bool = False

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
    hub: str = ""  # the hub that accepted it, in a queue shared by several ("" otherwise)
    # Measured as the body was received (relayhub.mime.BodyMeter): its line ends are all
    # CRLF, and these are its traits, so it is sent without a scan. None: not known (a
    # bare line end, or queued before this was recorded): scanned and mended on the way out.
    traits: BodyTraits | None = None


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


class Recorded(enum.StrEnum):
    """What `QueueStore.record_attempts` did with the results of an attempt."""

    KEPT = "kept"  # stored; some recipient is still pending
    REMOVED = "removed"  # stored; every recipient is final, so the message left the queue
    VANISHED = "vanished"  # the message was deleted during the attempt: results discarded


def traits_columns(traits: BodyTraits | None) -> tuple[bool | None, int | None]:
    """A message's body traits as its row keeps them: (eight_bit, longest_line), or NULLs."""
    return (None, None) if traits is None else (traits.has_8bit, traits.longest_line)


def traits_from_columns(eight_bit: Any, longest_line: Any) -> BodyTraits | None:
    """The inverse of `traits_columns` (SQLite gives 0/1 for the flag)."""
    if eight_bit is None or longest_line is None:
        return None
    return BodyTraits(bool(eight_bit), int(longest_line))


def domain_of(address: str) -> str:
    """The domain an address is queued for: after its last "@", lower-cased (quoted local
    parts may hold an "@"). The SQL backfill in relayhub.queue.schema applies the same rule."""
    return address.rpartition("@")[2].lower()


def normalize_domain(domain: str) -> str:
    """An administrator's domain argument as `domain_of` writes domains."""
    return domain.strip().lower().removesuffix(".")


@dataclass(frozen=True)
class Selection:
    """The messages an administrative command applies to: listed IDs, every message, or
    every message with a recipient not yet final in `domain`."""

    queue_ids: tuple[str, ...] = ()
    everything: bool = False
    domain: str | None = None  # as normalize_domain gives it


@dataclass(frozen=True)
class MessageFilter:
    """`relayhubctl queue list` filters; all given ones must hold."""

    held: bool = False  # held messages only
    deferred: bool = False  # messages with a deferred recipient that are not held
    domain: str | None = None  # messages with a recipient not yet final in this domain


@dataclass(frozen=True)
class Changed:
    """What an administrative command did: `changed` were changed, `unchanged` were found
    but left alone (already held, held and so not flushed, ...); IDs missing from both are
    not in the queue. Both in queue order."""

    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()


@dataclass(frozen=True)
class HistoryEntry:
    """One recorded attempt for one recipient (`recipient` is None if its row is gone)."""

    time: float
    recipient: str | None
    relay: str
    dsn: str
    text: str


@dataclass(frozen=True)
class PausedDomain:
    domain: str
    until: float | None  # epoch seconds; None = until `resume`


@dataclass(frozen=True)
class QueueSummary:
    """Queue totals for `relayhubctl queue stats` and `status`."""

    messages: int
    held: int
    recipients: dict[str, int]  # every RecipientStatus value -> count
    oldest_arrival: float | None
    by_domain: dict[str, int]  # recipients not yet final, most first
    in_flight: int  # recipients under a live lease (being attempted or about to be)
    paused: tuple[PausedDomain, ...]


@dataclass(frozen=True)
class HubInfo:
    """A hub sharing the queue (PostgreSQL): when its queue manager started and was last
    alive (epoch seconds)."""

    name: str
    started: float
    last_seen: float


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

    def prepend(self, data: bytes) -> None:
        """Before `commit`: put `data` (complete header fields: a DKIM signature) in front of
        the body written so far, as part of the same durable commit."""
        raise NotImplementedError(f"{type(self).__name__} cannot prepend")


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
    def list_messages(self, only: MessageFilter | None = None
                      ) -> Deferred[Sequence[StoredMessage]]:
        """Every queued message (or those `only` lets through) with its recipients, oldest
        first."""

    @abc.abstractmethod
    def collect_orphans(self, older_than: float) -> Deferred[int]:
        """Remove body files of sessions that died before commit; returns how many.

        Only files older than `older_than` seconds go: another process may be writing a
        fresh one right now.
        """

    @abc.abstractmethod
    def body_path(self, queue_id: str) -> str:
        """Path of the stored body file (read-only use). For a queue shared by several hubs
        it is this hub's copy, there for messages received here or handed out by
        `claim_due`; `fetch_body` makes one for any message."""

    def fetch_body(self, queue_id: str) -> Deferred[str]:
        """`body_path(queue_id)`, once a copy of the body is surely there."""
        return succeed(self.body_path(queue_id))

    # -- for the queue manager ----------------------------------------------------------

    @abc.abstractmethod
    def claim_due(self, now: float, limit: int, lease: float) -> Deferred[list[DueWork]]:
        """Lease up to `limit` recipients that are due (not final, not held, next attempt
        reached, no live lease) for `lease` seconds, grouped by message."""

    @abc.abstractmethod
    def release_leases(self) -> Deferred[int]:
        """End every lease of this hub: called when its (single) queue manager starts,
        since leases left by a crashed one would otherwise delay those recipients until they
        expire. (A queue shared by several hubs leaves the other hubs' leases alone.)"""

    def watch(self, wake: Callable[[], None]) -> None:
        """Call `wake` when mail is queued or the queue changed somewhere this process does
        not hear of otherwise (another hub of a shared queue). One store: nothing to do, the
        master wakes the queue manager."""
        return None

    def hubs(self) -> Deferred[list[HubInfo]]:
        """The hubs sharing this queue; none for a queue of one hub."""
        return succeed([])

    @abc.abstractmethod
    def next_due(self, now: float) -> Deferred[float | None]:
        """When to look again: the earliest next attempt (or lease end) among unheld,
        non-final recipients of domains not paused at `now`, or the end of a pause."""

    @abc.abstractmethod
    def confirm_leased(self, work: Sequence[tuple[str, Sequence[int]]], now: float
                       ) -> Deferred[set[tuple[str, int]]]:
        """The (queue ID, recipient index) pairs of leased `work` that may still be
        attempted: the message exists and is not held, the recipient is not final, not given
        up on and its domain is not paused. The others that still exist lose their lease, so
        they are picked again when due (given-up ones at once, to be bounced). One
        transaction: a delete, hold or pause commits either before it (and the work is
        dropped) or after it (and the attempt counts as already in flight)."""

    @abc.abstractmethod
    def record_attempts(
        self, queue_id: str, updates: Sequence[RecipientUpdate], now: float
    ) -> Deferred[Recorded]:
        """Store results and history, end the leases; when every recipient is final the
        message leaves the queue. A message deleted meanwhile is left gone (VANISHED). A
        deferred recipient that was given up on meanwhile is due again at once."""

    # -- for relayhubctl ----------------------------------------------------------------
    # Each change is one transaction; a running queue manager sees it at its next scan
    # (relayhubctl wakes it through the control channel) and before each SMTP session
    # (confirm_leased).

    @abc.abstractmethod
    def hold(self, selection: Selection) -> Deferred[Changed]:
        """Hold messages: they are not picked for delivery until released."""

    @abc.abstractmethod
    def release(self, selection: Selection, now: float) -> Deferred[Changed]:
        """Release held messages and make their pending recipients due at once."""

    @abc.abstractmethod
    def flush(self, selection: Selection, now: float) -> Deferred[Changed]:
        """Make pending recipients due at once (with a domain selection, only that domain's).
        Held messages stay held (unchanged); recipients under a lease keep it."""

    @abc.abstractmethod
    def delete(self, selection: Selection) -> Deferred[Changed]:
        """Remove messages with their body files, without any notice."""

    @abc.abstractmethod
    def bounce(self, queue_ids: Sequence[str], now: float) -> Deferred[Changed]:
        """Give up on messages: their pending recipients get the give-up mark and are due at
        once, and held ones are released, so that the queue manager bounces them through its
        normal path (result, log line, delivery status notification to the sender)."""

    @abc.abstractmethod
    def pause(self, domain: str, until: float | None) -> Deferred[None]:
        """Stop delivery to `domain` until `until` (None: until resumed)."""

    @abc.abstractmethod
    def resume(self, domain: str, now: float) -> Deferred[bool]:
        """End a pause and make the domain's pending recipients due at once; False when the
        domain was not paused."""

    @abc.abstractmethod
    def history(self, queue_id: str) -> Deferred[list[HistoryEntry]]:
        """The recorded attempts of a message, oldest first."""

    @abc.abstractmethod
    def summary(self, now: float) -> Deferred[QueueSummary]:
        """Totals of the whole queue."""
