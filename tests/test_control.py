"""The control channel of a running daemon: status and wake over the Unix socket."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from conftest import ReactorThread
from hubprocess import Hub
from twisted.internet.defer import Deferred

from relayhub import control


def call(rt: ReactorThread, state_dir: Path, command: type, **kwargs: object) -> object:
    return rt.run(lambda: Deferred.fromCoroutine(
        control.call(rt.reactor, state_dir, command, **kwargs)))


def test_status_and_wake_over_a_private_socket(tmp_path: Path,
                                              reactor_thread: ReactorThread) -> None:
    hub = Hub(tmp_path).start()
    try:
        path = control.socket_path(hub.state_dir)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # service user and root only
        # The harness's readiness probe was a session: its end reaches the master's count
        # a moment later (workers report their trusted sessions at most a second late).
        deadline = time.monotonic() + 5
        while True:
            answer = call(reactor_thread, hub.state_dir, control.Status)
            assert isinstance(answer, dict)
            status = json.loads(answer["status"])
            if status["connections"] == {"smtp": 0, "pop3": 0} or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status["processes"][0]["pid"] == hub.process.pid  # type: ignore[union-attr]
        assert status["connections"] == {"smtp": 0, "pop3": 0}
        assert call(reactor_thread, hub.state_dir, control.Wake) == {}
    finally:
        hub.stop()
    # With no daemon, callers learn that instead of an exception.
    assert call(reactor_thread, hub.state_dir, control.Wake) is None
