"""relayhubctl queue, route and status against a real daemon (running and stopped), a real DNS
server and SMTP sinks on loopback, run as the administrator runs it: a separate process."""

from __future__ import annotations

import email
import email.policy
import json
import os
import random
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import ReactorThread
from dnsserver import DNSServer
from hubprocess import REPO, Hub, Queue, free_port, write_toml
from smtpsink import SMTPSink
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from relayhub import control

SENDER = "postmaster@localhost"  # a local mailbox: bounces to it can be read back
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
MESSAGE_KEYS = frozenset({"id", "size", "arrival", "sender", "held", "subject",
                          "recipients"})
RECIPIENT_KEYS = frozenset({"address", "status", "attempts", "next_attempt", "last_error"})
STATS_KEYS = frozenset({"messages", "recipients", "held", "oldest_age_seconds", "by_domain"})
ENCODED_SUBJECT = "=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?="


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def ctl(config: Path, *args: str) -> Result:
    """Run relayhubctl from the working tree, as a separate process."""
    done = subprocess.run(
        [sys.executable, "-m", "relayhub.admin", "-c", str(config), *args],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    return Result(done.returncode, done.stdout, done.stderr)


def zone() -> dict[str, Any]:
    return {
        "sink.example": {"MX": [(10, "mx.sink.example")]},
        "mx.sink.example": {"A": ["127.0.0.14"]},
        "dead.example": {"MX": [(10, "mx.dead.example")]},
        "mx.dead.example": {"A": ["127.0.0.11"]},  # nothing listens there: refused
        "relay.example": {"MX": [(5, "mx.relay.example")]},
        "mx.relay.example": {"A": ["127.0.0.16"]},
    }


class World:
    """A hub (not started) with DNS and sinks that all listen on one SMTP port."""

    def __init__(self, rt: ReactorThread, tmp: Path, dns: DNSServer,
                 overrides: dict[str, dict[str, Any]]) -> None:
        self.rt, self.port = rt, free_port()
        delivery = {"nameservers": [f"127.0.0.1:{dns.port}"], "smtp_port": self.port,
                    "retry_min": "1h", "retry_max": "2h", "tls": "none"}
        delivery.update(overrides.pop("delivery", {}))
        self.hub = Hub(tmp, {"delivery": delivery, **overrides})
        self.config = self.hub.config_path
        self.queue = Queue(rt, self.hub.state_dir)

    def ctl(self, *args: str) -> Result:
        return ctl(self.config, *args)

    def sink(self, host: str, **options: Any) -> SMTPSink:
        return SMTPSink(self.rt, host=host, port=self.port, **options)

    def send(self, recipients: list[str], subject: str = "test", sender: str = SENDER) -> str:
        body = f"Subject: {subject}\r\nFrom: <{sender}>\r\n\r\nhello\r\n".encode()
        return self.hub.send(recipients, body, sender)

    def recipients(self, queue_id: str) -> list[Any]:
        found = [m for m in self.queue.messages() if m.queue_id == queue_id]
        return list(found[0].recipients) if found else []

    def wait(self, condition: Callable[[], Any], timeout: float = 20.0) -> Any:
        return self.hub.wait(condition, timeout)

    def wait_deferred(self, queue_id: str) -> None:
        self.wait(lambda: all(r.status == "deferred" for r in self.recipients(queue_id))
                  and self.recipients(queue_id))

    def reports(self, user: str = "postmaster") -> list[email.message.EmailMessage]:
        return [m for m in self.hub.mailbox(user) if m.get_content_type() == "multipart/report"]


@pytest.fixture
def dns(reactor_thread: ReactorThread) -> Iterator[DNSServer]:
    with DNSServer(reactor_thread, zone()) as server:
        yield server


@pytest.fixture
def world(reactor_thread: ReactorThread, tmp_path: Path, dns: DNSServer,
          request: pytest.FixtureRequest) -> Iterator[World]:
    marker = request.node.get_closest_marker("hub")
    built = World(reactor_thread, tmp_path, dns, dict(marker.args[0]) if marker else {})
    yield built
    built.hub.stop()


def check_message_json(shown: dict[str, Any]) -> None:
    """The SPEC §8 shape of one `queue list --json` entry, key for key and type for type."""
    assert set(shown) >= MESSAGE_KEYS
    assert isinstance(shown["id"], str) and isinstance(shown["size"], int)
    assert TIME.fullmatch(shown["arrival"]) and isinstance(shown["held"], bool)
    assert isinstance(shown["sender"], str) and isinstance(shown["subject"], str)
    for recipient in shown["recipients"]:
        assert set(recipient) == RECIPIENT_KEYS
        assert recipient["status"] in ("queued", "deferred", "delivered", "bounced")
        assert isinstance(recipient["attempts"], int)
        assert recipient["next_attempt"] is None or TIME.fullmatch(recipient["next_attempt"])
        assert recipient["last_error"] is None or isinstance(recipient["last_error"], str)


def check_stats_json(stats: dict[str, Any]) -> None:
    assert set(stats) == STATS_KEYS
    assert set(stats["recipients"]) == {"queued", "deferred", "delivered", "bounced"}
    assert all(isinstance(n, int) for n in stats["recipients"].values())
    assert isinstance(stats["oldest_age_seconds"], int)
    assert all(isinstance(n, int) for n in stats["by_domain"].values())


# -- every command, daemon stopped and running ---------------------------------------------

@pytest.mark.parametrize("running", [False, True], ids=["stopped", "running"])
def test_every_queue_command_in_both_forms(world: World, running: bool) -> None:
    world.hub.start()
    first = world.send(["x@dead.example"], subject=ENCODED_SUBJECT)
    second = world.send(["y@dead.example", "z@dead.example"])
    world.wait_deferred(first)
    world.wait_deferred(second)
    if not running:
        world.hub.stop()

    # list, both forms, and the filters
    listed = world.ctl("queue", "list", "--json")
    assert listed.code == 0, listed.err
    entries = {entry["id"]: entry for entry in listed.json()}
    assert list(entries) == [first, second]
    for entry in entries.values():
        check_message_json(entry)
    one = entries[first]
    assert one["subject"] == "Grüße aus Köln" and one["sender"] == SENDER
    assert not one["held"]
    [recipient] = one["recipients"]
    assert recipient["status"] == "deferred" and recipient["attempts"] == 1
    assert recipient["last_error"].startswith("4.4.1 connect to mx.dead.example[127.0.0.11]")
    text = world.ctl("queue", "list")
    assert text.code == 0
    assert first in text.out and "Subject: Grüße aus Köln" in text.out
    assert "-> x@dead.example  deferred, 1 attempt, next " in text.out
    assert "4.4.1 connect to mx.dead.example[127.0.0.11]" in text.out
    assert "2 messages, 3 recipients pending" in text.out
    assert world.ctl("queue", "list", "--held", "--json").json() == []
    assert world.ctl("queue", "list", "--held").out.strip() == "No matching messages"
    assert len(world.ctl("queue", "list", "--deferred", "--json").json()) == 2
    assert world.ctl("queue", "list", "--domain", "other.example", "--json").json() == []

    # show, both forms
    shown = world.ctl("queue", "show", first, "--json", "--body")
    assert shown.code == 0, shown.err
    detail = shown.json()
    check_message_json(detail)
    # "hub": the hub that accepted it (this one's name, for a queue of its own).
    assert set(detail) == MESSAGE_KEYS | {"hub", "headers", "history", "body"}
    assert detail["hub"] == "hub.test"
    assert {"name": "Subject", "value": ENCODED_SUBJECT} in detail["headers"]
    assert detail["headers"][0]["name"] == "Received"  # ours, first
    [attempt] = detail["history"]
    assert set(attempt) == {"time", "recipient", "relay", "dsn", "text"}
    assert TIME.fullmatch(attempt["time"]) and attempt["recipient"] == "x@dead.example"
    assert attempt["dsn"] == "4.4.1" and isinstance(attempt["relay"], str)
    assert attempt["text"].startswith("connect to mx.dead.example[127.0.0.11]")
    assert detail["body"].endswith("\r\n\r\nhello\r\n")
    text = world.ctl("queue", "show", first)
    assert text.code == 0 and "Subject:    Grüße aus Köln" in text.out
    assert re.search(r"  x@dead\.example  relay=\S+  dsn=4\.4\.1  connect to mx\.dead\.example",
                     text.out)
    assert "hello" not in text.out and "hello" in world.ctl("queue", "show", first, "--body").out

    # stats and status, both forms
    stats = world.ctl("queue", "stats", "--json").json()
    check_stats_json(stats)
    assert (stats["messages"], stats["held"]) == (2, 0)
    assert stats["recipients"]["deferred"] == 3 and stats["by_domain"] == {"dead.example": 3}
    assert "messages:     2 (0 held)" in world.ctl("queue", "stats").out
    status = world.ctl("status", "--json").json()
    assert set(status) == {"processes", "connections", "queue"}
    check_stats_json(status["queue"])
    assert set(status["connections"]) == {"smtp", "pop3"}
    text = world.ctl("status").out
    if running:
        assert world.hub.process is not None
        assert world.hub.process.pid in [p["pid"] for p in status["processes"]]
        for process in status["processes"]:
            assert process["role"] in ("master", "worker", "queue-manager")
            assert isinstance(process["uptime_seconds"], int | float)
        assert "relayhub is running" in text
    else:
        assert status["processes"] == [] and status["connections"] == {"smtp": 0, "pop3": 0}
        assert "relayhub is not running" in text

    # hold, release, flush
    held = world.ctl("queue", "hold", first)
    assert held.code == 0 and f"{first}: held" in held.out
    assert ("relayhub was notified" if running else "relayhub is not running") in held.out
    assert [e["id"] for e in world.ctl("queue", "list", "--held", "--json").json()] == [first]
    assert [e["id"] for e in world.ctl("queue", "list", "--deferred", "--json").json()] == [
        second]
    assert f"{first}!" in world.ctl("queue", "list").out
    flushed = world.ctl("queue", "flush")
    assert flushed.code == 0
    assert f"{first}: held: not flushed" in flushed.out and f"{second}: due now" in flushed.out
    released = world.ctl("queue", "release", "--all")
    assert released.code == 0 and f"{first}: released" in released.out
    assert f"{second}: not held" in released.out
    assert world.ctl("queue", "flush", "--domain", "dead.example").code == 0

    # pause and resume
    assert world.ctl("queue", "pause", "--domain", "Dead.Example", "--for", "2h").code == 0
    assert re.search(r"paused: +dead\.example until " + TIME.pattern,
                     world.ctl("queue", "stats").out)
    resumed = world.ctl("queue", "resume", "--domain", "dead.example")
    assert resumed.code == 0 and "resumed" in resumed.out
    assert "was not paused" in world.ctl("queue", "resume", "--domain", "dead.example").out

    # bounce: the queue manager returns it to the sender when it runs
    bounced = world.ctl("queue", "bounce", second)
    assert bounced.code == 0 and f"{second}: to be returned to the sender" in bounced.out
    if running:
        [report] = world.wait(world.reports)
        assert second in report.as_string() and "5.0.0" in report.as_string()
        world.wait(lambda: second not in world.queue.ids())
    else:
        assert "to be returned to the sender" in world.ctl("queue", "show", second).out

    # delete
    deleted = world.ctl("queue", "delete", first)
    assert deleted.code == 0 and f"{first}: deleted" in deleted.out
    assert first not in world.queue.ids()
    assert not Path(world.hub.state_dir / "queue" / "bodies" / first).exists()

    # an unknown ID: status 1, and the known ones are still acted on
    for command in (["show"], ["hold"], ["release"], ["flush"], ["delete"], ["bounce"]):
        missing = world.ctl("queue", *command, "NoSuchId00000")
        assert missing.code == 1, command
        assert "NoSuchId00000: no such message in the queue" in missing.err
    if not running:
        both = world.ctl("queue", "hold", second, "NoSuchId00000")
        assert both.code == 1 and f"{second}: held" in both.out


def test_usage_and_configuration_errors_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "relayhub.toml"
    write_toml(config, {"server": {"state_dir": str(tmp_path / "state"),
                                   "hostname": "hub.test"}})
    for args in (["queue"], ["queue", "frobnicate"], ["queue", "hold"],
                 ["queue", "flush", "--all", "ABCDEFGHIJKL"], ["queue", "bounce"],
                 ["queue", "delete", "--all", "--domain", "x.example"],
                 ["queue", "pause", "--domain", "x.example", "--for", "2y"],
                 ["queue", "pause"], ["queue", "list", "--bogus"], ["queue", "show"],
                 ["route"], ["route", "not an address"], ["route", "a@b.example", "--client",
                                                           "not-an-ip"], ["status", "extra"]):
        result = ctl(config, *args)
        assert result.code == 2, (args, result)
        assert result.err, args
    write_toml(config, {"server": {"state_dir": str(tmp_path / "state"), "hostnme": "x"}})
    for args in (["queue", "list"], ["queue", "flush"], ["status"], ["route", "a@b.example"]):
        result = ctl(config, *args)
        assert result.code == 2 and "server.hostnme: unknown key" in result.err, result
    assert ctl(tmp_path / "missing.toml", "queue", "list").code == 2


def test_no_queue_yet_is_an_empty_queue_and_nothing_is_created(tmp_path: Path) -> None:
    config = tmp_path / "relayhub.toml"
    state = tmp_path / "state"
    write_toml(config, {"server": {"state_dir": str(state), "hostname": "hub.test"}})
    assert ctl(config, "queue", "list").out.strip() == "Mail queue is empty"
    assert ctl(config, "queue", "list", "--json").json() == []
    assert ctl(config, "queue", "stats", "--json").json()["messages"] == 0
    assert ctl(config, "queue", "flush").code == 0
    assert ctl(config, "queue", "show", "ABCDEFGHIJKL").code == 1
    paused = ctl(config, "queue", "pause", "--domain", "x.example")
    assert paused.code == 1 and "no queue" in paused.err
    # A root-owned queue created here would lock the daemon's service user out.
    assert not state.exists()


# -- a running daemon acts on changes at once ----------------------------------------------

def test_flush_delivers_a_message_deferred_for_an_hour_within_2s(world: World) -> None:
    with world.sink("127.0.0.14", rcpt_replies={"late@sink.example": ["451 4.3.0 later"]}
                    ) as sink:
        world.hub.start()
        queue_id = world.send(["late@sink.example"])
        world.wait_deferred(queue_id)
        [recipient] = world.recipients(queue_id)
        assert recipient.next_attempt > time.time() + 1800  # retry_min is an hour
        started = time.monotonic()
        flushed = world.ctl("queue", "flush", queue_id)
        assert flushed.code == 0 and "relayhub was notified" in flushed.out
        [message] = sink.wait_messages(1, timeout=2.0)
        assert time.monotonic() - started < 2.0
        assert message.accepted == ["late@sink.example"]
        world.wait(lambda: queue_id not in world.queue.ids())


def test_hold_keeps_a_message_back_even_from_flush_until_released(world: World) -> None:
    with world.sink("127.0.0.14", rcpt_replies={"held@sink.example": ["451 4.3.0 later"]}
                    ) as sink:
        world.hub.start()
        queue_id = world.send(["held@sink.example"])
        world.wait_deferred(queue_id)
        assert world.ctl("queue", "hold", queue_id).code == 0
        assert "held: not flushed" in world.ctl("queue", "flush", queue_id).out
        assert world.ctl("queue", "flush", "--all").code == 0
        time.sleep(1.5)
        assert sink.messages() == [] and len(sink.transactions()) == 1  # the first attempt
        started = time.monotonic()
        assert world.ctl("queue", "release", queue_id).code == 0
        sink.wait_messages(1, timeout=2.0)
        assert time.monotonic() - started < 2.0


def test_pause_holds_a_domain_back_until_resumed_or_over(world: World) -> None:
    with world.sink("127.0.0.14") as sink:
        world.hub.start()
        assert world.ctl("queue", "pause", "--domain", "sink.example").code == 0
        queue_id = world.send(["p@sink.example"])
        time.sleep(1.5)
        assert sink.connections == 0
        assert world.recipients(queue_id)[0].status == "queued"
        started = time.monotonic()
        assert world.ctl("queue", "resume", "--domain", "sink.example").code == 0
        sink.wait_messages(1, timeout=2.0)
        assert time.monotonic() - started < 2.0

        # A pause with an end: the queue manager wakes up for it by itself.
        assert world.ctl("queue", "pause", "--domain", "sink.example", "--for", "3s").code == 0
        paused_at = time.monotonic()
        world.send(["q@sink.example"])
        time.sleep(1.0)
        assert len(sink.messages()) == 1
        sink.wait_messages(2, timeout=6.0)
        assert time.monotonic() - paused_at >= 2.5


def test_queue_files_and_control_socket_are_private(world: World) -> None:
    world.hub.start()
    queue_id = world.send(["x@dead.example"])
    world.wait_deferred(queue_id)
    assert world.ctl("queue", "hold", queue_id).code == 0  # relayhubctl wrote to it too
    state = world.hub.state_dir
    expected = {
        control.socket_path(state): 0o600,
        state / "queue": 0o700,
        state / "queue" / "bodies": 0o700,
        state / "queue" / "bodies" / queue_id: 0o600,
        state / "queue" / "queue.db": 0o600,
        state / "queue" / "queue.db-wal": 0o600,
        state / "queue" / "queue.db-shm": 0o600,
    }
    for path, mode in expected.items():
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, path


# -- delete while a delivery is in flight --------------------------------------------------

@dataclass
class SlowSession:
    number: int
    connected: float  # time.monotonic() when the sink accepted the connection
    mails: list[tuple[float, str]] = field(default_factory=list)  # (when, sender) per MAIL


class SlowSink:
    """An SMTP server that answers every command after `delay` seconds and every RCPT with
    451, so each attempt takes a while and every message is retried; it records each MAIL
    FROM (the start of an attempt) with its time."""

    def __init__(self, rt: ReactorThread, delay: float) -> None:
        self.rt, self.delay = rt, delay
        self.lock = threading.Lock()
        self.sessions: list[SlowSession] = []
        factory = Factory.forProtocol(lambda: _SlowProtocol(self))
        self._port = rt.run(lambda: rt.reactor.listenTCP(0, factory, interface="127.0.0.1"))
        self.port: int = self._port.getHost().port

    def attempts(self, sender: str) -> list[float]:
        """When each MAIL FROM:<sender> arrived (time.monotonic())."""
        with self.lock:
            return sorted(when for s in self.sessions for when, who in s.mails if who == sender)

    def close(self) -> None:
        self.rt.run(self._port.stopListening)


class _SlowProtocol(LineOnlyReceiver):
    def __init__(self, sink: SlowSink) -> None:
        self.sink = sink
        self.session = SlowSession(0, 0.0)

    def connectionMade(self) -> None:
        with self.sink.lock:
            self.session = SlowSession(len(self.sink.sessions) + 1, time.monotonic())
            self.sink.sessions.append(self.session)
        self._answer("220 slow.test ESMTP")

    def _answer(self, reply: str) -> None:
        self.sink.rt.reactor.callLater(self.sink.delay, self._write, reply)

    def _write(self, reply: str) -> None:
        if self.transport is not None and self.transport.connected:
            self.sendLine(reply.encode())
            if reply.startswith("221"):
                self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"MAIL":
            sender = line.decode().partition("<")[2].partition(">")[0]
            with self.sink.lock:
                self.session.mails.append((time.monotonic(), sender))
        self._answer({b"EHLO": "250 slow.test", b"HELO": "250 slow.test",
                      b"MAIL": "250 2.1.0 Ok", b"RCPT": "451 4.3.0 slow, try again later",
                      b"RSET": "250 2.0.0 Ok", b"QUIT": "221 2.0.0 Bye"}.get(
                          verb, "502 5.5.2 Error"))


ROUNDS = 10
PER_ROUND = 4
# From the check that lets an attempt go to its MAIL FROM reaching the sink: one write on an
# open loopback connection between two processes.
START_GRACE = 0.25


def test_delete_while_in_flight_no_attempt_starts_after_it_returns(
        reactor_thread: ReactorThread, tmp_path: Path, dns: DNSServer) -> None:
    """Four messages per round to one slow next hop with one session at a time, so that at
    any moment one may be in a session, others leased and waiting in memory, others between
    retries; at a random moment one of them is deleted and another held. Documented
    semantics: an attempt whose check passed before the change committed may still run (it
    is in flight), none starts after the command has returned, and the results of one in
    flight for a deleted message are discarded.

    An attempt starts with its MAIL FROM, which the session sends right after the check, so
    the sink's clock can tell: no MAIL FROM for a changed message may arrive later than the
    moment the command returned (plus START_GRACE for the write in transit), and at most one
    may arrive while the command runs (the one in flight). Held messages check the same
    guarantee where a removed body file cannot mask a missing check.
    """
    sink = SlowSink(reactor_thread, delay=0.1)
    rng = random.Random(7)
    world = World(reactor_thread, tmp_path, dns, {
        "delivery": {"retry_min": "1s", "retry_max": "1s", "concurrency_per_destination": 1},
        # A literal next hop: no DNS between the check and the connection.
        "routing": {"transport": {"slow.example": f"[127.0.0.1]:{sink.port}"}},
    })
    try:
        world.hub.start()
        changed: list[tuple[str, str, str, float, float]] = []  # action, sender, ID, times
        for round_ in range(ROUNDS):
            sent = []
            for n in range(PER_ROUND):
                sender = f"race-{round_}-{n}@example.net"
                sent.append((sender, world.send(["r@slow.example"], sender=sender)))
            time.sleep(rng.uniform(0.0, 0.4))
            victims = rng.sample(sent, 2)
            for action, (sender, queue_id) in zip(rng.sample(["delete", "hold"], 2), victims,
                                                  strict=True):
                before = time.monotonic()
                result = world.ctl("queue", action, queue_id)
                returned = time.monotonic()
                assert result.code == 0, result.err
                changed.append((action, sender, queue_id, before, returned))
                if action == "delete":
                    # Gone for good: no row, no body, and `show` knows nothing of it.
                    assert world.ctl("queue", "show", queue_id).code == 1
                    assert not (world.hub.state_dir / "queue" / "bodies" / queue_id).exists()
        time.sleep(2.5)  # every survivor is retried at least twice meanwhile
        raced = 0
        for action, sender, queue_id, before, returned in changed:
            attempts = sink.attempts(sender)
            late = [when - returned for when in attempts if when > returned + START_GRACE]
            assert late == [], (action, queue_id, "attempts this long after it returned", late)
            in_flight = [when for when in attempts if when > before]
            assert len(in_flight) <= 1, (action, queue_id, in_flight)
            raced += len(in_flight)
        print(f"{raced} of {len(changed)} changes came while an attempt of that message started")
        survivors = world.ctl("queue", "list", "--json").json()
        assert len(survivors) == (PER_ROUND - 1) * ROUNDS
        assert sum(m["held"] for m in survivors) == ROUNDS
        # Nothing was lost or finished by the churn: every survivor is still pending.
        assert all(r["status"] in ("queued", "deferred") for m in survivors
                   for r in m["recipients"])
        assert world.ctl("queue", "delete", "--all").code == 0
        time.sleep(1.0)
        assert world.queue.ids() == set()
        assert list((world.hub.state_dir / "queue" / "bodies").iterdir()) == []
        log = world.hub.log()
        assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
    finally:
        world.hub.stop()
        sink.close()


# -- route -----------------------------------------------------------------------------------

@pytest.mark.hub({"routing": {"transport": {"eng.example.org": "[127.0.0.20]:2600"}},
                  "domains": {"masquerade": ["example.org"]}})
def test_route_explains_the_next_hop(world: World) -> None:
    (world.hub.state_dir).mkdir(parents=True, exist_ok=True)
    (world.hub.state_dir / "users").write_text("alice:{PLAIN}secret:Alice Example\n")

    def route(address: str, *options: str) -> dict[str, Any]:
        result = world.ctl("route", address, "--json", *options)
        assert result.code == 0, result.err
        found: dict[str, Any] = result.json()
        return found

    local = route("Alice@LOCALHOST")
    assert local["domain_class"] == "local" and local["policy"]["accepted"]
    [hop] = local["routes"]
    assert hop["next_hop"] == {"type": "local", "mailbox": "alice", "known": True,
                               "maildir": str(world.hub.state_dir / "mail" / "alice")}
    unknown = route("nobody@localhost")
    assert unknown["policy"] == {"accepted": False, "reply": "550 5.1.1 <nobody@localhost>: "
                                 "Recipient address rejected: User unknown"}

    relay = route("bob@relay.example")
    assert relay["domain_class"] == "relay" and relay["policy"]["accepted"]
    [hop] = relay["routes"]
    assert hop["next_hop"]["type"] == "mx"
    assert hop["next_hop"]["mx"] == [{"preference": 5, "host": "mx.relay.example"}]
    assert [(a["address"], a["port"]) for a in hop["next_hop"]["addresses"]] == [
        ("127.0.0.16", world.port)]
    assert hop["tls"]["mode"] == "none"

    transport = route("carol@eng.example.org", "--client", "127.0.0.1")
    [hop] = transport["routes"]
    assert hop["next_hop"]["type"] == "transport"
    assert hop["next_hop"]["rule"] == "eng.example.org"
    assert hop["next_hop"]["hop"] == "[127.0.0.20]:2600" and hop["next_hop"]["mx"] is None
    assert [(a["address"], a["port"]) for a in hop["next_hop"]["addresses"]] == [
        ("127.0.0.20", 2600)]
    # The masquerading applies to this address as a sender.
    assert transport["masquerade"] == {"sender": "carol@example.org", "rewritten": True}

    mx = route("dave@sink.example", "--client", "127.0.0.1")
    assert mx["client"] == {"address": "127.0.0.1", "trusted": True}
    assert mx["policy"] == {"accepted": True, "reply": None}
    [hop] = mx["routes"]
    assert hop["next_hop"]["mx"] == [{"preference": 10, "host": "mx.sink.example"}]
    assert hop["next_hop"]["addresses"] == [{"host": "mx.sink.example", "address": "127.0.0.14",
                                             "port": world.port, "preference": 10}]
    # From outside the trusted networks the same address is not relayed.
    outside = route("dave@sink.example", "--client", "192.0.2.1")
    assert outside["policy"] == {"accepted": False,
                                 "reply": "554 5.7.1 <dave@sink.example>: Relay access denied"}
    assert route("dave@sink.example")["policy"]["accepted"] is False  # default: untrusted

    gone = route("eve@nxdomain.example", "--client", "127.0.0.1")
    assert gone["routes"][0]["next_hop"]["error"].startswith("5.1.2 ")

    text = world.ctl("route", "dave@sink.example", "--client", "127.0.0.1").out
    assert "next hop:  sink.example" in text and "MX    10 mx.sink.example" in text
    assert f"try:   mx.sink.example[127.0.0.14]:{world.port}" in text

    # An alias (the default [aliases].file is in the state directory) names its members,
    # each with its own next hop: the same expansion RCPT runs.
    (world.hub.state_dir / "aliases").write_text("staff: postmaster, dave@sink.example\n")
    alias = route("staff@localhost", "--client", "127.0.0.1")
    assert alias["aliases"] == ["postmaster@localhost", "dave@sink.example"]
    assert [r["next_hop"]["type"] for r in alias["routes"]] == ["local", "mx"]
    assert route("postmaster@localhost")["aliases"] == []  # not an alias here
