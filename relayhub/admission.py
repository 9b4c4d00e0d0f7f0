"""Connection limits: who may open another session, counted across every worker.

The master owns one `ConnectionCounter` for all workers (SPEC §2: per-IP limits count
across workers); a worker asks it over AMP through an `Admission`. The master also logs
the refusals, through a `RefusalLog`: once per client address and then a count per period,
as a flood of connections must not become a flood of log lines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet import defer

from relayhub.config import SmtpSettings

SMTP_SERVICES = ("smtp", "submission", "smtps")


class Admission(Protocol):
    def admit(self, service: str, address: str, exempt: bool) -> defer.Deferred[str]:
        """'' when the session may go on, else why not (it gets 421 and is closed).
        `exempt`: the client is trusted, so the per-IP limit does not apply."""

    def release(self, service: str, address: str) -> None:
        """A session that was admitted has ended."""


class ConnectionCounter:
    """Open sessions by owner (a worker), service and client address."""

    def __init__(self, limits: SmtpSettings) -> None:
        self.limits = limits
        self._by_owner: dict[str, Counter[tuple[str, str]]] = {}

    def admit(self, owner: str, service: str, address: str, exempt: bool) -> str:
        if service in SMTP_SERVICES:
            if self._count(lambda s, a: s in SMTP_SERVICES) >= self.limits.max_connections:
                return "too many connections"
            from_address = self._count(lambda s, a: s in SMTP_SERVICES and a == address)
            if not exempt and from_address >= self.limits.max_connections_per_ip:
                return f"too many connections from {address}"
        self._by_owner.setdefault(owner, Counter())[(service, address)] += 1
        return ""

    def release(self, owner: str, service: str, address: str) -> None:
        counts = self._by_owner.get(owner)
        key = (service, address)
        if counts and counts[key] > 1:
            counts[key] -= 1
        elif counts:
            # Gone, not kept at zero: a flood from ever new addresses (a /8, an IPv6 /64)
            # must not grow this table, nor the time each admission takes to count it.
            counts.pop(key, None)

    def tracked(self) -> int:
        """How many (owner, service, address) entries are held: at most one per session."""
        return sum(len(counts) for counts in self._by_owner.values())

    def forget(self, owner: str) -> None:
        """The owner is gone, and its sessions with it."""
        self._by_owner.pop(owner, None)

    def _count(self, wanted: Callable[[str, str], bool]) -> int:
        return sum(n for counts in self._by_owner.values()
                   for (service, address), n in counts.items() if wanted(service, address))

    def totals(self) -> dict[str, int]:
        return {"smtp": self._count(lambda s, a: s in SMTP_SERVICES),
                "pop3": self._count(lambda s, a: s not in SMTP_SERVICES)}


# How often repeated refusals of one client are summed up in the log.
REFUSAL_LOG_PERIOD = 60.0
# Clients tracked at once; past that, refusals of new ones are counted under OTHER_CLIENTS
# (a flood from a whole /8 must not grow this table without bound).
MAX_TRACKED_CLIENTS = 10_000
OTHER_CLIENTS = "other clients"


@dataclass
class _Refusals:
    reason: str
    unlogged: int = 0  # refused since the last line about this client
    last: float = 0.0  # when last refused


class RefusalLog:
    """Decides which connection refusals are logged: the first of a client at once, then,
    once per period, how many more there were. Pure: the caller passes the time."""

    def __init__(self, period: float = REFUSAL_LOG_PERIOD,
                 max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        self.period = period
        self.max_clients = max_clients
        self._clients: dict[str, _Refusals] = {}

    def refused(self, address: str, reason: str, now: float) -> bool:
        """Count a refusal; True when it is to be logged now (the client's first in a while)."""
        entry = self._clients.get(address)
        if entry is None and len(self._clients) >= self.max_clients:
            address = OTHER_CLIENTS
            entry = self._clients.get(address)
        if entry is None:
            self._clients[address] = _Refusals(reason, 0, now)
            return True
        entry.unlogged += 1
        entry.reason, entry.last = reason, now
        return False

    def summaries(self, now: float) -> list[tuple[str, int, str]]:
        """(client, refusals not logged yet, latest reason) for each client refused since the
        last summary; clients quiet for a whole period are forgotten (their next refusal
        is logged at once again)."""
        lines = []
        for address, entry in list(self._clients.items()):
            if entry.unlogged:
                lines.append((address, entry.unlogged, entry.reason))
                entry.unlogged = 0
            elif now - entry.last >= self.period:
                del self._clients[address]
        return lines
