"""Unbounded input against a real daemon: a 1 GB line without CRLF, a header section of
100,000 lines, 10,000 RCPTs and a 1 MB POP3 command. Each gets the SPEC reply, and the
memory of the worker serving it (sampled from /proc while it runs) grows by less than 50 MB."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hubprocess import Hub, SMTPConnection

MAX_GROWTH = 50 * 1024 * 1024
MiB = 1024 * 1024


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match
    return int(match.group(1)) * 1024


class MemoryWatch:
    """The peak resident memory of `pid` while the with-block runs, above its start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    directory = tmp_path_factory.mktemp("unbounded")
    # Masquerading on: the server then holds the header section to rewrite it.
    hub = Hub(directory, {"domains": {"masquerade": ["example.org"]}}).start()
    yield hub
    hub.stop()


def worker(hub: Hub) -> int:
    return hub.child("worker")


def report(what: str, watch: MemoryWatch) -> None:
    print(f"\n{what}: worker RSS {watch.baseline / MiB:.1f} MiB, "
          f"peak growth {watch.growth / MiB:.1f} MiB")


def stream(sock: socket.socket, chunk: bytes, total: int, seconds: float,
           stop: Callable[[bytes], bool]) -> tuple[int, bytes]:
    """Send `chunk` until `total` bytes, `seconds` or the server closes; read meanwhile.
    Returns (bytes sent, bytes received)."""
    sock.setblocking(False)
    sent, received = 0, b""
    deadline = time.monotonic() + seconds
    view = memoryview(chunk)
    offset = 0
    while sent < total and time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
            if not data:
                break
            received += data
            if stop(received):
                break
        except BlockingIOError:
            pass
        try:
            n = sock.send(view[offset:])
            sent += n
            offset = (offset + n) % len(chunk)
        except BlockingIOError:
            time.sleep(0.001)
        except OSError:
            break
    sock.setblocking(True)
    return sent, received


def test_a_one_gigabyte_line_without_crlf(hub: Hub) -> None:
    with SMTPConnection(hub.smtp_port, timeout=30) as conn:
        assert conn.reply()[0].startswith("220 ")
        conn.command("EHLO client.test")
        with MemoryWatch(worker(hub)) as watch:
            sent, said = stream(conn.sock, b"x" * MiB, 1024 * MiB, 60, lambda _: False)
        conn.send(b"\r\n")
        assert conn.command("NOOP")[-1].startswith("250")  # the session goes on
    report(f"1 GB line ({sent / MiB:.0f} MiB sent)", watch)
    assert sent > 100 * MiB  # even on a slow machine, far more than any buffer
    assert said.startswith(b"500 5.5.2 Error: line too long\r\n")
    assert said.count(b"500 5.5.2") == 1  # one reply for the whole line
    assert watch.growth < MAX_GROWTH


def test_a_header_section_of_100000_lines(hub: Hub) -> None:
    header = b"".join(b"X-Filler-%06d: a header line of the endless kind\r\n" % n
                      for n in range(100_000))
    with SMTPConnection(hub.smtp_port, timeout=60) as conn:
        assert conn.reply()[0].startswith("220 ")
        conn.command("EHLO client.test")
        assert conn.command("MAIL FROM:<someone@host.example.org>")[0].startswith("250")
        assert conn.command("RCPT TO:<postmaster@localhost>")[0].startswith("250")
        assert conn.command("DATA")[0].startswith("354")
        with MemoryWatch(worker(hub)) as watch:
            conn.send(b"From: someone@host.example.org\r\n" + header + b"\r\nbody\r\n.\r\n")
            reply = conn.reply()
    report(f"header section of 100,000 lines ({len(header) / MiB:.1f} MiB)", watch)
    assert reply[0].startswith("250 2.0.0 Ok: queued as "), reply
    assert watch.growth < MAX_GROWTH


def test_ten_thousand_recipients(hub: Hub) -> None:
    with SMTPConnection(hub.smtp_port, timeout=60) as conn:
        assert conn.reply()[0].startswith("220 ")
        conn.command("EHLO client.test")
        assert conn.command("MAIL FROM:<postmaster@localhost>")[0].startswith("250")
        with MemoryWatch(worker(hub)) as watch:
            # Pipelined (PIPELINING is offered), in batches so neither side's buffers fill.
            replies: list[str] = []
            for batch in range(10):
                conn.send(b"".join(b"RCPT TO:<user%05d@relay.example>\r\n" % (batch * 1000 + n)
                                   for n in range(1000)))
                replies += [conn.reply()[0] for _ in range(1000)]
        assert conn.command("RSET")[0].startswith("250")
    report("10,000 RCPTs", watch)
    assert replies[:1000] == ["250 2.1.5 Ok"] * 1000  # max_recipients (1000 by default)
    assert set(replies[1000:]) == {"452 4.5.3 Error: too many recipients"}
    assert watch.growth < MAX_GROWTH


def test_a_one_megabyte_pop3_command(hub: Hub) -> None:
    with socket.create_connection(("127.0.0.1", hub.pop3_port), timeout=30) as sock:
        assert sock.recv(512).startswith(b"+OK ")
        with MemoryWatch(worker(hub)) as watch:
            sock.sendall(b"USER " + b"u" * MiB)
            sock.sendall(b"\r\nQUIT\r\n")
            said = b""
            while said.count(b"\r\n") < 2:  # then the server closes
                chunk = sock.recv(4096)
                if not chunk:
                    break
                said += chunk
    report("1 MB POP3 command", watch)
    assert said.startswith(b"-ERR Line too long\r\n"), said
    # One refusal for the whole line, and the session goes on.
    assert said.count(b"-ERR") == 1 and said.split(b"\r\n")[1].startswith(b"+OK "), said
    assert watch.growth < MAX_GROWTH
