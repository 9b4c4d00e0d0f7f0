"""The SMTP side of a worker: one factory per kind of SMTP listener, all over the same
directory, queue store, admission and TLS options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relayhub.admission import SMTP_SERVICES, Admission
from relayhub.clientname import ClientNamer
from relayhub.config import Settings
from relayhub.directory import Directory
from relayhub.dkim import build_signer
from relayhub.queue.space import FreeSpace
from relayhub.queue.store import QueueStore
from relayhub.smtp.server import ServerConfig, SMTPServerFactory, SMTPServerProtocol

# Listeners for mail submission (RFC 6409, 8314): relaying needs AUTH there, even from a
# trusted network. smtps is submission with TLS from the first byte (the worker wraps it).
SUBMISSION_SERVICES = frozenset({"submission", "smtps"})


class SMTPService:
    """`tls_options` (from relayhub.tls, or None) enables STARTTLS on every listener."""

    def __init__(self, settings: Settings, store: QueueStore, directory: Directory,
                 reactor: Any, *, admission: Admission, on_queued: Callable[[str], None],
                 tls_options: Any = None) -> None:
        space = FreeSpace(settings.server.state_dir, settings.queue.min_free_space,
                          reactor.seconds)
        namer = ClientNamer(reactor, settings.delivery.nameservers,
                            settings.smtp.reverse_dns_timeout) if settings.smtp.reverse_dns \
            else None
        signer = build_signer(settings.dkim.entries())  # each key file read once per worker
        self.factories = {
            service: SMTPServerFactory(
                ServerConfig(settings.server.hostname, settings.smtp,
                             submission=service in SUBMISSION_SERVICES,
                             masquerade=settings.domains.masquerade, dkim=signer),
                directory.policy, store, reactor, admission, service=service,
                on_queued=on_queued, names=directory.names, tls_options=tls_options,
                users=directory.users, space=space, namer=namer,
            )
            for service in SMTP_SERVICES
        }

    def factory_for(self, service: str) -> SMTPServerFactory | None:
        return self.factories.get(service)

    def sessions(self) -> list[SMTPServerProtocol]:
        return [s for factory in self.factories.values() for s in factory.sessions]
