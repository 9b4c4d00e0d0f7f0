"""The seams between the queue manager and what it drives: the local and SMTP couriers and
the notifier. Both sides import these; neither imports the other."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from twisted.internet import defer

from relayhub.config import NextHop
from relayhub.delivery.results import AttemptResult
from relayhub.queue.store import StoredMessage, StoredRecipient

Results = list[AttemptResult]  # one per recipient, in the order given


class LocalCourier(Protocol):
    def deliver(self, message: StoredMessage, recipients: Sequence[StoredRecipient],
                mailboxes: Sequence[str]) -> defer.Deferred[Results]: ...


Item = tuple[StoredMessage, tuple[StoredRecipient, ...]]  # a message, its recipients for a hop


class WorkSource(Protocol):
    """The work waiting for one next hop, as one SMTP session takes it."""

    async def next(self, *, linger: bool = True) -> Item | None:
        """The next message with its recipients for this hop, or None to end the session.
        With `linger`, an open session may wait a little for more work to the hop."""

    def done(self, item: Item, results: Results) -> None:
        """One result per recipient of `item`, recorded at once."""

    def untaken(self, item: Item) -> None:
        """`item` was handed over but not attempted (the connection was found closed): it
        goes back to the front of the line for another session."""


class SMTPCourier(Protocol):
    def deliver(self, hop: NextHop, work: WorkSource) -> defer.Deferred[None]: ...


class Notifier(Protocol):
    def notify(self, message: StoredMessage, failed: Sequence[tuple[StoredRecipient,
               AttemptResult]], delayed: Sequence[tuple[StoredRecipient, AttemptResult]],
               succeeded: Sequence[tuple[StoredRecipient, AttemptResult]]
               ) -> defer.Deferred[None]: ...
