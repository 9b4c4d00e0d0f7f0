"""CHUNKING/BDAT (RFC 3030): the pure chunk logic, and a raw socket client against a real
daemon — chunks of 1 byte to 1 MiB arrive intact, DATA and BDAT do not mix, and a chunk's
octets never run as commands."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubprocess import Hub, SMTPConnection
from hypothesis import given
from hypothesis import strategies as st

from relayhub.errors import SyntaxErrorReply
from relayhub.smtp.bdat import ChunkedBody, ChunkReader, parse_bdat

# ----------------------------------------------------------------------------- pure


def test_parse_bdat() -> None:
    assert parse_bdat("10") == (10, False)
    assert parse_bdat("0 LAST") == (0, True)
    assert parse_bdat("5 last") == (5, True)
    for bad in ("", "x", "-1", "1 2", "1 LAST x", "9" * 19):
        with pytest.raises(SyntaxErrorReply):
            parse_bdat(bad)


def test_chunk_reader_counts_octets_whatever_they_hold() -> None:
    got: list[bytes] = []
    reader = ChunkReader(10, got.append)
    assert reader.feed(b"\r\n.\r\nMAIL") is None
    assert reader.feed(b" FROM:<x>\r\nQUIT\r\n") == b"FROM:<x>\r\nQUIT\r\n"
    assert b"".join(got) == b"\r\n.\r\nMAIL "
    assert ChunkReader(0, got.append).feed(b"NOOP\r\n") == b"NOOP\r\n"


def body(chunks: list[bytes], **options: object) -> tuple[bytes, ChunkedBody]:
    out: list[bytes] = []
    values: dict[str, object] = {"max_size": 10**7, "max_line_length": 1000}
    values.update(options)
    assembled = ChunkedBody(out.append, **values)  # type: ignore[arg-type]
    for chunk in chunks:
        assembled.feed(chunk)
    assembled.finish()
    return b"".join(out), assembled


def test_body_keeps_dots_and_any_split_of_crlf() -> None:
    data, checked = body([b"a\r", b"\n.\r\n..x\r", b"\nend"])
    assert data == b"a\r\n.\r\n..x\r\nend\r\n" and not checked.defects.any


@pytest.mark.parametrize("chunks", [[b"a\nb\r\n"], [b"a\r"], [b"a\r", b"b\r\n"], [b"\n"]])
def test_bare_line_ends_are_refused(chunks: list[bytes]) -> None:
    assert body(chunks)[1].defects.bare_newline


@given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"xxxx", b"\r\n.\r\n"]),
                max_size=40), st.lists(st.integers(1, 9), max_size=8), st.booleans())
def test_any_chunking_gives_the_definition(pieces: list[bytes], cuts: list[int],
                                           normalize: bool) -> None:
    """Whole CRLF blocks (taken at C speed) and the per-line path agree with the definition:
    every line end CRLF (or a bare one refused), a final CRLF added, lines over the limit
    flagged; however the message is cut into chunks."""
    data = b"".join(pieces)
    chunks, position = [], 0
    for cut in cuts:
        chunks.append(data[position:position + cut])
        position += cut
    chunks.append(data[position:])
    got, checked = body(chunks, max_line_length=6, normalize_bare_newlines=normalize)
    lines = re.split(rb"\r\n|\r|\n", data)
    bare = len(re.findall(rb"\r\n|\r|\n", data)) != data.count(b"\r\n")
    assert checked.defects.bare_newline == (bare and not normalize)
    assert checked.defects.line_too_long == any(len(line) > 6 for line in lines)
    if not checked.defects.any:
        expected = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
        assert got == (expected if not expected or expected.endswith(b"\r\n")
                       else expected + b"\r\n")


def test_bare_line_ends_normalised_when_asked() -> None:
    assert body([b"a\nb\r", b"c"], normalize_bare_newlines=True)[0] == b"a\r\nb\r\nc\r\n"


def test_size_and_line_length() -> None:
    assert body([b"x" * 20 + b"\r\n"], max_size=10)[1].defects.too_big
    assert body([b"x" * 600, b"x" * 600 + b"\r\n"])[1].defects.line_too_long


# ----------------------------------------------------------------------------- daemon


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    running = Hub(tmp_path_factory.mktemp("hub"),
                  {"smtp": {"max_message_size": "8MiB"}}).start()
    yield running
    running.stop()


def session(hub: Hub) -> SMTPConnection:
    conn = SMTPConnection(hub.smtp_port, timeout=30)
    assert conn.reply() == ["220 hub.test ESMTP relayhub"]
    lines = conn.command("EHLO client.test")
    assert "250-CHUNKING" in lines or "250 CHUNKING" in lines
    return conn


def delivered(hub: Hub, before: int) -> bytes:
    new = hub.state_dir / "mail" / "postmaster" / "new"
    files = hub.wait(lambda: sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)
                     if new.is_dir() and len(list(new.iterdir())) > before else None)
    return Path(files[-1]).read_bytes()


def count(hub: Hub) -> int:
    new = hub.state_dir / "mail" / "postmaster" / "new"
    return len(list(new.iterdir())) if new.is_dir() else 0


def strip_trace(stored: bytes) -> bytes:
    """The message after the trace fields (ours, and Postfix's X-Original-To:)."""
    lines = stored.split(b"\r\n")
    index = 0
    while lines[index].split(b":")[0].lower() in (b"return-path", b"delivered-to",
                                                    b"x-original-to", b"received") or \
            lines[index][:1] in (b" ", b"\t"):
        index += 1
    return b"\r\n".join(lines[index:])


@pytest.mark.parametrize("size", [1, 1000, 65536, 1024 * 1024])
def test_chunks_of_one_byte_to_one_mebibyte_arrive_intact(hub: Hub, size: int) -> None:
    rng = random.Random(size)
    # Text with every hazard: lone dots, dot-led lines, command-looking lines, long lines.
    pieces = [b"Subject: chunks\r\n\r\n"]
    total = 0
    while total < 2 * 1024 * 1024 if size > 1 else total < 3000:
        line = rng.choice([b".", b"..", b".x", b"MAIL FROM:<evil@x>", b"QUIT", b"",
                           bytes(rng.randrange(33, 127) for _ in range(rng.randrange(0, 900)))])
        pieces.append(line + b"\r\n")
        total += len(line) + 2
    message = b"".join(pieces)
    before = count(hub)
    conn = session(hub)
    conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\n")
    assert [conn.code(), conn.code()] == [250, 250]
    position = 0
    while position < len(message):
        chunk = message[position:position + size]
        position += len(chunk)
        last = b" LAST" if position == len(message) else b""
        conn.send(b"BDAT %d%s\r\n" % (len(chunk), last) + chunk)
        reply = conn.reply()[-1]
        if last:
            assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        else:
            assert reply == f"250 2.0.0 Ok: {len(chunk)} octets received", reply
    conn.command("QUIT")
    conn.close()
    assert strip_trace(delivered(hub, before)) == message


def test_pipelined_bdat_with_commands_inside_chunks(hub: Hub) -> None:
    before = count(hub)
    smuggled = b"\r\n.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<postmaster@localhost>\r\nDATA\r\n"
    message = b"Subject: smuggle\r\n\r\nhello" + smuggled + b"bye\r\n"
    half = len(message) // 2
    conn = session(hub)
    conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\n"
              + b"BDAT %d\r\n" % half + message[:half]
              + b"BDAT %d LAST\r\n" % (len(message) - half) + message[half:] + b"NOOP\r\n")
    replies = [conn.reply()[-1] for _ in range(5)]
    assert replies[:3] == ["250 2.1.0 Ok", "250 2.1.5 Ok", f"250 2.0.0 Ok: {half} octets received"]
    assert replies[3].startswith("250 2.0.0 Ok: queued as ")
    assert replies[4] == "250 2.0.0 Ok"
    conn.command("QUIT")
    assert strip_trace(delivered(hub, before)) == message
    assert "evil@x" not in hub.log()


def test_data_after_bdat_and_bdat_after_data_are_refused(hub: Hub) -> None:
    conn = session(hub)
    conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\n")
    assert [conn.code(), conn.code()] == [250, 250]
    conn.send(b"BDAT 4\r\nab\r\n")
    assert conn.code() == 250
    assert conn.command("DATA") == ["503 5.5.1 Error: DATA after BDAT"]
    assert conn.command("RSET")[0].startswith("250")
    # After a message sent with DATA the transaction is over: BDAT finds none, and its
    # chunk (a lone "." and a command) is read and dropped, never run.
    conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\nDATA\r\n")
    assert [conn.code() for _ in range(3)] == [250, 250, 354]
    conn.send(b"Subject: x\r\n\r\nby data\r\n.\r\n")
    assert conn.reply()[-1].startswith("250 2.0.0 Ok: queued as ")
    conn.send(b"BDAT 10 LAST\r\n.\r\nRSET\r\nx")
    assert conn.reply() == ["503 5.5.1 Error: need MAIL command"]
    assert conn.command("NOOP") == ["250 2.0.0 Ok"]


def test_bdat_without_transaction_is_refused_after_its_chunk(hub: Hub) -> None:
    conn = session(hub)
    conn.send(b"BDAT 20 LAST\r\nQUIT\r\nQUIT\r\nQUIT\r\nQU")
    assert conn.reply() == ["503 5.5.1 Error: need MAIL command"]
    assert conn.command("NOOP") == ["250 2.0.0 Ok"]


def test_bad_bdat_size_ends_the_session(hub: Hub) -> None:
    conn = session(hub)
    conn.send(b"BDAT x\r\nRSET\r\n")
    assert conn.reply() == ["501 5.5.4 Syntax: BDAT size [LAST]"]
    assert conn.closed()


def test_bare_lf_in_bdat_refused_like_data(hub: Hub) -> None:
    conn = session(hub)
    conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\n")
    assert [conn.code(), conn.code()] == [250, 250]
    conn.send(b"BDAT 10 LAST\r\nS: x\n\r\nab\r\n")
    assert conn.reply() == ["550 5.5.2 Error: bare <CR> or <LF> received"]


def test_too_big_bdat_message_refused_at_last(hub: Hub) -> None:
    conn = session(hub)
    conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<postmaster@localhost>\r\n")
    assert [conn.code(), conn.code()] == [250, 250]
    chunk = (b"x" * 998 + b"\r\n") * 1024
    for _ in range(8):
        conn.send(b"BDAT %d\r\n" % len(chunk) + chunk)
        assert conn.code() == 250
    conn.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert conn.reply() == ["552 5.3.4 Error: message file too big"]


# ----------------------------------------------------------------------------- outbound


def test_outbound_bdat_to_postfix_delivers_intact(tmp_path: Path) -> None:
    """Postfix 3.7 offers CHUNKING: a message of several BDAT chunks, full of lone dots and
    dot-led lines, reaches its Maildir byte for byte."""
    from test_postfix_interop import DOWNSTREAM, MAILBOX, POSTFIX, running_hub, wait_for

    from bench.postfix import PostfixInstance

    if not Path(POSTFIX).exists():
        pytest.skip(f"{POSTFIX} is missing: install Debian's postfix package (.ci/run does)")
    rng = random.Random(7)
    # A complete header section: Postfix adds what is missing (Message-ID:, Date:, ...).
    lines = [b"From: <postmaster@localhost>", b"To: <" + MAILBOX.encode() + b">",
             b"Date: Thu, 03 Dec 2026 12:00:00 +0000", b"Message-ID: <big@hub.test>",
             b"Subject: big chunked", b""]
    size = 0
    while size < 2_500_000:  # three chunks of relayhub's 1 MiB
        line = rng.choice([b".", b"..", b".dot led", b"x" * rng.randrange(0, 990)])
        lines.append(line)
        size += len(line) + 2
    message = b"\r\n".join(lines) + b"\r\n"
    with PostfixInstance(domains=[DOWNSTREAM], mailboxes=[MAILBOX], catchall=False,
                         max_lifetime=300, main_cf={"message_size_limit": "20000000"}) as pf, \
            running_hub(tmp_path / "hub", {
                "routing": {"transport": {DOWNSTREAM: f"[127.0.0.1]:{pf.port}"}},
                "delivery": {"tls": "none", "retry_min": "1s", "retry_max": "2s"},
            }) as hub:
        hub.send([MAILBOX], message)
        [delivered_file] = wait_for(lambda: pf.messages(MAILBOX), "the message at Postfix",
                                    timeout=60, diagnostics=lambda: hub.log()[-2000:]
                                    + pf.log_text()[-2000:])
        raw = delivered_file.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert strip_trace(raw) == message
        wait_for(lambda: "bdat=" in pf.log_text(), "Postfix's count of BDAT commands",
                 diagnostics=pf.log_text)
        assert re.search(r"bdat=[3-9]", pf.log_text()), pf.log_text()[-2000:]
