"""The SQLite queue backend: body files and a WAL database, group-committed on one thread."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relayhub.errors import TemporaryFailure
from relayhub.mime import BodyTraits
from relayhub.queue import scheduling, schema, spool
from relayhub.queue.ids import is_queue_id, new_queue_id
from relayhub.queue.incoming import QueueStateError, SpooledIncoming
from relayhub.queue.space import storage_failure
from relayhub.queue.store import (
    Changed,
    DueWork,
    Envelope,
    HistoryEntry,
    IncomingMessage,
    MessageFilter,
    QueueStore,
    QueueSummary,
    RecipientRequest,
    RecipientStatus,
    RecipientUpdate,
    Recorded,
    Selection,
    StoredMessage,
    StoredRecipient,
    domain_of,
    traits_columns,
    traits_from_columns,
)

T = TypeVar("T")

# How long a writer waits between tries for the write lock: at first, and at most. SQLite's
# own busy handler sleeps 1, 2, 5, 10, ... then 100 ms between tries; with three processes
# taking turns at the lock for about a millisecond each, a waiter slept through many turns,
# and those sleeps made most of the 99th percentile of accept latency. So SQLite is asked
# not to wait at all, and `_retry_busy` tries again within a few milliseconds.
LOCK_WAIT_FIRST = 0.0005
LOCK_WAIT_MAX = 0.004
# A lock held longer than busy_timeout is logged; this many times longer fails the call.
LOCK_PATIENCE = 8
BODY_SYNC_THREADS = 4
# Bodies from this size on join a batch only once flushed (a small one joins at once and
# its batch waits for the flush: a reply hop through the reactor cost it more than it saved).
PARALLEL_SYNC_MIN = 64 * 1024
ID_ATTEMPTS = 10

MESSAGE_COLUMNS = (
    "id, arrival, sender, size, subject, held, body_type, smtputf8, ret, envid,"
    " client_name, client_address, helo, protocol, auth_user, eight_bit, longest_line"
)
RECIPIENT_COLUMNS = (
    "message_id, idx, address, orcpt, notify, status, attempts, next_attempt, last_error,"
    " delay_warned, sender, give_up"
)
_PENDING = (RecipientStatus.QUEUED.value, RecipientStatus.DEFERRED.value)

# Errors that concern one message of a batch (bad data, a body file that vanished); anything
# else (disk full, I/O error) fails the whole batch.
PER_MESSAGE_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
    ValueError,
    OSError,
)


class BodyReplacedError(OSError):
    """The body file was removed or replaced before its row was committed."""


@dataclass
class QueueStats:
    """Counters, updated on the reactor thread."""

    commits: int = 0  # messages durably queued
    batches: int = 0  # SQLite transactions (and directory fsyncs) that committed them
    failures: int = 0  # commits answered with TemporaryFailure
    record_batches: int = 0  # transactions that wrote attempt results


@dataclass(frozen=True)
class _Job:
    """What the worker thread needs to make one message durable."""

    queue_id: str
    path: Path
    file: BinaryIO
    arrival: float
    size: int
    envelope: Envelope
    subject: str
    traits: BodyTraits | None
    # (st_dev, st_ino) once the body is fsync'd and closed; None if that failed.
    identity: spool.FileIdentity | None = None
    # SpooledIncoming.body_parts: still to write at its end, and to put in front.
    rest: bytes = b""
    front: bytes = b""
    # A small body being completed and fsync'd on a flusher thread (see _sync_then_enqueue).
    flushed: Future[spool.FileIdentity] | None = None


@dataclass(frozen=True)
class _Pending:
    job: _Job
    done: Deferred[None]


class _SQLiteIncoming(SpooledIncoming):
    def __init__(
        self, store: SQLiteQueueStore, queue_id: str, path: Path, file: BinaryIO, arrival: float
    ) -> None:
        super().__init__(queue_id, path, file, arrival, store._live_ids.discard)
        self._store = store

    def commit(self, envelope: Envelope, subject: str = "") -> Deferred[None]:
        self._finish("commit")
        if self._error is not None:
            self._store.log.error(
                "{queue_id}: cannot write body: {error}", queue_id=self.queue_id, error=self._error
            )
            self._discard()
            self._store.stats.failures += 1
            return fail(storage_failure(self._error))
        rest, front = self.body_parts()
        job = _Job(self.queue_id, self._path, self._file, self._arrival, self._size, envelope,
                   subject, self.traits(), rest=rest, front=front)
        return self._store._sync_then_enqueue(job)


class SQLiteQueueStore(QueueStore):
    """The queue under `<state_dir>/queue/`: `queue.db` (WAL) and `bodies/<queue id>`.

    Every SQLite call and fsync runs on this store's single worker thread, which also owns
    the connection. Several processes may each open their own store on one state_dir.
    """

    log = Logger()

    def __init__(self, state_dir: Path, *, busy_timeout: float = 30.0, reactor: Any = None,
                 close_on_shutdown: bool = True) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.directory = Path(state_dir) / "queue"
        self.db_path = self.directory / "queue.db"
        self.bodies = self.directory / "bodies"
        self._bodies_prefix = f"{self.bodies}{os.sep}"
        self.stats = QueueStats()
        self._reactor = reactor
        self._busy_timeout = busy_timeout
        self._pool = ThreadPool(1, 1, name=f"relayhub-queue:{self.directory}")
        # Body fsyncs run here, several at once and as soon as each DATA ends, rather than
        # one after another on the database thread: a disk absorbs parallel flushes far
        # better, and the next batch's bodies are durable while this batch commits. A small
        # body's batch waits for its flush on the database thread; a large one joins a batch
        # only once flushed (see _sync_then_enqueue). Made by open().
        self._flushers: ThreadPoolExecutor | None = None
        self._syncing = 0  # large bodies being fsync'd, not yet handed to a batch
        # SystemRandom: a forked process must not repeat its parent's ID suffixes.
        self._rng = random.SystemRandom()
        self._ready = False
        # A service that closes the store itself, after its users, turns this off.
        self._close_on_shutdown = close_on_shutdown
        self._shutdown_trigger: Any = None
        self._live_ids: set[str] = set()  # bodies being received here (orphan sweep skips them)
        self._pending: list[_Pending] = []
        # Attempt results waiting for the next record batch, and whether one is being written.
        self._records: list[tuple[str, Sequence[RecipientUpdate], float,
                                  Deferred[Recorded]]] = []
        self._recording = False
        # Calls waiting for the database thread, and whether a run of them is under way
        # (see _call).
        self._calls: deque[tuple[Callable[[], Any], Deferred[Any]]] = deque()
        self._draining = False
        self._writing = False
        self._idle_waiters: list[Deferred[None]] = []
        # Worker-thread only:
        self._conn: sqlite3.Connection | None = None
        self._dir_fd = -1

    # -- life cycle -------------------------------------------------------------------------

    def open(self) -> Deferred[None]:
        if self._pool.started:
            return fail(QueueStateError("queue store already open"))
        self._pool.start()
        self._flushers = ThreadPoolExecutor(BODY_SYNC_THREADS,
                                            thread_name_prefix="relayhub-queue-flush")

        def opened(_: None) -> None:
            self._ready = True
            if self._close_on_shutdown:
                self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                    "before", "shutdown", self._on_shutdown
                )

        def failed(reason: Failure) -> Failure:
            self._stop_threads()
            return reason

        d = deferToThreadPool(self._reactor, self._pool, self._open_sync)
        d.addCallbacks(opened, failed)
        return d

    def close(self) -> Deferred[None]:
        if not self._ready:
            if self._pool.started:
                # Closed while still opening (the process is stopping early): the worker
                # thread must go too, or it keeps the process alive after the reactor.
                self._stop_threads()
            return succeed(None)
        self._ready = False
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        idle: Deferred[None] = Deferred()
        if self._writing or self._syncing or self._draining:
            self._idle_waiters.append(idle)
        else:
            idle.callback(None)

        def release(_: None) -> Deferred[None]:
            return deferToThreadPool(self._reactor, self._pool, self._close_sync)

        def stop_pool(result: object) -> object:
            self._stop_threads()  # idle by now: every flush was waited for by its batch
            return result

        idle.addCallback(release)
        idle.addBoth(stop_pool)
        return idle

    def _stop_threads(self) -> None:
        self._pool.stop()
        if self._flushers is not None:
            self._flushers.shutdown(wait=False)
            self._flushers = None

    def _on_shutdown(self) -> Deferred[None]:
        self._shutdown_trigger = None
        return self.close()

    def _open_sync(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.bodies.mkdir(mode=0o700, exist_ok=True)
        self._conn = self._retry_busy(lambda: schema.connect(self.db_path, 0.0))
        try:
            self._retry_busy(lambda: schema.migrate(self._db))
            # Per-batch fsyncs cover entries in bodies/, not bodies/ and queue.db themselves.
            for directory in (self.directory.parent, self.directory):
                spool.fsync_directory(directory)
            self._dir_fd = spool.open_directory(self.bodies)
        except BaseException:
            self._close_sync()
            raise

    def _close_sync(self) -> None:
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise QueueStateError("queue store is not open")
        return self._conn

    # -- receiving ------------------------------------------------------------------------

    def incoming(self) -> IncomingMessage:
        """Allocate an ID and create its body file; raises TemporaryFailure if impossible."""
        if not self._ready:
            raise QueueStateError("queue store is not open")
        for _ in range(ID_ATTEMPTS):
            arrival = time.time()
            queue_id = new_queue_id(arrival, self._rng)
            path = self.bodies / queue_id
            try:
                file = spool.create_exclusive(path)
            except FileExistsError:
                continue
            except OSError as exc:
                self.log.error("cannot create {path}: {error}", path=path, error=exc)
                raise storage_failure(exc) from exc
            self._live_ids.add(queue_id)
            return _SQLiteIncoming(self, queue_id, path, file, arrival)
        raise TemporaryFailure()

    def _sync_then_enqueue(self, job: _Job) -> Deferred[None]:
        """fsync and close the body on a flusher thread, and join the next database batch:
        a small body at once (its batch waits for the flush), a large one once flushed."""
        if not self._ready or self._flushers is None:
            return self._enqueue(job)
        if job.size < PARALLEL_SYNC_MIN:
            return self._enqueue(replace(job, flushed=self._flushers.submit(_flushed, job)))
        self._syncing += 1
        synced: Deferred[_Job] = Deferred()
        self._flushers.submit(_prepared, job).add_done_callback(
            lambda done: self._reactor.callFromThread(_settle, synced, done))

        def enqueue(result: _Job | Failure) -> Deferred[None]:
            self._syncing -= 1
            # Enqueued even if close() began meanwhile: it waits for this batch, as it does
            # for commits that were already pending when it was called.
            if isinstance(result, Failure):
                return self._enqueue(job, sync_error=result.value, closing=True)
            return self._enqueue(result, closing=True)

        return synced.addBoth(enqueue)

    def _enqueue(self, job: _Job, sync_error: BaseException | None = None,
                 closing: bool = False) -> Deferred[None]:
        if not self._ready and not closing:
            spool.close_quietly(job.file)
            spool.remove(job.path)
            self._live_ids.discard(job.queue_id)
            self.stats.failures += 1
            return fail(TemporaryFailure())
        done: Deferred[None] = Deferred()
        if sync_error is not None:
            spool.close_quietly(job.file)
            spool.remove(job.path)
            self._live_ids.discard(job.queue_id)
            self.stats.failures += 1
            self.log.error("{queue_id}: cannot queue message: {error}",
                           queue_id=job.queue_id, error=sync_error)
            self._notify_idle()
            return fail(TemporaryFailure())
        self._pending.append(_Pending(job, done))
        if not self._writing:
            self._start_batch()
        return done

    def _start_batch(self) -> None:
        batch, self._pending = self._pending, []
        self._writing = True
        d = deferToThreadPool(
            self._reactor, self._pool, self._write_batch, [p.job for p in batch]
        )
        d.addBoth(self._batch_done, batch)

    def _batch_done(
        self, result: tuple[list[Exception | None], bool] | Failure, batch: list[_Pending]
    ) -> None:
        if isinstance(result, Failure):
            # Only a bug gets here; nothing of this batch can be trusted to be queued.
            self.log.failure("queue batch failed", result)
            errors: list[Exception | None] = [TemporaryFailure()] * len(batch)
            for p in batch:
                spool.close_quietly(p.job.file)
                spool.remove(p.job.path)
            transacted = False
        else:
            errors, transacted = result
        self._writing = False
        # Start the next batch before firing callbacks, so commits made from those
        # callbacks queue behind it instead of going one by one.
        if self._pending:
            self._start_batch()
        self.stats.batches += int(transacted)
        for p, error in zip(batch, errors, strict=True):
            self._live_ids.discard(p.job.queue_id)
            if error is None:
                self.stats.commits += 1
                p.done.callback(None)
            else:
                self.stats.failures += 1
                self.log.error(
                    "{queue_id}: cannot queue message: {error}",
                    queue_id=p.job.queue_id, error=error,
                )
                p.done.errback(storage_failure(error))
        self._notify_idle()

    def _notify_idle(self) -> None:
        if not self._writing and not self._syncing and not self._draining:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _write_batch(self, jobs: list[_Job]) -> tuple[list[Exception | None], bool]:
        """Worker thread: fsync each body, the directory once, then one transaction."""
        errors: list[Exception | None] = [None] * len(jobs)
        identities: dict[int, spool.FileIdentity] = {}
        for i, job in enumerate(jobs):
            try:
                # Flushed on a flusher thread: being (small) or already (large); a
                # job enqueued while the store was closing is flushed here.
                if job.flushed is not None:
                    identities[i] = job.flushed.result()
                elif job.identity is None:
                    identities[i] = _flushed(job)
                else:
                    identities[i] = job.identity
            except OSError as exc:
                errors[i] = exc
        transacted = False
        if identities:
            try:
                os.fsync(self._dir_fd)
                rejected = self._retry_busy(lambda: self._insert(jobs, identities))
                transacted = True
                for i, reason in rejected.items():
                    errors[i] = reason
            except (OSError, sqlite3.Error) as exc:
                for i in identities:
                    errors[i] = exc
        for job, failed in zip(jobs, errors, strict=True):
            if failed is not None:
                spool.remove(job.path)
        return errors, transacted

    def _insert(
        self, jobs: list[_Job], identities: dict[int, spool.FileIdentity]
    ) -> dict[int, Exception]:
        db = self._db
        rejected: dict[int, Exception] = {}
        db.execute("BEGIN IMMEDIATE")
        try:
            for i, identity in identities.items():
                job = jobs[i]
                db.execute("SAVEPOINT message")
                try:
                    # Checked under the write lock that collect_orphans also takes, so a
                    # body swept by another process is noticed here rather than lost.
                    if not spool.is_same_file(job.path, identity):
                        raise BodyReplacedError(f"{job.path} vanished before commit")
                    self._insert_one(db, job)
                except PER_MESSAGE_ERRORS as exc:
                    db.execute("ROLLBACK TO message")
                    rejected[i] = exc
                db.execute("RELEASE message")
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return rejected

    @staticmethod
    def _insert_one(db: sqlite3.Connection, job: _Job) -> None:
        env = job.envelope
        db.execute(
            f"INSERT INTO messages ({MESSAGE_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.queue_id, job.arrival, env.sender, job.size, job.subject, env.body_type,
             env.smtputf8, env.ret, env.envid, env.client_name, env.client_address, env.helo,
             env.protocol, env.auth_user, *traits_columns(job.traits)),
        )
        db.executemany(
            f"INSERT INTO recipients ({RECIPIENT_COLUMNS}, domain)"
            " VALUES (?, ?, ?, ?, ?, ?, 0, ?, NULL, 0, ?, 0, ?)",
            [
                (job.queue_id, idx, r.address, r.orcpt, ",".join(r.notify),
                 RecipientStatus.QUEUED.value, job.arrival, r.sender, domain_of(r.address))
                for idx, r in enumerate(env.recipients)
            ],
        )

    def _rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                self.log.warn("rollback failed: {error}", error=exc)

    def _retry_busy(self, fn: Callable[[], T]) -> T:
        """Run `fn`, trying again while SQLite reports the database locked by another
        process (a write transaction starts with BEGIN IMMEDIATE, so that is before any
        work), for up to LOCK_PATIENCE times busy_timeout."""
        started = time.monotonic()
        delay, warned = LOCK_WAIT_FIRST, False
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                waited = time.monotonic() - started
                if not schema.is_busy(exc) or waited >= self._busy_timeout * LOCK_PATIENCE:
                    raise
                self._rollback()
                if not warned and waited >= self._busy_timeout:
                    warned = True
                    self.log.warn("queue database busy, retrying: {error}", error=exc)
                time.sleep(delay * (0.5 + self._rng.random()))
                delay = min(delay * 2, LOCK_WAIT_MAX)

    # -- maintenance ----------------------------------------------------------------------

    def collect_orphans(self, older_than: float) -> Deferred[int]:
        """Remove body files that have no message row and were last written more than
        `older_than` seconds ago; fires with how many were removed.

        Choose `older_than` above the SMTP timeout: a body still being received by another
        process is recognised only by its recent mtime.
        """
        return self._call(self._collect_sync, older_than, frozenset(self._live_ids))

    def _collect_sync(self, older_than: float, live: frozenset[str]) -> int:
        candidates = [q for q in spool.stale_bodies(self.bodies, older_than) if q not in live]
        if not candidates:
            return 0
        db = self._db
        # The write lock orders this sweep against commits (see _insert).
        db.execute("BEGIN IMMEDIATE")
        try:
            queued = {row[0] for row in db.execute("SELECT id FROM messages")}
            orphans = [q for q in candidates if q not in queued]
            for queue_id in orphans:
                spool.remove(self.bodies / queue_id)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        if orphans:
            self.log.info("removed {count} orphan body files", count=len(orphans))
        return len(orphans)

    # -- reading --------------------------------------------------------------------------

    def get_message(self, queue_id: str) -> Deferred[StoredMessage | None]:
        if not is_queue_id(queue_id):
            return succeed(None)

        def one() -> StoredMessage | None:
            found = self._load(queue_id)
            return found[0] if found else None

        return self._call(one)

    def list_messages(self, only: MessageFilter | None = None
                      ) -> Deferred[Sequence[StoredMessage]]:
        if only is None:
            return self._call(self._load, None)
        conditions, args = [], {}
        if only.held:
            conditions.append("held = 1")
        if only.deferred:
            conditions.append("held = 0 AND id IN (SELECT message_id FROM recipients"
                              " WHERE status = 'deferred')")
        if only.domain is not None:
            conditions.append(f"id IN (SELECT message_id FROM recipients WHERE domain = :domain"
                              f" AND status IN {_PENDING})")
            args["domain"] = only.domain
        where = " AND ".join(conditions) or "1"
        return self._call(self._load_where, where, args)

    def body_path(self, queue_id: str) -> str:
        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue ID: {queue_id!r}")
        return self._bodies_prefix + queue_id  # called per message: no Path objects

    def _load(self, queue_id: str | None) -> list[StoredMessage]:
        if queue_id:
            return self._load_where("id = :id", {"id": queue_id})
        return self._load_where("1", {})

    def _load_where(self, where: str, args: dict[str, Any]) -> list[StoredMessage]:
        """The messages satisfying `where` (SQL over messages' columns) with recipients."""
        db = self._db
        db.execute("BEGIN")  # one snapshot for both queries
        try:
            messages = db.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE {where} ORDER BY arrival, id", args
            ).fetchall()
            recipients = db.execute(
                f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE message_id IN"
                f" (SELECT id FROM messages WHERE {where}) ORDER BY message_id, idx",
                args,
            ).fetchall()
        finally:
            self._rollback()
        by_message: dict[str, list[StoredRecipient]] = {}
        for (mid, idx, address, orcpt, notify, status, attempts, next_attempt, last_error,
             delay_warned, sender, give_up) in recipients:
            by_message.setdefault(mid, []).append(StoredRecipient(
                index=idx, address=address, orcpt=orcpt,
                notify=tuple(notify.split(",")) if notify else (),
                status=RecipientStatus(status), attempts=attempts,
                next_attempt=next_attempt, last_error=last_error,
                delay_warned=bool(delay_warned), sender=sender, give_up=bool(give_up),
            ))
        return [self._message(row, tuple(by_message.get(row[0], ()))) for row in messages]

    @staticmethod
    def _message(row: tuple[Any, ...], recipients: tuple[StoredRecipient, ...]) -> StoredMessage:
        (queue_id, arrival, sender, size, subject, held, body_type, smtputf8, ret, envid,
         client_name, client_address, helo, protocol, auth_user, eight_bit, longest_line) = row
        envelope = Envelope(
            sender=sender,
            recipients=tuple(RecipientRequest(r.address, r.orcpt, r.notify, r.sender)
                             for r in recipients),
            body_type=body_type, smtputf8=bool(smtputf8), ret=ret, envid=envid,
            client_name=client_name, client_address=client_address, helo=helo,
            protocol=protocol, auth_user=auth_user,
        )
        return StoredMessage(queue_id=queue_id, envelope=envelope, arrival=arrival, size=size,
                             subject=subject, held=bool(held), recipients=recipients,
                             traits=traits_from_columns(eight_bit, longest_line))

    # -- for the queue manager ------------------------------------------------------------

    def claim_due(self, now: float, limit: int, lease: float) -> Deferred[list[DueWork]]:
        def claim() -> list[DueWork]:
            claimed = scheduling.claim_due(self._db, now, limit, lease)
            if not claimed:
                return []
            # Every claimed message in one read, not one transaction per message.
            loaded = {message.queue_id: message for message in self._load_where(
                "id IN (SELECT value FROM json_each(:ids))", {"ids": json.dumps(list(claimed))})}
            work = []
            for queue_id, indexes in claimed.items():
                if (message := loaded.get(queue_id)) is not None:  # not deleted meanwhile
                    leased = tuple(r for r in message.recipients if r.index in indexes)
                    work.append(DueWork(message, leased))
            return work

        return self._call(claim)

    def release_leases(self) -> Deferred[int]:
        return self._call(lambda: scheduling.release_leases(self._db))

    def next_due(self, now: float) -> Deferred[float | None]:
        return self._call(lambda: scheduling.next_due(self._db, now))

    def confirm_leased(self, work: Sequence[tuple[str, Sequence[int]]], now: float
                       ) -> Deferred[set[tuple[str, int]]]:
        pairs = [(queue_id, index) for queue_id, indexes in work for index in indexes]
        return self._call(lambda: scheduling.confirm_leased(self._db, pairs, now))

    def record_attempts(
        self, queue_id: str, updates: Sequence[RecipientUpdate], now: float
    ) -> Deferred[Recorded]:
        """Results that arrive while a batch is being written go together in the next one
        (one transaction, one fsync), as commits of new mail do."""
        done: Deferred[Recorded] = Deferred()
        self._records.append((queue_id, updates, now, done))
        if not self._recording:
            self._write_records()
        return done

    def _write_records(self) -> None:
        batch, self._records = self._records, []
        self._recording = True

        self.stats.record_batches += 1

        def write() -> list[Recorded]:
            return scheduling.record_attempts(
                self._db, [(queue_id, updates, now) for queue_id, updates, now, _ in batch])

        def written(result: list[Recorded] | Failure) -> None:
            self._recording = False
            if not isinstance(result, Failure):
                # After the commit (a crash in between leaves an orphan, not a lost row).
                self._remove_bodies([queue_id for (queue_id, *_), outcome
                                     in zip(batch, result, strict=True)
                                     if outcome is Recorded.REMOVED])
            if self._records:
                self._write_records()
            for (*_, done), outcome in zip(batch, _each(result, len(batch)), strict=True):
                if isinstance(outcome, Failure):
                    done.errback(outcome)
                else:
                    done.callback(outcome)

        self._call(write).addBoth(written)

    def _remove_bodies(self, queue_ids: list[str]) -> None:
        if not queue_ids:
            return

        def remove() -> None:
            for queue_id in queue_ids:
                spool.remove(self._bodies_prefix + queue_id)

        # On the database thread, in its next run with the calls waiting by then: a thread
        # of its own would be one more wake-up per batch, which costs more CPU than the
        # unlinks themselves.
        self._call(remove).addErrback(
            lambda failure: self.log.failure("cannot remove delivered bodies", failure))

    # -- for relayhubctl ------------------------------------------------------------------

    def hold(self, selection: Selection) -> Deferred[Changed]:
        return self._call(lambda: scheduling.hold(self._db, _valid(selection)))

    def release(self, selection: Selection, now: float) -> Deferred[Changed]:
        return self._call(lambda: scheduling.release(self._db, _valid(selection), now))

    def flush(self, selection: Selection, now: float) -> Deferred[Changed]:
        return self._call(lambda: scheduling.flush(self._db, _valid(selection), now))

    def delete(self, selection: Selection) -> Deferred[Changed]:
        def delete() -> Changed:
            changed = scheduling.delete(self._db, _valid(selection))
            # After the commit, as in record_attempts: a crash leaves orphans, swept later.
            for queue_id in changed.changed:
                spool.remove(self.bodies / queue_id)
            return changed

        return self._call(delete)

    def bounce(self, queue_ids: Sequence[str], now: float) -> Deferred[Changed]:
        valid = [q for q in queue_ids if is_queue_id(q)]
        return self._call(lambda: scheduling.bounce(self._db, valid, now))

    def pause(self, domain: str, until: float | None) -> Deferred[None]:
        return self._call(lambda: scheduling.pause(self._db, domain, until, time.time()))

    def resume(self, domain: str, now: float) -> Deferred[bool]:
        return self._call(lambda: scheduling.resume(self._db, domain, now))

    def history(self, queue_id: str) -> Deferred[list[HistoryEntry]]:
        return self._call(lambda: scheduling.history(self._db, queue_id))

    def summary(self, now: float) -> Deferred[QueueSummary]:
        return self._call(lambda: scheduling.summary(self._db, now))

    def _call(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run `fn(*args)` on the database thread, after every call made before it.

        Calls made while a run of them is under way go together in the next run: one
        thread hop and one wake-up of the reactor for all of them, not one each (the queue
        manager makes several calls per message, nearly always while another is running).
        """
        # _retry_busy re-runs `fn` whole, so each one must be a complete transaction.
        if not self._ready:
            return fail(QueueStateError("queue store is not open"))
        done: Deferred[T] = Deferred()
        self._calls.append((lambda: fn(*args), done))
        if not self._draining:
            self._drain()
        return done

    def _drain(self) -> None:
        self._draining = True
        # Only the calls made so far: later ones wait for the next run, so that the results
        # of these come back without waiting for calls that keep arriving.
        calls = [self._calls.popleft() for _ in range(len(self._calls))]
        ran = deferToThreadPool(self._reactor, self._pool, self._run_calls,
                                [call for call, _ in calls])
        ran.addBoth(self._drained, [done for _, done in calls])

    def _run_calls(self, calls: list[Callable[[], Any]]) -> list[Any]:
        """Database thread: each call in turn, its result or its Failure."""
        results: list[Any] = []
        for call in calls:
            try:
                results.append(self._retry_busy(call))
            except BaseException:
                results.append(Failure())
        return results

    def _drained(self, results: list[Any] | Failure, waiting: list[Deferred[Any]]) -> None:
        # Calls made by these callbacks join the next run rather than each starting one.
        for done, result in zip(waiting, _each(results, len(waiting)), strict=True):
            if isinstance(result, Failure):
                done.errback(result)
            else:
                done.callback(result)
        if self._calls:
            self._drain()
        else:
            self._draining = False
            self._notify_idle()


def _settle(result: Deferred[T], done: Future[T]) -> None:
    """Reactor thread: fire `result` as the flusher's `done` ended."""
    error = done.exception()
    if error is None:
        result.callback(done.result())
    else:
        result.errback(Failure(error))


def _prepared(job: _Job) -> _Job:
    """Flusher thread: the body completed, fsync'd and closed; the job now knows which
    file it was."""
    return replace(job, identity=_flushed(job), rest=b"", front=b"")


def _flushed(job: _Job) -> spool.FileIdentity:
    """Blocking: the job's body completed, fsync'd and closed; which file it was."""
    spool.complete(job.file, job.rest, job.front)
    return spool.sync_and_close(job.file)


def _valid(selection: Selection) -> Selection:
    """`selection` without strings that cannot be queue IDs (they match nothing anyway; this
    keeps paths such as "../x" away from the bodies directory)."""
    return replace(selection, queue_ids=tuple(q for q in selection.queue_ids if is_queue_id(q)))


def _each(result: Sequence[T] | Failure, count: int) -> list[T | Failure]:
    """A batch's outcomes, one per record: a failed batch fails every record in it."""
    return [result] * count if isinstance(result, Failure) else list(result)
