"""MIME conversion: the RFC 6152 downgrade keeps content and untouched bytes, and leaves
nothing 8-bit or over 998 octets on the wire; body traits are read in bounded chunks."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayhub import mime
from relayhub.mime import (
    BodyMeter,
    BodyTraits,
    body_traits,
    decode_for_display,
    has_8bit_headers,
    limit_line_length,
    to_7bit,
)

HEADERS = (b"Received: from a (a [192.0.2.1])\r\n\tby hub (relayhub) with ESMTP id ABCDEFGHIJ\r\n"
           b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\n"
           b"Subject:   odd  spacing\r\n  and a fold\r\nX-Weird:no-space\r\n")

# Lines without CR/LF (they are what the line ends are made of) and without surrogates.
line_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
                    max_size=1500)
texts = st.lists(line_text, min_size=1, max_size=8).map(lambda lines: "\r\n".join(lines)
                                                        + "\r\n")


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def assert_wire_safe(data: bytes) -> None:
    assert data.isascii()
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def header_section(data: bytes) -> bytes:
    return data[: data.index(b"\r\n\r\n") + 2]


@settings(max_examples=60, deadline=None)
@given(texts)
def test_text_plain_message_downgrades_to_the_same_text(text: str) -> None:
    original = (HEADERS + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text.encode())
    converted = to_7bit(original)
    assert_wire_safe(converted)
    assert parse(converted).get_content() == text
    # Only the encoding label may change; every other header byte stays.
    assert header_section(converted).replace(
        b"Content-Transfer-Encoding: quoted-printable\r\n", b"Content-Transfer-Encoding: 8bit\r\n"
    ) == header_section(original) or converted == original


@settings(max_examples=40, deadline=None)
@given(texts, st.binary(max_size=3000))
def test_multipart_with_8bit_text_and_binary_attachment(text: str, blob: bytes) -> None:
    boundary = b"==b0und4ry=="
    plain = b"Content-Type: text/plain\r\n\r\nseven bit part\r\n"
    original = (
        HEADERS + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\""
        + boundary + b"\"\r\n\r\npreamble\r\n--" + boundary + b"\r\n" + plain
        + b"\r\n--" + boundary + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text.encode()
        + b"\r\n--" + boundary + b"\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: binary\r\n\r\n" + blob
        + b"\r\n--" + boundary + b"--\r\n"
    )
    converted = to_7bit(original)
    assert_wire_safe(converted)
    assert header_section(converted) == header_section(original)
    assert plain in converted  # the 7-bit part is byte-identical
    parts = list(parse(converted).iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "text/plain", "application/octet-stream"]
    assert parts[1].get_content() == text
    assert parts[2].get_content() == blob


@settings(max_examples=40, deadline=None)
@given(texts)
def test_non_mime_message_gets_mime_headers(text: str) -> None:
    original = HEADERS + b"\r\n" + text.encode()
    converted = to_7bit(original)
    assert_wire_safe(converted)
    if text.isascii() and max(map(len, text.split("\r\n"))) <= 998:
        assert converted == original
        return
    message = parse(converted)
    assert message["MIME-Version"] == "1.0"
    assert message.get_content_charset() == "utf-8"
    assert message.get_content() == text
    assert converted.startswith(HEADERS)  # added fields go after the original ones


def test_non_utf8_bytes_are_labelled_unknown_8bit() -> None:
    converted = to_7bit(HEADERS + b"\r\nLatin-1: \xe9t\xe9\r\n")
    assert b"charset=unknown-8bit" in converted
    assert parse(converted).get_payload(decode=True) == b"Latin-1: \xe9t\xe9\r\n"


def test_seven_bit_message_is_returned_unchanged() -> None:
    original = HEADERS + b"\r\nplain ASCII\r\n"
    assert to_7bit(original) is original
    assert limit_line_length(original) is original


def test_long_lines_are_reencoded_only_where_they_are() -> None:
    long_line = b"x" * 2000 + b"\r\n"
    eight_bit = "caf\u00e9\r\n".encode()
    original = (
        HEADERS + b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=B\r\n"
        b"\r\n--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit"
        b"\r\n\r\n" + eight_bit + b"\r\n--B\r\nContent-Type: text/html\r\n\r\n" + long_line
        + b"\r\n--B--\r\n"
    )
    converted = limit_line_length(original)
    assert max(len(line) for line in converted.split(b"\r\n")) <= 998
    assert eight_bit in converted  # an 8BITMIME hop takes that part as it is
    html = list(parse(converted).iter_parts())[1]
    assert html["Content-Transfer-Encoding"] == "quoted-printable"
    assert html.get_content() == long_line.decode()


def test_base64_without_line_breaks_is_rewrapped() -> None:
    import base64
    blob = bytes(range(256)) * 10
    original = (b"MIME-Version: 1.0\r\nContent-Type: application/pdf\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(blob) + b"\r\n")
    converted = limit_line_length(original)
    assert_wire_safe(converted)
    assert parse(converted).get_content() == blob


def test_attached_message_is_converted_inside() -> None:
    inner = b"Subject: inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nna\xc3\xafve\r\n"
    original = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
                b"--B\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                + inner + b"\r\n--B--\r\n")
    converted = to_7bit(original)
    assert_wire_safe(converted)
    attached = next(parse(converted).iter_parts())
    assert attached["Content-Transfer-Encoding"] == "7bit"
    assert attached.get_content().get_content() == "na\u00efve\r\n"


def test_long_header_lines_are_folded_at_white_space() -> None:
    long_subject = b"Subject: " + b" ".join([b"word"] * 400) + b"\r\n"
    converted = to_7bit(long_subject + b"\r\nbody\r\n")
    assert_wire_safe(converted)
    assert parse(converted)["Subject"] == " ".join(["word"] * 400)


def test_8bit_headers_are_left_for_the_caller() -> None:
    original = b"Subject: caf\xc3\xa9\r\n\r\nbody caf\xc3\xa9\r\n"
    converted = to_7bit(original)
    assert converted.startswith(b"Subject: caf\xc3\xa9\r\n")
    assert has_8bit_headers(original)
    assert not has_8bit_headers(b"Subject: x\r\n\r\nbody caf\xc3\xa9\r\n")
    assert not has_8bit_headers(b"Subject: x\r\n\r\nbody\r\n")


@pytest.mark.parametrize("chunked", [False, True])
def test_body_traits(tmp_path: Path, chunked: bool) -> None:
    # The longest line straddles the 64 KiB chunk boundary; the last one has no line end.
    data = b"a" * 100 + b"\r\n" + b"b" * 70000 + b"\r\n" + b"c" * 1500 + b"\r\n" + b"d"
    source: bytes | Path = data
    if chunked:
        source = tmp_path / "body"
        source.write_bytes(data)
    assert body_traits(source) == BodyTraits(has_8bit=False, longest_line=70000)
    assert body_traits(b"x\r\n\xff\r\n") == BodyTraits(has_8bit=True, longest_line=1)
    assert body_traits(b"") == BodyTraits(has_8bit=False, longest_line=0)


def test_body_traits_crlf_split_across_chunks(tmp_path: Path) -> None:
    data = b"a" * 65535 + b"\r\n" + b"b" * 10 + b"\r\n"  # CR last byte of chunk 1, LF first of 2
    path = tmp_path / "body"
    path.write_bytes(data)
    assert body_traits(path).longest_line == 65535


@given(st.binary(max_size=300).map(lambda b: b.translate(bytes.maketrans(
    bytes(range(256)), (b"a\r\n\xff" * 64)))), st.lists(st.integers(1, 40), max_size=10))
def test_body_traits_in_any_chunking_is_the_line_by_line_definition(
        data: bytes, cuts: list[int]) -> None:
    """Longest line: split at LF, a CR right before the LF not counted; the same however
    the body is cut into chunks (a CRLF split between two of them too)."""
    lines = data.split(b"\n")
    longest = max(len(line) - (line.endswith(b"\r") and i < len(lines) - 1)
                  for i, line in enumerate(lines))
    chunks, position = [], 0
    for cut in cuts:
        chunks.append(data[position:position + cut])
        position += cut
    chunks.append(data[position:])
    assert mime._scan(c for c in chunks if c) == BodyTraits(not data.isascii(), longest)


@given(st.binary(max_size=300).map(lambda b: b.translate(bytes.maketrans(
    bytes(range(256)), (b"a\r\n\xff" * 64)))), st.lists(st.integers(0, 40), max_size=10),
       st.sampled_from([b"", b"DKIM-Signature: v=1;\r\n\tb=xyz\r\n", b"X: \xff\r\n",
                        b"X: no line end", b"X: bare\n"]))
def test_body_meter_gives_the_traits_of_crlf_only_bodies_and_nothing_else(
        data: bytes, cuts: list[int], front: bytes) -> None:
    """What the queue records at acceptance: `body_traits` of the whole stored body (front
    fields prepended after the rest was written) when every line end in it is a CRLF, in
    any chunking; None as soon as there is a bare CR or LF."""
    meter = BodyMeter()
    position = 0
    for cut in cuts:
        meter.update(data[position:position + cut])
        position += cut
    meter.update(data[position:])
    if front:
        meter.prepend(front)
    whole = front + data
    crlf_only = whole.count(b"\r") == whole.count(b"\n") == whole.count(b"\r\n")
    # A front without its last CRLF would join the body's first line: not recorded either.
    expected = (body_traits(whole) if crlf_only and (not front or front.endswith(b"\r\n"))
                else None)
    assert meter.traits() == expected



def test_decode_for_display_still_works() -> None:
    assert decode_for_display("=?utf-8?q?caf=C3=A9?=") == "caf\u00e9"


def test_preamble_part_without_headers_and_epilogue() -> None:
    original = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
                b"pr\xc3\xa9amble\r\n--B\r\n\r\nno headers, caf\xc3\xa9\r\n--B--\r\n"
                b"epilogue \xff\r\n")
    converted = to_7bit(original)
    assert_wire_safe(converted)
    assert b"pr??amble\r\n--B\r\n" in converted and converted.endswith(b"epilogue ?\r\n")
    part = next(parse(converted).iter_parts())
    assert part.get_content_charset() == "utf-8"
    assert part.get_content() == "no headers, caf\u00e9"
