"""Tests of the SQLite queue store: durability, group commit, concurrency, failures, IDs."""

from __future__ import annotations

import itertools
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BACKENDS, make_store
from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall

from relayhub.errors import TemporaryFailure
from relayhub.mime import BodyTraits
from relayhub.queue import schema
from relayhub.queue.ids import is_queue_id, new_queue_id
from relayhub.queue.sqlite import QueueStateError, SQLiteQueueStore
from relayhub.queue.store import Envelope, RecipientRequest, RecipientStatus

REPO = Path(__file__).resolve().parent.parent

ENVELOPE = Envelope(
    sender="alice@example.org",
    recipients=(
        RecipientRequest("bob@example.com", orcpt="rfc822;bob@example.com",
                         notify=("SUCCESS", "FAILURE")),
        RecipientRequest("carol@example.net"),
    ),
    body_type="8BITMIME",
    smtputf8=True,
    ret="HDRS",
    envid="env-1",
    client_name="client.example.org",
    client_address="192.0.2.7",
    helo="client.example.org",
    protocol="ESMTPSA",
    auth_user="alice",
)


@pytest.fixture
def store(reactor_thread: Any, tmp_path: Path) -> Iterator[SQLiteQueueStore]:
    s = SQLiteQueueStore(tmp_path)
    reactor_thread.run(s.open)
    yield s
    reactor_thread.run(s.close)


@pytest.fixture(params=BACKENDS)
def any_store(reactor_thread: Any, tmp_path: Path, request: pytest.FixtureRequest
              ) -> Iterator[SQLiteQueueStore]:
    """Each backend in turn, for behaviour they share (the PostgreSQL store duck-types)."""
    s = make_store(request.param, tmp_path, request)
    reactor_thread.run(s.open)
    yield s
    reactor_thread.run(s.close)


def receive(store: SQLiteQueueStore, body: bytes, envelope: Envelope = ENVELOPE,
            subject: str = "") -> Deferred[str]:
    """On the reactor thread: stream `body` in chunks and commit; fires with the queue ID."""
    msg = store.incoming()
    for start in range(0, len(body), 1000):
        msg.write(body[start:start + 1000])
    return msg.commit(envelope, subject).addCallback(lambda _: msg.queue_id)


def body_for(n: int) -> bytes:
    return b"Subject: test %d\r\n\r\n" % n + b"line of text\r\n" * (n % 50 + 1)


# -- queue IDs ----------------------------------------------------------------------------

@given(st.floats(0, 4e9), st.floats(0, 4e9))
def test_queue_ids_have_the_shape_and_sort_by_arrival(a: float, b: float) -> None:
    assume(int(a * 1_000_000) < int(b * 1_000_000))
    rng = random.Random(0)
    first, second = new_queue_id(a, rng), new_queue_id(b, rng)
    assert is_queue_id(first) and is_queue_id(second)
    assert first < second


def test_queue_ids_differ_within_one_microsecond() -> None:
    rng = random.SystemRandom()
    assert len({new_queue_id(1.7e9, rng) for _ in range(1000)}) == 1000
    with pytest.raises(ValueError):
        new_queue_id(-1.0, rng)
    assert not is_queue_id("../../etc/passwd")


# -- storing and reading ------------------------------------------------------------------

def test_commit_stores_envelope_body_and_queued_recipients(
    reactor_thread: Any, any_store: SQLiteQueueStore, tmp_path: Path
) -> None:
    store = any_store
    body = b"Subject: hello\r\n\r\n" + b"x" * 200_000 + b"\r\n"
    before = time.time()
    queue_id = reactor_thread.run(receive, store, body, ENVELOPE, "hello")
    assert is_queue_id(queue_id)

    msg = reactor_thread.run(store.get_message, queue_id)
    assert msg is not None
    assert msg.envelope == ENVELOPE
    assert (msg.size, msg.subject, msg.held) == (len(body), "hello", False)
    assert before <= msg.arrival <= time.time()
    assert [r.status for r in msg.recipients] == [RecipientStatus.QUEUED] * 2
    assert all(r.next_attempt == msg.arrival and r.attempts == 0 for r in msg.recipients)
    assert msg.recipients[0].notify == ("SUCCESS", "FAILURE")
    assert Path(store.body_path(queue_id)).read_bytes() == body
    assert reactor_thread.run(store.list_messages) == [msg]
    assert reactor_thread.run(store.get_message, "NoSuchId0000") is None

    if not isinstance(store, SQLiteQueueStore):
        return
    queue_dir = tmp_path / "queue"
    for path, mode in [(queue_dir, 0o700), (queue_dir / "bodies", 0o700),
                       (queue_dir / "queue.db", 0o600), (Path(store.body_path(queue_id)), 0o600)]:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    with sqlite3.connect(queue_dir / "queue.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(schema.MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("size", [100, 300_000])  # held in memory; already on disk
def test_prepended_fields_go_in_front_of_the_stored_body(
    reactor_thread: Any, any_store: SQLiteQueueStore, size: int
) -> None:
    """What a DKIM signature needs: bytes put in front at the end of DATA are part of the
    committed body (file and, for PostgreSQL, the database row) and of its size."""
    body = b"Subject: hello\r\n\r\n" + b"y" * size + b"\r\n"
    front = b"DKIM-Signature: v=1; b=x\r\n"

    def run() -> Deferred[str]:
        msg = any_store.incoming()
        for start in range(0, len(body), 1000):
            msg.write(body[start:start + 1000])
        msg.prepend(front)
        return msg.commit(ENVELOPE).addCallback(lambda _: msg.queue_id)

    queue_id = reactor_thread.run(run)
    assert Path(any_store.body_path(queue_id)).read_bytes() == front + body
    msg = reactor_thread.run(any_store.get_message, queue_id)
    assert msg is not None and msg.size == len(front + body)
    if not isinstance(any_store, SQLiteQueueStore):
        assert reactor_thread.run(any_store.body_bytes, queue_id) == front + body
    # Measured as written, front included: what the queue manager sends by, unscanned.
    assert msg.traits == BodyTraits(has_8bit=False, longest_line=size)


@pytest.mark.parametrize(("body", "traits"), [
    (b"Subject: caf\xc3\xa9\r\n\r\n" + b"z" * 1200 + b"\r\n", BodyTraits(True, 1200)),
    (b"Subject: plain\r\n\r\nno line end at the end", BodyTraits(False, 22)),
    (b"Subject: bare\n\nLF", None),  # not known: the queue manager scans and mends it
])
def test_body_traits_are_recorded_with_the_message(
    reactor_thread: Any, any_store: SQLiteQueueStore, body: bytes, traits: BodyTraits | None
) -> None:
    def run() -> Deferred[str]:
        msg = any_store.incoming()
        for start in range(0, len(body), 7):  # CRLFs split between writes too
            msg.write(body[start:start + 7])
        return msg.commit(ENVELOPE).addCallback(lambda _: msg.queue_id)

    queue_id = reactor_thread.run(run)
    stored = reactor_thread.run(any_store.get_message, queue_id)
    assert stored is not None and stored.traits == traits
    [due] = reactor_thread.run(any_store.claim_due, time.time() + 1, 10, 60.0)
    assert due.message.traits == traits


def test_messages_survive_reopening(reactor_thread: Any, tmp_path: Path) -> None:
    first = SQLiteQueueStore(tmp_path)
    reactor_thread.run(first.open)
    ids = [reactor_thread.run(receive, first, body_for(n)) for n in range(3)]
    reactor_thread.run(first.close)
    with pytest.raises(QueueStateError):
        first.incoming()

    second = SQLiteQueueStore(tmp_path)
    reactor_thread.run(second.open)
    try:
        listed = reactor_thread.run(second.list_messages)
        assert [m.queue_id for m in listed] == ids  # oldest first
    finally:
        reactor_thread.run(second.close)


def test_refuses_a_schema_from_a_newer_version(reactor_thread: Any, tmp_path: Path) -> None:
    (tmp_path / "queue").mkdir()
    with sqlite3.connect(tmp_path / "queue" / "queue.db") as db:
        db.execute(f"PRAGMA user_version = {len(schema.MIGRATIONS) + 1}")
    with pytest.raises(schema.SchemaTooNewError):
        reactor_thread.run(SQLiteQueueStore(tmp_path).open)


def test_abort_removes_the_body(reactor_thread: Any, any_store: SQLiteQueueStore) -> None:
    store = any_store

    def start_and_abort() -> str:
        msg = store.incoming()
        msg.write(b"partial")
        assert os.path.exists(store.body_path(msg.queue_id))
        msg.abort()
        return msg.queue_id

    queue_id = reactor_thread.run(start_and_abort)
    assert not os.path.exists(store.body_path(queue_id))
    assert reactor_thread.run(store.list_messages) == []


# -- group commit and the reactor ---------------------------------------------------------

def test_concurrent_commits_share_transactions(
    reactor_thread: Any, any_store: SQLiteQueueStore
) -> None:
    store = any_store
    n = 50
    ids = reactor_thread.run(lambda: gatherResults([receive(store, body_for(i)) for i in range(n)]))
    assert len(set(ids)) == n
    assert store.stats.commits == n
    assert store.stats.batches < n
    assert {m.queue_id for m in reactor_thread.run(store.list_messages)} == set(ids)


def test_fsync_and_sqlite_never_block_the_reactor(
    reactor_thread: Any, store: SQLiteQueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reactor_ident = reactor_thread.run(threading.get_ident)
    fsync_threads: list[int] = []

    def slow(real: Callable[[int], None]) -> Callable[[int], None]:
        def slow_sync(fd: int) -> None:
            fsync_threads.append(threading.get_ident())
            time.sleep(0.1)  # a slow disk
            real(fd)
        return slow_sync

    # Bodies are fdatasync'd, the directory and database fsync'd.
    monkeypatch.setattr(os, "fsync", slow(os.fsync))
    monkeypatch.setattr(os, "fdatasync", slow(os.fdatasync))
    ticks: list[float] = []
    loop = LoopingCall(lambda: ticks.append(time.monotonic()))

    def start_loop() -> None:
        loop.start(0.01)

    reactor_thread.run(start_loop)
    try:
        for round_ in range(2):
            reactor_thread.run(
                lambda r=round_: gatherResults([receive(store, body_for(r * 10 + i))
                                                for i in range(5)])
            )
    finally:
        reactor_thread.run(loop.stop)
    assert fsync_threads and reactor_ident not in fsync_threads
    # One fsync per body plus one directory fsync per batch, not per message.
    assert store.stats.batches < 10
    assert len(fsync_threads) == 10 + store.stats.batches
    # Each slow flush sleeps 0.1 s; the reactor must keep ticking through them.
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert len(ticks) > 50
    assert max(gaps) < 0.25


# -- failures -----------------------------------------------------------------------------

def test_a_rejected_row_fails_only_that_message(
    reactor_thread: Any, store: SQLiteQueueStore
) -> None:
    with sqlite3.connect(store.db_path) as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.sender = 'bad@x'"
                   " BEGIN SELECT RAISE(ABORT, 'refused'); END")
    bad = Envelope(sender="bad@x", recipients=(RecipientRequest("bob@example.com"),))

    def three() -> Deferred[list[tuple[str, Any]]]:
        msgs = [store.incoming() for _ in range(3)]
        results = []
        for msg, envelope in zip(msgs, [ENVELOPE, bad, ENVELOPE], strict=True):
            msg.write(b"body\r\n")
            results.append(msg.commit(envelope).addCallbacks(lambda _: None, lambda f: f.value))
        return gatherResults(results).addCallback(
            lambda outcomes: list(zip([m.queue_id for m in msgs], outcomes, strict=True)))

    first, failed, third = reactor_thread.run(three)
    assert isinstance(failed[1], TemporaryFailure) and failed[1].code == 451
    assert first[1] is None and third[1] is None
    assert not os.path.exists(store.body_path(failed[0]))
    assert {m.queue_id for m in reactor_thread.run(store.list_messages)} == {
        first[0], third[0]}


def test_database_failure_is_temporary_and_store_stays_usable(
    reactor_thread: Any, store: SQLiteQueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as patch:
        patch.setattr(store, "_insert", disk_full)
        msg = reactor_thread.run(store.incoming)
        reactor_thread.run(msg.write, b"body\r\n")
        with pytest.raises(TemporaryFailure):
            reactor_thread.run(msg.commit, ENVELOPE)
    assert not os.path.exists(store.body_path(msg.queue_id))
    assert store.stats.failures == 1

    queue_id = reactor_thread.run(receive, store, b"next\r\n")
    assert reactor_thread.run(store.get_message, queue_id) is not None


class _FullDisk:
    """A body file on a disk that has just filled up."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def write(self, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        self.real.close()


def test_write_error_surfaces_at_commit(reactor_thread: Any, store: SQLiteQueueStore) -> None:
    msg = reactor_thread.run(store.incoming)
    msg._file = _FullDisk(msg._file)
    reactor_thread.run(msg.write, b"a" * 100)  # must not raise mid-DATA
    with pytest.raises(TemporaryFailure):
        reactor_thread.run(msg.commit, ENVELOPE)
    assert not os.path.exists(store.body_path(msg.queue_id))


def test_body_swept_before_commit_is_not_acknowledged(
    reactor_thread: Any, store: SQLiteQueueStore
) -> None:
    msg = reactor_thread.run(store.incoming)
    reactor_thread.run(msg.write, b"body\r\n")
    os.unlink(store.body_path(msg.queue_id))  # as another process's orphan sweep would
    with pytest.raises(TemporaryFailure):
        reactor_thread.run(msg.commit, ENVELOPE)
    assert reactor_thread.run(store.get_message, msg.queue_id) is None


def test_lock_held_briefly_is_waited_out(reactor_thread: Any, tmp_path: Path) -> None:
    store = SQLiteQueueStore(tmp_path, busy_timeout=0.05)
    reactor_thread.run(store.open)
    other = sqlite3.connect(store.db_path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, other.execute, ["COMMIT"]).start()
        queue_id = reactor_thread.run(receive, store, b"body\r\n")  # longer than busy_timeout
        assert reactor_thread.run(store.get_message, queue_id) is not None

        other.execute("BEGIN IMMEDIATE")  # now held until the store gives up
        msg = reactor_thread.run(store.incoming)
        with pytest.raises(TemporaryFailure):
            reactor_thread.run(msg.commit, ENVELOPE)
        other.execute("COMMIT")
        assert not os.path.exists(store.body_path(msg.queue_id))
        reactor_thread.run(receive, store, b"after\r\n")
    finally:
        other.close()
        reactor_thread.run(store.close)


def test_collect_orphans_removes_only_old_unqueued_bodies(
    reactor_thread: Any, store: SQLiteQueueStore
) -> None:
    rng = random.Random(1)
    old = time.time() - 3600

    def body_file(age: float | None) -> Path:
        path = Path(store.body_path(new_queue_id(time.time(), rng)))
        path.write_bytes(b"left over by a crash")
        if age is not None:
            os.utime(path, (age, age))
        return path

    orphan, fresh = body_file(old), body_file(None)
    queued = Path(store.body_path(reactor_thread.run(receive, store, b"queued\r\n")))
    os.utime(queued, (old, old))
    receiving = reactor_thread.run(store.incoming)
    os.utime(store.body_path(receiving.queue_id), (old, old))

    assert reactor_thread.run(store.collect_orphans, 600) == 1
    assert not orphan.exists()
    assert fresh.exists() and queued.exists() and os.path.exists(
        store.body_path(receiving.queue_id))
    reactor_thread.run(receiving.abort)


# -- several processes --------------------------------------------------------------------

CHILD = r"""
import sys
from pathlib import Path
from twisted.internet import defer, task
from relayhub.queue.sqlite import SQLiteQueueStore
from relayhub.queue.store import Envelope, RecipientRequest

async def main(reactor, state_dir, count, window):
    store = SQLiteQueueStore(Path(state_dir), reactor=reactor)
    await store.open()
    env = Envelope(sender="a@example.org", recipients=(RecipientRequest("b@example.com"),))

    def one():
        msg = store.incoming()
        msg.write(b"Subject: " + msg.queue_id.encode() + b"\r\n\r\nbody\r\n")
        return msg.commit(env).addCallback(lambda _: print(msg.queue_id, flush=True))

    for _ in range(0, count, window):
        await defer.gatherResults([one() for _ in range(window)], consumeErrors=True)
    await store.close()

task.react(lambda r, *a: defer.ensureDeferred(main(r, *a)),
           [sys.argv[1], int(sys.argv[2]), int(sys.argv[3])])
"""


def spawn_child(state_dir: Path, count: int, window: int) -> subprocess.Popen[str]:
    # The repository first on the path: a strict editable install only links files that
    # existed when it was made.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state_dir), str(count), str(window)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def test_four_processes_commit_into_one_queue(reactor_thread: Any, tmp_path: Path) -> None:
    children = [spawn_child(tmp_path, 200, 10) for _ in range(4)]
    printed: list[str] = []
    for child in children:
        out, err = child.communicate(timeout=240)
        assert child.returncode == 0, err
        assert err == ""
        printed += out.split()
    assert len(printed) == len(set(printed)) == 800

    store = SQLiteQueueStore(tmp_path)
    reactor_thread.run(store.open)
    try:
        listed = reactor_thread.run(store.list_messages)
    finally:
        reactor_thread.run(store.close)
    assert {m.queue_id for m in listed} == set(printed)


def test_kill_9_after_commit_loses_nothing(reactor_thread: Any, tmp_path: Path) -> None:
    child = spawn_child(tmp_path, 10_000, 1)
    assert child.stdout is not None
    acknowledged = [child.stdout.readline().strip() for _ in range(30)]
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    child.communicate()

    store = SQLiteQueueStore(tmp_path)
    reactor_thread.run(store.open)
    try:
        for queue_id in acknowledged:
            assert reactor_thread.run(store.get_message, queue_id) is not None, queue_id
            assert Path(store.body_path(queue_id)).read_bytes() == (
                b"Subject: " + queue_id.encode() + b"\r\n\r\nbody\r\n")
    finally:
        reactor_thread.run(store.close)
