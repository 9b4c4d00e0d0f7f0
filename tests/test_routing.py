"""Tests for relayhub.routing: SPEC §4 order local → transport → relayhost → MX."""

from __future__ import annotations

from typing import Any

import pytest

from relayhub.config import NextHop, parse_settings
from relayhub.routing import LocalRoute, Router, SmtpRoute, group_key


def router(relayhost: str = "", **extra: Any) -> Router:
    settings = parse_settings({
        "domains": {"local": ["example.org", "Example.NET"],
                    "relay": ["eng.example.org", ".lab.example.org", "partner.example"]},
        "routing": {"relayhost": relayhost, "transport": {
            "eng.example.org": "[10.1.2.3]:25",
            ".lab.example.org": "mx.lab.example.org",
            ".deep.lab.example.org": "[deep.example.net]:2525",
            "example.com": "[exact.example.net]",
        }},
    }, "test")
    return Router(settings.domains, settings.routing, **extra)


ROUTER = router()


def smtp(address: str, by: Router = ROUTER) -> SmtpRoute:
    route = by.route(address)
    assert isinstance(route, SmtpRoute)
    return route


@pytest.mark.parametrize(("address", "mailbox"), [
    ("alice@example.org", "alice"),
    ("Alice.Smith@EXAMPLE.ORG", "alice.smith"),
    ('"Bob Jones"@example.net.', "bob jones"),
    ("postmaster@example.org", "postmaster"),
])
def test_local_domains(address: str, mailbox: str) -> None:
    assert ROUTER.route(address) == LocalRoute(mailbox)


def test_exact_transport() -> None:
    assert ROUTER.route("a@eng.example.org") == SmtpRoute(
        NextHop("10.1.2.3", 25, mx=False), "transport eng.example.org")
    assert smtp("a@example.com").next_hop == NextHop("exact.example.net", None, False)


def test_suffix_transport_matches_sub_domains_only() -> None:
    assert ROUTER.route("a@x.lab.example.org") == SmtpRoute(
        NextHop("mx.lab.example.org", None, mx=True), "transport .lab.example.org")
    assert smtp("a@y.x.lab.example.org").reason == "transport .lab.example.org"
    # The suffix entry does not cover the domain itself: that one goes by MX.
    assert ROUTER.route("a@lab.example.org") == SmtpRoute(
        NextHop("lab.example.org", None, mx=True), "mx")
    # An exact entry covers no sub-domain.
    assert smtp("a@sub.eng.example.org").reason == "mx"
    assert smtp("a@sub.example.com").reason == "mx"


def test_longest_suffix_wins() -> None:
    route = ROUTER.route("a@host.deep.lab.example.org")
    assert route == SmtpRoute(NextHop("deep.example.net", 2525, mx=False),
                              "transport .deep.lab.example.org")
    assert smtp("a@deep.lab.example.org").reason == "transport .lab.example.org"


def test_relayhost_takes_what_no_transport_takes() -> None:
    behind = router("[smtp.provider.net]:587")
    hop = NextHop("smtp.provider.net", 587, mx=False)
    assert behind.route("a@elsewhere.example") == SmtpRoute(hop, "relayhost")
    assert behind.route("a@partner.example") == SmtpRoute(hop, "relayhost")  # relay domain
    assert behind.route("a@[192.0.2.1]") == SmtpRoute(hop, "relayhost")  # as Postfix does
    assert smtp("a@x.lab.example.org", behind).reason == "transport .lab.example.org"
    assert behind.route("alice@example.org") == LocalRoute("alice")


def test_mx_by_default() -> None:
    assert ROUTER.route("Someone@Elsewhere.Example") == SmtpRoute(
        NextHop("elsewhere.example", None, mx=True), "mx")


def test_relay_domain_without_transport_goes_by_mx() -> None:
    assert ROUTER.route("a@partner.example") == SmtpRoute(
        NextHop("partner.example", None, mx=True), "mx")


def test_address_literals_go_straight_to_the_address() -> None:
    assert ROUTER.route("a@[192.0.2.1]") == SmtpRoute(NextHop("192.0.2.1", None, False), "literal")
    assert ROUTER.route("a@[IPv6:2001:db8::1]") == SmtpRoute(
        NextHop("2001:db8::1", None, mx=False), "literal")


def test_literal_of_our_own_address_is_local() -> None:
    ours = router(local_addresses=["192.0.2.25"])
    assert ours.route("Alice@[192.0.2.25]") == LocalRoute("alice")
    assert smtp("alice@[192.0.2.26]", ours).reason == "literal"


def test_invalid_address() -> None:
    with pytest.raises(ValueError):
        ROUTER.route("no-domain")


def test_group_key() -> None:
    assert group_key(LocalRoute("alice")) == "local"
    assert group_key(ROUTER.route("a@eng.example.org")) == "[10.1.2.3]:25"
    assert group_key(ROUTER.route("a@x.lab.example.org")) == "mx.lab.example.org"
    # Two recipients at one domain share a transaction; two domains do not.
    assert group_key(ROUTER.route("a@other.example")) == group_key(ROUTER.route("b@other.example"))
    assert group_key(ROUTER.route("a@other.example")) != group_key(ROUTER.route("a@third.example"))
