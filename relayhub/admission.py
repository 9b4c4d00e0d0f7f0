"""Connection limits: who may open another session, counted across every worker.

The master owns one `ConnectionCounter` for all workers (SPEC §2: per-IP limits count
across workers); a worker asks it over AMP through an `Admission`. The master also logs
the refusals, through a `RefusalLog`: once per client address and then a count per period,
as a flood of connections must not become a flood of log lines.

Clients in trusted networks are exempt from the per-IP limit, so for them only the total
(`max_connections`) matters, and asking the master about each one cost a round trip per
connection (the master's busiest work under load). The master therefore lends each worker
a block of slots of the total (`quota_block`); the worker admits trusted clients from its
block without asking and returns what it does not need. The sum of slots lent plus the
sessions counted one by one never exceeds `max_connections`; before it refuses anyone
because of slots lent but idle, the master takes those back from the workers and asks
again, so a limit is reached only by sessions that really are open.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer

from relayhub.config import SmtpSettings

SMTP_SERVICES = ("smtp", "submission", "smtps")


class Admission(Protocol):
    def admit(self, service: str, address: str, exempt: bool) -> defer.Deferred[str]:
        """'' when the session may go on, else why not (it gets 421 and is closed).
        `exempt`: the client is trusted, so the per-IP limit does not apply."""

    def release(self, service: str, address: str) -> None:
        """A session that was admitted has ended."""


def quota_block(max_connections: int) -> int:
    """Slots lent to a worker at a time: small against the limit (a few percent), and 1
    (exact counting, a round trip per connection) when the limit itself is small."""
    return max(1, min(64, max_connections // 64))


class ConnectionCounter:
    """Open sessions by owner (a worker), service and client address, plus the blocks of
    SMTP slots lent to owners for their trusted clients."""

    def __init__(self, limits: SmtpSettings) -> None:
        self.limits = limits
        self._by_owner: dict[str, Counter[tuple[str, str]]] = {}
        self._lent: dict[str, int] = {}  # slots lent, by owner
        self._lent_in_use: dict[str, int] = {}  # of those, in use at the owner's last report

    def lend(self, owner: str, wanted: int, in_use: int) -> int:
        """Lend up to `wanted` more SMTP slots to `owner`; returns how many."""
        self._lent_in_use[owner] = in_use
        free = self.limits.max_connections - self._count(lambda s, a: s in SMTP_SERVICES) \
            - sum(self._lent.values())
        granted = max(0, min(wanted, free))
        self._lent[owner] = self._lent.get(owner, 0) + granted
        return granted

    def idle_lent(self) -> list[str]:
        """Owners that may hold lent slots they are not using (as last reported)."""
        return [owner for owner, lent in self._lent.items()
                if lent > self._lent_in_use.get(owner, 0)]

    def give_back(self, owner: str, count: int, in_use: int) -> None:
        self._lent_in_use[owner] = in_use
        self._lent[owner] = max(0, self._lent.get(owner, 0) - count)

    def admit(self, owner: str, service: str, address: str, exempt: bool) -> str:
        if service in SMTP_SERVICES:
            if (self._count(lambda s, a: s in SMTP_SERVICES) + sum(self._lent.values())
                    >= self.limits.max_connections):
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
        """The owner is gone, and its sessions (and lent slots) with it."""
        self._by_owner.pop(owner, None)
        self._lent.pop(owner, None)
        self._lent_in_use.pop(owner, None)

    def _count(self, wanted: Callable[[str, str], bool]) -> int:
        return sum(n for counts in self._by_owner.values()
                   for (service, address), n in counts.items() if wanted(service, address))

    def totals(self) -> dict[str, int]:
        return {"smtp": self._count(lambda s, a: s in SMTP_SERVICES)
                + sum(self._lent_in_use.values()),
                "pop3": self._count(lambda s, a: s not in SMTP_SERVICES)}


class LentSlots:
    """A worker's side of the lending: trusted SMTP clients are admitted from slots the
    master lent, with no round trip; more are asked for when they run out, and spare ones
    go back once more than a block is idle."""

    def __init__(self, block: int, ask: Callable[[int, int], defer.Deferred[int]],
                 give_back: Callable[[int, int], None]) -> None:
        self.block = block
        self._ask, self._give_back = ask, give_back
        self.slots = 0  # lent to us
        self.in_use = 0
        self._asking: defer.Deferred[Any] | None = None  # a Lend in flight
        self._waiting: list[defer.Deferred[bool]] = []  # takes waiting for it
        self._reported = 0  # in_use as the master last heard it

    def report(self) -> None:
        """Tell the master how many lent slots are busy, if that changed (for `status`)."""
        if self.in_use != self._reported:
            self._reported = self.in_use
            self._give_back(0, self.in_use)

    def take(self) -> defer.Deferred[bool]:
        """Fires True with a slot taken, False when the total limit is reached."""
        if self.in_use < self.slots:
            self.in_use += 1
            return defer.succeed(True)
        if self._asking is not None:
            # One request at a time: a burst of clients waits for the block being asked
            # for rather than each asking for a block of its own.
            waiting: defer.Deferred[bool] = defer.Deferred()
            self._waiting.append(waiting)
            return waiting

        def lent(granted: int) -> bool:
            self._asking = None
            self.slots += granted
            waiters, self._waiting = self._waiting, []
            took = self._take_lent()
            for waiter in waiters:
                if self.in_use < self.slots or not granted:
                    # (None lent: the master decides each of them, as it does `took`.)
                    waiter.callback(self._take_lent())
                else:
                    # Still short: ask again for those who are left.
                    self.take().chainDeferred(waiter)
            return took

        self._reported = self.in_use
        # Set before the callback is added: an answer already there runs it at once.
        self._asking = asking = self._ask(self.block, self.in_use)
        return asking.addCallback(lent)

    def _take_lent(self) -> bool:
        if self.in_use < self.slots:
            self.in_use += 1
            return True
        return False

    def reclaim(self) -> int:
        """Every slot not in use goes back (the master asked: it would refuse otherwise)."""
        spare, self.slots = self.slots - self.in_use, self.in_use
        self._reported = self.in_use
        return spare

    def put_back(self) -> None:
        self.in_use -= 1
        # Keep up to a block spare for the next clients; with blocks of one (a small limit,
        # counted exactly) keep none, so no other worker is refused for a slot idle here.
        keep = self.block if self.block > 1 else 0
        if (spare := self.slots - self.in_use) > keep:
            self.slots -= spare - keep
            self._reported = self.in_use
            self._give_back(spare - keep, self.in_use)

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
