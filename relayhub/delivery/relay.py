"""The SMTP courier: resolves a next hop, tries its addresses in order until one takes the
session, and prepares each body for what that hop can carry (7-bit, line lengths)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads

from relayhub.config import NextHop
from relayhub.delivery.interfaces import Item, WorkSource
from relayhub.delivery.results import AttemptResult, Outcome
from relayhub.delivery.tls_plan import TLSPlanner
from relayhub.dns import DNSError, MXResolver
from relayhub.mime import BodyTraits, body_traits, limit_line_length, to_7bit
from relayhub.queue.store import QueueStore, StoredRecipient
from relayhub.smtp.client import (
    OutboundBody,
    OutboundMessage,
    OutboundRecipient,
    SessionEnd,
    Timeouts,
    TLSPolicy,
    run_session,
)

# RFC 5321 §4.5.3.1.6: no line on the wire may be longer than this (without its CRLF).
MAX_WIRE_LINE = 998
# Bodies up to this size are read whole on the reactor thread (see `read_small_for_hop`).
SMALL_BODY = 64 * 1024


def open_for_hop(path: Path, eight_bit_ok: bool, known: BodyTraits | None = None
                 ) -> OutboundBody:
    """The body as this hop may receive it (blocking when it scans or converts: call it in
    a thread unless `known` traits need no conversion, when it only opens the file).

    Most bodies go out as stored, streamed from the file; only one with 8-bit bytes for a
    hop without 8BITMIME, or with over-long lines, is converted in memory. `known`: the
    traits the queue recorded at acceptance (the body is CRLF-only), so no scan is needed.
    """
    traits = known or body_traits(path)
    if not _needs_conversion(traits, eight_bit_ok):
        return OutboundBody(open(path, "rb"), crlf_only=known is not None)
    return _converted(path.read_bytes(), traits, eight_bit_ok)


def read_small_for_hop(path: str, eight_bit_ok: bool, known: BodyTraits | None = None
                       ) -> OutboundBody | None:
    """The body as this hop may receive it, in memory, if it is at most SMALL_BODY octets;
    None if it is larger (then `open_for_hop` streams it).

    Called on the reactor thread: one read of a small file the session would otherwise read
    there anyway (ClientProtocol.send_body reads bodies on the reactor thread), and it saves
    a thread hop and a second read per message, the largest share of the queue manager's
    CPU per message after the SMTP conversation itself.
    """
    # os.open/os.read: three system calls, where open() adds fstat, ioctl and lseek.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # A regular file gives everything asked for, up to its end, in one read.
        data = os.read(fd, SMALL_BODY + 1)
    finally:
        os.close(fd)
    if len(data) > SMALL_BODY:
        return None
    traits = known or body_traits(data)
    if _needs_conversion(traits, eight_bit_ok):
        return _converted(data, traits, eight_bit_ok)
    return OutboundBody(io.BytesIO(data), crlf_only=known is not None)


def _needs_conversion(traits: BodyTraits, eight_bit_ok: bool) -> bool:
    return (traits.has_8bit and not eight_bit_ok) or traits.longest_line > MAX_WIRE_LINE


def _converted(data: bytes, traits: BodyTraits, eight_bit_ok: bool) -> OutboundBody:
    if traits.has_8bit and not eight_bit_ok:
        return OutboundBody(io.BytesIO(to_7bit(data)))
    return OutboundBody(io.BytesIO(limit_line_length(data)))


class _Outbound:
    """Presents the manager's work to a session as outbound messages."""

    def __init__(self, work: WorkSource, outbound: Callable[[Item], OutboundMessage]) -> None:
        self.work = work
        self.outbound = outbound
        self._items: dict[int, Item] = {}

    async def next(self) -> OutboundMessage | None:
        item = await self.work.next()
        if item is None:
            return None
        message = self.outbound(item)
        self._items[id(message)] = item
        return message

    def done(self, message: OutboundMessage, results: list[AttemptResult]) -> None:
        self.work.done(self._items.pop(id(message)), results)

    def untaken(self, message: OutboundMessage) -> None:
        self.work.untaken(self._items.pop(id(message)))


class RelayCourier:
    def __init__(self, reactor: Any, store: QueueStore, resolver: MXResolver, *,
                 helo_name: str, tls: TLSPolicy, default_port: int,
                 timeouts: Timeouts | None = None, planner: TLSPlanner | None = None) -> None:
        self.reactor = reactor
        self.store = store
        self.resolver = resolver
        self.helo_name = helo_name
        self.tls = tls
        self.default_port = default_port
        self.timeouts = timeouts or Timeouts()
        self.planner = planner  # MTA-STS and DANE; None: `tls` for every host

    def deliver(self, hop: NextHop, work: WorkSource) -> defer.Deferred[None]:
        """Deliver what `work` hands over to `hop`, over one connection while it lasts."""
        return defer.Deferred.fromCoroutine(self._deliver(hop, work))

    async def _deliver(self, hop: NextHop, work: WorkSource) -> None:
        try:
            targets = await self.resolver.resolve(hop, self.default_port)
        except DNSError as error:
            outcome = Outcome.BOUNCED if error.permanent else Outcome.DEFERRED
            status, text = error.status, error.text
            await _drain(work, lambda r: AttemptResult(r.address, outcome, status, text))
            return
        source = _Outbound(work, self._outbound)
        end: SessionEnd | None = None
        relay = "none"
        plan = await self.planner.for_hop(hop) if self.planner is not None else None
        for target in targets:
            relay = str(target)  # host[address]:port, as the log and history show it
            tls = self.tls
            if plan is not None:
                decided = await plan.for_target(target)
                if isinstance(decided, tuple):  # MTA-STS or DANE rule this host out
                    end = SessionEnd(False, False, (decided[0], decided[1], False))
                    continue
                tls = decided
            end = await run_session(
                self.reactor, host=target.host, address=target.address, port=target.port,
                source=source, helo_name=self.helo_name, tls=tls, timeouts=self.timeouts,
            )
            if end.reached_transaction:
                return  # that host spoke for the mail; the next MX is for unreachable ones
        # No address took a session: what waits for this hop waits longer, for that reason.
        status, text, _ = (end.failure if end and end.failure
                           else ("4.4.4", f"no usable address for {hop}", False))
        await _drain(work, lambda r: AttemptResult.deferred(r.address, status, text, relay))

    def _outbound(self, item: Item) -> OutboundMessage:
        message, recipients = item
        path = self.store.body_path(message.queue_id)

        known = message.traits

        def open_body(eight_bit_ok: bool) -> defer.Deferred[OutboundBody]:
            try:
                if message.size <= SMALL_BODY:  # the stored size: a hint, checked by the read
                    small = read_small_for_hop(path, eight_bit_ok, known)
                    if small is not None:
                        return defer.succeed(small)
                if known is not None and not _needs_conversion(known, eight_bit_ok):
                    # Sent as stored, nothing to scan: opening it is one quick system call.
                    return defer.succeed(open_for_hop(Path(path), eight_bit_ok, known))
            except Exception:
                return defer.fail()
            opened: defer.Deferred[OutboundBody] = threads.deferToThread(
                open_for_hop, Path(path), eight_bit_ok, known)
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


async def _drain(work: WorkSource,
                 result: Callable[[StoredRecipient], AttemptResult]) -> None:
    # No lingering: work that comes later gets a session, and a DNS answer, of its own.
    while (item := await work.next(linger=False)) is not None:
        work.done(item, [result(r) for r in item[1]])
