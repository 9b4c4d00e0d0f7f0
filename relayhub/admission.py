"""Connection limits: who may open another session, counted across every worker.

The master owns one `ConnectionCounter` for all workers (SPEC §2: per-IP limits count
across workers); a worker asks it over AMP through an `Admission`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
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
        if counts and counts[(service, address)] > 0:
            counts[(service, address)] -= 1

    def forget(self, owner: str) -> None:
        """The owner is gone, and its sessions with it."""
        self._by_owner.pop(owner, None)

    def _count(self, wanted: Callable[[str, str], bool]) -> int:
        return sum(n for counts in self._by_owner.values()
                   for (service, address), n in counts.items() if wanted(service, address))

    def totals(self) -> dict[str, int]:
        return {"smtp": self._count(lambda s, a: s in SMTP_SERVICES),
                "pop3": self._count(lambda s, a: s not in SMTP_SERVICES)}
