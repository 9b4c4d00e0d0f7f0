"""Which queue store a hub uses: the one place that knows the backends, so that the
processes and relayhubctl ask for "the queue of these settings" and nothing more."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg

from relayhub.config import Settings
from relayhub.errors import TemporaryFailure
from relayhub.queue.store import QueueStore

# What a store's operations fail with when the queue itself is the problem (unreadable
# file, database away, unknown schema): relayhubctl turns these into one line and exit 2.
STORE_ERRORS: tuple[type[Exception], ...] = (OSError, sqlite3.Error, psycopg.Error,
                                             RuntimeError, TemporaryFailure)


def open_store(settings: Settings, *, reactor: Any = None, close_on_shutdown: bool = True,
               state_dir: Path | None = None) -> QueueStore:
    """The (not yet opened) queue store `settings` configure; `state_dir` overrides the
    settings' one (relayhubctl reading an empty scratch queue)."""
    directory = settings.server.state_dir if state_dir is None else state_dir
    if settings.queue.backend == "postgresql":
        # Imported here: a hub on SQLite never loads psycopg.
        from relayhub.queue.postgresql import PostgreSQLQueueStore

        return PostgreSQLQueueStore(settings.queue.dsn, directory, hub=settings.server.hostname,
                                    lease=settings.queue.lease, reactor=reactor,
                                    close_on_shutdown=close_on_shutdown)
    from relayhub.queue.sqlite import SQLiteQueueStore

    return SQLiteQueueStore(directory, reactor=reactor, close_on_shutdown=close_on_shutdown)
