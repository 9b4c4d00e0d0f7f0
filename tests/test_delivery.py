"""Delivery end to end: a real relayhub daemon, a real DNS server on loopback and real SMTP
sinks on 127.0.0.x, all sharing one SMTP port as MX hosts on the Internet do."""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from conftest import ReactorThread
from dnsserver import DNSServer
from hubprocess import Hub, Queue, free_port
from smtpsink import SMTPSink

from relayhub.queue.sqlite import SQLiteQueueStore
from relayhub.queue.store import Envelope, RecipientRequest

POSTMASTER = "postmaster@localhost"


def zone() -> dict[str, Any]:
    return {
        "example.com": {"MX": [(10, "mx1.example.com"), (20, "mx2.example.com")]},
        "mx1.example.com": {"A": ["127.0.0.11"]},  # nothing listens there: refused
        "mx2.example.com": {"A": ["127.0.0.12"]},
        "nomx.example": {"A": ["127.0.0.13"]},
        "nullmx.example": {"MX": [(0, ".")]},
        "sink.example": {"MX": [(10, "mx.sink.example")]},
        "mx.sink.example": {"A": ["127.0.0.14"]},
    }


class World:
    """DNS, sinks and a hub wired together; `port` is the SMTP port of every sink."""

    def __init__(self, rt: ReactorThread, tmp: Path, dns: DNSServer, port: int,
                 overrides: dict[str, dict[str, Any]]) -> None:
        self.rt, self.tmp, self.dns, self.port = rt, tmp, dns, port
        delivery = {"nameservers": [f"127.0.0.1:{dns.port}"], "smtp_port": port,
                    "retry_min": "1s", "retry_max": "2s", "tls": "none"}
        delivery.update(overrides.pop("delivery", {}))
        self.hub = Hub(tmp, {"delivery": delivery, **overrides})
        self.queue = Queue(rt, self.hub.state_dir)

    def sink(self, host: str, **options: Any) -> SMTPSink:
        return SMTPSink(self.rt, host=host, port=self.port, **options)

    def send(self, recipients: list[str], body: bytes = b"Subject: test\r\n\r\nhello\r\n",
             sender: str = POSTMASTER) -> str:
        return self.hub.send(recipients, body, sender)

    def mailbox(self, user: str) -> list[email.message.EmailMessage]:
        return self.hub.mailbox(user)

    def wait_gone(self, queue_id: str) -> None:
        """Until the message has left the queue: every recipient has a final result."""
        self.wait(lambda: queue_id not in self.queue.ids())

    def wait(self, condition: Callable[[], Any], timeout: float = 20.0) -> Any:
        return self.hub.wait(condition, timeout)


@pytest.fixture
def dns(reactor_thread: ReactorThread) -> Iterator[DNSServer]:
    with DNSServer(reactor_thread, zone()) as server:
        yield server


@pytest.fixture
def world(reactor_thread: ReactorThread, tmp_path: Path, dns: DNSServer,
          request: pytest.FixtureRequest) -> Iterator[World]:
    marker = request.node.get_closest_marker("hub")
    overrides = dict(marker.args[0]) if marker else {}
    built = World(reactor_thread, tmp_path, dns, free_port(), overrides)
    built.hub.start()
    yield built
    built.hub.stop()


def reports(world: World, user: str = "postmaster") -> list[EmailMessage]:
    return [m for m in world.mailbox(user) if m.get_content_type() == "multipart/report"]


def status_fields(report: EmailMessage) -> list[dict[str, str]]:
    """The per-recipient field groups of a delivery-status part."""
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    groups = [dict(part.items()) for part in status.get_payload()]  # type: ignore[union-attr]
    return groups[1:]


def test_mx_preference_and_fallback_when_first_refuses(world: World) -> None:
    with world.sink("127.0.0.12") as mx2:
        world.send(["alice@example.com"])
        [message] = mx2.wait_messages(1)
        assert message.accepted == ["alice@example.com"]
        world.wait(lambda: "relay=mx2.example.com[127.0.0.12]:" in world.hub.log())
    assert "status=sent" in world.hub.log()


def test_a_record_fallback_without_mx(world: World) -> None:
    with world.sink("127.0.0.13") as host:
        queue_id = world.send(["bob@nomx.example"])
        host.wait_messages(1)
        world.wait_gone(queue_id)


def test_null_mx_bounces_with_5_1_10(world: World) -> None:
    queue_id = world.send(["carol@nullmx.example"])
    [report] = world.wait(lambda: reports(world))
    [fields] = status_fields(report)
    assert fields["Action"] == "failed" and fields["Status"] == "5.1.10"
    assert fields["Final-Recipient"] == "rfc822; carol@nullmx.example"
    assert queue_id in report.as_string()
    world.wait_gone(queue_id)


def test_4xx_twice_then_250_deferred_in_between(world: World) -> None:
    with world.sink("127.0.0.14", rcpt_replies={
        "slow@sink.example": ["451 4.3.0 try later", "451 4.3.0 try later"]
    }) as sink:
        queue_id = world.send(["slow@sink.example"])
        seen: list[str] = []

        def deferred_once() -> bool:
            for message in world.queue.messages():
                if message.queue_id == queue_id:
                    seen.append(message.recipients[0].status)
            return "deferred" in seen

        world.wait(deferred_once)
        [message] = sink.wait_messages(1, timeout=20)
        assert message.accepted == ["slow@sink.example"]
        assert len([t for t in sink.transactions() if t.rcpt_to]) == 3
        world.wait_gone(queue_id)


def test_one_recipient_bounces_other_delivered_in_one_transaction(world: World) -> None:
    with world.sink("127.0.0.14", rcpt_replies={"gone@sink.example": "550 5.1.1 no such user"}
                    ) as sink:
        queue_id = world.send(["gone@sink.example", "here@sink.example", "also@sink.example"])
        [message] = sink.wait_messages(1)
        assert message.accepted == ["here@sink.example", "also@sink.example"]
        assert len(message.rcpt_to) == 3  # one transaction carried every recipient
        world.wait_gone(queue_id)
    [report] = world.wait(lambda: reports(world))
    [fields] = status_fields(report)
    assert fields["Final-Recipient"] == "rfc822; gone@sink.example"
    assert fields["Status"] == "5.1.1" and "no such user" in fields["Diagnostic-Code"]
    assert "here@sink.example" not in str(status_fields(report))


def test_two_queued_messages_share_one_connection(reactor_thread: ReactorThread,
                                                  tmp_path: Path, dns: DNSServer) -> None:
    world = World(reactor_thread, tmp_path, dns, free_port(), {})
    # Queue two messages while no hub runs, as if it had been down; a start then finds both
    # due in one scan.
    store = SQLiteQueueStore(world.hub.state_dir)
    reactor_thread.run(store.open)
    for n in range(2):
        incoming = store.incoming()
        incoming.write(b"Subject: queued %d\r\n\r\nbody\r\n" % n)
        reactor_thread.run(incoming.commit, Envelope(
            sender=POSTMASTER, recipients=(RecipientRequest("x@sink.example"),)))
    reactor_thread.run(store.close)
    with world.sink("127.0.0.14") as sink:
        world.hub.start()
        try:
            messages = sink.wait_messages(2)
            assert {m.session for m in messages} == {1}
            assert sink.connections == 1
            world.wait(lambda: not world.queue.ids())
        finally:
            world.hub.stop()


def test_an_idle_session_carries_the_next_message_to_its_hop(world: World) -> None:
    # A session with nothing left to send stays open a moment (IDLE_SESSION, as Postfix's
    # connection cache) for more mail to the same hop, instead of QUIT and a new connection.
    with world.sink("127.0.0.14") as sink:
        world.send(["first@sink.example"])
        [first] = sink.wait_messages(1)
        still_open = not sink.sessions()[0].closed
        world.send(["second@sink.example"])
        messages = sink.wait_messages(2)
        if still_open:  # a very slow machine may have let the idle session end meanwhile
            assert {m.session for m in messages} == {first.session}
            assert sink.connections == 1


def test_an_idle_connection_closed_by_the_server_costs_the_next_message_nothing(
        world: World) -> None:
    with world.sink("127.0.0.14") as sink:
        world.send(["first@sink.example"])
        sink.wait_messages(1)
        # The server ends the idle connection (its own timeout, say); the next message must
        # go over a new one at once, not be deferred by an attempt on the dead one.
        world.rt.run(lambda: [p.transport.loseConnection() for p in list(sink._live)])
        sink.wait_for(lambda s: all(session.closed for session in s._sessions))
        world.hub.wait_for_log("status=sent")
        queue_id = world.send(["second@sink.example"])
        [_, second] = sink.wait_messages(2)
        assert second.accepted == ["second@sink.example"] and second.session == 2
        world.wait_gone(queue_id)
    assert "status=deferred" not in world.hub.log()


@pytest.mark.hub({"delivery": {"max_lifetime": "7s", "delay_warning": "2s"}})
def test_delay_warning_once_then_expiry_bounce(world: World) -> None:
    with world.sink("127.0.0.14", rcpt_replies=lambda address: "451 4.2.0 mailbox busy"):
        queue_id = world.send(["late@sink.example"])
        world.wait(lambda: queue_id not in world.queue.ids(), timeout=30)
    notices = reports(world)
    actions = [status_fields(n)[0]["Action"] for n in notices]
    assert actions == ["delayed", "failed"], actions
    failed = status_fields(notices[1])[0]
    assert failed["Status"] == "4.4.7" and "mailbox busy" in failed["Diagnostic-Code"]


def test_8bit_message_to_hop_without_8bitmime_is_7bit_and_decodes(world: World) -> None:
    text = "Grüße aus Köln — ça va? Ελληνικά\r\n" * 3
    body = ("Subject: 8bit\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n" + text).encode()
    with world.sink("127.0.0.14", extensions=("PIPELINING", "SIZE 1000000")) as sink:
        with smtplib.SMTP("127.0.0.1", world.hub.smtp_port) as client:
            client.ehlo("client.test")
            client.mail(POSTMASTER, ["BODY=8BITMIME"])
            client.rcpt("eight@sink.example")
            assert client.data(body)[0] == 250
        [message] = sink.wait_messages(1)
        world.wait(lambda: not world.queue.ids())
    assert message.data is not None and max(message.data) < 128
    assert "BODY=" not in message.mail_from
    parsed = email.message_from_bytes(message.body or b"", policy=email.policy.default)
    original = email.message_from_bytes(body, policy=email.policy.default)
    assert parsed.get_content() == original.get_content()  # type: ignore[attr-defined]
    assert "Köln" in parsed.get_content()  # type: ignore[attr-defined]


def test_dot_lines_on_every_16k_boundary_arrive_byte_identical(world: World,
                                                               ) -> None:
    # Lines of "." (sent stuffed as "..") placed so that one straddles every 16 KiB mark of
    # the stored body, plus a first body line that starts with a dot.
    lines = [b"Subject: dots", b"", b".first line starts with a dot"]
    size = sum(len(line) + 2 for line in lines)
    for boundary in range(16384, 16384 * 6, 16384):
        filler = boundary - size - 3
        while filler > 0:
            chunk = min(filler, 900)
            lines.append(b"x" * max(chunk - 2, 0))
            size += max(chunk - 2, 0) + 2
            filler = boundary - size - 3
        lines.append(b".")
        size += 3
    payload = b"\r\n".join(lines) + b"\r\n"
    with world.sink("127.0.0.14") as sink:
        with smtplib.SMTP("127.0.0.1", world.hub.smtp_port) as client:
            client.ehlo("client.test")
            client.sendmail(POSTMASTER, ["dots@sink.example"], payload)
        [message] = sink.wait_messages(1)
        world.wait(lambda: not world.queue.ids())
        assert len(sink.messages()) == 1 and len(sink.transactions()) == 1
    assert message.body is not None
    assert message.body.endswith(payload)  # after our Received: header, byte for byte


def test_local_delivery_to_maildir_with_return_path(world: World) -> None:
    world.send([POSTMASTER], b"Subject: local\r\n\r\nfor the postmaster\r\n",
               sender="someone@example.com")
    [message] = world.wait(lambda: world.mailbox("postmaster"))
    assert message["Return-Path"] == "<someone@example.com>"
    assert message["Delivered-To"] == POSTMASTER
    assert message["Subject"] == "local"


def test_recipients_with_their_own_sender_travel_in_their_own_transaction(
        reactor_thread: ReactorThread, tmp_path: Path, dns: DNSServer) -> None:
    world = World(reactor_thread, tmp_path, dns, free_port(), {})
    store = SQLiteQueueStore(world.hub.state_dir)
    reactor_thread.run(store.open)
    incoming = store.incoming()
    incoming.write(b"Subject: list mail\r\n\r\nto the list\r\n")
    reactor_thread.run(incoming.commit, Envelope(sender=POSTMASTER, recipients=(
        RecipientRequest("direct@sink.example"),
        RecipientRequest("member@sink.example", orcpt="rfc822;list@localhost",
                         sender="owner-list@localhost"),
    )))
    reactor_thread.run(store.close)
    with world.sink("127.0.0.14") as sink:
        world.hub.start()
        try:
            messages = sink.wait_messages(2)
            world.wait(lambda: not world.queue.ids())
        finally:
            world.hub.stop()
    senders = {m.accepted[0]: m.mail_from for m in messages}
    assert senders["direct@sink.example"].startswith(f"MAIL FROM:<{POSTMASTER}>")
    assert senders["member@sink.example"].startswith("MAIL FROM:<owner-list@localhost>")


@pytest.mark.hub({"domains": {"masquerade": ["example.com"]}})
def test_sender_below_a_masquerade_domain_is_rewritten_in_envelope_and_header(
        world: World) -> None:
    body = (b"From: Alice Example <alice@host.dept.example.com>\r\n"
            b"Sender: (the robot) robot@build.example.com\r\nTo: bob@sink.example\r\n"
            b"Subject: masq\r\n\r\nFrom: a body line that stays alice@host.dept.example.com\r\n")
    with world.sink("127.0.0.14") as sink:
        queue_id = world.send(["bob@sink.example"], body,
                              sender="alice@host.dept.example.com")
        [message] = sink.wait_messages(1)
        world.wait_gone(queue_id)
    assert message.mail_from.startswith("MAIL FROM:<alice@example.com>")
    assert message.body is not None
    assert b"\r\nFrom: Alice Example <alice@example.com>\r\n" in message.body
    assert b"\r\nSender: (the robot) robot@example.com\r\n" in message.body
    assert b"To: bob@sink.example\r\n" in message.body
    assert message.body.endswith(b"stays alice@host.dept.example.com\r\n")
