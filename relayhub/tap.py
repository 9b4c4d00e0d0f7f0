"""twistd plugin options and the service tree that `twistd relayhub` runs."""

from __future__ import annotations

import os
import sys
from typing import Any, ClassVar

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from relayhub import control
from relayhub.aliases import AliasDatabase, AliasWatcher, LocalNames
from relayhub.config import ConfigError, Settings, load_settings
from relayhub.delivery.local import MaildirCourier
from relayhub.delivery.manager import QueueManager
from relayhub.delivery.notices import QueueNotifier
from relayhub.delivery.relay import RelayCourier
from relayhub.dns import MXResolver
from relayhub.policy import AcceptancePolicy
from relayhub.queue.sqlite import SQLiteQueueStore
from relayhub.queue.store import QueueStore
from relayhub.routing import Router
from relayhub.smtp.client import TLSPolicy
from relayhub.smtp.server import ServerConfig, SMTPServerFactory
from relayhub.users import UserDatabase, UsersFileError

_LOG = Logger(namespace="relayhub")

# A body file with no queue entry after this long belongs to a session that died mid-DATA
# (the SMTP timeout bounds how long a live session can take to commit one).
ORPHAN_AGE = 3600.0


class Options(usage.Options):
    synopsis = "[-c CONFIG]"
    longdesc = (
        "Runs the relayhub mail hub. Without -c, $RELAYHUB_CONFIG, then "
        "/etc/relayhub/relayhub.toml, then the built-in defaults apply."
    )
    optParameters: ClassVar[list[list[str | None]]] = [
        ["config", "c", None, "configuration file (TOML)"],
    ]

    settings: Settings

    def postOptions(self) -> None:
        try:
            self.settings = load_settings(self["config"])
        except ConfigError as error:
            # One line per problem and exit 1; a traceback helps no administrator here.
            sys.stderr.write(f"{error}\n")
            raise SystemExit(1) from None


class HubService(MultiService):
    """The single-process hub: queue store, SMTP listeners and the queue manager.

    Listening sockets are bound in privilegedStartService (before twistd drops root), but
    sessions are refused with 421 and the queue manager waits until the store has opened.
    """

    def __init__(self, settings: Settings, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.settings = settings
        self._reactor = reactor
        self._started_at = reactor.seconds()
        self.store: QueueStore = SQLiteQueueStore(settings.server.state_dir,
                                                  close_on_shutdown=False)
        self.users = UserDatabase(settings.users.file)
        # Aliases: re-read within a second of a change; users and aliases answer RCPT together.
        self.aliases = AliasDatabase(settings.aliases.file)
        AliasWatcher(self.aliases, reactor).setServiceParent(self)
        self.names = LocalNames(
            self.aliases, self.users, settings.domains.local,
            lambda domain: self.policy.classify_domain(domain) == "local",
            max_recipients=settings.smtp.max_recipients,
        )
        self.policy = AcceptancePolicy(
            local_domains=settings.domains.local,
            relay_domains=settings.domains.relay,
            trusted_networks=settings.domains.trusted_networks,
            directory=self.names,
        )
        self.manager = self._queue_manager(settings, reactor)
        self.factories: list[SMTPServerFactory] = []
        for descriptions, submission in (
            (settings.smtp.listen, False),
            (settings.smtp.submission, True),
        ):
            factory = SMTPServerFactory(
                ServerConfig(settings.server.hostname, settings.smtp, submission),
                self.policy, self.store, reactor, on_queued=self._new_mail, names=self.names,
            )
            self.factories.append(factory)
            for description in descriptions:
                service = StreamServerEndpointService(
                    serverFromString(reactor, description), factory
                )
                service._raiseSynchronously = True  # a port in use stops start-up loudly
                service.setName(f"smtp {description}")
                service.setServiceParent(self)
        TimerService(ORPHAN_AGE, self._collect_orphans).setServiceParent(self)

    def _queue_manager(self, settings: Settings, reactor: Any) -> QueueManager:
        hostname = settings.server.hostname
        local = MaildirCourier(
            settings.server.state_dir / "mail", self.store.body_path,
            # postmaster always exists (RFC 5321 §4.5.1), with or without a user entry.
            knows=lambda mailbox: mailbox == "postmaster" or self.users.knows(mailbox),
            clock=reactor,
        )
        relay = RelayCourier(
            reactor, self.store, MXResolver(reactor, settings.delivery.nameservers),
            helo_name=hostname, tls=TLSPolicy(settings.delivery.tls),
            default_port=settings.delivery.smtp_port,
        )
        notifier = QueueNotifier(self.store, hostname,
                                 f"postmaster@{settings.domains.local[0]}", reactor,
                                 max_lifetime=settings.delivery.max_lifetime,
                                 on_queued=self._new_mail)
        return QueueManager(self.store, Router(settings.domains, settings.routing), local,
                            relay, notifier, settings.delivery, reactor)

    def _new_mail(self, queue_id: str) -> None:
        self.manager.wake()

    # -- control channel (relayhub.control.ControlTarget) ------------------------------

    def wake(self) -> None:
        self.manager.wake()

    def status(self) -> dict[str, Any]:
        uptime = round(self._reactor.seconds() - self._started_at, 1)
        return {
            "processes": [{"role": "master", "pid": os.getpid(), "uptime_seconds": uptime}],
            "connections": {"smtp": sum(f.connections for f in self.factories), "pop3": 0},
        }

    def reload(self) -> defer.Deferred[list[str]]:
        try:
            self.users.reload_if_changed()
        except UsersFileError as error:
            return defer.succeed(list(error.problems))
        return defer.succeed([])

    def startService(self) -> None:
        super().startService()
        self.store.open().addCallbacks(self._store_ready, self._store_failed)

    def _store_ready(self, _: object) -> None:
        for factory in self.factories:
            factory.ready = True
        self.manager.startService()
        control.listen(self._reactor, self.settings.server.state_dir, self).addErrback(
            lambda failure: _LOG.failure("cannot serve the control socket", failure))
        for service in self:
            if isinstance(service, StreamServerEndpointService):
                _LOG.info("smtp listening on {endpoint}", endpoint=str(service.name)[5:])

    def _store_failed(self, failure: Any) -> None:
        _LOG.failure("cannot open the queue store", failure)
        self._reactor.stop()

    def _collect_orphans(self) -> defer.Deferred[Any] | None:
        if not any(f.ready for f in self.factories):
            return None
        collected: defer.Deferred[Any] = self.store.collect_orphans(ORPHAN_AGE)
        return collected.addErrback(
            lambda failure: _LOG.failure("orphan collection failed", failure)
        )

    def stopService(self) -> defer.Deferred[None]:
        stopped: defer.Deferred[None] = defer.maybeDeferred(super().stopService)
        if self.manager.running:
            stopped.addCallback(lambda _: self.manager.stopService())
        stopped.addCallback(lambda _: self.store.close())
        return stopped


def makeService(options: Options) -> MultiService:
    return HubService(options.settings)
