"""The message header as the SMTP server needs it: our Received: line, and a summary of the
client's header section (hop count, subject) taken from a bounded prefix of the body."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
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


class HeaderStage:
    """Holds the start of a body until its header section is complete, rewrites that
    section once (masquerading), then passes everything on to `write`.

    The section ends at the first empty line. One that has not ended within
    HEADER_PREFIX_LIMIT bytes is passed on unchanged: nothing is held without bound.
    """

    def __init__(self, write: Callable[[bytes], None],
                 rewrite: Callable[[bytes], bytes] | None = None) -> None:
        self._write = write
        self._rewrite = rewrite
        self._held = bytearray()
        self._summary: HeaderSummary | None = None  # set once the section has gone on

    def feed(self, data: bytes) -> None:
        if self._summary is not None:
            self._write(data)
            return
        # Search only what is new (and the 3 bytes before it that may start the blank
        # line): a header sent in tiny pieces must not cost a scan of all that is held each.
        start = max(0, len(self._held) - 3)
        self._held += data
        if self._held.startswith(b"\r\n"):  # no header fields at all
            self._release(0)
            return
        end = self._held.find(b"\r\n\r\n", start)
        if end >= 0 and end + 2 <= HEADER_PREFIX_LIMIT:
            self._release(end + 2)
        elif end >= 0 or len(self._held) > HEADER_PREFIX_LIMIT:
            self._release(None)

    def finish(self) -> None:
        """The data has ended: a message that is all header fields goes on now."""
        if self._summary is None:
            self._release(len(self._held))

    def summary(self) -> HeaderSummary:
        assert self._summary is not None, "finish() first"
        return self._summary

    def _release(self, header_end: int | None) -> None:
        data = bytes(self._held)
        self._held = bytearray()
        self._summary = summarize_header(data[:HEADER_PREFIX_LIMIT])
        if header_end is None or self._rewrite is None:
            self._write(data)
        else:
            self._write(self._rewrite(data[:header_end]) + data[header_end:])


def summarize_header(prefix: bytes) -> HeaderSummary:
    """Count Received: fields and decode Subject: within the header section of `prefix`."""
    end = prefix.find(b"\r\n\r\n")
    header = prefix if end < 0 else prefix[: end + 2]
    subject_match = _SUBJECT.search(header)
    subject = ""
    if subject_match:
        subject = decode_for_display(subject_match.group(1).decode("utf-8", "replace"))
    return HeaderSummary(len(_RECEIVED.findall(header)), subject)


@functools.lru_cache(maxsize=2)
def _rfc5322_date(second: int) -> str:
    """The local date of `second`; every message of the same second shares one (a pure
    function, cached because formatting a local time costs more than the rest of the
    header)."""
    return formatdate(second, localtime=True)


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
    date = _rfc5322_date(int(now))
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
