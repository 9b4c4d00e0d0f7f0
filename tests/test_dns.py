"""Tests for relayhub.dns against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dnsserver import DNSServer

from relayhub.config import NextHop
from relayhub.dns import (
    MAX_ADDRESSES,
    DNSError,
    MXResolver,
    PermanentDNSError,
    Target,
    TemporaryDNSError,
)

ZONE: dict[str, Any] = {
    "example.com": {"MX": [(10, "mx1.example.com"), (10, "mx2.example.com"),
                           (20, "mx3.example.com")]},
    "mx1.example.com": {"A": ["127.0.0.11"], "AAAA": ["::1"]},
    "mx2.example.com": {"A": ["127.0.0.12"]},
    "mx3.example.com": {"A": ["127.0.0.13"]},
    "plain.example": {"A": ["127.0.0.20", "127.0.0.21"], "AAAA": ["2001:db8::20"]},
    "v6only.example": {"MX": [(5, "mx.v6only.example")]},
    "mx.v6only.example": {"AAAA": ["2001:db8::5"]},
    "nullmx.example": {"MX": [(0, ".")], "A": ["127.0.0.30"]},
    "noaddress.example": {},
    "servfail.example": "SERVFAIL",
    "slow.example": "TIMEOUT",
    "many.example": {"MX": [(p, f"m{p}.many.example") for p in (1, 2, 3, 4)]},
    **{f"m{p}.many.example": {"A": [f"127.0.1.{p}", f"127.0.2.{p}"]} for p in (1, 2, 3, 4)},
    "mixed.example": {"MX": [(1, "gone.mixed.example"), (2, "broken.mixed.example"),
                             (3, "fine.mixed.example")]},
    "broken.mixed.example": "SERVFAIL",
    "fine.mixed.example": {"A": ["127.0.0.40"]},
    "dead.example": {"MX": [(1, "gone.dead.example"), (2, "broken.dead.example")]},
    "broken.dead.example": "SERVFAIL",
    "lost.example": {"MX": [(1, "gone.lost.example"), (2, "empty.lost.example")]},
    "empty.lost.example": {},
    "dup.example": {"MX": [(1, "a.dup.example"), (2, "b.dup.example")]},
    "a.dup.example": {"A": ["127.0.0.50"]},
    "b.dup.example": {"A": ["127.0.0.50", "127.0.0.51"]},
}
EXAMPLE = NextHop("example.com", None, mx=True)


@pytest.fixture
def server(reactor_thread: Any) -> Iterator[DNSServer]:
    with DNSServer(reactor_thread, ZONE) as dns_server:
        yield dns_server


def resolve(reactor_thread: Any, server: DNSServer, hop: NextHop, *,
            rng: random.Random | None = None, port: int = 25) -> list[Target]:
    resolver = MXResolver(reactor_thread.reactor, server.nameservers, timeout=(0.5,), rng=rng)
    return reactor_thread.run(resolver.resolve, hop, port)  # type: ignore[no-any-return]


def failure(reactor_thread: Any, server: DNSServer, hop: NextHop) -> DNSError:
    with pytest.raises(DNSError) as caught:
        resolve(reactor_thread, server, hop)
    return caught.value


def test_mx_preference_order_and_every_address(reactor_thread: Any, server: DNSServer) -> None:
    targets = resolve(reactor_thread, server, EXAMPLE)
    assert [t.preference for t in targets] == sorted(t.preference for t in targets)
    by_host = {t.host: [x.address for x in targets if x.host == t.host] for t in targets}
    assert by_host == {"mx1.example.com": ["::1", "127.0.0.11"],  # IPv6 and IPv4, together
                       "mx2.example.com": ["127.0.0.12"], "mx3.example.com": ["127.0.0.13"]}
    assert targets[-1] == Target("mx3.example.com", "127.0.0.13", 25, 20)
    assert str(targets[-1]) == "mx3.example.com[127.0.0.13]:25"
    # Only MX, A and AAAA questions: never ANY (RFC 8482).
    assert {kind for _name, kind in server.queries} == {"MX", "A", "AAAA"}


def test_equal_preferences_come_in_random_order(reactor_thread: Any, server: DNSServer) -> None:
    firsts = {resolve(reactor_thread, server, EXAMPLE)[0].host for _ in range(30)}
    assert firsts == {"mx1.example.com", "mx2.example.com"}  # 2**-29 odds of a false failure


def test_seeded_rng_gives_a_repeatable_order(reactor_thread: Any, server: DNSServer) -> None:
    def orders(seed: int) -> list[list[str]]:
        rng = random.Random(seed)
        return [[t.host for t in resolve(reactor_thread, server, EXAMPLE, rng=rng)]
                for _ in range(8)]

    assert orders(7) == orders(7)
    assert len({tuple(order) for order in orders(7)}) == 2  # both orders within 8 draws


def test_no_mx_falls_back_to_the_domains_addresses(reactor_thread: Any, server: DNSServer
                                                   ) -> None:
    targets = resolve(reactor_thread, server, NextHop("plain.example", None, mx=True))
    assert targets == [Target("plain.example", a, 25, 0)
                       for a in ("2001:db8::20", "127.0.0.20", "127.0.0.21")]


def test_ipv6_only_mx_host(reactor_thread: Any, server: DNSServer) -> None:
    assert resolve(reactor_thread, server, NextHop("v6only.example", None, True)) == [
        Target("mx.v6only.example", "2001:db8::5", 25, 5)]


def test_null_mx_is_permanent(reactor_thread: Any, server: DNSServer) -> None:
    error = failure(reactor_thread, server, NextHop("nullmx.example", None, mx=True))
    assert isinstance(error, PermanentDNSError) and error.permanent
    assert (error.status, error.text) == ("5.1.10", "Domain does not accept mail (null MX)")


def test_nxdomain_is_permanent(reactor_thread: Any, server: DNSServer) -> None:
    error = failure(reactor_thread, server, NextHop("nowhere.example", None, mx=True))
    assert isinstance(error, PermanentDNSError) and error.status == "5.1.2"
    assert error.text.startswith("Host or domain name not found.")
    assert "name=nowhere.example type=MX" in error.text


def test_domain_without_any_address_is_permanent(reactor_thread: Any, server: DNSServer
                                                 ) -> None:
    error = failure(reactor_thread, server, NextHop("noaddress.example", None, mx=True))
    assert error.permanent and error.status == "5.1.2"


def test_servfail_is_temporary(reactor_thread: Any, server: DNSServer) -> None:
    error = failure(reactor_thread, server, NextHop("servfail.example", None, mx=True))
    assert isinstance(error, TemporaryDNSError) and not error.permanent
    assert error.status == "4.4.3" and "server failure" in error.text


def test_unusable_mx_hosts_are_skipped(reactor_thread: Any, server: DNSServer) -> None:
    assert resolve(reactor_thread, server, NextHop("mixed.example", None, True)) == [
        Target("fine.mixed.example", "127.0.0.40", 25, 3)]


def test_all_mx_hosts_failing(reactor_thread: Any, server: DNSServer) -> None:
    # One host not found, one SERVFAIL: it may work later.
    error = failure(reactor_thread, server, NextHop("dead.example", None, mx=True))
    assert isinstance(error, TemporaryDNSError) and "dead.example" in error.text
    # Every host not found or without address: it will not.
    error = failure(reactor_thread, server, NextHop("lost.example", None, mx=True))
    assert isinstance(error, PermanentDNSError) and error.status == "5.1.2"


def test_timeout_is_temporary_within_the_timeout(reactor_thread: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never read: queries vanish
        resolver = MXResolver(reactor_thread.reactor, [silent.getsockname()], timeout=(0.2, 0.3))
        started = time.monotonic()
        with pytest.raises(TemporaryDNSError) as caught:
            reactor_thread.run(resolver.resolve, EXAMPLE, 25)
    assert time.monotonic() - started < 2
    assert caught.value.status == "4.4.3" and "timed out" in caught.value.text


def test_one_silent_name_times_out(reactor_thread: Any, server: DNSServer) -> None:
    started = time.monotonic()
    error = failure(reactor_thread, server, NextHop("slow.example", None, mx=True))
    assert isinstance(error, TemporaryDNSError) and time.monotonic() - started < 2


def test_at_most_five_addresses(reactor_thread: Any, server: DNSServer) -> None:
    targets = resolve(reactor_thread, server, NextHop("many.example", None, mx=True))
    assert len(targets) == MAX_ADDRESSES == 5
    assert [t.address for t in targets] == [
        "127.0.1.1", "127.0.2.1", "127.0.1.2", "127.0.2.2", "127.0.1.3"]


def test_an_address_is_tried_once(reactor_thread: Any, server: DNSServer) -> None:
    targets = resolve(reactor_thread, server, NextHop("dup.example", None, mx=True))
    assert [(t.host, t.address) for t in targets] == [
        ("a.dup.example", "127.0.0.50"), ("b.dup.example", "127.0.0.51")]


def test_port_from_hop_else_default(reactor_thread: Any, server: DNSServer) -> None:
    assert {t.port for t in resolve(reactor_thread, server, EXAMPLE, port=2525)} == {2525}
    hop = NextHop("example.com", 587, mx=True)
    assert {t.port for t in resolve(reactor_thread, server, hop, port=2525)} == {587}


def test_host_without_mx_lookup(reactor_thread: Any, server: DNSServer) -> None:
    targets = resolve(reactor_thread, server, NextHop("mx1.example.com", 26, mx=False))
    assert targets == [Target("mx1.example.com", "::1", 26, 0),
                       Target("mx1.example.com", "127.0.0.11", 26, 0)]
    # "[example.com]" means its own addresses, not its MX hosts: it has none.
    error = failure(reactor_thread, server, NextHop("example.com", None, mx=False))
    assert error.permanent
    assert ("example.com", "MX") not in server.queries


def test_ip_address_needs_no_dns(reactor_thread: Any, server: DNSServer) -> None:
    assert resolve(reactor_thread, server, NextHop("192.0.2.1", None, mx=False)) == [
        Target("192.0.2.1", "192.0.2.1", 25, 0)]
    assert resolve(reactor_thread, server, NextHop("2001:db8::1", 26, mx=False)) == [
        Target("2001:db8::1", "2001:db8::1", 26, 0)]
    assert server.queries == []


def test_zone_changes_are_seen(reactor_thread: Any, server: DNSServer) -> None:
    server.set_zone({**ZONE, "example.com": {"MX": [(0, ".")]}})
    assert failure(reactor_thread, server, EXAMPLE).status == "5.1.10"


def test_lookup_mx_for_display(reactor_thread: Any, server: DNSServer) -> None:
    resolver = MXResolver(reactor_thread.reactor, server.nameservers, timeout=(0.5,))
    assert reactor_thread.run(resolver.lookup_mx, "Example.COM") == [
        (10, "mx1.example.com"), (10, "mx2.example.com"), (20, "mx3.example.com")]
    assert reactor_thread.run(resolver.lookup_mx, "nullmx.example") == [(0, ".")]
    assert reactor_thread.run(resolver.lookup_mx, "plain.example") == []
    with pytest.raises(PermanentDNSError):
        reactor_thread.run(resolver.lookup_mx, "nowhere.example")
