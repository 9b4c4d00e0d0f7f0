"""Prometheus metrics ([metrics] listen) and JSON logs ([log] format = "json"): the pure parts
(reply → reason, event → metric, adding up processes, JSON keys) and a real daemon."""

from __future__ import annotations

import io
import json
import os
import signal
import smtplib
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hubprocess import Hub, free_port
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import Logger, LogLevel, LogPublisher

from relayhub import jsonlog, maillog
from relayhub.metrics import MetricsObserver, ProcessMetrics, reject_reason
from relayhub.process.scrape import add_up

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples_of(text: str) -> Samples:
    """Every sample of a /metrics page, parsed by prometheus_client's own parser."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(("reply", "reason"), [
    ("554 5.7.1 <x@remote.example>: Relay access denied", "relay_denied"),
    ("550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown",
     "unknown_user"),
    ("530 5.7.0 Authentication required", "auth_required"),
    ("550 5.5.2 Error: bare <CR> or <LF> received", "bare_newline"),
    ("500 5.5.2 Error: line too long", "line_too_long"),
    ("552 5.3.4 Error: message file too big", "size"),
    ("554 5.4.6 Error: too many hops", "loop"),
    ("451 4.3.0 Temporary lookup failure: aliases file unusable", "temporary"),
    ("553 5.1.4 x: something new", "other"),
])
def test_reject_reason(reply: str, reason: str) -> None:
    assert reject_reason(reply) == reason


def test_log_events_move_the_metrics() -> None:
    metrics = ProcessMetrics()
    publisher = LogPublisher(MetricsObserver(metrics))
    log = Logger(namespace="relayhub.smtpd", observer=publisher)
    log.info(maillog.CONNECT, client="c")
    log.info(maillog.QUEUED, queue_id="Q", sender="a@b", size=1, nrcpt=1, client="c",
             accept_seconds=0.004)
    log.info(maillog.REJECT, stage="RCPT", client="c", reply="554 5.7.1 <x>: Relay access denied",
             sender="", recipient="x", proto="ESMTP", helo="h")
    log.warn(maillog.LIMIT, reason="too many errors", client="c", reply="421 4.7.0")
    log.info(maillog.DELIVERY, queue_id="Q", recipient="a@b", relay="local", delay="2.5",
             tls="none", status="2.0.0", verb="sent", text="ok", next_hop="local")
    log.info(maillog.DELIVERY, queue_id="Q", recipient="a@b", relay="none", delay="1.0",
             tls="none", status="4.4.1", verb="deferred", text="no", next_hop="relayhost")
    log.info(maillog.DELIVERY, queue_id="Q")  # fields missing: ignored, not a crash
    got = {(name, frozenset(labels.items())): v for name, labels, v in metrics.samples()}
    assert value(got, "relayhub_connections_total", service="smtp") == 1
    assert value(got, "relayhub_connections_total", service="pop3") == 0
    assert value(got, "relayhub_messages_accepted_total") == 1
    assert value(got, "relayhub_messages_rejected_total", reason="relay_denied") == 1
    assert value(got, "relayhub_messages_rejected_total", reason="limit") == 1
    assert value(got, "relayhub_deliveries_total", status="sent", next_hop="local") == 1
    assert value(got, "relayhub_deliveries_total", status="deferred", next_hop="relayhost") == 1
    assert value(got, "relayhub_accept_latency_seconds_bucket", le="0.005") == 1
    assert value(got, "relayhub_delivery_latency_seconds_sum") == 2.5
    assert not any(name.endswith("_created") for name, _labels in got)


def test_processes_are_added_up() -> None:
    master, worker_a, worker_b = ProcessMetrics(), ProcessMetrics(), ProcessMetrics()
    master.child_restarts.labels("worker").inc()
    worker_a.accepted.inc(2)
    worker_b.accepted.inc(3)
    worker_b.accept_latency.observe(0.02)
    families = add_up(master.registry.collect(), [worker_a.samples(), worker_b.samples(),
                                                 [("relayhub_connections_total",
                                                   {"service": "lmtp"}, 4.0)]])
    by_name = {family.name: family for family in families}
    summed = {(s.name, frozenset(s.labels.items())): s.value
              for family in families for s in family.samples}
    assert value(summed, "relayhub_messages_accepted_total") == 5
    assert value(summed, "relayhub_child_restarts_total", role="worker") == 1
    assert value(summed, "relayhub_accept_latency_seconds_count") == 1
    # A label set the master did not know joins its family.
    assert value(summed, "relayhub_connections_total", service="lmtp") == 4
    assert by_name["relayhub_messages_accepted"].type == "counter"
    assert by_name["relayhub_accept_latency_seconds"].type == "histogram"


def test_json_keys_are_the_text_line_names() -> None:
    assert jsonlog.text_keys(maillog.DELIVERY) == (
        ("queue_id", "queue_id"), ("to", "recipient"), ("relay", "relay"), ("delay", "delay"),
        ("tls", "tls"), ("verified", "verified"), ("dsn", "status"), ("status", "verb"),
        ("text", "text"))
    assert dict(jsonlog.text_keys(maillog.REJECT))["from"] == "sender"
    assert jsonlog.text_keys("{a.b} {c[0]} {d!r:>5} {}") == (("a", "a"), ("c", "c"), ("d", "d"))


def test_child_json_objects_and_the_masters_own() -> None:
    read_end, write_end = os.pipe()
    master_out = io.StringIO()
    try:
        child_log = Logger(namespace="relayhub.qmgr", observer=LogPublisher(
            jsonlog.ChildJsonObserver(lambda data: os.write(write_end, data) and None,
                                      "queue-manager", "queue-manager", 42)))
        child_log.info(maillog.DELIVERY, queue_id="Q1", recipient="a@example.org",
                       relay="local", delay="0.1", tls="none", verified="none", status="2.0.0",
                       verb="sent",
                       text="ok", pid=7)
        first = json.loads(os.read(read_end, 65536).decode())
    finally:
        os.close(read_end)
        os.close(write_end)
    assert first["process"] == "queue-manager" and first["pid"] == 42
    assert (first["queue_id"], first["to"], first["dsn"], first["status"]) == (
        "Q1", "a@example.org", "2.0.0", "sent")
    assert first["message"].startswith("Q1: to=<a@example.org>, relay=local")
    assert first["level"] == "info" and first["namespace"] == "relayhub.qmgr"
    master_log = Logger(namespace="relayhub.master",
                        observer=LogPublisher(jsonlog.JsonLogObserver(master_out)))
    jsonlog.relay(master_log, "Traceback (most recent call last):", child="worker-1.1",
                  role="worker", pid=43)
    second = json.loads(master_out.getvalue().splitlines()[-1])
    assert second == {**second, "process": "worker-1.1", "level": "warn",
                      "message": "Traceback (most recent call last):"}
    master_log.emit(LogLevel.error, "oops {what}", what="x")
    own = json.loads(master_out.getvalue().splitlines()[-1])
    assert (own["process"], own["role"], own["level"], own["what"]) == (
        "master", "master", "error", "x")


# --------------------------------------------------------------------------- a real daemon


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        return samples_of(answer.read().decode())


def test_metrics_of_a_running_daemon(tmp_path: Path) -> None:
    port = free_port()
    hub = Hub(tmp_path, {
        "metrics": {"listen": [f"tcp:{port}:interface=127.0.0.1"]},
        # 127.0.0.1 is not trusted here, so relaying from it is refused.
        "domains": {"trusted_networks": ["127.0.0.2/32"]},
        # Nothing listens there: mail for relay.example waits in the queue.
        "routing": {"transport": {"relay.example": f"[127.0.0.1]:{free_port()}"}},
    }).start()
    try:
        before = scrape(port)
        assert value(before, "relayhub_messages_accepted_total") == 0
        assert value(before, "relayhub_child_restarts_total", role="worker") == 0

        queue_id = hub.send(["postmaster@localhost"])
        hub.wait(lambda: hub.mailbox("postmaster"))
        hub.wait_for_log(f"{queue_id}: removed")
        with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail("someone@example.org")
            assert client.rcpt("x@remote.example")[0] == 554
        hub.wait_for_log("Relay access denied")
        hub.send(["someone@relay.example"])
        hub.wait_for_log("status=deferred")
        with socket.create_connection(("127.0.0.1", hub.pop3_port), timeout=10) as pop3:
            assert pop3.recv(512).startswith(b"+OK")
            pop3.sendall(b"QUIT\r\n")
            assert pop3.recv(512).startswith(b"+OK")

        flowing = scrape(port)
        assert value(flowing, "relayhub_messages_accepted_total") == 2
        assert value(flowing, "relayhub_connections_total", service="smtp") >= 3
        assert value(flowing, "relayhub_connections_total", service="pop3") == 1
        assert value(flowing, "relayhub_messages_rejected_total", reason="relay_denied") == 1
        assert value(flowing, "relayhub_deliveries_total", status="sent", next_hop="local") == 1
        assert value(flowing, "relayhub_deliveries_total", status="deferred",
                     next_hop="transport") == 1
        assert value(flowing, "relayhub_accept_latency_seconds_count") == 2
        assert value(flowing, "relayhub_delivery_latency_seconds_count") == 1
        # The deferred message is the queue.
        assert value(flowing, "relayhub_queue_messages") == 1
        assert value(flowing, "relayhub_queue_recipients", state="deferred") == 1
        assert value(flowing, "relayhub_queue_recipients", state="queued") == 0
        assert value(flowing, "relayhub_queue_oldest_age_seconds") > 0

        # kill -9 of the worker: the master counts the restart and keeps what the dead
        # worker had reported, so no counter goes backwards.
        worker = hub.child("worker")
        os.kill(worker, signal.SIGKILL)
        hub.child("worker", not_pid=worker)
        hub.wait_for_log("worker-1.1 pid")
        after = scrape(port)
        assert value(after, "relayhub_child_restarts_total", role="worker") == 1
        for key, old in flowing.items():
            if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
                assert after[key] >= old, key
        assert value(after, "relayhub_messages_accepted_total") == 2
        hub.wait(lambda: _greets(hub))
        hub.send(["postmaster@localhost"])
        hub.wait(lambda: len(hub.mailbox("postmaster")) == 2)
        again = scrape(port)
        assert value(again, "relayhub_messages_accepted_total") == 3
        assert value(again, "relayhub_connections_total", service="smtp") > value(
            after, "relayhub_connections_total", service="smtp")
    finally:
        hub.stop()


def test_a_reload_loses_no_count(tmp_path: Path) -> None:
    """The old children of a reload hand their last counts to the master as they stop,
    though nobody scraped since they counted them."""
    port = free_port()
    hub = Hub(tmp_path, {"metrics": {"listen": [f"tcp:{port}:interface=127.0.0.1"]}}).start()
    try:
        hub.send(["postmaster@localhost"])
        hub.wait(lambda: hub.mailbox("postmaster"))
        hub.wait_for_log("status=sent")
        assert hub.process is not None
        hub.process.send_signal(signal.SIGHUP)
        hub.wait_for_log("worker-1.1 stopped", "queue-manager stopped", "started worker-1.2")
        samples = scrape(port)
        assert value(samples, "relayhub_messages_accepted_total") == 1
        assert value(samples, "relayhub_deliveries_total", status="sent", next_hop="local") == 1
        assert value(samples, "relayhub_child_restarts_total", role="worker") == 0
        assert value(samples, "relayhub_child_restarts_total", role="queue-manager") == 0
    finally:
        hub.stop()


def _greets(hub: Hub) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=5) as client:
            return bool(client.noop()[0] == 250)
    except (OSError, smtplib.SMTPException):
        return False


def test_json_log_of_a_running_daemon(tmp_path: Path) -> None:
    hub = Hub(tmp_path, {"log": {"format": "json"}}).start()
    try:
        queue_id = hub.send(["postmaster@localhost"])
        hub.wait(lambda: hub.mailbox("postmaster"))
        hub.wait_for_log(f'"message": "{queue_id}: removed"')
    finally:
        hub.stop()
    records: list[dict[str, Any]] = []
    for line in hub.log().splitlines():
        records.append(json.loads(line))  # every line, the master's and the children's
    assert all({"time", "level", "process", "role", "pid", "message"} <= set(r)
               for r in records)
    delivery = next(r for r in records if r.get("queue_id") == queue_id and "dsn" in r)
    assert delivery["process"] == "queue-manager"
    assert (delivery["to"], delivery["relay"], delivery["dsn"], delivery["status"]) == (
        "postmaster@localhost", "local", "2.0.0", "sent")
    assert float(delivery["delay"]) >= 0
    queued = next(r for r in records if r.get("queue_id") == queue_id and "size" in r)
    assert queued["from"] == "postmaster@localhost" and queued["role"] == "worker"
    assert queued["message"].startswith(f"{queue_id}: from=<postmaster@localhost>, size=")
    assert any(r["process"] == "master" and "started worker-1.1" in r["message"]
               for r in records)
