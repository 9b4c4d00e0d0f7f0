"""Client host names by forward-confirmed reverse DNS: the pure confirmation, the lookup
against the test DNS server, and the daemon's log, Received: and banner timing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ReactorThread
from dnsserver import DNSServer, reverse_name
from hubprocess import Hub, Queue, SMTPConnection

from relayhub.clientname import (
    UNKNOWN,
    ClientNamer,
    confirmed_in_hosts,
    confirmed_name,
    hosts_table,
)

GOOD, LIAR, SLOW, NOPTR = "127.0.0.31", "127.0.0.32", "127.0.0.33", "127.0.0.34"
ZONE = {
    reverse_name(GOOD): {"PTR": ["Good.Client.Example."]},
    "good.client.example": {"A": [GOOD]},
    reverse_name(LIAR): {"PTR": ["bank.example"]},
    "bank.example": {"A": ["192.0.2.1"]},
    reverse_name(SLOW): "TIMEOUT",
    reverse_name("::1"): {"PTR": ["six.example"]},
    "six.example": {"AAAA": ["::1"]},
}


def test_confirmed_name_is_pure() -> None:
    forward = {"a.example.": ["192.0.2.9"], "b.example": ["192.0.2.1", "2001:db8::1"]}
    assert confirmed_name("192.0.2.1", ["a.example.", "B.Example"], forward) == "b.example"
    assert confirmed_name("::ffff:192.0.2.1", ["b.example"], forward) == "b.example"
    assert confirmed_name("2001:db8::1", ["b.example"], forward) == "b.example"
    assert confirmed_name("192.0.2.7", ["a.example.", "b.example"], forward) is None
    assert confirmed_name("unix", ["a.example."], forward) is None


@pytest.fixture(scope="module")
def dns(reactor_thread: ReactorThread) -> Iterator[DNSServer]:
    with DNSServer(reactor_thread, ZONE) as server:
        yield server


@pytest.mark.parametrize(("address", "name"), [
    (GOOD, "good.client.example"), (LIAR, UNKNOWN), (NOPTR, UNKNOWN), ("::1", "six.example"),
    ("not an address", UNKNOWN)])
def test_lookup(reactor_thread: ReactorThread, dns: DNSServer, address: str, name: str) -> None:
    # No hosts table: these names come from the test DNS server, whatever /etc/hosts holds.
    namer = reactor_thread.run(lambda: ClientNamer(reactor_thread.reactor, dns.nameservers, 2,
                                                   hosts={}))
    assert reactor_thread.run(namer.name, address) == name


def test_the_hosts_file_names_a_client_first_without_dns(reactor_thread: ReactorThread) -> None:
    table = hosts_table("127.0.0.1 localhost vm\n# comment\n::1 ip6-localhost  # x\n"
                        "192.0.2.7 mail.example.org\n192.0.2.8 mail.example.org\n"
                        "192.0.2.9 liar.example\nnot-an-address foo\n")
    assert table["127.0.0.1"] == ["localhost", "vm"] and "not-an-address" not in table
    assert confirmed_in_hosts("127.0.0.1", table) == "localhost"
    assert confirmed_in_hosts("::1", table) == "ip6-localhost"
    assert confirmed_in_hosts("192.0.2.8", table) == "mail.example.org"
    assert confirmed_in_hosts("198.51.100.1", table) is None
    # No name server at all: a client in the hosts file is named at once all the same.
    namer = reactor_thread.run(lambda: ClientNamer(
        reactor_thread.reactor, [("127.0.0.1", 9)], 5, hosts=table))
    started = time.monotonic()
    assert reactor_thread.run(namer.name, "127.0.0.1") == "localhost"
    assert time.monotonic() - started < 1


def test_lookup_ends_at_its_timeout(reactor_thread: ReactorThread, dns: DNSServer) -> None:
    namer = reactor_thread.run(lambda: ClientNamer(reactor_thread.reactor, dns.nameservers, 1,
                                                   hosts={}))
    started = time.monotonic()
    assert reactor_thread.run(namer.name, SLOW) == UNKNOWN
    assert 0.9 < time.monotonic() - started < 3


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, dns: DNSServer) -> Iterator[Hub]:
    running = Hub(tmp_path_factory.mktemp("hub"), {
        "smtp": {"reverse_dns": True, "reverse_dns_timeout": "1s"},
        "delivery": {"nameservers": [f"127.0.0.1:{dns.port}"]},
        "routing": {"transport": {"parked.example": "[127.0.0.1]:9"}},
        "domains": {"trusted_networks": ["127.0.0.0/8"]},
    }).start()
    yield running
    running.stop()


def send_from(hub: Hub, source: str) -> tuple[float, str]:
    """Connect from `source`, send one message; (seconds to the banner, queue ID)."""
    started = time.monotonic()
    with SMTPConnection(hub.smtp_port, source=source) as conn:
        assert conn.reply()[0].startswith("220 ")
        waited = time.monotonic() - started
        assert conn.command("EHLO helo.test")[-1].startswith("250 ")
        conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@parked.example>\r\nDATA\r\n")
        assert [conn.code() for _ in range(3)] == [250, 250, 354]
        conn.send(b"Subject: name\r\n\r\nx\r\n.\r\n")
        reply = conn.reply()[-1]
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        conn.command("QUIT")
    return waited, reply.rsplit(" ", 1)[1]


def received_of(reactor_thread: ReactorThread, hub: Hub, queue_id: str) -> bytes:
    return Queue(reactor_thread, hub.state_dir).body(queue_id).split(b"\r\n\tby ")[0]


def test_confirmed_client_is_named_in_log_received_and_envelope(
        reactor_thread: ReactorThread, hub: Hub) -> None:
    _waited, queue_id = send_from(hub, GOOD)
    hub.wait_for_log(f"connect from good.client.example[{GOOD}]",
                     f"client=good.client.example[{GOOD}]")
    assert received_of(reactor_thread, hub, queue_id) == \
        f"Received: from helo.test (good.client.example [{GOOD}])".encode()
    [message] = [m for m in Queue(reactor_thread, hub.state_dir).messages()
                 if m.queue_id == queue_id]
    assert message.envelope.client_name == "good.client.example"


@pytest.mark.parametrize("source", [LIAR, NOPTR, SLOW])
def test_unconfirmed_or_slow_client_is_unknown_and_banner_waits_at_most_the_timeout(
        reactor_thread: ReactorThread, hub: Hub, source: str) -> None:
    waited, queue_id = send_from(hub, source)
    assert waited < 2.5  # the 1 s timeout, with room for a busy machine
    hub.wait_for_log(f"connect from unknown[{source}]")
    assert received_of(reactor_thread, hub, queue_id) == \
        f"Received: from helo.test (unknown [{source}])".encode()


def test_reverse_dns_off(tmp_path: Path, dns: DNSServer) -> None:
    hub = Hub(tmp_path, {"smtp": {"reverse_dns": False},
                         "delivery": {"nameservers": [f"127.0.0.1:{dns.port}"]}}).start()
    try:
        asked = len(dns.queries)
        with SMTPConnection(hub.smtp_port, source=GOOD) as conn:
            assert conn.reply()[0].startswith("220 ")
        hub.wait_for_log(f"connect from unknown[{GOOD}]")
        assert (reverse_name(GOOD), "PTR") not in dns.queries[asked:]
    finally:
        hub.stop()
