"""The master process (`twistd relayhub`): binds every listening socket, runs the protocol
workers and the queue manager as children under `[server].user`, counts connections
across workers, serves the control socket, and handles SIGHUP (reload) and SIGTERM.

Like Postfix's master it keeps root when started as root, so that a reload can start new
children as the service user; it never parses mail clients' input itself. The one thing it
answers on the network is /metrics ([metrics] listen, relayhub.process.scrape): a GET on a
loopback or management address, parsed by Twisted's HTTP server.
"""

from __future__ import annotations

import os
import pwd
import signal
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.protocols import amp

from relayhub import control, maillog
from relayhub.admission import ConnectionCounter, RefusalLog
from relayhub.config import ConfigError, Settings, read_config, settings_from_text
from relayhub.directory import Directory
from relayhub.process import commands, listeners, scrape, sockets
from relayhub.process.supervisor import ChildSpec, SupervisedChild
from relayhub.users import UsersFileError

_LOG = Logger(namespace="relayhub.master")
T = TypeVar("T")

# Children get this long past shutdown_grace to exit on their own before SIGKILL.
KILL_MARGIN = 10.0
# A child that has not re-read the users and aliases files by then is reported as such.
REFRESH_TIMEOUT = 5.0  # below relayhubctl's own wait for an answer


class _ChildLocator(amp.CommandLocator):
    """What one child may ask of the master."""

    def __init__(self, master: MasterService, child: SupervisedChild) -> None:
        super().__init__()
        self.master = master
        self.child = child

    @commands.Admit.responder
    def admit(self, service: str, address: str, exempt: bool) -> defer.Deferred[dict[str, str]]:
        def decide() -> str:
            return self.master.admission.admit(self.child.spec.name, service, address, exempt)

        def answer(refusal: str) -> dict[str, str]:
            if refusal:
                self.master.refused(address, refusal)
            return {"refusal": refusal}

        return self.master.with_reclaimed_slots(decide, lambda refusal: bool(refusal)
                                                ).addCallback(answer)

    @commands.Lend.responder
    def lend(self, wanted: int, in_use: int) -> defer.Deferred[dict[str, int]]:
        name = self.child.spec.name
        granted = self.master.with_reclaimed_slots(
            lambda: self.master.admission.lend(name, wanted, in_use), lambda n: n == 0)
        return granted.addCallback(lambda n: {"granted": n})

    @commands.GiveBack.responder
    def give_back(self, count: int, in_use: int) -> dict[str, int]:
        self.master.admission.give_back(self.child.spec.name, count, in_use)
        return {}

    @commands.Release.responder
    def release(self, service: str, address: str) -> dict[str, str]:
        self.master.admission.release(self.child.spec.name, service, address)
        return {}

    @commands.FinalMetrics.responder
    def final_metrics(self, samples: str) -> dict[str, str]:
        self.master.collector.reported(self.child, samples)
        return {}

    @commands.NewMail.responder
    def new_mail(self) -> dict[str, str]:
        self.master.wake()
        return {}


class MasterService(Service):
    def __init__(self, config_path: str | None, config: tuple[str, str | None],
                 settings: Settings, reactor: Any) -> None:
        """`config` is the (source, text) that `settings` was parsed from: children get that
        very text, never a second read of a file that may have changed since."""
        self.config_path = config_path
        self.config = config
        self.settings = settings
        self.reactor = reactor
        self.admission = ConnectionCounter(settings.smtp)
        self.refusals = RefusalLog()
        self._refusal_summaries = task.LoopingCall(self._log_refusals)
        self._refusal_summaries.clock = reactor
        self.bound: list[sockets.BoundListener] = []
        self.workers: list[SupervisedChild] = []
        self.queue_manager: SupervisedChild | None = None
        self._generation = 0
        self._started_at = 0.0
        self._control_port: Any = None
        self.collector = scrape.MetricsCollector(reactor)
        self._metrics_ports: list[Any] = []
        # Fixed for this run: children write what the master's log observer expects.
        self._log_format = settings.log.format
        self._uid, self._gid = self._service_user()
        # The master's own copy of users and aliases: the last good version that children
        # started later (reload, restart) fall back on while a file is broken.
        self.directory = Directory(settings, reactor)

    # -- start ---------------------------------------------------------------------

    def _service_user(self) -> tuple[int | None, int | None]:
        """Children run as [server].user when we are root; otherwise as ourselves."""
        name = self.settings.server.user
        if os.getuid() != 0 or not name:
            return None, None
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid

    def privilegedStartService(self) -> None:
        """Bind every listener now, while we may still open low ports."""
        super().privilegedStartService()
        state_dir = self.settings.server.state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._uid is not None and self._gid is not None:
            os.chown(state_dir, self._uid, self._gid)
        for spec in listeners.listener_specs(self.settings):
            # A failure (port in use, no permission) stops start-up here, loudly.
            self.bound.append(sockets.bind(self.reactor, spec, self.settings.server.workers))
            _LOG.info("{service} listening on {endpoint}", service=spec.service,
                      endpoint=spec.description)
        self._metrics_ports = scrape.listen(self.reactor, self.settings.metrics.listen,
                                            self.collector)

    def startService(self) -> None:
        super().startService()
        self.directory.startService()
        self._started_at = self.reactor.seconds()
        # twistd starts services before the reactor installs its signal handlers; ours go in
        # after them and replace them.
        self.reactor.callWhenRunning(self._install_signal_handlers)
        self._start_workers(self.settings)
        self._start_queue_manager()
        self._refusal_summaries.start(self.refusals.period, now=False)
        control.listen(self.reactor, self.settings.server.state_dir, self).addCallbacks(
            self._control_listening,
            lambda failure: _LOG.failure("cannot serve the control socket", failure))

    def _install_signal_handlers(self) -> None:
        """SIGTERM: an orderly stop that exits 0 (the reactor's own handler would make
        twistd re-raise the signal). SIGHUP: reload."""
        signal.signal(signal.SIGTERM, lambda *_: self.reactor.callFromThread(self._terminate))
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))

    def _terminate(self) -> None:
        _LOG.info("SIGTERM: stopping")
        self.reactor.stop()

    def _control_listening(self, port: Any) -> None:
        self._control_port = port
        if self._uid is not None and self._gid is not None:
            # relayhubctl run as the service user may use it too (it stays 0600).
            os.chown(control.socket_path(self.settings.server.state_dir), self._uid, self._gid)

    def _start_workers(self, settings: Settings) -> None:
        self._generation += 1
        generation = self._generation
        self.workers = []
        for number in range(1, settings.server.workers + 1):
            slot = [bound.socket_for(number - 1) for bound in self.bound]
            adopted = listeners.encode([
                listeners.AdoptedListener(bound.spec, listeners.FIRST_LISTENER_FD + i,
                                          sock.family)
                for i, (bound, sock) in enumerate(zip(self.bound, slot, strict=True))])
            self.workers.append(self._spawn(ChildSpec(
                role="worker", name=f"worker-{number}.{generation}",
                module="relayhub.process.worker", listener_fds=[s.fileno() for s in slot],
                environment={"RELAYHUB_LISTENERS": adopted, "RELAYHUB_WORKER": str(number)},
            )))

    def _start_queue_manager(self) -> None:
        if self.running:
            self.queue_manager = self._spawn(ChildSpec(
                role="queue-manager", name="queue-manager", module="relayhub.process.qmgr"))

    def _spawn(self, spec: ChildSpec) -> SupervisedChild:
        child = SupervisedChild(
            self.reactor, spec, self.config, uid=self._uid, gid=self._gid,
            locator_factory=lambda c: _ChildLocator(self, c), on_exit=self._exited,
            last_good=lambda: self.directory.last_good().to_json(),
            log_format=self._log_format)
        child.start()
        self.collector.started(child)
        return child

    def _exited(self, child: SupervisedChild) -> None:
        # A dead worker's sessions died with it; stop counting them.
        self.admission.forget(child.spec.name)
        self.collector.exited(child)

    # -- what children and the control socket ask ----------------------------------

    def wake(self) -> None:
        """Tell the queue manager to look at the queue now."""
        channel = self.queue_manager.channel if self.queue_manager else None
        if channel is not None:
            channel.callRemote(commands.Wake)

    def refresh(self) -> defer.Deferred[list[str]]:
        """Every process re-reads the users and aliases files now; fires when all have (the
        master first, so that children started meanwhile get the new version). Answers
        the children that did not confirm in time."""

        def tell_children(_: object) -> defer.Deferred[list[str]]:
            children = [child for child in [*self.workers, self.queue_manager]
                        if child is not None and child.channel is not None]
            asked = [self._refresh_child(child) for child in children]
            return defer.gatherResults(asked).addCallback(
                lambda answers: [answer for answer in answers if answer])

        return self.directory.refresh().addCallback(tell_children)

    def _refresh_child(self, child: SupervisedChild) -> defer.Deferred[str]:
        """Empty when `child` has re-read the files; else what went wrong."""
        assert child.channel is not None
        asked: defer.Deferred[Any] = child.channel.callRemote(commands.Refresh)
        asked.addTimeout(REFRESH_TIMEOUT, self.reactor)

        def failed(failure: Any) -> str:
            # A child that died meanwhile reads the files afresh when it is restarted.
            problem = f"{child.spec.name} did not confirm: {failure.getErrorMessage()}"
            _LOG.warn("users/aliases refresh: {problem}", problem=problem)
            return problem

        return asked.addCallbacks(lambda _: "", failed)

    def with_reclaimed_slots(self, decide: Callable[[], T], refused: Callable[[T], bool]
                             ) -> defer.Deferred[T]:
        """`decide()`; if that refuses while workers hold lent slots they do not use, take
        those back (relayhub.admission) and decide again."""
        first = decide()
        holders = [child for child in self.workers if child.channel is not None
                   and child.spec.name in self.admission.idle_lent()]
        if not refused(first) or not holders:
            return defer.succeed(first)

        def reclaim(child: SupervisedChild) -> defer.Deferred[Any]:
            assert child.channel is not None
            asked: defer.Deferred[Any] = child.channel.callRemote(commands.Reclaim)
            asked.addTimeout(REFRESH_TIMEOUT, self.reactor)
            asked.addCallback(lambda reply: self.admission.give_back(
                child.spec.name, reply["returned"], reply["in_use"]))
            return asked.addErrback(lambda _: None)  # gone or slow: its slots stay lent

        return defer.gatherResults([reclaim(child) for child in holders]).addCallback(
            lambda _: decide())

    def refused(self, address: str, reason: str) -> None:
        """A session was refused by a connection limit: logged once per client, then
        counted (SPEC §3 limits; a flood must not flood the log)."""
        if self.refusals.refused(address, reason, self.reactor.seconds()):
            maillog.SMTPD.warn(maillog.CONNECTION_REFUSED, client=address, reply="421 4.7.0",
                               reason=reason)

    def _log_refusals(self) -> None:
        for address, count, reason in self.refusals.summaries(self.reactor.seconds()):
            maillog.SMTPD.warn(maillog.CONNECTIONS_REFUSED, client=address, count=count,
                               period=int(self.refusals.period), reason=reason)

    def status(self) -> dict[str, Any]:
        now = self.reactor.seconds()
        processes = [{"role": "master", "pid": os.getpid(),
                      "uptime_seconds": round(now - self._started_at, 1)}]
        for child in [*self.workers, *([self.queue_manager] if self.queue_manager else [])]:
            if child.pid is not None:
                processes.append({"role": child.spec.role, "pid": child.pid,
                                  "uptime_seconds": round(now - child.started_at, 1)})
        return {"processes": processes, "connections": self.admission.totals()}

    def reload(self) -> defer.Deferred[list[str]]:
        """Re-read the configuration and replace the children with ones that use it.

        New workers start before the old ones are told to finish, so no connection is
        refused meanwhile; old workers stop accepting and end their sessions. The queue
        manager is replaced after the old one has stopped, since two would both claim
        the queue.
        """
        try:
            config = read_config(self.config_path)
            settings = settings_from_text(*config)
        except ConfigError as error:
            for problem in error.problems:
                _LOG.error("reload refused, configuration kept: {problem}", problem=problem)
            return defer.succeed(list(error.problems))
        directory = self._directory_for(settings)

        def refused(failure: Any) -> list[str]:
            failure.trap(UsersFileError)
            for problem in failure.value.problems:
                _LOG.error("reload refused, configuration kept: {problem}", problem=problem)
            return list(failure.value.problems)

        return directory.addCallback(self._replace_children, config, settings).addErrback(
            refused)

    def _directory_for(self, settings: Settings) -> defer.Deferred[Directory]:
        """The master's directory for `settings`: ours, refreshed (a broken file keeps the
        last good version), or a new one when the files are others now (read in a thread;
        a broken users file there fails with UsersFileError, as at start-up)."""
        ours = self.directory
        if (settings.users.file, settings.aliases.file) == (
                ours.users.path, ours.aliases.path):
            return ours.refresh().addCallback(lambda _: ours)
        built: defer.Deferred[Directory] = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), Directory, settings, self.reactor)
        return built

    def _replace_children(self, directory: Directory, config: tuple[str, str | None],
                          settings: Settings) -> list[str]:
        if directory is not self.directory:
            self.directory.stopService()
            self.directory = directory
            directory.startService()
        if (listeners.listener_specs(settings) != [bound.spec for bound in self.bound]
                or settings.metrics != self.settings.metrics or settings.log != self.settings.log):
            _LOG.warn("listener, [metrics] and [log] changes take effect at the next restart; "
                      "other changes now")
        self.config, self.settings = config, settings
        self.admission.limits = settings.smtp
        old_workers, old_manager = self.workers, self.queue_manager
        self._start_workers(settings)
        for worker in old_workers:
            worker.stop()
        if old_manager is None:
            self._start_queue_manager()
        else:
            old_manager.stop().addCallback(lambda _: self._start_queue_manager())
        _LOG.info("reloaded {source}", source=config[0])
        return []

    # -- stop ------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.directory.stopService()
        if self._refusal_summaries.running:
            self._refusal_summaries.stop()
        children = [*self.workers, *([self.queue_manager] if self.queue_manager else [])]
        stopping = defer.gatherResults([child.stop() for child in children])

        def kill_stragglers() -> None:
            for child in children:
                child.kill()

        deadline = self.reactor.callLater(
            self.settings.server.shutdown_grace + KILL_MARGIN, kill_stragglers)
        stopping.addBoth(lambda _: deadline.cancel() if deadline.active() else None)
        if self._control_port is not None:
            stopping.addBoth(lambda _: self._control_port.stopListening())
        stopping.addBoth(lambda _: self._close_listeners())
        stopping.addBoth(lambda _: defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in self._metrics_ports]))
        return stopping.addBoth(lambda _: None)

    def _close_listeners(self) -> None:
        for bound in self.bound:
            bound.close()
