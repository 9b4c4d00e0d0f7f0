"""Where MTA-STS policies come from (RFC 8461 §3, §5): the `_mta-sts` TXT record, the policy
file over HTTPS (Twisted's web client, certificate and name checked with service-identity,
no redirects, a size limit and a timeout), and a cache in the state directory that lasts
`max_age` and survives restarts. A policy is refreshed in the background when the TXT id
changes or it nears its expiry; a failed refresh keeps the cached one."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.names import client, dns
from twisted.names import error as names_error
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from relayhub.config import NextHop
from relayhub.delivery.mta_sts import (
    MAX_POLICY_BYTES,
    Policy,
    PolicyError,
    StsRecord,
    parse_policy,
    parse_txt,
    policy_text,
    policy_url,
)
from relayhub.dns import DNSError, MXResolver
from relayhub.maillog import STS_CACHE_FAILED, STS_FETCHED, STS_NO_POLICY, STS_REFRESH_FAILED

CACHE_FILE = "mta-sts.sqlite"
FETCH_TIMEOUT = 30.0  # seconds for the whole HTTPS fetch (RFC 8461 §3.3 suggests a minute)
REFRESH_RETRY = 300.0  # seconds between refresh attempts for one domain after a failure
HTTPS_PORT = 443  # RFC 8461 §3.3


class FetchError(Exception):
    """The policy could not be had; the message says why (for logs and `route`)."""


@dataclass(frozen=True)
class CachedPolicy:
    domain: str
    id: str
    policy: Policy
    fetched: float  # seconds since the epoch

    @property
    def expires(self) -> float:
        return self.fetched + self.policy.max_age


class PolicyCache:
    """The policies in `state_dir/mta-sts.sqlite`; blocking: call from a thread."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CACHE_FILE

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=10)
        connection.execute("CREATE TABLE IF NOT EXISTS policies (domain TEXT PRIMARY KEY, "
                           "id TEXT NOT NULL, policy TEXT NOT NULL, fetched REAL NOT NULL)")
        return connection

    def load(self, domain: str) -> CachedPolicy | None:
        if not self.path.exists():
            return None
        connection = self._connect()
        try:
            row = connection.execute("SELECT id, policy, fetched FROM policies WHERE domain = ?",
                                     (domain,)).fetchone()
        finally:
            connection.close()
        if row is None:
            return None
        try:
            return CachedPolicy(domain, row[0], parse_policy(row[1].encode()), row[2])
        except PolicyError:
            return None

    def store(self, entry: CachedPolicy) -> None:
        connection = self._connect()
        try:
            with connection:
                connection.execute("INSERT OR REPLACE INTO policies VALUES (?, ?, ?, ?)",
                                   (entry.domain, entry.id, policy_text(entry.policy),
                                    entry.fetched))
        finally:
            connection.close()


_DONE = Failure(ResponseDone())


class _LimitedBody(Protocol):
    """Collects a response body up to MAX_POLICY_BYTES; more is an error."""

    def __init__(self, finished: defer.Deferred[bytes]) -> None:
        self._finished = finished
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_POLICY_BYTES:
            if not self._finished.called:
                self._finished.errback(FetchError(f"policy larger than {MAX_POLICY_BYTES} "
                                                  "bytes"))
            transport: Any = self.transport
            transport.stopProducing()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self._finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._parts))
        else:
            self._finished.errback(FetchError(f"policy body lost: {reason.getErrorMessage()}"))


@implementer(IAgentEndpointFactory)
class _ToAddress:
    """Connects to an address already resolved with our resolver (the reactor's own name
    lookup would ask /etc/hosts and another DNS), TLS checked for the URL's host name."""

    def __init__(self, reactor: Any, address: str, timeout: float) -> None:
        self._reactor, self._address, self._timeout = reactor, address, timeout
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> Any:
        kind = TCP6ClientEndpoint if ":" in self._address else TCP4ClientEndpoint
        tcp = kind(self._reactor, self._address, uri.port, timeout=self._timeout)
        return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), tcp)


class PolicyFetcher:
    """TXT record and policy file of a domain, through `resolver` (our name servers)."""

    def __init__(self, reactor: Any, nameservers: tuple[tuple[str, int], ...],
                 timeout: float = FETCH_TIMEOUT) -> None:
        self._reactor = reactor
        self._addresses = MXResolver(reactor, nameservers)
        self._resolver = (client.Resolver(servers=list(nameservers), reactor=reactor)
                          if nameservers else
                          client.Resolver(resolv="/etc/resolv.conf", reactor=reactor))
        self._timeout = timeout

    async def record(self, domain: str) -> StsRecord | None:
        """The TXT record; None when there is none; FetchError when DNS fails or it is bad."""
        name = f"_mta-sts.{domain}"
        try:
            answers, _auth, _add = await self._resolver.lookupText(name.encode("idna"), (1, 3))
        except names_error.DNSNameError:
            return None
        except (names_error.DomainError, defer.TimeoutError, OSError, ConnectError,
                UnicodeError) as problem:
            raise FetchError(f"TXT lookup of {name} failed: {problem!r}") from None
        texts = [b"".join(r.payload.data).decode("utf-8", "replace")
                 for r in answers if r.type == dns.TXT]
        try:
            return parse_txt(texts)
        except PolicyError as problem:
            raise FetchError(f"{name}: {problem}") from None

    async def policy(self, domain: str) -> Policy:
        """The policy file, parsed; FetchError on any trouble."""
        fetching = defer.Deferred.fromCoroutine(self._policy(domain))
        fetching.addTimeout(self._timeout, self._reactor)
        try:
            return await fetching
        except defer.TimeoutError:
            raise FetchError(f"fetching {policy_url(domain)} timed out") from None

    async def _policy(self, domain: str) -> Policy:
        url = policy_url(domain)
        host = f"mta-sts.{domain}"
        try:
            targets = await self._addresses.resolve(NextHop(host, HTTPS_PORT, mx=False),
                                                    HTTPS_PORT)
        except DNSError as problem:
            raise FetchError(f"{host}: {problem.text}") from None
        agent = Agent.usingEndpointFactory(
            self._reactor, _ToAddress(self._reactor, targets[0].address, self._timeout))
        try:
            # Agent follows no redirects (RFC 8461 §3.3 forbids following them).
            response = await agent.request(b"GET", url.encode("idna"),
                                           Headers({b"User-Agent": [b"relayhub"]}))
        except defer.CancelledError:
            raise
        except Exception as problem:  # connect, TLS and HTTP errors have no common base
            raise FetchError(f"fetching {url} failed: {_reason(problem)}") from None
        media_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        refused = (f"HTTP status {response.code}" if response.code != 200 else
                   # RFC 8461 §3.3: the policy is served as text/plain.
                   f"media type {media_type.decode('latin-1')!r} is not text/plain"
                   if not media_type.lower().startswith(b"text/plain") else None)
        if refused is not None:
            response.deliverBody(Protocol())  # read and drop
            raise FetchError(f"fetching {url}: {refused}")
        body: defer.Deferred[bytes] = defer.Deferred()
        response.deliverBody(_LimitedBody(body))
        try:
            return parse_policy(await body)
        except PolicyError as problem:
            raise FetchError(f"{url}: {problem}") from None


def _reason(problem: Exception) -> str:
    reasons = getattr(problem, "reasons", None)  # web's ResponseNeverReceived and friends
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(problem) or type(problem).__name__


class MtaStsPolicies:
    """The policy in force for a domain, per RFC 8461 §5.1, cached in the state directory."""

    def __init__(self, reactor: Any, fetcher: PolicyFetcher, cache: PolicyCache,
                 log: Callable[..., None], clock: Callable[[], float] = time.time) -> None:
        self._reactor = reactor
        self._fetcher = fetcher
        self._cache = cache
        self._log = log  # log(format, **fields), a twisted.logger Logger's info
        self._clock = clock
        self._memory: dict[str, CachedPolicy | None] = {}
        self._refreshing: set[str] = set()
        # One fetch per domain at a time: the deliveries that want it meanwhile wait here.
        self._fetching: dict[str, list[defer.Deferred[CachedPolicy]]] = {}
        self._last_try: dict[str, float] = {}

    async def policy_for(self, domain: str) -> CachedPolicy | None:
        """The cached or newly fetched policy, or None when the domain has none."""
        domain = domain.lower()
        if domain not in self._memory:
            try:
                loaded = await threads.deferToThread(self._cache.load, domain)
            except (sqlite3.Error, OSError) as problem:
                self._log(STS_CACHE_FAILED, path=str(self._cache.path), error=str(problem))
                loaded = None
            # A fetch that finished while the file was read is newer than what it held.
            self._memory.setdefault(domain, loaded)
        cached = self._memory[domain]
        now = self._clock()
        if cached is not None and cached.expires <= now:
            cached = None
        try:
            record = await self._fetcher.record(domain)
        except FetchError:
            record = None  # DNS trouble: a cached policy goes on (RFC 8461 §5.1)
        if cached is not None:
            near_expiry = cached.expires - now < min(cached.policy.max_age / 2, 86400)
            if (record is not None and record.id != cached.id) or near_expiry:
                self._refresh_in_background(domain, record)
            return cached
        if record is None:
            return None
        try:
            return await self._fetch(domain, record)
        except FetchError as problem:
            self._log(STS_NO_POLICY, domain=domain, error=str(problem))
            return None  # RFC 8461 §5: no valid policy means no policy

    @property
    def refreshing(self) -> bool:
        """Whether a background refresh is under way (for tests and shutdown)."""
        return bool(self._refreshing)

    async def _fetch(self, domain: str, record: StsRecord) -> CachedPolicy:
        """Fetch and keep the policy; deliveries to the same domain meanwhile share it."""
        if domain in self._fetching:
            waiting: defer.Deferred[CachedPolicy] = defer.Deferred()
            self._fetching[domain].append(waiting)
            return await waiting
        self._fetching[domain] = []
        try:
            entry = await self._fetch_now(domain, record)
        except Exception as problem:
            for waiter in self._fetching.pop(domain):
                waiter.errback(problem)
            raise
        for waiter in self._fetching.pop(domain):
            waiter.callback(entry)
        return entry

    async def _fetch_now(self, domain: str, record: StsRecord) -> CachedPolicy:
        self._last_try[domain] = self._clock()
        policy = await self._fetcher.policy(domain)
        entry = CachedPolicy(domain, record.id, policy, self._clock())
        self._memory[domain] = entry
        try:
            await threads.deferToThread(self._cache.store, entry)
        except (sqlite3.Error, OSError) as problem:  # still used, only not kept on disk
            self._log(STS_CACHE_FAILED, path=str(self._cache.path), error=str(problem))
        self._log(STS_FETCHED, domain=domain, id=record.id, mode=policy.mode,
                  max_age=policy.max_age)
        return entry

    def _refresh_in_background(self, domain: str, record: StsRecord | None) -> None:
        if domain in self._refreshing or \
                self._clock() - self._last_try.get(domain, 0.0) < REFRESH_RETRY:
            return
        self._refreshing.add(domain)

        async def refresh() -> None:
            try:
                current = record or await self._fetcher.record(domain)
                if current is None:
                    raise FetchError(f"no _mta-sts.{domain} TXT record")
                await self._fetch(domain, current)
            except FetchError as problem:
                self._log(STS_REFRESH_FAILED, domain=domain, error=str(problem))
            finally:
                self._refreshing.discard(domain)

        defer.Deferred.fromCoroutine(refresh())

