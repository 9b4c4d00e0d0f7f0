"""Outbound ESMTP: one connection to a next-hop address, several messages, a result per recipient.

Our own client, not `twisted.mail.smtp.ESMTPClient` (TWISTED-NOTES: it dot-stuffs per chunk,
sends `\\r\\r\\n`, has no timeouts and resends after a lost reply). `deliver_session` never
fails for SMTP or network trouble: every recipient gets an `AttemptResult`, and a reply to
"." that never came is a deferral, never a resend. Greeting, EHLO and STARTTLS failures are
deferrals even when the server answered 5xx, as Postfix treats them, so that the caller can
try the next MX address (`SessionResult.reached_transaction` is false then).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from relayhub.address import xtext_encode
from relayhub.delivery.results import AttemptResult, Outcome
from relayhub.errors import SMTPReply
from relayhub.sendnow import send_now
from relayhub.smtp.bdat import ChunkEncoder
from relayhub.smtp.encoder import DotStuffer

CHUNK_SIZE = 64 * 1024
# BDAT chunks (RFC 3030) when the next hop offers CHUNKING: large, one reply each.
BDAT_CHUNK_SIZE = 1024 * 1024
_MAX_REPLY_LINE = 4096  # RFC 5321 allows 512; an endless line means a broken or hostile peer
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?= |$)")
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class OutboundRecipient:
    address: str
    notify: tuple[str, ...] = ()
    orcpt: str | None = None  # "addr-type;address", decoded, as the queue keeps it


@dataclass(frozen=True)
class OutboundBody:
    """A body to send: its file, read here in chunks and closed afterwards, and whether every
    line end in it is known to be a CRLF (then the chunks go out without a line-end check)."""

    file: BinaryIO
    crlf_only: bool = False


@dataclass(frozen=True, kw_only=True)
class OutboundMessage:
    """A queued message for this hop.

    `open_body(eight_bit_ok)` gives the body to send (the caller converts it to 7-bit when
    the hop lacks 8BITMIME). It may fail with `SMTPReply` to decide the recipients' fate;
    any other failure defers them.
    """

    queue_id: str
    sender: str  # "" is the null reverse-path
    recipients: tuple[OutboundRecipient, ...]
    size: int
    body_type: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    open_body: Callable[[bool], Deferred[OutboundBody]]


@dataclass(frozen=True)
class Timeouts:
    """Seconds per stage (RFC 5321 §4.5.3.2); `block` is per piece of body progress."""

    connect: float = 30.0
    greeting: float = 300.0
    helo: float = 300.0  # EHLO/HELO, STARTTLS and the TLS handshake
    mail: float = 300.0  # MAIL and RSET
    rcpt: float = 300.0
    data: float = 120.0
    block: float = 180.0
    dot: float = 600.0
    quit: float = 60.0


class PeerCheck(TypingProtocol):
    """Judges a server's certificate after the handshake, before anything is sent over TLS:
    MTA-STS and DANE (relayhub.delivery.tls_plan) decide per destination."""

    def client_options(self, host: str) -> Any:
        """The TLS connection creator for `host` (it must not abort the handshake itself)."""

    def judge(self, connection: SSL.Connection) -> tuple[str, str | None]:
        """(what was verified: "dane" | "mta-sts" | "ca" | "none", the failure or None)."""


@dataclass(frozen=True)
class TLSPolicy:
    mode: str = "opportunistic"  # "none" | "opportunistic" | "required" | "verify"
    trust_root: Any = None  # for optionsForClientTLS; None = the platform's trust store
    server_name: str | None = None  # the name to verify; None = the host name
    check: PeerCheck | None = None  # replaces "verify"'s own check when set
    why: str = ""  # who requires TLS, for refusals: " by the MTA-STS policy of example.com"

    def __post_init__(self) -> None:
        if self.mode not in ("none", "opportunistic", "required", "verify"):
            raise ValueError(f"unknown TLS mode {self.mode!r}")


class MessageSource(TypingProtocol):
    """Where a session gets its messages, one at a time, and where their results go."""

    async def next(self) -> OutboundMessage | None:
        """The next message for this connection, or None to end the session."""

    def done(self, message: OutboundMessage, results: list[AttemptResult]) -> None:
        """One result per recipient of `message`, as soon as they are known."""

    def untaken(self, message: OutboundMessage) -> None:
        """`message` was handed over but not attempted: the connection had been closed
        meanwhile (by the server, while the session waited for work). It ends the session."""


@dataclass(frozen=True)
class SessionEnd:
    """How a session ended; `failure` is (status, text, remote_reply) when it broke."""

    connected: bool
    reached_transaction: bool  # greeting, EHLO and STARTTLS passed
    failure: tuple[str, str, bool] | None = None

    def defer_all(self, message: OutboundMessage, host: str | None, relay: str
                  ) -> list[AttemptResult]:
        """Results for a message this session (or host) never got to."""
        status, text, remote = self.failure or ("4.4.2", f"session with {relay} ended", False)
        return [AttemptResult(r.address, Outcome.DEFERRED, status, text, relay=relay,
                              remote_mta=host if self.connected else None, remote_reply=remote)
                for r in message.recipients]


@dataclass(frozen=True)
class SessionResult:
    results: list[list[AttemptResult]]  # per message, one per recipient, in the order given
    connected: bool  # the TCP connection was made
    reached_transaction: bool  # greeting, EHLO and STARTTLS passed; else try the next address


@dataclass(frozen=True)
class Reply:
    """One SMTP reply; `lines` hold the text after "NNN-"/"NNN ", made printable."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join([str(self.code), *filter(None, self.lines)])

    @property
    def status(self) -> str:
        """The RFC 3463 code the reply gives (RFC 2034), or one derived from the basic code."""
        given = _ENHANCED.match(self.lines[0]) if self.lines else None
        if given and given.group(1) == str(self.code)[0]:
            return given.group(0)
        return {2: "2.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

    @property
    def outcome(self) -> Outcome:
        return {2: Outcome.DELIVERED, 5: Outcome.BOUNCED}.get(self.code // 100, Outcome.DEFERRED)

    @property
    def ok(self) -> bool:
        return self.code // 100 == 2


def parse_reply_line(line: bytes) -> tuple[int, bool, str]:
    """(code, is the last line, text) of one reply line without its LF; ValueError if malformed."""
    line = line.removesuffix(b"\r")
    match = _REPLY_LINE.fullmatch(line)
    if match is None or (match.group(3) and not match.group(2)):
        raise ValueError(repr(line[:80]))
    text = _UNPRINTABLE.sub("?", match.group(3).decode("utf-8", "replace"))
    return int(match.group(1)), match.group(2) != b"-", text


@dataclass(frozen=True)
class Extensions:
    keywords: frozenset[str] = frozenset()
    size_limit: int | None = None  # from "SIZE n" with n > 0

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.keywords


def parse_ehlo(reply: Reply) -> Extensions:
    """The extensions an EHLO reply offers; its first line is the greeting, not a keyword."""
    keywords, size_limit = set(), None
    for line in reply.lines[1:]:
        keyword, _, params = line.partition(" ")
        keywords.add(keyword.upper())
        if keyword.upper() == "SIZE" and _SIZE_VALUE.fullmatch(params.strip()):
            size_limit = int(params) or None  # "SIZE 0" declares no limit (RFC 1870)
    keywords.discard("")
    return Extensions(frozenset(keywords), size_limit)


def mail_command(message: OutboundMessage, ext: Extensions) -> str:
    params = []
    if "SIZE" in ext:
        params.append(f"SIZE={message.size}")
    if message.body_type == "8BITMIME" and "8BITMIME" in ext:
        params.append("BODY=8BITMIME")
    if message.smtputf8 and "SMTPUTF8" in ext:
        params.append("SMTPUTF8")
    if "DSN" in ext:
        if message.ret:
            params.append(f"RET={message.ret}")
        if message.envid is not None:
            params.append(f"ENVID={xtext_encode(message.envid)}")
    return " ".join([f"MAIL FROM:<{message.sender}>", *params])


def rcpt_command(rcpt: OutboundRecipient, ext: Extensions) -> str:
    params = []
    if "DSN" in ext:
        if rcpt.notify:
            params.append("NOTIFY=" + ",".join(rcpt.notify))
        if rcpt.orcpt:
            addr_type, _, address = rcpt.orcpt.partition(";")
            params.append(f"ORCPT={addr_type};{xtext_encode(address)}")
    return " ".join([f"RCPT TO:<{rcpt.address}>", *params])


class _Trouble(Exception):
    """Why the connection cannot go on; the message is the technical reason."""

    status = "4.4.2"

    def describe(self, relay: str, stage: str) -> str:
        return f"lost connection with {relay} while {stage}"


class _Timeout(_Trouble):
    def describe(self, relay: str, stage: str) -> str:
        return f"conversation with {relay} timed out while {stage}"


class _Malformed(_Trouble):
    status = "4.5.0"

    def describe(self, relay: str, stage: str) -> str:
        return f"{relay} sent a malformed reply while {stage}: {self}"


class _BodyUnreadable(_Trouble):
    status = "4.3.0"

    def describe(self, relay: str, stage: str) -> str:
        return f"error reading the message body, connection to {relay} closed: {self}"


def _failure_text(reason: Failure) -> str:
    error = reason.value
    if isinstance(error, VerificationError):
        ids = (getattr(e.mismatched_id, "hostname", e.mismatched_id) for e in error.errors)
        return "certificate does not match " + ", ".join(
            i.decode() if isinstance(i, bytes) else str(i) for i in ids)
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list) \
            and error.args[0]:
        # pyOpenSSL's [(library, function, reason), ...]: the last reason is the one that
        # matters ("certificate verify failed", "wrong version number").
        return str(error.args[0][-1][-1])
    return reason.getErrorMessage()


@implementer(IHandshakeListener)
class ClientProtocol(Protocol):
    """The wire side: frames replies, writes commands, streams a body and starts TLS.

    One timed operation at a time (a reply, the handshake, the body); any trouble (timeout,
    lost connection, malformed reply) ends the connection and fails every later operation.
    """

    def __init__(self, clock: Any) -> None:
        # zope.interface types (IReactorTime, IDelayedCall) are opaque to mypy without a
        # plugin, so the clock is dynamic and the timer is typed by its concrete class.
        self._clock = clock
        self._buffer = b""
        self._lines: list[str] = []  # of a multi-line reply still arriving
        self._replies: deque[Reply] = deque()
        self._waiter: Deferred[Any] | None = None
        self._waiting_for = ""  # "reply" | "handshake" | "body"
        self._timer: DelayedCall | None = None
        self.trouble: _Trouble | None = None
        self._closed: Deferred[None] = Deferred()

    @property
    def _tx(self) -> Any:
        # Twisted types `transport` as ITransport, which lacks startTLS, producers and abort.
        return self.transport

    def dataReceived(self, data: bytes) -> None:
        if self.trouble is not None:
            return
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        try:
            for line in lines:
                code, last, text = parse_reply_line(line)
                self._lines.append(text)
                if last:
                    self._replies.append(Reply(code, tuple(self._lines)))
                    self._lines = []
            if len(self._buffer) > _MAX_REPLY_LINE:
                raise ValueError(repr(self._buffer[:80]))
        except ValueError as exc:
            self._break(_Malformed(str(exc)))
            return
        if self._waiting_for == "reply" and self._replies:
            self._done(self._replies.popleft())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._break(_Trouble(_failure_text(reason)), abort=False)
        self._closed.callback(None)

    def handshakeCompleted(self) -> None:
        # Twisted's name check aborts the connection from inside the handshake; should
        # completion still be reported after that (its code allows it), it is not one.
        if self._waiting_for == "handshake" and not self._tx.getHandle().get_shutdown():
            self._done(None)

    def send(self, *lines: str) -> None:
        """Write command lines in one write (a pipelined group is one segment)."""
        if any("\r" in line or "\n" in line for line in lines):
            raise ValueError(f"line break inside an SMTP command: {lines!r}")
        send_now(self._tx, b"".join(line.encode() + b"\r\n" for line in lines))

    def read_reply(self, timeout: float) -> Deferred[Reply]:
        if self._replies:
            return succeed(self._replies.popleft())
        return self._wait("reply", timeout)

    def start_tls(self, options: Any, timeout: float) -> Deferred[None]:
        # Anything that arrived with the 220 was sent in plaintext, maybe by someone in the
        # middle (response injection): it must not be taken as a reply inside TLS.
        self._buffer, self._lines = b"", []
        self._replies.clear()
        waiting = self._wait("handshake", timeout)
        if self.trouble is None:
            self._tx.startTLS(options)
        return waiting

    def tls_connection(self) -> SSL.Connection:
        connection: SSL.Connection = self._tx.getHandle()
        return connection

    def tls_description(self) -> str:
        connection = self._tx.getHandle()
        return f"{connection.get_protocol_version_name()} {connection.get_cipher_name()}"

    def send_body(self, body: OutboundBody, block_timeout: float) -> Deferred[None]:
        """Stream the body, dot-stuffed and ended by ".", as fast as the peer takes it."""
        waiting = self._wait("body", block_timeout)
        if self.trouble is None:
            # Most bodies fit in one chunk: stuffed and ended in one write, without a
            # producer to register, resume and unregister.
            try:
                first = body.file.read(CHUNK_SIZE)
                more = body.file.read(1) if len(first) == CHUNK_SIZE else b""
            except OSError as exc:
                self.body_failed(exc)
                return waiting
            if not more:
                encoder = DotStuffer(crlf_only=body.crlf_only)
                send_now(self._tx, encoder.encode(first) + encoder.finish())
                self._done(None)
                return waiting
            producer = _BodyProducer(self, body, block_timeout, first + more)
            self._tx.registerProducer(producer, True)
            producer.resumeProducing()
        return waiting

    def send_chunk(self, data: bytes, *, last: bool) -> None:
        """One BDAT command with its chunk, in one write."""
        self._tx.write(b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data)

    def body_progress(self, data: bytes, block_timeout: float) -> None:
        self._tx.write(data)
        if self._timer is not None:
            self._timer.reset(block_timeout)

    def body_done(self, end: bytes) -> None:
        self._tx.write(end)
        self._tx.unregisterProducer()
        self._done(None)

    def body_failed(self, exc: Exception) -> None:
        self._tx.unregisterProducer()
        self._break(_BodyUnreadable(str(exc)))

    def close(self, timeout: float) -> Deferred[None]:
        """Close politely, or abort after `timeout`; fires once the connection is gone."""
        if not self._closed.called:
            timer = self._clock.callLater(timeout, self._tx.abortConnection)
            self._closed.addCallback(lambda _: timer.cancel() if timer.active() else None)
            self._tx.loseConnection()
        return self._closed

    def abort(self) -> None:
        if not self._closed.called:
            self._tx.abortConnection()

    def _wait(self, what: str, timeout: float) -> Deferred[Any]:
        waiting: Deferred[Any] = Deferred()
        if self.trouble is not None:
            waiting.errback(self.trouble)
        else:
            self._waiter, self._waiting_for = waiting, what
            self._timer = self._clock.callLater(timeout, self._timed_out)
        return waiting

    def _timed_out(self) -> None:
        self._timer = None
        self._break(_Timeout("timed out"))

    def _take_waiter(self) -> Deferred[Any] | None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiter, self._waiter, self._waiting_for = self._waiter, None, ""
        return waiter

    def _done(self, result: object) -> None:
        waiter = self._take_waiter()
        if waiter is not None:
            waiter.callback(result)

    def _break(self, trouble: _Trouble, *, abort: bool = True) -> None:
        if self.trouble is None:
            self.trouble = trouble
        waiter = self._take_waiter()
        if abort:
            self.abort()
        if waiter is not None:
            waiter.errback(self.trouble)


@implementer(IPushProducer)
class _BodyProducer:
    """Reads the body file chunk by chunk into the transport for as long as it wants more."""

    def __init__(self, protocol: ClientProtocol, body: OutboundBody, block_timeout: float,
                 already_read: bytes = b"") -> None:
        self._protocol, self._body, self._block_timeout = protocol, body.file, block_timeout
        self._encoder = DotStuffer(crlf_only=body.crlf_only)
        self._already_read = already_read  # the body's start, read before we were needed
        self._paused = self._stopped = False

    def resumeProducing(self) -> None:
        self._paused = False
        while not (self._paused or self._stopped):
            try:
                chunk, self._already_read = (
                    self._already_read or self._body.read(CHUNK_SIZE)), b""
            except OSError as exc:
                self._stopped = True
                self._protocol.body_failed(exc)
                return
            if not chunk:
                self._stopped = True
                self._protocol.body_done(self._encoder.finish())
                return
            # A write that fills the transport's buffer calls pauseProducing at once.
            self._protocol.body_progress(self._encoder.encode(chunk), self._block_timeout)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._stopped = True  # the connection is gone; connectionLost reports it


class _SessionOver(Exception):
    """This connection carries no more transactions; open results get this deferral."""

    def __init__(self, status: str, text: str, *, remote: bool = False,
                 closing: bool = False) -> None:
        super().__init__(text)
        self.status, self.text, self.remote, self.closing = status, text, remote, closing

    @classmethod
    def refusal(cls, reply: Reply, *, closing: bool = False) -> _SessionOver:
        # A refusal of the session itself defers (class 4) even when it was a 5xx.
        return cls("4" + reply.status[1:], reply.text, remote=True, closing=closing)


@dataclass
class _Session:
    """The conversation over one connection: greeting, EHLO, STARTTLS, then the messages."""

    protocol: ClientProtocol
    host: str
    relay: str
    helo_name: str
    tls: TLSPolicy
    timeouts: Timeouts
    ext: Extensions = field(default_factory=Extensions)
    tls_used: str | None = None
    verified: str = "none"
    over: _SessionOver | None = None
    needs_rset: bool = False
    carried: int = 0  # messages attempted

    async def run(self, source: MessageSource) -> SessionEnd:
        """Open the session, then send what `source` hands over until it has no more or
        the session breaks; each message's results go to `source.done` at once."""
        try:
            await self._open()
        except _SessionOver as over:
            self.over = over
        ready = self.over is None
        while self.over is None:
            message = await source.next()
            if message is None:
                break
            if self.protocol.trouble is not None and self.carried:
                # Closed while waiting for this message (a server's idle timeout): another
                # session takes it, without an attempt and a deferral here. Not for the
                # first message: a server that always closes would be reconnected to for
                # ever; that one is attempted, and deferred, as before.
                source.untaken(message)
                break
            self.carried += 1
            source.done(message, await self._message(message))
        if self.protocol.trouble is None and not (self.over and self.over.closing):
            self.protocol.send("QUIT")
            with suppress(_Trouble):
                await self.protocol.read_reply(self.timeouts.quit)
        await self.protocol.close(self.timeouts.quit)
        ended = self.over
        return SessionEnd(connected=True, reached_transaction=ready,
                          failure=(ended.status, ended.text, ended.remote) if ended else None)

    async def _command(self, line: str | None, stage: str, timeout: float) -> Reply:
        """Send `line` (None: already sent, or nothing to send) and read its reply."""
        if line is not None:
            self.protocol.send(line)
        try:
            reply = await self.protocol.read_reply(timeout)
        except _Trouble as trouble:
            raise _SessionOver(trouble.status, trouble.describe(self.relay, stage)) from None
        if reply.code == 421:
            raise _SessionOver.refusal(reply, closing=True)
        return reply

    async def _open(self) -> None:
        greeting = await self._command(None, "receiving the initial server greeting",
                                       self.timeouts.greeting)
        if not greeting.ok:
            raise _SessionOver.refusal(greeting)
        await self._hello()
        if self.tls.mode != "none":
            await self._starttls()

    async def _hello(self) -> None:
        reply = await self._command(f"EHLO {self.helo_name}", "performing the EHLO handshake",
                                    self.timeouts.helo)
        ext = parse_ehlo(reply)
        if reply.code // 100 == 5:
            reply = await self._command(f"HELO {self.helo_name}",
                                        "performing the HELO handshake", self.timeouts.helo)
            ext = Extensions()
        if not reply.ok:
            raise _SessionOver.refusal(reply)
        self.ext = ext

    async def _starttls(self) -> None:
        required = self.tls.mode != "opportunistic"
        if "STARTTLS" not in self.ext:
            if required:
                raise _SessionOver("4.7.4", f"TLS is required{self.tls.why}, but was not "
                                   f"offered by host {self.relay}")
            return
        reply = await self._command("STARTTLS", "sending STARTTLS", self.timeouts.helo)
        if not reply.ok:
            if required:
                raise _SessionOver("4.7.4", f"TLS is required{self.tls.why}, but host "
                                   f"{self.relay} refused to start TLS: {reply.text}")
            return  # the session state is unchanged, so plaintext may go on (RFC 3207 §4)
        # Without "verify" TLS encrypts but authenticates nobody (Postfix's "may", "encrypt").
        options: Any = ssl.optionsForClientTLS(
            self.tls.server_name or self.host, trustRoot=self.tls.trust_root
        ) if self.tls.mode == "verify" else ssl.CertificateOptions()
        if self.tls.check is not None:  # MTA-STS or DANE: judged after the handshake
            options = self.tls.check.client_options(self.host)
        try:
            await self.protocol.start_tls(options, self.timeouts.helo)
        except _Trouble as trouble:
            raise _SessionOver("4.7.5", f"TLS handshake failed with {self.relay}: {trouble}"
                               ) from None
        self.tls_used = self.protocol.tls_description()
        if self.tls.check is not None:
            self.verified, failure = self.tls.check.judge(self.protocol.tls_connection())
            if failure is not None:
                raise _SessionOver("4.7.5", f"TLS with {self.relay}: {failure}")
        elif self.tls.mode == "verify":
            self.verified = "ca"
        await self._hello()

    def _result(self, rcpt: OutboundRecipient, outcome: Outcome, status: str, text: str, *,
                remote: bool = False) -> AttemptResult:
        relayed = (outcome is Outcome.DELIVERED and "DSN" not in self.ext
                   and "SUCCESS" in rcpt.notify)
        return AttemptResult(rcpt.address, outcome, status, text, relay=self.relay,
                             remote_mta=self.host, remote_reply=remote, dsn_relayed=relayed,
                             tls=self.tls_used,
                             verified=self.verified if self.tls_used else None)

    def _from_reply(self, rcpt: OutboundRecipient, reply: Reply) -> AttemptResult:
        return self._result(rcpt, reply.outcome, reply.status, reply.text, remote=True)

    def _all(self, message: OutboundMessage, outcome: Outcome, status: str, text: str, *,
             remote: bool = False) -> list[AttemptResult]:
        return [self._result(rcpt, outcome, status, text, remote=remote)
                for rcpt in message.recipients]

    async def _message(self, message: OutboundMessage) -> list[AttemptResult]:
        if self.over is not None:
            return self._all(message, Outcome.DEFERRED, self.over.status, self.over.text,
                             remote=self.over.remote)
        limit = self.ext.size_limit
        if limit is not None and message.size > limit:
            return self._all(message, Outcome.BOUNCED, "5.3.4", f"message size {message.size}"
                             f" exceeds size limit {limit} of host {self.relay}")
        if message.smtputf8 and "SMTPUTF8" not in self.ext:
            return self._all(message, Outcome.BOUNCED, "5.6.7",
                             f"SMTPUTF8 is required, but was not offered by host {self.relay}")
        try:
            body = await message.open_body("8BITMIME" in self.ext)
        except SMTPReply as refusal:
            outcome = Outcome.BOUNCED if refusal.permanent else Outcome.DEFERRED
            return self._all(message, outcome, refusal.status, refusal.text)
        except Exception as exc:  # the queue's trouble, not this hop's: keep it, try later
            return self._all(message, Outcome.DEFERRED, "4.3.0",
                             f"cannot read message {message.queue_id}: {exc}")
        results: dict[int, AttemptResult] = {}
        try:
            await self._transaction(message, body, results)
        except _SessionOver as over:
            self.over = over
        finally:
            body.file.close()
        return [results.get(i) or self._deferral(rcpt) for i, rcpt in enumerate(message.recipients)]

    def _deferral(self, rcpt: OutboundRecipient) -> AttemptResult:
        """The result of a recipient left open when the session ended."""
        assert self.over is not None, "a transaction left a recipient without a result"
        return self._result(rcpt, Outcome.DEFERRED, self.over.status, self.over.text,
                            remote=self.over.remote)

    async def _transaction(self, message: OutboundMessage, body: OutboundBody,
                           results: dict[int, AttemptResult]) -> None:
        """One MAIL..DATA exchange, filling `results`; _SessionOver leaves the rest open."""
        t = self.timeouts
        if self.needs_rset:
            reset = await self._command("RSET", "sending RSET", t.mail)
            if not reset.ok:
                raise _SessionOver.refusal(reset)
        self.needs_rset = True  # until the reply to "." ends the transaction
        rcpts = message.recipients
        lines = [mail_command(message, self.ext), *(rcpt_command(r, self.ext) for r in rcpts)]
        pipelined = "PIPELINING" in self.ext
        chunking = "CHUNKING" in self.ext  # BDAT instead of DATA (relayhub.smtp.bdat)
        if pipelined:  # RFC 2920: MAIL, every RCPT and DATA in one write, replies in order
            self.protocol.send(*lines, *(() if chunking else ("DATA",)))
        mail = await self._command(None if pipelined else lines[0], "sending MAIL FROM", t.mail)
        accepted = []
        for i, rcpt in enumerate(rcpts):
            if not (mail.ok or pipelined):
                break
            reply = await self._command(None if pipelined else lines[i + 1], "sending RCPT TO",
                                        t.rcpt)
            if mail.ok and reply.ok:
                accepted.append(i)
            elif mail.ok:
                results[i] = self._from_reply(rcpt, reply)
        if not mail.ok:
            results.update((i, self._from_reply(rcpt, mail)) for i, rcpt in enumerate(rcpts))
        if not (accepted or pipelined) or (chunking and not accepted):
            return
        if chunking:
            end = await self._send_chunks(body)
            self.needs_rset = not end.ok
            results.update((i, self._from_reply(rcpts[i], end)) for i in accepted)
            return
        data = await self._command(None if pipelined else "DATA", "sending DATA", t.data)
        if data.code != 354:
            results.update((i, self._from_reply(rcpts[i], data)) for i in accepted)
            return
        if not accepted:
            # 354 with nobody accepted (possible under pipelining): end the empty data at once.
            await self._command(".", "ending an empty DATA", t.dot)
            return
        try:
            await self.protocol.send_body(body, t.block)
        except _Trouble as trouble:
            raise _SessionOver(trouble.status, trouble.describe(self.relay, "sending the body")
                               ) from None
        end = await self._command(
            None, "waiting for the reply to the end of data; the reply was lost and the message"
            " may have been delivered, so it is not sent again now", t.dot)
        self.needs_rset = False
        results.update((i, self._from_reply(rcpts[i], end)) for i in accepted)


    async def _send_chunks(self, body: OutboundBody) -> Reply:
        """The body as BDAT chunks, each answered before the next is sent; the reply that
        decides the message (to BDAT LAST, or the first refusal of a chunk)."""
        t = self.timeouts
        encoder = ChunkEncoder(crlf_only=body.crlf_only)
        pending = b""
        while True:
            try:
                raw = body.file.read(BDAT_CHUNK_SIZE)
            except OSError as exc:
                self.protocol.abort()  # mid-chunk nothing else can be said on this connection
                raise _SessionOver(_BodyUnreadable.status, _BodyUnreadable(str(exc)).describe(
                    self.relay, "sending the body")) from None
            if not raw:
                self.protocol.send_chunk(pending + encoder.finish(), last=True)
                return await self._command(
                    None, "waiting for the reply to BDAT LAST; the reply was lost and the "
                    "message may have been delivered, so it is not sent again now", t.dot)
            if pending:
                self.protocol.send_chunk(pending, last=False)
                reply = await self._command(None, "sending BDAT", t.data + t.block)
                if not reply.ok:
                    return reply
            pending = encoder.encode(raw)


def _connect_reason(exc: ConnectError) -> str:
    if isinstance(exc, ConnectTimeout):
        return "Connection timed out"
    return str(exc.args[0]) if exc.args and exc.args[0] else str(exc).rstrip(".")


class _Factory(Factory):
    noisy = False  # one "Starting factory" line per outbound connection helps nobody


async def run_session(reactor: Any, *, host: str, address: str, port: int,
                      source: MessageSource, helo_name: str, tls: TLSPolicy,
                      timeouts: Timeouts = Timeouts()) -> SessionEnd:
    """One connection to `address` (the A/AAAA of `host`), carrying messages from `source`.

    No message is taken before the greeting, EHLO and STARTTLS have passed, so when the
    session ends with `reached_transaction` false the caller may offer the same source to
    the next address. `reactor` provides IReactorTCP and IReactorTime.
    """
    relay = f"{host}[{address}]:{port}"
    endpoint = (TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint)(
        reactor, address, port, timeout=timeouts.connect)
    protocol = ClientProtocol(reactor)
    try:
        await endpoint.connect(_Factory.forProtocol(lambda: protocol))
    except ConnectError as exc:
        return SessionEnd(connected=False, reached_transaction=False, failure=(
            "4.4.1", f"connect to {relay}: {_connect_reason(exc)}", False))
    try:
        return await _Session(protocol, host, relay, helo_name, tls, timeouts).run(source)
    finally:
        protocol.abort()  # a no-op after a normal end; after a bug, no connection is left open


class _ListSource:
    """Hands over a fixed list of messages and keeps their results in order."""

    def __init__(self, messages: Sequence[OutboundMessage]) -> None:
        self.pending = list(messages)
        self.results: dict[int, list[AttemptResult]] = {}
        self._index = {id(m): i for i, m in enumerate(messages)}

    async def next(self) -> OutboundMessage | None:
        return self.pending.pop(0) if self.pending else None

    def done(self, message: OutboundMessage, results: list[AttemptResult]) -> None:
        self.results[self._index[id(message)]] = results

    def untaken(self, message: OutboundMessage) -> None:
        self.pending.insert(0, message)  # deferred by deliver_session with the others


def deliver_session(reactor: Any, *, host: str, address: str, port: int,
                    messages: Sequence[OutboundMessage], helo_name: str, tls: TLSPolicy,
                    timeouts: Timeouts = Timeouts()) -> Deferred[SessionResult]:
    """Deliver a list of `messages` over one connection (see `run_session`).

    Fires with a result for every recipient of every message: those the session never
    reached are deferred with the reason it ended. It fails only on a programming error.
    """
    async def deliver() -> SessionResult:
        source = _ListSource(messages)
        end = await run_session(reactor, host=host, address=address, port=port, source=source,
                                helo_name=helo_name, tls=tls, timeouts=timeouts)
        relay = f"{host}[{address}]:{port}"
        for message in source.pending:
            source.done(message, end.defer_all(message, host, relay))
        return SessionResult([source.results[i] for i in range(len(messages))],
                             connected=end.connected,
                             reached_transaction=end.reached_transaction)

    return Deferred.fromCoroutine(deliver())
