"""Shared pytest fixtures: a real reactor running in a background thread, and helpers to
start a real relayhub daemon on free loopback ports."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from twisted.internet import reactor as _reactor
from twisted.internet.threads import blockingCallFromThread

T = TypeVar("T")


class ReactorThread:
    """The global reactor, run once for the whole session in a daemon thread.

    Tests call `run(fn, *args)` to execute `fn` on the reactor thread and wait for the
    result (Deferreds are waited for), so test code itself stays plain and synchronous.
    """

    def __init__(self) -> None:
        self.reactor: Any = _reactor
        self._thread = threading.Thread(
            target=self.reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return blockingCallFromThread(self.reactor, fn, *args, **kwargs)  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.reactor.callFromThread(self.reactor.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="session")
def reactor_thread() -> Iterator[ReactorThread]:
    rt = ReactorThread()
    rt.start()
    yield rt
    rt.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One PostgreSQL server for the session (tests/pgserver.py); skipped, saying why,
    where it cannot run."""
    import pgserver

    why = pgserver.available()
    if why is not None:
        pytest.skip(f"no PostgreSQL for the tests: {why}")
    server = pgserver.PGServer()
    yield server
    server.close()


@pytest.fixture
def pg_dsn(pg_server: Any) -> str:
    """A fresh, empty database of the session's server."""
    return str(pg_server.new_database())


def make_store(backend: str, state_dir: Any, request: pytest.FixtureRequest,
               hub: str = "hub.test", lease: float = 60.0) -> Any:
    """An unopened queue store of `backend` ("sqlite" or "postgresql", a fresh database)."""
    if backend == "postgresql":
        from relayhub.queue.postgresql import PostgreSQLQueueStore

        return PostgreSQLQueueStore(request.getfixturevalue("pg_dsn"), state_dir, hub=hub,
                                    lease=lease)
    from relayhub.queue.sqlite import SQLiteQueueStore

    return SQLiteQueueStore(state_dir)


BACKENDS = ["sqlite", "postgresql"]
