"""Header summaries taken at receipt: hop count and the subject shown by relayhubctl."""

from __future__ import annotations

from relayhub.smtp.headers import summarize_header


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
