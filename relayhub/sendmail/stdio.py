"""`relayhub-sendmail -bs`: an SMTP dialogue on standard input and output, served by
relayhub's own SMTP server protocol, with the maildrop as its queue.

The local user is a trusted client (like Postfix's `sendmail -bs`): any recipient is taken
(aliases and unknown local users are dealt with by the pickup, as for other local mail),
while the envelope sender is held to the same rules as `-f` (refused at the end of DATA,
`553 5.7.1`, since the server protocol has no sender hook).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from twisted.internet import defer, threads
from twisted.internet.stdio import StandardIO
from twisted.python.failure import Failure

from relayhub.address import ForwardPath, Mailbox
from relayhub.config import Settings
from relayhub.errors import MessageRefused, TemporaryFailure
from relayhub.policy import ClientContext
from relayhub.queue.store import Envelope, IncomingMessage, QueueStore
from relayhub.sendmail.maildrop import DropEnvelope, DropWriter, SenderRules
from relayhub.sendmail.options import SendmailOptions
from relayhub.smtp.server import ServerConfig, SMTPServerFactory, SMTPServerProtocol


class LocalPolicy:
    """The acceptance policy for the local user: trusted, every recipient taken."""

    local_domains: tuple[str, ...] = ()

    def is_trusted(self, ip: str) -> bool:
        return True

    def check_recipient(self, path: ForwardPath, client: ClientContext) -> Mailbox:
        return path.mailbox or Mailbox("postmaster", "localhost")


class AlwaysAdmit:
    """One session on a pipe: no connection limits apply."""

    def admit(self, service: str, address: str, exempt: bool) -> defer.Deferred[str]:
        return defer.succeed("")

    def release(self, service: str, address: str) -> None:
        pass


class DropIncoming(IncomingMessage):
    """A message received over -bs, written into the maildrop."""

    def __init__(self, directory: Path, rules: SenderRules) -> None:
        self._writer = DropWriter(directory)
        self.queue_id = "maildrop" + self._writer.token[:12]
        self._rules = rules

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def commit(self, envelope: Envelope, subject: str = "") -> defer.Deferred[None]:
        if not self._rules.permitted(envelope.sender, os.getuid()):
            self._writer.abort()
            return defer.fail(MessageRefused(
                553, "5.7.1", f"<{envelope.sender}>: Sender address not allowed for this user"))
        drop = DropEnvelope(
            sender=envelope.sender, recipients=tuple(r.address for r in envelope.recipients),
            body_type=envelope.body_type, smtputf8=envelope.smtputf8,
            notify=envelope.recipients[0].notify if envelope.recipients else (),
            ret=envelope.ret, envid=envelope.envid, protocol=envelope.protocol,
            helo=envelope.helo)
        committed: defer.Deferred[Any] = threads.deferToThread(self._writer.commit, drop)

        def failed(failure: Failure) -> Failure:
            self._writer.abort()
            return Failure(TemporaryFailure()) if failure.check(OSError) else failure

        return committed.addCallbacks(lambda _: None, failed)

    def abort(self) -> None:
        self._writer.abort()


class MaildropQueue:
    """The one QueueStore method the SMTP server protocol calls: `incoming`."""

    def __init__(self, directory: Path, rules: SenderRules) -> None:
        self.directory = directory
        self.rules = rules

    def incoming(self) -> IncomingMessage:
        try:
            return DropIncoming(self.directory, self.rules)
        except OSError:
            raise TemporaryFailure() from None


class _StdioSession(SMTPServerProtocol):
    """Stops the reactor when the dialogue ends."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        if reason is None:
            super().connectionLost()
        else:
            super().connectionLost(reason)
        from twisted.internet import reactor

        if reactor.running:
            reactor.stop()


def serve(settings: Settings, options: SendmailOptions) -> int:
    """Run one SMTP session on stdin/stdout; the exit status."""
    from twisted.internet import reactor

    from relayhub.sendmail.command import (
        EX_OK,
        SendmailError,
        open_maildrop,
        say,
        sender_rules,
        wake_daemon,
    )

    try:
        directory = open_maildrop(settings)
    except SendmailError as problem:
        say(str(problem))
        return problem.status
    # A pipe has no address to look up.
    smtp = replace(settings.smtp, reverse_dns=False)
    config = ServerConfig(settings.server.hostname, smtp)
    queue = cast(QueueStore, MaildropQueue(directory, sender_rules(settings)))
    factory = SMTPServerFactory(
        config, cast(Any, LocalPolicy()), queue, reactor, AlwaysAdmit(),
        service="sendmail", on_queued=lambda _id: None)
    session = _StdioSession(config, factory.policy, queue)
    session.factory = factory
    StandardIO(session)
    reactor.run()
    wake_daemon(settings.server.state_dir)  # after the dialogue: it may take seconds
    return EX_OK
