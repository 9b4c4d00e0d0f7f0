"""Replies written to the socket at once: the short-answer fast path of a session's output.

Twisted's `transport.write` only queues: it registers the socket for writability (an
`epoll_ctl`), sends on the next turn of the reactor loop and unregisters again (another
`epoll_ctl`). A mail session writes a short reply and then waits for the client, so nearly
every write finds the socket's buffer empty and could go out at once. Under load that
round of bookkeeping was a tenth of a worker's CPU; `send_now` skips it when it safely can.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def send_now(transport: Any, data: bytes) -> None:
    """`transport.write(data)`, sending immediately when nothing else is queued on a plain
    TCP connection; whatever the kernel does not take at once is queued as usual.

    Only a plain `tcp.Connection` qualifies: TLS (which must encrypt first), a registered
    producer (which doWrite must wake) or a closing connection keep the ordinary path, so
    order and producer semantics are exactly those of `write`.
    """
    if (
        data
        and isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and transport.producer is None
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
        # An error (a lost connection) falls through: write() queues and doWrite reports it.
    if data:
        transport.write(data)
