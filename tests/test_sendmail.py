"""relayhub-sendmail: option parsing and message preparation (pure), and the command against
a real daemon: delivery to a Maildir and to a sink, with the daemon down, -bs, a non-root
caller, mailx and git send-email."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnsserver import DNSServer
from hubprocess import Hub, free_port
from smtpsink import SMTPSink

from relayhub.sendmail.maildrop import SenderRules
from relayhub.sendmail.message import prepare_message
from relayhub.sendmail.options import UsageError, parse_options

SENDMAIL = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).resolve().parent.parent / ".venv")
                ) / "bin" / "relayhub-sendmail"
SINK_HOST = "127.0.0.21"
REPO = Path(__file__).resolve().parent.parent
# Another user cannot run our interpreter when it lives under /root (pyenv): run Debian's,
# on this checkout and the virtual environment's packages (the same Python minor version).
SYSTEM_PYTHON = Path("/usr/bin/python3")


def as_user(user: str) -> list[str]:
    """The command line prefix that runs relayhub-sendmail as `user`."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip("Debian's python3 is needed to run the command as another user")
    site = next((Path(sys.prefix) / "lib").glob("python3*/site-packages"))
    return ["runuser", "-u", user, "--", "env", f"PYTHONPATH={REPO}:{site}",
            str(SYSTEM_PYTHON), "-m", "relayhub.sendmail"]

# ----------------------------------------------------------------------------- options


def test_options_as_callers_write_them() -> None:
    options = parse_options(["-t", "-oi", "-f", "me@x.org", "-FMe Myself", "bob"])
    assert options.extract_recipients and options.ignore_dots
    assert options.sender == "me@x.org" and options.full_name == "Me Myself"
    assert options.recipients == ("bob",)
    assert parse_options(["-ti"]).ignore_dots
    assert parse_options(["-f<>", "-i", "a@b"]).sender == ""
    assert parse_options(["-bs"]).mode == "smtp"
    assert parse_options(["-bp"]).mode == "list"
    assert parse_options(["-q"]).mode == "flush"
    assert parse_options(["-q30m"]).mode == "flush"


def test_unknown_sendmail_options_are_ignored_as_postfix_does() -> None:
    options = parse_options(["-oem", "-odi", "-oQ/var/spool", "-B", "8BITMIME", "-N",
                             "failure,delay", "-R", "hdrs", "-V", "env1", "-X", "/tmp/log",
                             "-G", "-U", "-om", "-v", "--", "a@b"])
    assert options.recipients == ("a@b",)
    assert options.body_type == "8BITMIME" and options.notify == ("DELAY", "FAILURE")
    assert options.ret == "HDRS" and options.envid == "env1" and options.verbose
    assert "-oem" in options.ignored and "-X /tmp/log" in options.ignored


@pytest.mark.parametrize("argv", [[], ["-f"], ["-bv", "a@b"], ["-N", "never,success", "a"]])
def test_unusable_command_lines_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_options(argv)


# ----------------------------------------------------------------------------- message


def prepare(raw: bytes, **options: object) -> tuple[bytes, tuple[str, ...]]:
    values: dict[str, object] = {
        "ignore_dots": False, "extract_recipients": True, "sender": "root@hub.test",
        "full_name": None, "hostname": "hub.test", "now": 0.0, "unique": "u1"}
    values.update(options)
    prepared = prepare_message(raw, **values)  # type: ignore[arg-type]
    return prepared.data, prepared.recipients


def test_t_takes_to_cc_bcc_and_removes_bcc() -> None:
    data, recipients = prepare(
        b"To: A <a@x.org>, b@y.org\nCc: c@z.org\nBcc: hidden@x.org,\n secret@y.org\n"
        b"Subject: hi\n\nbody\n")
    assert recipients == ("a@x.org", "b@y.org", "c@z.org", "hidden@x.org", "secret@y.org")
    assert b"Bcc" not in data and b"secret" not in data
    assert data.startswith(b"To: A <a@x.org>, b@y.org\r\nCc: c@z.org\r\nSubject: hi\r\n"
                           b"From: root@hub.test\r\nDate: Thu, 01 Jan 1970 ")
    assert data.endswith(b"\r\nMessage-ID: <u1@hub.test>\r\n\r\nbody\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_existing_from_date_message_id_are_kept_and_full_name_is_used() -> None:
    data, _ = prepare(b"From: x@y\nDate: today\nMessage-ID: <m@y>\n\nb\n")
    assert data == b"From: x@y\r\nDate: today\r\nMessage-ID: <m@y>\r\n\r\nb\r\n"
    data, _ = prepare(b"Subject: s\n\nb\n", full_name="Jörg Root")
    assert b"From: =?utf-8?q?J=C3=B6rg_Root?= <root@hub.test>\r\n" in data


def test_a_dot_line_ends_input_unless_i() -> None:
    assert prepare(b"Subject: s\n\nline\n.\nafter\n")[0].endswith(b"\r\nline\r\n")
    assert prepare(b"Subject: s\n\nline\n.\nafter\n", ignore_dots=True)[0].endswith(
        b"\r\nline\r\n.\r\nafter\r\n")


def test_mbox_from_line_and_bare_cr_and_no_header() -> None:
    data, _ = prepare(b"From root Thu Jan 1\nSubject: s\r\n\r\na\rb\n")
    assert data.startswith(b"Subject: s\r\n") and data.endswith(b"\r\n\r\na\r\nb\r\n")
    data, _ = prepare(b"just a body line\n")
    assert data.endswith(b"Message-ID: <u1@hub.test>\r\n\r\njust a body line\r\n")


def test_sender_rules() -> None:
    rules = SenderRules("host.dept.example.org", ("example.org", "localhost"),
                        ("example.org",), allow_any_sender=False)
    assert rules.default_sender("alice") == "alice@example.org"
    assert rules.permitted("anyone@elsewhere.example", 0)
    assert rules.permitted("alice@example.org", 1000)
    assert rules.permitted("alice@host.dept.example.org", 1000)
    assert rules.permitted("", 1000)
    assert not rules.permitted("ceo@bank.example", 1000)
    assert not rules.permitted("nodomain", 1000)
    assert rules.qualify("root") == "root@example.org"
    anyone = SenderRules("h.example", (), allow_any_sender=True)
    assert anyone.permitted("ceo@bank.example", 1000)


# ----------------------------------------------------------------------------- daemon


def smtp_dialogue(hub: Hub, steps: list[tuple[bytes, int]], user: str | None = None
                  ) -> list[str]:
    """Run -bs, sending each step's bytes after the replies to the previous one (as real
    callers do: before EHLO nothing may be pipelined) and reading its number of replies;
    every reply line, in order."""
    program = [str(SENDMAIL)] if user is None else as_user(user)
    command = [*program, "-C", str(hub.config_path), "-bs"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               cwd=hub.directory)
    stdin, stdout = process.stdin, process.stdout
    assert stdin is not None and stdout is not None
    lines: list[str] = []

    def read_reply() -> None:
        while True:
            line = stdout.readline().decode().rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return

    try:
        read_reply()  # the greeting
        for data, replies in steps:
            stdin.write(data)
            stdin.flush()
            for _reply in range(replies):
                read_reply()
        stdin.close()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    return lines


def sendmail(hub: Hub, *argv: str, stdin: bytes = b"", user: str | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    program = [str(SENDMAIL)] if user is None else as_user(user)
    command = [*program, "-C", str(hub.config_path), *argv]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=timeout,
                          cwd=hub.directory)


@pytest.fixture
def dns(reactor_thread: object) -> Iterator[DNSServer]:
    with DNSServer(reactor_thread, {"sink.example": {"A": [SINK_HOST]}}) as server:
        yield server


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user may reach (the non-root tests run the command as nobody)."""
    path = Path(tempfile.mkdtemp(prefix="relayhub-sendmail-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sink(reactor_thread: object) -> Iterator[SMTPSink]:
    with SMTPSink(reactor_thread, host=SINK_HOST, port=free_port(SINK_HOST)) as server:
        yield server


def open_to_users(hub: Hub) -> Hub:
    """Wait until the queue manager has made the maildrop (it may come after the banner)."""
    drop = hub.state_dir / "maildrop"
    hub.wait(lambda: drop.is_dir() and drop.stat().st_mode & 0o7777 == 0o1733)
    return hub


def make_hub(base: Path, dns: DNSServer, sink: SMTPSink, **sendmail: object) -> Hub:
    return Hub(base, {
        "server": {"hostname": "hub.test"},
        "domains": {"local": ["localhost", "hub.test", "example.org"]},
        "delivery": {"nameservers": [f"127.0.0.1:{dns.port}"], "smtp_port": sink.port,
                     "tls": "none", "retry_min": "1s", "retry_max": "2s"},
        "sendmail": dict(sendmail),
    })


def test_t_oi_delivers_to_a_maildir_and_to_a_sink(base: Path, dns: DNSServer,
                                                  sink: SMTPSink) -> None:
    hub = make_hub(base, dns, sink).start()
    try:
        message = (b"To: postmaster@localhost, far@sink.example\nBcc: hidden@sink.example\n"
                   b"Subject: via sendmail\n\nline one\n.\nstill body\n")
        done = sendmail(hub, "-t", "-oi", stdin=message)
        assert done.returncode == 0, done.stderr
        [local] = hub.wait(lambda: hub.mailbox("postmaster"))
        assert local["Subject"] == "via sendmail" and local["Bcc"] is None
        assert local["From"].addresses[0].addr_spec == "root@hub.test" and local["Message-ID"]
        assert "(relayhub, from userid 0)" in local["Received"]
        assert local.get_content().replace("\r\n", "\n") == "line one\n.\nstill body\n"
        [remote] = sink.wait_messages(1)
        assert remote.mail_from.startswith("MAIL FROM:<root@hub.test>")
        assert sorted(remote.accepted) == ["far@sink.example", "hidden@sink.example"]
        assert remote.body is not None and b"\r\n\r\nline one\r\n.\r\nstill body\r\n" in \
            remote.body
        assert b"Bcc" not in remote.body
        hub.wait_for_log("uid=0 from=<root@hub.test>", "nrcpt=3 (pickup)")
    finally:
        hub.stop()


def test_with_the_daemon_stopped_mail_waits_in_the_maildrop(base: Path, dns: DNSServer,
                                                            sink: SMTPSink) -> None:
    hub = make_hub(base, dns, sink).start()
    hub.stop()
    started = time.monotonic()
    done = sendmail(hub, "-i", "-f", "cron@hub.test", "postmaster",
                    stdin=b"Subject: while down\n\nx\n")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10
    assert len(list((hub.state_dir / "maildrop").iterdir())) == 1
    assert not hub.mailbox("postmaster")
    listing = sendmail(hub, "-bp")
    assert listing.returncode == 0 and b"1 message in the maildrop" in listing.stdout, listing
    hub.start()
    try:
        [mail] = hub.wait(lambda: hub.mailbox("postmaster"))
        assert mail["Subject"] == "while down"
        assert mail["Return-Path"] == "<cron@hub.test>"
        assert not list((hub.state_dir / "maildrop").iterdir())
    finally:
        hub.stop()


def test_bs_speaks_smtp_on_stdin_and_stdout(base: Path, dns: DNSServer,
                                            sink: SMTPSink) -> None:
    hub = make_hub(base, dns, sink).start()
    try:
        replies = smtp_dialogue(hub, [
            (b"EHLO me\r\n", 1),
            (b"MAIL FROM:<root@hub.test>\r\nRCPT TO:<postmaster@localhost>\r\nDATA\r\n", 3),
            (b"Subject: over bs\r\n\r\nhi\r\n.\r\n", 1), (b"QUIT\r\n", 1)])
        assert replies[0] == "220 hub.test ESMTP relayhub"
        assert "250-PIPELINING" in replies
        assert any(r.startswith("250 2.0.0 Ok: queued as ") for r in replies), replies
        assert replies[-1].startswith("221 "), replies
        [mail] = hub.wait(lambda: hub.mailbox("postmaster"))
        assert mail["Subject"] == "over bs"
    finally:
        hub.stop()


def test_a_non_root_user_cannot_forge_a_remote_sender(base: Path, dns: DNSServer,
                                                      sink: SMTPSink) -> None:
    hub = open_to_users(make_hub(base, dns, sink).start())
    try:
        forged = sendmail(hub, "-f", "ceo@bank.example", "-i", "postmaster", user="nobody",
                          stdin=b"Subject: forged\n\nx\n")
        assert forged.returncode == 77, forged
        assert b"sender <ceo@bank.example> is not allowed" in forged.stderr
        # -bs: refused at the end of data.
        replies = smtp_dialogue(hub, [
            (b"EHLO me\r\n", 1),
            (b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<postmaster@localhost>\r\nDATA\r\n", 3),
            (b"Subject: forged\r\n\r\nx\r\n.\r\n", 1), (b"QUIT\r\n", 1)], user="nobody")
        assert "553 5.7.1 <ceo@bank.example>: Sender address not allowed for this user" in \
            replies, "\n".join(replies)
        # Junk in the maildrop (a directory, a FIFO, a symbolic link) holds nothing up.
        drop = hub.state_dir / "maildrop"
        subprocess.run(["runuser", "-u", "nobody", "--", "sh", "-c",
                        f"mkdir {drop}/adir && mkfifo {drop}/afifo && "
                        f"ln -s /etc/shadow {drop}/alink"], check=True)
        # Its own address works, and the trace names the user the kernel reported.
        own = sendmail(hub, "-i", "postmaster", user="nobody", stdin=b"Subject: own\n\nx\n")
        assert own.returncode == 0, own.stderr
        [mail] = hub.wait(lambda: hub.mailbox("postmaster"))
        assert mail["Subject"] == "own" and mail["Return-Path"] == "<nobody@hub.test>"
        assert "(relayhub, from userid 65534)" in mail["Received"]
        hub.wait_for_log("alink from uid=-1 discarded: cannot open",
                         "afifo from uid=-1 discarded: not a regular file",
                         "adir from uid=-1 discarded: not a regular file")
        # A maildrop file written by hand with a forged sender is discarded by the pickup.
        assert oct(drop.stat().st_mode & 0o7777) == "0o1733"
        forged_file = b'Subject: by hand\r\n\r\nx\r\n'
        envelope = b'{"sender": "ceo@bank.example", "recipients": ["postmaster@localhost"]}'
        subprocess.run(["runuser", "-u", "nobody", "--", "sh", "-c",
                        f"cat > {drop}/handmade"], check=True,
                       input=forged_file + envelope + b"%015d\n" % len(envelope))
        hub.wait_for_log("discarded: sender <ceo@bank.example> is not allowed")
        assert len(hub.mailbox("postmaster")) == 1
    finally:
        hub.stop()


def test_allow_any_sender_lets_users_choose(base: Path, dns: DNSServer, sink: SMTPSink) -> None:
    hub = open_to_users(make_hub(base, dns, sink, allow_any_sender=True).start())
    try:
        done = sendmail(hub, "-f", "list@lists.example", "-i", "postmaster", user="nobody",
                        stdin=b"Subject: as list\n\nx\n")
        assert done.returncode == 0, done.stderr
        [mail] = hub.wait(lambda: hub.mailbox("postmaster"))
        assert mail["Return-Path"] == "<list@lists.example>"
    finally:
        hub.stop()


def test_bp_lists_and_q_flushes(base: Path, dns: DNSServer, sink: SMTPSink) -> None:
    hub = make_hub(base, dns, sink).start()
    try:
        listing = sendmail(hub, "-bp")
        assert listing.returncode == 0, listing.stderr
        flush = sendmail(hub, "-q")
        assert flush.returncode == 0, flush.stderr
    finally:
        hub.stop()


def test_exit_statuses_are_sysexits(tmp_path: Path) -> None:
    config = tmp_path / "relayhub.toml"
    config.write_text(f'[server]\nhostname = "hub.test"\nstate_dir = "{tmp_path / "none"}"\n')

    def status(*argv: str, stdin: bytes = b"Subject: x\n\nx\n") -> int:
        return subprocess.run([str(SENDMAIL), *argv], input=stdin, capture_output=True,
                              timeout=30).returncode

    assert status("-C", str(config), "-bv", "a@b") == 64  # EX_USAGE
    assert status("-C", str(config), "-t", stdin=b"Subject: nobody\n\nx\n") == 64
    assert status("-C", str(config), "postmaster") == 75  # EX_TEMPFAIL: no state directory
    broken = tmp_path / "broken.toml"
    broken.write_text("[smtp]\nnonsense = 1\n")
    assert status("-C", str(broken), "postmaster") == 78  # EX_CONFIG


# ----------------------------------------------------------------------------- real callers


def test_mailx_sends_through_it(base: Path, dns: DNSServer, sink: SMTPSink) -> None:
    mailx = shutil.which("bsd-mailx") or shutil.which("mailx")
    if mailx is None:
        pytest.skip("bsd-mailx is not installed (.ci/run installs it)")
    hub = make_hub(base, dns, sink).start()
    try:
        wrapper = base / "sendmail-wrapper"
        wrapper.write_text(f'#!/bin/sh\nexec {SENDMAIL} -C {hub.config_path} "$@"\n')
        wrapper.chmod(0o755)
        # bsd-mailx runs `sendmail -i -t` (its `sendmail` variable names the program).
        mailrc = base / "mailrc"
        mailrc.write_text(f"set sendmail={wrapper}\n")
        done = subprocess.run(
            [mailx, "-s", "from mailx", "postmaster@localhost"],
            input=b"hello from mailx\n", capture_output=True, timeout=30,
            env=dict(os.environ, HOME=str(base), MAILRC=str(mailrc)), cwd=base)
        assert done.returncode == 0, done.stderr
        [mail] = hub.wait(lambda: hub.mailbox("postmaster"))
        assert mail["Subject"] == "from mailx"
        assert mail.get_content().replace("\r\n", "\n") == "hello from mailx\n"
    finally:
        hub.stop()


def test_git_send_email_sends_through_it(base: Path, dns: DNSServer, sink: SMTPSink) -> None:
    git = shutil.which("git")
    if git is None or subprocess.run([git, "send-email", "--help"], capture_output=True
                                     ).returncode not in (0, 1):
        pytest.skip("git send-email is not installed (git-email; .ci/run installs it)")
    hub = make_hub(base, dns, sink).start()
    try:
        patch = base / "0001-change.patch"
        patch.write_text(
            "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
            "From: Dev <root@hub.test>\nDate: Thu, 3 Dec 2026 10:00:00 +0000\n"
            "Subject: [PATCH] a change\n\n---\n file | 1 +\n\ndiff --git a/file b/file\n"
            "--- a/file\n+++ b/file\n@@ -0,0 +1 @@\n+.\n")
        done = subprocess.run(
            [git, "-c", f"sendemail.sendmailCmd={SENDMAIL} -C {hub.config_path}",
             "send-email", "--confirm=never", "--to=postmaster@example.org",
             "--from=Dev <root@hub.test>", "--suppress-cc=all", str(patch)],
            capture_output=True, timeout=60, cwd=base,
            env=dict(os.environ, HOME=str(base), GIT_CONFIG_NOSYSTEM="1",
                     GIT_COMMITTER_NAME="Dev", GIT_COMMITTER_EMAIL="root@hub.test",
                     GIT_AUTHOR_NAME="Dev", GIT_AUTHOR_EMAIL="root@hub.test"))
        assert done.returncode == 0, done.stderr + done.stdout
        [mail] = hub.wait(lambda: [m for m in hub.mailbox("postmaster")
                                   if m["Subject"] == "[PATCH] a change"])
        assert "\n+.\n" in mail.get_content().replace("\r\n", "\n")
    finally:
        hub.stop()
