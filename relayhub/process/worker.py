"""A protocol worker: serves every SMTP and POP3 listener on the sockets the master bound,
queues what it accepts, and tells the master about new mail and about each session."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from relayhub.admission import SMTP_SERVICES, LentSlots, quota_block
from relayhub.config import Settings
from relayhub.directory import Directory, LastGood
from relayhub.metrics import ProcessMetrics
from relayhub.pop3.server import POP3Factory
from relayhub.pop3.service import pop3_factory
from relayhub.process import child, commands, listeners
from relayhub.queue.backends import open_store
from relayhub.smtp.service import SMTPService
from relayhub.tls import TLSSetupError, server_tls_options

_LOG = Logger(namespace="relayhub.worker")

# While draining, how often to look whether the last sessions have ended.
DRAIN_POLL = 0.2
# How often the count of trusted sessions reaches the master (when it changed).
SESSION_REPORT_INTERVAL = 1.0
# Under load, new mail reaches the master at most this often: one NewMail (and one wake of
# the queue manager) for the messages of each interval, not one per message, whose AMP
# round through the master cost a few percent of every process. The first message after a
# quiet interval goes at once, so mail that arrives alone is not delayed.
NEW_MAIL_INTERVAL = 0.01


class Coalesced:
    """Calls `notify` at once, then at most once per `interval` while calls keep coming
    (the calls of an interval become one at its end)."""

    def __init__(self, notify: Callable[[], object], interval: float, reactor: Any) -> None:
        self._notify, self._interval, self._reactor = notify, interval, reactor
        self._timer: Any = None
        self._pending = False

    def __call__(self) -> None:
        if self._timer is None:
            self._notify()
            self._timer = self._reactor.callLater(self._interval, self._tick)
        else:
            self._pending = True

    def _tick(self) -> None:
        self._timer = None
        if self._pending:
            self._pending = False
            self()

    def flush(self) -> None:
        """Send what is pending now, and nothing later (the worker is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            self._pending = False
            self._notify()


class MasterAdmission:
    """Connection limits counted by the master across every worker; trusted SMTP clients
    are admitted from slots the master lent us (relayhub.admission)."""

    def __init__(self, channel: child.MasterChannel, max_connections: int) -> None:
        self.channel = channel
        self.lent = LentSlots(quota_block(max_connections), self._ask, self._give_back)
        self._from_lent: Counter[tuple[str, str]] = Counter()  # sessions using lent slots

    def _ask(self, wanted: int, in_use: int) -> defer.Deferred[int]:
        answer: defer.Deferred[dict[str, int]] = self.channel.callRemote(
            commands.Lend, wanted=wanted, in_use=in_use)
        return answer.addCallback(lambda reply: reply["granted"])

    def _give_back(self, count: int, in_use: int) -> None:
        self.channel.callRemote(commands.GiveBack, count=count, in_use=in_use)

    def admit(self, service: str, address: str, exempt: bool) -> defer.Deferred[str]:
        if exempt and service in SMTP_SERVICES:
            def taken(ok: bool) -> str | defer.Deferred[str]:
                if not ok:
                    # No slot left to lend: the master decides, and logs a refusal once
                    # per client as for any other.
                    return self._ask_master(service, address, exempt)
                self._from_lent[(service, address)] += 1
                return ""

            return self.lent.take().addCallback(taken)
        return self._ask_master(service, address, exempt)

    def _ask_master(self, service: str, address: str, exempt: bool) -> defer.Deferred[str]:
        answer: defer.Deferred[dict[str, str]] = self.channel.callRemote(
            commands.Admit, service=service, address=address, exempt=exempt)
        return answer.addCallback(lambda reply: reply["refusal"])

    def release(self, service: str, address: str) -> None:
        if self._from_lent[(service, address)] > 0:
            self._from_lent[(service, address)] -= 1
            if not self._from_lent[(service, address)]:
                del self._from_lent[(service, address)]
            self.lent.put_back()
            return
        self.channel.callRemote(commands.Release, service=service, address=address)


class _Locator(child.ChildLocator):
    """What the master may ask of a worker."""

    def __init__(self, metrics: ProcessMetrics, directory: Directory) -> None:
        super().__init__(metrics)
        self.directory = directory
        self.lent: LentSlots | None = None  # set once the worker has its admission

    @commands.Reclaim.responder
    def reclaim(self) -> dict[str, int]:
        if self.lent is None:
            return {"returned": 0, "in_use": 0}
        return {"returned": self.lent.reclaim(), "in_use": self.lent.in_use}

    @commands.Refresh.responder
    def refresh(self) -> defer.Deferred[dict[str, Any]]:
        return self.directory.refresh().addCallback(lambda _: {})


class WorkerProcess(MultiService):
    def __init__(self, settings: Settings, reactor: Any, metrics: ProcessMetrics,
                 last_good: LastGood | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.metrics = metrics
        self.listeners = listeners.decode(os.environ["RELAYHUB_LISTENERS"])
        self.store = open_store(settings, close_on_shutdown=False, daemon=True)
        self.directory = Directory(settings, reactor, last_good)
        self.directory.setServiceParent(self)
        self.locator = _Locator(metrics, self.directory)
        self.smtp: SMTPService | None = None
        self.pop3: dict[str, POP3Factory] = {}
        self.ports: list[Any] = []
        self.tls_options: Any = None
        self._report_sessions: task.LoopingCall | None = None
        self.new_mail: Coalesced | None = None

    def startService(self) -> None:
        channel = child.connect_master(self.reactor, self.locator)
        admission = MasterAdmission(channel, self.settings.smtp.max_connections)
        self.locator.lent = admission.lent
        # Read the certificate and key here, as each worker starts: a reload (SIGHUP) starts
        # a new generation of workers, which so serve renewed certificates.
        try:
            self.tls_options = server_tls_options(self.settings)
        except TLSSetupError as error:
            # The master checked the files moments ago, so they changed since; serving
            # without STARTTLS (and so without AUTH, unless plaintext is allowed) is safe.
            _LOG.error("TLS is off: {source}: {problem}", source=self.settings.source,
                       problem=str(error))
        new_mail = self.new_mail = Coalesced(
            lambda: channel.callRemote(commands.NewMail), NEW_MAIL_INTERVAL, self.reactor)
        self.smtp = SMTPService(
            self.settings, self.store, self.directory, self.reactor, admission=admission,
            on_queued=lambda queue_id: new_mail(), tls_options=self.tls_options)

        def pop3_session(address: str, opened: bool) -> None:
            # Counted by the master for `status`; POP3 has no cross-worker limit of its own.
            if opened:
                self.metrics.connections.labels("pop3").inc()
                admission.admit("pop3", address, True)
            else:
                admission.release("pop3", address)

        self.pop3 = {
            service: pop3_factory(self.settings, self.directory.users, self.reactor,
                                  tls_context_factory=self.tls_options,
                                  implicit_tls=service == "pop3s", on_session=pop3_session)
            for service in ("pop3", "pop3s")
        }
        # `relayhubctl status` counts trusted sessions from these reports.
        self._report_sessions = task.LoopingCall(admission.lent.report)
        self._report_sessions.clock = self.reactor
        self._report_sessions.start(SESSION_REPORT_INTERVAL, now=False)
        super().startService()
        # Accept only once the store is open: a session must never find it missing.
        self.store.open().addCallbacks(self._adopt, self._cannot_open)

    def _adopt(self, _: object) -> None:
        for listener in self.listeners:
            factory = self._factory(listener.spec)
            if factory is not None:
                self.ports.append(listeners.adopt(self.reactor, listener, factory))
            os.close(listener.fd)

    def _factory(self, spec: listeners.ListenerSpec) -> Factory[Any] | None:
        """What serves `spec`, behind TLS for implicit-TLS listeners; None (logged) when it
        cannot be served."""
        assert self.smtp is not None
        plain: Factory[Any] | None = self.smtp.factory_for(spec.service) or self.pop3.get(
            spec.service)
        try:
            options = listeners.implicit_tls_options(spec, self.tls_options)
        except TLSSetupError as error:
            _LOG.error("{service} on {endpoint} is not served: {problem}",
                       service=spec.service, endpoint=spec.description, problem=str(error))
            return None
        if plain is None or (options is None and spec.service in listeners.IMPLICIT_TLS_SERVICES):
            _LOG.error("{service} on {endpoint} is not served (needs [tls])",
                       service=spec.service, endpoint=spec.description)
            return None
        return plain if options is None else listeners.with_tls(plain, options)

    def _cannot_open(self, failure: Any) -> None:
        _LOG.failure("cannot open the queue store", failure)
        self.reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        """Stop accepting at once (the other workers and the next generation go on); open
        sessions get until shutdown_grace to end, then SMTP ones get 421 (SPEC §9)."""
        if self._report_sessions is not None and self._report_sessions.running:
            self._report_sessions.stop()
        stopped = listeners.close_all(self.ports)
        stopped.addCallback(lambda _: defer.Deferred.fromCoroutine(
            self._drain(self.settings.server.shutdown_grace)))
        stopped.addCallback(lambda _: super(WorkerProcess, self).stopService())
        stopped.addCallback(self._flush_new_mail)
        stopped.addCallback(lambda _: self.locator.report_final())
        return stopped.addCallback(lambda _: self.store.close())

    def _flush_new_mail(self, _: object = None) -> None:
        if self.new_mail is not None:
            self.new_mail.flush()

    async def _drain(self, grace: float) -> None:
        deadline = self.reactor.seconds() + grace
        while self._sessions() and self.reactor.seconds() < deadline:
            await task.deferLater(self.reactor, DRAIN_POLL, lambda: None)
        if self.smtp is not None:
            for session in self.smtp.sessions():
                session.shutdown()
        for factory in self.pop3.values():
            for pop3_session in list(factory.sessions):
                # Nothing is deleted without QUIT, so cutting a POP3 session loses nothing.
                pop3_session.transport.loseConnection()  # type: ignore[union-attr]

    def _sessions(self) -> int:
        smtp = len(self.smtp.sessions()) if self.smtp is not None else 0
        return smtp + sum(len(factory.sessions) for factory in self.pop3.values())


def main() -> None:
    child.run(WorkerProcess)


if __name__ == "__main__":
    main()
