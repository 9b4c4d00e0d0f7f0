"""The queue manager: leases due recipients, routes them, hands them to the local or SMTP
courier with at most `concurrency_per_destination` sessions per next hop, and records
each result (retry time, bounce, delay warning) back in the queue.

It sleeps until the earliest due time, and `wake()` (called for every new `250`) makes it
look again at once, so new mail starts moving within milliseconds, not at the next poll.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.python.failure import Failure

from relayhub import maillog
from relayhub.config import DeliverySettings, NextHop
from relayhub.delivery.results import AttemptResult, Outcome
from relayhub.delivery.schedule import due_for_delay_warning, expired, retry_delay
from relayhub.queue.store import (
    DueWork,
    QueueStore,
    RecipientUpdate,
    StoredMessage,
    StoredRecipient,
)
from relayhub.routing import LocalRoute, Router

_LOG = maillog.QMGR

# Recipients leased per scan, and the most kept in memory waiting for a free session.
CLAIM_LIMIT = 500
MAX_IN_FLIGHT = 5000
# Messages carried by one SMTP session before it makes room for another.
MESSAGES_PER_SESSION = 50
# A lease outlives any single attempt; after a crash the next start releases them all.
LEASE = 3600.0
# Never sleep longer than this: a clock jump or a change by another process is noticed.
MAX_SLEEP = 60.0
# How long a stop waits for attempts under way to finish and be recorded. The rest keep
# their leases and are retried after the next start (SPEC §9).
STOP_GRACE = 10.0

Results = list[AttemptResult]  # one per recipient, in the order given


class LocalCourier(Protocol):
    def deliver(self, message: StoredMessage, recipients: Sequence[StoredRecipient],
                mailboxes: Sequence[str]) -> defer.Deferred[Results]: ...


class SMTPCourier(Protocol):
    def deliver(self, hop: NextHop, items: Sequence[tuple[StoredMessage, tuple[StoredRecipient,
                ...]]]) -> defer.Deferred[list[Results]]: ...


class Notifier(Protocol):
    def notify(self, message: StoredMessage, failed: Sequence[tuple[StoredRecipient,
               AttemptResult]], delayed: Sequence[tuple[StoredRecipient, AttemptResult]],
               succeeded: Sequence[tuple[StoredRecipient, AttemptResult]]
               ) -> defer.Deferred[None]: ...


@dataclass
class _Destination:
    """Work waiting for one SMTP next hop, and how many sessions it has open."""

    hop: NextHop
    waiting: deque[tuple[StoredMessage, tuple[StoredRecipient, ...]]] = field(
        default_factory=deque)
    sessions: int = 0


class QueueManager(Service):
    def __init__(
        self,
        store: QueueStore,
        router: Router,
        local: LocalCourier,
        smtp: SMTPCourier,
        notifier: Notifier,
        settings: DeliverySettings,
        clock: Any,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.router = router
        self.local = local
        self.smtp = smtp
        self.notifier = notifier
        self.settings = settings
        self.clock = clock
        self.rng = rng or random.SystemRandom()
        self._destinations: dict[str, _Destination] = {}
        self._in_flight = 0  # leased recipients not yet recorded
        self._scanning = False
        self._rescan = False
        self._timer: DelayedCall | None = None
        self._active: set[defer.Deferred[Any]] = set()
        self._recording = False  # results are stored only between start and stop

    # -- life cycle -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._recording = True
        # This is the only queue manager of its store: leases still set are from a
        # predecessor that died mid-delivery, and those recipients are due again now.
        self.store.release_leases().addCallbacks(
            lambda released: self._started(int(released)),
            lambda failure: _LOG.failure("cannot release leases", failure),
        )

    def _started(self, released: int) -> None:
        if released:
            _LOG.info(maillog.RECOVERED, count=released)
        self.wake()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # nothing new starts from here on
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        stopped: defer.Deferred[None] = defer.Deferred()

        def finish(_: object = None) -> None:
            if not stopped.called:
                self._recording = False
                if grace.active():
                    grace.cancel()
                stopped.callback(None)

        grace = self.clock.callLater(STOP_GRACE, finish)
        defer.DeferredList(list(self._active), consumeErrors=True).addCallback(finish)
        return stopped

    # -- scheduling -----------------------------------------------------------------

    def wake(self) -> None:
        """Look for due work now (new mail, a flush, a freed session)."""
        if not self.running:
            return
        if self._scanning:
            self._rescan = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._scanning = True
        room = min(CLAIM_LIMIT, MAX_IN_FLIGHT - self._in_flight)
        claimed: defer.Deferred[list[DueWork]] = (
            self.store.claim_due(self.clock.seconds(), room, LEASE) if room > 0
            else defer.succeed([])
        )
        claimed.addCallback(self._dispatch)
        claimed.addErrback(lambda failure: _LOG.failure("queue scan failed", failure))
        claimed.addBoth(self._scan_done)

    def _scan_done(self, _: object) -> defer.Deferred[None] | None:
        self._scanning = False
        if self._rescan:
            self._rescan = False
            self.wake()
            return None
        return self.store.next_due().addCallbacks(
            self._sleep_until, lambda failure: self._sleep_until(None))

    def _sleep_until(self, due: float | None) -> None:
        if not self.running or self._scanning or (self._timer and self._timer.active()):
            return
        delay = MAX_SLEEP if due is None else min(max(due - self.clock.seconds(), 0.0),
                                                    MAX_SLEEP)
        self._timer = self.clock.callLater(delay, self.wake)

    def _dispatch(self, work: list[DueWork]) -> None:
        touched: set[str] = set()
        for item in work:
            self._in_flight += len(item.recipients)
            local: list[tuple[StoredRecipient, str]] = []
            remote: dict[str, list[StoredRecipient]] = {}
            hops: dict[str, NextHop] = {}
            for recipient in item.recipients:
                route = self.router.route(recipient.address)
                if isinstance(route, LocalRoute):
                    local.append((recipient, route.mailbox))
                else:
                    key = str(route.next_hop)
                    hops[key] = route.next_hop
                    remote.setdefault(key, []).append(recipient)
            if local:
                self._deliver_local(item.message, tuple(r for r, _ in local),
                                    [m for _, m in local])
            for key, recipients_for_hop in remote.items():
                destination = self._destinations.setdefault(key, _Destination(hops[key]))
                # One transaction has one sender: list members whose owner is their sender
                # travel separately from the rest.
                by_sender: dict[str, list[StoredRecipient]] = {}
                for recipient in recipients_for_hop:
                    sender = recipient.return_path(item.message.envelope.sender)
                    by_sender.setdefault(sender, []).append(recipient)
                for group in by_sender.values():
                    destination.waiting.append((item.message, tuple(group)))
                touched.add(key)
        # Only now, with everything of this scan queued per hop, so that messages for the
        # same hop share sessions instead of each opening its own.
        for key in touched:
            self._start_sessions(key)

    def _start_sessions(self, key: str) -> None:
        destination = self._destinations[key]
        while destination.waiting and (
            destination.sessions < self.settings.concurrency_per_destination
        ):
            batch = [destination.waiting.popleft()
                     for _ in range(min(MESSAGES_PER_SESSION, len(destination.waiting)))]
            destination.sessions += 1
            self._run_session(key, destination.hop, batch)

    def _deliver_local(self, message: StoredMessage, recipients: tuple[StoredRecipient, ...],
                       mailboxes: list[str]) -> None:
        delivery = self.local.deliver(message, recipients, mailboxes)
        delivery.addCallback(lambda results: self._record(message, recipients, results))
        self._track(delivery)

    def _run_session(self, key: str, hop: NextHop,
                     batch: list[tuple[StoredMessage, tuple[StoredRecipient, ...]]]) -> None:
        session = self.smtp.deliver(hop, batch)
        session.addCallback(lambda results: self._record_session(results, batch))
        session.addBoth(self._session_done, key)
        self._track(session)

    def _record_session(
        self, results: list[Results],
        batch: list[tuple[StoredMessage, tuple[StoredRecipient, ...]]],
    ) -> defer.Deferred[Any]:
        return defer.gatherResults(
            [self._record(message, recipients, message_results)
             for (message, recipients), message_results in zip(batch, results, strict=True)],
            consumeErrors=True,
        )

    def _session_done(self, result: object, key: str) -> None:
        if isinstance(result, Failure):
            _LOG.failure("delivery session failed", result)
        destination = self._destinations[key]
        destination.sessions -= 1
        if destination.waiting:
            self._start_sessions(key)
        elif not destination.sessions:
            del self._destinations[key]

    def _track(self, work: defer.Deferred[Any]) -> None:
        self._active.add(work)

        def forget(result: object) -> None:
            self._active.discard(work)
            if isinstance(result, Failure):
                _LOG.failure("delivery failed", result)

        work.addBoth(forget)

    # -- results --------------------------------------------------------------------

    def _record(self, message: StoredMessage, recipients: Sequence[StoredRecipient],
                results: Results) -> defer.Deferred[None]:
        """Log each result, decide retries and notices, and store it all.

        Notices go into the queue before the results are recorded: a crash in between
        repeats a notice rather than losing one.
        """
        if not self._recording:
            # Stopped meanwhile: the lease stays, and the next start retries (and logs) it.
            return defer.succeed(None)
        now = self.clock.seconds()
        updates: list[RecipientUpdate] = []
        failed, delayed, succeeded = [], [], []
        for recipient, result in zip(recipients, results, strict=True):
            next_attempt, warned = None, False
            if result.outcome is Outcome.DEFERRED:
                if expired(message.arrival, now, self.settings):
                    result = replace(result, outcome=Outcome.BOUNCED, status="4.4.7",
                                     text=f"message expired; last error: {result.text}")
                else:
                    next_attempt = now + retry_delay(recipient.attempts + 1, self.settings,
                                                     self.rng)
                    warned = due_for_delay_warning(message.arrival, now,
                                                   recipient.delay_warned, self.settings)
                    if warned:
                        delayed.append((recipient, result))
            if result.outcome is Outcome.BOUNCED:
                failed.append((recipient, result))
            elif result.outcome is Outcome.DELIVERED:
                succeeded.append((recipient, result))
            self._log_attempt(message, recipient, result, now)
            updates.append(RecipientUpdate(recipient.index, result, next_attempt, warned))
        notified = self.notifier.notify(message, failed, delayed, succeeded)

        def record(_: object) -> defer.Deferred[bool]:
            return self.store.record_attempts(message.queue_id, updates, now)

        def done(removed: bool) -> None:
            self._in_flight -= len(recipients)
            if removed:
                _LOG.info(maillog.REMOVED, queue_id=message.queue_id)
            # Something freed up or became due (a retry sooner than the timer): look again.
            self.wake()

        return notified.addCallback(record).addCallback(done)

    def _log_attempt(self, message: StoredMessage, recipient: StoredRecipient,
                     result: AttemptResult, now: float) -> None:
        verb = {Outcome.DELIVERED: "sent", Outcome.DEFERRED: "deferred",
                Outcome.BOUNCED: "bounced"}[result.outcome]
        _LOG.info(
            maillog.DELIVERY, queue_id=message.queue_id, recipient=recipient.address,
            relay=result.relay, delay=f"{now - message.arrival:.1f}", status=result.status,
            verb=verb, text=result.text, tls=result.tls or "",
        )
