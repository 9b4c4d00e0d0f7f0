"""What every child process (worker, queue manager) does the same way: read the settings the
master validated from stdin, log through the master, talk AMP on fd 3, run its service, and
exit when the master goes away or sends SIGTERM."""

from __future__ import annotations

import json
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
from relayhub.jsonlog import ChildJsonObserver
from relayhub.metrics import MetricsObserver, ProcessMetrics
from relayhub.process import commands

# File descriptor of the AMP channel to the master (see relayhub.process.supervisor).
MASTER_FD = 3
# Between the source line and the configuration text on stdin.
SOURCE_END = "\n"
# The master's [log] format, "text" or "json", in the child's environment: the master reads
# what its children write, so the two must agree even after a reload changed the file.
LOG_FORMAT_VARIABLE = "RELAYHUB_LOG_FORMAT"
# How long a stopping child waits for the master to take its last metrics.
FINAL_REPORT_TIMEOUT = 2.0


def read_settings(stdin: TextIO) -> Settings:
    """The master writes "<source>\\n<TOML text>" (empty text: built-in defaults)."""
    source, _, text = stdin.read().partition(SOURCE_END)
    return settings_from_text(source, text or None)


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


def start_logging(metrics: ProcessMetrics) -> None:
    lines: ILogObserver = (ChildJsonObserver(sys.stdout)
                           if os.environ.get(LOG_FORMAT_VARIABLE) == "json"
                           else LineLogObserver(sys.stdout))
    observer = FilteringLogObserver(lines, [LogLevelFilterPredicate(LogLevel.info)])
    # Metrics count events of every level, so they see them unfiltered.
    globalLogBeginner.beginLoggingTo([observer, MetricsObserver(metrics)],
                                     redirectStandardIO=False)


class ChildLocator(amp.CommandLocator):
    """What the master may ask of every child; a child type adds its own commands."""

    def __init__(self, metrics: ProcessMetrics) -> None:
        super().__init__()
        self.metrics = metrics
        self.channel: MasterChannel | None = None  # set by connect_master
        self.reactor: Any = None

    @commands.Metrics.responder
    def report_metrics(self) -> dict[str, str] | defer.Deferred[dict[str, str]]:
        return {"samples": json.dumps(self.metrics.samples())}

    def report_final(self) -> defer.Deferred[None]:
        """Give the master this process's last counts; a stopping child calls this last."""
        if self.channel is None:
            return defer.succeed(None)
        sent: defer.Deferred[object] = self.channel.callRemote(
            commands.FinalMetrics, samples=json.dumps(self.metrics.samples()))
        sent.addTimeout(FINAL_REPORT_TIMEOUT, self.reactor)
        return sent.addBoth(lambda _: None)  # a master that cannot take it has gone


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
        if isinstance(locator, ChildLocator):
            locator.channel, locator.reactor = protocol, reactor
        return protocol

    reactor.adoptStreamConnection(MASTER_FD, socket.AF_UNIX, Factory.forProtocol(build))
    os.close(MASTER_FD)  # Twisted has its own duplicate now
    return channel[0]


def _stop(reactor: Any) -> None:
    if reactor.running:
        reactor.stop()


def run(build: Callable[[Settings, Any, ProcessMetrics], IService]) -> None:
    """Read settings, build the service, run it until SIGTERM or the master's end."""
    from twisted.internet import reactor

    settings = read_settings(sys.stdin)
    metrics = ProcessMetrics()
    start_logging(metrics)
    service = build(settings, reactor, metrics)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.maybeDeferred(service.stopService))
    reactor.run()
    # The service has stopped (shutdown waits for it): everything durable is done. Leave
    # now, so that no stray non-daemon thread can keep an orphaned child alive.
    sys.stdout.flush()
    os._exit(0)
