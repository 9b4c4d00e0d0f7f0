"""`relayhubctl route ADDRESS`: what the hub would do with mail to an address, explained with
the daemon's own policy, masquerading, routing and DNS code."""

from __future__ import annotations

import argparse
import ipaddress
from types import MappingProxyType
from typing import Any

from relayhub import dkim
from relayhub.address import Mailbox, parse_forward_path
from relayhub.admin.aliases_cmd import load_names
from relayhub.admin.cli import EXIT_OK, EXIT_USAGE, Commands, add_command
from relayhub.admin.queue_cmd import command, print_json, printable, say_error
from relayhub.admin.route_tls import dane_lines, dane_part, mta_sts_lines, mta_sts_part
from relayhub.aliases import AliasFileError, LocalNames
from relayhub.config import Settings
from relayhub.dns import DNSError, MXResolver
from relayhub.errors import RecipientRefused, SMTPReply
from relayhub.masquerade import masquerade_address
from relayhub.policy import AcceptancePolicy, ClientContext
from relayhub.routing import LocalRoute, Router, SmtpRoute
from relayhub.users import UserDatabase, UsersFileError

# What each [delivery].tls mode means for a session (relayhub.smtp.client.TLSPolicy).
TLS_MEANING = MappingProxyType({
    "none": "never STARTTLS: plaintext",
    "opportunistic": "STARTTLS when the server offers it, plaintext otherwise",
    "required": "STARTTLS required (certificate not checked); deferred without it",
    "verify": "STARTTLS required with a valid certificate for the host name; "
              "deferred without it",
})
DOMAIN_CLASS_MEANING = MappingProxyType({
    "local": "a local domain: delivered into mailboxes here",
    "relay": "a relay domain: accepted from anyone and passed on",
    "remote": "neither local nor relay: relayed only for trusted or authenticated clients",
})


def names_and_policy(settings: Settings) -> tuple[LocalNames, AcceptancePolicy]:
    """Users, aliases and the RCPT policy exactly as the daemon builds them."""
    try:
        return load_names(settings)
    except (AliasFileError, UsersFileError) as error:
        raise ValueError("; ".join(error.problems)) from None


def _client(policy: AcceptancePolicy, ip: str | None) -> ClientContext:
    # Without --client: an unauthenticated client from outside the trusted networks, the
    # case that decides whether the hub is an open relay.
    address = ip or ""
    return ClientContext(address=address, trusted=policy.is_trusted(address),
                         authenticated=False)


async def _smtp_hop(reactor: Any, settings: Settings, route: SmtpRoute) -> dict[str, Any]:
    hop = route.next_hop
    kind, _, rule = route.reason.partition(" ")
    port = hop.port or settings.delivery.smtp_port
    resolver = MXResolver(reactor, settings.delivery.nameservers)
    found: dict[str, Any] = {
        "type": kind, "rule": rule or None, "hop": str(hop), "host": hop.host, "port": port,
        "mx_lookup": hop.mx, "mx": None, "addresses": [], "error": None,
    }
    try:
        if hop.mx:
            found["mx"] = [{"preference": preference, "host": host}
                           for preference, host in await resolver.lookup_mx(hop.host)]
        targets = await resolver.resolve(hop, settings.delivery.smtp_port)
    except DNSError as problem:
        found["error"] = f"{problem.status} {problem.text}"
        return found
    found["addresses"] = [{"host": t.host, "address": t.address, "port": t.port,
                           "preference": t.preference} for t in targets]
    return found


async def _route_one(reactor: Any, settings: Settings, router: Router,
                     users: UserDatabase, address: str) -> dict[str, Any]:
    route = router.route(address)
    if isinstance(route, LocalRoute):
        known = route.mailbox == "postmaster" or users.knows(route.mailbox)
        return {
            "recipient": address,
            "next_hop": {"type": "local", "mailbox": route.mailbox, "known": known,
                         "maildir": str(settings.server.state_dir / "mail" / route.mailbox)},
            "tls": None,
            "mta_sts": None,
            "dane": None,
        }
    hop = await _smtp_hop(reactor, settings, route)
    return {
        "recipient": address,
        "next_hop": hop,
        "tls": {"mode": settings.delivery.tls, "meaning": TLS_MEANING[settings.delivery.tls]},
        "mta_sts": await mta_sts_part(reactor, settings, route.next_hop),
        "dane": await dane_part(reactor, settings, route.next_hop, hop),
    }


def dkim_section(settings: Settings, sender: str | None, client: ClientContext
                 ) -> dict[str, Any]:
    """The `route --json` "dkim" object: the configured keys and, for --from SENDER, the
    key that signs mail from it (From: as the sender, after masquerading)."""
    found: dict[str, Any] = {"keys": [], "sender": sender, "from_domain": None, "key": None,
                             "signs": False, "reason": None}
    try:
        signer = dkim.build_signer(settings.dkim.entries())
    except dkim.DkimKeyError as error:
        found["reason"] = str(error)
        return found
    keys = signer.keys if signer else ()
    found["keys"] = [{"selector": k.selector, "domains": list(k.domains),
                      "algorithm": k.algorithm, "private_key": str(k.path)} for k in keys]
    if signer is None:
        found["reason"] = "no [dkim] key configured: nothing is signed"
        return found
    if sender is None:
        found["reason"] = "give --from SENDER for the key that signs its mail"
        return found
    domain = masquerade_address(sender, settings.domains.masquerade).rpartition("@")[2].lower()
    found["from_domain"] = domain
    chosen = signer.choose(domain) if domain else None
    if chosen is None:
        found["reason"] = f"no key for From: domain {domain or '(none)'}: not signed"
        return found
    key, signing_domain = chosen
    found["key"] = {"selector": key.selector, "domain": signing_domain,
                    "algorithm": key.algorithm, "private_key": str(key.path)}
    found["signs"] = client.trusted or client.authenticated
    found["reason"] = ("signed at acceptance" if found["signs"] else
                       "this client is not trusted: signed only when it authenticates")
    return found


def _dkim_line(found: dict[str, Any]) -> str:
    key = found["key"]
    if key is None:
        keys = ", ".join(f"s={k['selector']} for {' '.join(k['domains'])}" for k in found["keys"])
        return f"dkim:        {found['reason']}" + (f" (keys: {keys})" if keys else "")
    return (f"dkim:        From: {found['from_domain']}: s={key['selector']} d={key['domain']} "
            f"{key['algorithm']} ({key['private_key']}); {found['reason']}")


async def explain(reactor: Any, settings: Settings, address: str, client_ip: str | None,
                  sender: str | None = None) -> dict[str, Any]:
    """The `route --json` object; ValueError for an address that cannot be parsed."""
    try:
        path = parse_forward_path(f"<{address.strip().removeprefix('<').removesuffix('>')}>",
                                  utf8=True)
    except SMTPReply as problem:
        raise ValueError(f"{address!r}: {problem.text}") from None
    domains = settings.domains
    names, policy = names_and_policy(settings)
    client = _client(policy, client_ip)
    mailbox: Mailbox | None
    try:
        mailbox = policy.check_recipient(path, client)
        decision: dict[str, Any] = {"accepted": True, "reply": None}
    except RecipientRefused as refused:
        decision = {"accepted": False, "reply": f"{refused.code} {refused.status} {refused.text}"}
        mailbox = path.mailbox
    if mailbox is None:  # <Postmaster> refused: nothing more to explain
        raise ValueError(f"{address!r}: no mailbox (and no local domain for <Postmaster>)")
    normalized = str(mailbox)
    try:
        expansion = names.expand(mailbox)  # what RCPT would queue: the same code
    except SMTPReply as refused:
        raise ValueError(f"{address!r}: {refused.text}") from None
    members = [member.address for member in expansion.members] if expansion.alias else []
    router = Router(domains, settings.routing)
    users = UserDatabase(settings.users.file)
    targets = members if members else [normalized]
    rewritten = masquerade_address(normalized, domains.masquerade)
    return {
        "address": normalized,
        "domain": mailbox.domain,
        "domain_class": policy.classify_domain(mailbox.domain),
        "client": {"address": client_ip, "trusted": client.trusted},
        "policy": decision,
        "aliases": members,
        "masquerade": {"sender": rewritten, "rewritten": rewritten != normalized},
        "routes": [await _route_one(reactor, settings, router, users, target)
                   for target in targets],
        "dkim": dkim_section(settings, sender, client),
    }


def _hop_lines(route: dict[str, Any]) -> list[str]:
    hop = route["next_hop"]
    if hop["type"] == "local":
        known = "" if hop["known"] else "  (no such user: it would bounce)"
        return [f"  next hop:  local mailbox {hop['mailbox']} in {hop['maildir']}{known}"]
    why = {"transport": f"[routing].transport entry {hop['rule']}",
           "relayhost": "[routing].relayhost", "literal": "address literal",
           "mx": "MX lookup (no transport entry, no relayhost)"}[hop["type"]]
    lines = [f"  next hop:  {hop['hop']} (port {hop['port']}), by {why}"]
    if hop["mx"] is not None:
        lines += [f"    MX {mx['preference']:>5} {mx['host']}" for mx in hop["mx"]] or [
            "    no MX records: the domain's own address records are used"]
    if hop["error"]:
        lines.append(f"    DNS:   {hop['error']}")
    lines += [f"    try:   {a['host']}[{a['address']}]:{a['port']}" for a in hop["addresses"]]
    lines.append(f"  TLS:       {route['tls']['mode']}: {route['tls']['meaning']}")
    lines += mta_sts_lines(route["mta_sts"])
    lines += dane_lines(route["dane"])
    return lines


def _text(found: dict[str, Any]) -> list[str]:
    client = found["client"]
    trust = "trusted network" if client["trusted"] else "not trusted"
    who = (f"client {client['address']} ({trust})" if client["address"]
           else "an untrusted client (give --client IP for another)")
    policy = found["policy"]
    verdict = "accepted" if policy["accepted"] else f"refused: {policy['reply']}"
    masq = found["masquerade"]
    lines = [
        f"address:     {printable(found['address'])}",
        f"domain:      {found['domain']}: {DOMAIN_CLASS_MEANING[found['domain_class']]}",
        f"policy:      from {who}: {verdict}",
        "aliases:     " + ("not available in this relayhubctl" if found["aliases"] is None
                           else ", ".join(found["aliases"]) or "not an alias"),
        "masquerade:  as a sender: " + (f"rewritten to {masq['sender']}" if masq["rewritten"]
                                        else "unchanged"),
    ]
    lines.append(_dkim_line(found["dkim"]))
    for route in found["routes"]:
        lines.append(f"recipient:   {printable(route['recipient'])}")
        lines += _hop_lines(route)
    return lines


async def route(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    if args.client is not None:
        try:
            ipaddress.ip_address(args.client)
        except ValueError:
            say_error(f"route: --client {args.client!r} is not an IP address")
            return EXIT_USAGE
    try:
        found = await explain(reactor, settings, args.address, args.client, args.sender)
    except ValueError as problem:
        say_error(f"route: {problem}")
        return EXIT_USAGE
    if args.json:
        print_json(found)
    else:
        print("\n".join(_text(found)))
    return EXIT_OK


def register(commands: Commands) -> None:
    parser = add_command(commands, "route", "explain what the hub would do with mail to ADDRESS: "
                                            "relay policy, aliases, masquerading, next hop, TLS")
    parser.add_argument("address", metavar="ADDRESS")
    parser.add_argument("--client", metavar="IP",
                        help="decide relaying for this client address (default: an untrusted "
                             "client)")
    parser.add_argument("--from", dest="sender", metavar="SENDER",
                        help="show the DKIM key that signs mail from SENDER")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(command=command(route))
