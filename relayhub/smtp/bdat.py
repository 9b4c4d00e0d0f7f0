"""CHUNKING (RFC 3030): the BDAT argument, and the chunk bytes as message content. Pure.

A chunk is exactly <size> octets of message, whatever they hold: lines that look like
commands, a lone ".", bare CR or LF. `ChunkReader` counts them off the input and alone
decides where the chunk ends, so nothing inside a chunk can ever run as a command.
`ChunkedBody` applies the rules DATA applies to the assembled message (bare CR/LF refused or
normalised, line length, size), without dot-stuffing, and makes sure the stored body ends
with CRLF.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from relayhub.errors import SyntaxErrorReply
from relayhub.smtp.data import BodyDefects, clean_lines_end, has_long_line
from relayhub.smtp.encoder import LineEndEncoder

_CR, _LF = 0x0D, 0x0A
_CRLF = b"\r\n"
_LINE_END = re.compile(rb"[\r\n]")
# Chunk sizes beyond this many digits are nonsense; their octets could not be counted off.
_MAX_SIZE_DIGITS = 18


class BadChunkSize(SyntaxErrorReply):
    """BDAT without a usable size: its chunk cannot be told from commands, so the session
    must end (the caller closes the connection after this reply)."""

    def __init__(self) -> None:
        super().__init__("Syntax: BDAT size [LAST]")


def parse_bdat(arg: str) -> tuple[int, bool]:
    """`BDAT <size> [LAST]` → (size, last). Raises BadChunkSize."""
    words = arg.split()
    if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > _MAX_SIZE_DIGITS:
        raise BadChunkSize()
    if len(words) == 2 and words[1].upper() != "LAST":
        raise BadChunkSize()
    return int(words[0]), len(words) == 2


class ChunkReader:
    """Counts one chunk's octets off the input, passing them to `sink`."""

    def __init__(self, size: int, sink: Callable[[bytes], None]) -> None:
        self.remaining = size
        self._sink = sink

    def feed(self, data: bytes) -> bytes | None:
        """None while the chunk goes on; once it is complete, the bytes after it (commands)."""
        take = data[: self.remaining]
        if take:
            self._sink(take)
            self.remaining -= len(take)
        if self.remaining:
            return None
        return data[len(take):]


class ChunkedBody:
    """The message assembled from chunks, checked as DataReader checks DATA: `defects` and
    `size` mean the same, so the end of the message is handled the same way."""

    def __init__(self, sink: Callable[[bytes], None], *, max_size: int, max_line_length: int,
                 normalize_bare_newlines: bool = False) -> None:
        self._sink = sink
        self._max_size = max_size
        self._max_line_length = max_line_length
        self._normalize = normalize_bare_newlines
        self.defects = BodyDefects()
        self.size = 0
        self._cr_pending = False  # the last chunk ended in CR: its LF may open the next one
        self._line_length = 0

    def feed(self, data: bytes) -> None:
        if not data:
            return
        out: list[bytes] = []
        pos, end = 0, len(data)
        if self._cr_pending:
            self._cr_pending = False
            if data[0] == _LF:
                self._line_end(out)
                pos = 1
            else:
                self._bare(out)
        careful_until = 0  # as in DataReader: past a bare CR/LF, the per-line loop
        while pos < end:
            if self._line_length == 0 and pos >= careful_until:
                block_end = clean_lines_end(data, pos)
                if block_end > pos:
                    block = data[pos:block_end]
                    if has_long_line(block, self._max_line_length):
                        self.defects.line_too_long = True
                    out.append(block)
                    pos = block_end
                    continue
                careful_until = data.rfind(_CRLF, pos) + 2
            match = _LINE_END.search(data, pos)
            stop = match.start() if match else end
            if stop > pos:
                out.append(data[pos:stop])
                self._line_length += stop - pos
                if self._line_length > self._max_line_length:
                    self.defects.line_too_long = True
            if match is None:
                break
            if data[stop] == _CR:
                if stop + 1 == end:
                    self._cr_pending = True
                    break
                if data[stop + 1] == _LF:
                    self._line_end(out)
                    pos = stop + 2
                    continue
            self._bare(out)
            pos = stop + 1
        self._flush(out)

    def finish(self) -> None:
        """The LAST chunk is in: a message that does not end with a line end gets CRLF."""
        out: list[bytes] = []
        if self._cr_pending:
            self._cr_pending = False
            self._bare(out)
        elif self._line_length:
            self._line_end(out)
        self._flush(out)

    def _line_end(self, out: list[bytes]) -> None:
        out.append(_CRLF)
        self._line_length = 0

    def _bare(self, out: list[bytes]) -> None:
        if self._normalize:
            self._line_end(out)
        else:
            self.defects.bare_newline = True
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


# Outbound, a chunk is counted, not delimited: no dot-stuffing, but line ends still become
# CRLF and the message ends with one, so a bare CR or LF never leaves the hub.
ChunkEncoder = LineEndEncoder

