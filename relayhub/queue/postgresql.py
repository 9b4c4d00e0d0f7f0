"""The PostgreSQL queue backend: envelopes, recipients, history and bodies in one database
that several hubs share, with leases that let any hub deliver any message.

Blocking calls run on a thread pool with a psycopg-pool connection each; new mail and
attempt results are group-committed (what arrives while a batch is written goes into the
next one). Each hub claims due recipients with `FOR UPDATE SKIP LOCKED` and a lease in its
own name; its queue manager renews the leases of attempts still under way, so a lease runs
out only when the hub holding it has died, and then another hub takes the work over.
Bodies are read from the database into a local cache file (`<state_dir>/queue/pg-cache/`)
when a message is claimed, so the couriers read them through `body_path` as with SQLite.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar

import psycopg
import psycopg_pool
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relayhub import maillog
from relayhub.delivery.results import Outcome
from relayhub.errors import TemporaryFailure
from relayhub.mime import BodyTraits
from relayhub.queue import pgschema, spool
from relayhub.queue.ids import is_queue_id, new_queue_id
from relayhub.queue.incoming import QueueStateError, SpooledIncoming
from relayhub.queue.store import (
    Changed,
    DueWork,
    Envelope,
    HistoryEntry,
    HubInfo,
    IncomingMessage,
    MessageFilter,
    PausedDomain,
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
R = TypeVar("R")
Conn = psycopg.Connection[tuple[Any, ...]]

ID_ATTEMPTS = 10
# Connections (and threads) per process: one writes a batch while others read.
POOL_SIZE = 4
# How long a call waits for a connection before it fails (SMTP then answers 451).
CONNECT_TIMEOUT = 5.0
# The channel on which new or newly due mail is announced to every hub's queue manager.
CHANNEL = "relayhub_queue"
# Bodies read per query when copying them into this hub's cache (bounds the memory used).
BODIES_PER_QUERY = 8
# The longest between two heartbeats (and lease renewals) of a hub's queue manager.
HEARTBEAT = 10.0
# How often the listener looks whether it should stop, and waits before reconnecting.
LISTEN_POLL = 1.0

_PENDING = "('queued', 'deferred')"
_STATUS_OF = {
    Outcome.DELIVERED: RecipientStatus.DELIVERED,
    Outcome.DEFERRED: RecipientStatus.DEFERRED,
    Outcome.BOUNCED: RecipientStatus.BOUNCED,
}
MESSAGE_COLUMNS = (
    "id, arrival, sender, size, subject, held, body_type, smtputf8, ret, envid,"
    " client_name, client_address, helo, protocol, auth_user, hub, eight_bit, longest_line"
)
RECIPIENT_COLUMNS = (
    "message_id, idx, address, orcpt, notify, status, attempts, next_attempt, last_error,"
    " delay_warned, sender, give_up"
)
# A pause holds back a domain's recipients, except those given up on (as with SQLite).
_NOT_PAUSED = """
    (r.give_up OR NOT EXISTS (
        SELECT 1 FROM paused p
        WHERE p.domain = r.domain AND (p.until IS NULL OR p.until > %(now)s)))
"""
_CLAIM = f"""
    WITH due AS (
        SELECT r.message_id, r.idx FROM recipients r JOIN messages m ON m.id = r.message_id
        WHERE r.status IN {_PENDING} AND r.next_attempt <= %(now)s AND NOT m.held
          AND (r.lease_until IS NULL OR r.lease_until <= %(now)s) AND {_NOT_PAUSED}
        ORDER BY r.next_attempt, r.message_id, r.idx
        LIMIT %(limit)s
        FOR UPDATE OF r SKIP LOCKED
    )
    UPDATE recipients r SET lease_until = %(until)s, lease_owner = %(hub)s
    FROM due WHERE r.message_id = due.message_id AND r.idx = due.idx
    RETURNING r.message_id, r.idx
"""
_NEXT_DUE = f"""
    SELECT MIN(t) FROM (
        SELECT MIN(COALESCE(r.lease_until, r.next_attempt)) AS t FROM recipients r
        JOIN messages m ON m.id = r.message_id
        WHERE r.status IN {_PENDING} AND NOT m.held AND {_NOT_PAUSED}
        UNION ALL
        SELECT MIN(until) FROM paused WHERE until > %(now)s
    ) s
"""
_LEASED = f"""
    SELECT r.message_id, r.idx,
           NOT m.held AND NOT r.give_up AND r.status IN {_PENDING} AND {_NOT_PAUSED}
           AND r.lease_owner IS NOT DISTINCT FROM %(hub)s AS ok
    FROM unnest(%(ids)s::text[], %(idx)s::int[]) AS j(message_id, idx)
    JOIN recipients r ON r.message_id = j.message_id AND r.idx = j.idx
    JOIN messages m ON m.id = r.message_id
"""


class QueueDatabaseError(RuntimeError):
    """The queue database cannot be opened (unreachable, refused, wrong DSN)."""


class QueueDatabaseUnavailable(TemporaryFailure):
    """The queue database cannot be reached; SMTP answers 451 and deliveries wait."""


# What means "the database is not there" rather than "this statement is wrong".
UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout)


@dataclass
class QueueStats:
    """Counters, updated on the reactor thread (as SQLiteQueueStore.stats)."""

    commits: int = 0
    batches: int = 0
    failures: int = 0
    record_batches: int = 0


@dataclass(frozen=True)
class _Job:
    queue_id: str
    path: Path
    file: BinaryIO
    arrival: float
    size: int
    envelope: Envelope
    subject: str
    traits: BodyTraits | None
    # SpooledIncoming.body_parts: still to write at its end, and to put in front.
    rest: bytes = b""
    front: bytes = b""


class _Batcher(Generic[T, R]):
    """Group commit: items that arrive while a batch is being written go together in the
    next one; `write` turns a batch into one result (or exception) per item."""

    def __init__(self, run: Callable[[Callable[[], list[R | Exception]]], Deferred[Any]],
                 write: Callable[[list[T]], list[R | Exception]],
                 on_batch: Callable[[], None]) -> None:
        self._run = run
        self._write = write
        self._on_batch = on_batch
        self._waiting: list[tuple[T, Deferred[R]]] = []
        self.busy = False
        self._idle: list[Deferred[None]] = []

    def add(self, item: T) -> Deferred[R]:
        done: Deferred[R] = Deferred()
        self._waiting.append((item, done))
        if not self.busy:
            self._start()
        return done

    def idle(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if self.busy:
            self._idle.append(waiter)
        else:
            waiter.callback(None)
        return waiter

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        self.busy = True
        self._on_batch()
        items = [item for item, _ in batch]
        self._run(lambda: self._write(items)).addBoth(self._done, batch)

    def _done(self, result: list[R | Exception] | Failure,
              batch: list[tuple[T, Deferred[R]]]) -> None:
        self.busy = False
        if self._waiting:
            self._start()  # before the callbacks, so that their new items queue behind it
        for index, (_, done) in enumerate(batch):
            outcome = result if isinstance(result, Failure) else result[index]
            if isinstance(outcome, Exception):
                done.errback(Failure(outcome))
            else:
                done.callback(outcome)
        if not self.busy:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)


class _PGIncoming(SpooledIncoming):
    """The body goes to this hub's cache file while DATA arrives; at commit it is read
    back into the database row (and the file stays, as the cache for delivery here)."""

    def __init__(self, store: PostgreSQLQueueStore, queue_id: str, path: Path,
                 file: BinaryIO, arrival: float) -> None:
        super().__init__(queue_id, path, file, arrival, store._live_ids.discard)
        self._store = store

    def commit(self, envelope: Envelope, subject: str = "") -> Deferred[None]:
        self._finish("commit")
        if self._error is not None or not self._store._ready:
            self._discard()
            self._store.stats.failures += 1
            return fail(TemporaryFailure())
        rest, front = self.body_parts()
        job = _Job(self.queue_id, self._path, self._file, self._arrival, self._size, envelope,
                   subject, self.traits(), rest, front)
        return self._store._commits.add(job).addCallbacks(
            self._store._committed, self._store._not_committed, errbackArgs=(job,))


class PostgreSQLQueueStore(QueueStore):
    """The queue in the PostgreSQL database at `dsn`, shared by every hub configured with
    it; `hub` names this hub (its leases, the messages it accepted, its heartbeat)."""

    log = Logger()

    def __init__(self, dsn: str, state_dir: Path, *, hub: str, lease: float = 60.0,
                 reactor: Any = None, close_on_shutdown: bool = True,
                 waiting_open: bool = False) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.dsn = dsn
        self.hub = hub
        self.lease = lease
        self.cache = Path(state_dir) / "queue" / "pg-cache"
        self.stats = QueueStats()
        self._reactor = reactor
        self._threads = ThreadPool(1, POOL_SIZE, name="relayhub-queue:postgresql")
        self._pool: psycopg_pool.ConnectionPool[Conn] | None = None
        self._rng = random.SystemRandom()
        self._ready = False
        self._close_on_shutdown = close_on_shutdown
        self._shutdown_trigger: Any = None
        self._live_ids: set[str] = set()
        self._commits: _Batcher[_Job, None] = _Batcher(
            self._call_raw, self._write_commits, lambda: self._count("batches"))
        self._records: _Batcher[tuple[str, Sequence[RecipientUpdate], float], Recorded] = (
            _Batcher(self._call_raw, self._write_records, lambda: self._count("record_batches")))
        # Leases this hub's queue manager holds right now: renewed until their results are
        # recorded. Reactor thread only.
        self._held: set[tuple[str, int]] = set()
        self._keeper: LoopingCall | None = None
        self._listener: _Listener | None = None
        self._wake: Callable[[], None] | None = None
        self._down = False  # the database was unreachable at the last call (logged once)
        # open() waits for an unreachable database (a daemon's processes) or fails at once
        # (relayhubctl, tests: waiting_open=False).
        self._waiting = waiting_open
        self._closing = threading.Event()

    def _count(self, name: str) -> None:
        setattr(self.stats, name, getattr(self.stats, name) + 1)

    # -- life cycle -------------------------------------------------------------------------

    def open(self) -> Deferred[None]:
        if self._threads.started:
            return fail(QueueStateError("queue store already open"))
        self._threads.start()
        self._pool = psycopg_pool.ConnectionPool(
            self.dsn, min_size=1, max_size=POOL_SIZE, open=False, timeout=CONNECT_TIMEOUT,
            # Connections killed while idle (a database restart) are replaced, not used.
            check=psycopg_pool.ConnectionPool.check_connection,
            # A reconnection backs off ever longer; giving it up soon lets the next call
            # start a fresh one, so a database back after a long outage is found at once.
            reconnect_timeout=CONNECT_TIMEOUT, name="relayhub-queue")
        # The pool would warn on stderr at every failed attempt; the store says it once.
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)

        def open_sync() -> None:
            assert self._pool is not None
            self.cache.mkdir(mode=0o700, parents=True, exist_ok=True)
            said = False
            # The database may be away as the hub starts: wait for it (saying so once)
            # rather than fail, which would only have the master restart us in a loop.
            while True:
                try:
                    with psycopg.connect(self.dsn, connect_timeout=int(CONNECT_TIMEOUT)
                                         ) as conn:
                        pgschema.migrate(conn)
                    break
                except psycopg.OperationalError as exc:
                    if not self._waiting or self._closing.is_set():
                        raise
                    if not said:
                        said = True
                        self.log.error(maillog.QUEUE_DB_DOWN, error=str(exc).strip())
                    self._closing.wait(LISTEN_POLL)
            if said:
                self.log.info(maillog.QUEUE_DB_UP)
            self._pool.open(wait=False)

        def opened(_: None) -> None:
            self._ready = True
            if self._close_on_shutdown:
                self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                    "before", "shutdown", self._on_shutdown)

        def failed(reason: Failure) -> Failure:
            self._stop_threads()
            if reason.check(psycopg.Error):
                return Failure(QueueDatabaseError(
                    f"cannot open the queue database: {reason.getErrorMessage().strip()}"))
            return reason

        d = deferToThreadPool(self._reactor, self._threads, open_sync)
        d.addCallbacks(opened, failed)
        return d

    def close(self) -> Deferred[None]:
        self._closing.set()
        if self._keeper is not None and self._keeper.running:
            self._keeper.stop()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if not self._ready:
            self._stop_threads()
            return succeed(None)
        self._ready = False
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        idle = self._commits.idle()
        idle.addCallback(lambda _: self._records.idle())

        def close_pool(_: object) -> Deferred[None]:
            pool, self._pool = self._pool, None
            if pool is None:
                return succeed(None)
            return deferToThreadPool(self._reactor, self._threads, pool.close, 1.0)

        def stop(result: object) -> object:
            self._stop_threads()
            return result

        return idle.addCallback(close_pool).addBoth(stop)

    def _stop_threads(self) -> None:
        if self._pool is not None:
            # Only while opening failed or was cut short: no connection is in use.
            pool, self._pool = self._pool, None
            pool.close(timeout=0.0)
        if self._threads.started:
            self._threads.stop()

    def _on_shutdown(self) -> Deferred[None]:
        self._shutdown_trigger = None
        return self.close()

    # -- running SQL ----------------------------------------------------------------------

    def _call_raw(self, fn: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._threads, fn).addBoth(self._health)

    def _call(self, fn: Callable[[Conn], T]) -> Deferred[T]:
        """`fn(conn)` on a pool thread, in one transaction committed when it returns."""
        if not self._ready or self._pool is None:
            return fail(QueueStateError("queue store is not open"))
        pool = self._pool

        def run() -> T:
            with pool.connection() as conn:
                return fn(conn)

        return self._call_raw(run)

    def _health(self, result: T | Failure) -> T | Failure:
        """Say once that the database went away, and once that it is back."""
        if isinstance(result, Failure) and result.check(*UNAVAILABLE):
            if not self._down:
                self._down = True
                self.log.error(maillog.QUEUE_DB_DOWN, error=result.getErrorMessage())
            return Failure(QueueDatabaseUnavailable())
        if isinstance(result, Failure) and result.check(QueueDatabaseUnavailable):
            return result
        if self._down and not isinstance(result, Failure):
            self._down = False
            self.log.info(maillog.QUEUE_DB_UP)
        return result

    # -- receiving ------------------------------------------------------------------------

    def incoming(self) -> IncomingMessage:
        if not self._ready:
            raise QueueStateError("queue store is not open")
        for _ in range(ID_ATTEMPTS):
            arrival = time.time()
            queue_id = new_queue_id(arrival, self._rng)
            path = self.cache / queue_id
            try:
                file = spool.create_exclusive(path)
            except FileExistsError:
                continue
            except OSError as exc:
                self.log.error("cannot create {path}: {error}", path=path, error=exc)
                raise TemporaryFailure() from exc
            self._live_ids.add(queue_id)
            return _PGIncoming(self, queue_id, path, file, arrival)
        raise TemporaryFailure()

    def _committed(self, _: None) -> None:
        self.stats.commits += 1

    def _not_committed(self, failure: Failure, job: _Job) -> Failure:
        self._live_ids.discard(job.queue_id)
        spool.remove(job.path)
        self.stats.failures += 1
        if not failure.check(QueueDatabaseUnavailable):
            self.log.error("{queue_id}: cannot queue message: {error}",
                           queue_id=job.queue_id, error=failure.getErrorMessage())
        return Failure(TemporaryFailure())

    def _write_commits(self, jobs: list[_Job]) -> list[Exception | None]:
        """Pool thread: one transaction for the whole batch, each body read back from its
        file just before its insert (one body in memory at a time)."""
        results: list[Exception | None] = [None] * len(jobs)
        written: list[int] = []
        for i, job in enumerate(jobs):
            try:
                with job.file:
                    spool.complete(job.file, job.rest, job.front)
                    job.file.flush()
                written.append(i)
            except OSError as exc:
                results[i] = exc
        if written:
            assert self._pool is not None
            # One transaction (one WAL flush) for the batch; committed when the outer block
            # ends, before any of its sessions is answered.
            with self._pool.connection() as conn, conn.transaction():
                for i in written:
                    try:
                        body = jobs[i].path.read_bytes()
                        with conn.transaction():  # a savepoint: one bad message fails alone
                            self._insert_one(conn, jobs[i], body)
                    except (OSError, psycopg.IntegrityError, psycopg.DataError) as exc:
                        results[i] = exc
                    body = b""
                conn.execute(f"NOTIFY {CHANNEL}")
        for i in written:
            if results[i] is None:
                self._live_ids.discard(jobs[i].queue_id)  # set ops are atomic under the GIL
        return results

    def _insert_one(self, conn: Conn, job: _Job, body: bytes) -> None:
        env = job.envelope
        conn.execute(
            f"INSERT INTO messages ({MESSAGE_COLUMNS})"
            " VALUES (%s, %s, %s, %s, %s, FALSE, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (job.queue_id, job.arrival, env.sender, job.size, job.subject, env.body_type,
             env.smtputf8, env.ret, env.envid, env.client_name, env.client_address, env.helo,
             env.protocol, env.auth_user, self.hub, *traits_columns(job.traits)))
        conn.execute("INSERT INTO bodies (message_id, data) VALUES (%s, %s)",
                     (job.queue_id, body))
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO recipients ({RECIPIENT_COLUMNS}, domain)"
                " VALUES (%s, %s, %s, %s, %s, 'queued', 0, %s, NULL, FALSE, %s, FALSE, %s)",
                [(job.queue_id, idx, r.address, r.orcpt, ",".join(r.notify), job.arrival,
                  r.sender, domain_of(r.address)) for idx, r in enumerate(env.recipients)])

    # -- reading --------------------------------------------------------------------------

    def get_message(self, queue_id: str) -> Deferred[StoredMessage | None]:
        if not is_queue_id(queue_id):
            return succeed(None)

        def one(conn: Conn) -> StoredMessage | None:
            found = _load(conn, "id = %(id)s", {"id": queue_id})
            return found[0] if found else None

        return self._call(one)

    def list_messages(self, only: MessageFilter | None = None
                      ) -> Deferred[Sequence[StoredMessage]]:
        conditions, args = ["TRUE"], dict[str, Any]()
        if only is not None and only.held:
            conditions.append("held")
        if only is not None and only.deferred:
            conditions.append("NOT held AND id IN (SELECT message_id FROM recipients"
                              " WHERE status = 'deferred')")
        if only is not None and only.domain is not None:
            conditions.append("id IN (SELECT message_id FROM recipients"
                              f" WHERE domain = %(domain)s AND status IN {_PENDING})")
            args["domain"] = only.domain
        where = " AND ".join(conditions)
        return self._call(lambda conn: _load(conn, where, args))

    def body_path(self, queue_id: str) -> str:
        """This hub's cached copy of the body: present for messages received here and for
        those handed out by `claim_due` (see `materialise`)."""
        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue ID: {queue_id!r}")
        return str(self.cache / queue_id)

    def fetch_body(self, queue_id: str) -> Deferred[str]:
        path = self.body_path(queue_id)

        def fetch(conn: Conn) -> str:
            self.materialise(conn, [queue_id])
            return path

        return self._call(fetch)

    def materialise(self, conn: Conn, queue_ids: Sequence[str]) -> None:
        """Pool thread: write the bodies of `queue_ids` not yet cached here into the cache
        (no fsync: the database holds the durable copy)."""
        missing = [q for q in queue_ids if not (self.cache / q).exists()]
        # A few at a time: a claim may hand out hundreds of messages of any size.
        for start in range(0, len(missing), BODIES_PER_QUERY):
            rows = conn.execute(
                "SELECT message_id, data FROM bodies WHERE message_id = ANY(%s)",
                (missing[start:start + BODIES_PER_QUERY],)).fetchall()
            for queue_id, data in rows:
                tmp = self.cache / f".{queue_id}.{os.getpid()}.{threading.get_ident()}"
                with open(tmp, "wb") as out:
                    out.write(data)
                os.replace(tmp, self.cache / queue_id)

    def collect_orphans(self, older_than: float) -> Deferred[int]:
        """Remove cached bodies that no longer have a message (delivered by another hub,
        or sessions that died before commit) and are older than `older_than` seconds."""
        live = frozenset(self._live_ids)

        def collect(conn: Conn) -> int:
            candidates = [q for q in spool.stale_bodies(self.cache, older_than) if q not in live]
            if not candidates:
                return 0
            queued = {row[0] for row in conn.execute(
                "SELECT id FROM messages WHERE id = ANY(%s)", (candidates,))}
            orphans = [q for q in candidates if q not in queued]
            for queue_id in orphans:
                spool.remove(self.cache / queue_id)
            return len(orphans)

        return self._call(collect)

    # -- for the queue manager ------------------------------------------------------------

    def claim_due(self, now: float, limit: int, lease: float) -> Deferred[list[DueWork]]:
        """Leases last this store's `lease` (renewed while attempts run), not `lease`: the
        argument is for a single-hub store that only ends leases at a restart."""

        def claim(conn: Conn) -> list[DueWork]:
            with conn.transaction():
                rows = conn.execute(_CLAIM, {"now": now, "limit": limit, "hub": self.hub,
                                             "until": now + self.lease}).fetchall()
            claimed: dict[str, set[int]] = {}
            for mid, idx in rows:
                claimed.setdefault(mid, set()).add(idx)
            if not claimed:
                return []
            messages = _load(conn, "id = ANY(%(ids)s)", {"ids": list(claimed)})
            self.materialise(conn, [m.queue_id for m in messages])
            return [DueWork(m, tuple(r for r in m.recipients if r.index in claimed[m.queue_id]))
                    for m in messages]

        def held(work: list[DueWork]) -> list[DueWork]:
            # A lease of ours that ran out while the database was away may be claimed
            # again while the queue manager still holds its recipient: not twice.
            fresh = []
            for item in work:
                mine = tuple(r for r in item.recipients
                             if (item.message.queue_id, r.index) not in self._held)
                if mine:
                    fresh.append(DueWork(item.message, mine))
            self._held.update((w.message.queue_id, r.index) for w in fresh for r in w.recipients)
            return fresh

        return self._call(claim).addCallback(held)

    def release_leases(self) -> Deferred[int]:
        """This hub's leases only (other hubs' attempts go on); from here on this store also
        keeps the hub's heartbeat and renews the leases of attempts under way."""
        self._held.clear()
        if self._keeper is None:
            self._keeper = LoopingCall(self._keep)
            self._keeper.clock = self._reactor
            self._keeper.start(min(max(self.lease / 3, 0.5), HEARTBEAT), now=False).addErrback(
                lambda failure: self.log.failure("lease keeper stopped", failure))

        def release(conn: Conn) -> int:
            now = time.time()
            conn.execute(
                "INSERT INTO hubs (name, started, last_seen) VALUES (%s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET started = excluded.started,"
                " last_seen = excluded.last_seen", (self.hub, now, now))
            cur = conn.execute("UPDATE recipients SET lease_until = NULL, lease_owner = NULL"
                               " WHERE lease_owner = %s", (self.hub,))
            return cur.rowcount

        return self._call(release)

    def _keep(self) -> Deferred[None] | None:
        if not self._ready:
            return None
        pairs = sorted(self._held)

        def keep(conn: Conn) -> None:
            now = time.time()
            conn.execute("UPDATE hubs SET last_seen = %s WHERE name = %s", (now, self.hub))
            if pairs:
                conn.execute(
                    "UPDATE recipients r SET lease_until = %(until)s"
                    " FROM unnest(%(ids)s::text[], %(idx)s::int[]) AS j(message_id, idx)"
                    " WHERE r.message_id = j.message_id AND r.idx = j.idx"
                    " AND r.lease_owner = %(hub)s",
                    {"until": now + self.lease, "hub": self.hub,
                     "ids": [p[0] for p in pairs], "idx": [p[1] for p in pairs]})

        # A failure (database away) is logged by _health; the next round tries again.
        return self._call(keep).addErrback(lambda _: None)

    def watch(self, wake: Callable[[], None]) -> None:
        """Call `wake` (on the reactor thread) whenever any hub queues mail or changes the
        queue, and when the database is reachable again after an outage."""
        if self._listener is None:
            self._listener = _Listener(self.dsn, lambda: self._reactor.callFromThread(wake))
            self._listener.start()

    def next_due(self, now: float) -> Deferred[float | None]:
        def due(conn: Conn) -> float | None:
            row = conn.execute(_NEXT_DUE, {"now": now}).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return self._call(due)

    def confirm_leased(self, work: Sequence[tuple[str, Sequence[int]]], now: float
                       ) -> Deferred[set[tuple[str, int]]]:
        pairs = [(queue_id, index) for queue_id, indexes in work for index in indexes]
        args = {"ids": [p[0] for p in pairs], "idx": [p[1] for p in pairs], "now": now,
                "hub": self.hub}

        def confirm(conn: Conn) -> set[tuple[str, int]]:
            with conn.transaction():
                rows = conn.execute(_LEASED, args).fetchall()
                dropped = [(mid, idx) for mid, idx, ok in rows if not ok]
                if dropped:
                    with conn.cursor() as cur:
                        cur.executemany(
                            "UPDATE recipients SET lease_until = NULL, lease_owner = NULL"
                            " WHERE message_id = %s AND idx = %s AND lease_owner = %s",
                            [(mid, idx, self.hub) for mid, idx in dropped])
            return {(mid, idx) for mid, idx, ok in rows if ok}

        def forget(result: set[tuple[str, int]] | Failure) -> set[tuple[str, int]] | Failure:
            # Work not confirmed is not attempted: its lease is no longer ours to keep.
            kept = result if not isinstance(result, Failure) else set()
            self._held.difference_update(p for p in pairs if p not in kept)
            return result

        return self._call(confirm).addBoth(forget)

    def record_attempts(
        self, queue_id: str, updates: Sequence[RecipientUpdate], now: float
    ) -> Deferred[Recorded]:
        def forget(result: object) -> object:
            self._held.difference_update((queue_id, u.index) for u in updates)
            if result is Recorded.REMOVED:
                spool.remove(self.cache / queue_id)
            return result

        if not self._ready:
            return fail(QueueStateError("queue store is not open")).addBoth(forget)
        return self._records.add((queue_id, updates, now)).addBoth(forget)

    def _write_records(self, batch: list[tuple[str, Sequence[RecipientUpdate], float]]
                       ) -> list[Recorded | Exception]:
        assert self._pool is not None
        with self._pool.connection() as conn, conn.transaction():
            return [_record(conn, queue_id, updates, now) for queue_id, updates, now in batch]

    # -- for relayhubctl ------------------------------------------------------------------

    def hold(self, selection: Selection) -> Deferred[Changed]:
        def hold(conn: Conn) -> Changed:
            found = _selected(conn, _valid(selection))
            changed = [mid for mid, held in found if not held]
            conn.execute("UPDATE messages SET held = TRUE WHERE id = ANY(%s)", (changed,))
            return Changed(tuple(changed), tuple(mid for mid, held in found if held))

        return self._call(hold)

    def release(self, selection: Selection, now: float) -> Deferred[Changed]:
        def release(conn: Conn) -> Changed:
            found = _selected(conn, _valid(selection))
            changed = [mid for mid, held in found if held]
            conn.execute("UPDATE messages SET held = FALSE WHERE id = ANY(%s)", (changed,))
            _make_due(conn, changed, now)
            return Changed(tuple(changed), tuple(mid for mid, held in found if not held))

        return self._call(release)

    def flush(self, selection: Selection, now: float) -> Deferred[Changed]:
        def flush(conn: Conn) -> Changed:
            found = _selected(conn, _valid(selection))
            changed = [mid for mid, held in found if not held]  # SPEC §8: not even by flush
            _make_due(conn, changed, now, selection.domain)
            return Changed(tuple(changed), tuple(mid for mid, held in found if held))

        return self._call(flush)

    def delete(self, selection: Selection) -> Deferred[Changed]:
        def delete(conn: Conn) -> Changed:
            with conn.transaction():
                changed = [mid for mid, _held in _selected(conn, _valid(selection))]
                conn.execute("DELETE FROM messages WHERE id = ANY(%s)", (changed,))
            for queue_id in changed:
                spool.remove(self.cache / queue_id)
            return Changed(tuple(changed))

        return self._call(delete)

    def bounce(self, queue_ids: Sequence[str], now: float) -> Deferred[Changed]:
        valid = [q for q in queue_ids if is_queue_id(q)]

        def bounce(conn: Conn) -> Changed:
            changed = [mid for mid, _held in _selected(conn, Selection(tuple(valid)))]
            conn.execute("UPDATE messages SET held = FALSE WHERE id = ANY(%s)", (changed,))
            conn.execute(
                "UPDATE recipients SET give_up = TRUE, next_attempt = %s"
                f" WHERE message_id = ANY(%s) AND status IN {_PENDING}", (now, changed))
            conn.execute(f"NOTIFY {CHANNEL}")
            return Changed(tuple(changed))

        return self._call(bounce)

    def pause(self, domain: str, until: float | None) -> Deferred[None]:
        def pause(conn: Conn) -> None:
            conn.execute("DELETE FROM paused WHERE until <= %s", (time.time(),))
            conn.execute("INSERT INTO paused (domain, until) VALUES (%s, %s)"
                         " ON CONFLICT (domain) DO UPDATE SET until = excluded.until",
                         (domain, until))

        return self._call(pause)

    def resume(self, domain: str, now: float) -> Deferred[bool]:
        def resume(conn: Conn) -> bool:
            was_paused = conn.execute(
                "DELETE FROM paused WHERE domain = %s AND (until IS NULL OR until > %s)",
                (domain, now)).rowcount > 0
            conn.execute("DELETE FROM paused WHERE until <= %s", (now,))
            if was_paused:
                conn.execute(
                    "UPDATE recipients SET next_attempt = LEAST(COALESCE(next_attempt, %(now)s),"
                    f" %(now)s) WHERE domain = %(domain)s AND status IN {_PENDING}",
                    {"now": now, "domain": domain})
                conn.execute(f"NOTIFY {CHANNEL}")
            return was_paused

        return self._call(resume)

    def history(self, queue_id: str) -> Deferred[list[HistoryEntry]]:
        def history(conn: Conn) -> list[HistoryEntry]:
            rows = conn.execute(
                "SELECT h.time, r.address, h.relay, h.dsn, h.text FROM history h"
                " LEFT JOIN recipients r ON r.message_id = h.message_id"
                " AND r.idx = h.recipient_idx WHERE h.message_id = %s ORDER BY h.time, h.id",
                (queue_id,)).fetchall()
            return [HistoryEntry(*row) for row in rows]

        return self._call(history)

    def summary(self, now: float) -> Deferred[QueueSummary]:
        def summary(conn: Conn) -> QueueSummary:
            # One snapshot for every count.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            messages, held, oldest = conn.execute(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE held), MIN(arrival) FROM messages"
            ).fetchone() or (0, 0, None)
            recipients = dict.fromkeys((s.value for s in RecipientStatus), 0)
            recipients.update(conn.execute(
                "SELECT status, COUNT(*) FROM recipients GROUP BY status").fetchall())
            by_domain: dict[str, int] = dict(conn.execute(
                f"SELECT domain, COUNT(*) AS n FROM recipients WHERE status IN {_PENDING}"
                " GROUP BY domain ORDER BY n DESC, domain").fetchall())
            in_flight_row = conn.execute(
                f"SELECT COUNT(*) FROM recipients WHERE status IN {_PENDING}"
                " AND lease_until > %s", (now,)).fetchone()
            paused = tuple(PausedDomain(domain, until) for domain, until in conn.execute(
                "SELECT domain, until FROM paused WHERE until IS NULL OR until > %s"
                " ORDER BY domain", (now,)).fetchall())
            return QueueSummary(messages=messages, held=held, recipients=recipients,
                                oldest_arrival=oldest, by_domain=by_domain,
                                in_flight=in_flight_row[0] if in_flight_row else 0,
                                paused=paused)

        return self._call(summary)

    def hubs(self) -> Deferred[list[HubInfo]]:
        def hubs(conn: Conn) -> list[HubInfo]:
            rows = conn.execute("SELECT name, started, last_seen FROM hubs ORDER BY name")
            return [HubInfo(name, started, last_seen) for name, started, last_seen in rows]

        return self._call(hubs)

    # -- migration ------------------------------------------------------------------------

    def body_bytes(self, queue_id: str) -> Deferred[bytes | None]:
        def body(conn: Conn) -> bytes | None:
            row = conn.execute("SELECT data FROM bodies WHERE message_id = %s",
                               (queue_id,)).fetchone()
            return None if row is None else bytes(row[0])

        return self._call(body)


class _Listener:
    """A thread with its own connection that LISTENs for new work and calls `wake` for
    each notification, and after every (re)connection, since mail may have come meanwhile."""

    def __init__(self, dsn: str, wake: Callable[[], None]) -> None:
        self.dsn = dsn
        self.wake = wake
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relayhub-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True,
                                     connect_timeout=int(CONNECT_TIMEOUT)) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.wake()
                    while not self._stopping.is_set():
                        # One notification (or the poll interval) at a time: the queue
                        # manager coalesces wakes that come while it scans.
                        if any(True for _ in conn.notifies(timeout=LISTEN_POLL, stop_after=1)):
                            self.wake()
            except UNAVAILABLE:
                self._stopping.wait(LISTEN_POLL)


def _valid(selection: Selection) -> Selection:
    return replace(selection, queue_ids=tuple(q for q in selection.queue_ids if is_queue_id(q)))


def _load(conn: Conn, where: str, args: dict[str, Any]) -> list[StoredMessage]:
    """The messages satisfying `where` (SQL over messages' columns) with their recipients,
    read in one snapshot."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        messages = conn.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE {where} ORDER BY arrival, id", args
        ).fetchall()
        recipients = conn.execute(
            f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE message_id IN"
            f" (SELECT id FROM messages WHERE {where}) ORDER BY message_id, idx", args
        ).fetchall()
    by_message: dict[str, list[StoredRecipient]] = {}
    for (mid, idx, address, orcpt, notify, status, attempts, next_attempt, last_error,
         delay_warned, sender, give_up) in recipients:
        by_message.setdefault(mid, []).append(StoredRecipient(
            index=idx, address=address, orcpt=orcpt,
            notify=tuple(notify.split(",")) if notify else (),
            status=RecipientStatus(status), attempts=attempts, next_attempt=next_attempt,
            last_error=last_error, delay_warned=bool(delay_warned), sender=sender,
            give_up=bool(give_up),
        ))
    result = []
    for row in messages:
        (queue_id, arrival, sender, size, subject, held, body_type, smtputf8, ret, envid,
         client_name, client_address, helo, protocol, auth_user, hub, eight_bit,
         longest_line) = row
        stored = tuple(by_message.get(queue_id, ()))
        envelope = Envelope(
            sender=sender,
            recipients=tuple(RecipientRequest(r.address, r.orcpt, r.notify, r.sender)
                             for r in stored),
            body_type=body_type, smtputf8=bool(smtputf8), ret=ret, envid=envid,
            client_name=client_name, client_address=client_address, helo=helo,
            protocol=protocol, auth_user=auth_user)
        result.append(StoredMessage(queue_id=queue_id, envelope=envelope, arrival=arrival,
                                    size=size, subject=subject, held=bool(held),
                                    recipients=stored, hub=hub,
                                    traits=traits_from_columns(eight_bit, longest_line)))
    return result


def _record(conn: Conn, queue_id: str, updates: Sequence[RecipientUpdate], now: float
            ) -> Recorded:
    """As relayhub.queue.scheduling._record: results and history; the message goes once no
    recipient is pending; a message deleted meanwhile stays gone."""
    if conn.execute("SELECT 1 FROM messages WHERE id = %s FOR UPDATE",
                    (queue_id,)).fetchone() is None:
        return Recorded.VANISHED
    for update in updates:
        result = update.result
        error = None if result.outcome is Outcome.DELIVERED else f"{result.status} {result.text}"
        conn.execute(
            "UPDATE recipients SET status = %(status)s, attempts = attempts + 1,"
            " next_attempt = CASE WHEN give_up AND %(next)s::float8 IS NOT NULL THEN %(now)s"
            " ELSE %(next)s::float8 END,"
            " last_error = COALESCE(%(error)s, last_error), lease_until = NULL,"
            " lease_owner = NULL, delay_warned = delay_warned OR %(warned)s"
            " WHERE message_id = %(id)s AND idx = %(idx)s",
            {"status": _STATUS_OF[result.outcome].value, "next": update.next_attempt,
             "now": now, "error": error, "warned": update.delay_warned, "id": queue_id,
             "idx": update.index})
        conn.execute(
            "INSERT INTO history (message_id, time, recipient_idx, relay, dsn, text)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (queue_id, now, update.index, result.relay, result.status, result.text))
    row = conn.execute(
        f"SELECT COUNT(*) FROM recipients WHERE message_id = %s AND status IN {_PENDING}",
        (queue_id,)).fetchone()
    if row is not None and row[0] == 0:
        conn.execute("DELETE FROM messages WHERE id = %s", (queue_id,))  # cascades
        return Recorded.REMOVED
    return Recorded.KEPT


def _selected(conn: Conn, selection: Selection) -> list[tuple[str, bool]]:
    """(queue ID, held) of the selected messages that exist, oldest first, locked."""
    args: dict[str, Any]
    if selection.everything:
        where, args = "TRUE", {}
    elif selection.domain is not None:
        where = (f"id IN (SELECT message_id FROM recipients"
                 f" WHERE domain = %(domain)s AND status IN {_PENDING})")
        args = {"domain": selection.domain}
    else:
        where, args = "id = ANY(%(ids)s)", {"ids": list(selection.queue_ids)}
    rows = conn.execute(
        f"SELECT id, held FROM messages WHERE {where} ORDER BY arrival, id FOR UPDATE", args)
    return [(mid, bool(held)) for mid, held in rows]


def _make_due(conn: Conn, ids: Sequence[str], now: float, domain: str | None = None) -> None:
    """Pending recipients of `ids` (only `domain`'s, if given) become due at `now`; ones due
    earlier keep their place in line. Every hub's queue manager hears of it."""
    conn.execute(
        "UPDATE recipients SET next_attempt = LEAST(COALESCE(next_attempt, %(now)s), %(now)s)"
        f" WHERE message_id = ANY(%(ids)s) AND status IN {_PENDING}"
        " AND (%(domain)s::text IS NULL OR domain = %(domain)s)",
        {"now": now, "ids": list(ids), "domain": domain})
    conn.execute(f"NOTIFY {CHANNEL}")

