"""What every child process (worker, queue manager) does the same way: read the settings the
master validated from stdin, log through the master, talk AMP on fd 3, run its service, and
exit when the master goes away or sends SIGTERM."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any, TextIO

from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from relayhub.config import Settings, settings_from_text
from relayhub.directory import LastGood

# File descriptor of the AMP channel to the master (see relayhub.process.supervisor).
MASTER_FD = 3
# After the source line and after the last-good line on stdin.
SOURCE_END = "\n"


def read_settings(stdin: TextIO) -> tuple[Settings, LastGood]:
    """The master writes "<source>\\n<LastGood JSON>\\n<TOML text>" (empty text: built-in
    defaults)."""
    source, _, rest = stdin.read().partition(SOURCE_END)
    last_good, _, text = rest.partition(SOURCE_END)
    return settings_from_text(source, text or None), LastGood.from_json(last_good)


@implementer(ILogObserver)
class LineLogObserver:
    """One line per event on stdout: "<level> <namespace> <text>"; the master adds the time
    and the process's name when it writes the line to the hub's log."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            text += "\n" + failure.getTraceback()
        level = event.get("log_level", LogLevel.info).name
        namespace = event.get("log_namespace", "-")
        for line in text.splitlines() or [""]:
            self.out.write(f"{level} {namespace} {line}\n")
        self.out.flush()


def start_logging() -> None:
    observer = FilteringLogObserver(
        LineLogObserver(sys.stdout), [LogLevelFilterPredicate(LogLevel.info)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


class MasterChannel(amp.AMP):
    """This child's end of the AMP channel; when the master goes, the child goes too."""

    def __init__(self, on_lost: Callable[[], None], locator: Any = None) -> None:
        super().__init__(locator=locator)
        self._on_lost = on_lost

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self._on_lost()


def connect_master(reactor: Any, locator: Any = None) -> MasterChannel:
    """Adopt the inherited socketpair end as an AMP connection to the master."""
    channel: list[MasterChannel] = []

    def build() -> MasterChannel:
        protocol = MasterChannel(lambda: _stop(reactor), locator)
        channel.append(protocol)
        return protocol

    reactor.adoptStreamConnection(MASTER_FD, socket.AF_UNIX, Factory.forProtocol(build))
    os.close(MASTER_FD)  # Twisted has its own duplicate now
    return channel[0]


def _stop(reactor: Any) -> None:
    if reactor.running:
        reactor.stop()


def run(build: Callable[[Settings, Any, LastGood], IService]) -> None:
    """Read settings, build the service, run it until SIGTERM or the master's end."""
    from twisted.internet import reactor

    settings, last_good = read_settings(sys.stdin)
    start_logging()
    service = build(settings, reactor, last_good)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.maybeDeferred(service.stopService))
    reactor.run()
    # The service has stopped (shutdown waits for it): everything durable is done. Leave
    # now, so that no stray non-daemon thread can keep an orphaned child alive.
    sys.stdout.flush()
    os._exit(0)
