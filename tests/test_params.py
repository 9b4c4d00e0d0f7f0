"""Tests for relayhub.smtp.params: MAIL/RCPT arguments and ESMTP parameters."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayhub.address import ForwardPath, Mailbox
from relayhub.errors import SMTPReply, SyntaxErrorReply
from relayhub.smtp.params import MailCommand, RcptCommand, parse_mail, parse_rcpt


def _refused(call: object, *args: object, **kwargs: object) -> SyntaxErrorReply:
    with pytest.raises(SyntaxErrorReply) as exc:
        call(*args, **kwargs)  # type: ignore[operator]
    return exc.value


def test_mail_plain_and_null() -> None:
    assert parse_mail("FROM:<a@b>") == MailCommand(Mailbox("a", "b"))
    assert parse_mail("from:<>") == MailCommand(None)
    assert parse_mail("FROM: <a@b>").sender == Mailbox("a", "b")


def test_mail_all_parameters() -> None:
    cmd = parse_mail("FROM:<a@b> size=1000 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=QQ+2B1 AUTH=<>")
    assert cmd == MailCommand(
        sender=Mailbox("a", "b"),
        size=1000,
        body_type="8BITMIME",
        smtputf8=True,
        ret="HDRS",
        envid="QQ+1",
        auth="<>",
    )
    assert parse_mail("FROM:<a@b> BODY=7BIT").body_type == "7BIT"
    # SIZE over any limit is the server's business, not the parser's.
    assert parse_mail("FROM:<a@b> SIZE=99999999999999999999").size == 10**20 - 1


def test_mail_quoted_local_part_with_space_and_bracket() -> None:
    cmd = parse_mail('FROM:<"a >b"@x> SIZE=5')
    assert cmd.sender == Mailbox('"a >b"', "x")
    assert cmd.size == 5


def test_mail_utf8_only_with_smtputf8_parameter() -> None:
    exc = _refused(parse_mail, "FROM:<jörg@example.org>")
    assert (exc.code, exc.status) == (553, "5.6.7")
    cmd = parse_mail("FROM:<jörg@example.org> SMTPUTF8")
    assert cmd.smtputf8 and cmd.sender == Mailbox("jörg", "example.org")


@pytest.mark.parametrize(
    ("arg", "code", "status", "text"),
    [
        ("", 501, "5.5.4", "Syntax: MAIL FROM:<address>"),
        ("<a@b>", 501, "5.5.4", "Syntax: MAIL FROM:<address>"),
        ("FROM <a@b>", 501, "5.5.4", "Syntax: MAIL FROM:<address>"),
        ("FROM:", 501, "5.5.4", "Syntax: MAIL FROM:<address>"),
        ("TO:<a@b>", 501, "5.5.4", "Syntax: MAIL FROM:<address>"),
        ("FROM:a@b", 501, "5.1.7", "Bad sender address syntax"),
        ("FROM:<a@b>junk", 501, "5.1.7", "Bad sender address syntax"),
        ("FROM:<a@b", 501, "5.1.7", "Bad sender address syntax"),
        ("FROM:<a@b> FOO=1", 555, "5.5.4", "Unsupported parameter FOO"),
        ("FROM:<a@b> x-y", 555, "5.5.4", "Unsupported parameter X-Y"),
        ("FROM:<a@b> NOTIFY=NEVER", 555, "5.5.4", "Unsupported parameter NOTIFY"),
        ("FROM:<a@b> SIZE=1 size=2", 501, "5.5.4", "Duplicate parameter SIZE"),
        ("FROM:<a@b> SIZE", 501, "5.5.4", "Bad SIZE value"),
        ("FROM:<a@b> SIZE=-1", 501, "5.5.4", "Bad SIZE value"),
        ("FROM:<a@b> SIZE=1k", 501, "5.5.4", "Bad SIZE value"),
        ("FROM:<a@b> SIZE=123456789012345678901", 501, "5.5.4", "Bad SIZE value"),
        ("FROM:<a@b> SIZE=", 501, "5.5.4", "Bad parameter syntax"),
        ("FROM:<a@b> SIZE=\uff11\uff10\uff10", 501, "5.5.4", "Bad parameter syntax"),  # fullwidth
        ("FROM:<a@b> BODY=BINARYMIME", 501, "5.5.4", "Bad BODY value"),
        ("FROM:<a@b> BODY", 501, "5.5.4", "Bad BODY value"),
        ("FROM:<a@b> SMTPUTF8=yes", 501, "5.5.4", "SMTPUTF8 takes no value"),
        ("FROM:<a@b> RET=ALL", 501, "5.5.4", "Bad RET value"),
        ("FROM:<a@b> ENVID=a+zz", 501, "5.5.4", "Bad ENVID value"),
        ("FROM:<a@b> ENVID", 501, "5.5.4", "Bad ENVID value"),
        ("FROM:<a@b> ENVID=" + "x" * 101, 501, "5.5.4", "Bad ENVID value"),
        ("FROM:<a@b> =1", 501, "5.5.4", "Bad parameter syntax"),
        ("FROM:<a@b> -X", 501, "5.5.4", "Bad parameter syntax"),
        ("FROM:<a@b> A=B=C", 501, "5.5.4", "Bad parameter syntax"),
        ("FROM:<a@b> SIZE=1\t", 501, "5.5.4", "Bad parameter syntax"),
    ],
)
def test_mail_errors(arg: str, code: int, status: str, text: str) -> None:
    exc = _refused(parse_mail, arg)
    assert (exc.code, exc.status, exc.text) == (code, status, text)


def test_smtputf8_not_offered_is_unknown() -> None:
    exc = _refused(parse_mail, "FROM:<a@b> SMTPUTF8", smtputf8_offered=False)
    assert (exc.code, exc.text) == (555, "Unsupported parameter SMTPUTF8")


def test_rcpt_plain_and_postmaster() -> None:
    assert parse_rcpt("TO:<a@b>", utf8=False) == RcptCommand(ForwardPath(Mailbox("a", "b")))
    assert parse_rcpt("to: <Postmaster>", utf8=False).path.postmaster


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("NEVER", ("NEVER",)),
        ("never", ("NEVER",)),
        ("SUCCESS", ("SUCCESS",)),
        ("delay,Failure,SUCCESS", ("SUCCESS", "FAILURE", "DELAY")),
        ("FAILURE,DELAY", ("FAILURE", "DELAY")),
        ("DELAY,DELAY", ("DELAY",)),
    ],
)
def test_rcpt_notify(value: str, expected: tuple[str, ...]) -> None:
    assert parse_rcpt(f"TO:<a@b> NOTIFY={value}", utf8=False).notify == expected


def test_rcpt_orcpt() -> None:
    cmd = parse_rcpt("TO:<a@b> ORCPT=RFC822;Joe+2BTag+40Example.ORG", utf8=False)
    assert cmd.orcpt == "rfc822;Joe+Tag@Example.ORG"
    assert parse_rcpt("TO:<a@b> ORCPT=x-type;abc", utf8=False).orcpt == "x-type;abc"


def test_rcpt_utf8_follows_the_transaction() -> None:
    exc = _refused(parse_rcpt, "TO:<jörg@x>", utf8=False)
    assert (exc.code, exc.status) == (553, "5.6.7")
    assert parse_rcpt("TO:<jörg@x>", utf8=True).path.mailbox == Mailbox("jörg", "x")


@pytest.mark.parametrize(
    ("arg", "code", "status", "text"),
    [
        ("", 501, "5.5.4", "Syntax: RCPT TO:<address>"),
        ("FROM:<a@b>", 501, "5.5.4", "Syntax: RCPT TO:<address>"),
        ("TO <a@b>", 501, "5.5.4", "Syntax: RCPT TO:<address>"),
        ("TO:<>", 501, "5.1.3", "Bad recipient address syntax"),
        ("TO:<a>", 501, "5.1.3", "Bad recipient address syntax"),
        ("TO:<a@b> SIZE=1", 555, "5.5.4", "Unsupported parameter SIZE"),
        ("TO:<a@b> NOTIFY=NEVER,SUCCESS", 501, "5.5.4", "Bad NOTIFY value"),
        ("TO:<a@b> NOTIFY=SOMETIMES", 501, "5.5.4", "Bad NOTIFY value"),
        ("TO:<a@b> NOTIFY=SUCCESS,", 501, "5.5.4", "Bad NOTIFY value"),
        ("TO:<a@b> NOTIFY", 501, "5.5.4", "Bad NOTIFY value"),
        ("TO:<a@b> NOTIFY=DELAY NOTIFY=DELAY", 501, "5.5.4", "Duplicate parameter NOTIFY"),
        ("TO:<a@b> ORCPT=a@b", 501, "5.5.4", "Bad ORCPT value"),
        ("TO:<a@b> ORCPT=rfc822;", 501, "5.5.4", "Bad ORCPT value"),
        ("TO:<a@b> ORCPT=;a@b", 501, "5.5.4", "Bad ORCPT value"),
        ("TO:<a@b> ORCPT=rfc822;a+0D+0Ab", 501, "5.5.4", "Bad ORCPT value"),
        ("TO:<a@b> ORCPT=rfc822;" + "a" * 500, 501, "5.5.4", "Bad ORCPT value"),
    ],
)
def test_rcpt_errors(arg: str, code: int, status: str, text: str) -> None:
    exc = _refused(parse_rcpt, arg, utf8=False)
    assert (exc.code, exc.status, exc.text) == (code, status, text)


_command_chars = st.characters() | st.sampled_from('<>@"\\.,:;[]=+% ')
_prefixed = st.tuples(
    st.sampled_from(["FROM:", "TO:", "FROM:<", "TO:<a@b> "]), st.text(_command_chars)
)


@given(st.text(_command_chars) | _prefixed.map("".join), st.booleans())
def test_commands_never_raise_other_errors(arg: str, flag: bool) -> None:
    for parse in (
        lambda: parse_mail(arg, smtputf8_offered=flag),
        lambda: parse_rcpt(arg, utf8=flag),
    ):
        with contextlib.suppress(SMTPReply):
            parse()
