"""Every failure the fuzzing found (bench/fuzz.py, tests/test_fuzz.py), as the concrete input
that showed it; each failed before its fix."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator

import pytest

from bench.fuzz_targets import Fixture, SMTPTarget, check_smtp_output, dsn_code, mime_code
from relayhub.delivery import dsn
from relayhub.delivery.results import AttemptResult, Outcome
from relayhub.mime import decode_for_display, to_7bit
from relayhub.queue.store import Envelope, RecipientRequest, RecipientStatus, StoredRecipient


@pytest.fixture(scope="module")
def fixture() -> Iterator[Fixture]:
    fixture = Fixture()
    yield fixture
    fixture.close()


def test_subject_with_a_non_ascii_charset_name(fixture: Fixture) -> None:
    """`=?ut\\xfc-8?q?x?=`: the email package raised CharsetError (not a ValueError) from
    decode_for_display at the end of DATA, so the session died without a reply."""
    assert decode_for_display("=?ut\ufffd-8?q?x?=") == "=?ut\ufffd-8?q?x?="
    output = SMTPTarget(fixture).run(
        b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.org>\r\n"
        b"DATA\r\nSubject: =?ut\xfc-8?q?x?=\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert b"250 2.0.0 Ok: queued as " in output
    assert b"221 2.0.0 " in output


@pytest.mark.parametrize("text", [
    "C\x04ntent\x0bType: multipart/alternative",  # VT: a line break to the email package
    "550 5.1.1 caf\u00e9 unknown",  # non-ASCII to an ASCII address (a guard: this one worked)
    "550 5.1.1 a\u2028b\x85c",
])
def test_dsn_with_a_hostile_remote_reply(text: str) -> None:
    """A remote server's reply text is its own free text: it went into Diagnostic-Code as it
    was and build_report raised (ValueError, UnicodeEncodeError), so no bounce was made."""
    rcpt = StoredRecipient(0, "bob@example.net", None, (), RecipientStatus.QUEUED)
    result = AttemptResult("bob@example.net", Outcome.BOUNCED, "5.1.1", text,
                           relay="mx.example.net[192.0.2.1]:25", remote_mta="mx.example.net",
                           remote_reply=True)
    raw = dsn.build_report(kind="failure", reporting_mta="hub.example.org",
                           queue_id="QID0123456",
                           envelope=Envelope("alice@example.org",
                                             (RecipientRequest("bob@example.net"),)),
                           arrival=1.7e9, results=[(rcpt, result)],
                           original=b"Subject: x\r\n\r\nbody\r\n", to="alice@example.org",
                           now=1.7e9 + 60, message_id_domain="hub.example.org")
    assert raw.isascii()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    status = list(message.iter_parts())[1].get_payload()[1]  # type: ignore[index]
    assert status["Diagnostic-Code"].startswith("smtp; ")
    dsn_code(text.encode())  # and the fuzz target's own checks


def test_tenth_error_answered_after_a_delay_closes_cleanly(fixture: Fixture) -> None:
    """Nine unknown commands, then a failed AUTH whose 535 comes after the failure delay: that
    tenth error closed the session, and the server then resumed reading the closed
    transport (RuntimeError from the transport, an unhandled error in the log)."""
    target = SMTPTarget(fixture)
    with target.watch.watching():
        output = target.run(b"EHLO client.test\r\n" + b"XYZZY\r\n" * 9
                            + b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n")
    target.watch.check()
    check_smtp_output(output)
    assert output.endswith(b"535 5.7.8 Error: authentication failed\r\n"
                           b"421 4.7.0 hub.fuzz Error: too many errors\r\n")


def test_multipart_boundary_the_email_package_cannot_give_back() -> None:
    """Found by bench/fuzz.py (mime, seed 1): the header section starts with a folded
    line, so the boundary the email package returns holds U+FFFD, and to_7bit raised
    UnicodeEncodeError (a relay to a 7-bit hop would have failed on it each retry)."""
    found = (b' \r\nContent-Type: multipart/mixed; boundary="\xb1"\r\n\r\n'
             b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: x\r\n"
             b'--"q"--\r\n--"q"@-\r\n--"q"\r\nContent-Type: multipart/\xdeixed; boundary="q"\r\n')
    mime_code(found)
    converted = to_7bit(found)
    assert converted.split(b"\r\n\r\n", 1)[1].isascii()  # header bytes stay as they were
    assert b"Content-Transfer-Encoding: base64" in converted  # one opaque part


def test_dsn_with_an_encoded_word_in_the_remote_reply() -> None:
    """Found by bench/fuzz.py (dsn, seed 1): the reply text held `=?utf-8?b?w6k=?=`, which
    the email package decoded inside Diagnostic-Code and then could not fold back into an
    ASCII report (UnicodeEncodeError): no bounce could be built."""
    found = (b'Content-Type: multipart/alternative\r\nlontent-Type: multipart/mixed; boundary="q'
             b'"\r\nContent-Type: multipart/mixed; boundary="q"\r\na\rb\nc\r\nSubject: caf\xc3'
             b'\xa9 =?utf-8?b?w6k=?= =?x?q?bad?=\r\n\r\ncaf\xc3\xa9\r\nSubject: caf\xc3\xa9 =?ut'
             b'f-8?b?w6\x0e=?= =?x?q?bad?=\r\nContent-T\x18ansfer-Encoding: x\r\ncaf\xc3\xa9\r\n'
             b'--"q"--\r\n \r\nContent-Transfer-Encoding: 8bit\r\n=\r\nContent-Type: multipart/a'
             b'lternative\r\n \r\n\x00\xe2\x82\xac\xc3\xbf\xe2\x82\xac\xc3\xa9\xc3\xbf\x00\xc3'
             b'\xa9a\x00\xe2\x80\x8b\xf0\x9d\x84\x9e\xc3\xbf\x00\xe2\x80\x8b\xe2\x82\xac\xf0\x9d'
             b'\x84\x9e\xc3\xa9\x00\xe2\x80\x8b\xc3\xbf\xf0\x9d\x84\x9ea\xf0\x9d\x84\x9e')
    dsn_code(found)
