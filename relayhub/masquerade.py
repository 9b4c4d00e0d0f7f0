"""Sender masquerading (SPEC §2 `[domains].masquerade`): user@host.dept.example.org becomes
user@example.org, with Postfix `masquerade_domains` semantics."""

from __future__ import annotations

import re
from collections.abc import Sequence
from email.utils import getaddresses

# Header fields that name the sender (Postfix's "header_sender" class, narrowed to SPEC §2).
SENDER_FIELDS = frozenset({b"from", b"sender"})

# A field starts at a line that does not begin with white space; folded lines stay with it.
_FIELD_START = re.compile(rb"(?<=\n)(?=[^ \t])")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
# Quoted strings and comments are matched only so that an "@domain" inside them is skipped;
# the domain group is set for an "@domain" outside them. (Nested comments are not tracked.)
_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\((?:\\.|[^()\\])*\)|@([\w.-]+)')


def masquerade_domain(domain: str, domains: Sequence[str]) -> str | None:
    """The masquerade domain that `domain` is rewritten to, or None to leave it alone.

    As in Postfix, `domains` is read left to right and the first entry that is the domain
    itself or one of its parents decides: with ["foo.example.com", "example.com"],
    a.foo.example.com becomes foo.example.com, a.bar.example.com becomes example.com, and
    foo.example.com itself stays. Only strict sub-domains are rewritten; case is ignored.
    """
    key = domain.lower().removesuffix(".")
    for entry in domains:
        target = entry.lower().removesuffix(".")
        if key == target:
            return None
        if key.endswith("." + target):
            return target
    return None


def masquerade_address(address: str, domains: Sequence[str]) -> str:
    """`address` with its domain masqueraded; the null sender "" and address literals (never
    a sub-domain of anything) come back unchanged, and so does the local part."""
    local, at, domain = address.rpartition("@")  # the last "@": quoted local parts may hold one
    new = masquerade_domain(domain, domains) if at else None
    return address if new is None else f"{local}@{new}"


def _masquerade_field(value: str, domains: Sequence[str]) -> str:
    """One field body with its address domains masqueraded, all else character-identical."""
    addresses = getaddresses([_FOLD.sub("", value)])
    # Only domains that the parser saw in an address are touched, never lookalike text.
    changes = {
        domain.lower(): new
        for _name, address in addresses
        if (domain := address.rpartition("@")[2]) and (new := masquerade_domain(domain, domains))
    }
    if not changes:
        return value

    def replace(match: re.Match[str]) -> str:
        domain = match[1]
        return match[0] if domain is None or domain.lower() not in changes else (
            "@" + changes[domain.lower()]
        )

    return _TOKEN.sub(replace, value)


def masquerade_headers(header_block: bytes, domains: Sequence[str]) -> bytes:
    """`header_block` with the addresses in From: and Sender: masqueraded.

    Only the domain of each address changes: display names, comments, folding, line ends and
    every other field stay byte-identical. Postfix also masquerades header recipients by
    default (masquerade_classes); SPEC §2 asks for the sender only, so To:/Cc: are left alone.
    Raw 8-bit bytes survive the round trip through surrogate escapes.
    """
    if not domains:
        return header_block
    fields = _FIELD_START.split(header_block)
    for index, field in enumerate(fields):
        name, colon, value = field.partition(b":")
        if colon and name.strip().lower() in SENDER_FIELDS:
            text = value.decode("utf-8", "surrogateescape")
            fields[index] = name + colon + _masquerade_field(text, domains).encode(
                "utf-8", "surrogateescape"
            )
    return b"".join(fields)
