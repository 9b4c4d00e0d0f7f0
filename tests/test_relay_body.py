"""How the SMTP courier prepares a stored body for a hop (relayhub.delivery.relay): sent as
stored, without a scan, when the queue recorded its traits at acceptance; scanned, and
mended on the way out, when it did not; converted when the hop cannot take it as it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayhub.delivery.relay import SMALL_BODY, open_for_hop, read_small_for_hop
from relayhub.mime import BodyTraits, body_traits
from relayhub.smtp.client import OutboundBody

PLAIN = b"Subject: plain\r\n\r\nhello\r\n"
EIGHT_BIT = b"Subject: cafe\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xa9\r\n"


def prepared(tmp_path: Path, body: bytes, eight_bit_ok: bool, known: BodyTraits | None,
             large: bool) -> OutboundBody:
    path = tmp_path / "body"
    path.write_bytes(body)
    if large:
        assert read_small_for_hop(str(path), eight_bit_ok, known) is None
        return open_for_hop(path, eight_bit_ok, known)
    small = read_small_for_hop(str(path), eight_bit_ok, known)
    assert small is not None
    return small


@pytest.mark.parametrize("large", [False, True])
def test_a_measured_body_goes_as_stored_and_unchecked(tmp_path: Path, large: bool) -> None:
    body = PLAIN + (b"x" * 70 + b"\r\n") * (SMALL_BODY // 72 + 1 if large else 1)
    sent = prepared(tmp_path, body, True, body_traits(body), large)
    with sent.file:
        assert sent.crlf_only and sent.file.read() == body


@pytest.mark.parametrize("large", [False, True])
def test_an_unmeasured_body_is_scanned_and_its_line_ends_checked(tmp_path: Path,
                                                                 large: bool) -> None:
    # Queued before traits were recorded, or with a bare LF: the encoder mends it on the wire.
    body = b"Subject: bare\n\n" + b"y" * (SMALL_BODY + 10 if large else 10) + b"\n"
    sent = prepared(tmp_path, body, True, None, large)
    with sent.file:
        assert not sent.crlf_only and sent.file.read() == body


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("measured", [False, True])
def test_what_the_hop_cannot_take_is_converted_whether_measured_or_not(
        tmp_path: Path, large: bool, measured: bool) -> None:
    padding = b"p" * 60 + b"\r\n"
    eight_bit = EIGHT_BIT + padding * (SMALL_BODY // 62 + 1 if large else 0)
    sent = prepared(tmp_path, eight_bit, False, body_traits(eight_bit) if measured else None,
                    large)
    with sent.file:
        converted = sent.file.read()
    assert converted.isascii() and b"Content-Transfer-Encoding: quoted-printable" in converted
    assert not sent.crlf_only  # converted bytes are checked on the way out as ever

    long_line = b"Subject: long\r\n\r\n" + b"z" * 2000 + b"\r\n" + padding * (
        SMALL_BODY // 62 + 1 if large else 0)
    sent = prepared(tmp_path, long_line, True, body_traits(long_line) if measured else None,
                    large)
    with sent.file:
        assert max(map(len, sent.file.read().split(b"\r\n"))) <= 998
