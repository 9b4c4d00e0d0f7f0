"""The DATA reader against the smuggling variants and against a reference definition."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayhub.smtp.data import DataReader

SMUGGLED = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@localhost>\r\nDATA\r\n"


def run(
    chunks: list[bytes], *, normalize: bool = False, max_size: int = 10**6, max_line: int = 1000
) -> tuple[bytes, bytes | None, DataReader]:
    body: list[bytes] = []
    reader = DataReader(
        body.append, max_size=max_size, max_line_length=max_line, normalize_bare_newlines=normalize
    )
    leftover = None
    for index, chunk in enumerate(chunks):
        leftover = reader.feed(chunk)
        if leftover is not None:
            # Later chunks follow the end marker too: the server reads them as commands.
            leftover += b"".join(chunks[index + 1 :])
            break
    return b"".join(body), leftover, reader


def reference(stream: bytes, normalize: bool) -> tuple[bytes, bytes, bool, int] | None:
    """The data ends at the first CRLF "." CRLF, the DATA command's CRLF counting as the
    first one; everything before it is lines to unstuff."""
    prefixed = b"\r\n" + stream
    end = prefixed.find(b"\r\n.\r\n")
    if end < 0:
        return None
    content, leftover = prefixed[2 : end + 2], prefixed[end + 5 :]
    lines = re.split(rb"\r\n|\r|\n", content)[:-1]
    bare = re.search(rb"\r(?!\n)|(?<!\r)\n", content) is not None
    body = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    longest = max((len(line) for line in lines), default=0)
    return body, leftover, bare and not normalize, longest


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\r\n.\n", b"\r\n.\r", b"\r\n.\x00\r\n",
     b"\r\n\x00.\r\n", b"\n.\x00\n", b"\r\n .\r\n"],
)
@pytest.mark.parametrize("normalize", [False, True])
def test_fake_end_markers_never_end_the_data(fake_end: bytes, normalize: bool) -> None:
    stream = b"Subject: x\r\n\r\nhello" + fake_end + SMUGGLED + b"more\r\n"
    body, leftover, reader = run([stream], normalize=normalize)
    assert leftover is None, "a fake end marker ended the data"
    # The real end still works afterwards, and what followed the fake one stayed content.
    assert reader.feed(b".\r\nQUIT\r\n") == b"QUIT\r\n"
    if normalize:
        assert b"MAIL FROM:<evil" in body
        assert re.search(rb"\r(?!\n)|(?<!\r)\n", body) is None  # only CRLF line ends stored
    elif b"\n" in fake_end.replace(b"\r\n", b"") or b"\r" in fake_end.replace(b"\r\n", b""):
        assert reader.defects.bare_newline


def test_dot_unstuffing_and_first_line_dot() -> None:
    body, leftover, reader = run([b"..first\r\nmid\r\n...two\r\n.\r\n"])
    assert body == b".first\r\nmid\r\n..two\r\n"
    assert leftover == b""
    assert not reader.defects.any


def test_empty_message_and_pipelined_leftover() -> None:
    body, leftover, _ = run([b".\r\nRSET\r\nQUIT\r\n"])
    assert body == b"" and leftover == b"RSET\r\nQUIT\r\n"


def test_end_marker_split_across_every_chunk_boundary() -> None:
    stream = b"a\r\n.b\r\n.\r\nNOOP\r\n"
    for cut in range(1, len(stream)):
        body, leftover, _ = run([stream[:cut], stream[cut:]])
        assert (body, leftover) == (b"a\r\nb\r\n", b"NOOP\r\n"), cut


def test_long_line_is_flagged_but_reading_goes_on_to_the_real_end() -> None:
    chunks = [b"x" * 5000, b"y" * 5000 + b"\r\n", b"RSET\r\n" + SMUGGLED, b".\r\nQUIT\r\n"]
    body, leftover, reader = run(chunks, max_line=8000)
    assert reader.defects.line_too_long
    assert leftover == b"QUIT\r\n"
    # Nothing after the defect reaches the store (the server aborts what came before).
    assert body == b"x" * 5000


def test_ten_thousand_byte_line_is_accepted_under_the_limit() -> None:
    line = b"z" * 10_000
    body, leftover, reader = run([line + b"\r\n.\r\n"], max_line=65536)
    assert body == line + b"\r\n" and leftover == b"" and not reader.defects.any


def test_size_limit_is_flagged_and_body_stops() -> None:
    _, leftover, reader = run([b"0123456789\r\n" * 10, b".\r\n"], max_size=50)
    assert reader.defects.too_big and leftover == b""


def test_bare_lf_normalized() -> None:
    body, leftover, reader = run([b"a\nb\rc\r\n.\r\n"], normalize=True)
    assert body == b"a\r\nb\r\nc\r\n" and leftover == b"" and not reader.defects.any


stream_bytes = st.lists(
    st.sampled_from([b"a", b".", b"\r", b"\n", b"\x00", b"\r\n", b"\r\n.", b".\r\n"]),
    max_size=60,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(
    stream=stream_bytes,
    tail=st.sampled_from([b"", b"\r\n.\r\n", b"\r\n.\r\nQUIT\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=6),
    normalize=st.booleans(),
)
def test_matches_reference_for_any_chunking(
    stream: bytes, tail: bytes, cuts: list[int], normalize: bool
) -> None:
    data = stream + tail
    points = sorted({c for c in cuts if c < len(data)})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    body, leftover, reader = run(chunks, normalize=normalize, max_line=8)
    expected = reference(data, normalize)
    if expected is None:
        assert leftover is None
        return
    exp_body, exp_leftover, exp_bare, longest = expected
    assert leftover == exp_leftover
    assert reader.defects.bare_newline == exp_bare
    assert reader.defects.line_too_long == (longest > 8)
    if not reader.defects.any:
        assert body == exp_body


long_stream_bytes = st.lists(
    st.sampled_from([b"a" * 40, b"b" * 7, b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.",
                     b".\r\n", b"\r\n.\r", b"\r\r\n", b"\xc3\xa9"]),
    max_size=400,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(
    stream=long_stream_bytes,
    tail=st.sampled_from([b"", b"\r\n.\r\n", b"\r\n.\r\nQUIT\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=20000), max_size=4),
    normalize=st.booleans(),
    max_line=st.sampled_from([8, 50, 100, 100000]),
)
def test_whole_block_path_matches_reference(
    stream: bytes, tail: bytes, cuts: list[int], normalize: bool, max_line: int
) -> None:
    """Long inputs with many complete lines per chunk, where the reader takes whole blocks
    of lines at once: same body, end, defects as the reference definition."""
    data = stream + tail
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    body, leftover, reader = run(chunks, normalize=normalize, max_line=max_line,
                                 max_size=10**7)
    expected = reference(data, normalize)
    if expected is None:
        assert leftover is None
        return
    exp_body, exp_leftover, exp_bare, longest = expected
    assert leftover == exp_leftover
    assert reader.defects.bare_newline == exp_bare
    assert reader.defects.line_too_long == (longest > max_line)
    if not reader.defects.any:
        assert body == exp_body
