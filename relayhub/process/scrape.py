"""The master's `/metrics` endpoints ([metrics] listen): every process's metrics, added up.

At each scrape the master asks every live child for its samples over AMP (the Metrics
command; the queue manager counts the queue on its store's thread first), adds its own
(child restarts) and answers in Prometheus text format. A child that dies takes its
counters with it, so the master keeps what that child last reported: counters and
histograms never go backwards. A child that stops (the old workers of a reload) reports its
last counts as it goes (FinalMetrics); one killed loses what it counted since the last scrape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from relayhub.metrics import ProcessMetrics, Sample
from relayhub.process import commands
from relayhub.process.supervisor import SupervisedChild

_LOG = Logger(namespace="relayhub.master")

# A child that has not answered by then is counted at what it reported last.
SCRAPE_TIMEOUT = 5.0

_Key = tuple[str, tuple[tuple[str, str], ...]]


def _key(name: str, labels: dict[str, str]) -> _Key:
    return name, tuple(sorted(labels.items()))


def add_up(template: Iterable[Metric], reports: Iterable[Sequence[Sample]]) -> list[Metric]:
    """`template`'s families (the master's own metrics) with every report's samples added.

    A sample no family of the template has (a label set the master never saw) joins the
    family its name belongs to; `_created` samples are left out (a sum has no creation
    time)."""
    totals: dict[_Key, float] = {}
    for report in reports:
        for name, labels, value in report:
            key = _key(name, labels)
            totals[key] = totals.get(key, 0.0) + value
    families: list[Metric] = []
    owner: dict[str, Metric] = {}
    for family in template:
        summed = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            owner[sample.name] = summed
            value = sample.value + totals.pop(_key(sample.name, dict(sample.labels)), 0.0)
            summed.add_sample(sample.name, dict(sample.labels), value)
        families.append(summed)
    for (name, label_pairs), value in totals.items():
        if name in owner:
            owner[name].add_sample(name, dict(label_pairs), value)
    return families


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


class MetricsCollector:
    """The master's view of every process's metrics."""

    def __init__(self, reactor: Any, metrics: ProcessMetrics | None = None) -> None:
        self.reactor = reactor
        self.metrics = metrics or ProcessMetrics()
        self._reports: dict[SupervisedChild, list[Sample]] = {}
        self._retired: list[Sample] = []
        self._gauges = {family.name for family in self.metrics.registry.collect()
                        if family.type == "gauge"}

    def started(self, child: SupervisedChild) -> None:
        self._reports.setdefault(child, [])

    def exited(self, child: SupervisedChild) -> None:
        """Keep a dead child's counters (a gauge of a dead process means nothing)."""
        last = self._reports.get(child, [])
        self._retired = [sample for sample in add_samples(self._retired, last)
                         if sample[0] not in self._gauges]
        if child.stopping:
            self._reports.pop(child, None)
        else:
            self._reports[child] = []
            self.metrics.child_restarts.labels(child.spec.role).inc()

    def reported(self, child: SupervisedChild, samples: str) -> None:
        """`child`'s current process counted this (JSON from ProcessMetrics.samples)."""
        if child in self._reports:
            self._reports[child] = [(name, labels, value)
                                    for name, labels, value in json.loads(samples)]

    async def exposition(self) -> bytes:
        asked = [self._ask(child, child.channel)
                 for child in list(self._reports) if child.channel is not None]
        await defer.gatherResults(asked)
        families = add_up(self.metrics.registry.collect(),
                          [self._retired, *self._reports.values()])
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(families))
        return generate_latest(registry)

    def _ask(self, child: SupervisedChild, channel: Any) -> defer.Deferred[None]:
        answer: defer.Deferred[dict[str, str]] = channel.callRemote(commands.Metrics)
        answer.addTimeout(SCRAPE_TIMEOUT, self.reactor)

        def keep(reply: dict[str, str]) -> None:
            # Only from the process that is still this child's: a late answer from one
            # that has died since would count it twice.
            if child.channel is channel:
                self.reported(child, reply["samples"])

        def missed(failure: Failure) -> None:
            # Dying or stopping: its last report stands in for it.
            _LOG.debug("no metrics from {name}: {why}", name=child.spec.name,
                       why=failure.getErrorMessage())

        return answer.addCallbacks(keep, missed)


def add_samples(first: Iterable[Sample], second: Iterable[Sample]) -> list[Sample]:
    totals: dict[_Key, float] = {}
    for name, labels, value in [*first, *second]:
        key = _key(name, labels)
        totals[key] = totals.get(key, 0.0) + value
    return [(name, dict(labels), value) for (name, labels), value in totals.items()]


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, collector: MetricsCollector) -> None:
        super().__init__()
        self.collector = collector

    def render_GET(self, request: Request) -> int:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def send(body: bytes) -> None:
            if not gone:
                request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            _LOG.failure("cannot collect metrics", failure)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        defer.Deferred.fromCoroutine(self.collector.exposition()).addCallbacks(send, failed)
        return NOT_DONE_YET


class MetricsSite(Site):
    """No access log line per scrape."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def site(collector: MetricsCollector) -> Site:
    root = Resource()
    root.putChild(b"metrics", _MetricsPage(collector))
    return MetricsSite(root)


def listen(reactor: Any, descriptions: Sequence[str], collector: MetricsCollector) -> list[Any]:
    """Serve /metrics on each endpoint; a failure to listen (port in use) raises here, so
    that start-up stops loudly as it does for the mail listeners."""
    factory = site(collector)
    ports: list[Any] = []
    for description in descriptions:
        outcome: list[Any] = []
        serverFromString(reactor, description).listen(factory).addBoth(outcome.append)
        if outcome and isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        if outcome:
            ports.append(outcome[0])
        _LOG.info("{service} listening on {endpoint}", service="metrics", endpoint=description)
    return ports
