"""A real DNS server on 127.0.0.1 (UDP and TCP, one free port) serving a zone dict a test builds.

    zone = {
        "example.com": {"MX": [(10, "mx1.example.com"), (20, "mx2.example.com")]},
        "mx1.example.com": {"A": ["127.0.0.11"], "AAAA": ["::1"]},
        "nullmx.example": {"MX": [(0, ".")]},
        "servfail.example": "SERVFAIL",   # every query for the name: SERVFAIL
        "slow.example": "TIMEOUT",        # every query for the name: no answer at all
        "_mta-sts.example.com": {"TXT": ["v=STSv1; id=1"]},   # one string per record
        "_25._tcp.mx1.example.com": {"TLSA": [(3, 1, 1, sha256_of_spki)]},
        "1.0.0.127.in-addr.arpa": {"PTR": ["client.example"]},  # reverse_name("127.0.0.1")
        "s1._domainkey.example.org": {"TXT": ["v=DKIM1; k=rsa; p=..."]},  # in 255-octet strings
    }
    with DNSServer(reactor_thread, zone, secure={"_25._tcp.mx1.example.com"}) as server:
        resolver = MXResolver(reactor, server.nameservers)
        server.set_zone(other_zone)

A name missing from the zone is NXDOMAIN; a name without the asked type answers NOERROR with
no records. Names are case-insensitive. `queries` records (name, type) of every query received.
Answers for the names in `secure` (or `set_secure`) carry the AD bit, as a validating
resolver's would for DNSSEC-signed data.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.names import dns, server

Zone = Mapping[str, Mapping[str, Sequence[Any]] | str]
TLSA = 52  # RFC 6698


def reverse_name(address: str) -> str:
    """The PTR owner name of an address: "4.3.2.1.in-addr.arpa", "...ip6.arpa"."""
    return ipaddress.ip_address(address).reverse_pointer


def _records(name: str, kind: str, values: Sequence[Any]) -> list[dns.RRHeader]:
    def payload(value: Any) -> Any:
        if kind == "MX":
            preference, host = value
            return dns.Record_MX(preference, b"" if host == "." else host.encode(), ttl=0)
        if kind == "TXT":  # in strings of at most 255 octets, as a zone file has them
            data = value.encode()
            return dns.Record_TXT(*[data[i:i + 255] for i in range(0, len(data), 255)], ttl=0)
        if kind == "TLSA":  # twisted.names has no TLSA class: the RDATA as it is on the wire
            usage, selector, matching, data = value
            return dns.UnknownRecord(bytes([usage, selector, matching]) + data, ttl=0)
        if kind == "PTR":
            return dns.Record_PTR(value.encode(), ttl=0)
        return {"A": dns.Record_A, "AAAA": dns.Record_AAAA}[kind](value, ttl=0)

    qtype = {"MX": dns.MX, "A": dns.A, "AAAA": dns.AAAA, "TXT": dns.TXT, "TLSA": TLSA,
             "PTR": dns.PTR}[kind]
    return [dns.RRHeader(name.encode(), qtype, ttl=0, payload=payload(v), auth=True)
            for v in values]


def _names(names: Iterable[str]) -> frozenset[str]:
    return frozenset(name.lower().removesuffix(".") for name in names)


class _ZoneFactory(server.DNSServerFactory):
    """Answers straight from the zone, so SERVFAIL and silence are as easy as data."""

    def __init__(self, zone: Zone, secure: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.zone = zone
        self.secure = secure
        self.queries: list[tuple[str, str]] = []

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> None:
        query = message.queries[0]
        name = query.name.name.decode().lower().removesuffix(".")
        kind = "TLSA" if query.type == TLSA else dns.QUERY_TYPES.get(query.type, str(query.type))
        self.queries.append((name, kind))
        entry = self.zone.get(name)
        if entry == "TIMEOUT":
            return
        rcode, answers = dns.OK, []
        if entry is None:
            rcode = dns.ENAME
        elif entry == "SERVFAIL":
            rcode = dns.ESERVER
        elif isinstance(entry, Mapping) and kind in entry:
            answers = _records(name, kind, entry[kind])
        response = self._responseFromMessage(message=message, rCode=rcode, answers=answers)
        response.authenticData = name in self.secure
        self.sendReply(protocol, response, address)


class DNSServer:
    """Context manager: listens on enter, stops on exit; its reactor runs in reactor_thread."""

    def __init__(self, reactor_thread: Any, zone: Zone, secure: Iterable[str] = ()) -> None:
        self._thread = reactor_thread
        self._factory = _ZoneFactory(dict(zone), _names(secure))
        self._ports: list[Any] = []
        self.port = 0

    @property
    def nameservers(self) -> tuple[tuple[str, int], ...]:
        return (("127.0.0.1", self.port),)

    @property
    def queries(self) -> list[tuple[str, str]]:
        return self._factory.queries

    def set_zone(self, zone: Zone) -> None:
        # One reference swap: the reactor thread sees the old zone or the new one, never a mix.
        self._factory.zone = dict(zone)

    def set_secure(self, names: Iterable[str]) -> None:
        """Answers for these names (only) carry the AD bit from now on."""
        self._factory.secure = _names(names)

    def _listen(self) -> None:
        reactor = self._thread.reactor
        for _attempt in range(20):  # the free UDP port may be taken for TCP: try another
            udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(self._factory),
                                    interface="127.0.0.1")
            try:
                tcp = reactor.listenTCP(udp.getHost().port, self._factory, interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                continue
            self._ports = [udp, tcp]
            self.port = udp.getHost().port
            return
        raise RuntimeError("no port free for both UDP and TCP")

    def __enter__(self) -> DNSServer:
        self._thread.run(self._listen)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._thread.run(lambda: defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in self._ports]
        ))
