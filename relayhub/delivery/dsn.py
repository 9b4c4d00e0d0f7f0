"""RFC 3464 delivery status notifications: who gets one (RFC 3461 NOTIFY) and the report."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from email import policy as email_policy
from email.headerregistry import Address
from email.message import Message, MIMEPart
from email.policy import EmailPolicy
from email.utils import formatdate
from typing import Any, Literal

from relayhub.delivery.results import AttemptResult, Outcome
from relayhub.queue.store import Envelope, StoredRecipient

Kind = Literal["failure", "delay", "success", "relayed"]
Result = tuple[StoredRecipient, AttemptResult]

# RET=FULL bodies above this come back as headers only (as Postfix does), so a bounce never
# costs more than this to build, queue and send back.
FULL_BODY_LIMIT = 10 * 1024 * 1024

SUBJECTS: dict[str, str] = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
    "relayed": "Relayed Mail Delivery Report",
}
# What may not stand in a header field value: controls (the email package takes VT, FF and
# friends for line ends and refuses them) and Unicode line separators.
_NOT_IN_FIELD = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def field_text(text: str, utf8: bool) -> str:
    """A remote server's reply text made fit for a field: it is the peer's free text and
    may hold anything; non-ASCII is kept only in an SMTPUTF8 report (RFC 6533)."""
    # "=?" would start an RFC 2047 encoded-word, which the email package decodes in the
    # value and then may fail to fold back into ASCII: the peer's text is not ours to decode.
    text = _NOT_IN_FIELD.sub(" ", text).replace("=?", "= ?")
    return text if utf8 else text.encode("ascii", "replace").decode("ascii")


_ACTIONS: dict[str, str] = {
    "failure": "failed", "delay": "delayed", "success": "delivered", "relayed": "relayed",
}
_NOTIFY_KEYWORD: dict[str, str] = {
    "failure": "FAILURE", "delay": "DELAY", "success": "SUCCESS", "relayed": "SUCCESS",
}
_INTRO: dict[str, str] = {
    "failure": (
        "I'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients. It's attached below.\n\n"
        "For further assistance, please send mail to postmaster.\n\n"
        "If you do so, please include this problem report. You can\n"
        "delete your own text from the attached returned message."
    ),
    "delay": (
        "####################################################################\n"
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
        "####################################################################\n\n"
        "Your message could not be delivered for {hours:.1f} hours.\n"
        "It will be retried until {until}."
    ),
    "success": (
        "Your message was successfully delivered to the destination(s)\n"
        "listed below. If the message was delivered to mailbox you will\n"
        "receive no further notifications. Otherwise you may still receive\n"
        "notifications of mail delivery errors from other systems."
    ),
    "relayed": (
        "Your message was successfully delivered to the destination(s)\n"
        "listed below, which do not return delivery status notifications.\n"
        "You may still receive notifications of mail delivery errors from\n"
        "other systems."
    ),
}


def wants_notice(kind: Kind, notify: tuple[str, ...]) -> bool:
    """RFC 3461 NOTIFY: without NOTIFY, failures and delays are reported (Postfix's default);
    NEVER suppresses everything; success (and relayed) only when asked for."""
    keywords = {word.upper() for word in notify}
    if not keywords:
        return kind in ("failure", "delay")
    return _NOTIFY_KEYWORD[kind] in keywords


def recipients_to_notify(kind: Kind, results: Sequence[Result]) -> list[Result]:
    """The results a report of `kind` covers: the right outcome, and NOTIFY asks for it.

    "success" is final delivery here (local Maildir); "relayed" is delivery to a hop that
    does not speak DSN. Delivery to a DSN-capable hop is in neither: NOTIFY went on with the
    message, so that hop reports.
    """
    def covered(result: AttemptResult) -> bool:
        if kind == "failure":
            return result.outcome is Outcome.BOUNCED
        if kind == "delay":
            return result.outcome is Outcome.DEFERRED
        if result.outcome is not Outcome.DELIVERED:
            return False
        return result.dsn_relayed if kind == "relayed" else result.relay == "local"

    return [(rcpt, result) for rcpt, result in results
            if covered(result) and wants_notice(kind, rcpt.notify)]


def report_recipient(kind: Kind, envelope_sender: str, postmaster: str) -> str | None:
    """Where a report goes: the envelope sender; for null-sender mail, failures go to
    `postmaster` (SPEC §4) and nothing else is reported."""
    if envelope_sender:
        return envelope_sender
    return postmaster if kind == "failure" else None


def build_report(*, kind: Kind, reporting_mta: str, queue_id: str, envelope: Envelope,
                 arrival: float, results: Sequence[Result], original: bytes, to: str,
                 now: float, message_id_domain: str,
                 will_retry_until: float | None = None) -> bytes:
    """A `multipart/report; report-type=delivery-status` message (CRLF line ends).

    Parts: a human explanation, `message/delivery-status` with one block per entry of
    `results` (the caller picks them, e.g. with `recipients_to_notify`), and the original's
    header section as `text/rfc822-headers`, or the whole of `original` as `message/rfc822`
    when RET=FULL and it is at most FULL_BODY_LIMIT. `Diagnostic-Code` is `smtp;` for a
    remote reply and `X-Relayhub;` for our own text (RFC 3464 §2.3.6: "smtp" means an SMTP
    reply; Postfix likewise writes `X-Postfix;`). `will_retry_until` (epoch) fills
    Will-Retry-Until in delay reports. The report is 7-bit unless `original` or an
    address is not; a non-ASCII `to` needs SMTPUTF8 to send.
    """
    # Fields are folded only past 998 octets: at 78 the `email` folder may break right after
    # the colon, and DSN readers are not all ready for a value that starts on the next line.
    policy = (email_policy.SMTP if to.isascii() else email_policy.SMTPUTF8).clone(
        max_line_length=998)
    msg = MIMEPart(policy=policy)
    msg["From"] = Address("Mail Delivery System", "MAILER-DAEMON", reporting_mta)
    msg["To"] = to
    msg["Subject"] = SUBJECTS[kind]
    msg["Date"] = formatdate(now, localtime=True)
    msg["Message-ID"] = f"<{int(now)}.{queue_id}.{secrets.token_hex(6)}@{message_id_domain}>"
    msg["Auto-Submitted"] = "auto-replied"
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = "multipart/report; report-type=delivery-status"
    msg.attach(_explanation(kind, reporting_mta, results, arrival, now, will_retry_until,
                            policy))
    msg.attach(_status_part(kind, reporting_mta, queue_id, envelope, arrival, results,
                            will_retry_until, policy))
    # The generator re-encodes or refuses 8-bit message/rfc822 text, so the original goes in
    # verbatim after flattening, in place of a placeholder, under a boundary it lacks.
    placeholder = f"relayhub-original-{secrets.token_hex(16)}"
    original_part, content = _original_part(envelope, original, placeholder, policy)
    msg.attach(original_part)
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{reporting_mta}"
    while boundary.encode() in content:
        boundary = f"{queue_id}.{secrets.token_hex(8)}/{reporting_mta}"
    msg.set_boundary(boundary)
    return msg.as_bytes().replace(placeholder.encode(), content, 1)


def _explanation(kind: Kind, reporting_mta: str, results: Sequence[Result], arrival: float,
                 now: float, will_retry_until: float | None,
                 policy: EmailPolicy[Any]) -> MIMEPart:
    until = formatdate(will_retry_until, localtime=True) if will_retry_until else "it expires"
    intro = _INTRO[kind].format(hours=(now - arrival) / 3600, until=until)
    lines = [f"This is the mail system at host {reporting_mta}.", "", intro, "",
             "                   The mail system", ""]
    for rcpt, result in results:
        said = field_text(result.text, True)
        if result.remote_reply:
            lines.append(f"<{rcpt.address}>: host {result.relay} said: {said}")
        else:
            lines.append(f"<{rcpt.address}>: {said}")
    text = "\n".join(lines) + "\n"
    part = MIMEPart(policy=policy)
    part.set_content(text, cte=None if text.isascii() else "quoted-printable")
    part["Content-Description"] = "Notification"
    return part


def _status_part(kind: Kind, reporting_mta: str, queue_id: str, envelope: Envelope,
                 arrival: float, results: Sequence[Result], will_retry_until: float | None,
                 policy: EmailPolicy[Any]) -> MIMEPart:
    per_message = Message(policy=policy)
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Relayhub-Queue-ID"] = queue_id
    per_message["X-Relayhub-Sender"] = f"rfc822; {envelope.sender}"
    if envelope.envid:
        per_message["Original-Envelope-Id"] = envelope.envid
    per_message["Arrival-Date"] = formatdate(arrival, localtime=True)
    blocks: list[Message[str, str] | str] = [per_message]
    for rcpt, result in results:
        block = Message(policy=policy)
        block["Final-Recipient"] = f"rfc822; {rcpt.address}"
        if rcpt.orcpt and ";" in rcpt.orcpt:
            addr_type, _, addr = rcpt.orcpt.partition(";")
            block["Original-Recipient"] = f"{addr_type.strip()}; {addr.strip()}"
        action = _ACTIONS[kind]
        if kind == "success" and result.dsn_relayed:
            action = "relayed"
        block["Action"] = action
        block["Status"] = result.status
        if result.remote_mta:
            block["Remote-MTA"] = f"dns; {result.remote_mta}"
        diagnostic_type = "smtp" if result.remote_reply else "X-Relayhub"
        block["Diagnostic-Code"] = f"{diagnostic_type}; {field_text(result.text, policy.utf8)}"
        if kind == "delay" and will_retry_until is not None:
            block["Will-Retry-Until"] = formatdate(will_retry_until, localtime=True)
        blocks.append(block)
    part = MIMEPart(policy=policy)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    part.set_payload(blocks)  # the generator writes message/delivery-status from the blocks
    return part


def _original_part(envelope: Envelope, original: bytes, placeholder: str,
                   policy: EmailPolicy[Any]) -> tuple[MIMEPart, bytes]:
    """Part 3 with `placeholder` as its body, and the bytes that replace it."""
    part = MIMEPart(policy=policy)
    full = (envelope.ret or "").upper() == "FULL" and len(original) <= FULL_BODY_LIMIT
    if full:
        content = original
        part["Content-Type"] = "message/rfc822"
        part["Content-Description"] = "Undelivered Message"
    else:
        end = original.find(b"\r\n\r\n")
        content = original if end < 0 else original[: end + 2]
        part["Content-Type"] = "text/rfc822-headers"
        part["Content-Description"] = "Undelivered Message Headers"
    # message/* may only be 7bit, 8bit or binary (RFC 2046 §5.2.1): the bytes go out as
    # they are, labelled for what they hold.
    longest = max(map(len, content.split(b"\r\n")), default=0)
    part["Content-Transfer-Encoding"] = (
        "binary" if longest > 998 else "7bit" if content.isascii() else "8bit")
    part.set_payload(placeholder)
    return part, content
