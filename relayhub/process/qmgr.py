"""The queue-manager process: the one process that delivers, woken by the master whenever a
worker has queued mail or relayhubctl has changed the queue."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import amp

from relayhub.config import Settings
from relayhub.delivery.build import build_queue_manager
from relayhub.directory import Directory
from relayhub.process import child, commands
from relayhub.queue.backends import open_store

_LOG = Logger(namespace="relayhub.qmgr")

# A body file with no queue entry after this long belongs to a session that died mid-DATA
# (the SMTP timeout bounds how long a live session can take to commit one).
ORPHAN_AGE = 3600.0


class _Locator(amp.CommandLocator):
    def __init__(self, process: QueueManagerProcess) -> None:
        super().__init__()
        self.process = process

    @commands.Wake.responder
    def wake(self) -> dict[str, Any]:
        self.process.manager.wake()
        return {}


class QueueManagerProcess(MultiService):
    def __init__(self, settings: Settings, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.store = open_store(settings, close_on_shutdown=False, daemon=True)
        self.directory = Directory(settings, reactor)
        self.directory.setServiceParent(self)
        self.manager = build_queue_manager(
            settings, self.store, self.directory, reactor,
            on_queued=lambda queue_id: self.manager.wake())
        # Sessions that died mid-DATA leave body files nobody will commit.
        TimerService(ORPHAN_AGE, self._collect_orphans).setServiceParent(self)

    def _collect_orphans(self) -> defer.Deferred[Any] | None:
        if not self.manager.running:
            return None
        collected: defer.Deferred[Any] = self.store.collect_orphans(ORPHAN_AGE)
        return collected.addErrback(
            lambda failure: _LOG.failure("orphan collection failed", failure))

    def startService(self) -> None:
        super().startService()
        child.connect_master(self.reactor, _Locator(self))
        self.store.open().addCallbacks(
            lambda _: self.manager.startService(), self._cannot_open)

    def _cannot_open(self, failure: Any) -> None:
        _LOG.failure("cannot open the queue store", failure)
        self.reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        stopped: defer.Deferred[None] = (
            self.manager.stopService() if self.manager.running else defer.succeed(None))
        stopped.addCallback(lambda _: super(QueueManagerProcess, self).stopService())
        return stopped.addCallback(lambda _: self.store.close())


def main() -> None:
    child.run(QueueManagerProcess)


if __name__ == "__main__":
    main()
