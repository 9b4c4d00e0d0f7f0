"""The master's side of one child process: spawn it with its sockets, relay its log lines,
talk AMP to it, and restart it when it dies, backing off when it keeps dying."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.protocols import amp
from twisted.python.failure import Failure

from relayhub import jsonlog, maillog
from relayhub.process.child import (
    LOG_FORMAT_VARIABLE,
    LOG_NAME_VARIABLE,
    LOG_ROLE_VARIABLE,
    MASTER_FD,
    SOURCE_END,
)
from relayhub.process.listeners import FIRST_LISTENER_FD

_LOG = Logger(namespace="relayhub.master")

# A child that lived at least this long before dying is restarted quickly; one that dies
# sooner is in a crash loop, and each restart waits twice as long, up to the maximum.
STABLE_AFTER = 10.0
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0


@dataclass(frozen=True)
class ChildSpec:
    """What to run: a role ("worker", "queue-manager"), its module, and its sockets."""

    role: str
    name: str  # "worker-1", "queue-manager": in logs and status
    module: str  # run as `python -m <module>`
    listener_fds: Sequence[int] = ()  # the master's descriptors, inherited from fd 4 on
    environment: Mapping[str, str] = field(default_factory=dict)  # extra variables


class _Output(ProcessProtocol):
    """Relays the child's stray output lines into the master's log and reports its end."""

    def __init__(self, child: SupervisedChild) -> None:
        self.child = child
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            self.child.relay_log(line.decode("utf-8", "replace"), from_stderr=fd == 2)

    def processEnded(self, reason: Failure) -> None:
        self.child.ended(reason)


class SupervisedChild:
    """One child slot: it is kept running until `stop()`."""

    def __init__(self, reactor: Any, spec: ChildSpec, config: tuple[str, str | None], *,
                 locator_factory: Callable[[SupervisedChild], Any],
                 on_exit: Callable[[SupervisedChild], None] = lambda child: None,
                 last_good: Callable[[], str] = lambda: "",
                 uid: int | None = None, gid: int | None = None,
                 log_format: str = "text") -> None:
        """`last_good`: the master's LastGood (JSON) of users and aliases at each start."""
        self.reactor = reactor
        self.spec = spec
        self.config = config
        self.log_format = log_format
        self.uid, self.gid = uid, gid
        self._locator_factory = locator_factory
        self._on_exit = on_exit
        self._last_good = last_good
        self.process: Any = None
        # Twisted forgets a process's pid as it ends; the log line about its end needs it.
        self.last_pid: int | None = None
        self.channel: amp.AMP | None = None
        self.started_at = 0.0
        self.restarts = 0
        self._delay = FIRST_RESTART_DELAY
        self._stopping = False
        self._ended: defer.Deferred[None] | None = None
        self._restart_call: Any = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def stopping(self) -> bool:
        """Told to stop: an exit now is the end, not a death to restart."""
        return self._stopping

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # stdout is the master's own: children write finished log lines there themselves
        # (relayhub.process.child.LineLogObserver). stderr (a crash before logging began)
        # still comes through the master, marked as the child's.
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: "r", MASTER_FD: theirs.fileno()}
        for offset, fd in enumerate(self.spec.listener_fds):
            child_fds[FIRST_LISTENER_FD + offset] = fd
        environment = {**os.environ, **self.spec.environment,
                       LOG_FORMAT_VARIABLE: self.log_format, LOG_NAME_VARIABLE: self.spec.name,
                       LOG_ROLE_VARIABLE: self.spec.role}
        self._ended = defer.Deferred()
        self.process = self.reactor.spawnProcess(
            _Output(self), sys.executable, [sys.executable, "-m", self.spec.module],
            env=environment, childFDs=child_fds, uid=self.uid, gid=self.gid,
        )
        theirs.close()  # the child has it now
        self.last_pid = self.process.pid
        source, text = self.config
        self.process.write(
            f"{source}{SOURCE_END}{self._last_good()}{SOURCE_END}{text or ''}".encode())
        self.process.closeStdin()
        channel = self.channel = amp.AMP(locator=self._locator_factory(self))
        self.reactor.adoptStreamConnection(
            ours.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: channel))
        ours.close()
        self.started_at = self.reactor.seconds()
        _LOG.info("started {name} (pid {pid})", name=self.spec.name, pid=self.pid)

    def relay_log(self, line: str, *, from_stderr: bool) -> None:
        """A line the child wrote outside its log (a crash before logging began, stray
        output): passed on as it is, marked with the child's name."""
        if self.log_format == "json":
            jsonlog.relay(_LOG, line, child=self.spec.name, role=self.spec.role, pid=self.pid)
            return
        level = LogLevel.warn if from_stderr else LogLevel.info
        _LOG.emit(level, "{child}[{pid}] {text}", child=self.spec.name, pid=self.pid,
                  text=line)

    def ended(self, reason: Failure) -> None:
        lived = self.reactor.seconds() - self.started_at
        cause = reason.value
        if isinstance(cause, error.ProcessTerminated) and cause.signal is not None:
            why = f"killed by signal {cause.signal}"
        elif isinstance(cause, error.ProcessTerminated):
            why = f"exited with status {cause.exitCode}"
        else:
            why = "exited normally"
        self.process, self.channel = None, None
        self._on_exit(self)
        done, self._ended = self._ended, None
        if self._stopping:
            _LOG.info(maillog.CHILD_STOPPED, name=self.spec.name, pid=self.last_pid, why=why)
        else:
            self._delay = FIRST_RESTART_DELAY if lived >= STABLE_AFTER else min(
                self._delay * 2, MAX_RESTART_DELAY)
            _LOG.error(maillog.CHILD_DIED, name=self.spec.name, pid=self.last_pid,
                       lived=lived, why=why, delay=self._delay)
            self.restarts += 1
            self._restart_call = self.reactor.callLater(self._delay, self._restart)
        if done is not None:
            done.callback(None)

    def _restart(self) -> None:
        self._restart_call = None
        if not self._stopping:
            self.start()

    def stop(self, signum: int = signal.SIGTERM) -> defer.Deferred[None]:
        """Ask the child to finish (SIGTERM: stop accepting, let sessions end) and fire
        when it has exited. A pending restart is cancelled."""
        self._stopping = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        if self.process is None or self._ended is None:
            return defer.succeed(None)
        waiting: defer.Deferred[None] = defer.Deferred()
        self._ended.addCallback(lambda _: waiting.callback(None))
        with contextlib.suppress(error.ProcessExitedAlready):
            self.process.signalProcess(signum)
        return waiting

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(error.ProcessExitedAlready):
                self.process.signalProcess("KILL")
