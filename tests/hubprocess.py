"""Runs a real `twistd relayhub` daemon for tests: config file, free loopback ports, start,
wait for the banner, kill -9, restart; and plain-socket SMTP helpers."""

from __future__ import annotations

import email
import email.policy
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

from conftest import ReactorThread

from relayhub.queue.sqlite import SQLiteQueueStore
from relayhub.queue.store import StoredMessage

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).with_name("twistd")


# Ports this test run has given out already. The kernel may give a closed probe's port to
# the next probe, and a hub's listeners bind with SO_REUSEPORT: two of them on one port
# would share its connections (POP3S answering in plaintext, one time in thousands).
PORTS_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nobody listens on, never the same one twice in this test run."""
    while True:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
        if port not in PORTS_HANDED_OUT:
            PORTS_HANDED_OUT.add(port)
            return port


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        pairs = (f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }"
    raise TypeError(value)


def write_toml(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> None:
    lines: list[str] = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))


class Hub:
    """One relayhub daemon in `directory`, with its own state and ports."""

    def __init__(self, directory: Path, overrides: Mapping[str, Mapping[str, Any]] = {}, *,
                 twistd: Path = TWISTD, smtp_port: int | None = None,
                 from_checkout: bool = True) -> None:
        """`twistd`: another installation's (with `from_checkout` false, it runs what that
        installation holds rather than this checkout)."""
        self.directory = directory
        self.state_dir = directory / "state"
        self.twistd = twistd
        self.from_checkout = from_checkout
        self.smtp_port = smtp_port or free_port()
        self.pop3_port = free_port()
        self.log_path = directory / "relayhub.log"
        sections: dict[str, dict[str, Any]] = {
            "server": {"hostname": "hub.test", "state_dir": str(self.state_dir), "workers": 1},
            # No client-name lookups through the machine's resolver: a test must not wait
            # on whatever DNS the host has (tests/test_clientname.py turns them on).
            "smtp": {"listen": [f"tcp:{self.smtp_port}:interface=127.0.0.1"],
                     "reverse_dns": False},
            "pop3": {"listen": [f"tcp:{self.pop3_port}:interface=127.0.0.1"]},
            "domains": {"local": ["localhost", "example.org"], "relay": ["relay.example"]},
        }
        for section, keys in overrides.items():
            sections.setdefault(section, {}).update(keys)
        self.config_path = directory / "relayhub.toml"
        write_toml(self.config_path, sections)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Hub:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if not self.from_checkout:
            del env["PYTHONPATH"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.twistd), "-n", "--pidfile=", "relayhub", "-c", str(self.config_path)],
                cwd=self.directory, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"relayhub exited {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=2) as s:
                    if s.recv(512).startswith(b"220 "):
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"relayhub did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, *needles: str, timeout: float = 10.0) -> str:
        """The log once it holds every needle: children's lines reach it through the master,
        a moment after what they describe."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if all(needle in log for needle in needles):
                return log
            if time.monotonic() > deadline:
                missing = [n for n in needles if n not in log]
                raise AssertionError(f"not in the log: {missing}\n{log[-3000:]}")
            time.sleep(0.05)

    def send(self, recipients: Sequence[str],
             body: bytes = b"Subject: test\r\n\r\nhello\r\n",
             sender: str = "postmaster@localhost") -> str:
        """Send one message with smtplib; its queue ID from the 250 reply."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail(sender)
            for rcpt in recipients:
                assert client.rcpt(rcpt)[0] == 250, rcpt
            code, reply = client.data(body)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]

    def mailbox(self, user: str) -> list[EmailMessage]:
        """The messages delivered into a user's Maildir, oldest first."""
        new = self.state_dir / "mail" / user / "new"
        files = sorted(new.iterdir()) if new.is_dir() else []
        return [email.message_from_bytes(f.read_bytes(), policy=email.policy.default)  # type: ignore[misc]
                for f in files]

    def wait(self, condition: Callable[[], T], timeout: float = 20.0) -> T:
        """Poll until `condition()` is true and return it; fail with the log's tail."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert value, f"timed out; hub log:\n{self.log()[-3000:]}"
        return value

    def children(self, module: str) -> list[int]:
        """Live PIDs of the master's children running `module` ("worker" or "qmgr")."""
        assert self.process is not None
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if (int(ppid) == self.process.pid and state != "Z"
                    and f"relayhub.process.{module}".encode() in cmdline):
                found.append(int(entry.name))
        return found

    def child(self, module: str, timeout: float = 10.0, not_pid: int | None = None) -> int:
        """The PID of the master's (single) child running `module`, waiting for one that is
        not `not_pid` (after a restart)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [pid for pid in self.children(module) if pid != not_pid]
            if pids:
                return pids[0]
            time.sleep(0.05)
        raise AssertionError(f"no {module} child of the master:\n{self.log()[-2000:]}")

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None


class Queue:
    """Reads the hub's queue through the store API, as relayhubctl will."""

    def __init__(self, reactor_thread: ReactorThread, state_dir: Path,
                 dsn: str | None = None) -> None:
        """`dsn`: the hub's queue is in this PostgreSQL database."""
        self.rt = reactor_thread
        self.state_dir = state_dir
        self.dsn = dsn

    def _store(self) -> Any:
        if self.dsn is not None:
            from relayhub.queue.postgresql import PostgreSQLQueueStore

            return PostgreSQLQueueStore(self.dsn, self.state_dir, hub="tests")
        return SQLiteQueueStore(self.state_dir)

    def messages(self) -> Sequence[StoredMessage]:
        store = self._store()
        self.rt.run(store.open)
        try:
            return self.rt.run(store.list_messages)
        finally:
            self.rt.run(store.close)

    def body(self, queue_id: str) -> bytes:
        return (self.state_dir / "queue").joinpath(
            SQLiteQueueStore(self.state_dir).body_path(queue_id)
        ).read_bytes()

    def ids(self) -> set[str]:
        return {m.queue_id for m in self.messages()}


class SMTPConnection:
    """A raw SMTP client socket: send exact bytes, read whole replies."""

    def __init__(self, port: int, source: str | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout,
            source_address=(source, 0) if source else None,
        )
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[str]:
        """One reply, possibly multi-line, as text lines."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self._buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\r\n", 1)
            line = raw.decode()
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    def code(self) -> int:
        return int(self.reply()[-1][:3])

    def command(self, line: str) -> list[str]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True once the server has closed the connection (after any unread replies)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self._buf += chunk
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SMTPConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
