"""Crash safety of delivery (issue 3, "Done when" 4): `kill -9` of the process running the
queue manager while 500 messages are being delivered to a sink, then a restart.

What must hold afterwards: every message the hub acknowledged with 250 arrives at the sink
at least once; a message arrives twice only if it was in flight at the kill (the sink had it,
but the queue had not yet recorded it as delivered); the queue ends empty.

The sink is a small one written here rather than `smtpsink.SMTPSink`, because it must be
slow without blocking the reactor thread it shares with every other helper: it holds its
reply to each "." for `REPLY_DELAY` seconds with `callLater`, so the kill lands while
sessions are open and messages are between the sink and the queue's records.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ReactorThread
from hubprocess import Hub, Queue, free_port
from twisted.internet.base import DelayedCall
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from relayhub.delivery.manager import MESSAGES_PER_SESSION

MESSAGES = 500
KILL_AT = MESSAGES // 2  # arrivals at the sink before the kill: well inside the run
CONCURRENCY = 4  # [delivery].concurrency_per_destination: keeps the in-flight bound small
# The tighter bound a Postfix-like queue manager meets, recording each message's result as its
# 250 arrives: per session, the message whose reply is on the wire plus the one before it
# whose record may still be committing (a SQLite commit takes milliseconds, REPLY_DELAY more).
STRICT_BOUND = 2 * CONCURRENCY
SUBMITTERS = 4  # parallel SMTP connections queueing the 500
REPLY_DELAY = 0.05  # seconds the sink holds each "250" after "." (about 80 msg/s at 4 sessions)
TIME_LIMIT = 60.0  # the whole test, a hard stop for every wait below
SINK_DOMAIN = "sink.example"
SENDER = "postmaster@localhost"

_SEQ = re.compile(rb"^X-Seq: (\d+)$")
_OUR_ID = re.compile(rb"^\s+by hub\.test \(relayhub\) with \S+ id ([0-9A-Za-z]+)")


@dataclass(frozen=True)
class Arrival:
    """One message the sink answered 250: what a real server would have delivered."""

    seq: int  # the X-Seq header the test put in
    queue_id: str  # from the hub's own Received: header
    session: int
    at: float  # time.monotonic()


class SlowSink:
    """An SMTP sink on the tests' reactor that holds each end-of-data reply for `delay` s.

    Only a reply actually written counts as an arrival. A connection lost while a reply is
    held (the hub was killed) cancels it: that message never arrived, as with a real server
    whose client vanished before the 250.
    """

    def __init__(self, rt: ReactorThread, port: int, delay: float) -> None:
        self.rt, self.port, self.delay = rt, port, delay
        self._lock = threading.Condition()
        self._arrivals: list[Arrival] = []
        self._sessions = 0
        self._open: set[_SlowSession] = set()
        self._listening: Any = None

    def listen(self) -> None:
        factory = Factory.forProtocol(lambda: _SlowSession(self))
        self._listening = self.rt.run(
            lambda: self.rt.reactor.listenTCP(self.port, factory, interface="127.0.0.1"))

    def close(self) -> None:
        def stop() -> Any:
            for session in list(self._open):
                session.tx.abortConnection()
            return self._listening.stopListening() if self._listening else None
        self.rt.run(stop)

    def arrivals(self) -> list[Arrival]:
        with self._lock:
            return list(self._arrivals)

    def open_sessions(self) -> int:
        with self._lock:
            return len(self._open)

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"sink: {what}; {len(self._arrivals)} arrivals")
                self._lock.wait(min(remaining, 0.5))

    # -- on the reactor thread --

    def _changed(self, change: Callable[[], object]) -> None:
        with self._lock:
            change()
            self._lock.notify_all()


class _SlowSession(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, sink: SlowSink) -> None:
        self.sink = sink
        self.number = 0
        self.lines: list[bytes] | None = None  # collecting DATA when not None
        self.held: DelayedCall | None = None

    @property
    def tx(self) -> Any:
        return self.transport  # ITransport's zope methods are opaque to mypy: keep it dynamic

    def connectionMade(self) -> None:
        def add() -> None:
            self.sink._sessions += 1
            self.number = self.sink._sessions
            self.sink._open.add(self)
        self.sink._changed(add)
        self.sendLine(b"220 slow.sink.test ESMTP")

    def connectionLost(self, reason: Any = None) -> None:
        if self.held is not None and self.held.active():
            self.held.cancel()  # the client is gone before it got the 250: not arrived
        self.sink._changed(lambda: self.sink._open.discard(self))

    def lineReceived(self, line: bytes) -> None:
        if self.lines is not None:
            if line == b".":
                self._end_of_data(self.lines)
                self.lines = None
            else:
                self.lines.append(line[1:] if line.startswith(b".") else line)
            return
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-slow.sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                          b"250 SIZE 10485760")
        elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            self.sendLine(b"250 2.0.0 Ok")
        elif verb == b"DATA":
            self.lines = []
            self.sendLine(b"354 End data with <CR><LF>.<CR><LF>")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.tx.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 Error: command not recognized")

    def _end_of_data(self, lines: list[bytes]) -> None:
        seq, queue_id = -1, ""
        for line in lines:
            if not line:
                break  # end of the header section
            if (m := _SEQ.match(line)) is not None and seq < 0:
                seq = int(m.group(1))
            elif (m := _OUR_ID.match(line)) is not None and not queue_id:
                queue_id = m.group(1).decode()
        # Read nothing more until the reply is out, so that replies stay in order even if
        # the client pipelines its next MAIL behind the ".".
        self.pauseProducing()

        def answer() -> None:
            self.held = None
            arrival = Arrival(seq, queue_id, self.number, time.monotonic())
            self.sink._changed(lambda: self.sink._arrivals.append(arrival))
            self.sendLine(b"250 2.0.0 Ok: queued")
            self.resumeProducing()
        self.held = self.sink.rt.reactor.callLater(self.sink.delay, answer)


def kill_queue_manager(hub: Hub) -> int:
    """SIGKILL the queue-manager process, with the master paused (SIGSTOP) so that it cannot
    restart it before the test has read the queue as the crash left it. Returns its PID."""
    assert hub.process is not None
    pid = hub.child("qmgr")
    os.kill(hub.process.pid, signal.SIGSTOP)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid in hub.children("qmgr"):
        assert time.monotonic() < deadline, "the queue manager did not die"
        time.sleep(0.02)
    return pid


def restart_after_kill(hub: Hub, killed: int) -> None:
    """Let the master go on: it reaps the dead queue manager and starts a new one (SPEC §9:
    within seconds)."""
    assert hub.process is not None
    os.kill(hub.process.pid, signal.SIGCONT)
    hub.child("qmgr", not_pid=killed)


def submit(port: int, seqs: range) -> dict[int, str]:
    """Queue one message per sequence number over one connection; seq -> queue ID."""
    ids: dict[int, str] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        for seq in seqs:
            body = (f"Subject: crash test {seq}\r\nX-Seq: {seq}\r\n\r\n"
                    f"message {seq} of {MESSAGES}\r\n").encode()
            client.mail(SENDER)
            code, reply = client.rcpt(f"user{seq}@{SINK_DOMAIN}")
            assert code == 250, reply
            code, reply = client.data(body)
            assert code == 250, reply
            ids[seq] = reply.decode().rsplit(" ", 1)[1]
    return ids


@pytest.fixture
def hub(tmp_path: Path, sink_port: int) -> Iterator[Hub]:
    hub = Hub(tmp_path, {
        "routing": {"transport": {SINK_DOMAIN: f"[127.0.0.1]:{sink_port}"}},
        "delivery": {"tls": "none", "retry_min": "1s", "retry_max": "2s",
                     "concurrency_per_destination": CONCURRENCY},
    })
    yield hub
    hub.stop()


@pytest.fixture
def sink_port() -> int:
    return free_port()


def test_kill9_mid_delivery_loses_nothing_and_repeats_only_in_flight(
    reactor_thread: ReactorThread, hub: Hub, sink_port: int,
    record_property: Callable[[str, object], None],
) -> None:
    deadline = time.monotonic() + TIME_LIMIT

    def left() -> float:
        return max(deadline - time.monotonic(), 0.1)

    queue = Queue(reactor_thread, hub.state_dir)
    sink = SlowSink(reactor_thread, sink_port, REPLY_DELAY)
    hub.start()
    try:
        # 1. Queue all 500 while nothing listens on the sink's port: each attempt is refused
        #    and deferred (retry_min 1s), so every message is durably queued before any
        #    delivery succeeds and the kill meets a full queue, not a half-submitted one.
        per = -(-MESSAGES // SUBMITTERS)
        with ThreadPoolExecutor(SUBMITTERS) as pool:
            parts = pool.map(lambda i: submit(hub.smtp_port, range(i * per,
                                                                   min((i + 1) * per, MESSAGES))),
                             range(SUBMITTERS))
            submitted = {seq: qid for part in parts for seq, qid in part.items()}
        assert len(submitted) == MESSAGES and len(set(submitted.values())) == MESSAGES
        by_id = {qid: seq for seq, qid in submitted.items()}

        # 2. Let the sink take mail, slowly, and kill the queue manager about half-way.
        sink.listen()
        sink.wait(lambda: len(sink._arrivals) >= KILL_AT, left(), f"{KILL_AT} arrivals")
        sessions_open = sink.open_sessions()
        killed_at = time.monotonic()
        killed = kill_queue_manager(hub)
        # The kernel closes the dead process's connections; held replies are then cancelled.
        sink.wait(lambda: not sink._open, left(), "connections closed after the kill")
        before = sink.arrivals()
        assert len({a.seq for a in before}) < MESSAGES, "the kill came after the last delivery"
        assert sessions_open > 0, "no delivery session was open at the kill"

        # What the queue says with delivery dead: a message that left it was recorded as
        # delivered (so it must have arrived, and must not come again); one still in it and
        # already at the sink was in flight, the only kind that may repeat.
        still_queued = queue.ids()
        assert still_queued <= set(by_id), "the queue holds messages we never sent"
        recorded = set(by_id) - still_queued
        arrived_ids = {a.queue_id for a in before}
        assert recorded <= arrived_ids, \
            f"recorded as delivered but never arrived: {sorted(recorded - arrived_ids)[:10]}"
        in_flight = {by_id[qid] for qid in arrived_ids & still_queued}
        # A loose bound (every message a session could carry); the strict one follows below.
        bound = CONCURRENCY * MESSAGES_PER_SESSION
        assert len(in_flight) <= bound, (len(in_flight), bound)

        # 3. Restart: leases of the dead manager are released and the rest is delivered.
        restart_after_kill(hub, killed)
        restarted_at = time.monotonic()
        sink.wait(lambda: len({a.seq for a in sink._arrivals}) >= MESSAGES, left(),
                  "all messages after the restart")
        deadline_queue = time.monotonic() + left()
        while queue.ids() and time.monotonic() < deadline_queue:
            time.sleep(0.2)
        assert not queue.ids(), f"queue not empty: {sorted(queue.ids())[:10]}"
        finished_at = time.monotonic()
    finally:
        sink.close()

    arrivals = sink.arrivals()
    counts = Counter(a.seq for a in arrivals)
    duplicates = sorted(seq for seq, n in counts.items() if n > 1)
    extra = len(arrivals) - len(counts)
    summary = (f"{MESSAGES} messages, {len(before)} arrived before the kill, "
               f"{len(in_flight)} in flight at the kill (bound {bound}), {extra} duplicate "
               f"arrival(s) of {len(duplicates)} message(s); kill after "
               f"{killed_at - arrivals[0].at:.1f}s of delivery, restart to empty queue "
               f"{finished_at - restarted_at:.1f}s")
    record_property("duplicates", extra)
    record_property("in_flight_at_kill", len(in_flight))
    record_property("crash_summary", summary)
    print(summary)

    # Every acknowledged message arrived, under the queue ID it was acknowledged with.
    assert set(counts) == set(range(MESSAGES)), summary
    arrived_as = {a.seq: a.queue_id for a in arrivals}
    wrong = {seq for seq in counts if arrived_as[seq] != submitted[seq]}
    assert not wrong, f"arrived with another queue ID: {sorted(wrong)[:10]}; {summary}"
    def unlogged() -> list[str]:
        log = hub.log()
        return [qid for qid in by_id if not re.search(
            rf"{qid}: to=<user\d+@{re.escape(SINK_DOMAIN)}>, .*status=sent", log)]

    deadline = time.monotonic() + 10  # the queue manager's lines reach the log via the master
    while unlogged() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not unlogged(), f"no status=sent log line for {unlogged()[:10]}; {summary}"
    # Only in-flight messages came twice, at most once more each (one restart), and never
    # more of them than could have been in flight.
    assert set(duplicates) <= in_flight, \
        f"repeated though not in flight: {sorted(set(duplicates) - in_flight)[:10]}; {summary}"
    assert max(counts.values()) <= 2, summary
    assert extra <= bound, summary
    # Results are recorded per message as each reply arrives, so each session can repeat
    # at most the message on the wire and the one whose record was still being written.
    assert extra <= STRICT_BOUND, summary
