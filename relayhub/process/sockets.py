"""The master's listening sockets, one per worker slot where the kernel can share a port.

Workers sharing one listening socket do not share the load: Twisted accepts up to a
hundred connections per wake-up, so whichever worker wakes first takes a whole burst. For
TCP endpoints the master therefore binds one socket per worker slot with SO_REUSEPORT and
the kernel spreads connections over them; a slot's socket stays open in the master while
its worker restarts, so connections wait for the new worker instead of being refused.
Other endpoints (UNIX sockets, systemd socket activation) keep one shared socket.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString

from relayhub.process import listeners


@dataclass
class BoundListener:
    """One configured listener as bound: a socket per slot, or one shared (`port` set)."""

    spec: listeners.ListenerSpec
    sockets: list[socket.socket]
    port: Any = None  # the Twisted port of a shared socket, to stop at the end

    def socket_for(self, slot: int) -> socket.socket:
        return self.sockets[slot % len(self.sockets)]

    def close(self) -> None:
        if self.port is not None:
            self.port.stopListening()
        else:
            for sock in self.sockets:
                sock.close()


def bind(reactor: Any, spec: listeners.ListenerSpec, slots: int) -> BoundListener:
    """Bind `spec` now (synchronously: before privileges go, and failing loudly)."""
    endpoint = serverFromString(reactor, spec.description)
    if isinstance(endpoint, TCP4ServerEndpoint | TCP6ServerEndpoint):
        family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) else socket.AF_INET
        # Twisted keeps the parsed description only in these attributes.
        address = (endpoint._interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"),
                   endpoint._port)
        # Twisted's default backlog (50) drops a burst of connections on the floor; unless
        # the description sets one, take the kernel's limit, as Postfix does.
        backlog = endpoint._backlog if "backlog=" in spec.description else system_backlog()
        return BoundListener(spec, [_reuseport_socket(family, address, backlog)
                                    for _ in range(max(slots, 1))])
    results: list[Any] = []
    # UNIX and systemd endpoints bind synchronously too.
    Deferred.fromCoroutine(listeners.bind(reactor, spec)).addBoth(results.append)
    if not results:
        raise RuntimeError(f"{spec.description}: listening did not complete synchronously")
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    port = results[0]
    return BoundListener(spec, [listeners.port_socket(port)], port)


def system_backlog() -> int:
    """The kernel's cap on a listen queue (net.core.somaxconn), or Python's idea of it."""
    try:
        return max(int(Path("/proc/sys/net/core/somaxconn").read_text()), socket.SOMAXCONN)
    except (OSError, ValueError):
        return socket.SOMAXCONN


def _reuseport_socket(family: int, address: tuple[str, int], backlog: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {address[0]}:{address[1]}: "
                                   f"{error.strerror}") from None
    return sock
