"""Recipient acceptance at RCPT: which domains are ours and who may relay (SPEC §3)."""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal, Protocol

from relayhub.address import ForwardPath, Mailbox, relay_trick
from relayhub.errors import RecipientRefused

DomainClass = Literal["local", "relay", "remote"]


class LocalDirectory(Protocol):
    """Whatever knows local parts: the users database, or `relayhub.aliases.LocalNames`
    (users and aliases). `knows` may raise an SMTPReply such as TemporaryFailure when it
    cannot tell (an unusable aliases table): the RCPT is then answered with that reply."""

    def knows(self, local_part: str) -> bool: ...


class CombinedDirectory:
    """A local part is known when any of the directories knows it."""

    def __init__(self, *directories: LocalDirectory) -> None:
        self.directories = directories

    def knows(self, local_part: str) -> bool:
        return any(d.knows(local_part) for d in self.directories)


@dataclass(frozen=True)
class ClientContext:
    """What the acceptance policy needs to know about the SMTP client."""

    address: str
    trusted: bool
    authenticated: bool
    submission: bool = False  # arrived on a submission (587) or smtps (465) listener


def _ip(text: str) -> IPv4Address | IPv6Address | None:
    """The address, with an IPv4-mapped IPv6 address (dual-stack socket) as its IPv4 self."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _domain_key(domain: str) -> str:
    return domain.lower().removesuffix(".")


def match_domain(domain: str, patterns: Collection[str]) -> str | None:
    """The entry of `patterns` naming `domain`: the domain itself, else the longest ".suffix"
    entry of which it is a strict sub-domain (Postfix transport(5) order); None if none."""
    key = _domain_key(domain)
    if key in patterns:
        return key
    labels = key.split(".")
    for i in range(1, len(labels)):  # nearest parent first, so the first hit is the longest
        suffix = "." + ".".join(labels[i:])
        if suffix in patterns:
            return suffix
    return None


class AcceptancePolicy:
    """The RCPT decision. `local_addresses` are our own IPs, so that user@[our IP] is local."""

    def __init__(
        self,
        local_domains: Iterable[str],
        relay_domains: Iterable[str],
        trusted_networks: Iterable[str | IPv4Network | IPv6Network],
        directory: LocalDirectory,
        *,
        local_addresses: Iterable[str] = (),
    ) -> None:
        self.local_domains = tuple(_domain_key(d) for d in local_domains)
        self._relay = frozenset(_domain_key(d) for d in relay_domains)
        self.trusted_networks = tuple(
            ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n
            for n in trusted_networks
        )
        self.directory = directory
        self._local_addresses = frozenset(ip for a in local_addresses if (ip := _ip(a)))

    def is_trusted(self, ip: str) -> bool:
        """Is the client address inside a trusted network? Unparseable text is not trusted."""
        address = _ip(ip)
        # A version mismatch makes `in` False, never an error.
        return address is not None and any(address in n for n in self.trusted_networks)

    def classify_domain(self, domain: str) -> DomainClass:
        """Local (exact names), relay (exact, or ".suffix" = strict sub-domains) or remote."""
        key = _domain_key(domain)
        if key.startswith("["):
            ip = _ip(key[1:-1].removeprefix("ipv6:"))
            return "local" if ip is not None and ip in self._local_addresses else "remote"
        if key in self.local_domains:
            return "local"
        if match_domain(key, self._relay) is not None:
            return "relay"
        return "remote"

    def check_recipient(self, path: ForwardPath, client: ClientContext) -> Mailbox:
        """The mailbox to queue for this RCPT, or RecipientRefused with the reply to send."""
        if client.submission and not client.authenticated:
            # Postfix's submission default (permit_sasl_authenticated, reject): on a
            # submission listener nothing is accepted before AUTH, trusted network or not.
            raise RecipientRefused(530, "5.7.0", "Authentication required")
        if path.mailbox is None:  # <Postmaster>: RFC 5321 §4.1.1.3
            if not self.local_domains:
                raise RecipientRefused(
                    550, "5.1.1", f"{path}: Recipient address rejected: User unknown"
                )
            return Mailbox("postmaster", self.local_domains[0])
        mailbox = path.mailbox
        privileged = client.trusted or client.authenticated
        denied = RecipientRefused(554, "5.7.1", f"<{mailbox}>: Relay access denied")
        # Tricks are refused before the domain check: the domain they show is not where they go.
        if not privileged and relay_trick(path) is not None:
            raise denied
        kind = self.classify_domain(mailbox.domain)
        if kind == "local":
            local = mailbox.unquoted_local_part.lower()
            if local != "postmaster" and not self.directory.knows(local):
                raise RecipientRefused(
                    550, "5.1.1", f"<{mailbox}>: Recipient address rejected: User unknown"
                )
        elif kind == "remote" and not privileged:
            raise denied
        # A trusted client's source route is dropped (RFC 5321 §3.6.1: deliver to the mailbox).
        return mailbox
