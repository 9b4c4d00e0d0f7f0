"""Message preparation for relayhub-sendmail: what a local program wrote on standard input
becomes a well-formed message. Pure (the clock, names and randomness come in as arguments).

- line ends become CRLF (a bare LF or CR is a line end: local programs write Unix text);
- without -i a line of one "." ends the input, as in Sendmail;
- a leading mbox "From " line is dropped;
- -t takes recipients from To:, Cc: and Bcc: (or from the Resent- ones when present);
- Bcc: (and Resent-Bcc:) never leave the hub; From:, Date: and Message-ID: are added when
  missing, From: with the -F full name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formataddr, formatdate, getaddresses

_LINE_END = re.compile(rb"\r\n|\r|\n")
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_RECIPIENT_FIELDS = (b"to", b"cc", b"bcc")
_RESENT_RECIPIENT_FIELDS = (b"resent-to", b"resent-cc", b"resent-bcc")


@dataclass(frozen=True)
class HeaderField:
    name: bytes  # as written
    raw: bytes  # the whole field with its continuation lines, each ending in CRLF

    @property
    def key(self) -> bytes:
        return self.name.lower()

    @property
    def value(self) -> str:
        """The unfolded value, as text (8-bit bytes kept as surrogates)."""
        text = self.raw.split(b":", 1)[1].decode("utf-8", "surrogateescape")
        return re.sub(r"\r\n(?=[ \t])", "", text).strip()


@dataclass(frozen=True)
class PreparedMessage:
    data: bytes  # CRLF line ends throughout
    recipients: tuple[str, ...]  # from the header (-t), in order, each once


def normalize_input(raw: bytes, *, ignore_dots: bool) -> bytes:
    """CRLF line ends; without `ignore_dots`, everything from a line of one "." is cut."""
    lines = _LINE_END.split(raw)
    if lines and lines[-1] == b"":
        lines.pop()  # the text ended with a line end, not with a partial line
    if not ignore_dots:
        for index, line in enumerate(lines):
            if line == b".":
                lines = lines[:index]
                break
    return b"".join(line + b"\r\n" for line in lines)


def split_header(data: bytes) -> tuple[list[HeaderField], bytes]:
    """The header fields before the first empty line (or before the first line that is no
    field: a message without a header section), and the rest (the empty line included)."""
    fields: list[HeaderField] = []
    position = 0
    while position < len(data):
        end = data.find(b"\r\n", position)
        end = len(data) if end < 0 else end + 2
        line = data[position:end]
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = HeaderField(last.name, last.raw + line)
        else:
            match = _FIELD_NAME.match(line)
            if match is None:
                break
            fields.append(HeaderField(match[1], line))
        position = end
    return fields, data[position:]


def header_recipients(fields: list[HeaderField]) -> tuple[str, ...]:
    """-t: the addresses in To:, Cc: and Bcc: (the Resent- fields instead, if any)."""
    keys = _RESENT_RECIPIENT_FIELDS if any(
        f.key in _RESENT_RECIPIENT_FIELDS for f in fields) else _RECIPIENT_FIELDS
    values = [f.value for f in fields if f.key in keys]
    found: list[str] = []
    for _name, address in getaddresses(values):
        if address and "@" not in address and address.endswith(":"):
            continue  # an empty group ("undisclosed-recipients:;")
        if address and address not in found:
            found.append(address)
    return tuple(found)


def _addr_spec(address: str) -> str:
    return address or "<>"


def prepare_message(
    raw: bytes, *, ignore_dots: bool, extract_recipients: bool, sender: str,
    full_name: str | None, hostname: str, now: float, unique: str,
) -> PreparedMessage:
    """The message to queue and, with `extract_recipients`, its header recipients.
    `unique` makes the Message-ID (a random token from the caller)."""
    data = normalize_input(raw, ignore_dots=ignore_dots)
    if data.startswith(b"From "):  # an mbox separator, not a header field
        data = data.split(b"\r\n", 1)[1] if b"\r\n" in data else b""
    fields, rest = split_header(data)
    recipients = header_recipients(fields) if extract_recipients else ()
    present = {f.key for f in fields}
    kept = [f for f in fields if f.key not in (b"bcc", b"resent-bcc")]
    added: list[bytes] = []
    if b"from" not in present:
        added.append(_field("From", formataddr((full_name or "", _addr_spec(sender)))))
    if b"date" not in present:
        added.append(_field("Date", formatdate(now, localtime=True)))
    if b"message-id" not in present:
        added.append(_field("Message-ID", f"<{unique}@{hostname}>"))
    if not rest.startswith(b"\r\n"):
        rest = b"\r\n" + rest  # a body without a header section gets the empty line
    header = b"".join(f.raw for f in kept) + b"".join(added)
    return PreparedMessage(header + rest, recipients)


def _field(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")
