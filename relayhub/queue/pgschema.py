"""The PostgreSQL queue schema as ordered, versioned migration steps, applied under an
advisory lock so that hubs and processes starting together take turns."""

from __future__ import annotations

import psycopg

# Step N (1-based) brings relayhub_schema.version from N-1 to N. Append new steps; never
# edit a released one, since databases in the field have already run it.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            arrival DOUBLE PRECISION NOT NULL,
            sender TEXT NOT NULL,
            size BIGINT NOT NULL,
            subject TEXT NOT NULL DEFAULT '',
            held BOOLEAN NOT NULL DEFAULT FALSE,
            body_type TEXT NOT NULL DEFAULT '7BIT',
            smtputf8 BOOLEAN NOT NULL DEFAULT FALSE,
            ret TEXT,
            envid TEXT,
            client_name TEXT NOT NULL DEFAULT '',
            client_address TEXT NOT NULL DEFAULT '',
            helo TEXT NOT NULL DEFAULT '',
            protocol TEXT NOT NULL DEFAULT 'ESMTP',
            auth_user TEXT,
            hub TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX messages_arrival ON messages (arrival)",
        # Bodies apart from the envelope: listing and scheduling never read them.
        """CREATE TABLE bodies (
            message_id TEXT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
            data BYTEA NOT NULL
        )""",
        """CREATE TABLE recipients (
            message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            address TEXT NOT NULL,
            domain TEXT NOT NULL DEFAULT '',
            orcpt TEXT,
            notify TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'queued',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt DOUBLE PRECISION,
            last_error TEXT,
            delay_warned BOOLEAN NOT NULL DEFAULT FALSE,
            sender TEXT,
            give_up BOOLEAN NOT NULL DEFAULT FALSE,
            -- Which hub is attempting it, until when (its clock): see PostgreSQLQueueStore.
            lease_until DOUBLE PRECISION,
            lease_owner TEXT,
            PRIMARY KEY (message_id, idx)
        )""",
        "CREATE INDEX recipients_due ON recipients (status, next_attempt)",
        "CREATE INDEX recipients_domain ON recipients (domain, status)",
        "CREATE INDEX recipients_owner ON recipients (lease_owner)",
        """CREATE TABLE history (
            id BIGSERIAL PRIMARY KEY,
            message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            time DOUBLE PRECISION NOT NULL,
            recipient_idx INTEGER,
            relay TEXT NOT NULL DEFAULT '',
            dsn TEXT NOT NULL DEFAULT '',
            text TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX history_message ON history (message_id, time)",
        "CREATE TABLE paused (domain TEXT PRIMARY KEY, until DOUBLE PRECISION)",
        # Every hub sharing the queue, and when its queue manager was last alive.
        """CREATE TABLE hubs (
            name TEXT PRIMARY KEY,
            started DOUBLE PRECISION NOT NULL,
            last_seen DOUBLE PRECISION NOT NULL
        )""",
    ),
    (
        # The body's traits, measured as it was received (relayhub.mime.BodyMeter), so the
        # queue manager sends it without scanning it first; NULL: not known, it scans.
        "ALTER TABLE messages ADD COLUMN eight_bit BOOLEAN",
        "ALTER TABLE messages ADD COLUMN longest_line INTEGER",
    ),
)

# Any number works; it only has to be the same for every relayhub.
_LOCK_KEY = 0x72656C61


class SchemaVersionError(RuntimeError):
    """The database holds a queue schema this relayhub does not know."""


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """Apply the missing steps in one transaction; return the resulting version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS relayhub_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM relayhub_schema").fetchone()
        version = 0 if row is None else int(str(row[0]))
        if version > len(MIGRATIONS):
            raise SchemaVersionError(
                f"queue schema version {version} is newer than this relayhub knows "
                f"({len(MIGRATIONS)}): upgrade relayhub")
        for step in MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        if row is None:
            conn.execute("INSERT INTO relayhub_schema (version) VALUES (%s)", (len(MIGRATIONS),))
        else:
            conn.execute("UPDATE relayhub_schema SET version = %s", (len(MIGRATIONS),))
    return len(MIGRATIONS)


def unknown_version(dsn: str, timeout: float) -> str | None:
    """Why a hub must not start on the database at `dsn` (it holds a schema this relayhub
    does not know), or None. An unreachable database is not a reason: the hub waits for it."""
    try:
        with psycopg.connect(dsn, connect_timeout=max(int(timeout), 1)) as conn:
            exists = conn.execute("SELECT to_regclass('relayhub_schema')").fetchone()
            if exists is None or exists[0] is None:
                return None
            row = conn.execute("SELECT version FROM relayhub_schema").fetchone()
    except psycopg.OperationalError:
        return None
    if row is not None and int(str(row[0])) > len(MIGRATIONS):
        return (f"the queue database holds schema version {row[0]}, newer than this "
                f"relayhub knows ({len(MIGRATIONS)}): upgrade relayhub")
    return None
