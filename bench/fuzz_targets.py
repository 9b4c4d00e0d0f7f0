"""Fuzz targets: each takes one input (bytes) and checks that relayhub's code answers it the
way SPEC says bad input is answered (a well-formed reply, a specific exception carrying
one, or a configuration error line), raising `FuzzFailure` otherwise. Any other exception
escaping a target is a bug too.

Used by the short hypothesis tests (tests/test_fuzz.py) and the long run (bench/fuzz.py);
each target also has a generator that builds likely-interesting inputs from a
`random.Random`, so the long run reaches past the first syntax check.

Protocols run over `StringTransport` with a reactor stand-in that runs "thread" work at
once and whose clock only moves when told, so a session is deterministic and needs no
real reactor; the queue store keeps messages in memory (its durability is not what is
fuzzed here).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import random
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

from relayhub import address, aliases, config, mime, users
from relayhub.delivery import dsn
from relayhub.delivery.results import AttemptResult, Outcome
from relayhub.directory import build_names
from relayhub.errors import SMTPReply
from relayhub.pop3 import server as pop3
from relayhub.pop3.service import pop3_factory
from relayhub.queue.store import (
    Envelope,
    IncomingMessage,
    RecipientRequest,
    RecipientStatus,
    StoredRecipient,
)
from relayhub.smtp import params
from relayhub.smtp.data import DataReader
from relayhub.smtp.server import SaslExchange, ServerConfig, SMTPServerFactory


class FuzzFailure(AssertionError):
    """An input was answered in a way SPEC does not allow."""


# --------------------------------------------------------------------------- harness


class _SyncPool:
    """A thread pool stand-in that runs the work at once, in the calling thread."""

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None],
                                 fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class SyncReactor(Clock):
    """What the protocols ask of a reactor: callLater (a manual clock), thread work (run
    at once) and callFromThread."""

    def getThreadPool(self) -> _SyncPool:
        return _SyncPool()

    def callFromThread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        fn(*args, **kwargs)


class LogWatch:
    """Collects logged failures and errors: a traceback in the log is a failed input."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    @contextlib.contextmanager
    def watching(self) -> Iterator[LogWatch]:
        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            failure = event.get("log_failure")
            if failure is not None:
                self.problems.append(f"{event.get('log_format')}: {failure.getTraceback()}")

        globalLogPublisher.addObserver(observe)
        try:
            yield self
        finally:
            globalLogPublisher.removeObserver(observe)

    def check(self) -> None:
        if self.problems:
            problems, self.problems = self.problems, []
            raise FuzzFailure("traceback in the log: " + problems[0])


def chunks(data: bytes) -> list[bytes]:
    """`data` cut at places chosen by its own content, so an input always splits alike."""
    rng = random.Random(data)
    pieces, pos = [], 0
    while pos < len(data):
        size = rng.choice((1, 2, 3, 7, 64, 512, 4096, len(data)))
        pieces.append(data[pos:pos + size])
        pos += size
    return pieces


class _MemoryIncoming(IncomingMessage):
    def __init__(self) -> None:
        self.queue_id = "FUZZ000000001"
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def commit(self, envelope: Envelope, subject: str = "") -> defer.Deferred[None]:
        return defer.succeed(None)

    def abort(self) -> None:
        pass


class _MemoryStore:
    def incoming(self) -> _MemoryIncoming:
        return _MemoryIncoming()


class _OpenAdmission:
    def admit(self, service: str, address: str, exempt: bool) -> defer.Deferred[str]:
        return defer.succeed("")

    def release(self, service: str, address: str) -> None:
        pass


PASSWORD = "secret"


class Fixture:
    """A state directory with a users file, an aliases table and one Maildir, shared by
    every input of a run (built once: a temp dir per input would dominate the cost)."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="relayhub-fuzz-")
        root = Path(self._tmp.name)
        self.users_file = root / "users"
        self.users_file.write_text(f"alice:{{PLAIN}}{PASSWORD}:Alice Example\n"
                                   f"bob:{{PLAIN}}{PASSWORD}:Bob\n")
        self.settings = config.parse_settings({
            "server": {"hostname": "hub.fuzz", "state_dir": str(root / "state")},
            "users": {"file": str(self.users_file)},
            "aliases": {"file": str(root / "aliases")},
            "domains": {"local": ["example.org", "localhost"], "relay": [".relay.example"],
                        "masquerade": ["example.org"]},
            "smtp": {"max_recipients": 20, "max_message_size": 65536,
                     "allow_plaintext_auth": True},
            "pop3": {"allow_plaintext_auth": True, "apop": True},
        }, "fuzz.toml")
        self.user_db = users.UserDatabase(self.users_file)
        table = aliases.parse_aliases(
            "team: alice, bob\nall: team, carol@example.net\nloop: loop2\nloop2: loop\n",
            "aliases")
        self.names, self.policy = build_names(self.settings, aliases.FixedAliases(table),
                                              self.user_db)
        self.maildir = self.settings.server.state_dir / "mail" / "alice"

    def refill_maildir(self) -> None:
        new = self.maildir / "new"
        new.mkdir(parents=True, exist_ok=True)
        for sub in ("cur", "tmp"):
            (self.maildir / sub).mkdir(exist_ok=True)
        present = sum(1 for sub in ("new", "cur") for _ in (self.maildir / sub).iterdir())
        for n in range(present, 3):
            (new / f"1700000000.M{n}P1.fuzz").write_bytes(
                b"Subject: m%d\r\n\r\nline\r\n.dot\r\n" % n + b"x" * (n * 300) + b"\r\n")

    def close(self) -> None:
        self._tmp.cleanup()


# --------------------------------------------------------------------------- SMTP session

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)", re.DOTALL)
_STATUS = re.compile(rb"([245])\.[0-9]{1,3}\.[0-9]{1,3} ")


def check_smtp_output(output: bytes) -> None:
    """Every line a reply line; multi-line replies keep one code; 4xx/5xx carry an enhanced
    status code of their class (RFC 2034); nothing but CRLF ends a line."""
    if output and not output.endswith(b"\r\n"):
        raise FuzzFailure(f"reply not ended by CRLF: {output[-80:]!r}")
    continuing: bytes | None = None
    for line in output.split(b"\r\n")[:-1]:
        match = _REPLY_LINE.fullmatch(line)
        if match is None or b"\r" in line or b"\n" in line:
            raise FuzzFailure(f"malformed reply line {line[:120]!r}")
        code, separator, text = match.groups()
        if continuing is not None and code != continuing:
            raise FuzzFailure(f"multi-line reply changed code: {line[:120]!r}")
        continuing = code if separator == b"-" else None
        if code[:1] in b"45" and separator == b" " and code not in (b"421",):
            status = _STATUS.match(text)
            if status is None or status.group(1) != code[:1]:
                raise FuzzFailure(f"{code.decode()} reply without its status code: {line!r}")
        if code == b"451" and b"internal error" in text:
            raise FuzzFailure(f"internal error: {line!r}")


class SMTPTarget:
    """A whole session: greeting, then the input as the client's bytes, cut into reads."""

    def __init__(self, fixture: Fixture) -> None:
        self.fixture = fixture
        self.reactor = SyncReactor()
        smtp = fixture.settings.smtp
        self.factory = SMTPServerFactory(
            ServerConfig("hub.fuzz", smtp, masquerade=("example.org",),
                         auth_failure_delay=1.0),
            fixture.policy, _MemoryStore(), self.reactor, _OpenAdmission(),  # type: ignore[arg-type]
            names=fixture.names, users=fixture.user_db)
        self.watch = LogWatch()

    def __call__(self, data: bytes) -> None:
        with self.watch.watching():
            self.run(data)
        self.watch.check()

    def run(self, data: bytes, peer: str = "192.0.2.7") -> bytes:
        proto = self.factory.buildProtocol(None)
        proto.callLater = self.reactor.callLater  # type: ignore[method-assign,assignment]
        transport = StringTransport(peerAddress=_peer(peer))
        proto.makeConnection(transport)
        # The first line alone, as a client waits for the EHLO reply before it pipelines.
        first, crlf, rest = data.partition(b"\r\n")
        for piece in [first + crlf, *chunks(rest)]:
            if transport.disconnecting:
                break
            proto.dataReceived(piece)
            self.reactor.advance(1.5)  # lets AUTH failure delays answer
        self.reactor.advance(smtp_timeout(self.fixture) + 1)
        proto.connectionLost(Failure(ConnectionError("fuzz input ended")))
        output: bytes = transport.value()
        check_smtp_output(output)
        if not output.startswith(b"220 "):
            raise FuzzFailure(f"no greeting: {output[:80]!r}")
        return output


def smtp_timeout(fixture: Fixture) -> float:
    return fixture.settings.smtp.timeout


def _peer(host: str) -> Any:
    return IPv4Address("TCP", host, 40000)


_ADDRESSES = ["<alice@example.org>", "<postmaster>", "<Postmaster@localhost>", "<>",
              "<team@example.org>", "<all@example.org>", "<loop@example.org>",
              "<x@relay.example>", "<a@b.relay.example>", "<user%host@example.org>",
              "<@a,@b:c@d>", "<\"q@x\"@example.org>", "<bob@[192.0.2.1]>",
              "<jörg@example.org>", "<a@[IPv6:::1]>", "<nobody@example.com>", "alice@example.org",
              "<a@b", "<>>", "<" + "a" * 70 + "@example.org>", "<a@" + "b" * 300 + ">"]
_PARAMS = ["SIZE=10", "SIZE=99999999999999999999", "SIZE=x", "BODY=8BITMIME", "BODY=7BIT",
           "BODY=BINARYMIME", "SMTPUTF8", "RET=FULL", "RET=HDRS", "RET=x", "ENVID=a+2Bb",
           "ENVID=" + "x" * 200, "NOTIFY=NEVER", "NOTIFY=SUCCESS,FAILURE,DELAY",
           "NOTIFY=NEVER,SUCCESS", "ORCPT=rfc822;a@b", "ORCPT=rfc822;a+40b", "ORCPT=x",
           "AUTH=<>", "AUTH=a@b", "FOO=bar", "=", "SIZE=", "SIZE", "BODY"]
_VERBS = ["HELO", "EHLO", "MAIL FROM:", "RCPT TO:", "DATA", "RSET", "NOOP", "QUIT", "VRFY",
          "EXPN", "HELP", "STARTTLS", "AUTH", "BDAT", "ehlo", "mail from:", "XYZZY", ""]


def random_text(rng: random.Random, size: int) -> bytes:
    kind = rng.random()
    if kind < 0.4:
        return bytes(rng.choice(b"abcAB@.<>:;,=+-_ \"\\[]%!/0123456789")
                     for _ in range(size))
    if kind < 0.6:
        return "".join(rng.choice("aé€\u0000\u200b𝄞ÿ") for _ in range(size)).encode(
            "utf-8", "surrogatepass")
    return rng.randbytes(size)


def _line_end(rng: random.Random) -> bytes:
    return rng.choices([b"\r\n", b"\n", b"\r", b"", b"\r\r\n"], [90, 4, 2, 2, 2])[0]


def gen_smtp(rng: random.Random) -> bytes:
    out = [b"EHLO client.fuzz\r\n"] if rng.random() < 0.85 else []
    for _ in range(rng.randint(1, 14)):
        verb = rng.choice(_VERBS)
        roll = rng.random()
        if verb.upper().startswith(("MAIL", "RCPT")):
            arg = rng.choice(_ADDRESSES) + "".join(
                " " + rng.choice(_PARAMS) for _ in range(rng.randint(0, 3)))
            line = (verb + arg).encode("utf-8")
        elif verb == "AUTH":
            line = rng.choice([b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                               b"AUTH PLAIN =", b"AUTH CRAM-MD5", b"AUTH PLAIN " +
                               random_text(rng, 20), b"AUTH LOGIN YWxpY2U="])
            if rng.random() < 0.5:
                line += b"\r\n" + rng.choice([b"*", b"YWxpY2U=", b"c2VjcmV0", b"!!",
                                              b"AGFsaWNlAHNlY3JldA==", b"AGJvYgB4"])
        elif roll < 0.7:
            line = verb.encode() + (b" " + rng.choice([b"client", b"alice", b"team",
                                                       b"all@example.org", b"Alice Example",
                                                       b""]) if rng.random() < 0.6 else b"")
        else:
            line = verb.encode() + b" " + random_text(rng, rng.choice((1, 10, 100, 600)))
        out.append(line + _line_end(rng))
        if verb == "DATA" and rng.random() < 0.8:
            out.append(gen_body(rng))
    if rng.random() < 0.1:
        out.append(b"MAIL FROM:<a@example.org>\r\n" + b"RCPT TO:<alice@example.org>\r\n" * 25)
    return b"".join(out)


def gen_body(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(0, 12)):
        parts.append(rng.choice([
            b"Subject: hi\r\n", b"From: x@sub.example.org\r\n", b"Received: x\r\n" * 3,
            b"\r\n", b".\r\n", b"..\r\n", b".x\r\n", b"\n.\n", b"\r.\r", b"\n.\r\n",
            b"\r\n.\n", b"a\rb\r\n", b"\n", b"\r", b".", b"x" * rng.choice((10, 999, 70000)),
            b"Subject: =?utf-8?q?=C3=A9?=\r\n", b"Subject: =?ut\xfc-8?q?x?=\r\n",
            b"Subject: =?x?b?!!?=\r\n", random_text(rng, rng.randint(0, 40)),
        ]))
    if rng.random() < 0.8:
        parts.append(b"\r\n.\r\n")
    return b"".join(parts)


# --------------------------------------------------------------------------- DATA framing


def data_framing(data: bytes) -> None:
    """DataReader: the result does not depend on the cut into chunks, the stored body holds
    no bare CR/LF, and what follows the end marker is a suffix of the input."""
    if not data:
        return
    mode = data[0] % 2 == 0
    body = data[1:]

    def run(pieces: list[bytes]) -> tuple[bytes, bytes | None, tuple[bool, bool, bool], int]:
        stored: list[bytes] = []
        reader = DataReader(stored.append, max_size=4096, max_line_length=1000,
                            normalize_bare_newlines=mode)
        leftover = None
        for n, piece in enumerate(pieces):
            leftover = reader.feed(piece)
            if leftover is not None:
                leftover += b"".join(pieces[n + 1:])
                break
        d = reader.defects
        defects = (d.bare_newline, d.line_too_long, d.too_big)
        if any(defects):  # the message is refused: what was stored before does not count
            return b"", leftover, defects, 0
        return b"".join(stored), leftover, defects, reader.size

    whole = run([body])
    cut = run(chunks(body))
    single = run([bytes([b]) for b in body]) if len(body) < 2000 else cut
    if not whole == cut == single:
        raise FuzzFailure(f"framing depends on the chunks: {whole!r:.300} / {cut!r:.300}")
    stored, leftover, defects, _ = whole
    if re.search(rb"\r(?!\n)|(?<!\r)\n", stored):
        raise FuzzFailure(f"bare line end stored: {stored[:200]!r}")
    if stored and not (defects[0] or defects[1] or defects[2]) and leftover is not None \
            and not stored.endswith(b"\r\n"):
        raise FuzzFailure(f"stored body does not end with CRLF: {stored[-50:]!r}")
    if leftover is not None and not body.endswith(leftover):
        raise FuzzFailure("leftover is not the input's tail")
    if leftover is not None:
        end = len(body) - len(leftover)
        marker = body[max(0, end - 5):end]
        if not (marker.endswith(b"\r\n.\r\n") or body[:end] == b".\r\n"):
            raise FuzzFailure(f"data ended without <CRLF>.<CRLF>: {marker!r}")


def gen_framing(rng: random.Random) -> bytes:
    return bytes([rng.randint(0, 1)]) + b"".join(
        rng.choice([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"xyz", b"\r\n.\r\n",
                    b"\n.\r\n", b"\r\n.\n", b"x" * 1000, b"\x00", b"\xff"])
        for _ in range(rng.randint(0, 60)))


# --------------------------------------------------------------------------- parsers

def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def address_parser(data: bytes) -> None:
    """Paths and mailboxes: a value or SyntaxErrorReply; xtext round-trips."""
    text = _text(data)
    for utf8 in (False, True):
        with contextlib.suppress(ValueError):  # its documented refusal (used for files)
            address.parse_mailbox(text, utf8=utf8)
        with contextlib.suppress(SMTPReply):
            address.parse_reverse_path(text, utf8=utf8)
        with contextlib.suppress(SMTPReply):
            path = address.parse_forward_path(text, utf8=utf8)
            address.relay_trick(path)
            str(path.mailbox)
    plain = "".join(ch for ch in text if " " <= ch <= "~")  # what xtext may carry
    encoded = address.xtext_encode(plain)
    if address.xtext_decode(encoded) != plain:
        raise FuzzFailure(f"xtext does not round-trip: {plain!r}")
    with contextlib.suppress(ValueError):  # its documented refusal
        address.xtext_decode(text)


def gen_address(rng: random.Random) -> bytes:
    pieces = ["<", ">", "@", ".", "\"", "\\", "[", "]", ":", ",", "%", "!", "a", "bob",
              "example.org", "IPv6:", "::1", "192.0.2.1", "é", " ", "+2B", "+", "-", "_",
              "postmaster", "Postmaster", "\u0000", "\udcff", "xn--bcher-kva"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20))).encode(
        "utf-8", "surrogateescape")


def mail_rcpt_params(data: bytes) -> None:
    """MAIL and RCPT arguments: a command or SyntaxErrorReply (or another SMTPReply)."""
    text = _text(data)
    for flag in (False, True):
        with contextlib.suppress(SMTPReply):
            params.parse_mail(text, smtputf8_offered=flag)
        with contextlib.suppress(SMTPReply):
            params.parse_rcpt(text, utf8=flag)


def gen_params(rng: random.Random) -> bytes:
    head = rng.choice(["FROM:", "TO:", "from:", "To:", "", "FROM: "])
    text = head + rng.choice(_ADDRESSES) + "".join(
        rng.choice([" ", "  ", "\t"]) + rng.choice(_PARAMS) for _ in range(rng.randint(0, 5)))
    if rng.random() < 0.3:
        text += _text(random_text(rng, 8))
    return text.encode("utf-8", "surrogateescape")


def aliases_parser(data: bytes) -> None:
    """aliases(5): a table or AliasFileError with lines; a table formats and re-parses."""
    text = _text(data)
    try:
        table = aliases.parse_aliases(text, "aliases")
    except aliases.AliasFileError as error:
        _check_problem_lines(error.problems)
        return
    again = aliases.parse_aliases(aliases.format_aliases(table), "aliases")
    if again.aliases != table.aliases:
        raise FuzzFailure("aliases table does not survive format_aliases")


def gen_aliases(rng: random.Random) -> bytes:
    pieces = ["team", ":", " ", ",", "alice", "bob@example.net", "\n", "\n ", "\t", "#",
              ":include:", "/tmp/x", "|/bin/false", "/var/mail/x", "\"a b\"", "\"", "\\",
              "postmaster", "MAILER-DAEMON", "a@b@c", "é", "\r", "\x00", "\"x@y\"", "@"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))).encode(
        "utf-8", "surrogateescape")


def users_parser(data: bytes) -> None:
    text = _text(data)
    try:
        users.parse_users(text, "users")
    except users.UsersFileError as error:
        _check_problem_lines(error.problems)


def gen_users(rng: random.Random) -> bytes:
    pieces = ["alice", "Bob", ":", "{PLAIN}", "pw", "$argon2id$v=19$m=8,t=1,p=1$c2FsdA$aGFzaA",
              "$2b$12$" + "a" * 53, "Alice Example", "\n", "#", " ", "é", "\x00", ".", "-",
              "x" * 70, "\r"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25))).encode(
        "utf-8", "surrogateescape")


def _check_problem_lines(problems: list[str]) -> None:
    if not problems:
        raise FuzzFailure("an error without problem lines")
    for line in problems:
        if "\n" in line or not line.strip():
            raise FuzzFailure(f"problem is not one line: {line!r}")


def config_loader(data: bytes) -> None:
    """settings_from_text: Settings, or ConfigError whose lines each name the file."""
    text = data.decode("utf-8", "replace")
    try:
        config.settings_from_text("fuzz.toml", text)
    except config.ConfigError as error:
        _check_problem_lines(error.problems)
        for line in error.problems:
            if not line.startswith("fuzz.toml"):
                raise FuzzFailure(f"problem line does not name the file: {line!r}") from None


def _toml_values(rng: random.Random) -> str:
    return rng.choice([
        '"5m"', '"0s"', '"-1s"', '"1x"', '"35MiB"', '"1KB"', '"9999999999999999TB"', "0",
        "-5", "1", "99999999999999999999", "true", "1.5", "nan", "inf", '""', '"x"', "[]",
        '["tcp:2525"]', '["tcp:99999"]', '["unix:/x"]', '["systemd:domain=INET:name=smtp"]',
        '["tcp:25:interface=::1"]', '["127.0.0.0/8", "::1/129"]', '["10.0.0.0/33"]',
        '["example.org", ".x"]', '"[192.0.2.1]:25"', '"mx.example:0"', '"[::1]"',
        '{ "a.example" = "[192.0.2.2]" }', '{ ".b" = "" }', '"all"', '"off"', '"json"',
        '"sqlite"', '"postgresql"', '"root"', '"nosuchuser"', '"/nonexistent"', "1979-05-27",
        '"\\u00e9"', "[1, 2]", '{}',
    ])


def gen_config(rng: random.Random) -> bytes:
    lines = []
    schema = config._SCHEMA
    sections = [*schema, "nosuch"]
    for _ in range(rng.randint(0, 6)):
        section = rng.choice(sections)
        lines.append(f"[{section}]" if rng.random() < 0.95 else f"[[{section}]]")
        keys = [*schema[section][1], "bogus"] if section in schema else ["x"]
        for _ in range(rng.randint(0, 5)):
            lines.append(f"{rng.choice(keys)} = {_toml_values(rng)}")
    text = "\n".join(lines)
    if rng.random() < 0.15:
        pos = rng.randint(0, len(text))
        text = text[:pos] + rng.choice(["=", "[", "\"", "\n", "\x00", "]]", "é"]) + text[pos:]
    return text.encode()


# --------------------------------------------------------------------------- POP3

_POP3_LINE = re.compile(rb"(\+OK|-ERR|\+)( .*)?", re.DOTALL)


class POP3Target:
    """A POP3 session over StringTransport: the greeting, then the input. Status lines
    must be +OK/-ERR; a multi-line answer ends with "." (the checker follows which
    commands answer with several lines)."""

    def __init__(self, fixture: Fixture) -> None:
        self.fixture = fixture
        self.reactor = SyncReactor()
        self.factory = pop3_factory(fixture.settings, fixture.user_db, self.reactor,
                                    auth_failure_delay=1.0)
        self.watch = LogWatch()

    def __call__(self, data: bytes) -> None:
        self.fixture.refill_maildir()
        with self.watch.watching():
            self.run(data)
        self.watch.check()

    def run(self, data: bytes) -> bytes:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=_peer("192.0.2.8"))
        proto.makeConnection(transport)
        for piece in chunks(data):
            if transport.disconnecting:
                break
            proto.dataReceived(piece)
            self.reactor.advance(1.5)
            for _ in range(1000):  # a streaming RETR/TOP: pull until it is done
                if transport.producer is None:
                    break
                transport.producer.resumeProducing()
        self.reactor.advance(700)
        proto.connectionLost(Failure(ConnectionError("fuzz input ended")))
        output: bytes = transport.value()
        if not output.startswith(b"+OK "):
            raise FuzzFailure(f"no greeting: {output[:80]!r}")
        if output and not output.endswith(b"\r\n"):
            raise FuzzFailure(f"answer not ended by CRLF: {output[-80:]!r}")
        for line in output.split(b"\r\n")[:-1]:
            if b"\r" in line or b"\n" in line:
                raise FuzzFailure(f"bare line end in answer: {line[:80]!r}")
            if line.startswith(b"-ERR") and not _POP3_LINE.fullmatch(line):
                raise FuzzFailure(f"malformed -ERR line {line[:80]!r}")
        return output


_POP3_COMMANDS = [b"USER alice", b"USER bob", b"USER nobody", b"PASS " + PASSWORD.encode(),
                  b"PASS wrong", b"APOP alice 0123456789abcdef0123456789abcdef", b"CAPA",
                  b"STAT", b"LIST", b"LIST 1", b"LIST 0", b"LIST 99999999999999999999", b"UIDL",
                  b"UIDL 2", b"RETR 1", b"RETR 2", b"RETR x", b"TOP 1 0", b"TOP 3 1",
                  b"TOP 1 -1", b"DELE 1", b"DELE 1", b"RSET", b"NOOP", b"QUIT", b"STLS",
                  b"AUTH", b"AUTH PLAIN", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"AUTH LOGIN",
                  b"*", b"AGFsaWNlAHNlY3JldA==", b"list", b"", b"USER", b"RETR"]


def gen_pop3(rng: random.Random) -> bytes:
    out = []
    if rng.random() < 0.7:
        out.append(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
    for _ in range(rng.randint(1, 12)):
        if rng.random() < 0.8:
            line = rng.choice(_POP3_COMMANDS)
        else:
            line = rng.choice(_POP3_COMMANDS)[:4] + b" " + random_text(
                rng, rng.choice((1, 10, 100, 1500)))
        out.append(line + _line_end(rng))
    return b"".join(out)


def pop3_parsers(data: bytes) -> None:
    """The pure POP3 argument parsers and TOP's filter: a value or Pop3Error."""
    text = _text(data)
    for parse in (pop3.parse_message_number, pop3.parse_optional_message_number,
                  pop3.parse_top):
        with contextlib.suppress(pop3.Pop3Error):
            parse(text)
    lines = data[0] % 4 if data else 0
    top = pop3.TopFilter(lines)
    out = b"".join(top.feed(piece) for piece in chunks(data))
    if not data.startswith(out) or out != pop3.TopFilter(lines).feed(data):
        raise FuzzFailure("TOP's output is not the message's head, or depends on the chunks")


# --------------------------------------------------------------------------- MIME and DSN

_LONG = re.compile(rb"[^\r\n]{999,}")


def _foldable_long_line(message: bytes) -> bytes | None:
    """A line over 998 octets that could have been cut. One without white space to fold at
    may be a header line (of the message, or of a message/rfc822 inside it), which the
    conversion cannot split; a body line over 998 always gets re-encoded, and most of those
    the generator makes have white space, so they are still caught."""
    for match in _LONG.finditer(message):
        line = match.group()
        if max(map(len, re.split(rb"[ \t]", line))) < 990:
            return line
    return None


def crlf_only(data: bytes) -> bytes:
    """A body as the queue holds it: DataReader lets nothing but CRLF end a line."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def mime_code(data: bytes) -> None:
    """to_7bit gives 7-bit bodies with lines of at most 998 octets and CRLF line ends
    (8-bit header bytes excepted, see has_8bit_headers); the other helpers never raise."""
    mime.body_traits(data)
    data = crlf_only(data)
    mime.decode_for_display(_text(data))
    mime.has_8bit_headers(data)
    limited = mime.limit_line_length(data)
    if (line := _foldable_long_line(limited)) is not None:
        raise FuzzFailure(f"limit_line_length left a line over 998 octets: {line[:60]!r}")
    seven = mime.to_7bit(data)
    if (line := _foldable_long_line(seven)) is not None:
        raise FuzzFailure(f"to_7bit left a line over 998 octets: {line[:60]!r}")
    if re.search(rb"\r(?!\n)|(?<!\r)\n", seven) and seven is not data:
        raise FuzzFailure("to_7bit left a bare line end")


def gen_mime(rng: random.Random) -> bytes:
    boundary = rng.choice([b"b1", b"", b"x y", b"\"q\""])
    pieces = [
        b"MIME-Version: 1.0\r\n", b"Content-Type: multipart/mixed; boundary=" + boundary
        + b"\r\n", b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Type: message/rfc822\r\n", b"Content-Type: multipart/alternative\r\n",
        b"Content-Transfer-Encoding: 8bit\r\n", b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n", b"Content-Transfer-Encoding: x\r\n",
        b"Subject: caf\xc3\xa9 =?utf-8?b?w6k=?= =?x?q?bad?=\r\n", b"\r\n", b"--" + boundary +
        b"\r\n", b"--" + boundary + b"--\r\n", b"caf\xc3\xa9\r\n", b"\xff\xfe\r\n",
        b"x" * 1200 + b"\r\n", b"a\rb\nc\r\n", b"=\r\n", b"\tfolded\r\n", b" \r\n",
        b"From: a@b\r\n", b"X-Long: " + b"y" * 1100 + b"\r\n",
    ]
    return b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))


def dsn_code(data: bytes) -> None:
    """build_report: a parseable multipart/report for any original and reply text."""
    # ENVID and ORCPT arrive xtext-decoded (printable ASCII), a reply text as one line.
    text = "".join(ch for ch in data.decode("ascii", "replace") if " " <= ch <= "~")[:300]
    reply = data.decode("utf-8", "replace").replace("\r", " ").replace("\n", " ")[:300]
    data = crlf_only(data)
    kind = ("failure", "delay", "success")[len(data) % 3]
    sender = "alice@example.org" if len(data) % 2 else "jörg@example.org"
    envelope = Envelope(sender=sender, recipients=(RecipientRequest("bob@example.net"),),
                        ret=("FULL", "HDRS", None)[len(data) % 3],
                        envid=text[:20] or None)
    stored = StoredRecipient(0, "bob@example.net", "rfc822;" + text[:40] if text else None,
                             ("FAILURE",), RecipientStatus.QUEUED)
    result = AttemptResult("bob@example.net", Outcome.BOUNCED, "5.1.1", reply or "x",
                           relay="mx.example.net[192.0.2.1]:25", remote_mta="mx.example.net",
                           remote_reply=bool(len(data) % 2))
    raw = dsn.build_report(kind=kind, reporting_mta="hub.example.org",  # type: ignore[arg-type]
                           queue_id="QID0123456", envelope=envelope, arrival=1.7e9,
                           results=[(stored, result)], original=data, to=sender,
                           now=1.7e9 + 60, message_id_domain="hub.example.org")
    if re.search(rb"\r(?!\n)|(?<!\r)\n", raw):
        raise FuzzFailure("bare line end in a DSN")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    if message.get_content_type() != "multipart/report":
        raise FuzzFailure("DSN is not multipart/report")


def gen_dsn(rng: random.Random) -> bytes:
    return gen_mime(rng) + (random_text(rng, rng.randint(0, 30)) if rng.random() < 0.5 else b"")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Target:
    name: str
    check: Callable[[bytes], None]
    generate: Callable[[random.Random], bytes]


def targets(fixture: Fixture) -> list[Target]:
    """Every target; the protocol ones share `fixture`."""
    smtp = SMTPTarget(fixture)
    pop = POP3Target(fixture)

    def sasl(data: bytes) -> None:
        text = data.decode("ascii", "replace")
        with contextlib.suppress(SMTPReply):
            exchange, initial = SaslExchange.start(text.split("\n")[0])
            step = exchange.step(initial)
            for response in text.split("\n")[1:]:
                if not isinstance(step, str):
                    break
                step = exchange.step(response)

    def smtp_and_sasl(data: bytes) -> None:
        smtp(data)
        sasl(data)

    return [
        Target("smtp-session", smtp_and_sasl, gen_smtp),
        Target("data-framing", data_framing, gen_framing),
        Target("address", address_parser, gen_address),
        Target("mail-rcpt-params", mail_rcpt_params, gen_params),
        Target("aliases", aliases_parser, gen_aliases),
        Target("users", users_parser, gen_users),
        Target("config", config_loader, gen_config),
        Target("pop3-session", pop, gen_pop3),
        Target("pop3-parsers", pop3_parsers, gen_pop3),
        Target("mime", mime_code, gen_mime),
        Target("dsn", dsn_code, gen_dsn),
    ]
