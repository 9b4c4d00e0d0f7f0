"""The queue store's administrative operations and how the queue manager honours them for
work it holds in memory (hold, delete, bounce, pause while deliveries are in flight)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BACKENDS, ReactorThread, make_store
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from relayhub.config import DeliverySettings, DomainSettings, NextHop, RoutingSettings
from relayhub.delivery.manager import GIVE_UP_STATUS, QueueManager
from relayhub.delivery.notices import QueueNotifier
from relayhub.delivery.results import AttemptResult, Outcome
from relayhub.queue import schema
from relayhub.queue.sqlite import SQLiteQueueStore
from relayhub.queue.store import (
    Envelope,
    MessageFilter,
    RecipientRequest,
    RecipientStatus,
    RecipientUpdate,
    Recorded,
    Selection,
    StoredMessage,
)
from relayhub.routing import Router

SENDER = "alice@example.org"


@pytest.fixture(params=BACKENDS)
def store(reactor_thread: ReactorThread, tmp_path: Path, request: pytest.FixtureRequest
          ) -> Iterator[SQLiteQueueStore]:
    # Both backends behave alike here (the PostgreSQL store duck-types the SQLite one).
    s = make_store(request.param, tmp_path, request)
    reactor_thread.run(s.open)
    yield s
    reactor_thread.run(s.close)


def queue(rt: ReactorThread, store: SQLiteQueueStore, *recipients: str,
          subject: str = "test") -> str:
    def commit() -> defer.Deferred[str]:
        incoming = store.incoming()
        incoming.write(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
        envelope = Envelope(SENDER, tuple(RecipientRequest(r) for r in recipients))
        return incoming.commit(envelope, subject).addCallback(lambda _: incoming.queue_id)
    return rt.run(commit)


def message(rt: ReactorThread, store: SQLiteQueueStore, queue_id: str) -> StoredMessage:
    found = rt.run(store.get_message, queue_id)
    assert found is not None
    return found


def count_rows(store: Any, table: str) -> int:
    """Rows of a queue table, read from the database behind the store."""
    if hasattr(store, "dsn"):
        import psycopg

        with psycopg.connect(store.dsn) as conn:
            row = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
            return int(row[0]) if row else 0
    with sqlite3.connect(Path(store.db_path)) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def deferred_result(address: str) -> AttemptResult:
    return AttemptResult.deferred(address, "4.4.1", "connect to mx[192.0.2.1]:25: refused",
                                  "mx[192.0.2.1]:25")


def defer_all(rt: ReactorThread, store: SQLiteQueueStore, queue_id: str, until: float) -> None:
    """Claim the message's recipients and record a deferral until `until`."""
    now = time.time()
    work = rt.run(store.claim_due, now, 100, 60.0)
    [item] = [w for w in work if w.message.queue_id == queue_id]
    updates = [RecipientUpdate(r.index, deferred_result(r.address), until)
               for r in item.recipients]
    assert rt.run(store.record_attempts, queue_id, updates, now) is Recorded.KEPT
    rt.run(store.release_leases)  # the others claimed with it


def due_ids(rt: ReactorThread, store: SQLiteQueueStore, now: float | None = None
            ) -> set[str]:
    """Which messages a scan at `now` would lease (the leases are ended again at once)."""
    work = rt.run(store.claim_due, now or time.time(), 1000, 60.0)
    rt.run(store.release_leases)
    return {w.message.queue_id for w in work}


# -- hold, release, flush ------------------------------------------------------------------

def test_hold_stops_picking_and_release_makes_it_due_at_once(
        reactor_thread: ReactorThread, store: SQLiteQueueStore) -> None:
    rt = reactor_thread
    held, other = queue(rt, store, "b@x.example"), queue(rt, store, "c@y.example")
    defer_all(rt, store, held, until=time.time() + 3600)
    changed = rt.run(store.hold, Selection((held, "NoSuchId0000", "../etc")))
    assert changed.changed == (held,) and changed.unchanged == ()
    assert rt.run(store.hold, Selection((held,))).unchanged == (held,)  # already held
    assert message(rt, store, held).held
    assert due_ids(rt, store, time.time() + 7200) == {other}  # never picked, even when due

    assert [m.queue_id for m in rt.run(store.list_messages, MessageFilter(held=True))] == [held]
    assert rt.run(store.list_messages, MessageFilter(deferred=True)) == []  # held: not listed

    before = time.time()
    released = rt.run(store.release, Selection(everything=True), before)
    assert released.changed == (held,) and released.unchanged == (other,)
    [recipient] = message(rt, store, held).recipients
    assert recipient.next_attempt is not None and recipient.next_attempt <= before
    assert recipient.status is RecipientStatus.DEFERRED  # due, but still deferred
    assert due_ids(rt, store) == {held, other}


def test_flush_makes_pending_recipients_due_but_never_held_ones(
        reactor_thread: ReactorThread, store: SQLiteQueueStore) -> None:
    rt = reactor_thread
    later = time.time() + 3600
    first = queue(rt, store, "a@x.example", "b@y.example")
    second = queue(rt, store, "c@x.example")
    held = queue(rt, store, "d@x.example")
    for queue_id in (first, second, held):
        defer_all(rt, store, queue_id, until=later)
    rt.run(store.hold, Selection((held,)))
    assert due_ids(rt, store) == set()

    # --domain: only that domain's recipients become due.
    flushed = rt.run(store.flush, Selection(domain="y.example"), time.time())
    assert flushed.changed == (first,)
    by_address = {r.address: r for r in message(rt, store, first).recipients}
    assert by_address["b@y.example"].next_attempt <= time.time()  # type: ignore[operator]
    assert by_address["a@x.example"].next_attempt == pytest.approx(later)

    flushed = rt.run(store.flush, Selection(everything=True), time.time())
    assert flushed.changed == (first, second) and flushed.unchanged == (held,)
    assert due_ids(rt, store) == {first, second}

    missing = rt.run(store.flush, Selection(("NoSuchId0000",)), time.time())
    assert missing.changed == () and missing.unchanged == ()


# -- delete, bounce ------------------------------------------------------------------------

def test_delete_removes_rows_history_and_body(reactor_thread: ReactorThread,
                                              store: SQLiteQueueStore) -> None:
    rt = reactor_thread
    gone, kept = queue(rt, store, "a@x.example"), queue(rt, store, "b@z.example")
    defer_all(rt, store, gone, until=time.time() + 60)
    body = Path(store.body_path(gone))
    assert body.exists() and rt.run(store.history, gone)
    assert rt.run(store.delete, Selection(domain="x.example")).changed == (gone,)
    assert rt.run(store.get_message, gone) is None and not body.exists()
    assert rt.run(store.history, gone) == []
    assert [m.queue_id for m in rt.run(store.list_messages)] == [kept]
    assert rt.run(store.delete, Selection((gone,))).changed == ()


def test_results_of_an_attempt_on_a_deleted_message_are_discarded(
        reactor_thread: ReactorThread, store: SQLiteQueueStore) -> None:
    rt = reactor_thread
    queue_id = queue(rt, store, "a@x.example")
    [item] = rt.run(store.claim_due, time.time(), 10, 60.0)  # the attempt is in flight
    rt.run(store.delete, Selection((queue_id,)))
    update = RecipientUpdate(0, deferred_result("a@x.example"), time.time() + 60)
    assert rt.run(store.record_attempts, queue_id, [update], time.time()) is Recorded.VANISHED
    assert rt.run(store.list_messages) == []
    assert count_rows(store, "history") == count_rows(store, "recipients") == 0
    assert item.message.queue_id == queue_id


def test_results_arriving_together_share_one_transaction(reactor_thread: ReactorThread,
                                                          store: SQLiteQueueStore) -> None:
    ids = [queue(reactor_thread, store, f"r{n}@example.com") for n in range(20)]
    now = time.time()
    work = reactor_thread.run(store.claim_due, now, 100, 60.0)
    before = store.stats.record_batches

    def record_all() -> defer.Deferred[list[Recorded]]:
        # All at once, as the queue manager does when many sessions answer together.
        return defer.gatherResults([
            store.record_attempts(item.message.queue_id, [RecipientUpdate(
                r.index, AttemptResult(r.address, Outcome.DELIVERED, "2.0.0", "250 ok"))
                for r in item.recipients], now)
            for item in work])

    outcomes = reactor_thread.run(record_all)
    assert outcomes == [Recorded.REMOVED] * 20
    assert store.stats.record_batches - before < 20
    assert not set(ids) & {m.queue_id for m in reactor_thread.run(store.list_messages)}


def test_bounce_marks_pending_recipients_given_up_and_due(
        reactor_thread: ReactorThread, store: SQLiteQueueStore) -> None:
    rt = reactor_thread
    queue_id = queue(rt, store, "a@x.example", "b@y.example")
    now = time.time()
    # One recipient already delivered: it stays as it is.
    [item] = rt.run(store.claim_due, now, 10, 60.0)
    delivered = AttemptResult("a@x.example", Outcome.DELIVERED, "2.0.0", "250 ok", "mx:25")
    rt.run(store.record_attempts, queue_id, [
        RecipientUpdate(0, delivered), RecipientUpdate(1, deferred_result("b@y.example"),
                                                       now + 3600)], now)
    rt.run(store.hold, Selection((queue_id,)))
    assert rt.run(store.bounce, ["NoSuchId0000", queue_id], now).changed == (queue_id,)
    found = message(rt, store, queue_id)
    assert not found.held  # released, or the manager could never bounce it
    first, second = found.recipients
    assert (first.status, first.give_up) == (RecipientStatus.DELIVERED, False)
    assert second.give_up and second.next_attempt == pytest.approx(now)
    [due] = rt.run(store.claim_due, time.time(), 10, 60.0)
    assert [r.give_up for r in due.recipients] == [True]
    assert item.message.queue_id == queue_id


def test_a_deferral_recorded_after_a_bounce_leaves_the_recipient_due(
        reactor_thread: ReactorThread, store: SQLiteQueueStore) -> None:
    rt = reactor_thread
    queue_id = queue(rt, store, "a@x.example")
    rt.run(store.claim_due, time.time(), 10, 60.0)  # attempt in flight ...
    rt.run(store.bounce, [queue_id], time.time())  # ... when the administrator gives up
    now = time.time()
    update = RecipientUpdate(0, deferred_result("a@x.example"), now + 3600)
    rt.run(store.record_attempts, queue_id, [update], now)
    [recipient] = message(rt, store, queue_id).recipients
    assert recipient.give_up and recipient.next_attempt == pytest.approx(now)


# -- pause and resume ----------------------------------------------------------------------

def test_pause_holds_back_a_domain_until_resumed_or_expired(
        reactor_thread: ReactorThread, store: SQLiteQueueStore) -> None:
    rt = reactor_thread
    paused = queue(rt, store, "a@paused.example")
    mixed = queue(rt, store, "b@paused.example", "c@free.example")
    now = time.time()
    rt.run(store.pause, "paused.example", None)
    work = rt.run(store.claim_due, now, 100, 60.0)
    assert [(w.message.queue_id, [r.address for r in w.recipients]) for w in work] == [
        (mixed, ["c@free.example"])]
    rt.run(store.release_leases)
    assert rt.run(store.next_due, now) == pytest.approx(message(rt, store, mixed).arrival)

    # A pause with an end: due again once it has passed, and next_due wakes the manager.
    rt.run(store.pause, "paused.example", now + 30)
    assert due_ids(rt, store, now) == {mixed}
    assert due_ids(rt, store, now + 31) == {paused, mixed}
    summary = rt.run(store.summary, now)
    assert [(p.domain, p.until) for p in summary.paused] == [("paused.example", now + 30)]

    # A bounce is not a delivery: given-up recipients go even to a paused domain.
    rt.run(store.bounce, [paused], now)
    assert due_ids(rt, store, now) == {paused, mixed}

    assert rt.run(store.resume, "paused.example", now) is True
    assert rt.run(store.resume, "paused.example", now) is False
    assert rt.run(store.summary, now).paused == ()


def test_resume_makes_the_domain_due_at_once(reactor_thread: ReactorThread,
                                             store: SQLiteQueueStore) -> None:
    rt = reactor_thread
    queue_id = queue(rt, store, "a@paused.example")
    defer_all(rt, store, queue_id, until=time.time() + 3600)
    rt.run(store.pause, "paused.example", None)
    now = time.time()
    assert rt.run(store.resume, "paused.example", now)
    assert due_ids(rt, store) == {queue_id}


# -- what the queue manager checks before a session ----------------------------------------

def test_confirm_leased_drops_deleted_held_paused_and_given_up_work(
        reactor_thread: ReactorThread, store: SQLiteQueueStore) -> None:
    rt = reactor_thread
    ids = [queue(rt, store, f"r@d{n}.example") for n in range(5)]
    now = time.time()
    work = rt.run(store.claim_due, now, 100, 3600.0)
    assert len(work) == 5
    deleted, held, paused, given_up, fine = ids
    rt.run(store.delete, Selection((deleted,)))
    rt.run(store.hold, Selection((held,)))
    rt.run(store.pause, "d2.example", None)
    rt.run(store.bounce, [given_up], now)
    leased = [(w.message.queue_id, [r.index for r in w.recipients]) for w in work]
    assert rt.run(store.confirm_leased, leased, now) == {(fine, 0)}
    # The dropped ones lost their lease: picked again as soon as they may be; the confirmed
    # one keeps its lease.
    assert due_ids(rt, store, now + 1) == {given_up}  # (this ends every lease)
    rt.run(store.release, Selection((held,)), now)
    rt.run(store.resume, "d2.example", now)
    assert due_ids(rt, store, now + 1) == {held, paused, given_up, fine}


# -- statistics, history, listing ----------------------------------------------------------

def test_summary_counts_and_history(reactor_thread: ReactorThread,
                                    store: SQLiteQueueStore) -> None:
    rt = reactor_thread
    first = queue(rt, store, "a@x.example", "b@x.example", "c@y.example")
    second = queue(rt, store, "d@y.example")
    defer_all(rt, store, first, until=time.time() + 60)
    rt.run(store.hold, Selection((second,)))
    now = time.time()
    summary = rt.run(store.summary, now)
    assert (summary.messages, summary.held) == (2, 1)
    assert summary.recipients == {"queued": 1, "deferred": 3, "delivered": 0, "bounced": 0}
    assert summary.by_domain == {"x.example": 2, "y.example": 2}
    assert summary.oldest_arrival == message(rt, store, first).arrival
    history = rt.run(store.history, first)
    assert [(h.recipient, h.dsn, h.relay) for h in history] == [
        ("a@x.example", "4.4.1", "mx[192.0.2.1]:25"), ("b@x.example", "4.4.1", "mx[192.0.2.1]:25"),
        ("c@y.example", "4.4.1", "mx[192.0.2.1]:25")]
    listed = rt.run(store.list_messages, MessageFilter(domain="y.example"))
    assert [m.queue_id for m in listed] == [first, second]
    listed = rt.run(store.list_messages, MessageFilter(deferred=True, domain="x.example"))
    assert [m.queue_id for m in listed] == [first]
    assert len(listed[0].recipients) == 3  # a listed message shows all its recipients


def test_migration_fills_in_recipient_domains(reactor_thread: ReactorThread,
                                              tmp_path: Path) -> None:
    """A queue written before the domain column existed gets it filled from the address."""
    (tmp_path / "queue").mkdir(mode=0o700)
    db = schema.connect(tmp_path / "queue" / "queue.db", 5.0)
    db.execute("BEGIN")
    for step in schema.MIGRATIONS[:3]:
        for statement in step:
            db.execute(statement)
    db.execute("PRAGMA user_version = 3")
    db.execute("INSERT INTO messages (id, arrival, sender, size) VALUES ('AAAAAAAAAAAA', 1, '', 1)")
    db.executemany(
        "INSERT INTO recipients (message_id, idx, address, next_attempt) VALUES (?, ?, ?, 1)",
        [("AAAAAAAAAAAA", 0, "bob@Example.COM"), ("AAAAAAAAAAAA", 1, '"odd@local"@x.example')])
    db.execute("COMMIT")
    db.close()
    store = SQLiteQueueStore(tmp_path)
    reactor_thread.run(store.open)
    try:
        summary = reactor_thread.run(store.summary, time.time())
        assert summary.by_domain == {"example.com": 1, "x.example": 1}
        # Queued before body traits were recorded: not known, so the queue manager scans it.
        old = reactor_thread.run(store.get_message, "AAAAAAAAAAAA")
        assert old is not None and old.traits is None
    finally:
        reactor_thread.run(store.close)


# -- the queue manager with work waiting in memory -----------------------------------------

class GatedSMTP:
    """An SMTP courier whose sessions take messages one by one from the manager's work
    source; each message is delivered when the test opens its gate."""

    def __init__(self, outcome: Outcome = Outcome.DELIVERED) -> None:
        self.sessions: list[list[str]] = []  # queue IDs per session, in the order taken
        self.gates: list[defer.Deferred[None]] = []
        self.outcome = outcome

    def deliver(self, hop: NextHop, work: Any) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._session(work))

    async def _session(self, work: Any) -> None:
        taken: list[str] = []
        self.sessions.append(taken)
        while (item := await work.next()) is not None:
            message, recipients = item
            taken.append(message.queue_id)
            gate: defer.Deferred[None] = defer.Deferred()
            self.gates.append(gate)
            await gate
            code, status = ("250", "2.0.0") if self.outcome is Outcome.DELIVERED else (
                "550", "5.1.1")
            work.done(item, [AttemptResult(r.address, self.outcome, status, f"{code} {status}",
                                           "sink:25") for r in recipients])


class RecordingNotifier:
    def __init__(self) -> None:
        self.failed: list[tuple[str, str, str]] = []

    def notify(self, message: StoredMessage, failed: Any, delayed: Any, succeeded: Any
               ) -> defer.Deferred[None]:
        self.failed += [(message.queue_id, r.address, result.status) for r, result in failed]
        return defer.succeed(None)


class NoLocal:
    def deliver(self, *args: Any) -> defer.Deferred[list[AttemptResult]]:
        raise AssertionError("no local delivery in these tests")


def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


SETTINGS = DeliverySettings(retry_min=60, retry_max=120, max_lifetime=86400, delay_warning=0,
                            concurrency_per_destination=1, tls="none", smtp_port=25,
                            nameservers=())


def start_manager(rt: ReactorThread, store: SQLiteQueueStore, smtp: GatedSMTP,
                  notifier: Any) -> QueueManager:
    router = Router(DomainSettings(("localhost",), (), (), ()), RoutingSettings(None, {}))
    qm = QueueManager(store, router, NoLocal(), smtp, notifier, SETTINGS, rt.reactor)
    rt.run(qm.startService)
    return qm


def stop_manager(rt: ReactorThread, qm: QueueManager, smtp: GatedSMTP) -> None:
    for gate in smtp.gates:
        if not gate.called:
            rt.run(gate.callback, None)
    rt.run(qm.stopService)


@pytest.fixture
def manager(reactor_thread: ReactorThread, store: SQLiteQueueStore
            ) -> Iterator[tuple[QueueManager, GatedSMTP, RecordingNotifier]]:
    smtp, notifier = GatedSMTP(), RecordingNotifier()
    qm = start_manager(reactor_thread, store, smtp, notifier)
    yield qm, smtp, notifier
    stop_manager(reactor_thread, qm, smtp)


def test_work_waiting_for_a_session_is_checked_before_it_starts(
        reactor_thread: ReactorThread, store: SQLiteQueueStore,
        manager: tuple[QueueManager, GatedSMTP, RecordingNotifier]) -> None:
    rt = reactor_thread
    qm, smtp, notifier = manager
    first = queue(rt, store, "a@dest.example")
    rt.run(qm.wake)
    wait_until(lambda: len(smtp.gates) == 1)  # the only session for dest.example is busy
    deleted, held, bounced, kept = (queue(rt, store, f"{n}@dest.example")
                                    for n in ("b", "c", "d", "e"))
    rt.run(qm.wake)
    wait_until(lambda: qm._in_flight == 5)  # all leased, four waiting in memory
    rt.run(store.delete, Selection((deleted,)))
    rt.run(store.hold, Selection((held,)))
    rt.run(store.bounce, [bounced], time.time())

    rt.run(smtp.gates[0].callback, None)
    wait_until(lambda: len(smtp.gates) == 2)
    assert smtp.sessions == [[first, kept]]  # deleted and held ones never went out
    wait_until(lambda: notifier.failed == [(bounced, "d@dest.example", GIVE_UP_STATUS)])
    rt.run(smtp.gates[1].callback, None)
    wait_until(lambda: [m.queue_id for m in rt.run(store.list_messages)] == [held])
    wait_until(lambda: qm._in_flight == 0)

    rt.run(store.release, Selection((held,)), time.time())
    rt.run(qm.wake)
    wait_until(lambda: len(smtp.gates) == 3)
    assert smtp.sessions[-1][-1] == held  # taken by the idle session, or by a new one


def test_a_message_deleted_during_its_session_leaves_no_trace(
        reactor_thread: ReactorThread, store: SQLiteQueueStore,
        manager: tuple[QueueManager, GatedSMTP, RecordingNotifier]) -> None:
    rt = reactor_thread
    qm, smtp, _ = manager
    queue_id = queue(rt, store, "a@dest.example")
    rt.run(qm.wake)
    wait_until(lambda: len(smtp.gates) == 1)
    rt.run(store.delete, Selection((queue_id,)))  # the attempt is in flight
    rt.run(smtp.gates[0].callback, None)
    wait_until(lambda: qm._in_flight == 0)
    assert rt.run(store.list_messages) == []
    assert smtp.sessions == [[queue_id]]


def test_a_bounce_for_a_message_deleted_in_flight_sends_no_notice(
        reactor_thread: ReactorThread, store: SQLiteQueueStore) -> None:
    """The notice would quote the deleted body: it is skipped, quietly, with the results."""
    rt = reactor_thread
    smtp = GatedSMTP(Outcome.BOUNCED)
    notifier = QueueNotifier(store, "hub.test", "postmaster@localhost", rt.reactor,
                             max_lifetime=86400)
    failures: list[Any] = []

    def observe(event: Any) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    qm = start_manager(rt, store, smtp, notifier)
    try:
        queue_id = queue(rt, store, "a@dest.example")
        rt.run(qm.wake)
        wait_until(lambda: len(smtp.gates) == 1)
        rt.run(store.delete, Selection((queue_id,)))
        rt.run(smtp.gates[0].callback, None)
        wait_until(lambda: qm._in_flight == 0)
        assert rt.run(store.list_messages) == []  # no notice was queued either
        assert failures == []
    finally:
        globalLogPublisher.removeObserver(observe)
        stop_manager(rt, qm, smtp)


def test_a_full_manager_waits_for_room_instead_of_polling_the_queue(
        reactor_thread: ReactorThread, store: SQLiteQueueStore,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With MAX_IN_FLIGHT recipients leased, nothing can be claimed until a result frees
    room (and each result wakes the manager): it must not ask the store again and again."""
    rt = reactor_thread
    monkeypatch.setattr("relayhub.delivery.manager.MAX_IN_FLIGHT", 1)
    asked: list[float] = []
    next_due = store.next_due

    def counting(now: float) -> defer.Deferred[float | None]:
        asked.append(now)
        return next_due(now)

    monkeypatch.setattr(store, "next_due", counting)
    smtp, notifier = GatedSMTP(), RecordingNotifier()
    qm = start_manager(rt, store, smtp, notifier)
    try:
        first, second = queue(rt, store, "a@dest.example"), queue(rt, store, "b@dest.example")
        rt.run(qm.wake)
        wait_until(lambda: len(smtp.gates) == 1)  # the one slot is taken, b waits due
        before = len(asked)
        time.sleep(0.5)
        assert len(asked) - before <= 2, f"{len(asked) - before} queue polls while full"
        rt.run(smtp.gates[0].callback, None)
        wait_until(lambda: len(smtp.gates) == 2)  # the freed room went to b at once
        assert [queue_id for taken in smtp.sessions for queue_id in taken] == [first, second]
    finally:
        stop_manager(rt, qm, smtp)
