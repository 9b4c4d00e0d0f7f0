"""POP3 service: real sockets against our factory on the test reactor, Maildirs filled by the
hub's own delivery; plus the pure parts (UIDLs, sizes, TOP, argument parsing)."""

from __future__ import annotations

import hashlib
import os
import re
import select
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from conftest import ReactorThread
from smtpsink import TestCA
from twisted.logger import formatEvent, globalLogPublisher

from relayhub.config import parse_settings
from relayhub.delivery.maildir import deliver_to_maildir
from relayhub.pop3 import mailbox
from relayhub.pop3.auth import BadCredentials, apop_digest, decode_sasl_plain
from relayhub.pop3.server import (
    CHUNK_SIZE,
    Pop3Error,
    POP3Factory,
    TopFilter,
    capabilities,
    parse_message_number,
    parse_optional_message_number,
    parse_top,
)
from relayhub.pop3.service import pop3_factory
from relayhub.users import UserDatabase

HOST = "pop.test"
# Cheap argon2id parameters: the tests check behaviour, not hashing cost.
_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORDS = {"mrose": "tanstaaf", "alice": "wonderland", "carol": "apop secret"}
GREETING = re.compile(r"^\+OK relayhub POP3 ready (<[^<>@\s]+@pop\.test>)$")
UIDL_CHARS = re.compile(r"^[\x21-\x7e]{1,70}$")
SEED = [
    b"Subject: first\r\nFrom: alice@example.org\r\n\r\nThe first message.\r\n",
    b"Subject: second\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nend\r\n",
]


class Pop3Service:
    """A users file, a state directory and our POP3 factory listening on 127.0.0.1."""

    def __init__(self, rt: ReactorThread, directory: Path, **options: Any) -> None:
        self.rt = rt
        self.state_dir = directory / "state"
        self.users_file = directory / "users"
        self.users_file.write_text(
            f"mrose:{_HASHER.hash(PASSWORDS['mrose'])}:Marshall Rose\n"
            f"alice:{_HASHER.hash(PASSWORDS['alice'])}:Alice\n"
            f"carol:{{PLAIN}}{PASSWORDS['carol']}:Carol (APOP)\n"
        )
        self._clock = 1_700_000_000.0
        self._bodies = 0
        self.port = 0
        self.factory: POP3Factory | None = None
        self._listener: Any = None
        self.start(**options)

    def start(self, *, plaintext: bool = True, apop: bool = False, **factory_options: Any
              ) -> None:
        """(Re)start: a new settings object, user database and factory, as after a restart."""
        settings = parse_settings({
            "server": {"hostname": HOST, "state_dir": str(self.state_dir)},
            "users": {"file": str(self.users_file)},
            "pop3": {"allow_plaintext_auth": plaintext, "apop": apop},
        }, "test.toml")
        self.factory = pop3_factory(settings, UserDatabase(self.users_file), self.rt.reactor,
                                    **factory_options)
        self._listener = self.rt.run(self.rt.reactor.listenTCP, self.port, self.factory,
                                     interface="127.0.0.1")
        self.port = self._listener.getHost().port

    def stop(self) -> None:
        if self._listener is not None:
            self.rt.run(self._listener.stopListening)
            self._listener = None

    def deliver(self, user: str, body: bytes) -> Path:
        """One message delivered as the hub does; each a microsecond later than the last."""
        self._bodies += 1
        self._clock += 0.000001 * 7
        path = self.state_dir.parent / f"body{self._bodies}"
        path.write_bytes(body)
        name = deliver_to_maildir(self.state_dir / "mail", user, path,
                                  return_path="sender@example.org",
                                  delivered_to=f"{user}@{HOST}", now=self._clock)
        return self.maildir(user) / "new" / name

    def maildir(self, user: str) -> Path:
        return self.state_dir / "mail" / user

    def messages(self, user: str) -> list[Path]:
        return sorted(p for sub in ("new", "cur") for p in (self.maildir(user) / sub).glob("*"))

    def connections(self) -> int:
        assert self.factory is not None
        factory = self.factory
        return self.rt.run(lambda: factory.connections)

    def wait_idle(self) -> None:
        """Until every session has been closed on the server side (locks released)."""
        deadline = time.monotonic() + 5
        while self.connections() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.connections() == 0


class Client:
    """A line-level POP3 client on a plain socket, to see every byte the server sends."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()

    def line(self) -> str:
        raw = self.file.readline()
        assert raw.endswith(b"\r\n"), raw
        return raw[:-2].decode()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.line()

    def multi(self) -> list[str]:
        lines = []
        while (line := self.line()) != ".":
            lines.append(line)
        return lines

    def raw_body(self) -> bytes:
        """A multi-line body as sent on the wire (still dot-stuffed), without its "." line."""
        raw = b""
        while (line := self.file.readline()) != b".\r\n":
            assert line.endswith(b"\r\n") and line, line
            raw += line
        return raw

    def retr(self, number: int) -> tuple[str, bytes]:
        first = self.cmd(f"RETR {number}")
        assert first.startswith("+OK"), first
        return first, unstuff(self.raw_body())

    def login(self, user: str = "mrose") -> str:
        assert self.cmd(f"USER {user}").startswith("+OK")
        return self.cmd(f"PASS {PASSWORDS[user]}")

    def closed(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def unstuff(raw: bytes) -> bytes:
    lines = raw.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@pytest.fixture
def services(reactor_thread: ReactorThread,
             tmp_path: Path) -> Iterator[Callable[..., Pop3Service]]:
    """Builds POP3 services with the given options; all are stopped after the test."""
    started: list[Pop3Service] = []

    def make(**options: Any) -> Pop3Service:
        directory = tmp_path / f"service{len(started)}"
        directory.mkdir()
        started.append(Pop3Service(reactor_thread, directory, **options))
        return started[-1]

    yield make
    for service in started:
        service.stop()


@pytest.fixture
def pop3(services: Callable[..., Pop3Service]) -> Pop3Service:
    return services()


# --------------------------------------------------------------------------- sessions


def test_rfc1939_seed_dialogue_empties_the_maildrop(pop3: Pop3Service) -> None:
    files = [pop3.deliver("mrose", body) for body in SEED]
    sizes = [f.stat().st_size for f in files]
    c = Client(pop3.port)
    assert GREETING.match(c.greeting), c.greeting
    assert c.cmd("USER mrose") .startswith("+OK")
    assert c.cmd("PASS tanstaaf") == f"+OK Logged in, 2 messages ({sum(sizes)} octets)"
    assert c.cmd("STAT") == f"+OK 2 {sum(sizes)}"
    assert c.cmd("LIST") == f"+OK 2 messages ({sum(sizes)} octets)"
    assert c.multi() == [f"1 {sizes[0]}", f"2 {sizes[1]}"]
    first, body = c.retr(1)
    assert first == f"+OK {sizes[0]} octets"
    assert body == files[0].read_bytes()
    assert c.cmd("DELE 1") == "+OK Message 1 deleted"
    first, body = c.retr(2)
    assert body == files[1].read_bytes() and len(body) == sizes[1]
    assert c.cmd("DELE 2") == "+OK Message 2 deleted"
    assert c.cmd("QUIT") == "+OK relayhub POP3 signing off (0 messages left)"
    assert c.closed()
    assert pop3.messages("mrose") == []


def test_capa_lists_exactly_the_rfc_2449_capabilities(pop3: Pop3Service) -> None:
    c = Client(pop3.port)
    assert c.cmd("CAPA") == "+OK Capability list follows"
    assert c.multi() == ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                         "SASL PLAIN", "USER"]
    c.login()
    c.cmd("CAPA")
    assert "USER" in c.multi()


def test_plaintext_authentication_refused_before_tls(
        services: Callable[..., Pop3Service]) -> None:
    pop3 = services(plaintext=False)
    c = Client(pop3.port)
    c.cmd("CAPA")
    assert c.multi() == ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                         "SASL PLAIN"]
    refused = "-ERR [AUTH] Plaintext authentication disallowed"
    assert c.cmd("USER mrose") == refused
    assert c.cmd("PASS tanstaaf") == refused
    assert c.cmd("AUTH PLAIN " + plain_response("mrose", "tanstaaf")) == refused
    assert c.cmd("APOP carol " + "0" * 32) == "-ERR [AUTH] APOP is disabled"
    assert c.cmd("STLS") == "-ERR TLS is not available"
    assert c.cmd("STAT") == "-ERR Command not valid in this state"


def plain_response(user: str, password: str, authzid: str = "") -> str:
    import base64

    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def test_auth_plain_initial_response_and_continuation(pop3: Pop3Service) -> None:
    pop3.deliver("alice", SEED[0])
    c = Client(pop3.port)
    assert c.cmd("AUTH PLAIN " + plain_response("alice", "wonderland")).startswith(
        "+OK Logged in, 1 messages")
    c.cmd("QUIT")
    c = Client(pop3.port)
    assert c.cmd("AUTH PLAIN") == "+ "
    assert c.cmd(plain_response("alice", "wonderland", authzid="alice")).startswith("+OK")
    c.cmd("QUIT")
    c = Client(pop3.port)
    assert c.cmd("AUTH PLAIN") == "+ "
    assert c.cmd("*") == "-ERR Authentication cancelled"
    assert c.cmd("AUTH") == "+OK" and c.multi() == ["PLAIN"]
    assert c.cmd("AUTH CRAM-MD5") == "-ERR Unsupported authentication mechanism"
    started = time.monotonic()
    # Acting as someone else is not offered: a failed login, with the delay.
    assert c.cmd("AUTH PLAIN " + plain_response("alice", "wonderland", authzid="mrose")) \
        == "-ERR [AUTH] Authentication failed"
    assert time.monotonic() - started >= 1.0


def test_apop_for_a_plain_user_only(services: Callable[..., Pop3Service]) -> None:
    pop3 = services(apop=True)
    pop3.deliver("carol", SEED[0])
    c = Client(pop3.port)
    stamp = GREETING.match(c.greeting)
    assert stamp
    digest = hashlib.md5((stamp[1] + PASSWORDS["carol"]).encode()).hexdigest()
    assert apop_digest(stamp[1], PASSWORDS["carol"]) == digest
    assert c.cmd(f"APOP carol {digest}").startswith("+OK Logged in, 1 messages")
    c.cmd("QUIT")
    # A user with a real hash has no shared secret: APOP fails like a wrong password.
    c = Client(pop3.port)
    stamp = GREETING.match(c.greeting)
    assert stamp
    started = time.monotonic()
    digest = hashlib.md5((stamp[1] + PASSWORDS["mrose"]).encode()).hexdigest()
    assert c.cmd(f"APOP mrose {digest}") == "-ERR [AUTH] Authentication failed"
    assert time.monotonic() - started >= 1.0
    # The digest is bound to this connection's timestamp.
    old = hashlib.md5(("<1.2.3@pop.test>" + PASSWORDS["carol"]).encode()).hexdigest()
    assert c.cmd(f"APOP carol {old}") == "-ERR [AUTH] Authentication failed"


def test_wrong_password_answered_after_delay_while_others_are_served(
        pop3: Pop3Service) -> None:
    pop3.deliver("alice", SEED[0])
    slow = Client(pop3.port)
    assert slow.cmd("USER mrose").startswith("+OK")
    slow.send(b"PASS wrong\r\n")
    started = time.monotonic()
    # Meanwhile another session logs in, lists and quits.
    other = Client(pop3.port)
    assert other.login("alice").startswith("+OK")
    assert other.cmd("STAT").startswith("+OK 1 ")
    assert other.cmd("QUIT").startswith("+OK")
    served_after = time.monotonic() - started
    assert slow.line() == "-ERR [AUTH] Authentication failed"
    failed_after = time.monotonic() - started
    assert failed_after >= 1.0
    assert served_after < 0.8, served_after
    # An unknown user gets the same answer, after the same delay.
    started = time.monotonic()
    assert slow.cmd("USER nobody") == "+OK Send your password"
    assert slow.cmd("PASS x") == "-ERR [AUTH] Authentication failed"
    assert time.monotonic() - started >= 1.0
    # The third failure in a session closes it.
    slow.cmd("USER mrose")
    assert slow.cmd("PASS again") == "-ERR [AUTH] Authentication failed"
    assert slow.closed()


def test_uidl_stable_across_sessions_restart_and_move_to_cur(pop3: Pop3Service) -> None:
    paths = [pop3.deliver("mrose", body) for body in SEED]
    c = Client(pop3.port)
    c.login()
    assert c.cmd("UIDL") == "+OK Unique-ID listing follows"
    first = c.multi()
    assert c.cmd("UIDL 2") == "+OK " + first[1]
    c.cmd("QUIT")
    assert [line.split()[0] for line in first] == ["1", "2"]
    assert all(UIDL_CHARS.match(line.split()[1]) for line in first)
    assert first[0].split()[1] != first[1].split()[1]

    c = Client(pop3.port)
    c.login()
    c.cmd("UIDL")
    assert c.multi() == first
    c.cmd("QUIT")

    pop3.stop()
    pop3.start()  # a hub restart: new factory, new user database, same port
    # Another mail reader marks the first message seen: new/ -> cur/ with Maildir info.
    moved = paths[0]
    moved.rename(pop3.maildir("mrose") / "cur" / (moved.name + ":2,S"))
    c = Client(pop3.port)
    c.login()
    c.cmd("UIDL")
    assert c.multi() == first
    _, body = c.retr(1)
    assert body.endswith(SEED[0])
    c.cmd("DELE 1")
    c.cmd("QUIT")
    assert [p.parent.name for p in pop3.messages("mrose")] == ["new"]


def test_top_sends_headers_and_n_body_lines(pop3: Pop3Service) -> None:
    path = pop3.deliver("mrose", b"Subject: top\r\n\r\nline 1\r\n.line 2\r\nline 3\r\n")
    header = path.read_bytes().split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    c = Client(pop3.port)
    c.login()
    expected = {0: header, 2: header + b"line 1\r\n..line 2\r\n",
                9: header + b"line 1\r\n..line 2\r\nline 3\r\n"}
    for lines, raw in expected.items():
        assert c.cmd(f"TOP 1 {lines}") == "+OK Top of message follows"
        assert c.raw_body() == raw
    assert c.cmd("TOP 2 0") == "-ERR No such message"
    assert c.cmd("TOP 1 -1").startswith("-ERR Invalid line count")
    assert c.cmd("TOP 1") == "-ERR Syntax: TOP message lines"
    assert c.cmd("NOOP") == "+OK"


def test_every_list_size_equals_the_octets_retr_sends(pop3: Pop3Service) -> None:
    boundary = b"X" * (CHUNK_SIZE - 200) + b"\r\n.dot at the chunk boundary\r\n"
    bodies = [
        b"Subject: empty body\r\n\r\n",
        b"Subject: dots\r\n\r\n.\r\n..\r\n. \r\n",
        b"Subject: long lines\r\n\r\n" + b"y" * 5000 + b"\r\n",
        b"Subject: big\r\n\r\n" + b"".join(b".%07d line of a big message\r\n" % i
                                             for i in range(20000)),
        b"Subject: boundary\r\n\r\n" + boundary * 3,
    ]
    files = [pop3.deliver("mrose", body) for body in bodies]
    c = Client(pop3.port)
    c.login()
    c.cmd("LIST")
    listed = [int(line.split()[1]) for line in c.multi()]
    for number, (path, size) in enumerate(zip(files, listed, strict=True), 1):
        assert c.cmd(f"LIST {number}") == f"+OK {number} {size}"
        first, body = c.retr(number)
        assert first == f"+OK {size} octets"
        assert len(body) == size
        assert body == path.read_bytes()
    c.cmd("QUIT")


def test_pipelined_commands_answered_in_order(pop3: Pop3Service) -> None:
    for body in SEED:
        pop3.deliver("mrose", body)
    c = Client(pop3.port)
    c.send(b"CAPA\r\nUSER mrose\r\nPASS tanstaaf\r\nSTAT\r\nRETR 1\r\nDELE 1\r\nLIST\r\n"
           b"RETR 1\r\nNOOP\r\nQUIT\r\n")
    assert c.line().startswith("+OK Capability")
    assert "PIPELINING" in c.multi()
    assert c.line().startswith("+OK")
    assert c.line().startswith("+OK Logged in, 2 messages")
    assert c.line().startswith("+OK 2 ")
    assert c.line().endswith(" octets")
    assert unstuff(c.raw_body()).endswith(SEED[0])
    assert c.line() == "+OK Message 1 deleted"
    assert c.line().startswith("+OK 1 messages")
    assert c.multi()[0].startswith("2 ")
    assert c.line() == "-ERR No such message"
    assert c.line() == "+OK"
    assert c.line().startswith("+OK relayhub POP3 signing off (1 messages left)")
    assert c.closed()


def test_argument_checks_never_act_on_another_message(pop3: Pop3Service) -> None:
    for body in SEED:
        pop3.deliver("mrose", body)
    c = Client(pop3.port)
    c.login()
    answers = {
        "DELE 0": "-ERR No such message",
        "DELE 3": "-ERR No such message",
        "DELE -1": "-ERR Invalid message number: '-1'",
        "DELE": "-ERR Syntax: message number expected",
        "DELE 1 2": "-ERR Syntax: message number expected",
        "RETR abc": "-ERR Invalid message number: 'abc'",
        "RETR 0": "-ERR No such message",
        "RETR +1": "-ERR Invalid message number: '+1'",
        "RETR \u0661": "-ERR Invalid message number: '\u0661'",
        "RETR 99999999999999999999": "-ERR Invalid message number: '99999999999999999999'",
        "TOP 1 -1": "-ERR Invalid line count: '-1'",
        "TOP x 1": "-ERR Invalid message number: 'x'",
        "LIST 999": "-ERR No such message",
        "LIST 0": "-ERR No such message",
        "UIDL 3": "-ERR No such message",
        "UIDL x": "-ERR Invalid message number: 'x'",
        "USER mrose": "-ERR Command not valid in this state",
        "XYZZY": "-ERR Unknown command",
    }
    for command, answer in answers.items():
        assert c.cmd(command) == answer, command
    assert c.cmd("DELE 2") == "+OK Message 2 deleted"
    assert c.cmd("DELE 2") == "-ERR No such message"
    assert c.cmd("RETR 2") == "-ERR No such message"
    assert c.cmd("LIST 2") == "-ERR No such message"
    assert c.cmd("RSET").startswith("+OK Maildrop has 2 messages")
    assert c.cmd("DELE 1") == "+OK Message 1 deleted"
    assert c.cmd("QUIT").startswith("+OK")
    remaining = pop3.messages("mrose")
    assert len(remaining) == 1 and remaining[0].read_bytes().endswith(SEED[1])


def test_too_many_bad_commands_close_the_session(pop3: Pop3Service) -> None:
    c = Client(pop3.port)
    c.send(b"GET / HTTP/1.1\r\n" * 25)
    assert [c.line() for _ in range(20)] == ["-ERR Unknown command"] * 20
    assert c.line() == "-ERR Too many invalid commands"
    assert c.closed()


def test_long_lines_are_refused_and_skipped(pop3: Pop3Service) -> None:
    c = Client(pop3.port)
    c.send(b"NOOP " + b"x" * 5000 + b"\r\nCAPA\r\n")
    assert c.line() == "-ERR Line too long"
    assert c.line().startswith("+OK Capability")


def test_dropped_connection_after_dele_deletes_nothing(pop3: Pop3Service) -> None:
    for body in SEED:
        pop3.deliver("mrose", body)
    before = pop3.messages("mrose")
    c = Client(pop3.port)
    c.login()
    assert c.cmd("DELE 1").startswith("+OK") and c.cmd("DELE 2").startswith("+OK")
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    pop3.wait_idle()
    assert pop3.messages("mrose") == before
    c = Client(pop3.port)
    assert c.login().startswith("+OK Logged in, 2 messages")  # and the lock was released


def test_connection_lost_during_retr_is_not_an_error(pop3: Pop3Service) -> None:
    pop3.deliver("mrose", b"Subject: huge\r\n\r\n" + (b"z" * 998 + b"\r\n") * 8000)
    logged: list[str] = []

    def observe(event: Mapping[str, Any]) -> None:
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        c = Client(pop3.port)
        c.login()
        c.send(b"RETR 1\r\n")
        assert c.line().startswith("+OK")
        c.file.read(1000)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # a reset, with most of the message unsent
        pop3.wait_idle()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert any(line.startswith("disconnected: user=<mrose>") for line in logged), logged
    assert not [line for line in logged if "internal error" in line or "Unhandled" in line]
    assert len(pop3.messages("mrose")) == 1
    assert Client(pop3.port).login().startswith("+OK Logged in, 1 messages")


def test_second_login_to_a_locked_mailbox_gets_in_use(pop3: Pop3Service) -> None:
    pop3.deliver("mrose", SEED[0])
    first = Client(pop3.port)
    assert first.login().startswith("+OK")
    second = Client(pop3.port)
    assert second.login() == "-ERR [IN-USE] Mailbox is locked by another POP3 session"
    assert first.cmd("QUIT").startswith("+OK")
    # Still in the AUTHORIZATION state: the client may try again.
    assert second.login().startswith("+OK Logged in, 1 messages")


def test_lock_held_by_another_process_gives_in_use(pop3: Pop3Service) -> None:
    pop3.deliver("mrose", SEED[0])
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from relayhub.pop3.mailbox import lock_maildir;"
         "fd = lock_maildir(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()",
         str(pop3.maildir("mrose"))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        c = Client(pop3.port)
        assert c.login() == "-ERR [IN-USE] Mailbox is locked by another POP3 session"
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    assert c.login().startswith("+OK Logged in, 1 messages")


def test_idle_timeout_closes_without_deleting(pop3: Pop3Service) -> None:
    pop3.stop()
    pop3.start(timeout=0.5)
    pop3.deliver("mrose", SEED[0])
    c = Client(pop3.port)
    c.login()
    c.cmd("DELE 1")
    assert c.line() == "-ERR Disconnected for inactivity"
    assert c.closed()
    pop3.wait_idle()
    assert len(pop3.messages("mrose")) == 1
    assert Client(pop3.port).login().startswith("+OK Logged in, 1 messages")


def test_a_command_sent_a_byte_at_a_time_is_cut(pop3: Pop3Service) -> None:
    """Each byte resets the idle timeout; the line must still be whole within one timeout."""
    pop3.stop()
    pop3.start(timeout=1.0)
    c = Client(pop3.port)
    started = time.monotonic()
    line = b"USER mrose-with-a-long-name\r\n"
    sent = 0
    for byte in line:
        c.send(bytes([byte]))
        sent += 1
        if select.select([c.sock], [], [], 0.2)[0]:
            break  # answered (and closed): sending more would only meet a reset
    assert c.line() == "-ERR Disconnected for inactivity"
    assert c.closed()
    # Cut mid-line (each byte alone would have kept the idle timer going), not before the
    # one-second deadline; the line was never completed.
    assert sent < len(line), "the whole line went through: nothing cut it"
    assert time.monotonic() - started >= 1.0


def test_connection_limit(pop3: Pop3Service) -> None:
    pop3.stop()
    pop3.start(max_connections=1)
    first = Client(pop3.port)
    assert first.greeting.startswith("+OK")
    second = Client(pop3.port)
    assert second.greeting == "-ERR [SYS/TEMP] Too many connections, try again later"
    assert second.closed()
    first.cmd("QUIT")
    pop3.wait_idle()
    assert Client(pop3.port).greeting.startswith("+OK")


def test_message_moved_or_removed_by_another_program(pop3: Pop3Service) -> None:
    paths = [pop3.deliver("mrose", body) for body in SEED]
    c = Client(pop3.port)
    c.login()
    paths[0].rename(pop3.maildir("mrose") / "cur" / (paths[0].name + ":2,S"))
    paths[1].unlink()
    assert c.retr(1)[1] == (pop3.maildir("mrose") / "cur" / (paths[0].name + ":2,S")
                            ).read_bytes()
    assert c.cmd("RETR 2") == "-ERR Message was removed by another program"
    c.cmd("DELE 1")
    c.cmd("DELE 2")
    assert c.cmd("QUIT").startswith("+OK relayhub POP3 signing off")
    assert pop3.messages("mrose") == []


def test_a_10000_message_mailbox_opens_and_lists_fast(pop3: Pop3Service) -> None:
    maildir = pop3.maildir("mrose")
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    body = b"Subject: x\r\n\r\nbody\r\n"
    for i in range(10_000):
        (maildir / "new" / f"1700000000.M{i:06d}P1R{i:016x}.host,S={len(body)}").write_bytes(
            body)
    c = Client(pop3.port)
    started = time.monotonic()
    assert c.login() == f"+OK Logged in, 10000 messages ({10_000 * len(body)} octets)"
    assert c.cmd("LIST").startswith("+OK 10000 messages")
    listing = c.multi()
    assert c.cmd("UIDL").startswith("+OK")
    uids = c.multi()
    elapsed = time.monotonic() - started
    assert len(listing) == len(uids) == 10_000
    assert uids[0] == f"1 1700000000.M000000P1R{0:016x}.host"
    assert uids[-1] == f"10000 1700000000.M009999P1R{9999:016x}.host"
    assert elapsed < 3.0, elapsed
    assert c.retr(10_000)[1] == body


def test_stls_upgrades_and_discards_what_was_pipelined(
        services: Callable[..., Pop3Service]) -> None:
    pop3 = services(plaintext=False, tls_context_factory=TestCA().server_context(HOST))
    pop3.deliver("mrose", SEED[0])
    c = Client(pop3.port)
    c.cmd("CAPA")
    assert c.multi()[-1] == "STLS"
    # QUIT sent in the same packet as STLS must not run after the handshake.
    c.send(b"STLS\r\nQUIT\r\n")
    assert c.line() == "+OK Begin TLS negotiation"
    client_context = ssl.create_default_context()
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    tls = client_context.wrap_socket(c.sock, server_hostname=HOST)
    reader = tls.makefile("rb")

    def cmd(line: str) -> str:
        tls.sendall(line.encode() + b"\r\n")
        return reader.readline().decode().rstrip("\r\n")

    assert cmd("CAPA") == "+OK Capability list follows"
    caps = [reader.readline().decode().rstrip("\r\n") for _ in range(8)]
    assert caps == ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                    "SASL PLAIN", "USER", "."]
    assert cmd("STLS") == "-ERR Command not permitted when TLS active"
    assert cmd("USER mrose") == "+OK Send your password"
    assert cmd("PASS tanstaaf").startswith("+OK Logged in, 1 messages")
    assert cmd("QUIT").startswith("+OK")
    tls.close()


# --------------------------------------------------------------------------- pure parts


def test_uid_is_the_unique_base_name() -> None:
    name = "1700000000.M250000P12R0123456789abcdef.host,S=120"
    assert mailbox.uid_for(name) == "1700000000.M250000P12R0123456789abcdef.host"
    assert mailbox.uid_for(name + ":2,S") == mailbox.uid_for(name)
    assert mailbox.uid_for(name + ",W=124:2,RS") == mailbox.uid_for(name)
    long = "1700000000.M250000P12R0123456789abcdef." + "h" * 40 + ",S=1"
    assert re.fullmatch(r"[0-9a-f]{40}", mailbox.uid_for(long))
    assert mailbox.uid_for(long + ":2,S") == mailbox.uid_for(long)
    assert re.fullmatch(r"[0-9a-f]{40}", mailbox.uid_for("caf\xe9.x"))


def test_size_and_time_from_the_name() -> None:
    assert mailbox.size_from_name("1.M2P3.h,S=120") == 120
    assert mailbox.size_from_name("1.M2P3.h,S=120,W=124:2,S") == 124
    assert mailbox.size_from_name("1.M2P3.h:2,S=5") is None  # flags, not a size
    assert mailbox.size_from_name("1.M2P3.h") is None
    assert mailbox.delivery_time("1700000000.M250000P3.h") == (1700000000, 250000)
    assert mailbox.delivery_time("1700000000.M25P3.h") == (1700000000, 25)
    assert mailbox.delivery_time("1700000000.123_4.h") == (1700000000, 0)
    assert mailbox.delivery_time("msg.1") is None


def test_scan_orders_by_delivery_time_then_name(tmp_path: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    names = {"new": ["1700000002.M000001P1.h,S=3", "1700000001.M500000P1.b,S=4", ".hidden"],
             "cur": ["1700000001.M500000P1.a,S=5:2,S", "1699999999.M1P1.c:2,"]}
    for sub, files in names.items():
        for name in files:
            (tmp_path / sub / name).write_bytes(b"1234567")
    listed = mailbox.scan(tmp_path)
    assert [(m.subdir, m.name, m.size) for m in listed] == [
        ("cur", "1699999999.M1P1.c:2,", 7),  # no size in the name: stat
        ("cur", "1700000001.M500000P1.a,S=5:2,S", 5),
        ("new", "1700000001.M500000P1.b,S=4", 4),
        ("new", "1700000002.M000001P1.h,S=3", 3),
    ]


def test_maildrop_holds_deletions_until_commit(tmp_path: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    for i in range(3):
        (tmp_path / "new" / f"170000000{i}.M0P1.h,S=1").write_bytes(b"x")
    drop = mailbox.open_maildrop(tmp_path)
    with pytest.raises(mailbox.MailboxInUse):
        mailbox.open_maildrop(tmp_path)  # flock excludes a second open file description
    drop.delete(2)
    with pytest.raises(mailbox.NoSuchMessage):
        drop.delete(2)
    assert drop.stat() == (2, 2) and len(list((tmp_path / "new").iterdir())) == 3
    drop.reset()
    drop.delete(1)
    drop.delete(3)
    assert drop.commit() == 0
    drop.close()
    drop.close()
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["1700000001.M0P1.h,S=1"]
    mailbox.open_maildrop(tmp_path).close()


def split_feed(top: TopFilter, data: bytes, cuts: list[int]) -> bytes:
    out = b""
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        out += top.feed(data[start:end])
    return out


@pytest.mark.parametrize("lines", [0, 1, 2, 5])
def test_top_filter_does_not_depend_on_chunking(lines: int) -> None:
    message = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n\r\nl4\r\n"
    whole = TopFilter(lines).feed(message)
    body = [b"l1\r\n", b"l2\r\n", b"\r\n", b"l4\r\n"]
    assert whole == b"A: 1\r\nB: 2\r\n\r\n" + b"".join(body[:lines])
    for a in range(len(message) + 1):
        for b in range(a, len(message) + 1):
            assert split_feed(TopFilter(lines), message, [a, b]) == whole, (a, b)


def test_top_filter_without_a_body_passes_everything() -> None:
    top = TopFilter(0)
    assert top.feed(b"A: 1\r\nB: 2") == b"A: 1\r\nB: 2" and not top.done


def test_argument_parsers() -> None:
    assert parse_message_number("7") == 7
    assert parse_message_number(" 7 ") == 7
    assert parse_optional_message_number("") is None
    assert parse_top("3 0") == (3, 0)
    for bad in ("", "1 2", "-1", "+1", "1.0", "0x1", "²", "12345678901"):
        with pytest.raises(Pop3Error):
            parse_message_number(bad)
    for bad in ("1", "1 -1", "1 2 3", "a 1"):
        with pytest.raises(Pop3Error):
            parse_top(bad)


def test_capabilities() -> None:
    assert capabilities(plaintext_allowed=False, stls_offered=True)[-1] == "STLS"
    assert "USER" not in capabilities(plaintext_allowed=False, stls_offered=False)


def test_sasl_plain_decoding() -> None:
    assert decode_sasl_plain(plain_response("bob", "pa ss")) == ("bob", "pa ss")
    assert decode_sasl_plain(plain_response("bob", "x", authzid="bob")) == ("bob", "x")
    for bad in ("=", "not base64!", plain_response("bob", "x", authzid="root"),
                plain_response("", "x"), "AGJvYg=="):
        with pytest.raises(BadCredentials):
            decode_sasl_plain(bad)


def test_mailbox_directories_are_private(pop3: Pop3Service) -> None:
    c = Client(pop3.port)
    assert c.login("alice").startswith("+OK Logged in, 0 messages")
    for path in (pop3.maildir("alice"), pop3.maildir("alice") / "new"):
        assert os.stat(path).st_mode & 0o777 == 0o700
