"""Tests for relayhub.address: RFC 5321/6531 path grammar, normalisation, tricks, xtext."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayhub.address import (
    ForwardPath,
    Mailbox,
    parse_forward_path,
    parse_mailbox,
    parse_reverse_path,
    quote_local_part,
    relay_trick,
    xtext_decode,
    xtext_encode,
)
from relayhub.errors import SMTPReply, SyntaxErrorReply


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("<a@b>", "a", "b"),
        ("<John.Doe@Example.ORG>", "John.Doe", "example.org"),
        ("<user@example.org.>", "user", "example.org"),
        ("<a+tag!#$%&'*/=?^_`{|}~-@x-y.example>", "a+tag!#$%&'*/=?^_`{|}~-", "x-y.example"),
        ('<"a b"@example.org>', '"a b"', "example.org"),
        ('<"a\\"b\\\\c"@example.org>', '"a\\"b\\\\c"', "example.org"),
        ('<""@example.org>', '""', "example.org"),
        ("<u@[192.0.2.1]>", "u", "[192.0.2.1]"),
        ("<u@[010.000.2.1]>", "u", "[10.0.2.1]"),
        ("<u@[IPv6:2001:DB8:0:0::1]>", "u", "[IPv6:2001:db8::1]"),
        ("<u@[ipv6:::ffff:192.0.2.1]>", "u", "[IPv6:::ffff:c000:201]"),
        ("<@relay.one,@relay.two:u@example.org>", "u", "example.org"),
        ("<" + "l" * 64 + "@x>", "l" * 64, "x"),
    ],
)
def test_valid_paths(text: str, local: str, domain: str) -> None:
    assert parse_reverse_path(text, utf8=False) == Mailbox(local, domain)
    assert parse_forward_path(text, utf8=False).mailbox == Mailbox(local, domain)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<",
        "a@b",
        "<a@b",
        "a@b>",
        "< a@b>",
        "<a@b >",
        "<a @b>",
        "<a@>",
        "<@b>",
        "<a>",
        "<.a@b>",
        "<a.@b>",
        "<a..b@c>",
        "<a@b..c>",
        "<a@-b.c>",
        "<a@b-.c>",
        "<a@b_c.d>",
        "<a@b@c>",
        '<"a@b>',
        '<"a"b@c>',
        '<"a\x01"@b>',
        "<a\tb@c>",
        "<a@[300.1.1.1]>",
        "<a@[1.2.3]>",
        "<a@[IPv6:1::2::3]>",
        "<a@[IPv6:fe80::1%eth0]>",
        "<a@[x-tag:stuff]>",
        "<a@[1.2.3.4>",
        "<a@.>",
        "<@a:b@c",
        "<@a,b:c@d>",
        "<@[1.2.3.4]:c@d>",
        "<@a>",
        "<" + "l" * 65 + "@x>",
        "<a@" + "x" * 64 + ".org>",
        "<a@" + ".".join(["x" * 60] * 5) + ">",
        "<a@b>>",
        "<<a@b>>",
    ],
)
def test_invalid_paths(text: str) -> None:
    with pytest.raises(SyntaxErrorReply) as sender:
        parse_reverse_path(text, utf8=True)
    assert (sender.value.code, sender.value.status) == (501, "5.1.7")
    assert sender.value.text == "Bad sender address syntax"
    with pytest.raises(SyntaxErrorReply) as rcpt:
        parse_forward_path(text, utf8=True)
    assert (rcpt.value.code, rcpt.value.status) == (501, "5.1.3")
    assert rcpt.value.text == "Bad recipient address syntax"


def test_null_sender_and_postmaster() -> None:
    assert parse_reverse_path("<>", utf8=False) is None
    with pytest.raises(SyntaxErrorReply):
        parse_forward_path("<>", utf8=False)
    for text in ("<Postmaster>", "<postmaster>", "<POSTMASTER>"):
        assert parse_forward_path(text, utf8=False) == ForwardPath(None, (), postmaster=True)
    # Domain-less postmaster is a RCPT-only special case, never a sender.
    with pytest.raises(SyntaxErrorReply):
        parse_reverse_path("<Postmaster>", utf8=False)
    assert str(parse_forward_path("<Postmaster>", utf8=False)) == "<Postmaster>"


def test_source_route_kept_for_forward_path_only() -> None:
    path = parse_forward_path("<@A.example,@b.example.:u@c.example>", utf8=False)
    assert path.source_route == ("a.example", "b.example")
    assert path.mailbox == Mailbox("u", "c.example")
    assert str(path) == "<u@c.example>"


def test_utf8_requires_smtputf8() -> None:
    for text in ("<jörg@example.org>", "<j@bücher.example>", '<"ü"@x>'):
        with pytest.raises(SyntaxErrorReply) as exc:
            parse_reverse_path(text, utf8=False)
        assert (exc.value.code, exc.value.status) == (553, "5.6.7")
        with pytest.raises(SyntaxErrorReply) as exc:
            parse_forward_path(text, utf8=False)
        assert (exc.value.code, exc.value.status) == (553, "5.6.7")
    assert parse_reverse_path("<jörg@Bücher.example>", utf8=True) == Mailbox(
        "jörg", "bücher.example"
    )
    assert parse_forward_path("<用户@例子.广告>", utf8=True).mailbox == Mailbox("用户", "例子.广告")
    # Undecodable bytes (surrogateescape) are not UTF-8 characters.
    with pytest.raises(SyntaxErrorReply) as exc:
        parse_reverse_path("<a\udcff@b>", utf8=True)
    assert exc.value.code == 501


def test_local_part_limit_counts_octets() -> None:
    assert parse_mailbox("é" * 32 + "@x").local_part == "é" * 32
    with pytest.raises(ValueError):
        parse_mailbox("é" * 33 + "@x")


def test_mailbox_helpers() -> None:
    quoted = parse_mailbox('"a\\"b c"@x')
    assert quoted.is_quoted and quoted.unquoted_local_part == 'a"b c'
    assert str(quoted) == '"a\\"b c"@x'
    plain = parse_mailbox("a.b@x")
    assert not plain.is_quoted and plain.unquoted_local_part == "a.b"
    assert quote_local_part("a.b") == "a.b"
    assert quote_local_part("quoted name") == '"quoted name"'
    assert quote_local_part('a"b\\') == '"a\\"b\\\\"'
    with pytest.raises(ValueError):
        quote_local_part("a\nb")
    with pytest.raises(ValueError):
        parse_mailbox("jörg@x", utf8=False)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("<user@example.org>", None),
        ('<"user name"@example.org>', None),
        ("<user%other@example.org>", "percent hack"),
        ("<other!user@example.org>", "bang path"),
        ('<"user@other"@example.org>', "quoted local part contains '@'"),
        ('<"user%other"@example.org>', "percent hack"),
        ('<"user\\@other"@example.org>', "quoted local part contains '@'"),
        ("<@a,@b:user@example.org>", "source route"),
    ],
)
def test_relay_trick(text: str, reason: str | None) -> None:
    assert relay_trick(parse_forward_path(text, utf8=False)) == reason


def test_relay_trick_postmaster() -> None:
    assert relay_trick(ForwardPath(None, (), postmaster=True)) is None


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [("", ""), ("abc", "abc"), ("a+2Bb", "a+b"), ("a+3Db", "a=b"), ("a+20b", "a b"), ("+2b", "+")],
)
def test_xtext(encoded: str, decoded: str) -> None:
    assert xtext_decode(encoded) == decoded
    assert xtext_decode(xtext_encode(decoded)) == decoded


@pytest.mark.parametrize(
    "bad", ["a+", "a+2", "a+GG", "a=b", "a b", "a+b", "é", "a+0D+0Ab", "+C3+A9"]
)
def test_xtext_bad(bad: str) -> None:
    with pytest.raises(ValueError):
        xtext_decode(bad)


def test_xtext_encode() -> None:
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_encode("é") == "+C3+A9"


# Path punctuation and an undecodable-byte surrogate are mixed in so that the fuzzing gets
# past the first bracket check.
_path_chars = st.characters() | st.sampled_from('<>@"\\.,:[]%! \udcff')


@given(st.text(_path_chars))
def test_paths_never_raise_other_errors(text: str) -> None:
    for candidate in (text, f"<{text}>"):
        for utf8 in (False, True):
            for parse in (parse_reverse_path, parse_forward_path):
                with contextlib.suppress(SMTPReply):
                    parse(candidate, utf8=utf8)


_atom = st.text(st.sampled_from("abcXYZ019!#$%&'*+-/=?^_`{|}~"), min_size=1, max_size=8)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(
    st.lists(_atom, min_size=1, max_size=4).map(".".join),
    st.lists(_label, min_size=1, max_size=4).map(".".join),
)
def test_generated_mailboxes_round_trip(local: str, domain: str) -> None:
    mailbox = parse_reverse_path(f"<{local}@{domain}>", utf8=False)
    assert mailbox == Mailbox(local, domain)
    assert parse_mailbox(str(mailbox)) == mailbox


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20))
def test_quote_local_part_round_trips(text: str) -> None:
    mailbox = parse_mailbox(quote_local_part(text) + "@x")
    assert mailbox.unquoted_local_part == text
