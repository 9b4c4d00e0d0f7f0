"""Next hop → the ordered addresses to try (RFC 5321 §5.1, RFC 7505), with twisted.names."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.defer import TimeoutError as QueryTimeout
from twisted.names import client, dns
from twisted.names import error as names_error

from relayhub.config import NextHop

MAX_ADDRESSES = 5  # SPEC §4: "up to 5 addresses tried", as Postfix's smtp_mx_address_limit


@dataclass(frozen=True)
class Target:
    """One address to connect to; `host` is the name it was found under (the MX host)."""

    host: str
    address: str
    port: int
    preference: int

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"  # Postfix's relay= form


class DNSError(Exception):
    """No usable answer; `status` (RFC 3463) and `text` go into the deferral or bounce."""

    permanent = False

    def __init__(self, status: str, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.status = status
        self.text = text


class TemporaryDNSError(DNSError):
    """SERVFAIL, timeout, refusal: try again later."""

    def __init__(self, text: str, status: str = "4.4.3") -> None:
        super().__init__(status, text)


class PermanentDNSError(DNSError):
    """NXDOMAIN, no address, or null MX: bounce."""

    permanent = True

    def __init__(self, text: str, status: str = "5.1.2") -> None:
        super().__init__(status, text)


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _error_for(failure: Exception, name: str, qtype: int) -> DNSError:
    where = f"Name service error for name={name} type={dns.QUERY_TYPES.get(qtype, qtype)}"
    if isinstance(failure, names_error.DNSNameError):
        return PermanentDNSError(f"Host or domain name not found. {where}: Host not found")
    reasons = [(names_error.DNSServerError, "server failure"),
               (names_error.DNSQueryRefusedError, "query refused"),
               (QueryTimeout, "timed out")]  # twisted.names raises the base class, not its own
    why = next((text for kind, text in reasons if isinstance(failure, kind)), repr(failure))
    return TemporaryDNSError(f"Host or domain name not found. {where}: {why}, try again")


def _temporary_first(errors: Sequence[DNSError]) -> DNSError:
    # One temporary failure means "maybe later", which outranks "no" from the other lookups.
    return min(errors, key=lambda e: e.permanent)


class MXResolver:
    """Resolves next hops with explicit MX, A and AAAA queries on `nameservers` (empty:
    /etc/resolv.conf). `timeout` is the wait per try, as twisted.names takes it, so a server
    that never answers fails after sum(timeout) seconds. Never an ANY query (RFC 8482)."""

    def __init__(
        self,
        reactor: Any,
        nameservers: Sequence[tuple[str, int]] = (),
        timeout: Sequence[float] = (1, 3),
        rng: random.Random | None = None,
    ) -> None:
        self._timeout = tuple(timeout)
        if nameservers:
            self._resolver = client.Resolver(
                servers=list(nameservers), timeout=self._timeout, reactor=reactor
            )
        else:
            # Not createResolver: an MTA asks DNS (Postfix smtp_host_lookup=dns), not /etc/hosts.
            self._resolver = client.Resolver(
                resolv="/etc/resolv.conf", timeout=self._timeout, reactor=reactor
            )
        self._rng = rng or random.Random()

    def resolve(self, hop: NextHop, default_port: int) -> Deferred[list[Target]]:
        """At most MAX_ADDRESSES targets in the order to try, or DNSError."""
        return Deferred.fromCoroutine(self._resolve(hop, hop.port or default_port))

    def lookup_mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        """The MX records as published, by preference then name ("." for a null MX; [] when
        there is none); for display. NXDOMAIN and failures raise DNSError."""
        return Deferred.fromCoroutine(self._lookup_mx(domain))

    async def _lookup_mx(self, domain: str) -> list[tuple[int, str]]:
        records = await self._query(domain, dns.MX)
        return sorted((r.preference, str(r.name).lower() or ".") for r in records)

    async def _resolve(self, hop: NextHop, port: int) -> list[Target]:
        if not hop.mx:
            ip = _ip(hop.host)
            addresses = [ip] if ip else await self._addresses(hop.host)
            return [Target(hop.host, a, port, 0) for a in addresses[:MAX_ADDRESSES]]
        exchangers = await self._exchangers(hop.host)
        if not exchangers:  # RFC 5321 §5.1: no MX at all → the domain is its own implicit MX
            return await self._resolve(NextHop(hop.host, port, mx=False), port)
        # All hosts at once: latency is that of the slowest lookup, not the sum.
        per_host = await gatherResults(
            [Deferred.fromCoroutine(self._addresses_or_error(host)) for _p, host in exchangers]
        )
        targets: list[Target] = []
        seen: set[str] = set()  # two MX names for one address: one attempt is enough
        for (preference, host), result in zip(exchangers, per_host, strict=True):
            if isinstance(result, list):
                fresh = [a for a in result if a not in seen]
                seen.update(fresh)
                targets += [Target(host, a, port, preference) for a in fresh]
        if targets:
            return targets[:MAX_ADDRESSES]
        errors = [e for e in per_host if isinstance(e, DNSError)]
        worst = _temporary_first(errors)
        kind = TemporaryDNSError if not worst.permanent else PermanentDNSError
        raise kind(f"No address for any MX host of {hop.host}: {worst.text}")

    async def _exchangers(self, domain: str) -> list[tuple[int, str]]:
        """MX hosts in the order to try: by preference, shuffled among equals (RFC 5321 §5.1)."""
        records = await self._query(domain, dns.MX)
        usable = [(r.preference, str(r.name).lower()) for r in records if str(r.name)]
        if records and not usable:
            # RFC 7505: the lone MX "." says the domain takes no mail; a "." beside real hosts
            # is ignored (it must not be there, and they still work).
            raise PermanentDNSError("Domain does not accept mail (null MX)", "5.1.10")
        # The random key is drawn once per record, so equal preferences come out shuffled.
        return sorted(usable, key=lambda record: (record[0], self._rng.random()))

    async def _addresses(self, host: str) -> list[str]:
        """IPv6 then IPv4 addresses of `host` (both looked up together), or DNSError if it
        has none; a temporary failure of either lookup then makes the error temporary."""
        results = await gatherResults([
            Deferred.fromCoroutine(self._query_or_error(host, qtype))
            for qtype in (dns.AAAA, dns.A)
        ])
        found = [
            ipaddress.IPv6Address(r.address).compressed if qtype == dns.AAAA else r.dottedQuad()
            for qtype, result in zip((dns.AAAA, dns.A), results, strict=True)
            if isinstance(result, list)
            for r in result
        ]
        if found:
            return list(dict.fromkeys(found))
        errors = [e for e in results if isinstance(e, DNSError)]
        if errors:
            raise _temporary_first(errors)
        raise PermanentDNSError(
            f"Host or domain name not found. Name service error for name={host} type=A: "
            "No address (no A or AAAA record)"
        )

    async def _addresses_or_error(self, host: str) -> list[str] | DNSError:
        try:
            return await self._addresses(host)
        except DNSError as error:
            return error

    async def _query_or_error(self, name: str, qtype: int) -> list[Any] | DNSError:
        try:
            return await self._query(name, qtype)
        except DNSError as error:
            return error

    async def _query(self, name: str, qtype: int) -> list[Any]:
        """The payloads of the `qtype` answer records (CNAMEs on the way are skipped); an
        empty list for NOERROR without data."""
        try:
            query_name = name.encode("idna")  # SMTPUTF8 domains are queried as A-labels
        except UnicodeError:
            raise PermanentDNSError(f"Host or domain name not found: {name!r} is not a valid "
                                    "domain name") from None
        lookup = {
            dns.MX: self._resolver.lookupMailExchange,
            dns.A: self._resolver.lookupAddress,
            dns.AAAA: self._resolver.lookupIPV6Address,
        }[qtype]
        try:
            answers, _authority, _additional = await lookup(query_name, self._timeout)
        # The UDP query, its retries and a TCP retry after truncation can fail in these ways.
        except (names_error.DomainError, QueryTimeout, OSError, internet_error.ConnectError,
                internet_error.ConnectionClosed) as failure:
            raise _error_for(failure, name, qtype) from None
        return [record.payload for record in answers if record.type == qtype]
