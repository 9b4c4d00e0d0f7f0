"""Several hubs, one queue (issue 12, "Done when" 2 and 3): two relayhub daemons with their
own state directories and ports on one PostgreSQL database.

- Mail accepted by either hub is delivered exactly once.
- `kill -9` of one hub's whole process tree with 500 messages queued toward a slow sink: the
  other hub takes over the dead one's leases once they expire and delivers every message.
- PostgreSQL stopped mid-load: clients get 451, never 250 for a message that is then lost;
  after it returns every 250'd message is delivered, with no restart of the hubs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import ReactorThread
from hubprocess import REPO, Hub, Queue, free_port
from test_crash_delivery import SENDER, SINK_DOMAIN, SlowSink, submit

from relayhub.delivery.manager import MESSAGES_PER_SESSION

LEASE = "3s"
LEASE_SECONDS = 3.0
CONCURRENCY = 4
REPLY_DELAY = 0.05
TIME_LIMIT = 90.0


def make_hub(directory: Path, name: str, dsn: str, sink_port: int) -> Hub:
    directory.mkdir()
    return Hub(directory, {
        "server": {"hostname": name, "workers": 1, "shutdown_grace": "2s"},
        "queue": {"backend": "postgresql", "dsn": dsn, "lease": LEASE},
        "routing": {"transport": {SINK_DOMAIN: f"[127.0.0.1]:{sink_port}"}},
        "delivery": {"tls": "none", "retry_min": "1s", "retry_max": "2s",
                     "concurrency_per_destination": CONCURRENCY},
    })


@pytest.fixture
def sink_port() -> int:
    return free_port()


@pytest.fixture
def hubs(tmp_path: Path, pg_dsn: str, sink_port: int) -> Iterator[tuple[Hub, Hub]]:
    a = make_hub(tmp_path / "a", "hub-a.test", pg_dsn, sink_port)
    b = make_hub(tmp_path / "b", "hub-b.test", pg_dsn, sink_port)
    yield a, b
    for hub in (a, b):
        hub.stop()


def kill_tree(hub: Hub) -> None:
    """SIGKILL the master and every child at once, as a host dying would."""
    assert hub.process is not None
    pids = [hub.process.pid, *hub.children("worker"), *hub.children("qmgr")]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    hub.process.wait(timeout=10)
    hub.process = None
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids):
        assert time.monotonic() < deadline, "the hub's processes did not die"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def submit_all(hub_ports: list[int], seqs: range, per_connection: int = 50) -> dict[int, str]:
    chunks = [range(start, min(start + per_connection, seqs.stop))
              for start in range(seqs.start, seqs.stop, per_connection)]
    with ThreadPoolExecutor(4) as pool:
        parts = pool.map(lambda i: submit(hub_ports[i % len(hub_ports)], chunks[i]),
                         range(len(chunks)))
        return {seq: qid for part in parts for seq, qid in part.items()}


def until(condition: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what()}"
        time.sleep(0.05)


def test_mail_accepted_by_either_hub_is_delivered_exactly_once(
        reactor_thread: ReactorThread, hubs: tuple[Hub, Hub], sink_port: int,
        pg_dsn: str) -> None:
    a, b = hubs
    sink = SlowSink(reactor_thread, sink_port, 0.0)
    sink.listen()
    try:
        a.start()
        b.start()
        submitted = submit_all([a.smtp_port, b.smtp_port], range(200))
        assert len(set(submitted.values())) == 200
        sink.wait(lambda: len(sink._arrivals) >= 200, TIME_LIMIT, "200 arrivals")
        queue = Queue(reactor_thread, a.state_dir, pg_dsn)
        deadline = time.monotonic() + 20
        while queue.ids() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not queue.ids()
        time.sleep(1.0)  # a second delivery would come now, if one were coming
    finally:
        sink.close()
    counts = Counter(arrival.seq for arrival in sink.arrivals())
    assert set(counts) == set(range(200)) and max(counts.values()) == 1, counts.most_common(3)
    # Both hubs delivered: the work is shared, not only each hub's own.
    delivered_by = {"a": len(re.findall(r"status=sent", a.log())),
                    "b": len(re.findall(r"status=sent", b.log()))}
    assert sum(delivered_by.values()) == 200 and all(delivered_by.values()), delivered_by


def test_kill9_of_a_whole_hub_and_the_other_delivers_everything(
        reactor_thread: ReactorThread, hubs: tuple[Hub, Hub], sink_port: int,
        pg_dsn: str) -> None:
    a, b = hubs
    messages = 500
    deadline = time.monotonic() + TIME_LIMIT

    def left() -> float:
        return max(deadline - time.monotonic(), 0.1)

    sink = SlowSink(reactor_thread, sink_port, REPLY_DELAY)
    a.start()
    try:
        # Everything queued through hub A while the sink is down: all deferred, all in A's
        # hands when delivery starts (B is not running yet).
        submitted = submit_all([a.smtp_port], range(messages))
        assert len(set(submitted.values())) == messages
        sink.listen()
        sink.wait(lambda: len(sink._arrivals) >= 50, left(), "A's first deliveries")
        b.start()
        sink.wait(lambda: len(sink._arrivals) >= 100, left(), "100 arrivals")
        kill_started = time.monotonic()
        kill_tree(a)
        killed_at = time.monotonic()
        sink.wait(lambda: len({x.seq for x in sink._arrivals}) >= messages, left(),
                  "every message, delivered by B")
        queue = Queue(reactor_thread, b.state_dir, pg_dsn)
        while queue.ids() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not queue.ids(), sorted(queue.ids())[:5]
    finally:
        sink.close()
    arrivals = sink.arrivals()
    counts = Counter(x.seq for x in arrivals)
    assert set(counts) == set(range(messages))
    # While A lived, nothing was delivered twice: A's leases kept B off its work.
    alive = Counter(x.seq for x in arrivals if x.at < kill_started)
    assert max(alive.values()) == 1, alive.most_common(3)
    # After the kill, only what A had in flight may come again: delivered, but its result
    # not yet committed (at most the messages its sessions carried), once more each.
    extra = len(arrivals) - len(counts)
    # (A renewed its leases every second, so B could take none before LEASE - 1 s after
    # the kill: anything that arrived before then came from A; the sink may count a reply
    # it wrote to a connection already dead, a moment after the kill.)
    repeated = {seq for seq, n in counts.items() if n > 1}
    by_a = {x.seq for x in arrivals if x.at < kill_started + LEASE_SECONDS - 1.0}
    assert repeated <= by_a, sorted(repeated - by_a)[:5]
    assert max(counts.values()) <= 2 and extra <= CONCURRENCY * MESSAGES_PER_SESSION, extra
    after = [x for x in arrivals if x.at > killed_at]
    assert after, "nothing was delivered after the kill"
    assert "status=sent" in b.log()


def test_database_stopped_mid_load_refuses_with_451_and_loses_nothing(
        reactor_thread: ReactorThread, tmp_path: Path, sink_port: int) -> None:
    import pgserver

    server = pgserver.PGServer()  # its own server: this test stops it
    dsn = server.new_database()
    hub = make_hub(tmp_path / "a", "hub-a.test", dsn, sink_port)
    sink = SlowSink(reactor_thread, sink_port, 0.0)
    sink.listen()
    accepted: dict[int, str] = {}
    refused: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()
    try:
        hub.start()

        def load(base: int) -> None:
            for n in range(base, base + 10_000):
                if stop.is_set():
                    return
                body = f"Subject: db test {n}\r\nX-Seq: {n}\r\n\r\nmessage {n}\r\n".encode()
                try:
                    with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30) as client:
                        client.ehlo("client.test")
                        client.mail(SENDER)
                        code, reply = client.rcpt(f"user{n}@{SINK_DOMAIN}")
                        assert code == 250, reply
                        code, reply = client.data(body)
                except smtplib.SMTPDataError as error:
                    with lock:
                        refused.append(f"{error.smtp_code} {error.smtp_error.decode()}")
                    time.sleep(0.05)
                    continue
                except (OSError, smtplib.SMTPException) as error:
                    with lock:
                        refused.append(repr(error))
                    time.sleep(0.05)
                    continue
                with lock:
                    if code == 250:
                        accepted[n] = reply.decode().rsplit(" ", 1)[1]
                    else:
                        refused.append(f"{code} {reply.decode()}")

        threads = [threading.Thread(target=load, args=(i * 100_000,)) for i in range(3)]
        for thread in threads:
            thread.start()
        until(lambda: len(accepted) >= 30, 30, lambda: f"accepted; refused: {refused[:3]}")
        server.stop()
        until(lambda: len(refused) >= 5, 60, lambda: "refusals with the database down")
        # POP3 serves the Maildirs meanwhile: it needs no queue.
        with socket.create_connection(("127.0.0.1", hub.pop3_port), timeout=10) as pop3:
            assert pop3.recv(512).startswith(b"+OK")
        time.sleep(2)
        server.start()
        count = len(accepted)
        until(lambda: len(accepted) >= count + 30, 60,
              lambda: f"accepted again; last refusals: {refused[-3:]}")
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        wanted = set(accepted)
        sink.wait(lambda: wanted <= {x.seq for x in sink._arrivals}, TIME_LIMIT,
                  "every 250'd message delivered")
    finally:
        stop.set()
        sink.close()
        hub.stop()
        server.close()
    smtp_refusals = [r for r in refused if r[:1].isdigit()]
    assert smtp_refusals and all(r.startswith("451 4.3.0") for r in smtp_refusals), refused[:5]
    log = hub.log()
    # Said once each (per process that saw it), not per try; no child crashed.
    said = [line for line in log.splitlines() if "queue database" in line]
    # Once per change, not per try: for each process ("worker-1.1[pid]", "queue-manager[pid]")
    # its lines alternate "unavailable", "available again", ... (a pool that got through for
    # a moment while the server was stopping may say both twice).
    states: dict[str, list[str]] = {}
    for line in said:
        speaker = re.search(r"\] (\S+\[\d+\]) ", line)
        assert speaker, line
        states.setdefault(speaker.group(1), []).append(
            "down" if "unavailable" in line else "up")
    assert any("down" in s for s in states.values()), said
    for sequence in states.values():
        assert sequence[::2] == ["down"] * len(sequence[::2]), said
        assert sequence[1::2] == ["up"] * len(sequence[1::2]), said
    assert [x for x in said if "available again" in x], said
    trouble = [line for line in log.splitlines() if "died after" in line or "Traceback" in line]
    assert not trouble, log[log.find(trouble[0]) - 500:][:4000]
    assert "error connecting" not in log  # psycopg-pool's own warnings, one per try


def ctl(hub: Hub, *args: str) -> Any:
    """`relayhubctl -c <hub's config> args...`, its JSON output parsed."""
    done = subprocess.run([str(Path(sys.executable).with_name("relayhubctl")), "-c",
                           str(hub.config_path), *args, "--json"],
                          capture_output=True, text=True, timeout=60, cwd=hub.directory,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_relayhubctl_on_any_hub_sees_the_shared_queue_and_its_hubs(
        hubs: tuple[Hub, Hub]) -> None:
    a, b = hubs  # nothing listens on the sink's port: the mail stays queued, deferred
    a.start()
    b.start()
    from_a = a.send([f"x@{SINK_DOMAIN}"], b"Subject: via a\r\n\r\nbody a\r\n")
    from_b = b.send([f"y@{SINK_DOMAIN}"], b"Subject: via b\r\n\r\nbody b\r\n")
    listed = {m["id"]: m for m in ctl(b, "queue", "list")}
    assert (listed[from_a]["hub"], listed[from_b]["hub"]) == ("hub-a.test", "hub-b.test")
    shown = ctl(b, "queue", "show", from_a, "--body")  # A's body, read on B
    assert shown["hub"] == "hub-a.test" and shown["body"].endswith("body a\r\n")
    a.wait(lambda: {h["name"] for h in ctl(a, "status")["hubs"]} == {"hub-a.test",
                                                                     "hub-b.test"})


def test_a_hub_refuses_to_start_on_a_schema_it_does_not_know(
        tmp_path: Path, pg_dsn: str, sink_port: int) -> None:
    import psycopg

    from relayhub.queue import pgschema

    with psycopg.connect(pg_dsn) as conn:
        pgschema.migrate(conn)
        conn.execute("UPDATE relayhub_schema SET version = version + 1")
    hub = make_hub(tmp_path / "a", "hub-a.test", pg_dsn, sink_port)
    with pytest.raises(RuntimeError, match="relayhub exited 1") as refused:
        hub.start()
    message = str(refused.value)
    assert "queue.dsn: the queue database holds schema version" in message
    assert "Traceback" not in message
