"""Outbound TLS with `[delivery].tls = "verify"` on a real daemon: a next hop whose
certificate names another host, or comes from an unknown CA, is deferred with the TLS error
on record; one with a right certificate from the test CA (trusted via SSL_CERT_FILE, as an
administrator would point OpenSSL at a private CA) gets the mail, over TLS, logged so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ReactorThread
from dnsserver import DNSServer
from hubprocess import REPO, Hub, Queue, free_port
from smtpsink import DEFAULT_EXTENSIONS, SMTPSink, TestCA
from test_tls import PemCA

ZONE = {
    "good.example": {"MX": [(10, "mx.good.example")]},
    "mx.good.example": {"A": ["127.0.0.21"]},
    "misnamed.example": {"MX": [(10, "mx.misnamed.example")]},
    "mx.misnamed.example": {"A": ["127.0.0.22"]},
    "unknown-ca.example": {"MX": [(10, "mx.unknown-ca.example")]},
    "mx.unknown-ca.example": {"A": ["127.0.0.23"]},
}


class Outbound:
    """A hub delivering with tls = "verify", the DNS it asks, and three TLS sinks."""

    def __init__(self, rt: ReactorThread, tmp: Path, dns: DNSServer) -> None:
        self.rt = rt
        ca = PemCA()
        port = free_port()
        starttls = (*DEFAULT_EXTENSIONS, "STARTTLS")

        def sink(host: str, context: Any) -> SMTPSink:
            return SMTPSink(rt, host=host, port=port, extensions=starttls, tls_context=context)

        self.good = sink("127.0.0.21", ca.server_context("mx.good.example"))
        self.misnamed = sink("127.0.0.22", ca.server_context("other.example"))
        self.unknown_ca = sink("127.0.0.23", TestCA().server_context("mx.unknown-ca.example"))
        self.ca_file = ca.write_ca(tmp / "ca.pem")
        self.hub = Hub(tmp, {"delivery": {
            "tls": "verify", "nameservers": [f"127.0.0.1:{dns.port}"], "smtp_port": port,
            "retry_min": "1h", "retry_max": "1h"}})
        self.queue = Queue(rt, self.hub.state_dir)

    def close(self) -> None:
        for sink in (self.good, self.misnamed, self.unknown_ca):
            sink.close()

    def send(self, recipient: str) -> str:
        return self.hub.send([recipient], b"Subject: tls\r\n\r\nhello\r\n")

    def show(self, queue_id: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "relayhub.admin", "-c", str(self.hub.config_path),
             "queue", "show", queue_id, "--json"],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def wait(self, condition: Callable[[], Any], timeout: float = 20.0) -> Any:
        return self.hub.wait(condition, timeout)

    def deferred(self, queue_id: str) -> Any:
        """`queue show --json` once the message's recipient has been deferred."""
        def shown() -> Any:
            message = self.show(queue_id)
            return message if message["recipients"][0]["status"] == "deferred" else None
        return self.wait(shown)


@pytest.fixture
def outbound(reactor_thread: ReactorThread, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Outbound]:
    with DNSServer(reactor_thread, ZONE) as dns:
        built = Outbound(reactor_thread, tmp_path, dns)
        # The daemon's children inherit it: OpenSSL's default trust store is the test CA.
        monkeypatch.setenv("SSL_CERT_FILE", str(built.ca_file))
        built.hub.start()
        yield built
        built.hub.stop()
        built.close()


def test_verified_tls_delivery(outbound: Outbound) -> None:
    queue_id = outbound.send("user@good.example")
    [message] = outbound.good.wait_messages(1)
    assert message.body is not None and message.body.endswith(b"\r\n\r\nhello\r\n")
    assert outbound.good.sessions()[0].tls
    outbound.wait(lambda: queue_id not in outbound.queue.ids())
    log = outbound.hub.wait_for_log(f"{queue_id}: to=<user@good.example>")
    [line] = [line for line in log.splitlines() if f"{queue_id}: to=<user@good.example>" in line]
    assert "relay=mx.good.example[127.0.0.21]" in line
    assert ", tls=TLSv1.3 TLS_" in line and "status=sent (250 " in line


def test_certificate_for_another_name_is_deferred(outbound: Outbound) -> None:
    queue_id = outbound.send("user@misnamed.example")
    shown = outbound.deferred(queue_id)
    error = shown["recipients"][0]["last_error"]
    assert error.startswith("4.7.5 TLS handshake failed with mx.misnamed.example[127.0.0.22]")
    assert "certificate does not match mx.misnamed.example" in error
    assert [entry["dsn"] for entry in shown["history"]] == ["4.7.5"]
    assert outbound.misnamed.messages() == []  # nothing went out, not even in plaintext
    assert [s.commands[-1] for s in outbound.misnamed.sessions()] == ["STARTTLS"]


def test_certificate_from_an_unknown_ca_is_deferred(outbound: Outbound) -> None:
    queue_id = outbound.send("user@unknown-ca.example")
    error = outbound.deferred(queue_id)["recipients"][0]["last_error"]
    assert error.startswith("4.7.5 TLS handshake failed with mx.unknown-ca.example")
    assert "certificate verify failed" in error
    assert outbound.unknown_ca.messages() == []
