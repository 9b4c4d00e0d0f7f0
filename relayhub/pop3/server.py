"""The POP3 server protocol (RFC 1939, 2449, 2595, 3206, 5034): a thin state machine over
our own line framing; argument parsing, capabilities and replies are pure functions."""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IAddress, IPullProducer, ISSLTransport
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from relayhub.pop3.auth import Authenticator, BadCredentials, decode_sasl_plain, make_timestamp
from relayhub.pop3.mailbox import (
    MailboxInUse,
    Maildrop,
    MessageVanished,
    NoSuchMessage,
    open_maildrop,
)
from relayhub.sendnow import send_now
from relayhub.smtp.deadline import CommandDeadline
from relayhub.smtp.encoder import DotStuffer
from relayhub.users import User

# Twisted's `twisted.mail.pop3.POP3` is not used (TWISTED-NOTES): its CAPA names are not
# RFC 2449's, `DELE 0` deletes the last message, a non-numeric argument drops the session, it
# has no STLS, and its RETR dot-stuffing breaks at chunk boundaries. Here:
# - one command is handled at a time; while its answer is pending (a thread, the delay after a
#   failed login, a message being streamed) input waits in a buffer (and the socket is paused
#   once that holds MAX_PIPELINED), so pipelined commands (RFC 2449) run strictly in order;
# - every argument is checked before anything touches a message;
# - RETR and TOP stream the file through a pull producer and the shared `DotStuffer`;
# - STLS discards whatever the client sent after it before the handshake, so nothing sent in
#   plaintext runs inside the TLS session.

# RFC 2449 §4 allows 255 octets per command; SASL responses may be longer (RFC 5034 §4).
MAX_LINE = 1024
# After this many unknown or malformed commands the client is not speaking POP3 in good
# faith (an HTTP client, a scanner): answer and close.
MAX_BAD_COMMANDS = 20
# Failed logins per session before it is closed (each already cost the client the delay).
MAX_AUTH_FAILURES = 3
# Read size for RETR/TOP; the transport asks for the next chunk when it has sent this one.
CHUNK_SIZE = 64 * 1024
# Messages up to this size are read whole and answered in one write; larger ones stream.
WHOLE_MESSAGE_LIMIT = 256 * 1024
# Pipelined input buffered while an answer is pending before we stop reading the socket.
MAX_PIPELINED = 64 * 1024

_LOG = Logger(namespace="relayhub.pop3d")
_LOGIN = "login: user=<{user}>, method={method}, rip={client}, tls={tls}, messages={messages}"
_AUTH_FAILED = "auth failed: user=<{user}>, method={method}, rip={client}"
_IN_USE = "mailbox in use: user=<{user}>, rip={client}"
_LOGOUT = ("{event}: user=<{user}>, rip={client}, top={top}, retr={retr}/{retr_bytes}, "
           "del={deleted}/{messages}")
_LIMIT = "{reason} from {client}"
_SLOW = "command sent too slowly from {client}"
_INTERNAL = "internal error on {command} from {client}"

PLAINTEXT_REFUSED = "Plaintext authentication disallowed"


@dataclass(frozen=True)
class Pop3Config:
    """What a POP3 listener needs: [pop3] settings plus limits tests may shorten."""

    hostname: str
    allow_plaintext_auth: bool
    apop: bool
    timeout: float = 600.0  # RFC 1939 §3: at least ten minutes of inactivity
    auth_failure_delay: float = 1.0
    max_connections: int = 1000
    implicit_tls: bool = False  # a pop3s listener: TLS from the first byte


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"
    CLOSED = "CLOSED"


# Which commands each state accepts (RFC 1939 §§4-6; CAPA in both, RFC 2449).
COMMANDS = MappingProxyType({
    State.AUTHORIZATION: frozenset({"USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT"}),
    State.TRANSACTION: frozenset({"STAT", "LIST", "UIDL", "TOP", "RETR", "DELE", "NOOP", "RSET",
                                  "CAPA", "QUIT"}),
})
KNOWN_COMMANDS = COMMANDS[State.AUTHORIZATION] | COMMANDS[State.TRANSACTION]


class Pop3Error(Exception):
    """A refusal that maps to one `-ERR` line; `code` is an RFC 2449/3206 response code."""

    def __init__(self, text: str, code: str | None = None, *, bad_command: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.bad_command = bad_command  # counts toward MAX_BAD_COMMANDS

    @property
    def line(self) -> str:
        return error_line(self.text, self.code)


def error_line(text: str, code: str | None = None) -> str:
    return f"-ERR [{code}] {text}" if code else f"-ERR {text}"


# --------------------------------------------------------------------------- pure parts


def _number(text: str, what: str) -> int:
    # ASCII digits only: no sign, no "٣", no "1_000"; ten digits is more than any maildrop.
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise Pop3Error(f"Invalid {what}: {text[:20]!r}", bad_command=True)
    return int(text)


def parse_message_number(arg: str) -> int:
    """The one message-number argument of RETR/DELE (not range-checked: the maildrop does)."""
    words = arg.split()
    if len(words) != 1:
        raise Pop3Error("Syntax: message number expected", bad_command=True)
    return _number(words[0], "message number")


def parse_optional_message_number(arg: str) -> int | None:
    """LIST/UIDL: no argument (the whole listing) or one message number."""
    return parse_message_number(arg) if arg.strip() else None


def parse_top(arg: str) -> tuple[int, int]:
    """TOP's (message number, body lines); the line count is a non-negative integer."""
    words = arg.split()
    if len(words) != 2:
        raise Pop3Error("Syntax: TOP message lines", bad_command=True)
    return _number(words[0], "message number"), _number(words[1], "line count")


def capabilities(*, plaintext_allowed: bool, stls_offered: bool) -> list[str]:
    """The RFC 2449 CAPA list: USER only while plaintext login is allowed, STLS only while
    TLS can still be started."""
    caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "SASL PLAIN"]
    if plaintext_allowed:
        caps.append("USER")
    if stls_offered:
        caps.append("STLS")
    return caps


def multiline(first: str, lines: list[str]) -> list[str]:
    """A multi-line response; our listings never start with ".", but stuff defensively."""
    return [first, *("." + line if line.startswith(".") else line for line in lines), "."]


def reply_for(error: Exception) -> str | None:
    """The -ERR line for an expected refusal, or None for a bug or I/O error (logged)."""
    if isinstance(error, Pop3Error):
        return error.line
    if isinstance(error, MailboxInUse):
        return error_line("Mailbox is locked by another POP3 session", "IN-USE")
    if isinstance(error, NoSuchMessage):
        return error_line("No such message")
    if isinstance(error, MessageVanished):
        return error_line("Message was removed by another program")
    return None


def loggable(text: str, limit: int = 64) -> str:
    """A client-chosen string made safe for one log line (no control characters, bounded)."""
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])


class TopFilter:
    """Passes a message's header section, the blank line after it and then the first `lines`
    body lines, whatever the chunking; `done` says the rest need not be read."""

    def __init__(self, lines: int) -> None:
        self._remaining = lines
        self._in_header = True
        self._line_blank = True  # the current line has held nothing but CR so far
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        pos = 0
        while pos < len(chunk):
            if self._in_header:
                newline = chunk.find(b"\n", pos)
                if newline < 0:
                    self._line_blank = self._line_blank and not chunk[pos:].strip(b"\r")
                    return chunk
                blank = self._line_blank and not chunk[pos:newline].strip(b"\r")
                self._line_blank = True
                pos = newline + 1
                if blank:
                    self._in_header = False
                    if self._remaining == 0:
                        self.done = True
                        return chunk[:pos]
            else:
                if chunk.count(b"\n", pos) < self._remaining:
                    self._remaining -= chunk.count(b"\n", pos)
                    return chunk
                for _ in range(self._remaining):
                    pos = chunk.index(b"\n", pos) + 1
                self.done = True
                return chunk[:pos]
        return chunk


class TransferAborted(ConnectionError):
    """The connection went while a message was being sent (the transport stopped us)."""


@implementer(IPullProducer)
class MessageStreamer:
    """Sends one message file as a dot-stuffed multi-line response body, a chunk each time
    the transport asks, so a large message is never held in memory. `done` fires when the
    terminating "." has been written, or fails if the connection went first."""

    def __init__(self, source: BinaryIO, transport: Any, top: TopFilter | None = None,
                 on_progress: Callable[[], None] = lambda: None) -> None:
        self._source = source
        self._transport = transport
        self._top = top
        self._stuffer = DotStuffer()
        self._on_progress = on_progress
        self.sent = 0  # message octets passed on, before stuffing
        self.done: defer.Deferred[int] = defer.Deferred()

    def start(self) -> defer.Deferred[int]:
        self._transport.registerProducer(self, False)
        return self.done

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        self._on_progress()
        chunk = self._source.read(CHUNK_SIZE)
        # A short read is usually the end: look now, so that the final "." leaves in the
        # same segment as the last data instead of one round trip (and, with Nagle's
        # algorithm and a delayed ACK, up to 40 ms) later.
        end = not chunk
        if 0 < len(chunk) < CHUNK_SIZE:
            more = self._source.read(CHUNK_SIZE - len(chunk))
            end, chunk = not more, chunk + more
        data = chunk if self._top is None else self._top.feed(chunk)
        if data:
            self.sent += len(data)
            self._transport.write(self._stuffer.encode(data))
        if end or (self._top is not None and self._top.done):
            self._transport.write(self._stuffer.finish())
            self._transport.unregisterProducer()
            self._source.close()
            self.done.callback(self.sent)

    def pauseProducing(self) -> None:
        pass  # a pull producer is only asked when the transport wants more

    def stopProducing(self) -> None:
        self._source.close()
        if not self.done.called:
            self.done.errback(Failure(TransferAborted()))


# --------------------------------------------------------------------------- protocol

Lines = list[str]
Outcome = Lines | defer.Deferred[Lines] | None


class POP3Server(Protocol, TimeoutMixin):
    """One POP3 session."""

    factory: POP3Factory

    def __init__(self, factory: POP3Factory) -> None:
        self.factory = factory
        self.config = factory.config
        # TimeoutMixin's clock: the factory's reactor, not the global one.
        self.callLater = factory.reactor.callLater  # type: ignore[method-assign]
        self._state = State.AUTHORIZATION
        self._buffer = bytearray()
        self._discarding_long_line = False
        self._pending = False  # an answer is outstanding; input waits in the buffer
        self._reading_paused = False
        # The delay after a failed login: cancelled when the client goes. Thread work is
        # never cancelled; its callbacks release what it opened if the session has gone.
        self._delay: defer.Deferred[Lines] | None = None
        self._close_after_answer = False
        self._tls = False
        self._timestamp = ""
        self._user_name: str | None = None  # from USER, waiting for PASS
        self._sasl_waiting = False  # "+ " sent, the next line is a PLAIN response
        self._auth_failures = 0
        self._bad_commands = 0
        self._user: User | None = None
        self._maildrop: Maildrop | None = None
        self._stats = {"top": 0, "retr": 0, "retr_bytes": 0}
        self._command = "CONNECT"
        self.client_address = ""
        # A line dribbled a byte at a time resets the idle timeout at every byte: it must
        # still be complete within one timeout of its first byte.
        self._deadline = CommandDeadline(self.config.timeout)

    # -- connection ------------------------------------------------------------------

    @property
    def _transport(self) -> Any:
        # One object that is several interfaces at once (ITCPTransport, IPushProducer,
        # ITLSTransport); no single declared type covers what a session calls on it.
        return self.transport

    @property
    def plaintext_allowed(self) -> bool:
        return self.config.allow_plaintext_auth or self._tls

    @property
    def stls_offered(self) -> bool:
        return (self.factory.tls_context_factory is not None and not self._tls
                and self._state is State.AUTHORIZATION)

    def connectionMade(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # not TCP (a UNIX socket, a test)
            # Replies are whole lines written once per command; Nagle's algorithm would only
            # hold the next one back for the client's delayed ACK.
            self._transport.setTcpNoDelay(True)
        peer: IAddress = self._transport.getPeer()
        self.client_address = getattr(peer, "host", "") or "unix"
        self._tls = self.config.implicit_tls or ISSLTransport.providedBy(self.transport)
        refusal = self.factory.admit(self)
        if refusal is not None:
            _LOG.warn(_LIMIT, reason=refusal, client=self.client_address)
            self._send([error_line(f"{refusal}, try again later", "SYS/TEMP")])
            self._close()
            return
        self.setTimeout(self.config.timeout)
        self._timestamp = make_timestamp(self.config.hostname, self.factory.reactor.seconds(),
                                         os.getpid(), secrets.token_hex(8))
        self._send([f"+OK relayhub POP3 ready {self._timestamp}"])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        was = self._state
        self._state = State.CLOSED
        if self._delay is not None:
            self._delay.cancel()
        self.factory.release(self)
        if was is State.TRANSACTION:
            self._log_logout("disconnected")  # nothing deleted: no QUIT, no UPDATE state
            self._release_maildrop()

    def timeoutConnection(self) -> None:
        if self._state is State.CLOSED:
            # Closed, but our last answer is still unread: a client that does not read
            # must not keep its connection for ever.
            self._transport.abortConnection()
            return
        if self._state in (State.AUTHORIZATION, State.TRANSACTION):
            self._send([error_line("Disconnected for inactivity")])
            if self._state is State.TRANSACTION:
                self._log_logout("timeout")
                self._release_maildrop()
            self._close()

    def _close(self) -> None:
        self._state = State.CLOSED
        self._transport.loseConnection()

    def _release_maildrop(self) -> None:
        if self._maildrop is not None:
            self._maildrop.close()
            self._maildrop = None

    # -- input -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._state is State.CLOSED:
            return
        self.resetTimeout()
        now = self.factory.reactor.seconds()
        if self._deadline.overdue(now, len(data)):
            _LOG.info(_SLOW, client=self.client_address)
            self.timeoutConnection()
            return
        self._buffer += data
        if self._pending and len(self._buffer) > MAX_PIPELINED and not self._reading_paused:
            # A client far ahead of our answers: let TCP flow control hold it back.
            self._reading_paused = True
            self._transport.pauseProducing()
        self._process_lines()
        if self._pending or not (self._buffer or self._discarding_long_line):
            self._deadline.clear()  # nothing half-sent, or we are the ones to wait for
        elif b"\n" in data or not self._deadline.started:
            self._deadline.start(now)  # what is held began in this read

    def _process_lines(self) -> None:
        while self._state in (State.AUTHORIZATION, State.TRANSACTION) and not self._pending:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > MAX_LINE:
                    # Do not grow without bound while waiting for the end of a line.
                    del self._buffer[:]
                    if not self._discarding_long_line:
                        self._discarding_long_line = True
                        self._refuse(Pop3Error("Line too long", bad_command=True))
                return
            line = bytes(self._buffer[:newline]).rstrip(b"\r")
            del self._buffer[: newline + 1]
            if self._discarding_long_line:
                self._discarding_long_line = False
                continue
            if len(line) > MAX_LINE:
                self._refuse(Pop3Error("Line too long", bad_command=True))
                continue
            self._handle_line(line)

    def _handle_line(self, raw: bytes) -> None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(Pop3Error("Invalid characters in command", bad_command=True))
            return
        if self._sasl_waiting:
            self._sasl_waiting = False
            self._run("AUTH", lambda: self._sasl_response(text))
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb not in KNOWN_COMMANDS:
            self._refuse(Pop3Error("Unknown command", bad_command=True))
            return
        if verb not in COMMANDS.get(self._state, frozenset()):
            self._refuse(Pop3Error("Command not valid in this state", bad_command=True))
            return
        handler: Callable[[str], Outcome] = getattr(self, f"do_{verb}")
        self._run(verb, lambda: handler(arg))

    def _run(self, command: str, call: Callable[[], Outcome]) -> None:
        self._command = command
        try:
            outcome = call()
        except Exception as error:  # refusals, and a bug must cost one reply, not the worker
            self._refuse(error)
            return
        if isinstance(outcome, defer.Deferred):
            self._wait_for(outcome)
        elif outcome is not None:
            self._send(outcome)

    def _wait_for(self, pending: defer.Deferred[Lines]) -> None:
        self._pending = True

        def answered(lines: Lines) -> None:
            self._pending = False
            if self._state is State.CLOSED:
                return
            self._send(lines)
            if self._close_after_answer:
                self._close()
                return
            if self._reading_paused:
                self._reading_paused = False
                self._transport.resumeProducing()
            self._process_lines()

        def failed(failure: Failure) -> None:
            # The transport stops a streamer before it tells us the connection is lost.
            if self._state is State.CLOSED or failure.check(TransferAborted):
                self._pending = False
                return  # cancelled or lost with the connection: nobody to answer
            error = failure.value
            assert isinstance(error, BaseException)
            line = reply_for(error) if isinstance(error, Exception) else None
            if line is None:
                _LOG.failure(_INTERNAL, failure, command=self._command,
                             client=self.client_address)
                line = error_line("Internal error, try again later", "SYS/TEMP")
            answered([line])

        pending.addCallbacks(answered, failed)

    # -- output ----------------------------------------------------------------------

    def _send(self, lines: Lines) -> None:
        if lines:
            send_now(self._transport, "".join(line + "\r\n" for line in lines).encode("utf-8"))

    def _refuse(self, error: Exception) -> None:
        line = reply_for(error)
        if line is None:
            _LOG.failure(_INTERNAL, Failure(error), command=self._command,
                         client=self.client_address)
            line = error_line("Internal error, try again later", "SYS/TEMP")
        self._send([line])
        if isinstance(error, Pop3Error) and error.bad_command:
            self._bad_commands += 1
            if self._bad_commands >= MAX_BAD_COMMANDS and self._state is not State.CLOSED:
                _LOG.warn(_LIMIT, reason="too many invalid commands", client=self.client_address)
                self._send([error_line("Too many invalid commands")])
                self._close()

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        reactor = self.factory.reactor
        result: defer.Deferred[Any] = threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), fn, *args)
        return result

    # -- AUTHORIZATION state ---------------------------------------------------------

    def do_CAPA(self, arg: str) -> Lines:
        caps = capabilities(plaintext_allowed=self.plaintext_allowed,
                            stls_offered=self.stls_offered)
        return multiline("+OK Capability list follows", caps)

    def do_QUIT(self, arg: str) -> Outcome:
        if self._state is State.AUTHORIZATION:
            self._send(["+OK relayhub POP3 signing off"])
            self._close()
            return None
        return self._update()

    def do_STLS(self, arg: str) -> Outcome:
        context = self.factory.tls_context_factory
        if context is None or self._tls:
            return [error_line("Command not permitted when TLS active" if self._tls
                               else "TLS is not available")]
        if arg.strip():
            raise Pop3Error("Syntax: STLS", bad_command=True)
        self._send(["+OK Begin TLS negotiation"])
        # RFC 2595 §4 / RFC 3207 §4.2 by analogy: what the client sent after STLS was sent
        # in plaintext and must never run inside the TLS session.
        del self._buffer[:]
        self._user_name = None
        self._transport.startTLS(context)
        self._tls = True
        return None

    def _check_plaintext(self) -> None:
        if not self.plaintext_allowed:
            raise Pop3Error(PLAINTEXT_REFUSED, "AUTH")

    def do_USER(self, arg: str) -> Lines:
        self._check_plaintext()
        name = arg.strip()
        if not name or " " in name:
            raise Pop3Error("Syntax: USER name", bad_command=True)
        # Always +OK: whether the name exists is for PASS to tell, after the delay.
        self._user_name = name
        return ["+OK Send your password"]

    def do_PASS(self, arg: str) -> Outcome:
        self._check_plaintext()
        name, self._user_name = self._user_name, None
        if name is None:
            raise Pop3Error("Send USER first", bad_command=True)
        # The password is the rest of the line: it may hold spaces (RFC 1939 §7 note).
        return self.factory.authenticator.password(name, arg).addCallback(
            self._login, name, "USER")

    def do_APOP(self, arg: str) -> Outcome:
        if not self.config.apop:
            raise Pop3Error("APOP is disabled", "AUTH")
        self._check_plaintext()
        words = arg.split()
        if len(words) != 2 or len(words[1]) != 32:
            raise Pop3Error("Syntax: APOP name digest", bad_command=True)
        name, digest = words
        return self.factory.authenticator.apop(name, self._timestamp, digest).addCallback(
            self._login, name, "APOP")

    def do_AUTH(self, arg: str) -> Outcome:
        words = arg.split()
        if not words:
            # Not in RFC 5034, but widely used by clients to probe the mechanisms.
            return multiline("+OK", ["PLAIN"])
        if words[0].upper() != "PLAIN":
            raise Pop3Error("Unsupported authentication mechanism")
        self._check_plaintext()
        if len(words) > 2:
            raise Pop3Error("Syntax: AUTH PLAIN [initial-response]", bad_command=True)
        if len(words) == 2:
            return self._auth_plain(words[1])
        self._sasl_waiting = True
        return ["+ "]

    def _sasl_response(self, text: str) -> Outcome:
        if text.strip() == "*":
            return [error_line("Authentication cancelled")]
        return self._auth_plain(text.strip())

    def _auth_plain(self, response: str) -> defer.Deferred[Lines]:
        try:
            name, password = decode_sasl_plain(response)
        except BadCredentials:
            return self._auth_failed("", "PLAIN")
        return self.factory.authenticator.password(name, password).addCallback(
            self._login, name, "PLAIN")

    def _login(self, user: User | None, name: str,
               method: str) -> Lines | defer.Deferred[Lines]:
        if self._state is State.CLOSED:
            return []
        if user is None:
            return self._auth_failed(name, method)
        opened: defer.Deferred[Maildrop] = self._in_thread(
            open_maildrop, self.factory.maildir_for(user.name))

        def ready(maildrop: Maildrop) -> Lines:
            if self._state is State.CLOSED:
                maildrop.close()
                return []
            self._maildrop, self._user, self._state = maildrop, user, State.TRANSACTION
            count, octets = maildrop.stat()
            _LOG.info(_LOGIN, user=user.name, method=method, client=self.client_address,
                      tls="yes" if self._tls else "no", messages=count)
            return [f"+OK Logged in, {count} messages ({octets} octets)"]

        def in_use(failure: Failure) -> Failure:
            failure.trap(MailboxInUse)
            _LOG.info(_IN_USE, user=user.name, client=self.client_address)
            return failure

        return opened.addCallbacks(ready, in_use)

    def _auth_failed(self, name: str, method: str) -> defer.Deferred[Lines]:
        """-ERR [AUTH] after the delay; the reactor keeps serving every other session."""
        self._auth_failures += 1
        _LOG.info(_AUTH_FAILED, user=loggable(name), method=method, client=self.client_address)
        if self._auth_failures >= MAX_AUTH_FAILURES:
            self._close_after_answer = True
        delayed: defer.Deferred[Lines] = task.deferLater(
            self.factory.reactor, self.config.auth_failure_delay,
            lambda: [error_line("Authentication failed", "AUTH")])
        self._delay = delayed

        def over(result: object) -> object:
            self._delay = None
            return result

        return delayed.addBoth(over)

    # -- TRANSACTION state -----------------------------------------------------------

    @property
    def _drop(self) -> Maildrop:
        assert self._maildrop is not None
        return self._maildrop

    def do_STAT(self, arg: str) -> Lines:
        count, octets = self._drop.stat()
        return [f"+OK {count} {octets}"]

    def do_LIST(self, arg: str) -> Lines:
        number = parse_optional_message_number(arg)
        if number is not None:
            return [f"+OK {number} {self._drop.message(number).size}"]
        count, octets = self._drop.stat()
        return multiline(f"+OK {count} messages ({octets} octets)",
                         [f"{n} {m.size}" for n, m in self._drop.listing()])

    def do_UIDL(self, arg: str) -> Lines:
        number = parse_optional_message_number(arg)
        if number is not None:
            return [f"+OK {number} {self._drop.message(number).uid}"]
        return multiline("+OK Unique-ID listing follows",
                         [f"{n} {m.uid}" for n, m in self._drop.listing()])

    def do_RETR(self, arg: str) -> defer.Deferred[Lines] | Lines:
        number = parse_message_number(arg)
        message = self._drop.message(number)
        self._stats["retr"] += 1
        return self._stream(number, f"+OK {message.size} octets", None)

    def do_TOP(self, arg: str) -> defer.Deferred[Lines] | Lines:
        number, lines = parse_top(arg)
        self._drop.message(number)
        self._stats["top"] += 1
        return self._stream(number, "+OK Top of message follows", TopFilter(lines))

    def _stream(self, number: int, first: str, top: TopFilter | None
                ) -> defer.Deferred[Lines] | Lines:
        if top is None:
            try:
                whole = self._drop.read_listed(number, WHOLE_MESSAGE_LIMIT)
            except FileNotFoundError:
                whole = None  # moved meanwhile: the streaming path searches for it
            if whole is not None:
                # Status line, stuffed message and terminator in one write.
                stuffer = DotStuffer()
                send_now(self._transport, b"".join((first.encode(), b"\r\n",
                                                    stuffer.encode(whole), stuffer.finish())))
                return self._sent(len(whole), True)
        try:
            # Opening a listed name is one quick system call, like the reads that follow;
            # only a file moved meanwhile needs the directory listings of open_message.
            opened: defer.Deferred[BinaryIO] = defer.succeed(
                self._drop.open_listed(number))
        except FileNotFoundError:
            opened = self._in_thread(self._drop.open_message, number)

        def send(source: BinaryIO) -> defer.Deferred[Lines] | Lines:
            if self._state is State.CLOSED:
                source.close()
                return []
            self._send([first])
            streamer = MessageStreamer(source, self._transport, top, self.resetTimeout)
            return streamer.start().addCallback(self._sent, top is None)

        return opened.addCallback(send)

    def _sent(self, octets: int, whole: bool) -> Lines:
        if whole:
            self._stats["retr_bytes"] += octets
        return []

    def do_DELE(self, arg: str) -> Lines:
        number = parse_message_number(arg)
        self._drop.delete(number)
        return [f"+OK Message {number} deleted"]

    def do_NOOP(self, arg: str) -> Lines:
        return ["+OK"]

    def do_RSET(self, arg: str) -> Lines:
        self._drop.reset()
        count, octets = self._drop.stat()
        return [f"+OK Maildrop has {count} messages ({octets} octets)"]

    def _update(self) -> defer.Deferred[Lines]:
        """QUIT in TRANSACTION: the UPDATE state removes the deleted messages, then close."""
        maildrop = self._drop
        self._state = State.UPDATE
        self._log_logout("logout")
        self._close_after_answer = True
        left = len(maildrop) - maildrop.deleted
        committed: defer.Deferred[int] = self._in_thread(maildrop.commit)

        def answer(failures: int) -> Lines:
            if failures:
                return [error_line("Some deleted messages not removed", "SYS/TEMP")]
            return [f"+OK relayhub POP3 signing off ({left} messages left)"]

        def release(result: object) -> object:
            maildrop.close()
            self._maildrop = None
            return result

        return committed.addCallback(answer).addBoth(release)

    def _log_logout(self, event: str) -> None:
        maildrop = self._maildrop
        _LOG.info(_LOGOUT, event=event, user=self._user.name if self._user else "",
                  client=self.client_address, top=self._stats["top"],
                  retr=self._stats["retr"], retr_bytes=self._stats["retr_bytes"],
                  deleted=maildrop.deleted if maildrop else 0,
                  messages=len(maildrop) if maildrop else 0)


class POP3Factory(ServerFactory):
    """Builds POP3 sessions for one listener and enforces its connection limit (per process).
    `on_session(address, opened)` reports each session's start and end (a worker tells the
    master, which counts connections across workers for `relayhubctl status`)."""

    noisy = False  # our own log lines say it better

    def __init__(self, config: Pop3Config, authenticator: Authenticator, mail_root: Path,
                 reactor: Any, tls_context_factory: Any = None,
                 on_session: Callable[[str, bool], None] = lambda address, opened: None
                 ) -> None:
        self.config = config
        self.authenticator = authenticator
        self.mail_root = mail_root
        self.reactor = reactor
        # An IOpenSSLServerConnectionCreator (e.g. ssl.CertificateOptions); STLS is offered
        # only when it is set.
        self.tls_context_factory = tls_context_factory
        self.on_session = on_session
        self.connections = 0
        self.sessions: set[POP3Server] = set()

    def buildProtocol(self, addr: IAddress | None) -> POP3Server:  # type: ignore[override]
        return POP3Server(self)

    def maildir_for(self, user_name: str) -> Path:
        return self.mail_root / user_name

    def admit(self, session: POP3Server) -> str | None:
        """Count a new session in; return why it is refused, or None."""
        self.connections += 1
        self.sessions.add(session)
        self.on_session(_peer_address(session), True)
        if self.connections > self.config.max_connections:
            return "Too many connections"
        return None

    def release(self, session: POP3Server) -> None:
        self.connections -= 1
        self.sessions.discard(session)
        self.on_session(_peer_address(session), False)


def _peer_address(session: POP3Server) -> str:
    peer = session.transport.getPeer() if session.transport is not None else None
    return str(getattr(peer, "host", "") or "unix")
