"""The SMTP courier: resolves a next hop, tries its addresses in order until one takes the
session, and prepares each body for what that hop can carry (7-bit, line lengths)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet import defer, threads

from relayhub.config import NextHop
from relayhub.delivery.results import AttemptResult, Outcome
from relayhub.dns import DNSError, MXResolver
from relayhub.mime import body_traits, limit_line_length, to_7bit
from relayhub.queue.store import QueueStore, StoredMessage, StoredRecipient
from relayhub.smtp.client import (
    OutboundMessage,
    OutboundRecipient,
    SessionResult,
    Timeouts,
    TLSPolicy,
    deliver_session,
)

# RFC 5321 §4.5.3.1.6: no line on the wire may be longer than this (without its CRLF).
MAX_WIRE_LINE = 998

Item = tuple[StoredMessage, tuple[StoredRecipient, ...]]


def open_for_hop(path: Path, eight_bit_ok: bool) -> BinaryIO:
    """The body as this hop may receive it (blocking: call it in a thread).

    Most bodies go out as stored, streamed from the file; only one with 8-bit bytes for a
    hop without 8BITMIME, or with over-long lines, is converted in memory.
    """
    traits = body_traits(path)
    needs_7bit = traits.has_8bit and not eight_bit_ok
    if not needs_7bit and traits.longest_line <= MAX_WIRE_LINE:
        return open(path, "rb")
    data = path.read_bytes()
    return io.BytesIO(to_7bit(data) if needs_7bit else limit_line_length(data))


class RelayCourier:
    def __init__(self, reactor: Any, store: QueueStore, resolver: MXResolver, *,
                 helo_name: str, tls: TLSPolicy, default_port: int,
                 timeouts: Timeouts | None = None) -> None:
        self.reactor = reactor
        self.store = store
        self.resolver = resolver
        self.helo_name = helo_name
        self.tls = tls
        self.default_port = default_port
        self.timeouts = timeouts or Timeouts()

    def deliver(self, hop: NextHop, items: Sequence[Item]) -> defer.Deferred[list[list[
            AttemptResult]]]:
        return defer.Deferred.fromCoroutine(self._deliver(hop, list(items)))

    async def _deliver(self, hop: NextHop, items: list[Item]) -> list[list[AttemptResult]]:
        try:
            targets = await self.resolver.resolve(hop, self.default_port)
        except DNSError as error:
            outcome = Outcome.BOUNCED if error.permanent else Outcome.DEFERRED
            return [[AttemptResult(r.address, outcome, error.status, error.text)
                     for r in recipients] for _, recipients in items]
        messages = [self._outbound(message, recipients) for message, recipients in items]
        session: SessionResult | None = None
        for target in targets:
            session = await deliver_session(
                self.reactor, host=target.host, address=target.address, port=target.port,
                messages=messages, helo_name=self.helo_name, tls=self.tls,
                timeouts=self.timeouts,
            )
            if session.reached_transaction:
                break  # that host spoke for the mail; the next MX is for unreachable ones
        if session is None:
            return [[AttemptResult.deferred(r.address, "4.4.4", f"no address for {hop}")
                     for r in recipients] for _, recipients in items]
        return session.results

    def _outbound(self, message: StoredMessage, recipients: tuple[StoredRecipient, ...]
                  ) -> OutboundMessage:
        path = Path(self.store.body_path(message.queue_id))

        def open_body(eight_bit_ok: bool) -> defer.Deferred[BinaryIO]:
            opened: defer.Deferred[BinaryIO] = threads.deferToThread(
                open_for_hop, path, eight_bit_ok)
            return opened

        envelope = message.envelope
        return OutboundMessage(
            # The manager groups recipients so that they share one return path.
            queue_id=message.queue_id, sender=recipients[0].return_path(envelope.sender),
            recipients=tuple(OutboundRecipient(r.address, r.notify, r.orcpt)
                             for r in recipients),
            size=message.size, body_type=envelope.body_type, smtputf8=envelope.smtputf8,
            ret=envelope.ret, envid=envelope.envid, open_body=open_body,
        )
