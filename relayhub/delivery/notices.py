"""Delivery status notifications to senders: builds RFC 3464 reports and queues them as new
mail from the null sender, so they are delivered (and retried) like any other message."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet import defer, threads

from relayhub import maillog
from relayhub.delivery import dsn
from relayhub.delivery.results import AttemptResult
from relayhub.queue.store import (
    Envelope,
    QueueStore,
    RecipientRequest,
    StoredMessage,
    StoredRecipient,
)

_LOG = maillog.QMGR

Pairs = Sequence[tuple[StoredRecipient, AttemptResult]]


class QueueNotifier:
    """Sends failure, delay and success reports for the queue manager."""

    def __init__(self, store: QueueStore, hostname: str, postmaster: str, clock: Any, *,
                 max_lifetime: float,
                 on_queued: Callable[[str], None] = lambda queue_id: None,
                 expand: Callable[[RecipientRequest], tuple[RecipientRequest, ...]] = (
                     lambda request: (request,))) -> None:
        self.store = store
        self.max_lifetime = max_lifetime  # for Will-Retry-Until in delay notices
        self.hostname = hostname
        self.postmaster = postmaster
        self.clock = clock
        self.on_queued = on_queued
        # Reports enter the queue without RCPT, so the aliases are applied here: a report
        # to owner-LIST or to an aliased postmaster reaches whoever that names.
        self.expand = expand

    def notify(self, message: StoredMessage, failed: Pairs, delayed: Pairs, succeeded: Pairs
               ) -> defer.Deferred[None]:
        # recipients_to_notify picks per kind: successes delivered here ("success") or to a
        # hop without DSN ("relayed"); a hop with DSN passes NOTIFY on and reports itself.
        kinds: tuple[tuple[dsn.Kind, Pairs], ...] = (
            ("failure", failed), ("delay", delayed), ("success", succeeded),
            ("relayed", succeeded))
        waits = []
        for kind, pairs in kinds:
            # Each return path hears about its own recipients (list owners about members).
            by_sender: dict[str, list[tuple[StoredRecipient, AttemptResult]]] = {}
            for pair in dsn.recipients_to_notify(kind, pairs):
                sender = pair[0].return_path(message.envelope.sender)
                by_sender.setdefault(sender, []).append(pair)
            waits += [self._send(kind, message, sender, wanted)
                      for sender, wanted in by_sender.items()]
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    def _send(self, kind: dsn.Kind, message: StoredMessage, sender: str,
              wanted: list[tuple[StoredRecipient, AttemptResult]]) -> defer.Deferred[None]:
        to = dsn.report_recipient(kind, sender, self.postmaster)
        if to is None:
            return defer.succeed(None)
        if sender == "" and all(
            r.address.lower() == self.postmaster.lower() for r, _ in wanted
        ):
            # A report to postmaster that itself failed: reporting it again would loop.
            _LOG.warn(maillog.DOUBLE_BOUNCE, queue_id=message.queue_id)
            return defer.succeed(None)
        body_path = Path(self.store.body_path(message.queue_id))
        now = self.clock.seconds()

        def build() -> bytes:
            # RET=FULL needs the whole body; otherwise the header section is enough.
            with open(body_path, "rb") as body:
                original = body.read() if message.envelope.ret == "FULL" else _header_of(body)
            return dsn.build_report(
                kind=kind, reporting_mta=self.hostname, queue_id=message.queue_id,
                envelope=message.envelope, arrival=message.arrival, results=wanted,
                original=original, to=to, now=now, message_id_domain=self.hostname,
                will_retry_until=(message.arrival + self.max_lifetime
                                  if kind == "delay" else None),
            )

        built: defer.Deferred[bytes] = threads.deferToThread(build)
        return built.addCallback(self._enqueue, to, kind, message)

    def _enqueue(self, report: bytes, to: str, kind: dsn.Kind, message: StoredMessage
                 ) -> defer.Deferred[None]:
        incoming = self.store.incoming()
        incoming.write(report)
        envelope = Envelope(
            sender="", recipients=self.expand(RecipientRequest(to)), protocol="local",
            client_name="localhost", client_address="127.0.0.1", helo=self.hostname,
        )

        def queued(_: object) -> None:
            _LOG.info(maillog.NOTICE, queue_id=message.queue_id, kind=kind,
                      notice_id=incoming.queue_id)
            self.on_queued(incoming.queue_id)

        return incoming.commit(envelope, dsn.SUBJECTS[kind]).addCallback(queued)


def _header_of(body: BinaryIO, limit: int = 1024 * 1024) -> bytes:
    """The header section (up to the first empty line), read in bounded pieces."""
    kept = b""
    while len(kept) < limit:
        chunk = body.read(65536)
        if not chunk:
            break
        kept += chunk
        end = kept.find(b"\r\n\r\n")
        if end >= 0:
            return kept[: end + 4]
    return kept[:limit]

