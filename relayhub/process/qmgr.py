"""The queue-manager process: the one process that delivers, woken by the master whenever a
worker has queued mail or relayhubctl has changed the queue."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from relayhub.config import Settings
from relayhub.delivery.build import build_queue_manager
from relayhub.directory import Directory, LastGood
from relayhub.metrics import ProcessMetrics
from relayhub.process import child, commands
from relayhub.queue.backends import open_store
from relayhub.sendmail.pickup import Pickup

_LOG = Logger(namespace="relayhub.qmgr")

# A body file with no queue entry after this long belongs to a session that died mid-DATA
# (the SMTP timeout bounds how long a live session can take to commit one).
ORPHAN_AGE = 3600.0
# relayhub-sendmail wakes us when it can; callers who cannot use the control socket wait
# at most this long for their message to be picked up.
PICKUP_POLL = 5.0


class _Locator(child.ChildLocator):
    def __init__(self, process: QueueManagerProcess) -> None:
        super().__init__(process.metrics)
        self.process = process

    @commands.Wake.responder
    def wake(self) -> dict[str, Any]:
        self.process.manager.wake()
        if self.process.manager.running:
            self.process.pickup.scan_if_changed()
        return {}

    @commands.Metrics.responder
    def report_metrics(self) -> dict[str, str] | defer.Deferred[dict[str, str]]:
        """With the queue's totals, counted now on the store's thread."""
        if not self.process.manager.running:
            return super().report_metrics()
        now = self.process.reactor.seconds()
        counted = self.process.store.summary(now).addCallback(self.metrics.set_queue, now)
        counted.addErrback(lambda failure: _LOG.failure("queue totals failed", failure))
        return counted.addCallback(lambda _: super(_Locator, self).report_metrics())

    @commands.Refresh.responder
    def refresh(self) -> defer.Deferred[dict[str, Any]]:
        return self.process.directory.refresh().addCallback(lambda _: {})


class QueueManagerProcess(MultiService):
    def __init__(self, settings: Settings, reactor: Any, metrics: ProcessMetrics,
                 last_good: LastGood | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.metrics = metrics
        self.locator = _Locator(self)
        self.store = open_store(settings, close_on_shutdown=False, daemon=True)
        self.directory = Directory(settings, reactor, last_good)
        self.directory.setServiceParent(self)
        self.manager = build_queue_manager(
            settings, self.store, self.directory, reactor,
            on_queued=lambda queue_id: self.manager.wake())
        # Sessions that died mid-DATA leave body files nobody will commit.
        TimerService(ORPHAN_AGE, self._collect_orphans).setServiceParent(self)
        self.pickup = Pickup(settings, self.store, lambda: self.directory.names, reactor,
                             on_queued=lambda queue_id: self.manager.wake())
        TimerService(PICKUP_POLL, self.pick_up).setServiceParent(self)

    def pick_up(self) -> defer.Deferred[None] | None:
        """Take in relayhub-sendmail's maildrop (once the queue manager runs)."""
        if not self.manager.running:
            return None
        return self.pickup.scan()

    def _collect_orphans(self) -> defer.Deferred[Any] | None:
        if not self.manager.running:
            return None
        collected: defer.Deferred[Any] = self.store.collect_orphans(ORPHAN_AGE)
        return collected.addErrback(
            lambda failure: _LOG.failure("orphan collection failed", failure))

    def startService(self) -> None:
        super().startService()
        child.connect_master(self.reactor, self.locator)
        self.store.open().addCallbacks(self._opened, self._cannot_open)

    def _opened(self, _: object) -> None:
        self.manager.startService()
        try:
            self.pickup.prepare()
        except OSError as problem:
            _LOG.error("relayhub-sendmail's maildrop is not usable: {problem}",
                       problem=str(problem))
            return
        self.pick_up()

    def _cannot_open(self, failure: Any) -> None:
        _LOG.failure("cannot open the queue store", failure)
        self.reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        stopped: defer.Deferred[None] = (
            self.manager.stopService() if self.manager.running else defer.succeed(None))
        stopped.addCallback(lambda _: super(QueueManagerProcess, self).stopService())
        stopped.addCallback(lambda _: self.locator.report_final())
        return stopped.addCallback(lambda _: self.store.close())


def main() -> None:
    child.run(QueueManagerProcess)


if __name__ == "__main__":
    main()
