"""Listening sockets: which services listen where, bound once by the master and adopted by
every worker, so all workers accept on the same sockets and the kernel spreads the load."""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory

from relayhub.config import Settings
from relayhub.tls import endpoint_tls_options

# The first listening socket's descriptor in a worker: 0-2 are stdio, 3 is the AMP channel.
FIRST_LISTENER_FD = 4
# Services whose clients speak TLS from the first byte (RFC 8314), on [tls]'s certificate
# unless their endpoint is "ssl:" with its own.
IMPLICIT_TLS_SERVICES = frozenset({"smtps", "pop3s"})


@dataclass(frozen=True)
class ListenerSpec:
    """One listening endpoint and what it serves."""

    service: str  # "smtp" | "submission" | "smtps" | "pop3" | "pop3s"
    description: str  # the Twisted endpoint string from the configuration


@dataclass(frozen=True)
class AdoptedListener:
    """What a worker needs to adopt a socket the master bound."""

    spec: ListenerSpec
    fd: int  # in the worker
    family: int  # socket.AF_INET, AF_INET6 or AF_UNIX


def listener_specs(settings: Settings) -> list[ListenerSpec]:
    groups = (
        ("smtp", settings.smtp.listen), ("submission", settings.smtp.submission),
        ("smtps", settings.smtp.smtps), ("pop3", settings.pop3.listen),
        ("pop3s", settings.pop3.pop3s),
    )
    return [ListenerSpec(service, description)
            for service, descriptions in groups for description in descriptions]


class _NeverAccepts(Factory):
    """The master binds but never accepts (it stops reading at once); workers accept."""

    noisy = False


async def bind(reactor: Any, spec: ListenerSpec) -> Any:
    """Listen on `spec` in the master and return the port object, not accepting.

    Going through the endpoint keeps every endpoint type Twisted knows (tcp, tcp6, unix,
    systemd socket activation); what the workers need is the socket underneath.
    """
    port = await serverFromString(reactor, spec.description).listen(_NeverAccepts())
    port.stopReading()
    return port


def port_socket(port: Any) -> socket.socket:
    sock: socket.socket = port.socket
    return sock


def encode(listeners: list[AdoptedListener]) -> str:
    return json.dumps([{"fd": item.fd, "family": item.family, **asdict(item.spec)}
                       for item in listeners])


def decode(text: str) -> list[AdoptedListener]:
    return [AdoptedListener(ListenerSpec(item["service"], item["description"]), item["fd"],
                            item["family"]) for item in json.loads(text)]


def implicit_tls_options(spec: ListenerSpec, server_options: Any) -> Any:
    """The TLS options wrapping `spec`'s connections from their first byte, or None for a
    plaintext listener (where STARTTLS/STLS may follow). An "ssl:" endpoint brings its own
    certificate; smtps and pop3s listeners otherwise use `server_options` ([tls]), and
    cannot be served when that is None. Raises relayhub.tls.TLSSetupError.

    The master binds an "ssl:" endpoint like any other, but a worker adopts only the bare
    socket: without this its clients would be served in plaintext."""
    own = endpoint_tls_options(spec.description)
    if own is not None:
        return own
    return server_options if spec.service in IMPLICIT_TLS_SERVICES else None


def with_tls(factory: Factory[Any], options: Any) -> TLSMemoryBIOFactory:
    """`factory`'s protocols behind a TLS server layer (their transport is then an
    ISSLTransport, so sessions know TLS is active and offer no STARTTLS/STLS)."""
    wrapped = TLSMemoryBIOFactory(options, False, factory)
    wrapped.noisy = False
    return wrapped


def adopt(reactor: Any, listener: AdoptedListener, factory: Factory) -> Any:
    """Accept on an inherited socket in a worker (Twisted dups the descriptor)."""
    return reactor.adoptStreamPort(listener.fd, listener.family, factory)


def close_all(ports: list[Any]) -> defer.Deferred[Any]:
    return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])
