"""What every child process (worker, queue manager) does the same way: read the settings the
master validated from stdin, log to the master's stdout, talk AMP on fd 3, run its service, and
exit when the master goes away or sends SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
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
    formatTime,
    globalLogBeginner,
)
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from relayhub.config import Settings, settings_from_text
from relayhub.directory import LastGood
from relayhub.jsonlog import ChildJsonObserver
from relayhub.metrics import MetricsObserver, ProcessMetrics
from relayhub.process import commands

# File descriptor of the AMP channel to the master (see relayhub.process.supervisor).
MASTER_FD = 3
# The child's name and role in the log ("worker-1", "worker"), set by the master
# (relayhub.process.supervisor).
LOG_NAME_VARIABLE = "RELAYHUB_CHILD_NAME"
LOG_ROLE_VARIABLE = "RELAYHUB_CHILD_ROLE"
# After the source line and after the last-good line on stdin.
SOURCE_END = "\n"
# The master's [log] format, "text" or "json", in the child's environment: the master reads
# what its children write, so the two must agree even after a reload changed the file.
LOG_FORMAT_VARIABLE = "RELAYHUB_LOG_FORMAT"
# How long a stopping child waits for the master to take its last metrics.
FINAL_REPORT_TIMEOUT = 2.0


def read_settings(stdin: TextIO) -> tuple[Settings, LastGood]:
    """The master writes "<source>\\n<LastGood JSON>\\n<TOML text>" (empty text: built-in
    defaults)."""
    source, _, rest = stdin.read().partition(SOURCE_END)
    last_good, _, text = rest.partition(SOURCE_END)
    return settings_from_text(source, text or None), LastGood.from_json(last_good)


class LogWriter:
    """Finished log lines to the stdout a child shares with the master, gathered over one
    turn of the reactor and written with one write(2): whole lines only, so lines from
    different processes never interleave within a line.

    Under load a worker logs several lines per message; a system call for each was the
    largest single cost of logging. Lines logged outside the reactor thread, or before it
    runs, are written at once. `flush` is called before the process exits.
    """

    def __init__(self, fd: int, reactor: Any) -> None:
        self.fd = fd
        self._reactor = reactor
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._reactor.running or not isInIOThread():
            self._write(data)
            return
        if not self._pending:
            self._reactor.callLater(0, self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data, self._pending = b"".join(self._pending), []
            self._write(data)

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a log that cannot be written must not kill us
            while data:
                data = data[os.write(self.fd, data):]


@implementer(ILogObserver)
class LineLogObserver:
    """Writes each event as one finished line of the hub's log, in the master's own format:
    "<time> [relayhub.process.supervisor#<level>] <name>[<pid>] [<namespace>] <text>".

    Children share the master's stdout and write to it themselves instead of piping lines
    through the master to be parsed and written again: that relay cost the master about
    half of its CPU under load.
    """

    def __init__(self, out: LogWriter, name: str, pid: int) -> None:
        self.out = out
        self.prefix = f"{name}[{pid}]"
        self._second = -1
        self._stamp = ""

    def _time(self, when: float) -> str:
        second = int(when)
        if second != self._second:  # formatting a time is the slow part; once a second
            self._second, self._stamp = second, formatTime(second)
        return self._stamp

    def __call__(self, event: dict[str, Any]) -> None:
        text = _format(event)
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            text += "\n" + failure.getTraceback()
        head = (f"{self._time(event.get('log_time') or time.time())} "
                f"[relayhub.process.supervisor#{event.get('log_level', LogLevel.info).name}] "
                f"{self.prefix} [{event.get('log_namespace', '-')}] ")
        self.out.write("".join(f"{head}{line}\n" for line in text.splitlines() or [""]).encode())


def _format(event: dict[str, Any]) -> str:
    """The event's text: str.format_map, which runs in C, for the plain "{field}" formats
    of relayhub.maillog; Twisted's own formatter (slower: several times the whole cost of
    writing the line) for anything else, such as its "{method()}" calls."""
    log_format = event.get("log_format")
    if isinstance(log_format, str) and "()" not in log_format:
        with contextlib.suppress(Exception):
            return log_format.format_map(event)
    return formatEvent(event)


def start_logging(metrics: ProcessMetrics, reactor: Any) -> LogWriter:
    name = os.environ.get(LOG_NAME_VARIABLE, "child")
    out = LogWriter(sys.stdout.fileno(), reactor)
    lines: ILogObserver = (
        ChildJsonObserver(out.write, name, os.environ.get(LOG_ROLE_VARIABLE, ""), os.getpid())
        if os.environ.get(LOG_FORMAT_VARIABLE) == "json"
        else LineLogObserver(out, name, os.getpid()))
    observer = FilteringLogObserver(lines, [LogLevelFilterPredicate(LogLevel.info)])
    # Metrics count events of every level, so they see them unfiltered.
    globalLogBeginner.beginLoggingTo([observer, MetricsObserver(metrics)],
                                     redirectStandardIO=False)
    return out


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


def run(build: Callable[[Settings, Any, ProcessMetrics, LastGood], IService]) -> None:
    """Read settings, build the service, run it until SIGTERM or the master's end."""
    from twisted.internet import reactor

    settings, last_good = read_settings(sys.stdin)
    metrics = ProcessMetrics()
    log = start_logging(metrics, reactor)
    service = build(settings, reactor, metrics, last_good)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.maybeDeferred(service.stopService))
    reactor.run()
    # The service has stopped (shutdown waits for it): everything durable is done. Leave
    # now, so that no stray non-daemon thread can keep an orphaned child alive.
    log.flush()
    sys.stdout.flush()
    os._exit(0)
