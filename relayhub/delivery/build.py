"""Assembles the queue manager and its couriers from the settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relayhub import maillog
from relayhub.config import Settings
from relayhub.delivery.local import MaildirCourier
from relayhub.delivery.manager import QueueManager
from relayhub.delivery.mta_sts_source import MtaStsPolicies, PolicyCache, PolicyFetcher
from relayhub.delivery.notices import QueueNotifier
from relayhub.delivery.relay import RelayCourier
from relayhub.delivery.tls_plan import TLSPlanner
from relayhub.directory import Directory
from relayhub.dns import MXResolver
from relayhub.dnssec import SecureResolver, trusted_resolvers
from relayhub.queue.store import QueueStore
from relayhub.routing import Router
from relayhub.smtp.client import TLSPolicy


def build_tls_planner(settings: Settings, reactor: Any) -> TLSPlanner:
    """MTA-STS and DANE as [delivery] sets them up (either may be off)."""
    delivery = settings.delivery
    sts = MtaStsPolicies(
        reactor, PolicyFetcher(reactor, delivery.nameservers),
        PolicyCache(settings.server.state_dir), log=maillog.QMGR.info,
    ) if delivery.mta_sts else None
    servers, _why_not = trusted_resolvers(delivery)
    secure = SecureResolver(reactor, servers) if servers else None
    return TLSPlanner(TLSPolicy(delivery.tls), sts, secure, log=maillog.QMGR.info)


def build_queue_manager(settings: Settings, store: QueueStore, directory: Directory,
                        reactor: Any, on_queued: Callable[[str], None]) -> QueueManager:
    """`on_queued`: called for every notice the manager itself queues (it should wake it)."""
    hostname = settings.server.hostname
    local = MaildirCourier(settings.server.state_dir / "mail", store.body_path,
                           knows=directory.knows_mailbox, clock=reactor)
    relay = RelayCourier(
        reactor, store, MXResolver(reactor, settings.delivery.nameservers),
        helo_name=hostname, tls=TLSPolicy(settings.delivery.tls),
        default_port=settings.delivery.smtp_port, planner=build_tls_planner(settings, reactor),
    )
    notifier = QueueNotifier(store, hostname, f"postmaster@{settings.domains.local[0]}",
                             reactor, max_lifetime=settings.delivery.max_lifetime,
                             on_queued=on_queued,
                             expand=lambda request: directory.names.expand_request(
                                 request, null_sender=True))
    return QueueManager(store, Router(settings.domains, settings.routing), local, relay,
                        notifier, settings.delivery, reactor)
