"""RFC 5321 paths and mailboxes (RFC 6531 when SMTPUTF8 is in force): strict parsing,
normalisation, relay-trick detection and RFC 3461 xtext."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from relayhub.errors import SyntaxErrorReply

# RFC 6531 adds UTF8-non-ascii to atext, qtextSMTP and sub-domain. Callers refuse non-ASCII
# before matching when SMTPUTF8 is not in force, so one set of patterns serves both cases.
# Surrogates (what surrogateescape makes of undecodable bytes) are not characters: left out.
_U = "\u0080-\ud7ff\ue000-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~{_U}]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED_STRING = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*"')
_QUOTED_PAIR = re.compile(r"\\(.)")
_QUOTE_NEEDED = re.compile(r'(["\\])')
_LABEL = re.compile(rf"[A-Za-z0-9{_U}](?:[A-Za-z0-9\-{_U}]*[A-Za-z0-9{_U}])?")
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class Mailbox:
    """A mailbox: local part in its wire form (quotes kept), domain lower-cased without a
    trailing dot, or a normalised address literal ("[192.0.2.1]", "[IPv6:2001:db8::1]")."""

    local_part: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local_part}@{self.domain}"

    @property
    def is_quoted(self) -> bool:
        return self.local_part.startswith('"')

    @property
    def unquoted_local_part(self) -> str:
        """The local part with quoting and quoted-pairs undone ('"a\\"b"' -> 'a"b')."""
        if not self.is_quoted:
            return self.local_part
        return _QUOTED_PAIR.sub(r"\1", self.local_part[1:-1])


@dataclass(frozen=True)
class ForwardPath:
    """A RCPT path. `<Postmaster>` (RFC 5321 §4.1.1.3) has no mailbox and postmaster=True.
    A source route is kept (lower-cased) only so that policy can refuse it."""

    mailbox: Mailbox | None
    source_route: tuple[str, ...] = ()
    postmaster: bool = False

    def __str__(self) -> str:
        return "<Postmaster>" if self.mailbox is None else f"<{self.mailbox}>"


def quote_local_part(text: str) -> str:
    """The wire form of an unquoted local part: as is when it is a dot-string, else quoted."""
    if _DOT_STRING.fullmatch(text):
        return text
    quoted = '"' + _QUOTE_NEEDED.sub(r"\\\1", text) + '"'
    if not _QUOTED_STRING.fullmatch(quoted):
        raise ValueError(f"local part {text!r} cannot be quoted (control character)")
    return quoted


def parse_mailbox(text: str, *, utf8: bool = True) -> Mailbox:
    """Parse "local@domain" (no angle brackets) strictly; ValueError says what is wrong.

    Also for configuration and alias files, which is why it does not raise an SMTP reply."""
    if not utf8 and not text.isascii():
        raise ValueError("non-ASCII address without SMTPUTF8")
    if text.startswith('"'):
        match = _QUOTED_STRING.match(text)
        if match is None:
            raise ValueError("unterminated or invalid quoted local part")
        local = match.group()
    else:
        local = text.partition("@")[0]
        if not _DOT_STRING.fullmatch(local):
            raise ValueError("invalid local part")
    rest = text[len(local) :]
    if not rest.startswith("@"):
        raise ValueError("missing @domain")
    if len(local.encode()) > 64:  # RFC 5321 §4.5.3.1.1
        raise ValueError("local part longer than 64 octets")
    return Mailbox(local, _parse_domain(rest[1:]))


def _parse_domain(text: str) -> str:
    if text.startswith("["):
        return _parse_literal(text)
    # A trailing root dot names the same domain; dropping it keeps policy comparisons exact.
    name = text.removesuffix(".")
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) and len(label.encode()) <= 63 for label in labels):
        raise ValueError(f"invalid domain {text!r}")
    if len(name.encode()) > 255:  # RFC 5321 §4.5.3.1.2
        raise ValueError("domain longer than 255 octets")
    return name.lower()


def _parse_literal(text: str) -> str:
    body = text[1:-1] if text.endswith("]") else ""
    if _IPV4.fullmatch(body):
        octets = [int(part) for part in body.split(".")]
        if max(octets) <= 255:
            return "[" + ".".join(map(str, octets)) + "]"
    elif body[:5].lower() == "ipv6:" and "%" not in body:  # a zone id means nothing off-host
        try:
            return f"[IPv6:{ipaddress.IPv6Address(body[5:]).compressed}]"
        except ValueError:
            pass
    elif _GENERAL_LITERAL.fullmatch(body):
        raise ValueError("general address literals are not supported")
    raise ValueError(f"invalid address literal {text!r}")


def _split_path(text: str, utf8: bool) -> tuple[tuple[str, ...], str]:
    """Check "<[A-d-l:]rest>" and return the source route and the text between route and '>'."""
    if not utf8 and not text.isascii():
        # RFC 6531 §3.5: an internationalised address without SMTPUTF8 is 553 5.6.7.
        raise SyntaxErrorReply("Non-ASCII address requires SMTPUTF8", code=553, status="5.6.7")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise ValueError("angle brackets required")
    inner = text[1:-1]
    if not inner.startswith("@"):
        return (), inner
    adl, colon, inner = inner.partition(":")
    route = []
    for hop in adl.split(","):
        if not hop.startswith("@") or hop.startswith("@["):  # At-domain is "@" Domain only
            raise ValueError("invalid source route")
        route.append(_parse_domain(hop[1:]))
    if not colon:
        raise ValueError("source route without ':'")
    return tuple(route), inner


def parse_reverse_path(text: str, *, utf8: bool) -> Mailbox | None:
    """Parse a MAIL FROM path ("<>" is the null sender); a source route is accepted and
    discarded (RFC 5321 §4.1.1.2, §C)."""
    if text == "<>":
        return None
    try:
        return parse_mailbox(_split_path(text, utf8)[1])
    except ValueError:
        raise SyntaxErrorReply("Bad sender address syntax", code=501, status="5.1.7") from None


def parse_forward_path(text: str, *, utf8: bool) -> ForwardPath:
    """Parse a RCPT TO path, including the domain-less `<Postmaster>`."""
    try:
        route, inner = _split_path(text, utf8)
        if not route and inner.lower() == "postmaster":
            return ForwardPath(None, (), postmaster=True)
        return ForwardPath(parse_mailbox(inner), route)
    except ValueError:
        raise SyntaxErrorReply("Bad recipient address syntax", code=501, status="5.1.3") from None


def relay_trick(path: ForwardPath) -> str | None:
    """Why this recipient would route through us to somewhere else, or None.

    Source routes, the percent hack, bang paths and quoted local parts hiding another address
    all let a client name a final destination that our domain check never sees (SPEC §3)."""
    if path.source_route:
        return "source route"
    if path.mailbox is None:
        return None
    local = path.mailbox.unquoted_local_part
    if "@" in local:  # only reachable through quoting
        return "quoted local part contains '@'"
    if "%" in local:
        return "percent hack"
    if "!" in local:
        return "bang path"
    return None


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 §4 xtext.

    The result must be printable ASCII: ENVID and rfc822 ORCPT are defined so, and they end up
    in DSN header fields where a decoded CR or LF would inject headers."""
    if not _XTEXT.fullmatch(text):
        raise ValueError(f"invalid xtext {text!r}")
    # Lower-case hex is outside RFC 3461's grammar but unambiguous, so it is accepted.
    decoded = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)
    if not all(" " <= ch <= "~" for ch in decoded):
        raise ValueError("xtext decodes to a non-printable or non-ASCII character")
    return decoded


def xtext_encode(text: str) -> str:
    """Encode text as RFC 3461 xtext (UTF-8 octets of anything outside '!'..'~', '+' and '=')."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=" else "".join(f"+{b:02X}" for b in ch.encode())
        for ch in text
    )
