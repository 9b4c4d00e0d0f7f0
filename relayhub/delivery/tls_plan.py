"""Which TLS a delivery to one MX host must have, and how its certificate is judged: the
configured `[delivery].tls`, raised by the destination's MTA-STS policy (RFC 8461) or its
DANE TLSA records (RFC 7672), DANE first when both exist (RFC 8461 §2).

The result is a `TLSPolicy` for relayhub.smtp.client, carrying a `PeerCheck` when the peer's
certificate must be judged: levels "none", "opportunistic", "required" (TLS without
authentication), "verify-name" (a chain to a trusted CA and the MX host name in the
certificate) and "dane" (the chain matches a TLSA record).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from relayhub.config import NextHop
from relayhub.delivery.dane import DaneStatus, TLSARecord, host_status, match_chain, mx_secure
from relayhub.delivery.mta_sts_source import CachedPolicy, MtaStsPolicies
from relayhub.dns import Target
from relayhub.dnssec import SecureResolver
from relayhub.maillog import STS_TESTING
from relayhub.smtp.client import TLSPolicy

# OpenSSL's X509_V_ERR_* numbers for the reasons a chain fails most often.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate", 9: "certificate is not yet valid",
    10: "certificate has expired", 18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate", 21: "unable to verify the first certificate",
}


@implementer(IOpenSSLClientConnectionCreator)
class _WatchingTLS:
    """Client TLS (SNI = the MX host) that notes chain verification errors instead of
    aborting the handshake, so that the judgement, and "testing" policies, are ours."""

    def __init__(self, host: str) -> None:
        self.errors: list[int] = []
        self._host = host
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_default_verify_paths()  # the platform's CAs, or SSL_CERT_FILE
        context.set_verify(SSL.VERIFY_PEER, self._note)
        self._context = context

    def _note(self, _connection: Any, _certificate: Any, errno: int, _depth: int,
              ok: int) -> bool:
        if not ok:
            self.errors.append(errno)
        return True

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tls_protocol)
        with suppress(UnicodeError):  # not a name SNI can carry; the name check still applies
            connection.set_tlsext_host_name(self._host.encode("idna"))
        connection.set_connect_state()
        return connection


@dataclass(frozen=True)
class TLSRequirement:
    """What one MX host must show. `source` is who asked: "config", "mta-sts" or "dane";
    `enforce` false is an MTA-STS "testing" policy: judged and logged, never refused."""

    level: str  # "none" | "opportunistic" | "required" | "verify-name" | "dane"
    source: str = "config"
    host: str = ""
    domain: str = ""
    tlsa: tuple[TLSARecord, ...] = ()
    tlsa_name: str = ""
    enforce: bool = True


@dataclass
class RequirementCheck:
    """The `PeerCheck` of a TLSRequirement, for one session."""

    requirement: TLSRequirement
    log: Callable[..., None]
    _tls: _WatchingTLS | None = field(default=None, init=False)

    def client_options(self, host: str) -> Any:
        self._tls = _WatchingTLS(self.requirement.host or host)
        return self._tls

    def judge(self, connection: SSL.Connection) -> tuple[str, str | None]:
        req = self.requirement
        if req.level == "dane":
            chain = [c.to_cryptography() for c in connection.get_peer_cert_chain() or []]
            record, why = match_chain(chain, req.tlsa, req.host)
            if record is not None:
                return "dane", None
            return "none", f"DANE: {why} at {req.tlsa_name} ({len(req.tlsa)} TLSA records)"
        problem = self._pkix_problem(connection)
        if problem is None:
            return ("mta-sts" if req.source == "mta-sts" else "ca"), None
        if req.source != "mta-sts":
            return "none", problem
        if req.enforce:
            return "none", f"MTA-STS policy of {req.domain} (enforce): {problem}"
        self.log(STS_TESTING, domain=req.domain, failure=problem, host=req.host)
        return "none", None

    def _pkix_problem(self, connection: SSL.Connection) -> str | None:
        errors = self._tls.errors if self._tls is not None else [0]
        if errors:
            reason = _VERIFY_ERRORS.get(errors[0], f"X509 error {errors[0]}")
            return f"certificate verify failed: {reason}"
        try:
            verify_hostname(connection, self.requirement.host)
        except VerificationError:
            return f"certificate does not match {self.requirement.host}"
        return None


class HopPlan:
    """The TLS plan for one next hop: its MTA-STS policy, then per MX host its DANE state."""

    def __init__(self, planner: TLSPlanner, hop: NextHop, sts: CachedPolicy | None,
                 dane_ok: bool) -> None:
        self._planner = planner
        self.hop = hop
        self.sts = sts
        self._dane_ok = dane_ok  # the MX RRset (if any) is secure and a resolver is trusted
        self._dane: dict[tuple[str, int], DaneStatus] = {}  # per host: once per delivery

    async def for_target(self, target: Target) -> TLSPolicy | tuple[str, str]:
        """The TLS policy for a session with `target`, or (status, text) when the host must
        not get the mail at all."""
        planner, base = self._planner, self._planner.base
        if self._dane_ok and planner.secure is not None and not _is_ip(target.host):
            key = (target.host, target.port)
            if key not in self._dane:
                self._dane[key] = await host_status(planner.secure, target.host, target.port)
            status = self._dane[key]
            if status.error is not None:
                return ("4.7.5", f"DANE: TLSA lookup of {status.name} failed, so {target} "
                                 f"is not used: {status.error}")
            if status.applies:
                return self._dane_policy(status)
        sts = self.sts
        if sts is None or sts.policy.mode == "none":
            return base
        enforce = sts.policy.mode == "enforce"
        if not sts.policy.allows(target.host):
            failure = (f"MX host {target.host} is not in the policy (mx: "
                       f"{', '.join(sts.policy.mx)})")
            if enforce:
                return ("4.7.5", f"MTA-STS policy of {sts.domain} (enforce): {failure}")
            planner.log(STS_TESTING, domain=sts.domain, failure=failure, host=target.host)
            return base
        if not enforce and base.mode == "verify":
            return base  # already stricter than a testing policy
        requirement = TLSRequirement("verify-name", "mta-sts", target.host, sts.domain,
                                     enforce=enforce)
        mode = "required" if enforce or base.mode == "required" else "opportunistic"
        return TLSPolicy(mode, check=RequirementCheck(requirement, planner.log),
                         why=f" by the MTA-STS policy of {sts.domain}")

    def _dane_policy(self, status: DaneStatus) -> TLSPolicy:
        why = f" by DANE (TLSA records at {status.name})"
        if not status.usable:
            # RFC 7672 §2.2: TLSA records exist but none is usable: encrypt, authenticate none.
            return TLSPolicy("required", why=why)
        requirement = TLSRequirement("dane", "dane", status.host, tlsa=status.usable,
                                     tlsa_name=status.name)
        return TLSPolicy("required", check=RequirementCheck(requirement, self._planner.log),
                         why=why)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class TLSPlanner:
    """Builds HopPlans; `sts` None: MTA-STS off; `secure` None: DANE off."""

    def __init__(self, base: TLSPolicy, sts: MtaStsPolicies | None,
                 secure: SecureResolver | None, log: Callable[..., None]) -> None:
        self.base = base
        self.sts = sts
        self.secure = secure
        self.log = log

    async def for_hop(self, hop: NextHop) -> HopPlan:
        # RFC 8461 applies to the domain whose MX records are used, never to a host the
        # administrator named ([host], transport or relayhost without MX lookup).
        sts = await self.sts.policy_for(hop.host) if self.sts and hop.mx else None
        dane_ok = self.secure is not None and not _is_ip(hop.host)
        if dane_ok and hop.mx and self.secure is not None:
            dane_ok, _note = await mx_secure(self.secure, hop.host)
        return HopPlan(self, hop, sts, dane_ok)
