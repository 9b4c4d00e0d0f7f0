"""Interop with a real Postfix (Debian's, as private throw-away instances on loopback):
relayhub delivers to it through the transport map, and it relays through relayhub as its
relayhost into a local Maildir."""

from __future__ import annotations

import datetime
import email
import email.policy
import functools
import re
import shutil
import smtplib
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import ReactorThread
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hubprocess import Hub, Queue

from bench.postfix import POSTFIX, PostfixInstance

pytestmark = pytest.mark.skipif(
    not Path(POSTFIX).exists(),
    reason=f"{POSTFIX} is missing: install Debian's postfix package (.ci/run does)",
)

T = TypeVar("T")

POSTMASTER = "postmaster@localhost"
DOWNSTREAM = "downstream.example"
MAILBOX = f"user@{DOWNSTREAM}"
SENDMAIL = "/usr/sbin/sendmail"
# Postfix's hostname in the bench instance, and the relayhub Hub's; both show up in
# Received: fields, which is how the tests tell the two hops apart.
POSTFIX_NAME = "postfix.bench.invalid"
HUB_NAME = "hub.test"

# A body that exercises what an MTA hop may damage: a leading dot on the first line and
# later (dot-stuffing must be undone by each receiver), a lone "." inside the text,
# trailing white space, and an empty line.
BODY_LINES = [
    ".first line starts with a dot",
    "second line",
    ".",
    "..two dots",
    "trailing space   ",
    "",
    "last line",
]


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 20.0,
             diagnostics: Callable[[], str] = lambda: "") -> T:
    """Poll `condition` until it returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                                 f"{diagnostics()}")
        time.sleep(0.1)


def wait_log(log: Callable[[], str], pattern: str, what: str,
             diagnostics: Callable[[], str]) -> re.Match[str]:
    """Wait until a line of `log` matches `pattern`; return the match (group 0: the line)."""
    line = re.compile(rf"^.*{pattern}.*$", re.MULTILINE)

    def search() -> re.Match[str] | None:
        return line.search(log())

    return wait_for(search, what, diagnostics=diagnostics)


@contextmanager
def running_hub(directory: Path, overrides: Mapping[str, Mapping[str, Any]]) -> Iterator[Hub]:
    """A relayhub daemon that is stopped whatever happens inside the block."""
    directory.mkdir(parents=True, exist_ok=True)
    hub = Hub(directory, overrides)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A throw-away certificate and key for Postfix's smtpd (PEM files in directory)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)  # Postfix reads it as root before dropping privileges
    return cert_path, key_path


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def body_lines(raw: bytes) -> list[str]:
    """The body of a stored message as text lines, whatever the line ends (Postfix's
    virtual(8) writes LF, relayhub's Maildir CRLF)."""
    _header, _sep, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    return body.decode().split("\n")[:-1]  # the last line end leaves one empty piece


def hub_mailbox(hub: Hub, user: str) -> list[bytes]:
    new = hub.state_dir / "mail" / user / "new"
    return [f.read_bytes() for f in sorted(new.iterdir())] if new.is_dir() else []


def received(message: EmailMessage) -> list[str]:
    """The Received: fields, topmost (latest hop) first, unfolded."""
    return [" ".join(str(v).split()) for v in message.get_all("Received", [])]


def submit(port: int, sender: str, recipient: str, subject: str) -> str:
    """Send BODY_LINES with smtplib and return the queue ID from the 250 reply."""
    text = f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n\r\n"
    text += "".join(line + "\r\n" for line in BODY_LINES)
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=15) as client:
        # data() dot-stuffs the text itself; its 250 reply names the queue ID.
        client.ehlo()
        client.mail(sender)
        code, reply = client.rcpt(recipient)
        assert code == 250, reply
        code, reply = client.data(text.encode())
    assert code == 250, reply
    return queue_id_of(reply.decode())


def queue_id_of(reply: str) -> str:
    """The ID in "250 2.0.0 Ok: queued as ID" (relayhub and Postfix word it alike)."""
    match = re.search(r"queued as ([0-9A-Za-z]+)", reply)
    assert match, reply
    return match.group(1)


@pytest.mark.parametrize("tls", ["none", "opportunistic"])
def test_relayhub_delivers_to_postfix_via_transport_map(
        reactor_thread: ReactorThread, tmp_path: Path, tls: str) -> None:
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed (.ci/run installs it from Debian)")
    cert, key = self_signed(tmp_path / "tls", POSTFIX_NAME)
    # Postfix offers STARTTLS in both runs, so "none" also shows relayhub declining it.
    # catchall=False: any other downstream.example address is refused at RCPT with 550.
    with PostfixInstance(
        domains=[DOWNSTREAM], mailboxes=[MAILBOX], catchall=False, max_lifetime=300,
        main_cf={"smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
                 "smtpd_tls_key_file": str(key), "smtpd_tls_loglevel": "1"},
    ) as pf, running_hub(tmp_path / "hub", {
        "routing": {"transport": {DOWNSTREAM: f"[127.0.0.1]:{pf.port}"}},
        "delivery": {"tls": tls, "retry_min": "1s", "retry_max": "2s"},
    }) as hub:
        def logs() -> str:
            return (f"--- relayhub log ---\n{hub.log()[-3000:]}\n"
                    f"--- postfix log ---\n{pf.log_text()[-3000:]}")

        queue = Queue(reactor_thread, hub.state_dir)
        smtplib_id = submit(hub.smtp_port, POSTMASTER, MAILBOX, "via smtplib")
        swaks = subprocess.run(
            ["swaks", "--server", "127.0.0.1", "--port", str(hub.smtp_port),
             "--helo", "swaks.test", "--from", POSTMASTER, "--to", MAILBOX,
             "--header", "Subject: via swaks", "--body", "\n".join(BODY_LINES),
             "--timeout", "15"],
            capture_output=True, text=True, timeout=30, check=False)
        assert swaks.returncode == 0, swaks.stdout + swaks.stderr
        swaks_id = queue_id_of(swaks.stdout)

        # virtual(8) writes into tmp/ and renames into new/: a file there is complete.
        wait_for(lambda: len(pf.messages(MAILBOX)) >= 2, "both messages in Postfix's Maildir",
                 diagnostics=logs)
        files = pf.messages(MAILBOX)
        assert len(files) == 2
        by_subject = {parse(f.read_bytes())["Subject"]: f.read_bytes() for f in files}
        assert set(by_subject) == {"via smtplib", "via swaks"}

        for subject, hub_id in (("via smtplib", smtplib_id), ("via swaks", swaks_id)):
            raw = by_subject[subject]
            message = parse(raw)
            assert message["Delivered-To"] == MAILBOX
            assert message["Return-Path"] == f"<{POSTMASTER}>"
            trace = received(message)
            # Postfix's hop is on top of ours; its protocol says whether TLS was used.
            postfix_hop, hub_hop = trace[0], trace[1]
            assert f"by {POSTFIX_NAME} (Postfix)" in postfix_hop, trace
            assert f"from {HUB_NAME} " in postfix_hop, trace
            protocol = "ESMTPS" if tls == "opportunistic" else "ESMTP"
            match = re.search(rf"with {protocol} id ([0-9A-Za-z]+)", postfix_hop)
            assert match, trace
            postfix_id = match.group(1)
            assert f"by {HUB_NAME} (relayhub) with ESMTP id {hub_id}" in hub_hop, trace
            # The body came through two dot-stuffing hops (client -> relayhub -> Postfix)
            # unchanged.  swaks itself puts one empty line after --body (checked on the wire:
            # "...last line\r\n\r\n.\r\n"), so its copy has that line too.
            extra = [""] if subject == "via swaks" else []
            assert body_lines(raw) == BODY_LINES + extra

            # relayhub's attempt line names the hop from the transport map and quotes
            # Postfix's 250 with Postfix's own queue ID...
            line = wait_log(hub.log, rf"{hub_id}: to=<{re.escape(MAILBOX)}>",
                            f"relayhub's log line for {hub_id}", logs).group(0)
            assert f"relay=127.0.0.1[127.0.0.1]:{pf.port}," in line, line
            assert "dsn=2.0.0" in line, line
            # Postfix answers BDAT LAST (relayhub sends BDAT: Postfix offers CHUNKING) with
            # "Ok: <n> bytes queued as ID".
            assert re.search(rf"status=sent \(250 2\.0\.0 Ok: (\d+ bytes )?queued as "
                             rf"{postfix_id}\)", line), line
            # ... and Postfix logged the same ID arriving from us and reaching the Maildir.
            wait_log(pf.log_text, rf"{postfix_id}: to=<{re.escape(MAILBOX)}>, relay=virtual, "
                     r".*status=sent \(delivered to maildir\)",
                     f"Postfix's log line delivering {postfix_id}", logs)

        if tls == "opportunistic":
            assert "TLS connection established from" in pf.log_text(), logs()
        else:
            # Postfix's disconnect line would count "starttls=1" had we sent STARTTLS.
            assert "TLS connection established" not in pf.log_text(), logs()
            assert "starttls=" not in pf.log_text(), logs()

        # Both messages have left relayhub's queue: every recipient is final.
        wait_for(lambda: not queue.ids(), "relayhub's queue to be empty", diagnostics=logs)

        # A recipient Postfix does not know: its 550 at RCPT bounces back to the sender.
        unknown = f"nobody@{DOWNSTREAM}"
        bounced_id = submit(hub.smtp_port, POSTMASTER, unknown, "to nobody")

        def bounce() -> EmailMessage | None:
            for raw in hub_mailbox(hub, "postmaster"):
                message = parse(raw)
                if message.get_content_type() == "multipart/report":
                    return message
            return None

        report = wait_for(bounce, "the bounce in relayhub's postmaster Maildir",
                          diagnostics=logs)
        assert report.get_param("report-type") == "delivery-status"
        status = next(p for p in report.walk()
                      if p.get_content_type() == "message/delivery-status")
        groups = [dict(part.items()) for part in status.get_payload()]  # type: ignore[union-attr]
        [fields] = groups[1:]
        assert fields["Final-Recipient"] == f"rfc822; {unknown}"
        assert fields["Action"] == "failed"
        assert fields["Status"] == "5.1.1"
        assert "smtp; 550 5.1.1" in fields["Diagnostic-Code"]
        assert "User unknown" in fields["Diagnostic-Code"]
        assert bounced_id in report.as_string()
        wait_log(hub.log, rf"{bounced_id}: to=<{re.escape(unknown)}>, .*dsn=5\.1\.1, "
                 r"status=bounced \(550 5\.1\.1 ", f"relayhub's log line bouncing {bounced_id}",
                 logs)
        wait_for(lambda: not queue.ids(), "relayhub's queue to be empty after the bounce",
                 diagnostics=logs)
        assert pf.messages(unknown) == []


def test_postfix_relays_through_relayhub_as_relayhost(tmp_path: Path) -> None:
    alice = "alice@example.org"  # example.org is one of the Hub's local domains
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}secret:Alice Example\n")
    with running_hub(tmp_path / "hub", {"users": {"file": str(users)}}) as hub, \
            PostfixInstance(
                # Postfix's own (virtual) domain is one neither test address uses, so it
                # treats localhost and example.org as remote and hands them to its relayhost
                # (mydestination is empty in the bench instance, so "localhost" is not ours).
                domains=["postfix.test"], relayhost=("127.0.0.1", hub.smtp_port),
                max_lifetime=300,
            ) as pf:
        def logs() -> str:
            return (f"--- relayhub log ---\n{hub.log()[-3000:]}\n"
                    f"--- postfix log ---\n{pf.log_text()[-3000:]}")

        # Two ways into Postfix: SMTP to its smtpd, and the local sendmail(1) -> pickup path.
        postfix_id = submit(pf.port, "bob@postfix.test", alice, "into postfix")
        text = "Subject: via sendmail\n\n" + "".join(line + "\n" for line in BODY_LINES)
        sendmail = subprocess.run(
            [SENDMAIL, "-C", str(pf.config_dir), "-f", "root@postfix.test", "-i", POSTMASTER],
            input=text, capture_output=True, text=True, timeout=30, check=False)
        assert sendmail.returncode == 0, sendmail.stdout + sendmail.stderr

        for user, address, sender, subject in (
                ("alice", alice, "bob@postfix.test", "into postfix"),
                ("postmaster", POSTMASTER, "root@postfix.test", "via sendmail")):
            [raw] = wait_for(functools.partial(hub_mailbox, hub, user),
                             f"the message in relayhub's {user} Maildir", diagnostics=logs)
            message = parse(raw)
            assert message["Subject"] == subject
            assert message["Delivered-To"] == address
            assert message["Return-Path"] == f"<{sender}>"
            assert body_lines(raw) == BODY_LINES
            trace = received(message)
            hub_hop, postfix_hop = trace[0], trace[1]
            # Our stamp names Postfix's EHLO; Postfix's says "with ESMTP" for the SMTP
            # submission and "(Postfix, from userid 0)" with no protocol for sendmail(1).
            assert f"from {POSTFIX_NAME} " in hub_hop, trace
            match = re.search(rf"by {HUB_NAME} \(relayhub\) with ESMTP id ([0-9A-Za-z]+)",
                              hub_hop)
            assert match, trace
            hub_id = match.group(1)
            match = re.search(rf"by {POSTFIX_NAME} \(Postfix[^)]*\)(?: with ESMTP)? "
                              r"id ([0-9A-Za-z]+)", postfix_hop)
            assert match, trace
            if subject == "into postfix":
                assert match.group(1) == postfix_id
            # Postfix logs our 250 with our queue ID; we log the local delivery.
            wait_log(pf.log_text,
                     rf"to=<{re.escape(address)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:"
                     rf"{hub.smtp_port}, .*status=sent \(250 2\.0\.0 Ok: queued as {hub_id}\)",
                     f"Postfix's log line relaying {hub_id}", logs)
            wait_log(hub.log, rf"{hub_id}: to=<{re.escape(address)}>, relay=local, .*status=sent",
                     f"relayhub's log line delivering {hub_id}", logs)
        wait_for(lambda: pf.queue_size() == 0, "Postfix's queue to be empty",
                 diagnostics=logs)
