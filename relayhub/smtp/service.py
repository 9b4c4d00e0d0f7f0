"""The SMTP side of a worker: one factory per kind of SMTP listener, all over the same
directory, queue store and admission."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relayhub.admission import Admission
from relayhub.config import Settings
from relayhub.directory import Directory
from relayhub.queue.store import QueueStore
from relayhub.smtp.server import ServerConfig, SMTPServerFactory, SMTPServerProtocol


class SMTPService:
    def __init__(self, settings: Settings, store: QueueStore, directory: Directory,
                 reactor: Any, *, admission: Admission, on_queued: Callable[[str], None]
                 ) -> None:
        self.factories = {
            service: SMTPServerFactory(
                ServerConfig(settings.server.hostname, settings.smtp,
                             submission=service == "submission"),
                directory.policy, store, reactor, admission, service=service,
                on_queued=on_queued, names=directory.names,
            )
            for service in ("smtp", "submission")
        }

    def factory_for(self, service: str) -> SMTPServerFactory | None:
        return self.factories.get(service)

    def sessions(self) -> list[SMTPServerProtocol]:
        return [s for factory in self.factories.values() for s in factory.sessions]
