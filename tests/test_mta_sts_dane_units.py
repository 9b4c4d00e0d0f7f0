"""The pure parts of MTA-STS (RFC 8461) and DANE (RFC 7672): TXT records, policy files, MX
patterns, TLSA matching of certificate chains; plus the AD-bit resolver against the test DNS
server and the policy cache file."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ReactorThread
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnsserver import DNSServer
from twisted.internet.defer import Deferred, gatherResults
from twisted.names import dns

from relayhub.config import parse_settings
from relayhub.delivery.dane import TLSARecord, match_chain, parse_tlsa
from relayhub.delivery.mta_sts import (
    Policy,
    PolicyError,
    StsRecord,
    mx_matches,
    parse_policy,
    parse_txt,
)
from relayhub.delivery.mta_sts_source import (
    REFRESH_RETRY,
    CachedPolicy,
    FetchError,
    MtaStsPolicies,
    PolicyCache,
)
from relayhub.dnssec import TLSA, SecureResolver, trusted_resolvers

# --------------------------------------------------------------------------- MTA-STS


def test_txt_record() -> None:
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == StsRecord("20160831085700Z")
    assert parse_txt(["v=STSv1;id=abc  ;  ext=1"]) == StsRecord("abc")
    assert parse_txt(["v=spf1 -all"]) is None
    assert parse_txt([]) is None


@pytest.mark.parametrize("texts", [
    ["v=STSv1; id=1", "v=STSv1; id=2"],  # two records: none is usable
    ["v=STSv1;"],  # no id
    ["v=STSv1; id=this-has-dashes"],
    ["v=STSv1; id=" + "x" * 33],
    ["v=STSv1 id=1"],
])
def test_bad_txt_records(texts: list[str]) -> None:
    with pytest.raises(PolicyError):
        parse_txt(texts)


def test_policy_file() -> None:
    body = (b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n"
            b"mx: *.Example.net.\r\nmax_age: 604800\r\nextension: ignored\r\n")
    assert parse_policy(body) == Policy("enforce", ("mail.example.com", "*.example.net"),
                                        604800)
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 0\n") == Policy("none", (), 0)
    huge_age = parse_policy(b"version: STSv1\nmode: testing\nmx: a.b\nmax_age: 99999999\n")
    assert huge_age.max_age == 31557600


@pytest.mark.parametrize("body", [
    b"mode: enforce\nversion: STSv1\nmx: a.example\nmax_age: 1\n",  # version not first
    b"version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
    b"version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
    b"version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
    b"version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1\n",
    b"version: STSv1\nmode: enforce\nmx: mail.*.example\nmax_age: 1\n",
    b"version: STSv1\nthis line has no colon\n",
    b"",
    b"\xff\xfe",
    b"version: STSv1\nmode: none\nmax_age: 1\n" + b"#" * 70000,
])
def test_bad_policy_files(body: bytes) -> None:
    with pytest.raises(PolicyError):
        parse_policy(body)


@pytest.mark.parametrize(("pattern", "host", "matches"), [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.Example.COM.", True),
    ("mail.example.com", "mail2.example.com", False),
    ("*.example.com", "mx1.example.com", True),
    ("*.example.com", "example.com", False),  # the wildcard is one whole label
    ("*.example.com", "a.b.example.com", False),  # ... and only one
    ("*.example.com", "mx.example.com.evil", False),
])
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches
    assert Policy("enforce", (pattern,), 60).allows(host) is matches


# --------------------------------------------------------------------------- DANE


@dataclasses.dataclass
class Issued:
    cert: x509.Certificate
    key: Any


def _issue(name: str, issuer: Issued | None = None, *, ca: bool = False,
           days: int = 1, dns_names: tuple[str, ...] = ()) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.cert.subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=2))
               .not_valid_after(now + datetime.timedelta(days=days)))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(cert, key)


def _record(usage: int, matching: int, cert: x509.Certificate) -> TLSARecord:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256 if matching == 1 else hashlib.sha512
    return TLSARecord(usage, 1, matching, digest(spki).digest())


ROOT = _issue("TA root", ca=True)
INTERMEDIATE = _issue("TA intermediate", ROOT, ca=True)
SERVER = _issue("mx.example.net", INTERMEDIATE, dns_names=("mx.example.net",))
CHAIN = [SERVER.cert, INTERMEDIATE.cert, ROOT.cert]


def test_tlsa_rdata() -> None:
    assert parse_tlsa(bytes([3, 1, 1]) + b"\xab" * 32) == TLSARecord(3, 1, 1, b"\xab" * 32)
    with pytest.raises(ValueError):
        parse_tlsa(b"\x03\x01")
    assert str(TLSARecord(3, 1, 1, b"\x01\x02")) == "3 1 1 0102"
    assert not TLSARecord(3, 0, 1, b"\0" * 32).usable  # selector 0 (full cert): not supported
    assert not TLSARecord(1, 1, 1, b"\0" * 32).usable  # PKIX-EE: not for SMTP (RFC 7672 §3.1.3)
    assert not TLSARecord(3, 1, 1, b"\0" * 20).usable  # wrong digest length


@pytest.mark.parametrize("matching", [1, 2])
def test_dane_ee_matches_the_key_whatever_the_name_and_dates(matching: int) -> None:
    expired = _issue("wrong.name", days=-1)  # self-signed, expired, for another name
    record = _record(3, matching, expired.cert)
    assert match_chain([expired.cert], [record], "mx.example.net")[0] == record
    assert match_chain([SERVER.cert], [record], "mx.example.net") == (
        None, "the certificate matches no TLSA record")


def test_dane_ta_needs_chain_and_name() -> None:
    for anchor in (ROOT.cert, INTERMEDIATE.cert):
        record = _record(2, 1, anchor)
        assert match_chain(CHAIN, [record], "mx.example.net")[0] == record
    record = _record(2, 1, ROOT.cert)
    found, why = match_chain(CHAIN, [record], "other.example.net")
    assert found is None and why == "certificate does not match other.example.net"
    # A server certificate not signed by the anchor's chain does not pass.
    stray = _issue("mx.example.net", _issue("someone else", ca=True),
                   dns_names=("mx.example.net",))
    found, why = match_chain([stray.cert, INTERMEDIATE.cert, ROOT.cert], [record],
                             "mx.example.net")
    assert found is None and "broken chain" in why
    # The anchor must be in the chain the server sends: a leaf alone is not enough.
    assert match_chain([SERVER.cert], [record], "mx.example.net")[0] is None
    # DANE-TA does not vouch for an expired server certificate.
    old = _issue("mx.example.net", INTERMEDIATE, days=-1, dns_names=("mx.example.net",))
    assert match_chain([old.cert, INTERMEDIATE.cert], [_record(2, 1, INTERMEDIATE.cert)],
                       "mx.example.net")[0] is None


def test_unusable_records_match_nothing() -> None:
    assert match_chain(CHAIN, [TLSARecord(3, 0, 0, SERVER.cert.public_bytes(
        serialization.Encoding.DER))], "mx.example.net")[0] is None
    assert match_chain([], [_record(3, 1, SERVER.cert)], "mx.example.net") == (
        None, "the server sent no certificate")


# --------------------------------------------------------------------------- settings


def test_trusted_resolvers() -> None:
    def delivery(**keys: Any) -> Any:
        return parse_settings({"delivery": keys}, "test").delivery

    assert trusted_resolvers(delivery(nameservers=["127.0.0.1:5353", "10.0.0.1"])) == (
        (("127.0.0.1", 5353),), "")
    servers, why = trusted_resolvers(delivery(nameservers=["10.0.0.1"]))
    assert servers == () and "no trusted validating resolver" in why
    assert trusted_resolvers(delivery(nameservers=[], dnssec_nameservers=["10.0.0.53"])) == (
        (("10.0.0.53", 53),), "")
    assert trusted_resolvers(delivery(nameservers=["::1"], dane=False)) == (
        (), "[delivery] dane = false")


# --------------------------------------------------------------------------- I/O parts


def test_secure_resolver_reports_the_ad_bit(reactor_thread: ReactorThread) -> None:
    zone = {"signed.example": {"A": ["127.0.0.5"]}, "plain.example": {"A": ["127.0.0.6"]},
            "_25._tcp.signed.example": {"TLSA": [(3, 1, 1, b"\x01" * 32)]}}
    with DNSServer(reactor_thread, zone,
                   secure={"signed.example", "_25._tcp.signed.example"}) as server:
        resolver = SecureResolver(reactor_thread.reactor, server.nameservers)

        def ask(name: str, qtype: int) -> Any:
            return reactor_thread.run(lambda: Deferred.fromCoroutine(
                resolver.query(name, qtype)))

        assert ask("signed.example", dns.A).secure
        assert not ask("plain.example", dns.A).secure
        tlsa = ask("_25._tcp.signed.example", TLSA)
        assert tlsa.secure and parse_tlsa(tlsa.records[0].data) == TLSARecord(
            3, 1, 1, b"\x01" * 32)
        over_tcp = reactor_thread.run(lambda: Deferred.fromCoroutine(resolver._ask_tcp(
            server.nameservers[0], dns.Query(b"signed.example", dns.A, dns.IN), 2)))
        assert over_tcp.authenticData and over_tcp.answers[0].payload.dottedQuad() == \
            "127.0.0.5"
        missing = ask("missing.example", dns.A)
        assert not missing.exists and not missing.secure
        server.set_secure([])
        assert not ask("signed.example", dns.A).secure


def test_policy_cache_round_trip(tmp_path: Path) -> None:
    cache = PolicyCache(tmp_path)
    assert cache.load("example.com") is None
    entry = CachedPolicy("example.com", "abc", Policy("enforce", ("*.example.com",), 600), 1e9)
    cache.store(entry)
    assert PolicyCache(tmp_path).load("example.com") == entry
    cache.store(dataclasses.replace(entry, id="def"))
    loaded = cache.load("example.com")
    assert loaded is not None and loaded.id == "def" and loaded.expires == 1e9 + 600


class StubFetcher:
    """Stands in for the DNS and HTTPS side of MtaStsPolicies: what a domain publishes now."""

    def __init__(self) -> None:
        self.txt_id: str | None = "1"
        self.policy_mode = "enforce"
        self.fail = False
        self.fetches = 0
        self.gate: Deferred[None] | None = None  # holds fetches until fired

    async def record(self, domain: str) -> StsRecord | None:
        return StsRecord(self.txt_id) if self.txt_id else None

    async def policy(self, domain: str) -> Policy:
        self.fetches += 1
        if self.gate is not None:
            await self.gate
        if self.fail:
            raise FetchError("HTTPS server down")
        return Policy(self.policy_mode, ("mx.example.com",), 1000)


def test_policies_are_cached_refreshed_and_kept(reactor_thread: ReactorThread,
                                                tmp_path: Path) -> None:
    now = [1_000_000.0]
    fetcher, logged = StubFetcher(), []

    def policies() -> MtaStsPolicies:
        return MtaStsPolicies(reactor_thread.reactor, fetcher, PolicyCache(tmp_path),  # type: ignore[arg-type]
                              log=lambda fmt, **kw: logged.append(fmt.format(**kw)),
                              clock=lambda: now[0])

    def mode(source: MtaStsPolicies) -> str | None:
        found = reactor_thread.run(
            lambda: Deferred.fromCoroutine(source.policy_for("Example.COM")))
        return None if found is None else f"{found.id}:{found.policy.mode}"

    def settle() -> None:  # let a background refresh finish (it writes the cache file)
        deadline = time.monotonic() + 10
        while reactor_thread.run(lambda: second.refreshing) and time.monotonic() < deadline:
            time.sleep(0.01)

    first = policies()
    assert mode(first) == "1:enforce" and fetcher.fetches == 1
    assert mode(first) == "1:enforce" and fetcher.fetches == 1  # from the cache
    # A restart reads the cache file; with the TXT record gone the policy still holds.
    fetcher.txt_id = None
    second = policies()
    assert mode(second) == "1:enforce" and fetcher.fetches == 1
    # A new id: the cached policy serves now, the new one is fetched in the background.
    fetcher.txt_id, fetcher.policy_mode = "2", "testing"
    assert mode(second) == "1:enforce"
    settle()
    assert mode(second) == "2:testing" and fetcher.fetches == 2
    # A failed refresh keeps the cached policy (and is logged).
    fetcher.txt_id, fetcher.fail = "3", True
    now[0] += REFRESH_RETRY + 1
    assert mode(second) == "2:testing"
    settle()
    assert mode(second) == "2:testing" and fetcher.fetches == 3
    assert any("not refreshed, the cached one stays" in line for line in logged)
    # Expired and not refreshable: no policy (RFC 8461 §5).
    now[0] += 1000
    assert mode(second) is None


def test_concurrent_first_deliveries_share_one_fetch(reactor_thread: ReactorThread,
                                                     tmp_path: Path) -> None:
    fetcher = StubFetcher()
    source = MtaStsPolicies(reactor_thread.reactor, fetcher, PolicyCache(tmp_path),  # type: ignore[arg-type]
                            log=lambda fmt, **kw: None)

    def both() -> Deferred[list[Any]]:
        fetcher.gate = Deferred()
        waiting = gatherResults([Deferred.fromCoroutine(source.policy_for("example.com"))
                                 for _ in range(3)])
        fetcher.gate.callback(None)
        return waiting

    results = reactor_thread.run(both)
    assert fetcher.fetches == 1 and {r.id for r in results} == {"1"}
