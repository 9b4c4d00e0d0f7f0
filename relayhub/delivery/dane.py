"""DANE for SMTP (RFC 7672): TLSA records of an MX host, when DNSSEC vouches for them, and
whether a server's certificate chain matches them.

Supported: usages 3 (DANE-EE) and 2 (DANE-TA), selector 1 (SubjectPublicKeyInfo), matching
types 1 (SHA-256) and 2 (SHA-512). DANE-EE checks only the server's key (no names, no
expiry, RFC 7672 §3.1.1); DANE-TA needs the trust anchor's certificate in the chain the
server sends, a chain of signatures from the server's certificate up to it, the MX host name
in the server's certificate and unexpired certificates below the anchor (§3.1.2).
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.names import dns

from relayhub.dns import DNSError
from relayhub.dnssec import TLSA, SecureResolver

DANE_TA, DANE_EE = 2, 3
SPKI = 1
_DIGESTS = {1: hashlib.sha256, 2: hashlib.sha512}


@dataclass(frozen=True)
class TLSARecord:
    usage: int
    selector: int
    matching: int
    data: bytes

    @property
    def usable(self) -> bool:
        return (self.usage in (DANE_TA, DANE_EE) and self.selector == SPKI
                and self.matching in _DIGESTS and len(self.data) == _size(self.matching))

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"


def _size(matching: int) -> int:
    return _DIGESTS[matching]().digest_size


def parse_tlsa(rdata: bytes) -> TLSARecord:
    """A TLSA record from its RDATA (RFC 6698 §2.1); ValueError when it is too short."""
    if len(rdata) < 4:
        raise ValueError("TLSA record shorter than 4 bytes")
    return TLSARecord(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))


def spki_digest(certificate: x509.Certificate, matching: int) -> bytes:
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _DIGESTS[matching](spki).digest()


def _fits(certificate: x509.Certificate, record: TLSARecord) -> bool:
    return spki_digest(certificate, record.matching) == record.data


def _valid_now(certificate: x509.Certificate, now: datetime.datetime) -> bool:
    return certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


def _ta_chain_ok(chain: Sequence[x509.Certificate], anchor: int, host: str,
                 now: datetime.datetime) -> str | None:
    """Why the chain up to chain[anchor] does not authenticate `host`, or None if it does."""
    for below, above in itertools.pairwise(chain[:anchor + 1]):
        try:
            below.verify_directly_issued_by(above)
        except (InvalidSignature, ValueError, TypeError) as error:
            # ValueError: names do not chain; TypeError: a key type it cannot check.
            return f"broken chain below the DANE-TA anchor: {error or type(error).__name__}"
        if not _valid_now(below, now):
            return "a certificate below the DANE-TA anchor has expired or is not yet valid"
    try:
        verify_certificate_hostname(chain[0], host)
    except VerificationError:
        return f"certificate does not match {host}"
    return None


def match_chain(chain: Sequence[x509.Certificate], records: Sequence[TLSARecord], host: str,
                now: datetime.datetime | None = None) -> tuple[TLSARecord | None, str]:
    """The record that authenticates `chain` (server certificate first) for MX host `host`,
    or (None, why not)."""
    now = now or datetime.datetime.now(datetime.UTC)
    if not chain:
        return None, "the server sent no certificate"
    why = "the certificate matches no TLSA record"
    for record in (r for r in records if r.usable):
        if record.usage == DANE_EE:
            if _fits(chain[0], record):
                return record, ""
            continue
        for index in range(1, len(chain)):
            if _fits(chain[index], record):
                problem = _ta_chain_ok(chain, index, host, now)
                if problem is None:
                    return record, ""
                why = problem
    return None, why


@dataclass(frozen=True)
class DaneStatus:
    """What DNSSEC says about one MX host: `secure` when its TLSA answer (and the MX and
    address records that led to it) carried the AD bit; `error` when the lookup failed."""

    host: str
    port: int
    secure: bool
    records: tuple[TLSARecord, ...] = ()
    note: str = ""
    error: str | None = None

    @property
    def name(self) -> str:
        return f"_{self.port}._tcp.{self.host}"

    @property
    def applies(self) -> bool:
        """RFC 7672 §2.2: secure TLSA records exist, so TLS is mandatory."""
        return self.secure and bool(self.records)

    @property
    def usable(self) -> tuple[TLSARecord, ...]:
        return tuple(r for r in self.records if r.usable)


async def host_status(resolver: SecureResolver, host: str, port: int) -> DaneStatus:
    """The DANE status of `host`: its address records must be secure before its TLSA
    records count (RFC 7672 §2.2.2). DNS trouble with the TLSA lookup itself is `error`:
    such a host must not get the mail (it may be a downgrade attack)."""
    def insecure(note: str) -> DaneStatus:
        return DaneStatus(host, port, False, note=note)

    try:
        address = await resolver.query(host, dns.A)
        if address.exists and not address.records:
            address = await resolver.query(host, dns.AAAA)
    except DNSError as problem:
        return insecure(f"address lookup failed: {problem.text}")
    if not address.secure:
        return insecure(f"the address records of {host} are not DNSSEC-signed")
    name = f"_{port}._tcp.{host}"
    try:
        answer = await resolver.query(name, TLSA)
    except DNSError as problem:
        return DaneStatus(host, port, False, error=problem.text)
    if not answer.secure:
        return insecure(f"{name} is not DNSSEC-signed" if answer.records or answer.exists
                        else f"no {name} (insecure NXDOMAIN)")
    records = []
    for payload in answer.records:
        try:
            records.append(parse_tlsa(bytes(getattr(payload, "data", b""))))
        except ValueError:
            continue  # a malformed record counts as an unusable one: it is still "present"
    if answer.records and not records:
        records = [TLSARecord(255, 255, 255, b"")]
    note = "" if records else f"no TLSA record at {name} (secure denial)"
    return DaneStatus(host, port, True, tuple(records), note=note)


async def mx_secure(resolver: SecureResolver, domain: str) -> tuple[bool, str]:
    """Whether the MX RRset of `domain` is secure (RFC 7672 §2.2.1), and a note if not."""
    try:
        answer = await resolver.query(domain, dns.MX)
    except DNSError as problem:
        return False, f"MX lookup through the DNSSEC resolver failed: {problem.text}"
    if answer.secure:
        return True, ""
    return False, f"the MX records of {domain} are not DNSSEC-signed"
