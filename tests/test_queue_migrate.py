"""`relayhubctl queue migrate` (issue 12, "Done when" 4): a stopped hub's queue moves from
SQLite to PostgreSQL and back with held, deferred and paused state intact, and a move
interrupted half-way finishes when run again, with nothing lost or doubled."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from conftest import ReactorThread
from hubprocess import write_toml
from test_relayhubctl import ctl
from twisted.internet import defer

from relayhub.delivery.results import AttemptResult
from relayhub.queue import migrate
from relayhub.queue.postgresql import PostgreSQLQueueStore
from relayhub.queue.sqlite import SQLiteQueueStore
from relayhub.queue.store import Envelope, RecipientRequest, RecipientUpdate, Selection

HUB = "hub.test"


def fill(rt: ReactorThread, state_dir: Path) -> dict[str, bytes]:
    """A SQLite queue with a held message, a deferred one (with history), a plain one and a
    paused domain; returns queue ID -> body."""
    store = SQLiteQueueStore(state_dir)
    rt.run(store.open)
    bodies: dict[str, bytes] = {}
    try:
        for n, rcpt in enumerate(("held@a.example", "deferred@b.example", "plain@c.example")):
            body = f"Subject: m{n}\r\n\r\nbody {n}\r\n".encode() * (n + 1)

            def commit(body: bytes = body, rcpt: str = rcpt) -> defer.Deferred[str]:
                incoming = store.incoming()
                incoming.write(body)
                envelope = Envelope("alice@example.org", (RecipientRequest(rcpt),), envid=rcpt)
                return incoming.commit(envelope, "s").addCallback(lambda _: incoming.queue_id)

            bodies[rt.run(commit)] = body
        held, deferred, _ = bodies
        rt.run(store.hold, Selection((held,)))
        now = time.time()
        work = rt.run(store.claim_due, now, 10, 60.0)
        assert [w.message.queue_id for w in work if w.message.queue_id == deferred]
        update = RecipientUpdate(0, AttemptResult.deferred("deferred@b.example", "4.4.1",
                                                           "refused", "mx:25"), now + 3600)
        rt.run(store.record_attempts, deferred, [update], now)
        rt.run(store.release_leases)
        rt.run(store.pause, "b.example", None)
    finally:
        rt.run(store.close)
    return bodies


def snapshot(rt: ReactorThread, store: Any) -> tuple[list[Any], list[Any], dict[str, bytes]]:
    """Messages (hub left out), histories and bodies, as the store reports them."""
    rt.run(store.open)
    try:
        messages = [dataclasses.replace(m, hub="") for m in rt.run(store.list_messages)]
        history = [[(h.recipient, h.relay, h.dsn, h.text)
                    for h in rt.run(store.history, m.queue_id)] for m in messages]
        bodies = {m.queue_id: Path(rt.run(store.fetch_body, m.queue_id)).read_bytes()
                  for m in messages}
        paused = rt.run(store.summary, time.time()).paused
        return messages, [history, paused], bodies
    finally:
        rt.run(store.close)


def test_round_trip_sqlite_postgresql_sqlite_keeps_every_state(
        reactor_thread: ReactorThread, tmp_path: Path, pg_dsn: str) -> None:
    rt = reactor_thread
    state_dir = tmp_path / "state"
    bodies = fill(rt, state_dir)
    before = snapshot(rt, SQLiteQueueStore(state_dir))
    assert before[2] == bodies and [m.held for m in before[0]] == [True, False, False]

    config = tmp_path / "relayhub.toml"
    write_toml(config, {"server": {"hostname": HUB, "state_dir": str(state_dir)}})
    # An interrupted earlier run: one message already copied, not yet deleted from SQLite.
    source, target = migrate.open_sides("sqlite", state_dir, "", HUB, pg_dsn, False)
    first = next(iter(bodies))
    copied = source.read(first)
    assert copied is not None
    target.write(copied)
    source.close()
    target.close()

    moved = ctl(config, "queue", "migrate", "--to", pg_dsn)
    assert moved.code == 0, moved.err
    assert "moved 3 messages" in moved.out
    assert snapshot(rt, SQLiteQueueStore(state_dir))[0] == []
    in_pg = snapshot(rt, PostgreSQLQueueStore(pg_dsn, tmp_path / "pg", hub=HUB))
    assert in_pg == before  # once each: the interrupted copy was not doubled

    write_toml(config, {"server": {"hostname": HUB, "state_dir": str(state_dir)},
                        "queue": {"backend": "postgresql", "dsn": pg_dsn}})
    back = ctl(config, "queue", "migrate", "--to", str(state_dir))
    assert back.code == 0, back.err
    assert snapshot(rt, PostgreSQLQueueStore(pg_dsn, tmp_path / "pg", hub=HUB))[0] == []
    after = snapshot(rt, SQLiteQueueStore(state_dir))
    assert after == before
    deferred = after[0][1].recipients[0]
    assert (deferred.status.value, deferred.attempts) == ("deferred", 1)
    assert deferred.next_attempt is not None and deferred.next_attempt > time.time() + 3000


def test_migrate_refuses_a_target_of_the_same_kind(tmp_path: Path) -> None:
    config = tmp_path / "relayhub.toml"
    write_toml(config, {"server": {"hostname": HUB, "state_dir": str(tmp_path / "state")}})
    (tmp_path / "state" / "queue").mkdir(parents=True)
    refused = ctl(config, "queue", "migrate", "--to", str(tmp_path / "other"))
    assert refused.code != 0 and "in SQLite already" in refused.err
