"""MAIL and RCPT arguments and their ESMTP parameters (RFC 1870, 3461, 4954, 6152, 6531)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayhub.address import (
    ForwardPath,
    Mailbox,
    parse_forward_path,
    parse_reverse_path,
    xtext_decode,
)
from relayhub.errors import SyntaxErrorReply

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# esmtp-value. RFC 6531 allows UTF-8 here, but none of the parameters we offer takes it, so
# refusing it up front also keeps str.upper() from folding non-ASCII into a keyword value.
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_SIZE = re.compile(r"[0-9]{1,20}")  # RFC 1870 size-value; [0-9] because \d matches any digit
_ADDR_TYPE = re.compile(r"[A-Za-z0-9-]+")
_NOTIFY_ORDER = ("SUCCESS", "FAILURE", "DELAY")


@dataclass(frozen=True)
class MailCommand:
    """A parsed MAIL command. `auth` is the RFC 4954 AUTH= value, kept for the server to judge."""

    sender: Mailbox | None
    size: int | None = None
    body_type: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None


@dataclass(frozen=True)
class RcptCommand:
    """A parsed RCPT command; `orcpt` is "addr-type;decoded-address" with addr-type lower-cased."""

    path: ForwardPath
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


def _bad(text: str) -> SyntaxErrorReply:
    return SyntaxErrorReply(text, code=501, status="5.5.4")


def _unsupported(key: str) -> SyntaxErrorReply:
    return SyntaxErrorReply(f"Unsupported parameter {key}", code=555, status="5.5.4")


def _path_end(text: str) -> int:
    """Index just past the '>' that closes the path: a quoted local part may hold ' ' and '>'."""
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i + 1
    return len(text)


def _split(arg: str, prefix: str, usage: str) -> tuple[str, dict[str, str | None]]:
    """Split "FROM:<path> K=V K" into the path text and upper-cased keywords -> values."""
    head = arg[: len(prefix)]
    if not head.isascii() or head.upper() != prefix:
        raise _bad(usage)
    rest = arg[len(prefix) :].removeprefix(" ")  # "MAIL FROM: <a@b>" is common in the wild
    end = _path_end(rest) if rest.startswith("<") else len(rest.partition(" ")[0])
    path, rest = rest[:end], rest[end:]
    if not path:
        raise _bad(usage)
    if rest and not rest.startswith(" "):  # "<a@b>junk": let the path parser refuse it whole
        junk, _, rest = rest.partition(" ")
        path += junk
    params: dict[str, str | None] = {}
    for word in rest.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            raise _bad("Bad parameter syntax")  # the offending text is not echoed back
        key = key.upper()
        if key in params:
            raise _bad(f"Duplicate parameter {key}")
        params[key] = value if eq else None
    return path, params


def _xtext(value: str | None, key: str, limit: int) -> str:
    try:
        if not value or len(value) > limit:
            raise ValueError(key)
        return xtext_decode(value)
    except ValueError:
        raise _bad(f"Bad {key} value") from None


def parse_mail(arg: str, *, smtputf8_offered: bool = True) -> MailCommand:
    """Parse everything after "MAIL ". SIZE is not compared with the limit here."""
    path, params = _split(arg, "FROM:", "Syntax: MAIL FROM:<address>")
    size: int | None = None
    body, smtputf8 = "7BIT", False
    ret = envid = auth = None
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not _SIZE.fullmatch(value):
                raise _bad("Bad SIZE value")
            size = int(value)
        elif key == "BODY":
            body = (value or "").upper()
            if body not in ("7BIT", "8BITMIME"):  # BINARYMIME (RFC 3030) is not offered
                raise _bad("Bad BODY value")
        elif key == "SMTPUTF8" and smtputf8_offered:
            if value is not None:
                raise _bad("SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET":
            ret = (value or "").upper()
            if ret not in ("FULL", "HDRS"):
                raise _bad("Bad RET value")
        elif key == "ENVID":
            envid = _xtext(value, key, 100)  # RFC 3461 §4.4
        elif key == "AUTH":
            # RFC 4954 §5: a server offering AUTH must accept this parameter (Exim and others
            # send AUTH=<>); whether to believe it is the session's decision.
            auth = _xtext(value, key, 500)
        else:
            raise _unsupported(key)
    # RFC 6531 §3.4: UTF-8 in the path only when this MAIL command carries SMTPUTF8.
    sender = parse_reverse_path(path, utf8=smtputf8)
    return MailCommand(sender, size, body, smtputf8, ret, envid, auth)


def parse_rcpt(arg: str, *, utf8: bool) -> RcptCommand:
    """Parse everything after "RCPT "; `utf8` says whether the transaction's MAIL had SMTPUTF8."""
    path, params = _split(arg, "TO:", "Syntax: RCPT TO:<address>")
    notify: tuple[str, ...] = ()
    orcpt = None
    for key, value in params.items():
        if key == "NOTIFY":
            wanted = {item.upper() for item in (value or "").split(",")}
            if wanted == {"NEVER"}:
                notify = ("NEVER",)
            elif wanted <= set(_NOTIFY_ORDER):
                notify = tuple(n for n in _NOTIFY_ORDER if n in wanted)
            else:
                raise _bad("Bad NOTIFY value")
        elif key == "ORCPT":
            addr_type, semicolon, address = (value or "").partition(";")
            if not semicolon or not _ADDR_TYPE.fullmatch(addr_type) or len(value or "") > 500:
                raise _bad("Bad ORCPT value")
            orcpt = f"{addr_type.lower()};{_xtext(address, key, 500)}"
        else:
            raise _unsupported(key)
    return RcptCommand(parse_forward_path(path, utf8=utf8), notify, orcpt)
