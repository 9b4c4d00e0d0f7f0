"""Slow floods against a real daemon: 2,000 connections that each send a byte every 10 s,
from 2,000 loopback addresses (and a thousand more from one address), while legitimate clients still
get their 250 at once; the per-IP and total limits answer 421 4.7.0 and are logged once per
client; a command line or DATA section that trickles is cut by the slow-command deadline.
Plus the pure parts: RefusalLog and CommandDeadline."""

from __future__ import annotations

import contextlib
import errno
import re
import resource
import selectors
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubprocess import Hub, SMTPConnection

from relayhub.admission import OTHER_CLIENTS, ConnectionCounter, RefusalLog
from relayhub.config import settings_from_text
from relayhub.fdlimit import raise_open_files_limit
from relayhub.smtp.deadline import MIN_DATA_RATE, CommandDeadline

PER_IP = 20
TOTAL = 2100
MANY = 2000
MESSAGE = b"Subject: legit\r\n\r\nstill served\r\n"


class SlowFlood:
    """Many non-blocking client sockets in this one thread: opened in batches (the listen
    backlog is small), read with a selector, each sent one byte at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.received: dict[socket.socket, bytes] = {}
        self.closed: set[socket.socket] = set()
        self.source: dict[socket.socket, str] = {}
        self.errors: list[str] = []

    def open(self, sources: list[str], batch: int = 100) -> None:
        for start in range(0, len(sources), batch):
            for source in sources[start:start + batch]:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.bind((source, 0))
                code = sock.connect_ex(("127.0.0.1", self.port))
                assert code in (0, errno.EINPROGRESS), errno.errorcode.get(code, code)
                self.selector.register(sock, selectors.EVENT_READ)
                self.received[sock] = b""
                self.source[sock] = source
            self.pump(0.25)

    def pump(self, seconds: float) -> None:
        """Read whatever arrives for `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in self.selector.select(timeout=min(left, 0.1)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except ConnectionError as error:
                    self.errors.append(repr(error))
                    data = b""
                if data:
                    self.received[sock] += data
                else:
                    self.selector.unregister(sock)
                    self.closed.add(sock)

    def wait_for_answers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
                not data and sock not in self.closed for sock, data in self.received.items()):
            self.pump(0.2)

    def trickle(self, byte: bytes) -> None:
        """One byte on every connection that is still open."""
        for sock in self.received:
            if sock not in self.closed:
                with contextlib.suppress(OSError):
                    sock.send(byte)

    def unanswered(self) -> list[tuple[str, bool]]:
        """(source, closed) of connections that got no reply at all."""
        return [(self.source[s], s in self.closed) for s, data in self.received.items()
                if not data]

    def greeted(self, source: str | None = None) -> list[socket.socket]:
        return [s for s, data in self.received.items() if data.startswith(b"220 ")
                and s not in self.closed and (source is None or self.source[s] == source)]

    def refused(self, source: str | None = None) -> list[bytes]:
        return [data for s, data in self.received.items() if data.startswith(b"421 ")
                and (source is None or self.source[s] == source)]

    def close(self) -> None:
        for sock in self.received:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)
            sock.close()
        self.selector.close()


def legit_send(port: int, source: str) -> float:
    """A whole SMTP transaction from `source`; seconds from connect to the final 250."""
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as client:
        client.ehlo("legit.test")
        client.sendmail("postmaster@localhost", ["postmaster@localhost"], MESSAGE)
    return time.monotonic() - started


def memory_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS, KiB)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match
    return int(match.group(1))


@pytest.fixture
def flood_hub(tmp_path: Path) -> Iterator[Hub]:
    soft, hard = raise_open_files_limit()
    if soft < 2600:
        pytest.skip(f"open files limit {soft} (hard {hard}) is too low for 2,000 connections")
    hub = Hub(tmp_path, {
        "server": {"workers": 2, "shutdown_grace": "2s"},
        "smtp": {"max_connections": TOTAL, "max_connections_per_ip": PER_IP},
        # Only 127.0.0.1 is trusted: the flood addresses get the per-IP limit.
        "domains": {"trusted_networks": ["127.0.0.1/32"]},
    }).start()
    yield hub
    hub.stop()


def test_slow_flood_from_one_and_from_many_addresses(flood_hub: Hub) -> None:
    hub = flood_hub
    processes = [hub.process.pid, *hub.children("worker")] if hub.process else []
    memory_before = sum(memory_kib(pid) for pid in processes)
    flood = SlowFlood(hub.smtp_port)
    try:
        # 1,000 from one address: PER_IP get their 220, the rest 421 4.7.0 at once.
        flood.open(["127.0.0.2"] * 1000)
        flood.wait_for_answers(20)
        assert flood.unanswered() == [], (flood.unanswered(), flood.errors)
        assert len(flood.greeted("127.0.0.2")) == PER_IP
        refused_one = flood.refused("127.0.0.2")
        assert len(refused_one) == 1000 - PER_IP
        assert all(r.startswith(b"421 4.7.0 ") and b"too many connections from 127.0.0.2"
                   in r for r in refused_one), refused_one[:3]

        # 2,000 from 2,000 addresses, one each: all within the limits.
        many = [f"127.1.{n // 250}.{n % 250 + 1}" for n in range(MANY)]
        flood.open(many)
        flood.wait_for_answers(20)
        assert len(flood.greeted()) == PER_IP + MANY
        flood.trickle(b"N")  # each sends a byte every 10 s from here on

        # Legitimate clients, trusted and not, are served at once amid the flood.
        latencies = [legit_send(hub.smtp_port, "127.0.0.1"),
                     legit_send(hub.smtp_port, "127.0.0.3")]
        flood.pump(10)
        flood.trickle(b"O")
        latencies += [legit_send(hub.smtp_port, "127.0.0.1"),
                      legit_send(hub.smtp_port, "127.0.0.3")]
        memory_during = sum(memory_kib(pid) for pid in processes)
        assert max(latencies) < 1.0, latencies

        # The total limit: up to TOTAL sessions, then 421 4.7.0 for everyone, even 127.0.0.1.
        room = TOTAL - (PER_IP + MANY)
        flood.open([f"127.2.0.{n + 1}" for n in range(room + 20)] + ["127.2.9.9"] * 5)
        flood.wait_for_answers(20)
        assert len(flood.greeted()) == TOTAL
        over = flood.refused("127.2.9.9")
        assert len(over) == 5 and all(b"421 4.7.0" in r for r in over)
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            legit_send(hub.smtp_port, "127.0.0.1")
        assert refused.value.smtp_code == 421

        log = hub.wait_for_log("refused 127.2.9.9")
        # Once per client, not once per connection.
        assert len(re.findall(r"connection limit: refused 127\.0\.0\.2:", log)) == 1
        assert len(re.findall(r"connection limit: refused 127\.2\.9\.9:", log)) == 1
        assert "421 4.7.0 too many connections from 127.0.0.2" in log
        assert "421 4.7.0 too many connections" in log
        assert "connect from unknown[127.0.0.2]" in log  # the admitted ones are logged
        assert log.count("connect from unknown[127.0.0.2]") == PER_IP
        print(f"\nflood: legitimate client latencies {[round(x, 3) for x in latencies]} s; "
              f"master and workers' RSS {memory_before // 1024} MiB before, "
              f"{memory_during // 1024} MiB with {PER_IP + MANY} slow sessions")
        # Which of the last batch got in depends on which worker asked the master first.
        last_admitted = {flood.source[s] for s in flood.greeted()
                         if flood.source[s].startswith("127.2.0.")}
        assert last_admitted
    finally:
        flood.close()
    # Everything ends cleanly and the hub serves on.
    def all_disconnected() -> bool:
        log = hub.log()
        return all(f"disconnect from unknown[{source}]" in log for source in last_admitted)

    assert hub.wait(all_disconnected)
    assert legit_send(hub.smtp_port, "127.0.0.1") < 5.0


# --------------------------------------------------------------------------- slow commands


@pytest.fixture
def quick_hub(tmp_path: Path) -> Iterator[Hub]:
    hub = Hub(tmp_path, {"smtp": {"timeout": "3s"}}).start()
    yield hub
    hub.stop()


def trickle_until_closed(conn: SMTPConnection, data: bytes, interval: float,
                         limit: float) -> tuple[float, bytes]:
    """Send `data` a byte at a time; seconds until the server closed, and what it said."""
    started = time.monotonic()
    said = b""
    conn.sock.settimeout(interval)
    for byte in data:
        if time.monotonic() - started > limit:
            break
        try:
            conn.send(bytes([byte]))
            chunk = conn.sock.recv(4096)
            if not chunk:
                break
            said += chunk
        except TimeoutError:
            continue
        except OSError:
            break
    return time.monotonic() - started, said


def test_a_command_line_sent_a_byte_at_a_time_is_cut(quick_hub: Hub) -> None:
    with SMTPConnection(quick_hub.smtp_port) as conn:
        assert conn.reply()[0].startswith("220 ")
        # A byte every 0.5 s keeps the idle timeout (3 s) from ever firing.
        took, said = trickle_until_closed(conn, b"EHLO " + b"x" * 100 + b"\r\n", 0.5, 15)
    assert b"421 4.4.2 hub.test Error: timeout exceeded" in said
    assert 3.0 <= took < 6.0, took
    quick_hub.wait_for_log("timeout after CONNECT from unknown[127.0.0.1]: command line sent "
                           "too slowly")


def test_data_sent_a_byte_at_a_time_is_cut(quick_hub: Hub) -> None:
    with SMTPConnection(quick_hub.smtp_port) as conn:
        assert conn.reply()[0].startswith("220 ")
        conn.command("EHLO client.test")
        assert conn.command("MAIL FROM:<postmaster@localhost>")[0].startswith("250")
        assert conn.command("RCPT TO:<postmaster@localhost>")[0].startswith("250")
        assert conn.command("DATA")[0].startswith("354")
        took, said = trickle_until_closed(conn, b"Subject: slow\r\n\r\n" + b"y" * 100, 0.5, 15)
    assert b"421 4.4.2 hub.test Error: timeout exceeded" in said
    assert 3.0 <= took < 6.0, took
    quick_hub.wait_for_log("timeout after DATA from unknown[127.0.0.1]: DATA sent too slowly")


def test_commands_at_a_normal_pace_are_not_cut(quick_hub: Hub) -> None:
    """Each command in well under the deadline, the session far longer than it."""
    with SMTPConnection(quick_hub.smtp_port) as conn:
        assert conn.reply()[0].startswith("220 ")
        for _ in range(6):
            assert conn.command("NOOP")[0].startswith("250")
            time.sleep(1.0)
        assert conn.command("QUIT")[0].startswith("221")


# --------------------------------------------------------------------------- pure parts


def test_refusal_log_once_per_client_then_a_count_per_period() -> None:
    log = RefusalLog(period=60)
    assert log.refused("192.0.2.1", "too many connections from 192.0.2.1", 0.0)
    assert not any(log.refused("192.0.2.1", "too many connections from 192.0.2.1", t)
                   for t in range(1, 30))
    assert log.refused("192.0.2.2", "too many connections", 5.0)
    assert log.summaries(60.0) == [("192.0.2.1", 29, "too many connections from 192.0.2.1")]
    assert log.summaries(120.0) == []  # quiet for a period: forgotten
    assert log.refused("192.0.2.1", "too many connections from 192.0.2.1", 121.0)


def test_refusal_log_is_bounded() -> None:
    log = RefusalLog(max_clients=3)
    assert [log.refused(f"10.0.0.{n}", "x", 0) for n in range(3)] == [True] * 3
    assert log.refused("10.0.0.9", "x", 1)  # first of the "others"
    assert not log.refused("10.0.0.10", "x", 2)
    assert log.summaries(3) == [(OTHER_CLIENTS, 1, "x")]


def test_connection_counter_forgets_addresses_that_have_gone() -> None:
    """A flood from ever new addresses must not grow the master's table."""
    limits = settings_from_text("t.toml", "[smtp]\nmax_connections_per_ip = 2\n").smtp
    counter = ConnectionCounter(limits)
    for n in range(10_000):
        address = f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"
        assert counter.admit("worker-1", "smtp", address, False) == ""
        counter.release("worker-1", "smtp", address)
    assert counter.tracked() == 0
    assert [counter.admit("w", "smtp", "10.9.9.9", False) for _ in range(3)] == [
        "", "", "too many connections from 10.9.9.9"]
    counter.release("w", "smtp", "10.9.9.9")
    assert counter.admit("w", "smtp", "10.9.9.9", False) == ""
    assert counter.totals() == {"smtp": 2, "pop3": 0} and counter.tracked() == 1


def test_command_deadline() -> None:
    line = CommandDeadline(timeout=10)
    assert not line.overdue(100.0, 5)  # nothing started: never overdue
    line.start(100.0)
    assert not line.overdue(109.0, 1)
    assert line.overdue(110.5, 1)
    data = CommandDeadline(timeout=10)
    data.start(0.0, data=True)
    # An honest slow link: 2 KiB/s for 10 minutes is never cut.
    assert not any(data.overdue(float(t), 2 * 1024) for t in range(1, 600))
    trickle = CommandDeadline(timeout=10)
    trickle.start(0.0, data=True)
    assert trickle.overdue(11.0, 1)
    assert MIN_DATA_RATE < 7000  # below a 56k modem


def test_open_files_limit_is_raised() -> None:
    soft, hard = raise_open_files_limit()
    assert soft == hard or hard == resource.RLIM_INFINITY
