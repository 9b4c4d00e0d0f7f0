"""The message header as the SMTP server needs it: our Received: line, and a summary of the
client's header section (hop count, subject) taken from a bounded prefix of the body."""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formatdate

from relayhub.mime import decode_for_display

# Enough for any real header section; a bigger one only loses the summary, never mail.
HEADER_PREFIX_LIMIT = 256 * 1024

_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)
_SUBJECT = re.compile(
    rb"^subject:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE
)


@dataclass(frozen=True)
class HeaderSummary:
    received_count: int
    subject: str


class HeaderPrefix:
    """Keeps the first HEADER_PREFIX_LIMIT bytes of a body to summarise its header."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._kept = 0

    def feed(self, data: bytes) -> None:
        if self._kept < HEADER_PREFIX_LIMIT:
            piece = data[: HEADER_PREFIX_LIMIT - self._kept]
            self._parts.append(piece)
            self._kept += len(piece)

    def summary(self) -> HeaderSummary:
        return summarize_header(b"".join(self._parts))


def summarize_header(prefix: bytes) -> HeaderSummary:
    """Count Received: fields and decode Subject: within the header section of `prefix`."""
    end = prefix.find(b"\r\n\r\n")
    header = prefix if end < 0 else prefix[: end + 2]
    subject_match = _SUBJECT.search(header)
    subject = ""
    if subject_match:
        subject = decode_for_display(subject_match.group(1).decode("utf-8", "replace"))
    return HeaderSummary(len(_RECEIVED.findall(header)), subject)


def received_header(
    *,
    helo: str,
    client_name: str,
    client_address: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    now: float,
) -> bytes:
    """Our trace field (RFC 5321 §4.4); `for <rcpt>` only for a single recipient, so a
    list's members are not disclosed to each other."""
    helo_part = helo or client_name
    lines = [
        f"Received: from {helo_part} ({client_name} [{client_address}])",
        f"\tby {hostname} (relayhub) with {protocol} id {queue_id}",
    ]
    date = formatdate(now, localtime=True)
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
