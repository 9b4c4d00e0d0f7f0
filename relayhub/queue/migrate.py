"""Moving a stopped hub's queue between backends (`relayhubctl queue migrate`): SQLite to
PostgreSQL and back, message by message.

Each message is copied whole (envelope, recipients with their state, history, body) and
committed in the target, and only then deleted from the source, so an interruption at any
point leaves every message in the source, in the target, or in both; a message found in
both (copied, not yet deleted) is not copied again, only deleted from the source. Running
the move again therefore finishes it, and nothing is lost or doubled. Held, deferred and
given-up marks and attempt counts travel with the rows; leases do not (the hub is stopped).
Paused domains are copied too. Runs on a thread: every call here blocks.
"""

from __future__ import annotations

import abc
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from relayhub.queue import pgschema, schema, spool
from relayhub.queue.ids import is_queue_id

MESSAGE = ("id", "arrival", "sender", "size", "subject", "held", "body_type", "smtputf8", "ret",
           "envid", "client_name", "client_address", "helo", "protocol", "auth_user",
           "eight_bit", "longest_line")
RECIPIENT = ("message_id", "idx", "address", "domain", "orcpt", "notify", "status", "attempts",
             "next_attempt", "last_error", "delay_warned", "sender", "give_up")
HISTORY = ("message_id", "time", "recipient_idx", "relay", "dsn", "text")
_FLAGS = {"held", "smtputf8", "delay_warned", "give_up", "eight_bit"}


class MigrationError(RuntimeError):
    """The move cannot start or go on (the reason is one line for the administrator)."""


@dataclass(frozen=True)
class MessageCopy:
    """One message as both backends store it; rows are dicts keyed by the names above."""

    message: dict[str, Any]
    hub: str
    recipients: list[dict[str, Any]]
    history: list[dict[str, Any]]
    body: bytes


class Side(abc.ABC):
    """One end of a move."""

    name: str

    @abc.abstractmethod
    def ids(self) -> list[str]:
        """Queue IDs to move, oldest first."""

    @abc.abstractmethod
    def read(self, queue_id: str) -> MessageCopy | None:
        """None when the message is gone, or its body is."""

    @abc.abstractmethod
    def has(self, queue_id: str) -> bool: ...

    @abc.abstractmethod
    def write(self, copy: MessageCopy) -> None:
        """Store the message durably (committed when this returns)."""

    @abc.abstractmethod
    def remove(self, queue_id: str) -> None: ...

    @abc.abstractmethod
    def paused(self) -> list[tuple[str, float | None]]: ...

    @abc.abstractmethod
    def pause(self, rows: list[tuple[str, float | None]]) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


def _flags(row: dict[str, Any], to: Callable[[Any], Any]) -> dict[str, Any]:
    # eight_bit may be NULL (not known): it stays so.
    return {key: to(value) if key in _FLAGS and value is not None else value
            for key, value in row.items()}


class SQLiteSide(Side):
    def __init__(self, state_dir: Path, hub: str) -> None:
        self.name = str(state_dir / "queue")
        self.hub = hub
        self.bodies = state_dir / "queue" / "bodies"
        self.bodies.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.db = schema.connect(state_dir / "queue" / "queue.db", 30.0)
        schema.migrate(self.db)

    def ids(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT id FROM messages ORDER BY arrival, id")]

    def _rows(self, sql: str, columns: tuple[str, ...], queue_id: str) -> list[dict[str, Any]]:
        return [dict(zip(columns, row, strict=True)) for row in self.db.execute(sql, (queue_id,))]

    def read(self, queue_id: str) -> MessageCopy | None:
        found = self._rows(f"SELECT {', '.join(MESSAGE)} FROM messages WHERE id = ?", MESSAGE,
                           queue_id)
        try:
            body = (self.bodies / queue_id).read_bytes()
        except FileNotFoundError:
            return None
        if not found:
            return None
        return MessageCopy(
            _flags(found[0], bool), self.hub,
            [_flags(r, bool) for r in self._rows(
                f"SELECT {', '.join(RECIPIENT)} FROM recipients WHERE message_id = ?"
                " ORDER BY idx", RECIPIENT, queue_id)],
            self._rows(f"SELECT {', '.join(HISTORY)} FROM history WHERE message_id = ?"
                       " ORDER BY id", HISTORY, queue_id),
            body)

    def has(self, queue_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM messages WHERE id = ?",
                               (queue_id,)).fetchone() is not None

    def write(self, copy: MessageCopy) -> None:
        queue_id = copy.message["id"]
        # The body first, fsync'd, under its final name (replacing a partial one left by an
        # interrupted run), then the rows in one transaction.
        tmp = self.bodies / f".{queue_id}.migrate"
        with open(tmp, "wb") as out:
            out.write(copy.body)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.bodies / queue_id)
        spool.fsync_directory(self.bodies)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(f"INSERT INTO messages ({', '.join(MESSAGE)}) VALUES"
                       f" ({', '.join('?' * len(MESSAGE))})",
                       list(_flags(copy.message, int).values()))
            db.executemany(f"INSERT INTO recipients ({', '.join(RECIPIENT)}) VALUES"
                           f" ({', '.join('?' * len(RECIPIENT))})",
                           [list(_flags(r, int).values()) for r in copy.recipients])
            db.executemany(f"INSERT INTO history ({', '.join(HISTORY)}) VALUES"
                           f" ({', '.join('?' * len(HISTORY))})",
                           [list(h.values()) for h in copy.history])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def remove(self, queue_id: str) -> None:
        self.db.execute("DELETE FROM messages WHERE id = ?", (queue_id,))  # autocommit
        spool.remove(self.bodies / queue_id)

    def paused(self) -> list[tuple[str, float | None]]:
        return list(self.db.execute("SELECT domain, until FROM paused"))

    def pause(self, rows: list[tuple[str, float | None]]) -> None:
        self.db.executemany("INSERT INTO paused (domain, until) VALUES (?, ?) ON CONFLICT"
                            " (domain) DO UPDATE SET until = excluded.until", rows)

    def close(self) -> None:
        self.db.close()


class PostgreSQLSide(Side):
    def __init__(self, dsn: str, hub: str, every_hub: bool) -> None:
        self.name = "the PostgreSQL queue"
        self.hub = hub
        self.every_hub = every_hub
        self.conn: psycopg.Connection[tuple[Any, ...]] = psycopg.connect(dsn, autocommit=True)
        pgschema.migrate(self.conn)

    def ids(self) -> list[str]:
        if self.every_hub:
            rows = self.conn.execute("SELECT id FROM messages ORDER BY arrival, id")
        else:
            rows = self.conn.execute("SELECT id FROM messages WHERE hub = %s"
                                     " ORDER BY arrival, id", (self.hub,))
        return [row[0] for row in rows]

    def _rows(self, sql: str, columns: tuple[str, ...], queue_id: str) -> list[dict[str, Any]]:
        return [dict(zip(columns, row, strict=True))
                for row in self.conn.execute(sql, (queue_id,))]

    def read(self, queue_id: str) -> MessageCopy | None:
        with self.conn.transaction():
            found = self._rows(f"SELECT {', '.join(MESSAGE)}, hub FROM messages WHERE id = %s",
                               (*MESSAGE, "hub"), queue_id)
            body = self.conn.execute("SELECT data FROM bodies WHERE message_id = %s",
                                     (queue_id,)).fetchone()
            if not found or body is None:
                return None
            recipients = self._rows(f"SELECT {', '.join(RECIPIENT)} FROM recipients"
                                    " WHERE message_id = %s ORDER BY idx", RECIPIENT, queue_id)
            history = self._rows(f"SELECT {', '.join(HISTORY)} FROM history"
                                 " WHERE message_id = %s ORDER BY id", HISTORY, queue_id)
        message = found[0]
        hub = message.pop("hub") or self.hub
        return MessageCopy(message, hub, recipients, history, bytes(body[0]))

    def has(self, queue_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM messages WHERE id = %s",
                                 (queue_id,)).fetchone() is not None

    def write(self, copy: MessageCopy) -> None:
        marks = ", ".join(["%s"] * (len(MESSAGE) + 1))
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute(f"INSERT INTO messages ({', '.join(MESSAGE)}, hub) VALUES ({marks})",
                        [*_flags(copy.message, bool).values(), copy.hub])
            cur.execute("INSERT INTO bodies (message_id, data) VALUES (%s, %s)",
                        (copy.message["id"], copy.body))
            cur.executemany(f"INSERT INTO recipients ({', '.join(RECIPIENT)}) VALUES"
                            f" ({', '.join(['%s'] * len(RECIPIENT))})",
                            [list(_flags(r, bool).values()) for r in copy.recipients])
            cur.executemany(f"INSERT INTO history ({', '.join(HISTORY)}) VALUES"
                            f" ({', '.join(['%s'] * len(HISTORY))})",
                            [list(h.values()) for h in copy.history])

    def remove(self, queue_id: str) -> None:
        self.conn.execute("DELETE FROM messages WHERE id = %s", (queue_id,))

    def paused(self) -> list[tuple[str, float | None]]:
        return [(d, u) for d, u in self.conn.execute("SELECT domain, until FROM paused")]

    def pause(self, rows: list[tuple[str, float | None]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany("INSERT INTO paused (domain, until) VALUES (%s, %s) ON CONFLICT"
                            " (domain) DO UPDATE SET until = excluded.until", rows)

    def close(self) -> None:
        self.conn.close()


def is_dsn(target: str) -> bool:
    """A PostgreSQL connection string (URI or key=value) rather than a SQLite path."""
    return target.startswith(("postgresql://", "postgres://")) or "=" in target


def sqlite_state_dir(target: str) -> Path:
    """The state directory of a SQLite queue given as that directory, its `queue/`
    directory or its `queue.db`."""
    path = Path(target)
    if path.name == "queue.db":
        return path.parent.parent
    if path.name == "queue" and not (path / "queue").exists():
        return path.parent
    return path


def move(source: Side, target: Side, progress: Callable[[str], None]) -> int:
    """Move every message of `source` to `target`; returns how many moved."""
    target.pause(source.paused())
    moved = 0
    for queue_id in _each(source):
        copy = source.read(queue_id)
        if copy is None:
            progress(f"{queue_id}: body or message gone in {source.name}, left there")
            continue
        if not target.has(queue_id):
            target.write(copy)
        source.remove(queue_id)
        moved += 1
    return moved


def _each(source: Side) -> Iterator[str]:
    for queue_id in source.ids():
        if is_queue_id(queue_id):
            yield queue_id


def open_sides(backend: str, state_dir: Path, dsn: str, hub: str, to: str, every_hub: bool
               ) -> tuple[Side, Side]:
    """(source, target) for a hub configured with `backend` moving its queue to `to`."""
    try:
        if backend == "sqlite":
            if not is_dsn(to):
                raise MigrationError(f"{to}: the queue is in SQLite already; --to takes a"
                                     " PostgreSQL connection string")
            if not (state_dir / "queue" / "queue.db").exists():
                raise MigrationError(f"no queue in {state_dir}: nothing to move")
            source: Side = SQLiteSide(state_dir, hub)
            try:
                return source, PostgreSQLSide(to, hub, every_hub)
            except BaseException:
                source.close()
                raise
        if is_dsn(to):
            raise MigrationError(f"{to}: the queue is in PostgreSQL already; --to takes the"
                                 " SQLite state directory (or its queue.db)")
        source = PostgreSQLSide(dsn, hub, every_hub)
        try:
            return source, SQLiteSide(sqlite_state_dir(to), hub)
        except BaseException:
            source.close()
            raise
    except (psycopg.Error, sqlite3.Error, OSError, RuntimeError) as problem:
        if isinstance(problem, MigrationError):
            raise
        raise MigrationError(f"cannot open the queues: {str(problem).strip()}") from None
