"""The daemon's pickup: moves relayhub-sendmail's maildrop files into the queue store.

Runs in the queue manager. It scans when the process starts, whenever the queue manager is
woken (relayhub-sendmail wakes it through the control socket when it may) and every few
seconds besides (a caller who may not use the control socket). Each file is read in a
thread, its owner's right to the envelope sender is checked again (relayhub.sendmail.
maildrop), aliases are expanded as RCPT would, a Received: field names the user, the
message is DKIM-signed as a trusted client's would be (a local user's mail is the
organisation's own), and the file is removed only after the queue store has committed
the message: a crash in between delivers a message twice, never loses it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads

from relayhub import maillog
from relayhub.aliases import LocalNames
from relayhub.config import Settings
from relayhub.dkim import build_signer, signed_commit, start_signing
from relayhub.policy import ClientContext
from relayhub.queue.store import Envelope, QueueStore, RecipientRequest
from relayhub.sendmail.maildrop import (
    Drop,
    MaildropError,
    SenderRules,
    ensure_maildrop,
    pending,
    read_drop,
    rules_for,
    stale_temporaries,
)
from relayhub.sendmail.message import normalize_input
from relayhub.smtp.headers import summarize_header

_LOG = maillog.QMGR
# A tmp. file this old belongs to a command that died before its commit.
STALE_AGE = 86400.0
# What a maildrop file may name as its protocol (anything else is written by hand: "local").
PROTOCOLS = frozenset({"local", "SMTP", "ESMTP"})
# Whoever can write the maildrop has a login on this host: as trusted as `mynetworks`.
LOCAL_USER = ClientContext("127.0.0.1", trusted=True, authenticated=False)


def pickup_received(hostname: str, uid: int, queue_id: str, now: float) -> bytes:
    """Postfix's trace field for local submission: the user is known by uid, not by name,
    as the kernel reported it."""
    return (f"Received: by {hostname} (relayhub, from userid {uid})\r\n"
            f"\tid {queue_id}; {formatdate(now, localtime=True)}\r\n").encode()


class Pickup:
    def __init__(self, settings: Settings, store: QueueStore,
                 names: Callable[[], LocalNames], reactor: Any,
                 on_queued: Callable[[str], None]) -> None:
        self.directory = Path(settings.server.state_dir) / "maildrop"
        self.hostname = settings.server.hostname
        self.max_size = settings.smtp.max_message_size + 1024 * 1024  # envelope and slack
        self.rules: SenderRules = rules_for(
            settings.server.hostname, settings.domains.local, settings.domains.masquerade,
            settings.sendmail.allow_any_sender, privileged={0, os.geteuid()})
        self.store = store
        self.signer = build_signer(settings.dkim.entries())  # the keys, checked by the config
        self.names = names
        self.reactor = reactor
        self.on_queued = on_queued
        self._scanning: defer.Deferred[None] | None = None
        self._again = False
        self._seen_mtime = -1  # the maildrop's mtime when a scan last started
        # Entries that could not be taken in nor removed (a directory someone made there):
        # skipped from then on, so that they cannot hold up the files behind them.
        self._stuck: set[str] = set()

    def scan_if_changed(self) -> defer.Deferred[None] | None:
        """Scan when the maildrop changed since the last scan: the queue manager is woken
        for every message the workers queue, and those wake-ups must stay cheap (one stat)."""
        try:
            mtime = self.directory.stat().st_mtime_ns
        except OSError:
            return None
        if mtime == self._seen_mtime and self._scanning is None:
            return None
        return self.scan()

    def prepare(self) -> None:
        """Create the maildrop (blocking but tiny: at start-up)."""
        ensure_maildrop(self.directory.parent)

    def scan(self) -> defer.Deferred[None]:
        """Take in every waiting file; a scan asked for during one runs after it."""
        if self._scanning is not None:
            self._again = True
            return self._scanning
        self._scanning = defer.Deferred.fromCoroutine(self._scan_all())

        def done(result: object) -> None:
            self._scanning = None
            if self._again:
                self._again = False
                self.scan()

        self._scanning.addErrback(lambda f: _LOG.failure("maildrop pickup failed", f))
        self._scanning.addBoth(done)
        return self._scanning

    async def _scan_all(self) -> None:
        names: list[str] = await threads.deferToThread(self._list)
        for name in names:
            if name in self._stuck:
                continue
            try:
                await self._take(name)
            except OSError as problem:
                # One bad entry must not hold up the others; the file (if it is one) stays
                # and is tried again at the next scan.
                _LOG.error("maildrop file {name} not taken in: {problem}", name=name,
                           problem=str(problem))

    def _list(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        self._seen_mtime = self.directory.stat().st_mtime_ns
        for name in stale_temporaries(self.directory, STALE_AGE, time.time()):
            (self.directory / name).unlink(missing_ok=True)
        return pending(self.directory)

    async def _take(self, name: str) -> None:
        try:
            drop: Drop = await threads.deferToThread(
                read_drop, self.directory, name, self.max_size)
        except MaildropError as problem:
            await self._discard(name, -1, str(problem))
            return
        envelope = drop.envelope
        if not self.rules.permitted(envelope.sender, drop.uid):
            await self._discard(name, drop.uid,
                                f"sender <{envelope.sender}> is not allowed for this user")
            return
        if not envelope.recipients:
            await self._discard(name, drop.uid, "no recipients")
            return
        names = self.names()
        requests: list[RecipientRequest] = []
        seen: set[str] = set()
        for address in envelope.recipients:
            request = RecipientRequest(address=address, notify=envelope.notify)
            for expanded in names.expand_request(request, null_sender=envelope.sender == ""):
                if expanded.address.lower() not in seen:
                    seen.add(expanded.address.lower())
                    requests.append(expanded)
        # relayhub-sendmail writes CRLF only; a file made by hand might not, and the queue
        # must never hold a bare CR or LF (nothing would send one onward).
        message = normalize_input(drop.message, ignore_dots=True)
        incoming = self.store.incoming()
        signing = start_signing(self.signer, LOCAL_USER, incoming.write)
        try:
            incoming.write(pickup_received(self.hostname, drop.uid, incoming.queue_id,
                                           self.reactor.seconds()))
            (incoming.write if signing is None else signing.write)(message)
        except BaseException:
            incoming.abort()
            raise
        summary = summarize_header(message[:256 * 1024])
        queued = Envelope(
            sender=envelope.sender, recipients=tuple(requests), body_type=envelope.body_type,
            smtputf8=envelope.smtputf8, ret=envelope.ret, envid=envelope.envid,
            client_name="localhost", client_address="127.0.0.1", helo=envelope.helo,
            protocol=envelope.protocol if envelope.protocol in PROTOCOLS else "local",
            auth_user=None,
        )
        await signed_commit(signing, incoming, self.reactor.seconds(),
                            lambda: incoming.commit(queued, summary.subject), _LOG)
        _LOG.info(maillog.PICKUP, queue_id=incoming.queue_id, uid=drop.uid,
                  sender=envelope.sender, size=len(message), nrcpt=len(requests))
        await threads.deferToThread((self.directory / name).unlink, missing_ok=True)
        self.on_queued(incoming.queue_id)

    async def _discard(self, name: str, uid: int, why: str) -> None:
        _LOG.warn(maillog.PICKUP_REFUSED, name=name, uid=uid, why=why)
        try:
            await threads.deferToThread((self.directory / name).unlink, missing_ok=True)
        except OSError:
            self._stuck.add(name)
