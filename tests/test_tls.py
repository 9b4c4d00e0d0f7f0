"""TLS on every listener of a real daemon: STARTTLS (and its injection rule), SMTPS and POP3S,
POP3 STLS, the certificate checks at start-up and reload, and testssl.sh's verdict."""

from __future__ import annotations

import ipaddress
import json
import os
import poplib
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ReactorThread
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hubprocess import REPO, TWISTD, Hub, Queue, SMTPConnection, free_port
from smtpsink import TestCA

from relayhub.config import ConfigError, parse_settings
from relayhub.tls import TLS12_CIPHERS, TLSSetupError, load_key_pair, server_tls_options
from relayhub.users import hash_password

HOSTNAME = "hub.test"
USER, PASSWORD = "alice", "correct horse battery"
FOREIGN = "someone@foreign.example"  # routed to a closed port: stays in the queue


class PemCA(TestCA):
    """The tests' CA, also as PEM files: its certificate (a client's cafile, SSL_CERT_FILE)
    and server certificates with their keys (for [tls])."""

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        return path

    def write_server(self, directory: Path, *names: str, stem: str = "server"
                     ) -> tuple[Path, Path]:
        """(certificate, key) files for `names` and 127.0.0.1, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        cert = (self._builder(subject, key.public_key())
                .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
                .sign(self._key, hashes.SHA256()))
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return cert_path, key_path

    def client_context(self, directory: Path) -> ssl.SSLContext:
        """A client context trusting only this CA, checking host names."""
        return ssl.create_default_context(cafile=str(self.write_ca(directory / "ca.pem")))


@dataclass
class TLSHub:
    """A daemon with [tls], every kind of listener, a user, and plaintext AUTH refused."""

    hub: Hub
    ca: PemCA
    submission_port: int
    smtps_port: int
    pop3s_port: int
    context: ssl.SSLContext
    cert: Path
    key: Path


def start_tls_hub(directory: Path, overrides: dict[str, dict[str, Any]] | None = None
                  ) -> TLSHub:
    ca = PemCA()
    cert, key = ca.write_server(directory, HOSTNAME, "localhost")
    users = directory / "users"
    users.write_text(f"{USER}:{hash_password(PASSWORD)}:Alice Liddell\n")
    submission, smtps, pop3s = free_port(), free_port(), free_port()
    sections: dict[str, dict[str, Any]] = {
        "smtp": {"submission": [f"tcp:{submission}:interface=127.0.0.1"],
                 "smtps": [f"tcp:{smtps}:interface=127.0.0.1"],
                 "allow_plaintext_auth": False},
        "pop3": {"pop3s": [f"tcp:{pop3s}:interface=127.0.0.1"], "allow_plaintext_auth": False},
        "tls": {"certificate": str(cert), "private_key": str(key)},
        "users": {"file": str(users)},
        "domains": {"trusted_networks": ["127.0.0.1/32"]},
        "routing": {"transport": {"foreign.example": f"[127.0.0.1]:{free_port()}"}},
        "delivery": {"retry_min": "1h", "retry_max": "1h"},
    }
    for section, keys in (overrides or {}).items():
        sections.setdefault(section, {}).update(keys)
    hub = Hub(directory, sections).start()
    return TLSHub(hub, ca, submission, smtps, pop3s, ca.client_context(directory), cert, key)


@pytest.fixture(scope="module")
def tls_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSHub]:
    running = start_tls_hub(tmp_path_factory.mktemp("tlshub"))
    yield running
    running.hub.stop()


@pytest.fixture
def queue(reactor_thread: ReactorThread, tls_hub: TLSHub) -> Queue:
    return Queue(reactor_thread, tls_hub.hub.state_dir)


def queued_id(reply: bytes | str) -> str:
    text = reply.decode() if isinstance(reply, bytes) else reply
    assert "Ok: queued as " in text, text
    return text.rsplit(" ", 1)[1]


# --------------------------------------------------------------------------- STARTTLS


def test_starttls_with_smtplib(tls_hub: TLSHub, queue: Queue) -> None:
    with smtplib.SMTP("127.0.0.1", tls_hub.hub.smtp_port, local_hostname="client.test") as c:
        c.ehlo()
        assert "starttls" in c.esmtp_features
        assert "auth" not in c.esmtp_features  # allow_plaintext_auth = false
        assert c.starttls(context=tls_hub.context)[0] == 220  # verifies chain and name
        c.ehlo()
        assert "starttls" not in c.esmtp_features
        assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert c.mail("a@example.org")[0] == 250
        assert c.rcpt("postmaster@localhost")[0] == 250
        code, reply = c.data(b"Subject: over TLS\r\n\r\nhello\r\n")
    assert code == 250
    queue_id = queued_id(reply)
    body = queue.body(queue_id)
    header = body[: body.index(b"\r\nSubject:")].decode()
    assert header.startswith("Received: from client.test (unknown [127.0.0.1])\r\n"
                             "\t(using TLSv1.3 with cipher TLS_")
    assert f"by {HOSTNAME} (relayhub) with ESMTPS id {queue_id}" in header
    assert "Authenticated" not in header
    tls_hub.hub.wait_for_log("TLS connection established from unknown[127.0.0.1]: "
                             "using TLSv1.3 with cipher")


def test_starttls_with_swaks(tls_hub: TLSHub, tmp_path: Path) -> None:
    ca_file = tls_hub.ca.write_ca(tmp_path / "ca.pem")
    done = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{tls_hub.hub.smtp_port}", "--tls",
         "--tls-verify", "--tls-ca-path", str(ca_file),
         "--from", "a@example.org", "--to", "postmaster@localhost", "--helo", "swaks.test",
         "--timeout", "20"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "<-  220 2.0.0 Ready to start TLS" in done.stdout
    assert "=== TLS started with cipher TLSv1.3:" in done.stdout
    assert "~> EHLO swaks.test" in done.stdout  # the second EHLO, inside TLS
    assert "<~  250 2.0.0 Ok: queued as " in done.stdout


def tls_wrap(conn: SMTPConnection, context: ssl.SSLContext) -> None:
    """Hand the raw socket over to TLS after a 220 to STARTTLS."""
    conn.sock = context.wrap_socket(conn.sock, server_hostname=HOSTNAME)


def test_commands_pipelined_after_starttls_are_never_executed(tls_hub: TLSHub) -> None:
    with SMTPConnection(tls_hub.hub.smtp_port) as conn:
        assert conn.code() == 220
        conn.command("EHLO client.test")
        conn.send(b"STARTTLS\r\nRSET\r\n")  # one write: the RSET was sent in plaintext
        assert conn.reply() == ["220 2.0.0 Ready to start TLS"]
        tls_wrap(conn, tls_hub.context)
        # Had the RSET run after the handshake, its "250 2.0.0 Ok" would come first.
        assert conn.command("NOOP") == ["250 2.0.0 Ok"]
        assert conn.closed() is False
    tls_hub.hub.wait_for_log("discarded 6 bytes sent after STARTTLS before the handshake")


def test_injected_transaction_is_discarded_and_state_reset(tls_hub: TLSHub) -> None:
    with SMTPConnection(tls_hub.hub.smtp_port) as conn:
        assert conn.code() == 220
        conn.command("EHLO client.test")
        assert conn.command("MAIL FROM:<before@example.org>") == ["250 2.1.0 Ok"]
        conn.send(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n"
                  b"RCPT TO:<postmaster@localhost>\r\n")
        assert conn.reply() == ["220 2.0.0 Ready to start TLS"]
        tls_wrap(conn, tls_hub.context)
        # RFC 3207 §4.2: back to the start, without the EHLO and the transaction.
        assert conn.command("MAIL FROM:<a@example.org>")[0].startswith("503 5.5.1")
        assert conn.command("EHLO client.test")[-1] == "250 HELP"
        assert conn.command("RCPT TO:<postmaster@localhost>") == [
            "503 5.5.1 Error: need MAIL command"]
        assert conn.command("STARTTLS") == ["503 5.5.1 Error: TLS already active"]


def test_auth_needs_tls_when_plaintext_auth_is_off(tls_hub: TLSHub) -> None:
    with SMTPConnection(tls_hub.hub.smtp_port) as conn:
        assert conn.code() == 220
        ehlo = conn.command("EHLO client.test")
        assert "250-STARTTLS" in ehlo
        assert not [line for line in ehlo if "AUTH" in line]
        assert conn.command("AUTH PLAIN AGFsaWNlAHg=") == [
            "538 5.7.11 Encryption required for requested authentication mechanism"]


def test_starttls_without_tls_configured_is_454(tmp_path: Path) -> None:
    hub = Hub(tmp_path).start()
    try:
        with SMTPConnection(hub.smtp_port) as conn:
            assert conn.code() == 220
            assert "250-STARTTLS" not in conn.command("EHLO client.test")
            assert conn.command("STARTTLS") == [
                "454 4.7.0 TLS not available due to temporary reason"]
    finally:
        hub.stop()


# --------------------------------------------------------------------------- implicit TLS


def test_smtps_is_tls_from_the_first_byte(tls_hub: TLSHub) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", tls_hub.smtps_port, local_hostname="client.test",
                          context=tls_hub.context) as client:
        client.ehlo()
        assert "starttls" not in client.esmtp_features
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        client.login(USER, PASSWORD)
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt(FOREIGN)[0] == 250


def test_smtps_is_submission_relaying_needs_auth(tls_hub: TLSHub) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", tls_hub.smtps_port, context=tls_hub.context) as client:
        client.ehlo("client.test")
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt(FOREIGN) == (530, b"5.7.0 Authentication required")


def test_plaintext_client_on_smtps_port_gets_nothing(tls_hub: TLSHub) -> None:
    with socket.create_connection(("127.0.0.1", tls_hub.smtps_port), timeout=5) as sock:
        sock.sendall(b"EHLO client.test\r\n")
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert b"220" not in answer and b"250" not in answer


# --------------------------------------------------------------------------- POP3


def test_pop3_user_before_stls_is_refused(tls_hub: TLSHub) -> None:
    client = poplib.POP3("127.0.0.1", tls_hub.hub.pop3_port, timeout=10)
    try:
        assert "STLS" in client.capa()
        with pytest.raises(poplib.error_proto) as refused:
            client.user(USER)
        assert refused.value.args[0] == b"-ERR [AUTH] Plaintext authentication disallowed"
    finally:
        client.quit()


def test_pop3_stls_then_user_pass(tls_hub: TLSHub) -> None:
    client = poplib.POP3("127.0.0.1", tls_hub.hub.pop3_port, timeout=10)
    try:
        assert client.stls(context=tls_hub.context).startswith(b"+OK")
        assert "STLS" not in client.capa()
        assert client.user(USER).startswith(b"+OK")
        assert client.pass_(PASSWORD).startswith(b"+OK Logged in")
        client.stat()
    finally:
        client.quit()


def test_pop3s_is_tls_from_the_first_byte(tls_hub: TLSHub) -> None:
    client = poplib.POP3_SSL("127.0.0.1", tls_hub.pop3s_port, timeout=10,
                             context=tls_hub.context)
    try:
        assert "STLS" not in client.capa()
        assert client.user(USER).startswith(b"+OK")
        assert client.pass_(PASSWORD).startswith(b"+OK Logged in")
    finally:
        client.quit()


# --------------------------------------------------------------------------- TLS settings


def protocols_accepted(port: int) -> set[str]:
    """Which TLS versions the POP3S port completes a handshake with."""
    accepted = set()
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_2,
                    ssl.TLSVersion.TLSv1_3):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with warnings.catch_warnings():  # asking for TLS 1.0/1.1 is the point here
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = version
        context.set_ciphers("ALL:@SECLEVEL=0")  # let the client try what old peers would
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    context.wrap_socket(raw) as tls:
                accepted.add(tls.version() or "")
        except (ssl.SSLError, OSError):
            pass
    return accepted


def test_only_tls_1_2_and_1_3(tls_hub: TLSHub) -> None:
    assert protocols_accepted(tls_hub.pop3s_port) == {"TLSv1.2", "TLSv1.3"}


def test_tls_1_2_cipher_is_ecdhe_aead_chosen_by_the_server(tls_hub: TLSHub) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    # The client prefers the weakest AEAD suite; the server's order must win.
    context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
    with socket.create_connection(("127.0.0.1", tls_hub.pop3s_port), timeout=5) as raw, \
            context.wrap_socket(raw) as tls:
        name = tls.cipher()[0]  # type: ignore[index]
    assert name == "ECDHE-ECDSA-AES256-GCM-SHA384"
    context.set_ciphers("AES256-SHA:AES128-SHA:ECDHE-ECDSA-AES128-SHA")  # no AEAD, or no PFS
    with pytest.raises(ssl.SSLError), \
            socket.create_connection(("127.0.0.1", tls_hub.pop3s_port), timeout=5) as raw, \
            context.wrap_socket(raw):
        pass


def test_tls12_cipher_string_names_only_ecdhe_aead() -> None:
    for name in TLS12_CIPHERS.split(":"):
        assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name), name


def test_key_pair_problems_are_one_line_each(tmp_path: Path) -> None:
    ca = PemCA()
    cert, key = ca.write_server(tmp_path, "a.test")
    _, other_key = ca.write_server(tmp_path, "b.test", stem="other")
    combined = tmp_path / "combined.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    assert load_key_pair(combined, None).certificate.subject.rfc4514_string() == "CN=a.test"

    with pytest.raises(TLSSetupError) as mismatch:
        load_key_pair(cert, other_key)
    assert str(mismatch.value) == (f'tls.private_key: "{other_key}" does not match the '
                                   f'certificate in "{cert}"')
    with pytest.raises(TLSSetupError, match=r'^tls.certificate: "[^"]+" holds no PEM cert'):
        load_key_pair(key, key)
    with pytest.raises(TLSSetupError, match=r'^tls.private_key: "[^"]+" holds no PEM private'):
        load_key_pair(cert, cert)
    with pytest.raises(TLSSetupError, match=r"^tls.certificate: cannot read .*No such file"):
        load_key_pair(tmp_path / "missing.crt", key)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(serialization.load_pem_private_key(key.read_bytes(), None)
                          .private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(TLSSetupError, match="the key is encrypted"):
        load_key_pair(cert, encrypted)


def test_config_reports_a_mismatched_key(tmp_path: Path) -> None:
    ca = PemCA()
    cert, _ = ca.write_server(tmp_path, "a.test")
    _, other_key = ca.write_server(tmp_path, "b.test", stem="other")
    with pytest.raises(ConfigError) as error:
        parse_settings({"tls": {"certificate": str(cert), "private_key": str(other_key)}},
                       "relayhub.toml")
    assert error.value.problems == [
        f'relayhub.toml: tls.private_key: "{other_key}" does not match the certificate in '
        f'"{cert}"']
    with pytest.raises(ConfigError) as no_key:  # private_key unset: the key must be in cert
        parse_settings({"tls": {"certificate": str(cert)}}, "f")
    assert no_key.value.problems == [f'f: tls.certificate: "{cert}" holds no PEM private key']


def test_config_check_and_startup_report_a_mismatched_key(tmp_path: Path) -> None:
    ca = PemCA()
    cert, _ = ca.write_server(tmp_path, "a.test")
    _, other_key = ca.write_server(tmp_path, "b.test", stem="other")
    config = tmp_path / "relayhub.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[tls]\ncertificate = "{cert}"\nprivate_key = "{other_key}"\n')
    expected = (f'{config}: tls.private_key: "{other_key}" does not match the certificate '
                f'in "{cert}"')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    check = subprocess.run([sys.executable, "-m", "relayhub.admin", "-c", str(config),
                            "config", "check"], capture_output=True, text=True, timeout=60,
                           env=env, cwd=tmp_path)
    assert (check.returncode, check.stdout, check.stderr.strip()) == (2, "", expected)
    start = subprocess.run([str(TWISTD), "-n", "--pidfile=", "relayhub", "-c", str(config)],
                           capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert (start.returncode, start.stderr.strip()) == (1, expected)


def test_options_are_built_afresh_from_the_files(tmp_path: Path) -> None:
    """Nothing is cached between calls: a worker started after a renewal reads new files."""
    ca = PemCA()
    cert, key = ca.write_server(tmp_path, "a.test")
    settings = parse_settings({"tls": {"certificate": str(cert), "private_key": str(key)}},
                              "f")
    first = server_tls_options(settings)
    ca.write_server(tmp_path, "renewed.test")  # same file names
    second = server_tls_options(settings)
    assert first is not None and second is not None and first is not second
    assert second.certificate.to_cryptography().subject.rfc4514_string() == "CN=renewed.test"


def peer_names(port: int) -> list[str]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    certificate = x509.load_der_x509_certificate(der)
    return certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_sighup_serves_a_renewed_certificate(tmp_path: Path) -> None:
    running = start_tls_hub(tmp_path)
    try:
        assert peer_names(running.pop3s_port) == [HOSTNAME, "localhost"]
        running.ca.write_server(tmp_path, "renewed.test")  # over the configured files
        assert running.hub.process is not None
        running.hub.process.send_signal(signal.SIGHUP)
        running.hub.wait_for_log("reloaded ")
        # The old worker stops accepting as the new one starts: soon only the new one answers.
        deadline = time.monotonic() + 20
        while peer_names(running.pop3s_port) != ["renewed.test"]:
            assert time.monotonic() < deadline, running.hub.log()[-3000:]
            time.sleep(0.1)
    finally:
        running.hub.stop()


# --------------------------------------------------------------------------- testssl.sh


def run_testssl(tmp_path: Path, port: int, *options: str) -> dict[str, tuple[str, str]]:
    """Debian's testssl.sh, limited to protocols, cipher groups, server preference and
    renegotiation (about 15 s): {finding id: (severity, finding)} from its JSON."""
    binary = shutil.which("testssl") or shutil.which("testssl.sh")
    if binary is None:
        pytest.fail("testssl.sh is not installed (.ci/run installs it from Debian)")
    report = tmp_path / f"testssl-{port}.json"
    done = subprocess.run(
        [binary, "--protocols", "--std", "--server-preference", "--renegotiation", "--fast",
         "--quiet", "--color", "0", "--warnings", "off", "--connect-timeout", "5",
         "--openssl-timeout", "5", "--jsonfile", str(report), *options, f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=300)
    assert report.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return {f["id"]: (f["severity"], f["finding"]) for f in json.loads(report.read_text())}


# testssl's cipher groups that must be empty ("OBSOLETED" is testssl 3.1's name for the
# CBC group that 3.0 calls "AVERAGE").
WEAK_GROUPS = ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
               "cipherlist_3DES_IDEA", "cipherlist_AVERAGE", "cipherlist_OBSOLETED")


def assert_no_weak_tls(findings: dict[str, tuple[str, str]]) -> None:
    def finding(name: str) -> str:
        return findings[name][1]

    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert finding(old).startswith("not offered"), (old, findings[old])
    for new in ("TLS1_2", "TLS1_3"):
        assert finding(new).startswith("offered"), (new, findings[new])
    groups = [group for group in WEAK_GROUPS if group in findings]
    assert len(groups) >= 6, sorted(findings)
    for group in groups:
        assert finding(group) == "not offered", (group, findings[group])
    assert finding("cipherlist_STRONG") == "offered"
    assert finding("cipher_order") == "server"
    assert finding("secure_client_renego") == "not vulnerable"
    # engine_problem (WARN) is about the local openssl binary, not the server.
    bad = {name: f for name, f in findings.items() if f[0] in ("MEDIUM", "HIGH", "CRITICAL")}
    assert not bad, bad


def test_testssl_finds_nothing_weak_on_starttls_smtp(tls_hub: TLSHub, tmp_path: Path) -> None:
    findings = run_testssl(tmp_path, tls_hub.hub.smtp_port, "--starttls", "smtp")
    assert findings["service"][1] == "smtp"
    assert_no_weak_tls(findings)


def test_testssl_finds_nothing_weak_on_pop3s(tls_hub: TLSHub, tmp_path: Path) -> None:
    assert_no_weak_tls(run_testssl(tmp_path, tls_hub.pop3s_port))
