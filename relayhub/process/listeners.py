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

from relayhub.config import Settings

# The first listening socket's descriptor in a worker: 0-2 are stdio, 3 is the AMP channel.
FIRST_LISTENER_FD = 4


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


def adopt(reactor: Any, listener: AdoptedListener, factory: Factory) -> Any:
    """Accept on an inherited socket in a worker (Twisted dups the descriptor)."""
    return reactor.adoptStreamPort(listener.fd, listener.family, factory)


def close_all(ports: list[Any]) -> defer.Deferred[Any]:
    return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])
