"""The MTA-STS and DANE parts of `relayhubctl route`: the destination's policy (from the
daemon's cache, else fetched now and not kept) and the TLSA records of each MX host with
their DNSSEC status, asked the way the queue manager asks them."""

from __future__ import annotations

import datetime
import time
from typing import Any

from twisted.internet import threads

from relayhub.config import NextHop, Settings
from relayhub.delivery.dane import host_status, mx_secure
from relayhub.delivery.mta_sts_source import FetchError, PolicyCache, PolicyFetcher
from relayhub.dnssec import SecureResolver, trusted_resolvers


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def mta_sts_part(reactor: Any, settings: Settings, hop: NextHop) -> dict[str, Any]:
    """The `mta_sts` object of a remote route."""
    found: dict[str, Any] = {"enabled": settings.delivery.mta_sts, "applies": hop.mx,
                             "txt_id": None, "policy": None, "error": None}
    if not (settings.delivery.mta_sts and hop.mx):
        return found
    fetcher = PolicyFetcher(reactor, settings.delivery.nameservers)
    try:
        record = await fetcher.record(hop.host)
        found["txt_id"] = record.id if record else None
    except FetchError as problem:
        found["error"] = str(problem)
        record = None
    try:
        cached = await threads.deferToThread(
            PolicyCache(settings.server.state_dir).load, hop.host.lower())
    except Exception as problem:  # an unreadable cache is reported, not a crash
        found["error"] = f"policy cache: {problem}"
        cached = None
    now = time.time()
    if cached is not None and cached.expires > now:
        policy, source = cached.policy, {
            "id": cached.id, "cached": True, "fetched": _iso(cached.fetched),
            "age_seconds": int(now - cached.fetched),
            "expires": _iso(cached.expires)}
    elif record is not None:
        try:
            policy = await fetcher.policy(hop.host)
        except FetchError as problem:
            found["error"] = str(problem)
            return found
        source = {"id": record.id, "cached": False, "fetched": _iso(now), "age_seconds": 0,
                  "expires": _iso(now + policy.max_age)}
    else:
        return found
    found["policy"] = {"mode": policy.mode, "mx": list(policy.mx), "max_age": policy.max_age,
                       **source}
    return found


def mta_sts_lines(part: dict[str, Any] | None) -> list[str]:
    if part is None:
        return []
    if not part["enabled"]:
        return ["  MTA-STS:   off ([delivery] mta_sts = false)"]
    if not part["applies"]:
        return ["  MTA-STS:   does not apply (no MX lookup for this next hop)"]
    policy = part["policy"]
    if policy is None:
        why = f" ({part['error']})" if part["error"] else ""
        return [f"  MTA-STS:   none{why}"]
    where = (f"cached {policy['age_seconds']}s ago" if policy["cached"]
             else "fetched now, not in the cache yet")
    lines = [f"  MTA-STS:   mode {policy['mode']}, max_age {policy['max_age']}s, "
             f"id {policy['id']}, {where}, expires {policy['expires']}"]
    lines += [f"    mx:    {pattern}" for pattern in policy["mx"]]
    if part["txt_id"] not in (None, policy["id"]):
        lines.append(f"    TXT id is now {part['txt_id']}: the daemon will refresh the policy")
    if part["error"]:
        lines.append(f"    note:  {part['error']}")
    return lines


async def dane_part(reactor: Any, settings: Settings, hop: NextHop, found: dict[str, Any]
                    ) -> dict[str, Any]:
    """The `dane` object of a remote route; `found` is its next_hop object (the MX hosts)."""
    servers, why_off = trusted_resolvers(settings.delivery)
    part: dict[str, Any] = {"enabled": bool(servers), "note": why_off or None,
                            "resolvers": [f"{host}:{port}" for host, port in servers],
                            "mx_secure": None, "hosts": []}
    if not servers:
        return part
    resolver = SecureResolver(reactor, servers)
    if hop.mx:
        part["mx_secure"], note = await mx_secure(resolver, hop.host)
        if not part["mx_secure"]:
            part["note"] = f"{note}: DANE does not apply (RFC 7672 §2.2.1)"
            return part
    seen: list[tuple[str, int]] = []
    for address in found["addresses"]:
        if (address["host"], address["port"]) not in seen:
            seen.append((address["host"], address["port"]))
    for host, port in seen:
        status = await host_status(resolver, host, port)
        part["hosts"].append({
            "host": host, "port": port, "tlsa_name": status.name, "secure": status.secure,
            "records": [str(r) for r in status.records], "usable": len(status.usable),
            "applies": status.applies, "note": status.note or None, "error": status.error})
    return part


def dane_lines(part: dict[str, Any] | None) -> list[str]:
    if part is None:
        return []
    if not part["enabled"]:
        return [f"  DANE:      off: {part['note']}"]
    lines = [f"  DANE:      via {', '.join(part['resolvers'])}"
             + (f"; {part['note']}" if part["note"] else "")]
    for host in part["hosts"]:
        state = "secure" if host["secure"] else "insecure"
        if host["error"]:
            lines.append(f"    {host['tlsa_name']}: lookup failed: {host['error']}")
            continue
        effect = ("TLS mandatory, certificate must match" if host["applies"] and host["usable"]
                  else "TLS mandatory, no usable record: not authenticated" if host["applies"]
                  else "not used")
        lines.append(f"    {host['tlsa_name']}: {state}, {len(host['records'])} TLSA: {effect}"
                     + (f" ({host['note']})" if host["note"] else ""))
        lines += [f"      TLSA {record}" for record in host["records"]]
    return lines
