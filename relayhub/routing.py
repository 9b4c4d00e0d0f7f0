"""Recipient address → where it goes next, in SPEC §4 order: local, transport, relayhost, MX."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from relayhub.address import parse_mailbox
from relayhub.config import DomainSettings, NextHop, RoutingSettings
from relayhub.policy import AcceptancePolicy, CombinedDirectory, match_domain


@dataclass(frozen=True)
class LocalRoute:
    """Delivery into the Maildir of `mailbox`: the local part, unquoted and lower-cased."""

    mailbox: str


@dataclass(frozen=True)
class SmtpRoute:
    """Delivery over SMTP to `next_hop`; `reason` says which rule chose it, for logs and
    `relayhubctl route`: "transport <key>", "relayhost", "literal" or "mx"."""

    next_hop: NextHop
    reason: str


Route = LocalRoute | SmtpRoute


class Router:
    """Routes recipients; pure (DNS happens later, in relayhub.dns, on an `mx` next hop).

    Domain classes come from the acceptance policy so that routing and RCPT acceptance can
    never disagree about which domains are local. `local_addresses` are our own IPs: mail to
    user@[our IP] is local there, so it must be local here too, not an SMTP loop to ourselves.
    """

    def __init__(
        self, domains: DomainSettings, routing: RoutingSettings, *,
        local_addresses: Iterable[str] = (),
    ) -> None:
        # Only classify_domain is used, which never consults the directory.
        self._policy = AcceptancePolicy(
            domains.local, domains.relay, domains.trusted_networks, CombinedDirectory(),
            local_addresses=local_addresses,
        )
        self._routing = routing

    def route(self, address: str) -> Route:
        """The route for "local@domain" (ValueError if it is not a valid address).

        Relay domains have no rule of their own: without a transport entry they go by
        relayhost or MX like any other domain. Like Postfix's relayhost, ours takes
        address literals too: behind a relayhost the hub may not reach anything else.
        """
        mailbox = parse_mailbox(address)
        domain = mailbox.domain
        if self._policy.classify_domain(domain) == "local":
            return LocalRoute(mailbox.unquoted_local_part.lower())
        key = match_domain(domain, self._routing.transport)
        if key is not None:
            return SmtpRoute(self._routing.transport[key], f"transport {key}")
        if self._routing.relayhost is not None:
            return SmtpRoute(self._routing.relayhost, "relayhost")
        if domain.startswith("["):  # "[192.0.2.1]" or "[IPv6:2001:db8::1]": no MX lookup
            ip = domain[1:-1]
            ip = ip[5:] if ip[:5].lower() == "ipv6:" else ip
            return SmtpRoute(NextHop(ip, None, mx=False), "literal")
        return SmtpRoute(NextHop(domain, None, mx=True), "mx")

    def next_hop_class(self, address: str) -> str:
        """For metrics: "local", "transport", "relayhost", "relay" (a relay domain by MX)
        or "mx" (any other domain, or an address literal)."""
        try:
            route = self.route(address)
        except ValueError:
            return "mx"
        if isinstance(route, LocalRoute):
            return "local"
        if route.reason == "relayhost":
            return "relayhost"
        if route.reason in ("mx", "literal"):
            domain = parse_mailbox(address).domain
            return "relay" if self._policy.classify_domain(domain) == "relay" else "mx"
        return "transport"


def group_key(route: Route) -> str:
    """Recipients with equal keys share one delivery transaction: "local", or the next hop."""
    return "local" if isinstance(route, LocalRoute) else str(route.next_hop)
