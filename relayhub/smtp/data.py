"""DATA framing: turns the bytes after `354` into the stored body, ending only at <CRLF>.<CRLF>.

This is the SMTP-smuggling boundary, so it is strict and pure (no I/O, no reactor):
- the data ends only at a "." line that both follows a real CRLF (or starts the data)
  and is itself ended by CRLF; `<LF>.<LF>`, `<LF>.<CRLF>`, `<CR>.<CR>`, `<CRLF>.<LF>` are
  ordinary content;
- a bare CR or LF either refuses the message ("reject") or counts as a line end
  ("normalize"); either way the stored body only ever holds CRLF line ends;
- an over-long line or an over-large message is remembered, not acted on: the reader keeps
  consuming until the real end so that no body byte is ever read as a command;
- the result does not depend on how the input is split into chunks, and memory is O(1)
  besides the chunk itself (at most three bytes are carried over between chunks).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from relayhub.mime import crlf_lines

_CR, _LF, _DOT = 0x0D, 0x0A, 0x2E
_CRLF = b"\r\n"
_CRLF_DOT = b"\r\n."
_LINE_END = re.compile(rb"[\r\n]")


@dataclass
class BodyDefects:
    """What was wrong with a message; any of them refuses it at the end of DATA."""

    bare_newline: bool = False
    line_too_long: bool = False
    too_big: bool = False

    @property
    def any(self) -> bool:
        return self.bare_newline or self.line_too_long or self.too_big


def clean_lines_end(buf: bytes, pos: int) -> int:
    """Where the whole lines from `pos` end when every line end among them is a CRLF
    (`pos` when there is no complete line, or a bare CR or LF among them): the stretch the
    readers take with C-speed bytes operations instead of a Python step per line."""
    end = buf.rfind(_CRLF, pos) + 2
    if end < 2 or crlf_lines(buf[pos:end]) is None:
        return pos
    return end


def has_long_line(block: bytes, limit: int) -> bool:
    """Whether a block of whole CRLF lines holds one longer than `limit` octets."""
    return len(block) > limit + 2 and max(map(len, block.split(_CRLF))) > limit


class DataReader:
    """Consumes DATA bytes, passes the unstuffed CRLF body to `sink`, finds the real end.

    `feed` returns None while the data goes on, and the bytes that followed the end
    marker (pipelined commands) once it has been seen. After a defect nothing more is
    passed to the sink, since the message will be refused anyway.
    """

    def __init__(
        self,
        sink: Callable[[bytes], None],
        *,
        max_size: int,
        max_line_length: int,
        normalize_bare_newlines: bool = False,
    ) -> None:
        self._sink = sink
        self._max_size = max_size
        self._max_line_length = max_line_length
        self._normalize = normalize_bare_newlines
        self.defects = BodyDefects()
        self.size = 0  # body bytes passed to the sink
        self._tail = b""  # undecided bytes carried to the next chunk: ".", ".\r" or "\r"
        self._at_line_start = True
        # Only a "." line that begins right after a real CRLF (or at the very start, which
        # follows the CRLF of the DATA command) may end the data.
        self._line_after_crlf = True
        self._line_length = 0
        self._leftover = b""

    def feed(self, data: bytes) -> bytes | None:
        buf = self._tail + data if self._tail else data
        self._tail = b""
        out: list[bytes] = []
        pos, end_of_buf = 0, len(buf)
        # Where the whole-block fast path last found a bare CR/LF: up to there the careful
        # per-line loop runs, so a defect near the end cannot make every line rescan the rest.
        careful_until = 0
        while pos < end_of_buf:
            if (pos >= careful_until and self._at_line_start and self._line_after_crlf
                    and buf[pos] != _DOT):
                block_end = self._fast_block(buf, pos, out)
                if block_end is None:  # the end marker: what follows it is commands
                    self._flush(out)
                    return self._leftover
                if block_end > pos:
                    pos = block_end
                    continue
                careful_until = buf.rfind(_CRLF, pos) + 2
            if self._at_line_start:
                self._at_line_start = False
                if buf[pos] == _DOT:
                    if end_of_buf - pos < 3 and (
                        end_of_buf - pos == 1 or buf[pos + 1] == _CR
                    ):
                        # ".", ".\r": cannot tell the end marker from content yet.
                        self._tail = buf[pos:]
                        self._at_line_start = True
                        break
                    if (
                        self._line_after_crlf
                        and buf[pos + 1] == _CR
                        and buf[pos + 2] == _LF
                    ):
                        self._flush(out)
                        return buf[pos + 3 :]
                    # A leading dot is transparency (RFC 5321 §4.5.2): drop it, but it
                    # still counts towards the line's length on the wire.
                    pos += 1
                    self._line_length = 1
                    continue
            match = _LINE_END.search(buf, pos)
            stop = match.start() if match else end_of_buf
            if stop > pos:
                out.append(buf[pos:stop])
                self._line_length += stop - pos
                if self._line_length > self._max_line_length:
                    self.defects.line_too_long = True
            if match is None:
                break
            if buf[stop] == _CR:
                if stop + 1 == end_of_buf:
                    self._tail = b"\r"  # CR at the chunk's end: wait for what follows
                    break
                if buf[stop + 1] == _LF:
                    out.append(_CRLF)
                    self._end_line(after_crlf=True)
                    pos = stop + 2
                    continue
            # A bare CR or bare LF.
            if self._normalize:
                out.append(_CRLF)
            else:
                self.defects.bare_newline = True
            self._end_line(after_crlf=False)
            pos = stop + 1
        self._flush(out)
        return None

    def _fast_block(self, buf: bytes, pos: int, out: list[bytes]) -> int | None:
        """Consume whole CRLF lines from `pos` (a line start after a real CRLF, not a ".")
        with C-speed bytes operations: no Python work per line.

        Returns where the consumed block ends (`pos` if it could not take any: no complete
        line, or a bare CR/LF inside, which the per-line loop then handles), or None when the
        end marker was found; the bytes after it are then in `self._leftover`.
        """
        last = clean_lines_end(buf, pos) - 2
        if last < pos:
            return pos  # no complete line, or a bare CR or LF among them
        block = buf[pos:last + 2]
        # The block starts at a line start after CRLF (and not with "."), so the first
        # CRLF "." CRLF in it is the end marker; nothing before it can end the data. Most
        # blocks have no line starting with a dot at all: one search settles both questions.
        marker = -1
        if (first_dot := block.find(_CRLF_DOT)) >= 0:
            marker = block.find(b"\r\n.\r\n", first_dot)
            if marker >= 0:
                self._leftover = buf[pos + marker + 5:]
                block = block[:marker + 2]
        if has_long_line(block, self._max_line_length):
            self.defects.line_too_long = True  # lengths as on the wire, stuffing dot included
        # Transparency (RFC 5321 §4.5.2): the first line does not start with a dot, and
        # every other line start is a CRLF in the block.
        out.append(block.replace(_CRLF_DOT, _CRLF) if first_dot >= 0 else block)
        if marker >= 0:
            return None
        self._end_line(after_crlf=True)
        return last + 2

    def _end_line(self, *, after_crlf: bool) -> None:
        self._at_line_start = True
        self._line_after_crlf = after_crlf
        self._line_length = 0

    def _flush(self, out: list[bytes]) -> None:
        if not out or self.defects.any:
            return
        chunk = b"".join(out)
        self.size += len(chunk)
        if self.size > self._max_size:
            self.defects.too_big = True
            return
        self._sink(chunk)
