"""DKIM end to end: keys made by `relayhubctl dkim keygen`, their records served by the test
DNS server, a real relayhub daemon signing at acceptance, SMTP sinks receiving the mail, and
dkimpy verifying what arrived against the record found in DNS."""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from conftest import ReactorThread
from dnsserver import DNSServer
from hubprocess import REPO, Hub, free_port
from smtpsink import SMTPSink

BODY = (b"From: Alice <alice@example.org>\r\nTo: bob@sink.example\r\nSubject: signed\r\n"
        b"Date: Thu, 3 Dec 2026 12:00:00 +0000\r\nMessage-ID: <dkim-1@example.org>\r\n\r\n"
        b"Hello  Bob,\t\r\n\r\n.leading dot\r\nbye\r\n")


def ctl(config: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    """relayhubctl from the working tree, as a separate process."""
    options = ["-c", str(config)] if config else []
    return subprocess.run([sys.executable, "-m", "relayhub.admin", *options, *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def keygen(path: Path, selector: str, kind: str) -> str:
    """Make a key with relayhubctl and return the TXT record value it printed."""
    done = ctl(None, "dkim", "keygen", "--domain", "example.org", "--selector", selector,
               "--type", kind, "--output", str(path))
    assert done.returncode == 0, done.stderr
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    [line] = [line for line in done.stdout.splitlines() if "._domainkey." in line]
    assert line.startswith(f"{selector}._domainkey.example.org. IN TXT ")
    strings = re.findall(r'"([^"]*)"', line)
    assert all(len(s) <= 255 for s in strings)
    return "".join(strings)


def zone() -> dict[str, Any]:
    return {
        "sink.example": {"MX": [(10, "mx.sink.example")]},
        "other.example": {"MX": [(10, "mx.sink.example")]},
        "mx.sink.example": {"A": ["127.0.0.14"]},
    }


def dnsfunc_for(server: DNSServer) -> Callable[..., bytes]:
    """dkimpy's key lookup, asked of the test DNS server (dnspython, as dkimpy itself)."""

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        query = dns.message.make_query(name.decode(), dns.rdatatype.TXT)
        answer = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=timeout)
        return b"".join(b"".join(rr.strings) for rrset in answer.answer for rr in rrset)

    return lookup


@pytest.fixture
def dns_server(reactor_thread: ReactorThread) -> Iterator[DNSServer]:
    with DNSServer(reactor_thread, zone()) as server:
        yield server


def start_hub(tmp: Path, dns_server: DNSServer, port: int, dkim_section: dict[str, Any],
              **overrides: dict[str, Any]) -> Hub:
    hub = Hub(tmp, {"delivery": {"nameservers": [f"127.0.0.1:{dns_server.port}"],
                                 "smtp_port": port, "retry_min": "1s", "retry_max": "2s",
                                 "tls": "none"},
                    "dkim": dkim_section, **overrides})
    return hub.start()


def signatures(message: bytes) -> list[bytes]:
    return [bytes(v) for n, v in dkim.rfc822_parse(message)[0] if n.lower() == b"dkim-signature"]


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_trusted_mail_is_signed_and_verifies(reactor_thread: ReactorThread, tmp_path: Path,
                                             dns_server: DNSServer, kind: str) -> None:
    key = tmp_path / f"{kind}.key"
    record = keygen(key, "s1", kind)
    dns_server.set_zone({**zone(), "s1._domainkey.example.org": {"TXT": [record]}})
    port = free_port()
    hub = start_hub(tmp_path, dns_server, port, {
        "selector": "s1", "private_key": str(key), "domains": ["example.org"]})
    try:
        with SMTPSink(reactor_thread, host="127.0.0.14", port=port) as sink:
            queue_id = hub.send(["bob@sink.example"], BODY, "alice@example.org")
            [arrived] = sink.wait_messages(1)
        assert arrived.body is not None
        [field] = signatures(arrived.body)
        assert f"a={'rsa' if kind == 'rsa' else 'ed25519'}-sha256;".encode() in field
        assert dkim.verify(arrived.body, dnsfunc=dnsfunc_for(dns_server))
        assert arrived.body.startswith(b"DKIM-Signature: ")  # prepended, before Received:
        assert arrived.body.endswith(BODY)  # the message itself untouched
        hub.wait_for_log(f"{queue_id}: DKIM-Signature field added (s=s1, d=example.org)")
        # relayhubctl dkim check finds the same record through [delivery].nameservers ...
        checked = ctl(hub.config_path, "dkim", "check", "--domain", "example.org")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.startswith("s1._domainkey.example.org: matches the key in ")
        # ... and says so when DNS publishes another key, or none.
        other = keygen(tmp_path / "other.key", "s2", "rsa")
        dns_server.set_zone({**zone(), "s1._domainkey.example.org": {"TXT": [other]}})
        checked = ctl(hub.config_path, "dkim", "check", "--domain", "example.org")
        assert checked.returncode == 1 and "does not match" in checked.stdout, checked.stdout
        dns_server.set_zone(zone())
        checked = ctl(hub.config_path, "dkim", "check", "--domain", "example.org")
        assert checked.returncode == 1 and "no DKIM record published" in checked.stdout
    finally:
        hub.stop()


def test_one_signature_for_every_recipient(reactor_thread: ReactorThread, tmp_path: Path,
                                           dns_server: DNSServer) -> None:
    rsa, ed = tmp_path / "rsa.key", tmp_path / "ed.key"
    records = {"org._domainkey.example.org": keygen(rsa, "org", "rsa"),
               "ed._domainkey.sales.example.org": keygen(ed, "ed", "ed25519")}
    dns_server.set_zone({**zone(), **{name: {"TXT": [value]} for name, value in records.items()}})
    port = free_port()
    # [[dkim.key]] for a sub-domain: the most specific domain chooses the key.
    hub = start_hub(tmp_path, dns_server, port, {
        "selector": "org", "private_key": str(rsa), "domains": ["example.org"],
        "key": [{"selector": "ed", "private_key": str(ed), "domains": ["sales.example.org"]}]})
    try:
        with SMTPSink(reactor_thread, host="127.0.0.14", port=port) as sink:
            hub.send(["bob@sink.example", "carol@other.example", "postmaster@localhost"],
                     BODY.replace(b"alice@example.org", b"alice@eu.sales.example.org"),
                     "alice@eu.sales.example.org")
            copies = [m.body for m in sink.wait_messages(2)]
        local = hub.wait(lambda: hub.mailbox("postmaster"))
        fields = [signatures(body) for body in copies if body is not None]
        assert len(fields) == 2 and all(len(f) == 1 for f in fields)
        assert fields[0] == fields[1] == signatures(local[0].as_bytes())
        assert b"d=sales.example.org" in fields[0][0] and b"s=ed" in fields[0][0]
        assert all(dkim.verify(body, dnsfunc=dnsfunc_for(dns_server)) for body in copies
                   if body is not None)
    finally:
        hub.stop()


def test_mail_submitted_with_sendmail_is_signed(reactor_thread: ReactorThread, tmp_path: Path,
                                                dns_server: DNSServer) -> None:
    """A local user's mail (relayhub-sendmail, picked up by the queue manager) is the
    organisation's own: signed as a trusted client's, and the signature verifies."""
    key = tmp_path / "ed.key"
    dns_server.set_zone({**zone(), "s1._domainkey.example.org": {
        "TXT": [keygen(key, "s1", "ed25519")]}})
    port = free_port()
    hub = start_hub(tmp_path, dns_server, port, {
        "selector": "s1", "private_key": str(key), "domains": ["example.org"]})
    sendmail = Path(sys.executable).with_name("relayhub-sendmail")
    try:
        with SMTPSink(reactor_thread, host="127.0.0.14", port=port) as sink:
            done = subprocess.run([str(sendmail), "-C", str(hub.config_path), "-oi",
                                   "-f", "alice@example.org", "bob@sink.example"],
                                  input=BODY.replace(b"\r\n", b"\n"), capture_output=True,
                                  timeout=60, cwd=hub.directory)
            assert done.returncode == 0, done.stderr
            [arrived] = sink.wait_messages(1)
        assert arrived.body is not None and len(signatures(arrived.body)) == 1
        assert b"(relayhub, from userid " in arrived.body
        assert dkim.verify(arrived.body, dnsfunc=dnsfunc_for(dns_server))
        hub.wait_for_log("DKIM-Signature field added (s=s1, d=example.org)")
    finally:
        hub.stop()


def test_mail_from_outside_is_not_signed(tmp_path: Path, dns_server: DNSServer) -> None:
    key = tmp_path / "rsa.key"
    keygen(key, "s1", "rsa")
    hub = start_hub(tmp_path, dns_server, free_port(), {
        "selector": "s1", "private_key": str(key), "domains": ["example.org"]},
        domains={"trusted_networks": ["127.0.0.1/32"]})
    try:
        # From 127.0.0.2: not a trusted network, and not authenticated.
        with smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30,
                          source_address=("127.0.0.2", 0)) as client:
            client.ehlo("outside.test")
            client.mail("alice@example.org")
            assert client.rcpt("postmaster@localhost")[0] == 250
            code, _reply = client.data(BODY)
        assert code == 250
        [message] = hub.wait(lambda: hub.mailbox("postmaster"))
        assert "DKIM-Signature" not in message
        assert "DKIM-Signature field added" not in hub.log()
    finally:
        hub.stop()


def test_small_rsa_key_stops_the_daemon_with_one_line(tmp_path: Path) -> None:
    from relayhub import dkim as rdkim

    small = tmp_path / "small.key"
    small.write_bytes(rdkim.private_pem(rdkim.generate_key("rsa", 1024)))
    hub = Hub(tmp_path, {"dkim": {"selector": "s1", "private_key": str(small),
                                  "domains": ["example.org"]}})
    checked = ctl(hub.config_path, "config", "check")
    assert checked.returncode == 2
    assert checked.stderr.strip() == (
        f"{hub.config_path}: dkim.private_key: '{small}': RSA key of 1024 bits; at least 2048 "
        "are needed (relayhubctl dkim keygen makes one)")
    with pytest.raises(RuntimeError, match="exited 1"):
        hub.start()
    assert "Traceback" not in hub.log()


def test_route_shows_the_signing_key(tmp_path: Path, dns_server: DNSServer) -> None:
    rsa, ed = tmp_path / "rsa.key", tmp_path / "ed.key"
    keygen(rsa, "org", "rsa")
    keygen(ed, "ed", "ed25519")
    hub = Hub(tmp_path, {
        "delivery": {"nameservers": [f"127.0.0.1:{dns_server.port}"]},
        "domains": {"masquerade": ["sales.example.org", "example.org"]},
        "dkim": {"selector": "org", "private_key": str(rsa), "domains": ["example.org"],
                 "key": [{"selector": "ed", "private_key": str(ed),
                          "domains": ["sales.example.org"]}]}})
    found = json_route(hub, "--from", "alice@eu.sales.example.org", "--client", "127.0.0.1")
    assert found["dkim"]["key"] == {"selector": "ed", "domain": "sales.example.org",
                                    "algorithm": "ed25519-sha256", "private_key": str(ed)}
    assert found["dkim"]["signs"] is True
    # Masqueraded to example.org first, so the example.org key signs; untrusted: not signed.
    found = json_route(hub, "--from", "alice@host.example.org")
    assert found["dkim"]["from_domain"] == "example.org"
    assert found["dkim"]["key"]["selector"] == "org" and found["dkim"]["signs"] is False
    assert json_route(hub, "--from", "x@elsewhere.test")["dkim"]["key"] is None
    text = ctl(hub.config_path, "route", "bob@sink.example", "--from", "a@sales.example.org",
               "--client", "127.0.0.1").stdout
    assert ("dkim:        From: sales.example.org: s=ed d=sales.example.org ed25519-sha256 "
            f"({ed}); signed at acceptance") in text


def json_route(hub: Hub, *args: str) -> Any:
    done = ctl(hub.config_path, "route", "bob@sink.example", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_key_chosen_after_masquerading(reactor_thread: ReactorThread, tmp_path: Path,
                                       dns_server: DNSServer) -> None:
    org, host = tmp_path / "org.key", tmp_path / "host.key"
    keygen(org, "org", "ed25519")
    keygen(host, "host", "ed25519")
    port = free_port()
    # Without masquerading, host.example.org's own key would sign.
    hub = start_hub(tmp_path, dns_server, port, {
        "selector": "org", "private_key": str(org), "domains": ["example.org"],
        "key": [{"selector": "host", "private_key": str(host),
                 "domains": ["host.example.org"]}]},
        domains={"masquerade": ["example.org"]})
    try:
        with SMTPSink(reactor_thread, host="127.0.0.14", port=port) as sink:
            hub.send(["bob@sink.example"],
                     BODY.replace(b"alice@example.org", b"alice@host.example.org"),
                     "alice@host.example.org")
            [arrived] = sink.wait_messages(1)
        assert arrived.body is not None
        assert b"\r\nFrom: Alice <alice@example.org>\r\n" in arrived.body
        [field] = signatures(arrived.body)
        assert b"d=example.org;" in field and b"s=org;" in field
    finally:
        hub.stop()
