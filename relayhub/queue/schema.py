"""The SQLite queue schema as ordered migration steps, and how a connection is opened."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

# Step N (1-based) brings PRAGMA user_version from N-1 to N. Append new steps; never edit
# a released one, since databases in the field have already run it.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            arrival REAL NOT NULL,
            sender TEXT NOT NULL,
            size INTEGER NOT NULL,
            subject TEXT NOT NULL DEFAULT '',
            held INTEGER NOT NULL DEFAULT 0,
            body_type TEXT NOT NULL DEFAULT '7BIT',
            smtputf8 INTEGER NOT NULL DEFAULT 0,
            ret TEXT,
            envid TEXT,
            client_name TEXT NOT NULL DEFAULT '',
            client_address TEXT NOT NULL DEFAULT '',
            helo TEXT NOT NULL DEFAULT '',
            protocol TEXT NOT NULL DEFAULT 'ESMTP',
            auth_user TEXT
        )""",
        "CREATE INDEX messages_arrival ON messages (arrival)",
        """CREATE TABLE recipients (
            message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            address TEXT NOT NULL,
            orcpt TEXT,
            notify TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'queued',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL,
            last_error TEXT,
            PRIMARY KEY (message_id, idx)
        )""",
        "CREATE INDEX recipients_due ON recipients (status, next_attempt)",
        """CREATE TABLE history (
            id INTEGER PRIMARY KEY,
            message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            time REAL NOT NULL,
            recipient_idx INTEGER,
            relay TEXT NOT NULL DEFAULT '',
            dsn TEXT NOT NULL DEFAULT '',
            text TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX history_message ON history (message_id, time)",
    ),
    (
        # Delivery: a lease marks recipients the queue manager is working on right now, so
        # a crash leaves them visibly "in flight" rather than lost or doubly delivered.
        "ALTER TABLE recipients ADD COLUMN lease_until REAL",
        "ALTER TABLE recipients ADD COLUMN delay_warned INTEGER NOT NULL DEFAULT 0",
    ),
    (
        # Aliases: list members get the list owner as their envelope sender.
        "ALTER TABLE recipients ADD COLUMN sender TEXT",
    ),
    (
        # relayhubctl: each recipient's domain, for per-domain pause, flush, list and
        # statistics. Existing rows get the part after the last "@" (rtrim strips every
        # character but "@" from the right), lower-cased: relayhub.queue.store.domain_of.
        "ALTER TABLE recipients ADD COLUMN domain TEXT NOT NULL DEFAULT ''",
        """UPDATE recipients SET domain =
            lower(substr(address, length(rtrim(address, replace(address, '@', ''))) + 1))""",
        "CREATE INDEX recipients_domain ON recipients (domain, status)",
        # `queue bounce`: the queue manager bounces a marked recipient instead of trying it.
        "ALTER TABLE recipients ADD COLUMN give_up INTEGER NOT NULL DEFAULT 0",
        # `queue pause`: no delivery to these domains until `until` (NULL: until resumed).
        "CREATE TABLE paused (domain TEXT PRIMARY KEY, until REAL)",
    ),
    (
        # The body's traits, measured as it was received (relayhub.mime.BodyMeter), so the
        # queue manager sends it without scanning it first; NULL: not known, it scans.
        "ALTER TABLE messages ADD COLUMN eight_bit INTEGER",
        "ALTER TABLE messages ADD COLUMN longest_line INTEGER",
    ),
)


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer relayhub than this one."""


def connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Open the queue database in WAL mode with full fsync; transactions are explicit."""
    # SQLite gives the -wal and -shm files the database file's mode, so create it 0600.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"{path}: cannot use WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the missing steps in one write transaction; return the resulting version.

    BEGIN IMMEDIATE makes processes starting together take turns: the later ones see the
    version the first one wrote and have nothing left to do.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise SchemaTooNewError(
                f"queue schema version {version} is newer than this relayhub "
                f"({len(MIGRATIONS)})"
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return len(MIGRATIONS)


def is_busy(exc: sqlite3.Error) -> bool:
    """True for the transient lock errors ("database is locked") worth retrying."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
