"""The ESMTP server through real sockets against a real `twistd relayhub` daemon."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ReactorThread
from hubprocess import Hub, Queue, SMTPConnection, free_port

UNTRUSTED = "127.0.0.2"  # loopback, but outside the trusted network configured below
# Mail for PARKED is routed to a port where nothing listens and retried only hourly, so it
# stays in the queue for these tests to inspect instead of being delivered and removed.
PARKED = b"someone@parked.example"
PARKING: dict[str, dict[str, object]] = {
    "routing": {"transport": {"parked.example": f"[127.0.0.1]:{free_port()}"}},
    "delivery": {"retry_min": "1h", "retry_max": "1h"},
}
LIMITS = {
    "max_message_size": 20000,
    "max_recipients": 3,
    "max_connections_per_ip": 3,
    "max_line_length": 16384,
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    running = Hub(
        tmp_path_factory.mktemp("hub"),
        {"smtp": LIMITS, "domains": {"trusted_networks": ["127.0.0.1/32", "::1/128"]},
         **PARKING},
    ).start()
    yield running
    running.stop()


@pytest.fixture
def queue(reactor_thread: ReactorThread, hub: Hub) -> Queue:
    return Queue(reactor_thread, hub.state_dir)


def session(hub: Hub, source: str | None = None) -> SMTPConnection:
    conn = SMTPConnection(hub.smtp_port, source=source)
    assert conn.reply() == ["220 hub.test ESMTP relayhub"]
    return conn


def ehlo(conn: SMTPConnection) -> list[str]:
    lines = conn.command("EHLO client.test")
    assert lines[-1].startswith("250 ")
    return lines


def start_data(conn: SMTPConnection) -> None:
    """A pipelined MAIL, RCPT, DATA to postmaster, up to the 354."""
    conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<" + PARKED + b">\r\nDATA\r\n")
    assert [conn.code() for _ in range(3)] == [250, 250, 354]


def queued_id(reply: list[str]) -> str:
    assert reply[-1].startswith("250 2.0.0 Ok: queued as "), reply
    return reply[-1].rsplit(" ", 1)[1]


def test_ehlo_keywords_with_smtplib(hub: Hub) -> None:
    with smtplib.SMTP("127.0.0.1", hub.smtp_port, local_hostname="client.test") as client:
        code, _ = client.ehlo()
        assert code == 250
        features = client.esmtp_features
        for keyword in ("pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes", "dsn",
                        "help"):
            assert keyword in features
        assert features["size"] == "20000"
        assert "starttls" not in features  # no [tls] configured


def test_smtplib_sends_and_message_is_stored(hub: Hub, queue: Queue) -> None:
    body = "Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\n.leading dot\r\nline\r\n"
    with smtplib.SMTP("127.0.0.1", hub.smtp_port) as client:
        client.ehlo("client.test")
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt(PARKED.decode())[0] == 250
        code, reply = client.data(body.encode())
    assert code == 250
    queue_id = reply.decode().rsplit(" ", 1)[1]
    message = next(m for m in queue.messages() if m.queue_id == queue_id)
    assert message.envelope.sender == "alice@example.org"
    assert [r.address for r in message.recipients] == [PARKED.decode()]
    assert message.subject == "café"
    stored = queue.body(queue_id)
    assert stored.startswith(b"Received: from client.test (unknown [127.0.0.1])\r\n")
    assert f"by hub.test (relayhub) with ESMTP id {queue_id}".encode() in stored
    # smtplib stuffs the leading dot; the store holds it unstuffed.
    assert stored.endswith(b"\r\n\r\n.leading dot\r\nline\r\n")


def test_pipelined_commands_answered_in_order(hub: Hub, queue: Queue) -> None:
    with session(hub) as conn:
        ehlo(conn)
        conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<" + PARKED + b">\r\n"
                  b"RCPT TO:<nobody@localhost>\r\nDATA\r\n")
        assert conn.reply() == ["250 2.1.0 Ok"]
        assert conn.reply() == ["250 2.1.5 Ok"]
        assert conn.reply()[0].startswith("550 5.1.1 <nobody@localhost>")
        assert conn.reply()[0].startswith("354 ")
        # RSET and a whole transaction inside the body are body text, never commands.
        conn.send(b"Subject: p\r\n\r\nRSET\r\nMAIL FROM:<x@y>\r\n.\r\nNOOP\r\nQUIT\r\n")
        queue_id = queued_id(conn.reply())
        assert conn.reply() == ["250 2.0.0 Ok"]
        assert conn.reply()[0].startswith("221 ")
    assert queue.body(queue_id).endswith(b"\r\n\r\nRSET\r\nMAIL FROM:<x@y>\r\n")


def test_size_refused_at_mail_and_after_data(hub: Hub, queue: Queue) -> None:
    before = queue.ids()
    with session(hub) as conn:
        ehlo(conn)
        assert conn.command("MAIL FROM:<a@example.org> SIZE=20001")[0].startswith("552 5.3.4")
        assert conn.command("MAIL FROM:<a@example.org> SIZE=100")[0] == "250 2.1.0 Ok"
        assert conn.command("RCPT TO:<postmaster@localhost>")[0] == "250 2.1.5 Ok"
        assert conn.command("DATA")[0].startswith("354")
        conn.send(b"Subject: big\r\n\r\n" + b"x" * 900 + b"\r\n")
        for _ in range(30):
            conn.send(b"y" * 900 + b"\r\n")
        conn.send(b".\r\n")
        assert conn.reply()[0].startswith("552 5.3.4")
        # The session is still usable, and nothing was queued.
        assert conn.command("NOOP") == ["250 2.0.0 Ok"]
    assert queue.ids() == before


FAKE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\r\n.\n", b"\r\n.\x00\r\n",
             b"\n.\x00\n", b"\x00\r\n.\r\n\x00"]


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_smuggling_variants_queue_no_second_message(
    hub: Hub, queue: Queue, fake_end: bytes
) -> None:
    before = queue.ids()
    with session(hub) as conn:
        ehlo(conn)
        start_data(conn)
        conn.send(b"Subject: smuggle\r\n\r\nhello" + fake_end
                  + b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<" + PARKED + b">\r\n"
                  + b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n")
        first = conn.reply()
        conn.send(b"QUIT\r\n")
        rest = []
        while True:
            try:
                rest.append(conn.reply()[-1])
            except ConnectionError:
                break
    new = queue.ids() - before
    if fake_end == b"\x00\r\n.\r\n\x00":
        # A NUL beside a real end marker is content; the real end ends the data there.
        assert first[0].startswith("250 ") or first[0].startswith("550 ")
    elif b"\r" in fake_end.replace(b"\r\n", b"") or b"\n" in fake_end.replace(b"\r\n", b""):
        assert first[0].startswith("550 5.5.2"), first  # bare CR/LF refused by default
        assert not new
    else:
        assert first[0].startswith("250 "), first
    # Never a second message: the smuggled MAIL/RCPT/DATA never ran as commands.
    assert len(new) <= 1
    for queue_id in new:
        assert b"evil" not in queue.body(queue_id) or b"smuggle" in queue.body(queue_id)
    assert all(not line.startswith("354") for line in rest), rest


def test_normalize_mode_keeps_smuggled_text_as_body(tmp_path: Path, reactor_thread:
                                                    ReactorThread) -> None:
    hub = Hub(tmp_path, {"smtp": {"bare_newline": "normalize"}, **PARKING}).start()
    try:
        with session(hub) as conn:
            ehlo(conn)
            start_data(conn)
            conn.send(b"Subject: n\r\n\r\nhello\n.\nMAIL FROM:<evil@x.example>\r\n"
                      b"RCPT TO:<postmaster@localhost>\r\nDATA\r\nbare\rcr\r\n.\r\n")
            queue_id = queued_id(conn.reply())
        queue = Queue(reactor_thread, hub.state_dir)
        assert queue.ids() == {queue_id}
        body = queue.body(queue_id)
        assert body.endswith(b"hello\r\n\r\nMAIL FROM:<evil@x.example>\r\n"
                             b"RCPT TO:<postmaster@localhost>\r\nDATA\r\nbare\r\ncr\r\n")
    finally:
        hub.stop()


def test_overlong_line_then_smuggled_transaction_in_later_write(hub: Hub, queue: Queue) -> None:
    before = queue.ids()
    with session(hub) as conn:
        ehlo(conn)
        start_data(conn)
        conn.send(b"Subject: long\r\n\r\n" + b"L" * 17000)
        time.sleep(0.2)  # a separate read on the server
        conn.send(b"\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<" + PARKED + b">\r\n"
                  b"DATA\r\nsmuggled\r\n")
        time.sleep(0.2)
        conn.send(b".\r\nNOOP\r\n")
        assert conn.reply() == ["500 5.5.2 Error: line too long"]
        assert conn.reply() == ["250 2.0.0 Ok"]  # NOOP: back in command mode only now
    assert queue.ids() == before


def test_ten_thousand_byte_line_is_accepted(hub: Hub, queue: Queue) -> None:
    with session(hub) as conn:
        ehlo(conn)
        start_data(conn)
        conn.send(b"Subject: ten\r\n\r\n" + b"T" * 10_000 + b"\r\n.\r\n")
        queue_id = queued_id(conn.reply())
    assert queue.body(queue_id).endswith(b"T" * 10_000 + b"\r\n")


RELAY_TRICKS = [
    "user%attacker.example@localhost",
    "attacker.example!user@localhost",
    '"user@attacker.example"@localhost',
    "@localhost,@attacker.example:user@victim.example",
    "@localhost:user@attacker.example",
    "user%attacker.example@relay.example",
    '"user%attacker.example"@example.org',
    "USER%ATTACKER.EXAMPLE@LOCALHOST",
    "user@attacker.example",
    "user@[192.0.2.1]",
]


@pytest.mark.parametrize("trick", RELAY_TRICKS)
def test_relay_trick_refused_for_untrusted_client(hub: Hub, trick: str) -> None:
    with session(hub, source=UNTRUSTED) as conn:
        ehlo(conn)
        assert conn.command("MAIL FROM:<a@remote.example>")[0] == "250 2.1.0 Ok"
        reply = conn.command(f"RCPT TO:<{trick}>")[0]
        assert reply.startswith(("554 5.7.1", "550 5.1.1", "501 5.1.3")), reply


def test_local_and_relay_domains_accepted_from_untrusted_client(hub: Hub) -> None:
    with session(hub, source=UNTRUSTED) as conn:
        ehlo(conn)
        assert conn.command("MAIL FROM:<a@remote.example>")[0] == "250 2.1.0 Ok"
        assert conn.command("RCPT TO:<postmaster@localhost>")[0] == "250 2.1.5 Ok"
        assert conn.command("RCPT TO:<Postmaster>")[0] == "250 2.1.5 Ok"
        assert conn.command("RCPT TO:<someone@relay.example>")[0] == "250 2.1.5 Ok"


def test_trusted_client_may_relay(hub: Hub) -> None:
    with session(hub) as conn:
        ehlo(conn)
        assert conn.command("MAIL FROM:<a@example.org>")[0] == "250 2.1.0 Ok"
        assert conn.command("RCPT TO:<friend@remote.example>")[0] == "250 2.1.5 Ok"


def test_limits_answer_with_their_codes_and_server_keeps_serving(hub: Hub) -> None:
    with session(hub) as conn:
        ehlo(conn)
        assert conn.command("MAIL FROM:<a@example.org>")[0] == "250 2.1.0 Ok"
        for n in range(3):
            assert conn.command(f"RCPT TO:<r{n}@remote.example>")[0] == "250 2.1.5 Ok"
        assert conn.command("RCPT TO:<r4@remote.example>")[0].startswith("452 4.5.3")
        assert conn.command("NOOP " + "x" * 600)[0].startswith("500 5.5.2")
        assert conn.command("BOGUS")[0].startswith("500 5.5.2")
        assert conn.command("MAIL FROM:<x@y.example>")[0].startswith("503 5.5.1")
        assert conn.command("RSET") == ["250 2.0.0 Ok"]
        assert conn.command("MAIL FROM:<a@example.org>")[0] == "250 2.1.0 Ok"
        assert conn.command("RCPT TO:<bad address>")[0].startswith("501")
        assert conn.command("NOOP") == ["250 2.0.0 Ok"]
    # Per-IP connection limit for an untrusted address (trusted ones are exempt).
    held = [session(hub, source=UNTRUSTED) for _ in range(3)]
    try:
        extra = SMTPConnection(hub.smtp_port, source=UNTRUSTED)
        assert extra.reply()[0].startswith("421 4.7.0")
        assert extra.closed()
        extra.close()
        trusted = session(hub)  # still served
        trusted.close()
    finally:
        for conn in held:
            conn.close()
    # Error limit: the tenth 5xx reply is followed by 421 and a close.
    with session(hub) as conn:
        ehlo(conn)
        for _ in range(9):
            assert conn.command("BOGUS")[0].startswith("500")
        conn.send(b"BOGUS\r\n")
        assert conn.reply()[0].startswith("500")
        assert conn.reply()[0].startswith("421 4.7.0")
        assert conn.closed()
    # Unauthorised pipelining before EHLO: 554 and disconnect.
    with session(hub) as conn:
        conn.send(b"HELO client.test\r\nMAIL FROM:<a@example.org>\r\n")
        assert conn.reply()[0].startswith("554 5.5.0")
        assert conn.closed()
    with session(hub) as conn:
        assert conn.command("HELO client.test") == ["250 hub.test"]
        conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\n")
        assert conn.reply()[0].startswith("554 5.5.0")
        assert conn.closed()
    # And the server still serves afterwards.
    with session(hub) as conn:
        assert ehlo(conn)[0] == "250-hub.test"


def test_idle_timeout(tmp_path: Path) -> None:
    hub = Hub(tmp_path, {"smtp": {"timeout": "1s"}}).start()
    try:
        with session(hub) as conn:
            assert conn.reply()[0].startswith("421 4.4.2")
            assert conn.closed()
    finally:
        hub.stop()


def test_max_connections(tmp_path: Path) -> None:
    hub = Hub(tmp_path, {"smtp": {"max_connections": 2}}).start()
    try:
        first, second = session(hub), session(hub)
        third = SMTPConnection(hub.smtp_port)
        assert third.reply()[0].startswith("421 4.7.0")
        for conn in (first, second, third):
            conn.close()
        time.sleep(0.3)
        with session(hub) as conn:
            assert conn.command("NOOP") == ["250 2.0.0 Ok"]
    finally:
        hub.stop()


def test_mail_loop_refused_after_fifty_hops(hub: Hub, queue: Queue) -> None:
    before = queue.ids()
    with session(hub) as conn:
        ehlo(conn)
        start_data(conn)
        hops = b"".join(b"Received: from h%d by h%d; date\r\n" % (n, n + 1) for n in range(51))
        conn.send(hops + b"Subject: loop\r\n\r\nbody\r\n.\r\n")
        assert conn.reply()[0].startswith("554 5.4.6")
        start_data(conn)
        conn.send(hops[: -len(b"Received: from h50 by h51; date\r\n")] + b"\r\nok\r\n.\r\n")
        queued_id(conn.reply())
    assert len(queue.ids() - before) == 1


def test_kill9_after_queued_reply_loses_nothing(tmp_path: Path, reactor_thread:
                                                ReactorThread) -> None:
    hub = Hub(tmp_path, PARKING).start()
    body = b"Subject: durable\r\nX-Test: 1\r\n\r\n" + b"".join(
        b"line %d of the durable message\r\n" % n for n in range(2000)
    )
    with session(hub) as conn:
        ehlo(conn)
        conn.send(b"MAIL FROM:<alice@example.org> BODY=8BITMIME RET=HDRS ENVID=abc123\r\n"
                  b"RCPT TO:<" + PARKED + b"> NOTIFY=SUCCESS,FAILURE "
                  b"ORCPT=rfc822;boss@example.org\r\nRCPT TO:<friend@parked.example>\r\nDATA\r\n")
        assert [conn.code() for _ in range(4)] == [250, 250, 250, 354]
        conn.send(body + b".\r\n")
        queue_id = queued_id(conn.reply())
        hub.kill9()  # at once after the 250, before the client even says QUIT
    hub.start()
    try:
        queue = Queue(reactor_thread, hub.state_dir)
        [message] = [m for m in queue.messages() if m.queue_id == queue_id]
        envelope = message.envelope
        assert envelope.sender == "alice@example.org"
        assert envelope.body_type == "8BITMIME" and envelope.ret == "HDRS"
        assert envelope.envid == "abc123"
        assert [(r.address, r.notify, r.orcpt) for r in message.recipients] == [
            (PARKED.decode(), ("SUCCESS", "FAILURE"), "rfc822;boss@example.org"),
            ("friend@parked.example", (), None),
        ]
        assert not any(r.final for r in message.recipients)
        stored = queue.body(queue_id)
        assert stored.startswith(b"Received: ") and stored.endswith(body)
        assert message.size == len(stored)
    finally:
        hub.stop()
