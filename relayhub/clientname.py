"""Client host names by forward-confirmed reverse DNS (FCrDNS), as Postfix names clients.

The address's PTR names are looked up, then the addresses of each name (A for an IPv4
client, AAAA for IPv6); the first name whose addresses include the client's is its name.
Anything else — no PTR, a PTR that does not point back, a failure or the time running out
— leaves the client "unknown", as in `unknown[192.0.2.1]`. A lookup never fails and
always ends within its timeout, so the banner waits for it at most that long.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.names import client, dns

UNKNOWN = "unknown"
# A PTR set larger than this is not worth a query per name (Postfix checks a few too).
MAX_NAMES = 5


def normalize_address(text: str) -> str | None:
    """The address as compared (an IPv4-mapped IPv6 address as IPv4); None if not an IP."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def confirmed_name(address: str, ptr_names: Sequence[str],
                   forward: Mapping[str, Iterable[str]]) -> str | None:
    """The first PTR name whose forward addresses include `address`, lower-cased without
    the trailing dot; None when none does. Names compare case-insensitively. Pure."""
    wanted = normalize_address(address)
    if wanted is None:
        return None
    addresses = {name.lower().removesuffix("."): found for name, found in forward.items()}
    for name in ptr_names[:MAX_NAMES]:
        key = name.lower().removesuffix(".")
        if key and any(normalize_address(a) == wanted for a in addresses.get(key, ())):
            return key
    return None


def hosts_table(text: str) -> dict[str, list[str]]:
    """/etc/hosts as {address: [names]} (addresses normalised, names lower-cased). Pure."""
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        address = normalize_address(fields[0]) if fields else None
        if address is not None and len(fields) > 1:
            table.setdefault(address, []).extend(name.lower() for name in fields[1:])
    return table


def confirmed_in_hosts(address: str, table: Mapping[str, Sequence[str]]) -> str | None:
    """The first of the address's names in the hosts table that the table maps back to it,
    as the C library's files-then-DNS order finds it (Postfix names 127.0.0.1 "localhost"
    so). Pure."""
    wanted = normalize_address(address)
    names = table.get(wanted, []) if wanted is not None else []
    forward = {name: [a for a, listed in table.items() if name in listed] for name in names}
    return confirmed_name(address, names, forward) if names else None


class ClientNamer:
    """Asynchronous FCrDNS: /etc/hosts first, as the C library's resolver (and so Postfix)
    does, then twisted.names on `nameservers` (empty: /etc/resolv.conf)."""

    def __init__(self, reactor: Any, nameservers: Sequence[tuple[str, int]] = (),
                 timeout: float = 5.0, hosts: Mapping[str, Sequence[str]] | None = None
                 ) -> None:
        self.reactor = reactor
        self.timeout = timeout
        # Read once, as each worker starts (a reload starts new workers, which read it anew).
        self._hosts = hosts if hosts is not None else hosts_table(_read_hosts())
        # One try per query within the overall limit; the limit is enforced below anyway.
        per_try = (max(timeout, 0.1),)
        if nameservers:
            self._resolver = client.Resolver(servers=list(nameservers), timeout=per_try,
                                             reactor=reactor)
        else:
            self._resolver = client.Resolver(resolv="/etc/resolv.conf", timeout=per_try,
                                             reactor=reactor)

    def name(self, address: str) -> defer.Deferred[str]:
        """The client's confirmed name or "unknown", within `timeout` seconds; never fails."""
        ip = normalize_address(address)
        if ip is None:
            return defer.succeed(UNKNOWN)
        local = confirmed_in_hosts(ip, self._hosts)
        if local is not None:
            return defer.succeed(local)
        lookup = defer.Deferred.fromCoroutine(self._confirm(ip))
        result: defer.Deferred[str] = defer.Deferred()
        timer = self.reactor.callLater(self.timeout, self._give_up, lookup, result)

        def finished(value: object) -> None:
            if timer.active():
                timer.cancel()
            if not result.called:
                result.callback(value if isinstance(value, str) else UNKNOWN)

        lookup.addBoth(finished)
        return result

    @staticmethod
    def _give_up(lookup: defer.Deferred[str], result: defer.Deferred[str]) -> None:
        if not result.called:
            result.callback(UNKNOWN)
        lookup.cancel()

    async def _confirm(self, ip: str) -> str:
        reverse = ipaddress.ip_address(ip).reverse_pointer
        answers, _authority, _additional = await self._resolver.lookupPointer(reverse)
        names = [str(r.payload.name) for r in answers
                 if r.type == dns.PTR and isinstance(r.payload, dns.Record_PTR)]
        ipv6 = ":" in ip
        forward: dict[str, list[str]] = {}
        for name in names[:MAX_NAMES]:
            try:
                if ipv6:
                    records, _a, _b = await self._resolver.lookupIPV6Address(name)
                else:
                    records, _a, _b = await self._resolver.lookupAddress(name)
            except Exception:  # that name does not confirm; try the next
                continue
            forward[name] = [r.payload.dottedQuad() if r.type == dns.A else
                             str(ipaddress.ip_address(r.payload.address))
                             for r in records if r.type in (dns.A, dns.AAAA)]
            found = confirmed_name(ip, [name], forward)
            if found is not None:
                return found
        return UNKNOWN


def _read_hosts(path: str = "/etc/hosts") -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read()
    except OSError:
        return ""
