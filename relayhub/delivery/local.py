"""The local courier: delivers recipients of our own domains into their Maildirs, off the
reactor thread, and turns what happened into per-recipient results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads

from relayhub.delivery.maildir import LocalDeliveryError, deliver_to_maildir
from relayhub.delivery.results import AttemptResult, Outcome
from relayhub.queue.store import StoredMessage, StoredRecipient


class MaildirCourier:
    """`knows(mailbox)` says whether a mailbox may be created (a user, or postmaster)."""

    def __init__(self, mail_root: Path, body_path: Callable[[str], str],
                 knows: Callable[[str], bool], clock: Any) -> None:
        self.mail_root = mail_root
        self.body_path = body_path
        self.knows = knows
        self.clock = clock

    def deliver(self, message: StoredMessage, recipients: Sequence[StoredRecipient],
                mailboxes: Sequence[str]) -> defer.Deferred[list[AttemptResult]]:
        return defer.gatherResults(
            [self._one(message, recipient, mailbox)
             for recipient, mailbox in zip(recipients, mailboxes, strict=True)],
            consumeErrors=True,
        )

    def _one(self, message: StoredMessage, recipient: StoredRecipient, mailbox: str
             ) -> defer.Deferred[AttemptResult]:
        if not self.knows(mailbox):
            # Accepted earlier, but the user has gone since: nobody will read it here.
            return defer.succeed(AttemptResult.bounced(
                recipient.address, "5.1.1", f"unknown user: \"{mailbox}\"", "local"))
        body = Path(self.body_path(message.queue_id))
        now = self.clock.seconds()

        def deliver() -> AttemptResult:
            try:
                name = deliver_to_maildir(
                    self.mail_root, mailbox, body,
                    return_path=recipient.return_path(message.envelope.sender),
                    delivered_to=recipient.address, now=now,
                )
            except LocalDeliveryError as error:
                outcome = Outcome.BOUNCED if error.permanent else Outcome.DEFERRED
                return AttemptResult(recipient.address, outcome, error.status, error.text,
                                     "local")
            return AttemptResult(recipient.address, Outcome.DELIVERED, "2.0.0",
                                 f"delivered to maildir ({name})", "local")

        result: defer.Deferred[AttemptResult] = threads.deferToThread(deliver)
        return result
