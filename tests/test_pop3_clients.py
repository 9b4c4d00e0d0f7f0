"""Real POP3 clients against our listener: Python's poplib, curl and Debian's fetchmail."""

from __future__ import annotations

import poplib
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ReactorThread
from smtpsink import TestCA
from test_pop3 import HOST, PASSWORDS, SEED, Pop3Service

BODIES = [
    *SEED,
    b"Subject: big\r\n\r\n" + b"".join(b".%06d dotted line of a big message\r\n" % i
                                         for i in range(8000)),
]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (.ci/run installs it from Debian)")
    return path


@pytest.fixture
def pop3(reactor_thread: ReactorThread, tmp_path: Path) -> Iterator[Pop3Service]:
    (tmp_path / "service").mkdir()
    service = Pop3Service(reactor_thread, tmp_path / "service", apop=True)
    yield service
    service.stop()


def deliver_all(pop3: Pop3Service, user: str = "mrose") -> list[bytes]:
    """Deliver BODIES; returns each message's stored bytes (what RETR must send), in order."""
    return [pop3.deliver(user, body).read_bytes() for body in BODIES]


def test_poplib_whole_dialogue(pop3: Pop3Service) -> None:
    stored = deliver_all(pop3)
    client = poplib.POP3("127.0.0.1", pop3.port, timeout=10)
    assert client.getwelcome().startswith(b"+OK relayhub POP3 ready <")
    assert set(client.capa()) >= {"TOP", "UIDL", "USER", "PIPELINING", "SASL"}
    client.user("mrose")
    client.pass_(PASSWORDS["mrose"])
    count, octets = client.stat()
    assert (count, octets) == (len(stored), sum(map(len, stored)))
    _, listing, _ = client.list()
    assert listing == [b"%d %d" % (n, len(m)) for n, m in enumerate(stored, 1)]
    _, uids, _ = client.uidl()
    assert len({line.split()[1] for line in uids}) == len(stored)
    for number, message in enumerate(stored, 1):
        _, lines, size = client.retr(number)
        assert size == len(message)  # poplib counts the octets after unstuffing
        assert b"\r\n".join(lines) == message.removesuffix(b"\r\n")
        _, top, _ = client.top(number, 0)
        assert b"\r\n".join(top) + b"\r\n" == message.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        client.dele(number)
    assert client.noop().startswith(b"+OK")
    assert client.quit().startswith(b"+OK relayhub POP3 signing off")
    assert pop3.messages("mrose") == []


def test_poplib_apop_and_stls(reactor_thread: ReactorThread, tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    pop3 = Pop3Service(reactor_thread, tmp_path / "service", apop=True, plaintext=False,
                       tls_context_factory=TestCA().server_context(HOST))
    try:
        pop3.deliver("carol", SEED[0])
        pop3.deliver("alice", SEED[1])
        client = poplib.POP3("127.0.0.1", pop3.port, timeout=10)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Plaintext"):
            client.user("alice")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.stls(context)
        assert "STLS" not in client.capa() and "USER" in client.capa()
        client.user("alice")
        client.pass_(PASSWORDS["alice"])
        assert client.retr(1)[1][-1] == b"end"
        client.quit()

        client = poplib.POP3("127.0.0.1", pop3.port, timeout=10)
        client.stls(context)
        assert client.apop("carol", PASSWORDS["carol"]).startswith(b"+OK Logged in, 1 ")
        client.quit()
    finally:
        pop3.stop()


def test_curl_lists_and_retrieves(pop3: Pop3Service) -> None:
    stored = deliver_all(pop3)
    curl = tool("curl")
    url = f"pop3://127.0.0.1:{pop3.port}"
    credentials = f"mrose:{PASSWORDS['mrose']}"
    listing = subprocess.run([curl, "-sS", "--max-time", "20", "-u", credentials, f"{url}/"],
                             capture_output=True, check=True)
    assert listing.stdout == b"".join(b"%d %d\r\n" % (n, len(m))
                                      for n, m in enumerate(stored, 1))
    for number, message in enumerate(stored, 1):
        retrieved = subprocess.run(
            [curl, "-sS", "--max-time", "20", "-u", credentials, f"{url}/{number}"],
            capture_output=True, check=True)
        # curl removes the dot-stuffing and the terminating line, keeping the CRLFs.
        assert retrieved.stdout == message, number
    refused = subprocess.run([curl, "-sS", "--max-time", "20", "-u", "mrose:wrong", f"{url}/"],
                             capture_output=True)
    assert refused.returncode == 67  # CURLE_LOGIN_DENIED
    assert len(pop3.messages("mrose")) == len(stored)


def test_fetchmail_downloads_and_deletes_everything(pop3: Pop3Service, tmp_path: Path) -> None:
    stored = deliver_all(pop3)
    fetchmail = tool("fetchmail")
    out = tmp_path / "fetched"
    out.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    rc = home / "fetchmailrc"
    # sslproto '': fetchmail 6.4 insists on STLS unless told this server has no TLS.
    rc.write_text(
        "set no syslog\n"
        f"poll 127.0.0.1 with proto POP3 port {pop3.port}\n"
        f"  user \"mrose\" there with password \"{PASSWORDS['mrose']}\" is \"nobody\" here\n"
        "  fetchall nokeep sslproto ''\n"
        f"  mda \"/bin/sh -c 'cat > {out}/message.$$'\"\n"
    )
    rc.chmod(0o600)  # fetchmail refuses a readable rc file holding passwords
    done = subprocess.run([fetchmail, "-f", str(rc), "-v", "--nodetach"],
                          env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    fetched = [path.read_bytes() for path in out.iterdir()]
    assert len(fetched) == len(stored)
    # fetchmail hands messages on with LF line ends, after a Received: of its own.
    for message in stored:
        unix = message.replace(b"\r\n", b"\n")
        assert sum(got.endswith(b"\n" + unix) for got in fetched) == 1
    assert "POP3> DELE" in done.stdout + done.stderr
    assert pop3.messages("mrose") == []
