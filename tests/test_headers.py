"""Header summaries taken at receipt: hop count and the subject shown by relayhubctl."""

from __future__ import annotations

from relayhub.smtp.headers import HEADER_PREFIX_LIMIT, HeaderStage, summarize_header


def test_folded_encoded_subject_is_unfolded_and_decoded() -> None:
    summary = summarize_header(
        b"Received: from a\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n and more\r\n"
        b"X-Other: y\r\n\r\nSubject: not a header\r\nReceived: body text\r\n"
    )
    assert summary.subject == "café and more"
    assert summary.received_count == 1  # body lines do not count as hops


def test_folded_received_counts_once_and_missing_subject_is_empty() -> None:
    summary = summarize_header(b"Received: from a\r\n\tby b\r\nreceived: from c\r\n\r\n")
    assert summary == summary.__class__(received_count=2, subject="")


def staged(chunks: list[bytes], rewrite: object = None) -> tuple[bytes, object]:
    out: list[bytes] = []
    stage = HeaderStage(out.append, rewrite)  # type: ignore[arg-type]
    for chunk in chunks:
        stage.feed(chunk)
    stage.finish()
    return b"".join(out), stage.summary()


def test_header_section_is_rewritten_once_whatever_the_chunking() -> None:
    message = b"From: a@x\r\nSubject: s\r\n\r\nFrom: body line stays\r\n"
    for cut in range(1, len(message)):
        body, summary = staged([message[:cut], message[cut:]], lambda h: h.upper())
        assert body == b"FROM: A@X\r\nSUBJECT: S\r\n\r\nFrom: body line stays\r\n", cut
        assert summary.subject == "s"  # type: ignore[attr-defined]


def test_no_header_fields_and_headers_only_messages() -> None:
    assert staged([b"\r\nbody\r\n\r\nmore\r\n"], lambda h: b"X" + h)[0] == \
        b"X\r\nbody\r\n\r\nmore\r\n"  # the empty section is the one rewritten
    assert staged([b"Subject: only\r\n"], lambda h: h.lower())[0] == b"subject: only\r\n"


def test_an_endless_header_section_is_passed_on_unchanged() -> None:
    huge = b"X-Long: " + b"a" * (HEADER_PREFIX_LIMIT + 10) + b"\r\n\r\nbody\r\n"
    assert staged([huge], lambda h: b"rewritten")[0] == huge
