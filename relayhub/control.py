"""The control channel: `relayhubctl` talks to a running daemon with AMP over a Unix socket
in the state directory, readable only by the service user and root (mode 0600)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Protocol

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, serverFromString
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory
from twisted.protocols import amp

SOCKET_NAME = "control.sock"


class Wake(amp.Command):
    """The queue changed (flush, release, new mail): look at it now."""


class Status(amp.Command):
    """The daemon's processes and connections, as JSON (SPEC §8 `status --json`)."""

    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"status", amp.Unicode())]


class Reload(amp.Command):
    """Re-read configuration, aliases, users and certificates (SIGHUP does the same).
    Answers the configuration problems that kept the running configuration in place."""

    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [
        (b"problems", amp.ListOf(amp.Unicode()))]


class Refresh(amp.Command):
    """The users or aliases file was edited (`relayhubctl user add`): every process re-reads
    it now. Answers once all have, with the processes that did not confirm."""

    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [
        (b"problems", amp.ListOf(amp.Unicode()))]


class ControlTarget(Protocol):
    """What the daemon offers the control channel."""

    def wake(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def reload(self) -> defer.Deferred[list[str]]: ...

    def refresh(self) -> defer.Deferred[list[str]]: ...


class ControlServer(amp.AMP):
    def __init__(self, target: ControlTarget) -> None:
        super().__init__()
        self.target = target

    @Wake.responder
    def wake(self) -> dict[str, Any]:
        self.target.wake()
        return {}

    @Status.responder
    def status(self) -> dict[str, Any]:
        return {"status": json.dumps(self.target.status())}

    @Reload.responder
    def reload(self) -> defer.Deferred[dict[str, Any]]:
        return self.target.reload().addCallback(lambda problems: {"problems": problems})

    @Refresh.responder
    def refresh(self) -> defer.Deferred[dict[str, Any]]:
        return self.target.refresh().addCallback(lambda problems: {"problems": problems})


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def listen(reactor: Any, state_dir: Path, target: ControlTarget) -> defer.Deferred[Any]:
    """Serve the control socket; lockfile=1 lets a restart replace a crashed run's socket."""
    endpoint = serverFromString(
        reactor, f"unix:{socket_path(state_dir)}:mode=600:lockfile=1")
    factory = Factory.forProtocol(lambda: ControlServer(target))
    factory.noisy = False
    listening: defer.Deferred[Any] = endpoint.listen(factory)
    return listening


async def call(reactor: Any, state_dir: Path, command: type[amp.Command],
               **arguments: Any) -> dict[str, Any] | None:
    """Send one command to the running daemon; None when no daemon is listening."""
    endpoint = UNIXClientEndpoint(reactor, str(socket_path(state_dir)), timeout=5)
    try:
        client = await endpoint.connect(Factory.forProtocol(amp.AMP))
    except (ConnectError, FileNotFoundError):
        return None
    try:
        answer: dict[str, Any] = await client.callRemote(command, **arguments)
        return answer
    finally:
        client.transport.loseConnection()
