"""Which queue store a hub uses: the one place that knows the backends, so that the
processes and relayhubctl ask for "the queue of these settings" and nothing more."""

from __future__ import annotations

import sqlite3
from typing import Any

from relayhub.config import Settings
from relayhub.errors import TemporaryFailure
from relayhub.queue.store import QueueStore

# What a store's operations fail with when the queue itself is the problem (unreadable
# file, database away, unknown schema): relayhubctl turns these into one line and exit 2.
# (The PostgreSQL store raises RuntimeErrors and TemporaryFailures, never psycopg's own: a
# command on SQLite does not pay for importing psycopg.)
STORE_ERRORS: tuple[type[Exception], ...] = (OSError, sqlite3.Error, RuntimeError,
                                             TemporaryFailure)


def open_store(settings: Settings, *, reactor: Any = None, close_on_shutdown: bool = True,
               daemon: bool = False) -> QueueStore:
    """The (not yet opened) queue store `settings` configure. `daemon`: the store of a
    daemon's process, whose `open` waits for a database that is away (a command's fails
    at once)."""
    directory = settings.server.state_dir
    if settings.queue.backend == "postgresql":
        # Imported here: a hub on SQLite never loads psycopg.
        from relayhub.queue.postgresql import PostgreSQLQueueStore

        return PostgreSQLQueueStore(settings.queue.dsn, directory, hub=settings.server.hostname,
                                    lease=settings.queue.lease, reactor=reactor,
                                    close_on_shutdown=close_on_shutdown,
                                    waiting_open=daemon)
    from relayhub.queue.sqlite import SQLiteQueueStore

    return SQLiteQueueStore(directory, reactor=reactor, close_on_shutdown=close_on_shutdown)


def schema_problem(settings: Settings) -> str | None:
    """Why the hub must not start on its queue (a schema it does not know), checked by the
    master before any child runs; None when it may."""
    if settings.queue.backend != "postgresql":
        return None  # the SQLite file is checked by each process as it opens it
    from relayhub.queue.pgschema import unknown_version

    return unknown_version(settings.queue.dsn, timeout=5.0)
