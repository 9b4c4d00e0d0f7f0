"""DATA encoding for sending: CRLF line ends and dot-stuffing that hold across chunk boundaries.

The mirror of `relayhub.smtp.data.DataReader`. Twisted's client stuffs per 16 KiB chunk and
skips the first line, which lets a `\\n.\\n` on a boundary end the data early downstream (SMTP
smuggling); here the state that decides a line start is carried from chunk to chunk.
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")
_CRLF = b"\r\n"


class LineEndEncoder:
    """Turns body chunks into bytes whose every line end is CRLF, the same however the body
    is split: nothing is held back, a CR at the end of a chunk is sent as CRLF at once and
    an LF that starts the next chunk is then swallowed as the rest of that same line end.
    A CRLF-only chunk (as every stored body is) passes without being rewritten.

    `crlf_only`: the caller knows that every line end in the body is a CRLF (the queue
    measured it at acceptance, relayhub.mime.BodyMeter), so chunks are not checked: no pass
    over the bytes at all.
    """

    def __init__(self, *, crlf_only: bool = False) -> None:
        self.at_line_start = True  # the next byte begins a line (true before the first)
        self._after_cr = False  # the last input byte was a CR, already sent as CRLF
        self._crlf_only = crlf_only

    def encode(self, chunk: bytes) -> bytes:
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        if not chunk:
            return b""
        self._after_cr = chunk.endswith(b"\r")
        if self._crlf_only:
            # A CRLF split between chunks: its LF goes now, and the next chunk's is swallowed.
            out = chunk + b"\n" if self._after_cr else chunk
        elif chunk.count(_CRLF) == chunk.count(b"\r") == chunk.count(b"\n"):
            out = chunk
        else:
            out = _LINE_END.sub(_CRLF, chunk)
        self.at_line_start = out.endswith(_CRLF)
        return out

    def finish(self) -> bytes:
        """A CRLF if the last line lacked one (BDAT: what ends the last chunk)."""
        return b"" if self.at_line_start else _CRLF


class DotStuffer:
    """Turns body chunks into DATA wire bytes: LineEndEncoder's CRLF line ends, and a
    leading "." doubled on every line, with the line-start state carried across chunks."""

    def __init__(self, *, crlf_only: bool = False) -> None:
        self._lines = LineEndEncoder(crlf_only=crlf_only)

    def encode(self, chunk: bytes) -> bytes:
        at_line_start = self._lines.at_line_start
        out = self._lines.encode(chunk)
        if b"\r\n." in out:
            out = out.replace(b"\r\n.", b"\r\n..")
        if at_line_start and out.startswith(b"."):
            out = b"." + out
        return out

    def finish(self) -> bytes:
        """The end of the data: a CRLF if the last line lacked one, then ".\\r\\n"."""
        return b".\r\n" if self._lines.at_line_start else b"\r\n.\r\n"
