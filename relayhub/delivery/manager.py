"""The queue manager: leases due recipients, routes them, hands them to the local or SMTP
courier with at most `concurrency_per_destination` sessions per next hop, and records
each result (retry time, bounce, delay warning) back in the queue.

It sleeps until the earliest due time, and `wake()` (called for every new `250`, and by
relayhubctl after each change) makes it look again at once, so new mail starts moving within
milliseconds, not at the next poll.

Administrative changes and deliveries in flight (relayhubctl queue hold/delete/bounce/pause):

- A recipient is *in flight* once the queue manager has checked it in the store and is
  attempting it. For local delivery the check is the claim that leases it (delivery starts
  right then). For SMTP it is one more store query (`confirm_leased`) when a session takes
  the message for its next transaction, since leased work may wait in memory for a free
  session. The check and each change are transactions on the same database, so a change
  commits either before the check, and the work is dropped from memory unattempted, or
  after it, and the attempt is already in flight.
- `delete`: no attempt starts after the command has returned. An attempt in flight runs to
  its end; its results are then discarded, since the rows are gone (`Recorded.VANISHED`),
  and no notice is sent for it. Its body file is gone too, so an attempt that had not yet
  opened it fails with 4.3.0 and is equally discarded.
- `hold` and `pause`: work checked later is dropped and its lease ended; an attempt in
  flight completes and is recorded normally.
- `bounce`: marks pending recipients "given up" and due now; a scan bounces them through
  the normal result path (log line, delivery status notification, record). An attempt in
  flight completes; if it ends deferred, the recipient is due at once and bounced next.
- `flush`/`release`/`resume` make recipients due and wake the manager; recipients under
  a lease keep it (no second attempt in parallel with one in flight).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.python.failure import Failure

from relayhub import maillog
from relayhub.config import DeliverySettings, NextHop
from relayhub.delivery.interfaces import Item, LocalCourier, Notifier, Results, SMTPCourier
from relayhub.delivery.results import AttemptResult, Outcome
from relayhub.delivery.schedule import due_for_delay_warning, expired, retry_delay
from relayhub.errors import TemporaryFailure
from relayhub.queue.store import (
    DueWork,
    QueueStore,
    RecipientUpdate,
    Recorded,
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
# How long a session with nothing to send stays open for more work to its next hop (as
# Postfix's connection cache, smtp_connection_cache_time_limit): under steady traffic a new
# connection, greeting, EHLO and QUIT per few messages cost more than the messages did.
IDLE_SESSION = 2.0
# A lease outlives any single attempt; after a crash the next start releases them all.
LEASE = 3600.0
# Never sleep longer than this: a clock jump or a change by another process is noticed.
MAX_SLEEP = 60.0
# How long to wait before new sessions when the queue's database was away.
STORE_RETRY = 5.0
# How long a stop waits for attempts under way to finish and be recorded. The rest keep
# their leases and are retried after the next start (SPEC §9).
STOP_GRACE = 10.0
# The result given to a recipient an administrator gave up on (`relayhubctl queue bounce`).
GIVE_UP_STATUS = "5.0.0"
GIVE_UP_TEXT = "message returned to the sender by the mail administrator"
# Logged when an attempt ends for a message deleted meanwhile (relayhubctl queue delete).
DISCARDED = "{queue_id}: deleted during delivery, attempt results discarded"
_VERB = {Outcome.DELIVERED: "sent", Outcome.DEFERRED: "deferred", Outcome.BOUNCED: "bounced"}

@dataclass
class _Destination:
    """Work waiting for one SMTP next hop, and the sessions open to it."""

    hop: NextHop
    waiting: deque[Item] = field(default_factory=deque)
    sessions: set[_SessionWork] = field(default_factory=set)
    # Sessions waiting for work (see IDLE_SESSION): fired with True when work waits, with
    # False when they are to end.
    idle: deque[defer.Deferred[bool]] = field(default_factory=deque)

    def room(self) -> int:
        """How many waiting messages the sessions still opening will take. Sessions already
        busy with a message count for nothing: work that arrives meanwhile gets a session of
        its own (up to the concurrency limit), though a busy one may take it first."""
        return sum(session.quota for session in self.sessions if session.opening)


class _SessionWork:
    """One session's source of work: it takes messages waiting for its destination, up to
    MESSAGES_PER_SESSION, each confirmed in the store just before it goes (see the module
    docstring), and hands each one's results to the manager as soon as they are known."""

    def __init__(self, manager: QueueManager, destination: _Destination) -> None:
        self.manager = manager
        self.destination = destination
        self.quota = MESSAGES_PER_SESSION

    @property
    def opening(self) -> bool:
        """Connecting, or handed nothing yet."""
        return self.quota == MESSAGES_PER_SESSION

    async def next(self, *, linger: bool = True) -> Item | None:
        return await self.manager._next_for(self, linger)

    def done(self, item: Item, results: Results) -> None:
        message, recipients = item
        self.manager._track(self.manager._record(message, recipients, results))

    def untaken(self, item: Item) -> None:
        # Still leased and counted in flight; the session ends, and _session_done hands the
        # item to another.
        self.destination.waiting.appendleft(item)


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
        self.store.watch(self.wake)  # mail queued by other hubs of a shared queue
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
        for destination in list(self._destinations.values()):  # ending ones leave it
            while destination.idle:  # they end their sessions now
                destination.idle.popleft().callback(False)
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
        claimed.addErrback(self._scan_failed)
        claimed.addBoth(self._scan_done)

    def _scan_failed(self, failure: Failure) -> None:
        # A store that cannot reach its database says so once itself; every retry need not.
        if not failure.check(TemporaryFailure):
            _LOG.failure("queue scan failed", failure)

    def _scan_done(self, _: object) -> defer.Deferred[None] | None:
        self._scanning = False
        if self._rescan:
            self._rescan = False
            self.wake()
            return None
        if self._in_flight >= MAX_IN_FLIGHT:
            # Full: nothing can be claimed before a result frees room, and every result
            # wakes the manager (_record). next_due would answer "now" and the scan spin.
            self._sleep_until(None)
            return None
        return self.store.next_due(self.clock.seconds()).addCallbacks(
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
            given_up = tuple(r for r in item.recipients if r.give_up)
            if given_up:
                self._give_up(item.message, given_up)
            for recipient in item.recipients:
                if recipient.give_up:
                    continue
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
        """Open sessions while work waits beyond what the open ones will still take."""
        destination = self._destinations[key]
        # Idle sessions first: each takes an item at once (before its confirmation).
        while destination.idle and destination.waiting:
            destination.idle.popleft().callback(True)
        while (self.running and len(destination.waiting) > destination.room()
               and len(destination.sessions) < self.settings.concurrency_per_destination):
            work = _SessionWork(self, destination)
            destination.sessions.add(work)
            session = self.smtp.deliver(destination.hop, work)
            session.addBoth(self._session_done, key, work)
            self._track(session)

    def _start_sessions_again(self, key: str) -> None:
        if key in self._destinations:
            self._start_sessions(key)

    async def _next_for(self, work: _SessionWork, linger: bool = True) -> Item | None:
        """The next confirmed item for `work`'s session, or None to end it; with `linger`,
        an idle session waits up to IDLE_SESSION for work to arrive."""
        destination = work.destination
        while work.quota > 0 and self.running:
            if not destination.waiting:
                if linger and await self._idle(destination):
                    continue
                break
            message, recipients = destination.waiting.popleft()
            try:
                confirmed = await self.store.confirm_leased(
                    [(message.queue_id, [r.index for r in recipients])], self.clock.seconds())
            except BaseException:
                # Not attempted: its lease runs out after LEASE and it is picked again.
                self._in_flight -= len(recipients)
                raise
            still = tuple(r for r in recipients if (message.queue_id, r.index) in confirmed)
            if len(still) < len(recipients):
                self._in_flight -= len(recipients) - len(still)
                # Room freed, and given-up recipients among them are due now to be bounced.
                self.wake()
            if still:
                work.quota -= 1
                return message, still
        work.quota = 0  # it takes nothing more: a new session is started for later work
        return None

    def _idle(self, destination: _Destination) -> defer.Deferred[bool]:
        """Fires with True when work for `destination` waits, with False after
        IDLE_SESSION or at stop."""
        resumed: defer.Deferred[bool] = defer.Deferred()

        def expire() -> None:
            if resumed in destination.idle:
                destination.idle.remove(resumed)
                resumed.callback(False)

        timer = self.clock.callLater(IDLE_SESSION, expire)

        def resume(work_waits: bool) -> bool:
            if timer.active():
                timer.cancel()
            return work_waits

        destination.idle.append(resumed.addCallback(resume))
        return resumed

    def _deliver_local(self, message: StoredMessage, recipients: tuple[StoredRecipient, ...],
                       mailboxes: list[str]) -> None:
        delivery = self.local.deliver(message, recipients, mailboxes)
        delivery.addCallback(lambda results: self._record(message, recipients, results))
        self._track(delivery)

    def _give_up(self, message: StoredMessage, recipients: tuple[StoredRecipient, ...]) -> None:
        """Bounce recipients an administrator gave up on, as if an attempt had failed."""
        results = [AttemptResult.bounced(r.address, GIVE_UP_STATUS, GIVE_UP_TEXT)
                   for r in recipients]
        self._track(self._record(message, recipients, results))

    def _session_done(self, result: object, key: str, work: _SessionWork) -> None:
        """A session is over: free its slot, and start another if work waits."""
        store_away = isinstance(result, Failure) and result.check(TemporaryFailure)
        if isinstance(result, Failure) and not store_away:
            _LOG.failure("delivery session failed", result)
        destination = self._destinations[key]
        destination.sessions.discard(work)
        if destination.waiting and store_away:
            # The queue's database is away: the next session waits a little, rather than
            # connecting to the next hop again and again for nothing.
            self.clock.callLater(STORE_RETRY, self._start_sessions_again, key)
        elif destination.waiting:
            self._start_sessions(key)
        elif not destination.sessions:
            del self._destinations[key]

    def _track(self, work: defer.Deferred[Any]) -> None:
        self._active.add(work)

        def forget(result: object) -> None:
            self._active.discard(work)
            # TemporaryFailure: the store's database is away, and the store has said so.
            if isinstance(result, Failure) and not result.check(TemporaryFailure):
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

        def unless_deleted(failure: Failure) -> Failure | defer.Deferred[None]:
            # A notice quotes the body; without it, the message may have been deleted during
            # the attempt, and then there is nobody to tell (record discards the results).
            cause = failure.value
            if isinstance(cause, defer.FirstError):  # from the notifier's gatherResults
                cause = cause.subFailure.value
            if not isinstance(cause, FileNotFoundError):
                return failure

            def gone(found: StoredMessage | None) -> None:
                if found is not None:
                    failure.raiseException()

            return self.store.get_message(message.queue_id).addCallback(gone)

        def record(_: object) -> defer.Deferred[Recorded]:
            return self.store.record_attempts(message.queue_id, updates, now)

        def done(recorded: Recorded) -> None:
            if recorded is Recorded.REMOVED:
                _LOG.info(maillog.REMOVED, queue_id=message.queue_id)
            elif recorded is Recorded.VANISHED:
                _LOG.info(DISCARDED, queue_id=message.queue_id)

        def finished(result: object) -> object:
            self._in_flight -= len(recipients)
            # Something freed up or became due (a retry sooner than the timer): look again.
            self.wake()
            return result

        recorded = notified.addErrback(unless_deleted).addCallback(record).addCallback(done)
        return recorded.addBoth(finished)

    def _log_attempt(self, message: StoredMessage, recipient: StoredRecipient,
                     result: AttemptResult, now: float) -> None:
        _LOG.info(
            maillog.DELIVERY, queue_id=message.queue_id, recipient=recipient.address,
            relay=result.relay, delay=f"{now - message.arrival:.1f}", status=result.status,
            verb=_VERB[result.outcome], text=result.text, tls=result.tls or "none",
            next_hop=self.router.next_hop_class(recipient.address),  # for relayhub.metrics
            verified=result.verified or "none",
        )
