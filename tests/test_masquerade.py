"""Tests for relayhub.masquerade: Postfix masquerade_domains semantics for sender addresses."""

from __future__ import annotations

import pytest

from relayhub.masquerade import masquerade_address, masquerade_domain, masquerade_headers

DOMAINS = ["example.org"]


@pytest.mark.parametrize(("address", "expected"), [
    ("user@host.dept.example.org", "user@example.org"),
    ("User@HOST.Example.ORG", "User@example.org"),  # case of the domain ignored, local kept
    ("user@example.org", "user@example.org"),  # the domain itself stays
    ("user@notexample.org", "user@notexample.org"),  # a suffix, but not a sub-domain
    ("user@example.org.evil.test", "user@example.org.evil.test"),
    ("user@[192.0.2.1]", "user@[192.0.2.1]"),
    ('"a@b"@host.example.org', '"a@b"@example.org'),
    ("", ""),  # the null sender
])
def test_masquerade_address(address: str, expected: str) -> None:
    assert masquerade_address(address, DOMAINS) == expected


def test_first_matching_entry_decides() -> None:
    domains = ["foo.example.com", "example.com"]
    assert masquerade_domain("a.b.foo.example.com", domains) == "foo.example.com"
    assert masquerade_domain("a.bar.example.com", domains) == "example.com"
    assert masquerade_domain("foo.example.com", domains) is None
    assert masquerade_address("u@x.example.org", []) == "u@x.example.org"


def test_headers_from_and_sender() -> None:
    block = (b"Received: from host.dept.example.org by hub\r\n"
             b"From: Alice Example <alice@host.dept.example.org>\r\n"
             b"Sender: bob@ws1.example.org\r\n"
             b"To: carol@host.dept.example.org\r\n"
             b"Subject: mail from alice@host.dept.example.org\r\n"
             b"\r\n")
    assert masquerade_headers(block, DOMAINS) == (
        b"Received: from host.dept.example.org by hub\r\n"
        b"From: Alice Example <alice@example.org>\r\n"
        b"Sender: bob@example.org\r\n"
        b"To: carol@host.dept.example.org\r\n"
        b"Subject: mail from alice@host.dept.example.org\r\n"
        b"\r\n")


def test_folded_from_with_several_addresses() -> None:
    block = (b"FROM: \"Smith, Alice\" <alice@a.example.org>,\r\n"
             b"\t=?utf-8?q?J=C3=B6rg?= <joerg@B.Example.Org> (the other one),\r\n"
             b" outside@elsewhere.example\r\n"
             b"X-Other: 1\r\n")
    assert masquerade_headers(block, DOMAINS) == (
        b"FROM: \"Smith, Alice\" <alice@example.org>,\r\n"
        b"\t=?utf-8?q?J=C3=B6rg?= <joerg@example.org> (the other one),\r\n"
        b" outside@elsewhere.example\r\n"
        b"X-Other: 1\r\n")


def test_display_names_and_comments_keep_lookalike_text() -> None:
    block = (b'From: "alice@host.example.org" <alice@host.example.org>'
             b" (sent from bob@ws.example.org)\n")
    assert masquerade_headers(block, DOMAINS) == (
        b'From: "alice@host.example.org" <alice@example.org> (sent from bob@ws.example.org)\n')


def test_headers_left_alone() -> None:
    block = (b"From: alice@example.org\r\n"
             b"Sender: bob@unrelated.example\r\n"
             b"Subject: caf\xc3\xa9 \xff\r\n"
             b"\r\n")
    assert masquerade_headers(block, DOMAINS) == block
    unchanged = b"From: a@host.example.org\r\n"
    assert masquerade_headers(unchanged, []) == unchanged


def test_eight_bit_bytes_survive_a_rewrite() -> None:
    block = b"From: J\xc3\xb6rg \xff <joerg@host.example.org>\r\n"  # UTF-8, then a stray byte
    assert masquerade_headers(block, DOMAINS) == block.replace(b"host.example.org", b"example.org")
