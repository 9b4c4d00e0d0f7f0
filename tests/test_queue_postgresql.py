"""What only the PostgreSQL queue store does: a versioned schema, work shared between hubs
with leases (claimed once, renewed while held, taken over after its holder died), new mail
announced to every hub, and a database that goes away and comes back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ReactorThread
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from relayhub import maillog
from relayhub.delivery.results import AttemptResult
from relayhub.errors import TemporaryFailure
from relayhub.queue import pgschema
from relayhub.queue.postgresql import PostgreSQLQueueStore
from relayhub.queue.store import Envelope, RecipientRequest, RecipientUpdate, Recorded


def open_store(rt: ReactorThread, dsn: str, state_dir: Path, hub: str,
               lease: float = 60.0) -> PostgreSQLQueueStore:
    store = PostgreSQLQueueStore(dsn, state_dir, hub=hub, lease=lease)
    rt.run(store.open)
    return store


@pytest.fixture
def two(reactor_thread: ReactorThread, pg_dsn: str, tmp_path: Path
        ) -> Iterator[tuple[PostgreSQLQueueStore, PostgreSQLQueueStore]]:
    """Two hubs' stores on one database, each with its own state directory."""
    a = open_store(reactor_thread, pg_dsn, tmp_path / "a", "hub-a", lease=1.5)
    b = open_store(reactor_thread, pg_dsn, tmp_path / "b", "hub-b", lease=1.5)
    yield a, b
    reactor_thread.run(a.close)
    reactor_thread.run(b.close)


def queue(rt: ReactorThread, store: PostgreSQLQueueStore, *recipients: str,
          body: bytes = b"Subject: t\r\n\r\nbody\r\n") -> str:
    def commit() -> defer.Deferred[str]:
        incoming = store.incoming()
        incoming.write(body)
        envelope = Envelope("alice@example.org", tuple(RecipientRequest(r) for r in recipients))
        return incoming.commit(envelope, "t").addCallback(lambda _: incoming.queue_id)
    return rt.run(commit)


def test_schema_is_versioned_and_a_newer_one_is_refused(
        reactor_thread: ReactorThread, pg_dsn: str, tmp_path: Path) -> None:
    store = open_store(reactor_thread, pg_dsn, tmp_path, "hub-a")
    queue_id = queue(reactor_thread, store, "bob@example.com")
    reactor_thread.run(store.close)
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT version FROM relayhub_schema").fetchone()
        assert row == (len(pgschema.MIGRATIONS),)
    again = open_store(reactor_thread, pg_dsn, tmp_path, "hub-a")
    try:
        [message] = reactor_thread.run(again.list_messages)
        assert (message.queue_id, message.hub) == (queue_id, "hub-a")
    finally:
        reactor_thread.run(again.close)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("UPDATE relayhub_schema SET version = version + 1")
    with pytest.raises(pgschema.SchemaVersionError, match="newer than this relayhub"):
        reactor_thread.run(PostgreSQLQueueStore(pg_dsn, tmp_path, hub="hub-a").open)


def test_each_due_recipient_is_claimed_by_one_hub(
        reactor_thread: ReactorThread, two: tuple[PostgreSQLQueueStore, ...]) -> None:
    rt, (a, b) = reactor_thread, two
    ids = {queue(rt, a, f"r{n}@example.com") for n in range(20)}
    now = time.time()

    def both() -> defer.Deferred[list[Any]]:
        return defer.gatherResults([a.claim_due(now, 15, 60.0), b.claim_due(now, 15, 60.0)])

    work_a, work_b = rt.run(both)
    got_a = {w.message.queue_id for w in work_a}
    got_b = {w.message.queue_id for w in work_b}
    assert not got_a & got_b and got_a | got_b == ids
    # The claiming hub has the body in its own cache, wherever the message was accepted.
    for work in work_b:
        assert Path(b.body_path(work.message.queue_id)).read_bytes().endswith(b"body\r\n")


def test_a_lease_is_renewed_while_held_and_taken_over_once_its_hub_is_gone(
        reactor_thread: ReactorThread, two: tuple[PostgreSQLQueueStore, ...]) -> None:
    rt, (a, b) = reactor_thread, two
    rt.run(a.release_leases)  # a's queue manager starts: heartbeat and lease renewal
    queue_id = queue(rt, a, "bob@example.com")
    [work] = rt.run(a.claim_due, time.time(), 10, 60.0)
    time.sleep(2.5)  # beyond the 1.5 s lease: a renews it, so b may not take it
    assert rt.run(b.claim_due, time.time(), 10, 60.0) == []
    assert [h.name for h in rt.run(b.hubs)] == ["hub-a"]
    # a "dies": it stops renewing; after the lease b takes the recipient over.
    rt.run(a.close)
    time.sleep(1.6)
    [taken] = rt.run(b.claim_due, time.time(), 10, 60.0)
    assert taken.message.queue_id == queue_id == work.message.queue_id
    update = RecipientUpdate(0, AttemptResult.deferred("bob@example.com", "4.0.0", "later",
                                                       "mx"), time.time() + 600)
    assert rt.run(b.record_attempts, queue_id, [update], time.time()) is Recorded.KEPT


def test_release_leases_ends_only_this_hubs_leases(
        reactor_thread: ReactorThread, two: tuple[PostgreSQLQueueStore, ...]) -> None:
    rt, (a, b) = reactor_thread, two
    queue(rt, a, "one@example.com")
    rt.run(a.claim_due, time.time(), 10, 60.0)
    assert rt.run(b.release_leases) == 0
    assert rt.run(b.claim_due, time.time(), 10, 60.0) == []
    assert rt.run(a.release_leases) == 1
    assert len(rt.run(b.claim_due, time.time(), 10, 60.0)) == 1


def test_new_mail_wakes_the_queue_manager_of_every_hub(
        reactor_thread: ReactorThread, two: tuple[PostgreSQLQueueStore, ...]) -> None:
    rt, (a, b) = reactor_thread, two
    wakes: list[float] = []
    rt.run(b.watch, lambda: wakes.append(time.time()))
    deadline = time.time() + 10
    while not wakes and time.time() < deadline:  # the first wake: the listener connected
        time.sleep(0.05)
    before = len(wakes)
    queue(rt, a, "bob@example.com")
    while len(wakes) == before and time.time() < deadline:
        time.sleep(0.05)
    assert len(wakes) > before


def test_database_down_is_a_temporary_failure_said_once_and_recovers(
        reactor_thread: ReactorThread, tmp_path: Path) -> None:
    import pgserver

    if pgserver.available():
        pytest.skip(f"no PostgreSQL for the tests: {pgserver.available()}")
    server = pgserver.PGServer()
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_format") in (maillog.QUEUE_DB_DOWN, maillog.QUEUE_DB_UP):
            lines.append(event["log_format"])

    globalLogPublisher.addObserver(observe)
    store = open_store(reactor_thread, server.new_database(), tmp_path, "hub-a")
    try:
        queue(reactor_thread, store, "bob@example.com")
        server.stop()
        for _ in range(2):
            with pytest.raises(TemporaryFailure) as refused:
                queue(reactor_thread, store, "bob@example.com")
            assert refused.value.code == 451
            with pytest.raises(TemporaryFailure):
                reactor_thread.run(store.claim_due, time.time(), 10, 60.0)
        server.start()
        deadline = time.time() + 30
        while True:
            try:
                queue(reactor_thread, store, "carol@example.com")
                break
            except TemporaryFailure:
                assert time.time() < deadline, "the store did not recover"
                time.sleep(0.5)
        assert len(reactor_thread.run(store.list_messages)) == 2
        assert lines == [maillog.QUEUE_DB_DOWN, maillog.QUEUE_DB_UP]
    finally:
        globalLogPublisher.removeObserver(observe)
        reactor_thread.run(store.close)
        server.close()


def test_a_recipient_this_hub_still_holds_is_not_handed_out_again(
        reactor_thread: ReactorThread, two: tuple[PostgreSQLQueueStore, ...]) -> None:
    rt, (a, _b) = reactor_thread, two
    queue(rt, a, "bob@example.com")
    assert len(rt.run(a.claim_due, time.time(), 10, 60.0)) == 1
    # Its lease ran out (a database outage kept it from being renewed), and a scans again
    # while its queue manager still has the recipient in hand: not a second attempt.
    assert rt.run(a.claim_due, time.time() + 5, 10, 60.0) == []
