"""MIME helpers: RFC 2047 header decoding for display, body traits, and the RFC 6152 §3
downgrade of 8-bit or over-long MIME parts to quoted-printable/base64."""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email import policy as email_policy
from email.errors import MessageError
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser

MAX_LINE = 998  # RFC 5321 §4.5.3.1.6: octets per line, CRLF not counted
_CHUNK = 64 * 1024
_LONG_LINE = re.compile(rb"[^\r\n]{%d}" % (MAX_LINE + 1))
# What must not go on the wire as it is, 8-bit aside: long lines, bare CR, bare LF.
_BAD_LINES = re.compile(rb"[^\r\n]{%d}|\r(?!\n)|(?<!\r)\n" % (MAX_LINE + 1))
_LINE_END = re.compile(rb"\r\n|\r|\n")
_ASCII_OR_QUESTION_MARK = bytes(range(128)) + b"?" * 128
_LINE_SPLIT = re.compile(rb"(?<=\n)")
_ENCODED = ("base64", "quoted-printable")


def decode_for_display(raw: str) -> str:
    """Decode RFC 2047 encoded-words and unfold; never raises, so a broken header still shows."""
    unfolded = " ".join(raw.split())
    try:
        return str(make_header(decode_header(unfolded)))
    except (ValueError, LookupError, UnicodeError, MessageError):
        # MessageError: e.g. CharsetError for a charset name that is not ASCII.
        return unfolded


@dataclass(frozen=True)
class BodyTraits:
    has_8bit: bool
    longest_line: int  # octets, line end not counted


def body_traits(source: bytes | str | os.PathLike[str]) -> BodyTraits:
    """Whether `source` (bytes, or a file path read in 64 KiB chunks) holds 8-bit bytes, and
    its longest line; a line ends at LF, and a CR right before that LF is not counted."""
    if isinstance(source, bytes):
        return _scan(source[i:i + _CHUNK] for i in range(0, len(source), _CHUNK))
    with open(source, "rb") as file:
        return _scan(iter(lambda: file.read(_CHUNK), b""))


def _scan(chunks: Iterable[bytes]) -> BodyTraits:
    has_8bit = False
    longest = current = 0
    last_was_cr = False  # the byte before this chunk, for a CRLF split across chunks
    for chunk in chunks:
        has_8bit = has_8bit or not chunk.isascii()
        pieces = chunk.split(b"\n")
        if len(pieces) > 1:
            first = pieces[0]
            ends_cr = first.endswith(b"\r") if first else last_was_cr
            longest = max(longest, current + len(first) - ends_cr,
                          max((len(p) - p.endswith(b"\r") for p in pieces[1:-1]), default=0))
            current = 0
        current += len(pieces[-1])
        last_was_cr = chunk.endswith(b"\r")
    return BodyTraits(has_8bit, max(longest, current))


def crlf_lines(data: bytes) -> list[bytes] | None:
    """`data` split at its CRLFs, or None when a CR or LF is left over: a bare one. A split,
    a join and two memchr searches, which cost less than counting CRLF, CR and LF apart."""
    lines = data.split(b"\r\n")
    rest = b"".join(lines) if len(lines) > 1 else data
    return None if b"\r" in rest or b"\n" in rest else lines


class BodyMeter:
    """Measures a body as it is written, chunk by chunk in any split, for the queue to record
    beside it: its `BodyTraits`, provided every line end in it is a CRLF. Then the queue
    manager needs no scan of its own before sending it (see relayhub.delivery.relay).

    Each chunk costs a few C-speed passes (`isascii`, a split at CRLF, a join and two
    `memchr`s), no Python step per line.
    """

    def __init__(self) -> None:
        self._has_8bit = False
        self._longest = 0
        self._current = 0  # octets of the line not yet ended
        self._cr_pending = False  # the last chunk ended in a CR: its LF may start the next
        self._crlf_only = True

    def update(self, data: bytes) -> None:
        if not data or not self._crlf_only:
            return
        if not self._has_8bit and not data.isascii():
            self._has_8bit = True
        if self._cr_pending:
            self._cr_pending = False
            if data[:1] != b"\n":
                self._crlf_only = False  # a bare CR
                return
            self._end_line(0)
            data = data[1:]
        if data.endswith(b"\r"):
            self._cr_pending = True
            data = data[:-1]
        pieces = crlf_lines(data)
        if pieces is None:
            self._crlf_only = False
            return
        if len(pieces) > 1:
            self._end_line(len(pieces[0]))
            # The last piece is a line not yet ended: counting its start here is harmless,
            # since the whole line is at least as long.
            self._longest = max(self._longest, max(map(len, pieces)))
        self._current += len(pieces[-1])

    def _end_line(self, more: int) -> None:
        self._longest = max(self._longest, self._current + more)
        self._current = 0

    def prepend(self, data: bytes) -> None:
        """`data` (whole CRLF lines: header fields) goes in front of the body."""
        front = BodyMeter()
        front.update(data)
        if front.traits() is None or not data.endswith(b"\r\n"):
            self._crlf_only = False
            return
        self._has_8bit = self._has_8bit or front._has_8bit
        self._longest = max(self._longest, front._longest)

    def traits(self) -> BodyTraits | None:
        """The body's traits if its line ends are all CRLF, else None (it must be scanned
        and have its line ends mended before it is sent)."""
        if not self._crlf_only or self._cr_pending:
            return None
        return BodyTraits(self._has_8bit, max(self._longest, self._current))


def has_8bit_headers(message: bytes) -> bool:
    """Whether any header section (the message's or a MIME part's) holds 8-bit bytes.

    The downgrade cannot fix those (they would need RFC 2047/2231 encoding, field by field),
    so a caller sending to a hop without 8BITMIME/SMTPUTF8 decides: bounce or send anyway.
    Exact by construction: after `to_7bit` only header bytes can still be 8-bit.
    """
    return not message.isascii() and not to_7bit(message).isascii()


def to_7bit(message: bytes) -> bytes:
    """RFC 6152 §3 downgrade: every leaf part with 8-bit bytes, lines over 998 octets or a
    bare CR or LF is re-encoded (text/* with CRLF lines as quoted-printable, anything else
    as base64), message/rfc822 and multipart/* are converted inside, and labels of
    8bit/binary containers become 7bit. A message without MIME-Version that needs it gets
    MIME headers (`text/plain; charset=utf-8`, or `unknown-8bit` when not UTF-8).

    Everything not re-encoded stays byte-identical: the parts are cut out of the raw bytes
    (the `email` package only parses header fields and never regenerates them). Header
    lines over 998 octets are folded at white space; 8-bit header bytes stay (see
    `has_8bit_headers`). Parts that are already 7-bit keep their labels, even a stale
    "8bit" (RFC 2045 §6.2 only says such data *may* be present).
    """
    if message.isascii() and not _BAD_LINES.search(message):
        return message
    return _entity(message, "text/plain", seven_bit=True, top=True)


def limit_line_length(message: bytes) -> bytes:
    """Like `to_7bit`, but only parts with lines over 998 octets (or bare CR/LF) are
    re-encoded: for a hop with 8BITMIME, where 8-bit parts may go as they are (SPEC §3)."""
    if not _BAD_LINES.search(message):
        return message
    return _entity(message, "text/plain", seven_bit=False, top=True)


def _needs_work(data: bytes, seven_bit: bool) -> bool:
    return bool(_BAD_LINES.search(data)) or (seven_bit and not data.isascii())


def _entity(entity: bytes, default_type: str, *, seven_bit: bool, top: bool) -> bytes:
    """Convert one message or body part (header section, empty line, body)."""
    if entity.startswith(b"\r\n"):
        header, body = b"", entity[2:]
    else:
        end = entity.find(b"\r\n\r\n")
        if end < 0:  # header section only
            return _fold_long_fields(entity)
        header, body = entity[: end + 2], entity[end + 4:]
    header = _fold_long_fields(header)
    if not _needs_work(body, seven_bit):
        return header + b"\r\n" + body
    # compat32 parses leniently and keeps raw values; only these fields are read from it.
    fields = BytesHeaderParser(policy=email_policy.compat32).parsebytes(header + b"\r\n")
    fields.set_default_type(default_type)
    ctype = fields.get_content_type()
    cte = str(fields.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    boundary = _boundary(fields)
    if ctype.startswith("multipart/") and boundary:
        part_type = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        body = _multipart(body, boundary, part_type, seven_bit)
        header = _relabel(header, cte, body)
    elif ctype == "message/rfc822" and cte not in _ENCODED:
        body = _entity(body, "text/plain", seven_bit=seven_bit, top=True)
        header = _relabel(header, cte, body)
    else:
        header, body = _leaf(header, fields, body)
    if top and "MIME-Version" not in fields:
        header += b"MIME-Version: 1.0\r\n"
    return header + b"\r\n" + body


def _boundary(fields: Message) -> bytes | None:
    """The multipart boundary as the raw bytes to look for; None when there is none that
    can match (the email package gives U+FFFD for some 8-bit values, and RFC 2046 §5.1.1
    allows ASCII only): such a body is then converted as one opaque part."""
    boundary = fields.get_boundary()
    try:
        return boundary.encode("ascii", "surrogateescape") if boundary else None
    except UnicodeEncodeError:
        return None


def _multipart(body: bytes, boundary: bytes, part_type: str, seven_bit: bool) -> bytes:
    """Convert each part between the delimiter lines; the delimiters stay as they were."""
    delimiter, close = b"--" + boundary, b"--" + boundary + b"--"
    out: list[bytes] = []
    current: list[bytes] = []  # lines of the preamble or the part being collected
    in_part = closed = False

    def flush() -> None:
        data = b"".join(current)
        if not in_part:  # preamble: not content, only has to be 7-bit and short
            out.append(_sanitize(data, seven_bit))
            return
        # The CRLF before a delimiter line belongs to the delimiter (RFC 2046 §5.1.1).
        crlf = data.endswith(b"\r\n")
        part = data[:-2] if crlf else data
        out.append(_entity(part, part_type, seven_bit=seven_bit, top=False)
                   + (b"\r\n" if crlf else b""))

    for line in _LINE_SPLIT.split(body):
        if closed:
            current.append(line)
            continue
        bare = line.rstrip(b"\r\n").rstrip(b" \t")  # transport padding is allowed
        if bare in (delimiter, close):
            flush()
            out.append(line)
            current = []
            in_part, closed = True, bare == close
        else:
            current.append(line)
    if closed:
        out.append(_sanitize(b"".join(current), seven_bit))  # epilogue
    else:
        flush()
    return b"".join(out)


def _leaf(header: bytes, fields: Message, body: bytes) -> tuple[bytes, bytes]:
    """Decode the body from its current encoding and encode it as QP or base64."""
    cte = str(fields.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    data = body
    if cte in _ENCODED:  # an encoded part needing work has long lines: decode, re-wrap
        fields.set_payload(body.decode("ascii", "surrogateescape"))
        decoded = fields.get_payload(decode=True)
        data = decoded if isinstance(decoded, bytes) else body
    if "Content-Type" not in fields and not data.isascii():
        charset = "utf-8" if _is_utf8(data) else "unknown-8bit"
        header += f"Content-Type: text/plain; charset={charset}\r\n".encode()
    # QP keeps text readable, but only lines that end in CRLF survive it as line breaks;
    # other text, and all non-text, goes as base64 so every byte comes back.
    lone = data.replace(b"\r\n", b"")
    if fields.get_content_maintype() == "text" and b"\r" not in lone and b"\n" not in lone:
        new_cte, encoded = "quoted-printable", _quoted_printable(data)
    else:
        new_cte = "base64"
        encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    header = _drop_fields(header, b"content-transfer-encoding")
    return header + f"Content-Transfer-Encoding: {new_cte}\r\n".encode(), encoded


def _quoted_printable(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return binascii.b2a_qp(data, istext=True)
    # b2a_qp copies the first line end it meets; with none it would soft-break with bare LF.
    return binascii.b2a_qp(data + b"\r\n", istext=True)[:-2]


def _relabel(header: bytes, cte: str, body: bytes) -> bytes:
    """A container labelled 8bit/binary gets the label its converted content deserves."""
    if cte not in ("8bit", "binary"):
        return header
    traits = body_traits(body)
    label = "8bit" if traits.has_8bit else "7bit"
    if traits.longest_line > MAX_LINE or label == cte:
        return header
    header = _drop_fields(header, b"content-transfer-encoding")
    return header + f"Content-Transfer-Encoding: {label}\r\n".encode()


def _sanitize(data: bytes, seven_bit: bool) -> bytes:
    """Preamble/epilogue: invisible to readers, so 8-bit bytes become "?", bare CR/LF become
    CRLF and long lines are cut rather than encoded (there is no place to declare one)."""
    if seven_bit and not data.isascii():
        data = data.translate(_ASCII_OR_QUESTION_MARK)
    data = _LINE_END.sub(b"\r\n", data)
    while match := _LONG_LINE.search(data):
        data = data[: match.start() + MAX_LINE] + b"\r\n" + data[match.start() + MAX_LINE:]
    return data


def _fields(header: bytes) -> Iterator[bytes]:
    """Header fields with their continuation lines, byte for byte."""
    field = b""
    for line in _LINE_SPLIT.split(header):
        if field and line[:1] not in (b" ", b"\t"):
            yield field
            field = b""
        field += line
    if field:
        yield field


def _drop_fields(header: bytes, name: bytes) -> bytes:
    """`header` without the fields called `name` (lower case; "Name :" counts too)."""
    return b"".join(f for f in _fields(header)
                    if f.split(b":", 1)[0].strip().lower() != name)


def _fold_long_fields(header: bytes) -> bytes:
    """Fold header lines over 998 octets at the last white space that fits (RFC 5322
    §2.2.3: folding adds CRLF before WSP and changes no meaning); a line with no such
    space is left as it is."""
    if not _LONG_LINE.search(header):
        return header
    out: list[bytes] = []
    for line in _LINE_SPLIT.split(header):
        while len(line.rstrip(b"\r\n")) > MAX_LINE:
            cut = max(line.rfind(b" ", 1, MAX_LINE + 1), line.rfind(b"\t", 1, MAX_LINE + 1))
            if cut <= 0 or not line[:cut].strip():
                break
            out.append(line[:cut] + b"\r\n")
            line = line[cut:]
        out.append(line)
    return b"".join(out)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
