"""Aliases end to end: mail to a list reaches each local Maildir and a remote sink once, a
message coming back with the same Delivered-To bounces as a loop, list owners become the
envelope sender, and edits of the aliases file apply without a restart."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import ReactorThread
from hubprocess import Hub, Queue, SMTPConnection
from smtpsink import SMTPSink

SINK_HOST = "127.0.0.15"
USERS = "alice:{PLAIN}x:Alice Liddell\nbob:{PLAIN}x:Bob\n"
ALIASES = """\
team: alice, bob, carol@remote.example
announce: :include:lists/announce
owner-announce: alice
"""
T = TypeVar("T")


class World:
    """A hub whose mail for remote.example goes to a sink on SINK_HOST."""

    def __init__(self, rt: ReactorThread, directory: Path, sink: SMTPSink) -> None:
        self.directory = directory
        self.aliases = directory / "aliases"
        self.aliases.write_text(ALIASES)
        (directory / "lists").mkdir()
        (directory / "lists" / "announce").write_text("dave@remote.example\nbob\n")
        (directory / "users").write_text(USERS)
        self.sink = sink
        self.hub = Hub(directory, {
            "domains": {"local": ["example.org", "localhost"]},
            "aliases": {"file": str(self.aliases)},
            "users": {"file": str(directory / "users")},
            "routing": {"transport": {"remote.example": f"[{SINK_HOST}]:{sink.port}"}},
            "delivery": {"tls": "none", "retry_min": "1s", "retry_max": "2s"},
        })
        self.queue = Queue(rt, self.hub.state_dir)

    def send(self, recipients: list[str], body: bytes, sender: str = "postmaster@localhost"
             ) -> str:
        return self.hub.send(recipients, body, sender)

    def mailbox(self, user: str) -> list[EmailMessage]:
        return self.hub.mailbox(user)

    def raw_mailbox(self, user: str) -> list[bytes]:
        new = self.hub.state_dir / "mail" / user / "new"
        return [f.read_bytes() for f in sorted(new.iterdir())] if new.is_dir() else []

    def rcpt_code(self, address: str) -> int:
        with SMTPConnection(self.hub.smtp_port) as conn:
            conn.reply()
            conn.command("EHLO client.test")
            conn.command("MAIL FROM:<postmaster@localhost>")
            return int(conn.command(f"RCPT TO:<{address}>")[-1][:3])

    def wait(self, condition: Callable[[], T], timeout: float = 20.0) -> T:
        return self.hub.wait(condition, timeout)


@pytest.fixture
def world(reactor_thread: ReactorThread, tmp_path: Path) -> Iterator[World]:
    with SMTPSink(reactor_thread, host=SINK_HOST) as sink:
        built = World(reactor_thread, tmp_path, sink)
        built.hub.start()
        try:
            yield built
        finally:
            built.hub.stop()


def reports(world: World) -> list[EmailMessage]:
    return [m for m in world.mailbox("postmaster") if m.get_content_type() == "multipart/report"]


def status_fields(report: EmailMessage) -> list[dict[str, Any]]:
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    return [dict(part.items()) for part in status.get_payload()][1:]  # type: ignore[union-attr]


def test_two_local_members_and_one_remote_each_get_it_once(world: World) -> None:
    # Named twice, directly and through the list: still one copy each.
    queue_id = world.send(["team@example.org", "Bob@example.org"],
                          b"Subject: to the team\r\n\r\nhello team\r\n")
    [remote] = world.sink.wait_messages(1, timeout=20)
    assert remote.accepted == ["carol@remote.example"]
    assert remote.mail_from.startswith("MAIL FROM:<postmaster@localhost>")
    world.wait(lambda: queue_id not in world.queue.ids())
    [to_alice], [to_bob] = world.mailbox("alice"), world.mailbox("bob")
    assert to_alice["Delivered-To"] == "alice@example.org"
    assert to_bob["Delivered-To"] == "bob@example.org"  # the list came first
    for message in (to_alice, to_bob):
        assert message["Subject"] == "to the team"
        # The Received header names neither member: two recipients were given, so none.
        assert "alice" not in message["Received"] and "for <" not in message["Received"]
    assert remote.body is not None and b"hello team" in remote.body
    assert not (world.hub.state_dir / "mail" / "team").exists()
    time.sleep(0.5)
    assert len(world.sink.messages()) == 1 and not reports(world)


def test_list_owner_is_the_envelope_sender(world: World) -> None:
    world.send(["announce@example.org"], b"Subject: news\r\n\r\nnews\r\n")
    [remote] = world.sink.wait_messages(1, timeout=20)
    assert remote.accepted == ["dave@remote.example"]
    assert remote.mail_from.startswith("MAIL FROM:<owner-announce@example.org>")
    [to_bob] = world.wait(lambda: world.mailbox("bob"))
    assert to_bob["Return-Path"] == "<owner-announce@example.org>"


def test_message_coming_back_with_same_delivered_to_bounces_as_loop(world: World) -> None:
    world.send(["team@example.org"], b"Subject: loop\r\n\r\nround and round\r\n")
    [delivered] = world.wait(lambda: world.raw_mailbox("alice"))
    assert delivered.startswith(b"Return-Path: <postmaster@localhost>\r\n"
                                b"Delivered-To: alice@example.org\r\n")
    world.wait(lambda: world.mailbox("bob"))
    # A forwarder somewhere sends alice's copy, Delivered-To and all, back to the list.
    again = delivered.split(b"\r\n", 1)[1]
    queue_id = world.send(["team@example.org"], again)
    [report] = world.wait(lambda: reports(world))
    [fields] = status_fields(report)
    assert fields["Final-Recipient"] == "rfc822; alice@example.org"
    assert fields["Original-Recipient"] == "rfc822; team@example.org"
    assert fields["Action"] == "failed" and fields["Status"] == "5.4.6"
    assert "loop" in fields["Diagnostic-Code"]
    assert queue_id in report.as_string()
    # The members without that Delivered-To still got the message once more.
    world.wait(lambda: len(world.mailbox("bob")) == 2)
    assert len(world.mailbox("alice")) == 1
    assert len(world.sink.wait_messages(2, timeout=20)) == 2


def test_edits_apply_within_two_seconds_and_broken_edit_keeps_old_table(world: World) -> None:
    assert world.rcpt_code("newlist@example.org") == 550
    world.aliases.write_text(ALIASES + "newlist: bob\n")
    start = time.monotonic()
    world.wait(lambda: world.rcpt_code("newlist@example.org") == 250, timeout=2.0)
    assert time.monotonic() - start < 2.0

    # A broken edit: the error is logged with file and line, the last good table stays.
    world.aliases.write_text(ALIASES + "newlist: bob\nother: bob\nbroken: |/bin/sh\n")
    where = f"{world.aliases}:6: program target '|/bin/sh' is not allowed"
    world.wait(lambda: where in world.hub.log(), timeout=2.0)
    world.hub.wait_for_log("keeping the last good version")
    assert world.rcpt_code("newlist@example.org") == 250
    assert world.rcpt_code("other@example.org") == 550

    # Fixed again, and an include file edit counts as an edit too.
    world.aliases.write_text(ALIASES + "other: bob\n")
    world.wait(lambda: world.rcpt_code("other@example.org") == 250, timeout=2.0)
    assert world.rcpt_code("newlist@example.org") == 550
    (world.directory / "lists" / "announce").write_text("dave@remote.example\nbob\nalice\n")
    with SMTPConnection(world.hub.smtp_port) as conn:
        conn.reply()
        world.wait(lambda: len(conn.command("EXPN announce")) == 3, timeout=2.0)


def test_unknown_local_recipient_still_refused(world: World) -> None:
    with SMTPConnection(world.hub.smtp_port, source="127.0.0.2") as conn:
        conn.reply()
        conn.command("EHLO client.test")
        conn.command("MAIL FROM:<x@remote.example>")
        assert conn.command("RCPT TO:<nobody@example.org>") == [
            "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown"]
        assert conn.command("RCPT TO:<team@example.org>") == ["250 2.1.5 Ok"]


def test_failure_of_a_list_member_is_reported_to_the_list_owner(
        reactor_thread: ReactorThread, tmp_path: Path) -> None:
    refusing = {"dave@remote.example": "550 5.1.1 no such user"}
    with SMTPSink(reactor_thread, host=SINK_HOST, rcpt_replies=refusing) as sink:
        world = World(reactor_thread, tmp_path, sink)
        world.hub.start()
        try:
            world.send(["announce@example.org"], b"Subject: news\r\n\r\nnews\r\n")
            # The report goes to owner-announce (alice), or today ends up with postmaster.
            world.wait(lambda: reports(world) or [
                m for m in world.mailbox("alice") if m.get_content_type() == "multipart/report"])
        finally:
            world.hub.stop()
    [report] = [m for m in world.mailbox("alice") if m.get_content_type() == "multipart/report"]
    [fields] = status_fields(report)
    assert fields["Final-Recipient"] == "rfc822; dave@remote.example"
    assert fields["Original-Recipient"] == "rfc822; announce@example.org"


def test_broken_file_at_start_defers_local_mail_until_fixed(reactor_thread: ReactorThread,
                                                            tmp_path: Path) -> None:
    with SMTPSink(reactor_thread, host=SINK_HOST) as sink:
        world = World(reactor_thread, tmp_path, sink)
        world.aliases.write_text("team: alice\nbroken\n")
        world.hub.start()
        try:
            world.hub.wait_for_log(f"{world.aliases}:2: missing ':' after the alias name")
            # Any local name might be an alias: deferred, neither refused nor misdelivered.
            assert world.rcpt_code("team@example.org") == 451
            assert world.rcpt_code("alice@example.org") == 451
            assert world.rcpt_code("someone@remote.example") == 250  # not ours: unaffected
            world.aliases.write_text(ALIASES)
            world.wait(lambda: world.rcpt_code("team@example.org") == 250, timeout=2.0)
        finally:
            world.hub.stop()
