"""DNS queries whose answers say whether a validating resolver vouched for them (the AD bit,
RFC 4035 §3.2.3, asked for with AD=1 in the query, RFC 6840 §5.7), for DANE (RFC 7672).

twisted.names' Resolver hides the response header, so this sends its own queries with a
`DNSDatagramProtocol` and reads `authenticData` from the reply. Only the resolvers the
administrator trusts are asked ([delivery] dnssec_nameservers, loopback by default): the AD
bit of a resolver across a network proves nothing to us.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import error as internet_error
from twisted.internet.defer import TimeoutError as QueryTimeout
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.names import dns
from twisted.names import error as names_error

from relayhub.config import DeliverySettings
from relayhub.dns import TemporaryDNSError

TLSA = 52  # RFC 6698; twisted.names has no record class for it


@dataclass(frozen=True)
class SecureAnswer:
    """The payloads of the answer records of the asked type; `secure` is the AD bit;
    `exists` is false for NXDOMAIN."""

    records: tuple[Any, ...]
    secure: bool
    exists: bool = True


def trusted_resolvers(delivery: DeliverySettings) -> tuple[tuple[tuple[str, int], ...], str]:
    """The resolvers whose AD bit DANE trusts, and why there are none ("" when there are)."""
    if not delivery.dane:
        return (), "[delivery] dane = false"
    if delivery.dnssec_nameservers:
        return delivery.dnssec_nameservers, ""
    loopback = tuple(s for s in delivery.nameservers if ipaddress.ip_address(s[0]).is_loopback)
    if loopback:
        return loopback, ""
    return (), ("no trusted validating resolver: [delivery] dnssec_nameservers is empty and "
                "no [delivery] nameservers entry is on loopback")


class _Controller:
    """Receives what is not an answer to a query of ours: nothing to do with it."""

    def messageReceived(self, message: dns.Message, protocol: Any, address: Any = None) -> None:
        pass

    def connectionMade(self, protocol: Any) -> None:
        pass

    def connectionLost(self, protocol: Any) -> None:
        pass


class _ADQueryProtocol(dns.DNSDatagramProtocol):
    def writeMessage(self, message: dns.Message, address: Any) -> None:
        message.authenticData = 1  # "tell me whether you validated this" (RFC 6840 §5.7)
        super().writeMessage(message, address)


class _ADStreamProtocol(dns.DNSProtocol):
    """The same over TCP, for answers too large for UDP."""

    def writeMessage(self, message: dns.Message) -> None:
        message.authenticData = 1
        super().writeMessage(message)


class SecureResolver:
    """Asks `servers` in turn (each `timeout` seconds per try) over UDP, and over TCP when
    an answer comes truncated."""

    def __init__(self, reactor: Any, servers: Sequence[tuple[str, int]],
                 timeout: Sequence[float] = (1, 3)) -> None:
        self._reactor = reactor
        self._servers = tuple(servers)
        self._timeout = tuple(timeout)

    async def query(self, name: str, qtype: int) -> SecureAnswer:
        """The answer for (name, qtype); TemporaryDNSError when no server answers well."""
        try:
            query = dns.Query(name.encode("idna"), qtype, dns.IN)
        except UnicodeError:
            raise TemporaryDNSError(f"{name!r} is not a valid domain name") from None
        problem = "no server"
        for wait in self._timeout:
            for server in self._servers:
                try:
                    message = await self._ask(server, query, wait)
                except (QueryTimeout, names_error.DNSQueryTimeoutError):
                    problem = "timed out"
                    continue
                except (OSError, internet_error.CannotListenError) as failure:
                    problem = str(failure)
                    continue
                if message.rCode == dns.ENAME:
                    return SecureAnswer((), bool(message.authenticData), exists=False)
                if message.rCode != dns.OK:
                    problem = f"rcode {message.rCode}"
                    continue
                if message.trunc:  # too large for UDP: ask the same server over TCP
                    try:
                        message = await self._ask_tcp(server, query, wait)
                    except (QueryTimeout, names_error.DNSQueryTimeoutError):
                        problem = "timed out over TCP"
                        continue
                    except (OSError, internet_error.ConnectError) as failure:
                        problem = str(failure)
                        continue
                    if message.rCode != dns.OK:
                        problem = f"rcode {message.rCode} over TCP"
                        continue
                records = tuple(r.payload for r in message.answers if r.type == qtype)
                return SecureAnswer(records, bool(message.authenticData))
        kind = dns.QUERY_TYPES.get(qtype, "TLSA" if qtype == TLSA else str(qtype))
        raise TemporaryDNSError(f"DNSSEC lookup of {name} type={kind} failed: {problem}")

    async def _ask_tcp(self, server: tuple[str, int], query: dns.Query,
                       timeout: float) -> dns.Message:
        kind = TCP6ClientEndpoint if ":" in server[0] else TCP4ClientEndpoint
        endpoint = kind(self._reactor, server[0], server[1], timeout=timeout)
        protocol: Any = await endpoint.connect(
            Factory.forProtocol(lambda: _ADStreamProtocol(_Controller(), self._reactor)))
        try:
            message: dns.Message = await protocol.query([query], timeout)
            return message
        finally:
            protocol.transport.loseConnection()

    async def _ask(self, server: tuple[str, int], query: dns.Query,
                   timeout: float) -> dns.Message:
        protocol = _ADQueryProtocol(_Controller(), reactor=self._reactor)
        interface = "::" if ":" in server[0] else ""
        port = self._reactor.listenUDP(0, protocol, interface=interface)
        try:
            message: dns.Message = await protocol.query(server, [query], timeout)
            return message
        finally:
            await maybeDeferred(port.stopListening)
