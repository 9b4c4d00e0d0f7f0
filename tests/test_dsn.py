"""Delivery status notifications: RFC 3464 structure and fields, RET, ORCPT, NOTIFY rules."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message

import pytest

from relayhub.delivery import dsn
from relayhub.delivery.results import AttemptResult, Outcome
from relayhub.queue.store import Envelope, RecipientRequest, RecipientStatus, StoredRecipient

ORIGINAL = (b"Received: from client (client [192.0.2.9])\r\n\tby hub (relayhub) id QID0123456\r\n"
            b"From: Alice <alice@example.org>\r\nSubject: caf\xc3\xa9\r\n\r\n"
            b"Body line\r\n.dot line\r\nna\xc3\xafve\r\n")
NOW = 1_700_000_000.0


def rcpt(index: int, address: str, orcpt: str | None = None, notify: tuple[str, ...] = ()
         ) -> StoredRecipient:
    return StoredRecipient(index, address, orcpt, notify, RecipientStatus.QUEUED)


def bounced(address: str) -> AttemptResult:
    return AttemptResult(address, Outcome.BOUNCED, "5.1.1",
                         f"550 5.1.1 <{address}>: Recipient address rejected: User unknown",
                         relay="mx.example.net[192.0.2.1]:25", remote_mta="mx.example.net",
                         remote_reply=True)


def deferred(address: str) -> AttemptResult:
    return AttemptResult.deferred(address, "4.4.1",
                                  "connect to mx.example.net[192.0.2.1]:25: Connection refused")


def delivered(address: str, relay: str = "local", dsn_relayed: bool = False) -> AttemptResult:
    return AttemptResult(address, Outcome.DELIVERED, "2.0.0", "delivered to maildir",
                         relay=relay, dsn_relayed=dsn_relayed)


def envelope(**kwargs: object) -> Envelope:
    return Envelope(sender="alice@example.org",
                    recipients=(RecipientRequest("bob@example.net"),), **kwargs)  # type: ignore[arg-type]


def report(kind: dsn.Kind, results: list[tuple[StoredRecipient, AttemptResult]],
           env: Envelope | None = None, **kwargs: object) -> tuple[bytes, EmailMessage]:
    raw = dsn.build_report(kind=kind, reporting_mta="hub.example.org", queue_id="QID0123456",
                           envelope=env or envelope(), arrival=NOW - 3600, results=results,
                           original=ORIGINAL, to="alice@example.org", now=NOW,
                           message_id_domain="hub.example.org", **kwargs)  # type: ignore[arg-type]
    return raw, email.message_from_bytes(raw, policy=email.policy.default)


def status_blocks(message: EmailMessage) -> list[Message]:
    part = list(message.iter_parts())[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [block for block in blocks if isinstance(block, Message)]


def test_failure_report_structure() -> None:
    results = [(rcpt(0, "bob@example.net"), bounced("bob@example.net"))]
    raw, message = report("failure", results)
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF throughout
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert str(message["From"]) == "Mail Delivery System <MAILER-DAEMON@hub.example.org>"
    assert message["To"] == "alice@example.org"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Message-ID"].endswith("@hub.example.org>")
    assert message["Date"]
    text, _, headers = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    explanation = text.get_content()
    assert "This is the mail system at host hub.example.org." in explanation
    assert "<bob@example.net>: host mx.example.net[192.0.2.1]:25 said: 550 5.1.1" in explanation
    per_message, per_rcpt = status_blocks(message)
    assert per_message["Reporting-MTA"] == "dns; hub.example.org"
    assert per_message["X-Relayhub-Queue-ID"] == "QID0123456"
    assert per_message["Arrival-Date"]
    assert "Original-Envelope-Id" not in per_message
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.net"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.example.net"
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1 <bob@example.net>")
    assert "Original-Recipient" not in per_rcpt
    assert headers.get_content_type() == "text/rfc822-headers"
    # The header section comes back byte for byte, the body not at all.
    assert ORIGINAL[: ORIGINAL.index(b"\r\n\r\n") + 2] in raw
    assert b"Body line" not in raw


def test_only_failed_recipients_are_reported() -> None:
    results = [
        (rcpt(0, "bob@example.net"), bounced("bob@example.net")),
        (rcpt(1, "carol@example.org"), delivered("carol@example.org")),
        (rcpt(2, "dave@example.net"), bounced("dave@example.net")),
    ]
    _, message = report("failure", dsn.recipients_to_notify("failure", results))
    finals = [block["Final-Recipient"] for block in status_blocks(message)[1:]]
    assert finals == ["rfc822; bob@example.net", "rfc822; dave@example.net"]


def test_ret_full_returns_the_whole_message_verbatim() -> None:
    results = [(rcpt(0, "bob@example.net"), bounced("bob@example.net"))]
    raw, message = report("failure", results, envelope(ret="FULL", envid="env-42"))
    returned = list(message.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert ORIGINAL in raw
    assert status_blocks(message)[0]["Original-Envelope-Id"] == "env-42"


def test_ret_full_over_the_limit_returns_headers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dsn, "FULL_BODY_LIMIT", 10)
    results = [(rcpt(0, "bob@example.net"), bounced("bob@example.net"))]
    raw, message = report("failure", results, envelope(ret="FULL"))
    assert list(message.iter_parts())[2].get_content_type() == "text/rfc822-headers"
    assert b"Body line" not in raw


def test_orcpt_becomes_original_recipient() -> None:
    results = [(rcpt(0, "bob@example.net", orcpt="rfc822;Bob@Example.NET"),
                bounced("bob@example.net"))]
    _, message = report("failure", results)
    assert status_blocks(message)[1]["Original-Recipient"] == "rfc822; Bob@Example.NET"


def test_long_diagnostics_stay_on_one_line() -> None:
    result = bounced("bob@example.net")
    result = AttemptResult(result.recipient, result.outcome, result.status, result.text * 5,
                           remote_reply=True)
    raw, message = report("failure", [(rcpt(0, "bob@example.net"), result)])
    assert f"Diagnostic-Code: smtp; {result.text}\r\n".encode() in raw
    assert status_blocks(message)[1]["Diagnostic-Code"] == f"smtp; {result.text}"


def test_own_diagnostics_are_not_labelled_smtp() -> None:
    result = AttemptResult.bounced("bob@example.net", "5.4.6", "mail forwarding loop for x")
    _, message = report("failure", [(rcpt(0, "bob@example.net"), result)])
    block = status_blocks(message)[1]
    assert block["Diagnostic-Code"] == "X-Relayhub; mail forwarding loop for x"
    assert "Remote-MTA" not in block


def test_delay_report() -> None:
    results = [(rcpt(0, "bob@example.net"), deferred("bob@example.net"))]
    _, message = report("delay", results, will_retry_until=NOW + 4 * 86400)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert "THIS IS A WARNING ONLY" in next(message.iter_parts()).get_content()
    block = status_blocks(message)[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert block["Will-Retry-Until"]


def test_success_and_relayed_reports() -> None:
    _, message = report("success", [(rcpt(0, "carol@example.org"), delivered("carol@x"))])
    assert message["Subject"] == "Successful Mail Delivery Report"
    assert status_blocks(message)[1]["Action"] == "delivered"
    relayed = delivered("bob@example.net", relay="mx[192.0.2.1]:25", dsn_relayed=True)
    _, message = report("relayed", [(rcpt(0, "bob@example.net"), relayed)])
    assert message["Subject"] == "Relayed Mail Delivery Report"
    assert status_blocks(message)[1]["Action"] == "relayed"


@pytest.mark.parametrize(("kind", "notify", "wanted"), [
    ("failure", (), True), ("failure", ("FAILURE",), True), ("failure", ("NEVER",), False),
    ("failure", ("SUCCESS", "DELAY"), False), ("delay", (), True), ("delay", ("DELAY",), True),
    ("delay", ("FAILURE",), False), ("success", (), False), ("success", ("SUCCESS",), True),
    ("relayed", ("success",), True), ("relayed", ("NEVER",), False),
])
def test_notify_rules(kind: dsn.Kind, notify: tuple[str, ...], wanted: bool) -> None:
    assert dsn.wants_notice(kind, notify) is wanted


def test_recipients_to_notify_matches_outcome_and_notify() -> None:
    never = rcpt(0, "a@x", notify=("NEVER",))
    plain = rcpt(1, "b@x")
    success = rcpt(2, "c@x", notify=("SUCCESS",))
    results = [
        (never, bounced("a@x")), (plain, bounced("b@x")), (plain, deferred("b@x")),
        (success, delivered("c@x")),
        (success, delivered("c@x", relay="mx[192.0.2.1]:25", dsn_relayed=True)),
        # A DSN-capable hop took NOTIFY along: it reports, not us.
        (success, delivered("c@x", relay="mx[192.0.2.1]:25")),
    ]
    assert dsn.recipients_to_notify("failure", results) == [results[1]]
    assert dsn.recipients_to_notify("delay", results) == [results[2]]
    assert dsn.recipients_to_notify("success", results) == [results[3]]
    assert dsn.recipients_to_notify("relayed", results) == [results[4]]


def test_report_recipient() -> None:
    assert dsn.report_recipient("failure", "alice@example.org", "postmaster@h") == (
        "alice@example.org")
    assert dsn.report_recipient("failure", "", "postmaster@h") == "postmaster@h"
    assert dsn.report_recipient("delay", "", "postmaster@h") is None
    assert dsn.report_recipient("success", "", "postmaster@h") is None
