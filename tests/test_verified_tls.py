"""MTA-STS (RFC 8461) and DANE (RFC 7672) on a real daemon: the test DNS server publishes
TXT, TLSA (with or without the AD bit) and MX records, a local HTTPS server on port 443 of
its own loopback addresses serves the policies (its certificate from the test CA, trusted
by the daemon through SSL_CERT_FILE), and TLS sinks with right or wrong certificates play
the MX hosts. Port 443 needs root, as the tests of this suite run."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import ReactorThread
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnsserver import DNSServer
from hubprocess import REPO, Hub, free_port
from smtpsink import DEFAULT_EXTENSIONS, SMTPSink, TestCA
from test_tls import PemCA
from twisted.internet import ssl
from twisted.web.resource import Resource
from twisted.web.server import Site

POLICY_HOST = "127.13.0.61"  # mta-sts.<domain> of most test domains
CACHED_POLICY_HOST = "127.13.0.62"  # only cached.example's: stopped by the cache test

POLICIES = {
    "enforce.example": "mode: enforce\nmx: mx.enforce.example\nmax_age: 86400\n",
    "wrongcert.example": "mode: enforce\nmx: mx.wrongcert.example\nmax_age: 86400\n",
    "testing.example": "mode: testing\nmx: mx.testing.example\nmax_age: 86400\n",
    "notlisted.example": "mode: enforce\nmx: *.elsewhere.example\nmax_age: 86400\n",
    "cached.example": "mode: enforce\nmx: *.cached.example\nmax_age: 86400\n",
    # DANE beats MTA-STS: this policy would refuse the MX host that DANE vouches for.
    "both.example": "mode: enforce\nmx: *.elsewhere.example\nmax_age: 86400\n",
}


def certificate(ca: TestCA, *names: str) -> tuple[Any, bytes]:
    """Server TLS options with a certificate for `names` from `ca`, and the SHA-256 of its
    SubjectPublicKeyInfo (the data of a "3 1 1" TLSA record)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca._name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(ca._key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return ssl.PrivateCertificate.loadPEM(pem).options(), hashlib.sha256(spki).digest()


class _Policies(Resource):
    isLeaf = True

    def __init__(self, requests: list[str]) -> None:
        super().__init__()
        self.requests = requests

    def render_GET(self, request: Any) -> bytes:
        host = request.getRequestHostname().decode()
        self.requests.append(host)
        domain = host.removeprefix("mta-sts.")
        if request.path != b"/.well-known/mta-sts.txt" or domain not in POLICIES:
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"Content-Type", b"text/plain")
        return f"version: STSv1\n{POLICIES[domain]}".encode()


@dataclass
class World:
    rt: ReactorThread
    dns: DNSServer
    hub: Hub
    port: int
    sinks: dict[str, SMTPSink]
    https: dict[str, Any]
    zone: dict[str, Any]
    requests: list[str] = field(default_factory=list)

    def send(self, recipient: str) -> str:
        return self.hub.send([recipient], b"Subject: verified tls\r\n\r\nhello\r\n")

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relayhub.admin", "-c", str(self.hub.config_path), *args],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)))

    def show(self, queue_id: str) -> Any:
        done = self.ctl("queue", "show", queue_id, "--json")
        return json.loads(done.stdout) if done.returncode == 0 else None

    def deferred_error(self, queue_id: str) -> str:
        def error() -> str | None:
            shown = self.show(queue_id)
            if shown and shown["recipients"][0]["status"] == "deferred":
                return str(shown["recipients"][0]["last_error"])
            return None
        return self.hub.wait(error)

    def delivery_line(self, queue_id: str, recipient: str) -> str:
        needle = f"{queue_id}: to=<{recipient}>"
        log = self.hub.wait_for_log(needle, timeout=20)
        return next(line for line in log.splitlines() if needle in line)


def _zone(port: int, tlsa_good: bytes, tlsa_other: bytes) -> dict[str, Any]:
    zone: dict[str, Any] = {}
    addresses = {"enforce": "127.13.0.31", "wrongcert": "127.13.0.32", "testing": "127.13.0.33",
                 "cached": "127.13.0.34", "dane": "127.13.0.41", "danebad": "127.13.0.42",
                 "daneinsecure": "127.13.0.43", "both": "127.13.0.44",
                 "daneplain": "127.13.0.45"}
    for name, address in addresses.items():
        zone[f"{name}.example"] = {"MX": [(10, f"mx.{name}.example")]}
        zone[f"mx.{name}.example"] = {"A": [address]}
    zone["notlisted.example"] = {"MX": [(10, "mx.enforce.example")]}
    for domain in POLICIES:
        zone[f"_mta-sts.{domain}"] = {"TXT": ["v=STSv1; id=20261203"]}
        zone[f"mta-sts.{domain}"] = {"A": [CACHED_POLICY_HOST if domain == "cached.example"
                                           else POLICY_HOST]}
    zone[f"_{port}._tcp.mx.dane.example"] = {"TLSA": [(3, 1, 1, tlsa_good)]}
    zone[f"_{port}._tcp.mx.both.example"] = {"TLSA": [(3, 1, 1, tlsa_good)]}
    # Only a record relayhub cannot use (full certificate, exact match): still TLS-only.
    zone[f"_{port}._tcp.mx.daneplain.example"] = {"TLSA": [(3, 0, 0, b"\x30\x82")]}
    zone[f"_{port}._tcp.mx.danebad.example"] = {"TLSA": [(3, 1, 1, tlsa_other)]}
    zone[f"_{port}._tcp.mx.daneinsecure.example"] = {"TLSA": [(3, 1, 1, tlsa_other)]}
    return zone


SECURE = ["dane.example", "mx.dane.example", "danebad.example", "mx.danebad.example",
          "both.example", "mx.both.example", "daneplain.example", "mx.daneplain.example"]


@pytest.fixture(scope="module")
def world(reactor_thread: ReactorThread, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("the MTA-STS policy server must listen on port 443 (RFC 8461): needs root")
    rt = reactor_thread
    tmp = tmp_path_factory.mktemp("verified-tls")
    ca, stranger = PemCA(), TestCA("a CA nobody trusts")
    port = free_port()
    starttls = (*DEFAULT_EXTENSIONS, "STARTTLS")
    dane_context, dane_spki = certificate(stranger, "mx.dane.example")
    _unused, other_spki = certificate(stranger, "nobody.example")
    contexts = {
        "127.13.0.31": certificate(ca, "mx.enforce.example")[0],
        "127.13.0.32": certificate(ca, "other.example")[0],
        "127.13.0.33": certificate(ca, "other.example")[0],
        "127.13.0.34": certificate(ca, "mx.cached.example")[0],
        "127.13.0.41": dane_context,
        "127.13.0.42": certificate(stranger, "mx.danebad.example")[0],
        "127.13.0.43": certificate(stranger, "mx.daneinsecure.example")[0],
        "127.13.0.44": dane_context,  # the same key: the TLSA record fits
    }
    sinks = {address: SMTPSink(rt, host=address, port=port, extensions=starttls,
                               tls_context=context) for address, context in contexts.items()}
    sinks["127.13.0.45"] = SMTPSink(rt, host="127.13.0.45", port=port)  # no STARTTLS
    requests: list[str] = []
    site = Site(_Policies(requests))
    https_options = certificate(ca, *(f"mta-sts.{d}" for d in POLICIES))[0]
    https = {host: rt.run(lambda h=host: rt.reactor.listenSSL(443, site, https_options,
                                                              interface=h))
             for host in (POLICY_HOST, CACHED_POLICY_HOST)}
    secure = [*SECURE, *(f"_{port}._tcp.mx.{name}.example"
                         for name in ("dane", "danebad", "both", "daneplain"))]
    zone = _zone(port, dane_spki, other_spki)
    with DNSServer(rt, zone, secure=secure) as dns, \
            pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(ca.write_ca(tmp / "ca.pem")))
        hub = Hub(tmp, {"delivery": {"nameservers": [f"127.0.0.1:{dns.port}"],
                                     "smtp_port": port, "retry_min": "1h", "retry_max": "1h"}})
        hub.start()
        built = World(rt, dns, hub, port, sinks, https, zone, requests)
        try:
            yield built
        finally:
            hub.stop()
            for sink in sinks.values():
                sink.close()
            for listening in https.values():
                if listening.connected:
                    rt.run(listening.stopListening)


# --------------------------------------------------------------------------- MTA-STS


def test_enforce_with_the_right_certificate_delivers(world: World) -> None:
    queue_id = world.send("user@enforce.example")
    world.sinks["127.13.0.31"].wait_messages(1, timeout=20)
    line = world.delivery_line(queue_id, "user@enforce.example")
    assert ", tls=TLSv1." in line and ", verified=mta-sts, " in line and "status=sent" in line
    assert "mta-sts.enforce.example" in world.requests


def test_enforce_with_a_wrong_certificate_is_deferred(world: World) -> None:
    queue_id = world.send("user@wrongcert.example")
    error = world.deferred_error(queue_id)
    assert error.startswith("4.7.5 "), error
    assert "MTA-STS policy of wrongcert.example (enforce)" in error
    assert "certificate does not match mx.wrongcert.example" in error
    assert world.sinks["127.13.0.32"].messages() == []  # not even in plaintext


def test_enforce_refuses_an_mx_host_outside_the_policy(world: World) -> None:
    queue_id = world.send("user@notlisted.example")
    error = world.deferred_error(queue_id)
    assert error.startswith("4.7.5 MTA-STS policy of notlisted.example (enforce): MX host "
                            "mx.enforce.example is not in the policy"), error


def test_testing_with_a_wrong_certificate_delivers_and_logs(world: World) -> None:
    queue_id = world.send("user@testing.example")
    world.sinks["127.13.0.33"].wait_messages(1, timeout=20)
    line = world.delivery_line(queue_id, "user@testing.example")
    assert ", verified=none, " in line and "status=sent" in line
    world.hub.wait_for_log("MTA-STS policy of testing.example (testing): certificate does not "
                           "match mx.testing.example; delivered to mx.testing.example anyway")


def test_a_cached_policy_is_enforced_without_its_server_and_across_restarts(
        world: World) -> None:
    first = world.send("user@cached.example")
    world.sinks["127.13.0.34"].wait_messages(1, timeout=20)
    assert ", verified=mta-sts, " in world.delivery_line(first, "user@cached.example")
    world.rt.run(world.https[CACHED_POLICY_HOST].stopListening)
    world.hub.stop()
    world.hub.start()
    # The MX host now leads to a certificate for another name: only the cached policy,
    # whose server is gone, can tell that this is wrong.
    world.dns.set_zone({**world.zone, "mx.cached.example": {"A": ["127.13.0.32"]}})
    second = world.send("user@cached.example")
    error = world.deferred_error(second)
    assert "MTA-STS policy of cached.example (enforce)" in error, error
    assert "certificate does not match mx.cached.example" in error
    assert world.sinks["127.13.0.32"].messages() == []


# --------------------------------------------------------------------------- DANE


def test_dane_matching_certificate_delivers(world: World) -> None:
    # The sink's certificate comes from a CA nobody trusts: only the TLSA record vouches.
    queue_id = world.send("user@dane.example")
    world.sinks["127.13.0.41"].wait_messages(1, timeout=20)
    line = world.delivery_line(queue_id, "user@dane.example")
    assert ", tls=TLSv1." in line and ", verified=dane, " in line and "status=sent" in line


def test_dane_mismatching_certificate_is_deferred(world: World) -> None:
    queue_id = world.send("user@danebad.example")
    error = world.deferred_error(queue_id)
    assert error.startswith("4.7.5 "), error
    assert "DANE: the certificate matches no TLSA record" in error
    assert world.sinks["127.13.0.42"].messages() == []


def test_secure_tlsa_records_forbid_plaintext(world: World) -> None:
    queue_id = world.send("user@daneplain.example")
    error = world.deferred_error(queue_id)
    assert error.startswith(f"4.7.4 TLS is required by DANE (TLSA records at _{world.port}"
                            "._tcp.mx.daneplain.example), but was not offered"), error
    assert world.sinks["127.13.0.45"].messages() == []


def test_dane_beats_mta_sts(world: World) -> None:
    queue_id = world.send("user@both.example")
    world.sinks["127.13.0.44"].wait_messages(1, timeout=20)
    assert ", verified=dane, " in world.delivery_line(queue_id, "user@both.example")


def test_tlsa_records_without_the_ad_bit_are_ignored(world: World) -> None:
    queue_id = world.send("user@daneinsecure.example")
    world.sinks["127.13.0.43"].wait_messages(1, timeout=20)
    line = world.delivery_line(queue_id, "user@daneinsecure.example")
    assert ", tls=TLSv1." in line and ", verified=none, " in line and "status=sent" in line


# --------------------------------------------------------------------------- route


def test_route_shows_the_policy_and_the_tlsa_records(world: World) -> None:
    world.send("user@enforce.example")  # makes sure the policy is in the cache
    world.hub.wait(lambda: "MTA-STS policy of enforce.example fetched" in world.hub.log())
    done = world.ctl("route", "user@enforce.example", "--json")
    assert done.returncode == 0, done.stderr
    [route] = json.loads(done.stdout)["routes"]
    policy = route["mta_sts"]["policy"]
    assert (policy["mode"], policy["mx"], policy["max_age"], policy["cached"]) == (
        "enforce", ["mx.enforce.example"], 86400, True)
    assert route["dane"]["mx_secure"] is False

    done = world.ctl("route", "user@dane.example", "--json")
    assert done.returncode == 0, done.stderr
    [route] = json.loads(done.stdout)["routes"]
    assert route["mta_sts"]["policy"] is None
    [host] = route["dane"]["hosts"]
    assert host["secure"] and host["applies"] and host["records"][0].startswith("3 1 1 ")
    assert host["tlsa_name"] == f"_{world.port}._tcp.mx.dane.example"

    text = world.ctl("route", "user@enforce.example").stdout
    assert "MTA-STS:   mode enforce, max_age 86400s" in text
    assert "    mx:    mx.enforce.example" in text
    text = world.ctl("route", "user@dane.example").stdout
    assert f"_{world.port}._tcp.mx.dane.example: secure, 1 TLSA" in text
