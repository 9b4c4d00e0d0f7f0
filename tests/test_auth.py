"""SMTP AUTH (RFC 4954) against the users file on a real daemon: who may relay after it,
what a failure costs, the submission rules, and what the queue and headers record."""

from __future__ import annotations

import base64
import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ReactorThread
from hubprocess import Hub, Queue, SMTPConnection
from test_tls import FOREIGN, HOSTNAME, PASSWORD, USER, TLSHub, queued_id, start_tls_hub

from relayhub.smtp.server import (
    AuthCancelled,
    AuthFailed,
    AuthMalformed,
    Credentials,
    SaslExchange,
    trace_comments,
    with_comments,
)
from relayhub.tls import SessionInfo
from relayhub.users import hash_password

UNTRUSTED = "127.0.0.2"  # loopback, outside trusted_networks = ["127.0.0.1/32"]
MASQUERADED_SENDER = "alice@host.dept.example.org"  # [domains].masquerade = ["example.org"]


def plain(name: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{name}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def auth_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSHub]:
    running = start_tls_hub(tmp_path_factory.mktemp("authhub"),
                            {"domains": {"masquerade": ["example.org"]}})
    yield running
    running.hub.stop()


@pytest.fixture
def queue(reactor_thread: ReactorThread, auth_hub: TLSHub) -> Queue:
    return Queue(reactor_thread, auth_hub.hub.state_dir)


def tls_session(h: TLSHub, port: int | None = None, source: str | None = UNTRUSTED
                ) -> SMTPConnection:
    """A raw session past STARTTLS and the second EHLO."""
    conn = SMTPConnection(port or h.hub.smtp_port, source=source)
    assert conn.code() == 220
    conn.command("EHLO client.test")
    assert conn.command("STARTTLS") == ["220 2.0.0 Ready to start TLS"]
    conn.sock = h.context.wrap_socket(conn.sock, server_hostname=HOSTNAME)
    assert conn.command("EHLO client.test")[-1] == "250 HELP"
    return conn


def smtp_client(h: TLSHub, port: int | None = None, source: str = UNTRUSTED) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port or h.hub.smtp_port, local_hostname="client.test",
                          source_address=(source, 0), timeout=10)
    client.starttls(context=h.context)
    client.ehlo()
    return client


# --------------------------------------------------------------------------- relaying


def test_auth_plain_lets_an_untrusted_client_relay(auth_hub: TLSHub, queue: Queue) -> None:
    with smtp_client(auth_hub) as client:
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt(FOREIGN) == (554, f"5.7.1 <{FOREIGN}>: Relay access denied".encode())
        client.rset()
        assert client.docmd("AUTH", "PLAIN " + plain(USER, PASSWORD)) == (
            235, b"2.7.0 Authentication successful")
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt(FOREIGN)[0] == 250
        code, reply = client.data(b"Subject: relayed\r\n\r\nhello\r\n")
    assert code == 250
    queue_id = queued_id(reply)
    [message] = [m for m in queue.messages() if m.queue_id == queue_id]
    assert message.envelope.auth_user == USER
    assert message.envelope.protocol == "ESMTPSA"
    assert message.envelope.client_address == UNTRUSTED
    header = queue.body(queue_id).split(b"\r\nSubject:")[0].decode()
    lines = header.split("\r\n")
    assert lines[0] == f"Received: from client.test (unknown [{UNTRUSTED}])"
    assert lines[1].startswith("\t(using TLSv1.3 with cipher TLS_")
    assert lines[2] == f"\t(Authenticated sender: {USER})"
    assert lines[3] == f"\tby {HOSTNAME} (relayhub) with ESMTPSA id {queue_id}"
    auth_hub.hub.wait_for_log(
        f"unknown[{UNTRUSTED}]: sasl_method=PLAIN, sasl_username={USER}",
        f"{queue_id}: from=<alice@example.org>, size=",
        f"client=unknown[{UNTRUSTED}], sasl_method=PLAIN, sasl_username={USER}")


@pytest.mark.parametrize("initial_response", [True, False], ids=["initial", "challenged"])
def test_auth_login(auth_hub: TLSHub, initial_response: bool) -> None:
    with smtp_client(auth_hub) as client:
        client.user, client.password = USER, PASSWORD  # what smtplib's auth_login reads
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=initial_response)
        assert code == 235
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt(FOREIGN)[0] == 250


def test_login_exchange_on_the_wire(auth_hub: TLSHub) -> None:
    with tls_session(auth_hub) as conn:
        assert conn.command("AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
        assert conn.command(b64(USER)) == ["334 UGFzc3dvcmQ6"]
        assert conn.command(b64(PASSWORD)) == ["235 2.7.0 Authentication successful"]


def test_plain_with_an_empty_challenge(auth_hub: TLSHub) -> None:
    with tls_session(auth_hub) as conn:
        assert conn.command("AUTH PLAIN") == ["334 "]
        assert conn.command(plain(USER, PASSWORD, authzid=USER)) == [
            "235 2.7.0 Authentication successful"]


# --------------------------------------------------------------------------- refusals


def test_failed_auth_is_delayed_and_other_sessions_go_on(auth_hub: TLSHub) -> None:
    with tls_session(auth_hub) as slow:
        started = time.monotonic()
        slow.send(f"AUTH PLAIN {plain(USER, 'wrong')}\r\n".encode())
        other_took: list[float] = []

        def other_session() -> None:  # served meanwhile by the same (only) worker
            begun = time.monotonic()
            with tls_session(auth_hub, source="127.0.0.1") as fast:
                assert fast.command("NOOP") == ["250 2.0.0 Ok"]
            other_took.append(time.monotonic() - begun)

        thread = threading.Thread(target=other_session)
        thread.start()
        thread.join(timeout=10)
        assert slow.reply() == ["535 5.7.8 Error: authentication failed"]
        waited = time.monotonic() - started
    assert waited >= 1.0
    assert other_took and other_took[0] < waited
    auth_hub.hub.wait_for_log(
        f"warning: unknown[{UNTRUSTED}]: SASL PLAIN authentication failed: user=<{USER}>")


def test_failed_auth_counts_toward_the_error_limit(auth_hub: TLSHub) -> None:
    with tls_session(auth_hub) as conn:
        for _ in range(9):
            assert conn.command("XYZZY")[0].startswith("500 ")
        assert conn.command(f"AUTH PLAIN {plain('nobody', 'x')}") == [
            "535 5.7.8 Error: authentication failed"]
        assert conn.reply() == [f"421 4.7.0 {HOSTNAME} Error: too many errors"]
        assert conn.closed()


def test_auth_protocol_errors(auth_hub: TLSHub) -> None:
    with tls_session(auth_hub) as conn:
        assert conn.command("AUTH CRAM-MD5") == ["504 5.5.4 Unrecognized authentication type"]
        assert conn.command("AUTH") == ["501 5.5.4 Syntax: AUTH mechanism [initial-response]"]
        assert conn.command("AUTH PLAIN !!notbase64") == ["501 5.5.2 Cannot decode response"]
        assert conn.command("AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
        assert conn.command("*") == ["501 5.7.0 Authentication cancelled"]
        assert conn.command("AUTH PLAIN") == ["334 "]
        assert conn.command("*") == ["501 5.7.0 Authentication cancelled"]
        assert conn.command("MAIL FROM:<alice@example.org>") == ["250 2.1.0 Ok"]
        assert conn.command(f"AUTH PLAIN {plain(USER, PASSWORD)}") == [
            "503 5.5.1 Error: MAIL transaction in progress"]
        assert conn.command("RSET") == ["250 2.0.0 Ok"]
        assert conn.command(f"AUTH PLAIN {plain(USER, PASSWORD)}") == [
            "235 2.7.0 Authentication successful"]
        assert conn.command(f"AUTH PLAIN {plain(USER, PASSWORD)}") == [
            "503 5.5.1 Error: already authenticated"]


def test_plaintext_auth_where_allowed(tmp_path: Path, reactor_thread: ReactorThread) -> None:
    users = tmp_path / "users"
    users.write_text(f"{USER}:{hash_password(PASSWORD)}:Alice\n")
    # Loopback-only listeners: plaintext AUTH is allowed by default (SPEC §2).
    hub = Hub(tmp_path, {"users": {"file": str(users)},
                         "domains": {"trusted_networks": ["127.0.0.1/32"]}}).start()
    try:
        with SMTPConnection(hub.smtp_port, source=UNTRUSTED) as conn:
            assert conn.code() == 220
            assert conn.command(f"AUTH PLAIN {plain(USER, PASSWORD)}") == [
                "503 5.5.1 Error: send EHLO first"]
            assert "250-AUTH PLAIN LOGIN" in conn.command("EHLO client.test")
            assert conn.command(f"AUTH PLAIN {plain(USER, PASSWORD)}")[0].startswith("235")
            assert conn.command("MAIL FROM:<alice@example.org>") == ["250 2.1.0 Ok"]
            assert conn.command(f"RCPT TO:<{FOREIGN}>")[0].startswith("250")
            assert conn.command("DATA")[0].startswith("354")
            queue_id = queued_id(conn.command("Subject: x\r\n\r\nhi\r\n.")[0])
            # No [tls] here, so no STARTTLS either.
            assert conn.command("STARTTLS")[0].startswith("454 4.7.0")
        body = Queue(reactor_thread, hub.state_dir).body(queue_id)
        assert f"with ESMTPA id {queue_id}".encode() in body
        assert b"(Authenticated sender: alice)" in body
    finally:
        hub.stop()


def test_starttls_forgets_an_earlier_auth(tmp_path: Path) -> None:
    h = start_tls_hub(tmp_path, {"smtp": {"allow_plaintext_auth": True}})
    try:
        with SMTPConnection(h.hub.smtp_port, source=UNTRUSTED) as conn:
            assert conn.code() == 220
            assert "250-AUTH PLAIN LOGIN" in conn.command("EHLO client.test")
            assert conn.command(f"AUTH PLAIN {plain(USER, PASSWORD)}")[0].startswith("235")
            conn.command("STARTTLS")
            conn.sock = h.context.wrap_socket(conn.sock, server_hostname=HOSTNAME)
            conn.command("EHLO client.test")
            assert conn.command("MAIL FROM:<alice@example.org>") == ["250 2.1.0 Ok"]
            assert conn.command(f"RCPT TO:<{FOREIGN}>")[0].startswith("554 5.7.1")
    finally:
        h.hub.stop()


def test_long_auth_line_is_read_whole(auth_hub: TLSHub) -> None:
    """RFC 4954 §4: AUTH lines beyond the 512-octet command limit (long passwords)."""
    with tls_session(auth_hub) as conn:
        response = plain(USER, "x" * 3000)
        assert len(response) > 4000
        assert conn.command(f"AUTH PLAIN {response}") == [
            "535 5.7.8 Error: authentication failed"]
        assert conn.command("AUTH LOGIN") == ["334 VXNlcm5hbWU6"]
        assert conn.command(b64(USER)) == ["334 UGFzc3dvcmQ6"]
        assert conn.command(b64("y" * 5000)) == ["535 5.7.8 Error: authentication failed"]


def test_auth_mail_parameter_vouches_for_nothing(auth_hub: TLSHub) -> None:
    with tls_session(auth_hub) as conn:
        assert conn.command("MAIL FROM:<a@example.org> AUTH=alice@example.org") == [
            "250 2.1.0 Ok"]
        assert conn.command(f"RCPT TO:<{FOREIGN}>")[0].startswith("554 5.7.1")
        conn.command("RSET")
        assert conn.command(f"AUTH PLAIN {plain(USER, PASSWORD)}")[0].startswith("235")
        assert conn.command("MAIL FROM:<alice@example.org> AUTH=<>") == ["250 2.1.0 Ok"]
        assert conn.command(f"RCPT TO:<{FOREIGN}>")[0].startswith("250")


# --------------------------------------------------------------------------- submission


def test_submission_needs_auth_even_from_a_trusted_network(auth_hub: TLSHub,
                                                           queue: Queue) -> None:
    with smtp_client(auth_hub, auth_hub.submission_port, source="127.0.0.1") as client:
        assert client.mail(MASQUERADED_SENDER)[0] == 250
        assert client.rcpt(FOREIGN) == (530, b"5.7.0 Authentication required")
        assert client.rcpt("postmaster@localhost") == (530, b"5.7.0 Authentication required")
        client.rset()
        client.login(USER, PASSWORD)
        assert client.mail(MASQUERADED_SENDER)[0] == 250
        assert client.rcpt(FOREIGN)[0] == 250
        code, reply = client.data(b"Subject: submitted\r\n\r\nhello\r\n")
    assert code == 250
    [message] = [m for m in queue.messages() if m.queue_id == queued_id(reply)]
    # No masquerading on submission: the sender is what the authenticated user gave.
    assert message.envelope.sender == MASQUERADED_SENDER
    assert message.envelope.auth_user == USER


# --------------------------------------------------------------------------- pure parts


def test_sasl_plain_steps() -> None:
    exchange, initial = SaslExchange.start("plain " + plain("bob", "pw"))
    assert (exchange.mechanism, initial) == ("PLAIN", plain("bob", "pw"))
    assert exchange.step(initial) == Credentials("bob", "pw")
    exchange, initial = SaslExchange.start("PLAIN")
    assert initial is None and exchange.step(None) == ""
    assert exchange.step(plain("bob", "pw", authzid="bob")) == Credentials("bob", "pw")
    with pytest.raises(AuthFailed):  # acting for another user
        SaslExchange("PLAIN").step(plain("bob", "pw", authzid="carol"))
    with pytest.raises(AuthFailed):
        SaslExchange("PLAIN").step("")  # "AUTH PLAIN =": an empty response
    with pytest.raises(AuthMalformed):
        SaslExchange("PLAIN").step("not base64!")
    with pytest.raises(AuthCancelled):
        SaslExchange("PLAIN").step("*")
    assert "pw" not in repr(Credentials("bob", "pw"))


def test_sasl_login_steps() -> None:
    exchange, initial = SaslExchange.start("LOGIN =")
    assert initial == ""
    assert exchange.step(initial) == "UGFzc3dvcmQ6"  # an empty user name, then the password
    exchange = SaslExchange("LOGIN")
    assert exchange.step(None) == "VXNlcm5hbWU6"
    assert exchange.step(b64("bob")) == "UGFzc3dvcmQ6"
    assert exchange.step(b64("p w:ü")) == Credentials("bob", "p w:ü")


def test_sasl_start_refusals() -> None:
    for arg, code in (("", 501), ("PLAIN a b", 501), ("GSSAPI", 504), ("XOAUTH2 x", 504)):
        with pytest.raises(Exception) as refused:
            SaslExchange.start(arg)
        assert getattr(refused.value, "code", None) == code, arg


def test_received_comments() -> None:
    tls = SessionInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
    assert trace_comments(tls, "alice") == [
        "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits))",
        "(Authenticated sender: alice)"]
    assert trace_comments(None, None) == []
    header = b"Received: from a (b [1.2.3.4])\r\n\tby hub (relayhub) with ESMTPSA id X; date\r\n"
    assert with_comments(header, ["(c1)", "(c2)"]) == (
        b"Received: from a (b [1.2.3.4])\r\n\t(c1)\r\n\t(c2)\r\n"
        b"\tby hub (relayhub) with ESMTPSA id X; date\r\n")
    assert with_comments(header, []) == header
