"""The multi-process daemon: process tree, worker crash under load, SIGHUP mid-session,
SIGTERM and restart, and the drop from root to the service user."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BACKENDS
from hubprocess import REPO, Hub, SMTPConnection, free_port

POSTMASTER = "postmaster@localhost"


def deliver_one(hub: Hub, subject: str, recipient: str = POSTMASTER) -> str:
    """Send one message; its queue ID from the 250 reply."""
    return hub.send([recipient], f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def delivered_ids(hub: Hub, user: str = "postmaster") -> set[str]:
    """Queue IDs found in the Received: headers of the user's Maildir."""
    new = hub.state_dir / "mail" / user / "new"
    ids: set[str] = set()
    for path in new.iterdir() if new.is_dir() else []:
        match = re.search(rb"with E?SMTP\w* id (\w+)", path.read_bytes())
        if match:
            ids.add(match.group(1).decode())
    return ids


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def queue_section(backend: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """[queue] for `backend`: PostgreSQL gets a fresh database of the session's server."""
    if backend == "postgresql":
        return {"backend": "postgresql", "dsn": request.getfixturevalue("pg_dsn")}
    return {"backend": "sqlite"}


@pytest.fixture(params=BACKENDS)
def hub2(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Hub]:
    hub = Hub(tmp_path, {"server": {"workers": 2, "shutdown_grace": "5s"},
                         "queue": queue_section(request.param, request)}).start()
    yield hub
    hub.stop()


def test_process_tree_and_both_workers_serve(hub2: Hub) -> None:
    assert len(hub2.children("worker")) == 2 and len(hub2.children("qmgr")) == 1
    # 200 sessions, 20 open at a time as a site's hosts would hold them: both workers accept
    # on the shared socket, whichever is free first.
    for _ in range(10):
        batch = [SMTPConnection(hub2.smtp_port) for _ in range(20)]
        for conn in batch:
            assert conn.reply()[0].startswith("220 ")
        for conn in batch:
            conn.command("QUIT")
            conn.close()
    log = hub2.wait_for_log("worker-1.1[", "worker-2.1[")
    served = {name: len(re.findall(rf"{re.escape(name)}\[\d+\] \[relayhub.smtpd\] connect from",
                                   log)) for name in ("worker-1.1", "worker-2.1")}
    assert sum(served.values()) >= 200  # and the harness's own readiness probe
    assert all(count > 0 for count in served.values()), served


def test_kill9_of_a_worker_under_load(hub2: Hub) -> None:
    acknowledged: list[str] = []
    stop = threading.Event()

    def load() -> None:
        n = 0
        while not stop.is_set() and n < 400:
            n += 1
            # A session on the killed worker fails: never acknowledged, nothing promised.
            with contextlib.suppress(OSError, smtplib.SMTPException):
                acknowledged.append(deliver_one(hub2, f"load {n}"))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(acknowledged) >= 40, 30, "some load")
        victim = hub2.children("worker")[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        replacement = hub2.child("worker", timeout=5, not_pid=victim)
        while victim in hub2.children("worker") or len(hub2.children("worker")) < 2:
            time.sleep(0.02)
        assert time.monotonic() - killed_at < 2.0, "no new worker within 2 s"
        assert replacement != victim
        count = len(acknowledged)
        wait_until(lambda: len(acknowledged) >= count + 40, 30, "load after the kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    log = hub2.wait_for_log("died after")
    assert "killed by signal 9" in log
    # Every message that got 250 is delivered.
    wait_until(lambda: set(acknowledged) <= delivered_ids(hub2), 60, "every 250 delivered")


def test_sighup_mid_transaction_and_alias_added_before_it(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("# none yet\n")
    hub = Hub(tmp_path, {"server": {"workers": 1}, "aliases": {"file": str(aliases)}}).start()
    try:
        with SMTPConnection(hub.smtp_port) as conn:
            assert conn.reply()[0].startswith("220 ")
            conn.command("EHLO client.test")
            assert conn.command(f"MAIL FROM:<{POSTMASTER}>")[0].startswith("250")
            assert conn.command(f"RCPT TO:<{POSTMASTER}>")[0].startswith("250")
            aliases.write_text("newalias: postmaster\n")
            assert hub.process is not None
            hub.process.send_signal(signal.SIGHUP)
            hub.wait_for_log("reloaded ", "worker-1.2[")  # a new generation serves now
            assert conn.command("DATA")[0].startswith("354")
            conn.send(b"Subject: across the reload\r\n\r\nstill here\r\n.\r\n")
            queue_id = conn.reply()[0].rsplit(" ", 1)[1]
            conn.command("QUIT")
        wait_until(lambda: queue_id in delivered_ids(hub), 20, "the message delivered")
        # A new session sees the alias added before the SIGHUP.
        new_id = deliver_one(hub, "to the new alias", "newalias@localhost")
        wait_until(lambda: new_id in delivered_ids(hub), 20, "alias delivery")
        assert "worker-1.1 stopped" in hub.wait_for_log("worker-1.1 stopped")
    finally:
        hub.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_exits_0_and_queued_mail_goes_after_restart(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    sink_port = free_port()
    hub = Hub(tmp_path, {
        "server": {"workers": 1, "shutdown_grace": "3s"},
        "queue": queue_section(backend, request),
        "routing": {"transport": {"sink.example": f"[127.0.0.1]:{sink_port}"}},
        "delivery": {"tls": "none", "retry_min": "1s", "retry_max": "1s"},
    }).start()
    queue_id = deliver_one(hub, "wait for me", "rcpt@sink.example")
    hub.wait_for_log(f"{queue_id}: to=<rcpt@sink.example>", "status=deferred")
    assert hub.process is not None
    started = time.monotonic()
    hub.process.send_signal(signal.SIGTERM)
    assert hub.process.wait(timeout=20) == 0
    assert time.monotonic() - started < 3 + 10
    hub.process = None
    # A sink comes up and the hub starts again: the queued message goes out.
    sink = subprocess.Popen(["smtp-sink", "-u", "root", "-d", str(tmp_path / "sink-%M."),
                             f"127.0.0.1:{sink_port}", "10"], cwd=tmp_path)
    try:
        hub.start()
        hub.wait_for_log(f"{queue_id}: to=<rcpt@sink.example>, relay=127.0.0.1", timeout=20)
        wait_until(lambda: re.search(rf"{queue_id}: to=<rcpt@sink.example>, .*status=sent",
                                     hub.log()), 20, "the delivery after the restart")
        # smtp-sink may write its dump file just after answering: wait for it.
        wait_until(lambda: any(queue_id.encode() in p.read_bytes()
                               for p in tmp_path.glob("sink-*")), 10, "the sink's dump file")
    finally:
        hub.stop()
        sink.terminate()
        sink.wait(timeout=10)


def low_port() -> int:
    for port in range(600, 1000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024 on 127.0.0.1")


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root: binds a port below 1024, drops to nobody")
def test_started_as_root_children_run_as_the_service_user_on_a_low_port() -> None:
    python = Path("/usr/bin/python3")
    assert python.exists(), "Debian's python3 is needed: the service user cannot run pyenv's"
    # A world-readable place: the service user must reach the interpreter and the state.
    base = Path(tempfile.mkdtemp(prefix="relayhub-root-", dir="/tmp"))
    base.chmod(0o755)
    try:
        venv = base / "venv"
        subprocess.run([python, "-m", "venv", venv], check=True)
        source = base / "source"
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
            ".venv", ".git", "*.egg-info", "build", "__pycache__", ".*_cache", "relayhub-data"))
        subprocess.run([venv / "bin" / "pip", "install", "-q", str(source)], check=True)
        port = low_port()
        hub = Hub(base, {"server": {"workers": 1, "user": "nobody"}}, twistd=venv / "bin" /
                  "twistd", smtp_port=port, from_checkout=False)
        hub.start(timeout=60)
        try:
            assert hub.process is not None
            assert uid_of(hub.process.pid) == 0  # the master keeps root, like Postfix's
            nobody = 65534
            children = hub.children("worker") + hub.children("qmgr")
            assert len(children) == 2 and all(uid_of(pid) == nobody for pid in children)
            queue_id = deliver_one(hub, "as nobody")
            wait_until(lambda: queue_id in delivered_ids(hub), 20, "delivery as nobody")
            mail = next((hub.state_dir / "mail" / "postmaster" / "new").iterdir())
            assert mail.stat().st_uid == nobody
        finally:
            hub.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_relayhubctl_reload_refuses_a_broken_configuration_and_keeps_running(
        tmp_path: Path) -> None:
    hub = Hub(tmp_path, {"server": {"workers": 1}}).start()
    ctl = [str(Path(sys.executable).with_name("relayhubctl")), "-c", str(hub.config_path)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        good = hub.config_path.read_text()
        hub.config_path.write_text(good.replace("[smtp]\n", "[smtp]\nmax_recipients = -1\n"))
        refused = subprocess.run([*ctl, "reload"], capture_output=True, text=True, env=env,
                                 timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert "smtp.max_recipients" in refused.stderr
        # SIGHUP with the same file: the master refuses it and the old configuration runs on.
        assert hub.process is not None
        hub.process.send_signal(signal.SIGHUP)
        hub.wait_for_log("reload refused, configuration kept", "smtp.max_recipients")
        assert deliver_one(hub, "still served")
        hub.config_path.write_text(good)
        done = subprocess.run([*ctl, "reload"], capture_output=True, text=True, env=env,
                              timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == "reloaded", done.stderr
        hub.wait_for_log("worker-1.2[")
    finally:
        hub.stop()


def test_children_exit_when_the_master_is_killed(tmp_path: Path) -> None:
    hub = Hub(tmp_path, {"server": {"workers": 2}}).start()
    children = hub.children("worker") + hub.children("qmgr")
    assert len(children) == 3
    assert hub.process is not None
    hub.process.kill()
    hub.process.wait(timeout=10)
    hub.process = None

    def alive(pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    # Their AMP channel to the master closes; they stop and exit, none lingers as an orphan.
    wait_until(lambda: not any(alive(pid) for pid in children), 20, "children to exit")
