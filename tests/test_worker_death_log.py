"""The master's line about a child that died names the pid that died (as Postfix's
`pid 1234 killed by signal 9`), so it can be matched against `ps` and the kernel log."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from hubprocess import Hub


def test_kill9_of_a_worker_is_logged_with_its_pid(tmp_path: Path) -> None:
    hub = Hub(tmp_path, {"server": {"workers": 2}}).start()
    try:
        victim = hub.children("worker")[0]
        os.kill(victim, signal.SIGKILL)
        log = hub.wait_for_log("died after")
        [line] = [line for line in log.splitlines() if "died after" in line]
        assert re.search(rf"worker-\d+\.\d+ pid {victim} died after [\d.]+s "
                         r"\(killed by signal 9\); restarting", line), line
        # The replacement is announced with its own, new pid.
        replacement = hub.child("worker", not_pid=victim, timeout=10)
        hub.wait_for_log(f"(pid {replacement})")
    finally:
        hub.stop()
