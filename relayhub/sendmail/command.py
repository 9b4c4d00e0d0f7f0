"""`relayhub-sendmail`: the Sendmail-compatible command (SPEC §8) for cron, mail(1), git
send-email and every other local program that runs /usr/sbin/sendmail.

It works whether the daemon runs or not: the message goes into the maildrop
(relayhub.sendmail.maildrop) and the command exits 0 only once it is durable there; a
running daemon is woken through the control socket when the caller may use it, and picks
the message up within seconds otherwise (relayhub.sendmail.pickup).

Exit statuses are sysexits(3), as callers of sendmail expect: 0 done, 64 (EX_USAGE) a bad
command line or no recipients, 65 (EX_DATAERR) a message over [smtp].max_message_size, 75
(EX_TEMPFAIL) the maildrop cannot be written (try again later), 77 (EX_NOPERM) an envelope
sender the caller may not use, 78 (EX_CONFIG) a configuration problem.
"""

from __future__ import annotations

import os
import pwd
import secrets
import socket
import sys
import time
from pathlib import Path

from twisted.protocols import amp

from relayhub import control
from relayhub.config import ConfigError, Settings, load_settings
from relayhub.sendmail.maildrop import (
    DropEnvelope,
    DropWriter,
    SenderRules,
    ensure_maildrop,
    maildrop_path,
    pending,
    rules_for,
)
from relayhub.sendmail.message import prepare_message
from relayhub.sendmail.options import SendmailOptions, UsageError, parse_options

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# How long a running daemon gets to acknowledge our wake-up call.
WAKE_TIMEOUT = 2.0


class SendmailError(Exception):
    """Ends the command with `status` after printing the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def say(text: str) -> None:
    print(f"relayhub-sendmail: {text}", file=sys.stderr)


def calling_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


def sender_rules(settings: Settings) -> SenderRules:
    return rules_for(settings.server.hostname, settings.domains.local,
                     settings.domains.masquerade, settings.sendmail.allow_any_sender)


def full_name_of_caller() -> str | None:
    try:
        gecos = pwd.getpwuid(os.getuid()).pw_gecos.split(",")[0].strip()
    except KeyError:
        return None
    return gecos or None


def deliver(options: SendmailOptions, settings: Settings, stdin: bytes) -> str:
    """Prepare and drop one message; its maildrop token. Raises SendmailError."""
    rules = sender_rules(settings)
    sender = options.sender if options.sender is not None else \
        rules.default_sender(calling_user())
    if not rules.permitted(sender, os.getuid()):
        raise SendmailError(EX_NOPERM, f"sender <{sender}> is not allowed: only root may "
                            f"send as an address outside {', '.join(sorted(rules.own_domains()))}"
                            " ([sendmail] allow_any_sender)")
    prepared = prepare_message(
        stdin, ignore_dots=options.ignore_dots, extract_recipients=options.extract_recipients,
        sender=sender, full_name=options.full_name or full_name_of_caller(),
        hostname=settings.server.hostname, now=time.time(), unique=secrets.token_hex(12))
    recipients: list[str] = []
    for address in (*options.recipients, *prepared.recipients):
        qualified = rules.qualify(address.strip())
        if qualified and qualified not in recipients:
            recipients.append(qualified)
    if not recipients:
        raise SendmailError(EX_USAGE, "no recipient addresses found")
    if len(prepared.data) > settings.smtp.max_message_size:
        raise SendmailError(EX_DATAERR, f"message too big ({len(prepared.data)} bytes; "
                            f"the limit is {settings.smtp.max_message_size})")
    body_type = options.body_type or (
        "8BITMIME" if any(b > 0x7F for b in prepared.data) else "7BIT")
    envelope = DropEnvelope(
        sender=sender, recipients=tuple(recipients), body_type=body_type,
        smtputf8=not all(a.isascii() for a in (sender, *recipients)),
        notify=options.notify, ret=options.ret, envid=options.envid)
    return drop(settings, prepared.data, envelope)


def open_maildrop(settings: Settings) -> Path:
    state_dir = settings.server.state_dir
    if not state_dir.is_dir():
        raise SendmailError(EX_TEMPFAIL, f"no state directory {state_dir}: start relayhub "
                            "once to create it")
    try:
        return ensure_maildrop(state_dir) if os.geteuid() == 0 or os.access(
            state_dir, os.W_OK) else maildrop_path(state_dir)
    except OSError as problem:
        raise SendmailError(EX_TEMPFAIL, f"cannot create the maildrop: {problem}") from None


def drop(settings: Settings, data: bytes, envelope: DropEnvelope) -> str:
    directory = open_maildrop(settings)
    try:
        writer = DropWriter(directory)
    except OSError as problem:
        raise SendmailError(EX_TEMPFAIL, f"cannot write to {directory}: {problem.strerror}"
                            ) from None
    try:
        writer.write(data)
        writer.commit(envelope)
    except OSError as problem:
        writer.abort()
        raise SendmailError(EX_TEMPFAIL, f"cannot write to {directory}: {problem.strerror}"
                            ) from None
    return writer.token


def maildrop_count(state_dir: Path) -> int:
    """Messages dropped and not yet picked up (0 when we may not look, as non-root)."""
    try:
        return len(pending(maildrop_path(state_dir)))
    except OSError:
        return 0


def wake_daemon(state_dir: Path) -> bool:
    """Ask a running daemon to look at once; False when there is none or we may not ask
    (the socket is for the service user and root): it then polls within seconds."""
    box = amp.AmpBox({b"_command": control.Wake.commandName, b"_ask": b"1"})
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as channel:
            channel.settimeout(WAKE_TIMEOUT)
            channel.connect(str(control.socket_path(state_dir)))
            channel.sendall(box.serialize())
            return bool(channel.recv(4096))
    except OSError:
        return False


def run(argv: list[str], stdin: bytes | None = None) -> int:
    try:
        options = parse_options(argv)
    except UsageError as problem:
        say(str(problem))
        return EX_USAGE
    try:
        settings = load_settings(options.config)
    except ConfigError as problem:
        say(str(problem))
        return EX_CONFIG
    if options.verbose and options.ignored:
        say(f"ignored: {' '.join(options.ignored)}")
    if options.mode in ("list", "flush"):
        from relayhub.admin.cli import run as relayhubctl

        words = ["queue", "list"] if options.mode == "list" else ["queue", "flush"]
        status = relayhubctl([*(["-c", options.config] if options.config else []), *words])
        if options.mode == "list":
            waiting = maildrop_count(settings.server.state_dir)
            if waiting:
                print(f"({waiting} message{'s' * (waiting != 1)} in the maildrop, not yet "
                      "picked up by relayhub)")
        return status
    if options.mode == "newaliases":
        print("relayhub re-reads its aliases file by itself; nothing to do")
        return EX_OK
    if options.mode == "smtp":
        from relayhub.sendmail.stdio import serve

        return serve(settings, options)
    try:
        token = deliver(options, settings,
                        sys.stdin.buffer.read() if stdin is None else stdin)
    except SendmailError as problem:
        say(str(problem))
        return problem.status
    woken = wake_daemon(settings.server.state_dir)
    if options.verbose:
        say(f"queued as maildrop/{token}; relayhub "
            + ("was notified" if woken else "picks it up within seconds (or when it starts)"))
    return EX_OK


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:]))
