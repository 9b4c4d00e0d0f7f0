"""VRFY and EXPN (SPEC §3, RFC 5321 §3.5) through a real `twistd relayhub` daemon with a
users file and an aliases file, under the "trusted", "all" and "off" policies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hubprocess import Hub, SMTPConnection

TRUSTED = "127.0.0.1"
UNTRUSTED = "127.0.0.2"  # loopback, but outside the trusted network configured below
USERS = "smith:{PLAIN}x:Fred Smith\nalice:{PLAIN}x:Alice Liddell\nbob:{PLAIN}x:\n"
ALIASES = """\
# The seed examples of issue 4.
Example-People: staff,
    everyone,
    guest@remote.example
staff: alice, :include:lists/staff
everyone: staff, smith
a: b, x@remote.example
b: a, y@remote.example
"""
MEMBER_NAMES = ("alice", "bob", "smith", "guest", "liddell", "fred")


def start_hub(directory: Path, smtp: dict[str, Any]) -> Hub:
    (directory / "lists").mkdir()
    (directory / "lists" / "staff").write_text("# one address per line\nbob\nalice\n")
    (directory / "aliases").write_text(ALIASES)
    (directory / "users").write_text(USERS)
    return Hub(directory, {
        "smtp": smtp,
        "domains": {"local": ["example.org", "localhost"], "trusted_networks": ["127.0.0.1/32"]},
        "aliases": {"file": str(directory / "aliases")},
        "users": {"file": str(directory / "users")},
    }).start()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    running = start_hub(tmp_path_factory.mktemp("hub"), {"vrfy": "trusted", "expn": "trusted"})
    yield running
    running.stop()


def session(hub: Hub, source: str = TRUSTED) -> SMTPConnection:
    conn = SMTPConnection(hub.smtp_port, source=source)
    assert conn.reply()[0].startswith("220 ")
    assert conn.command("EHLO client.test")[-1].startswith("250 ")
    return conn


def test_vrfy_user_gives_full_name(hub: Hub) -> None:
    with session(hub) as conn:
        assert conn.command("VRFY Smith") == ["250 2.1.5 Fred Smith <smith@example.org>"]
        assert conn.command("VRFY <smith@localhost>") == [
            "250 2.1.5 Fred Smith <smith@localhost>"]
        assert conn.command("VRFY bob") == ["250 2.1.5 <bob@example.org>"]
        assert conn.command("VRFY example-people") == [
            "250 2.1.5 <example-people@example.org>"]


def test_expn_one_line_per_member_nested_and_included(hub: Hub) -> None:
    with session(hub) as conn:
        assert conn.command("EXPN Example-People") == [
            "250-2.1.5 Alice Liddell <alice@example.org>",
            "250-2.1.5 <bob@example.org>",
            "250-2.1.5 Fred Smith <smith@example.org>",
            "250 2.1.5 <guest@remote.example>",
        ]


def test_loop_a_b_a_is_cut(hub: Hub) -> None:
    with session(hub) as conn:
        assert conn.command("EXPN a") == ["250-2.1.5 <y@remote.example>",
                                          "250 2.1.5 <x@remote.example>"]
        # Mail to it goes to each member once, and is accepted from anyone.
    with session(hub, UNTRUSTED) as conn:
        assert conn.command("MAIL FROM:<someone@remote.example>")[0].startswith("250 ")
        assert conn.command("RCPT TO:<a@example.org>") == ["250 2.1.5 Ok"]


def test_unknown_names(hub: Hub) -> None:
    with session(hub) as conn:
        for command in ("VRFY nobody", "VRFY <nobody@example.org>", "EXPN nobody",
                        "EXPN nobody@example.org"):
            [line] = conn.command(command)
            assert line.startswith("550 5.1.1 "), (command, line)
        assert conn.command("VRFY someone@remote.example")[0].startswith("252 2.0.0 ")
        assert conn.command("VRFY")[0].startswith("501 ")


def test_untrusted_client_learns_nothing(hub: Hub) -> None:
    with session(hub, UNTRUSTED) as conn:
        for name in ("Smith", "nobody", "Example-People"):
            [vrfy] = conn.command(f"VRFY {name}")
            [expn] = conn.command(f"EXPN {name}")
            assert vrfy.startswith("252 2.0.0 "), vrfy
            assert expn.startswith("502 5.7.0 "), expn
            for reply in (vrfy, expn):
                assert not any(word in reply.lower() for word in (*MEMBER_NAMES, name.lower()))


def test_each_lookup_is_logged(hub: Hub) -> None:
    with session(hub) as conn:
        conn.command("VRFY Smith")
        conn.command("EXPN nobody")
        conn.command("QUIT")
    with session(hub, UNTRUSTED) as conn:
        conn.command("EXPN staff")
        conn.command("QUIT")
    log = hub.wait_for_log("VRFY Smith from unknown[127.0.0.1]: 250 2.1.5",
                           "EXPN nobody from unknown[127.0.0.1]: 550 5.1.1",
                           "EXPN staff from unknown[127.0.0.2]: 502 5.7.0")
    assert "Fred Smith" not in log  # the log names the question, never the answer


def test_policy_all_and_off(tmp_path: Path) -> None:
    hub = start_hub(tmp_path, {"vrfy": "all", "expn": "off"})
    try:
        with session(hub, UNTRUSTED) as conn:
            assert conn.command("VRFY Smith") == ["250 2.1.5 Fred Smith <smith@example.org>"]
            assert conn.command("EXPN staff")[0].startswith("502 5.7.0 ")
        with session(hub, TRUSTED) as conn:
            assert conn.command("EXPN staff")[0].startswith("502 5.7.0 ")
    finally:
        hub.stop()
