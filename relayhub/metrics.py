"""The hub's Prometheus metrics, named once here, and how each process keeps them.

Every process (master, workers, queue manager) holds one `ProcessMetrics` in memory. Workers
and the queue manager fill theirs from their own log events (`MetricsObserver`: the events
of relayhub.maillog already carry every value a metric needs), so the protocol and delivery
code has no metric calls of its own. The master asks each child for its samples when
`/metrics` is scraped and adds them up (relayhub.process.scrape).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.logger import ILogObserver
from zope.interface import implementer

from relayhub import maillog
from relayhub.queue.store import QueueSummary, RecipientStatus

# (sample name, labels, value): what a child reports to the master, as JSON.
Sample: TypeAlias = tuple[str, dict[str, str], float]

SERVICES = ("smtp", "pop3")
DELIVERY_STATUSES = ("sent", "deferred", "bounced")
# How a recipient left: into a Maildir, by the transport table, through the relayhost, by
# MX to a relay (internal) domain, or by MX (or an address literal) to anywhere else.
NEXT_HOPS = ("local", "transport", "relayhost", "relay", "mx")
REJECT_REASONS = (
    "relay_denied", "unknown_user", "auth_required", "size", "bare_newline",
    "line_too_long", "loop", "limit", "store_failed", "temporary", "other",
)
ROLES = ("worker", "queue-manager")
# The reply texts each reason is known by (relayhub.policy, relayhub.smtp.server), first
# match wins; anything else is "temporary" (4xx) or "other" (5xx).
_REPLY_REASONS = (
    ("relay access denied", "relay_denied"),
    ("user unknown", "unknown_user"),
    ("user ambiguous", "unknown_user"),
    ("authentication required", "auth_required"),
    ("bare <cr> or <lf>", "bare_newline"),
    ("line too long", "line_too_long"),
    ("too big", "size"),
    ("size exceeds", "size"),
    ("too many hops", "loop"),
)
# Seconds from the end of DATA to "250 queued": the fsync'd, group-committed write.
ACCEPT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Seconds from arrival to delivery: immediate deliveries through days of retries.
DELIVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                    14400.0, 86400.0)


class ProcessMetrics:
    """Every relayhub metric, in a registry of its own (one per process, never global)."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        self.connections = Counter(
            "relayhub_connections", "Client connections, by service.", ["service"],
            registry=registry)
        self.accepted = Counter(
            "relayhub_messages_accepted", "Messages queued (answered 250).", registry=registry)
        self.rejected = Counter(
            "relayhub_messages_rejected",
            "Recipients and messages refused, and sessions cut by limits, by reason.",
            ["reason"], registry=registry)
        self.deliveries = Counter(
            "relayhub_deliveries", "Delivery attempts per recipient, by outcome and next hop.",
            ["status", "next_hop"], registry=registry)
        self.accept_latency = Histogram(
            "relayhub_accept_latency_seconds",
            "Time from the end of DATA to the 250 reply (the message made durable).",
            buckets=ACCEPT_BUCKETS, registry=registry)
        self.delivery_latency = Histogram(
            "relayhub_delivery_latency_seconds",
            "Time from a message's arrival to each recipient's successful delivery.",
            buckets=DELIVERY_BUCKETS, registry=registry)
        self.child_restarts = Counter(
            "relayhub_child_restarts",
            "Workers and queue managers that died and were restarted by the master.",
            ["role"], registry=registry)
        self.queue_messages = Gauge(
            "relayhub_queue_messages", "Messages in the queue.", registry=registry)
        self.queue_held = Gauge(
            "relayhub_queue_held_messages", "Messages on hold.", registry=registry)
        self.queue_recipients = Gauge(
            "relayhub_queue_recipients",
            "Recipients of queued messages, by state (delivered and bounced ones belong to "
            "messages still waiting for other recipients).", ["state"], registry=registry)
        self.queue_in_flight = Gauge(
            "relayhub_queue_in_flight_recipients",
            "Recipients being attempted now (under a live lease).", registry=registry)
        self.queue_oldest_age = Gauge(
            "relayhub_queue_oldest_age_seconds",
            "Age of the oldest queued message (0 when the queue is empty).", registry=registry)
        # Every series exists from the start, at 0: sums and rates need no special case for
        # a label set that has not happened yet.
        for service in SERVICES:
            self.connections.labels(service)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for status in DELIVERY_STATUSES:
            for hop in NEXT_HOPS:
                self.deliveries.labels(status, hop)
        for role in ROLES:
            self.child_restarts.labels(role)
        for state in RecipientStatus:
            self.queue_recipients.labels(state.value)

    def samples(self) -> list[Sample]:
        """Every sample's current value (no `_created` timestamps: they cannot be summed)."""
        return [(sample.name, dict(sample.labels), sample.value)
                for family in self.registry.collect() for sample in family.samples
                if not sample.name.endswith("_created")]

    def set_queue(self, summary: QueueSummary, now: float) -> None:
        self.queue_messages.set(summary.messages)
        self.queue_held.set(summary.held)
        for state, count in summary.recipients.items():
            self.queue_recipients.labels(state).set(count)
        self.queue_in_flight.set(summary.in_flight)
        oldest = summary.oldest_arrival
        self.queue_oldest_age.set(0.0 if oldest is None else max(0.0, now - oldest))


def reject_reason(reply: str) -> str:
    """The reason label for a refusal's reply text ("554 5.7.1 <x>: Relay access denied")."""
    text = reply.lower()
    for needle, reason in _REPLY_REASONS:
        if needle in text:
            return reason
    return "temporary" if text.startswith("4") else "other"


@implementer(ILogObserver)
class MetricsObserver:
    """Counts what a child's log events report (relayhub.maillog names each event once).

    It sees every event, whatever the log level; an event it has no use for costs one
    dictionary look-up.
    """

    def __init__(self, metrics: ProcessMetrics) -> None:
        self.metrics = metrics
        self._handlers: Mapping[str, Callable[[dict[str, Any]], None]] = {
            maillog.CONNECT: self._connect,
            maillog.QUEUED: self._queued,
            maillog.QUEUED_AUTHENTICATED: self._queued,
            maillog.REJECT: self._rejected,
            maillog.REFUSED_MESSAGE: self._rejected,
            maillog.LIMIT: lambda event: self.metrics.rejected.labels("limit").inc(),
            maillog.STORE_FAILED: lambda event: self.metrics.rejected.labels(
                "store_failed").inc(),
            maillog.DELIVERY: self._delivery,
        }

    def __call__(self, event: dict[str, Any]) -> None:
        handler = self._handlers.get(event.get("log_format", ""))
        if handler is not None:
            # An event without the expected fields is not worth a crash.
            with contextlib.suppress(KeyError, TypeError, ValueError):
                handler(event)

    def _connect(self, event: dict[str, Any]) -> None:
        self.metrics.connections.labels("smtp").inc()

    def _queued(self, event: dict[str, Any]) -> None:
        self.metrics.accepted.inc()
        latency = event.get("accept_seconds")
        if latency is not None:
            self.metrics.accept_latency.observe(float(latency))

    def _rejected(self, event: dict[str, Any]) -> None:
        self.metrics.rejected.labels(reject_reason(str(event["reply"]))).inc()

    def _delivery(self, event: dict[str, Any]) -> None:
        status = event["verb"]
        hop = event.get("next_hop", "mx")
        if status in DELIVERY_STATUSES and hop in NEXT_HOPS:
            self.metrics.deliveries.labels(status, hop).inc()
        if status == "sent":
            self.metrics.delivery_latency.observe(float(event["delay"]))
