"""The ESMTP server protocol: a thin state machine over our own framing that asks the
acceptance policy about addresses and the queue store to keep messages.

Twisted's `twisted.mail.smtp.ESMTP` is not used (TWISTED-NOTES): it answers out of order
under pipelining, falls back to command mode inside DATA, and lacks the extensions. Here:
- one command is handled at a time; while its reply is pending (a Deferred, e.g. the
  fsync after DATA) input is paused and buffered, so replies always come in order and no
  body byte can be read as a command;
- DATA goes through `DataReader`, which alone decides where the data ends;
- every refusal is an `SMTPReply` raised by policy or parsing code, answered here;
- RCPT expands aliases into the final recipients that are queued (why there and not at
  delivery: relayhub.aliases), and VRFY/EXPN answers come from relayhub.aliases too;
- STARTTLS (RFC 3207) drops whatever the client sent after it and forgets the session, and
  AUTH (RFC 4954) runs `SaslExchange`, a pure PLAIN/LOGIN state machine, against the users
  file; failures are answered after a delay that never blocks other sessions.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IAddress, IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from relayhub import maillog
from relayhub.address import Mailbox
from relayhub.admission import Admission
from relayhub.aliases import LocalNames, recipient_requests
from relayhub.clientname import ClientNamer
from relayhub.config import SmtpSettings
from relayhub.dkim import MessageSigning, Signer, signed_commit, start_signing
from relayhub.errors import MessageRefused, SMTPReply, SyntaxErrorReply, TemporaryFailure
from relayhub.masquerade import masquerade_domain, masquerade_headers
from relayhub.policy import AcceptancePolicy, ClientContext
from relayhub.pop3.auth import (
    BadCredentials,
    MalformedResponse,
    decode_sasl_plain,
    decode_sasl_text,
)
from relayhub.queue.space import FreeSpace
from relayhub.queue.store import Envelope, IncomingMessage, QueueStore, RecipientRequest
from relayhub.sendnow import send_now
from relayhub.smtp.bdat import BadChunkSize, ChunkedBody, ChunkReader, parse_bdat
from relayhub.smtp.data import DataReader
from relayhub.smtp.deadline import CommandDeadline
from relayhub.smtp.headers import HeaderStage, received_header
from relayhub.smtp.params import parse_mail, parse_rcpt
from relayhub.tls import SessionInfo, session_info
from relayhub.users import User, UserDatabase, check_password

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF.
MAX_COMMAND_LINE = 512
# A message that has passed through more hops than this is looping (RFC 5321 §6.3).
MAX_HOPS = 50
# After this many 5xx replies the client is not talking SMTP in good faith.
MAX_ERRORS = 10
# RFC 4954 §4: an AUTH command line, and each SASL response, may be up to 12288 octets.
MAX_AUTH_LINE = 12288
# LOGIN besides PLAIN: some clients (Outlook, older phones) know no other mechanism.
AUTH_MECHANISMS = ("PLAIN", "LOGIN")
# The LOGIN mechanism's challenges: base64 of "Username:" and "Password:".
_LOGIN_PROMPTS = ("VXNlcm5hbWU6", "UGFzc3dvcmQ6")

_LOG = maillog.SMTPD
# What a client typed is logged, but never a control character that could forge a log line.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ServerConfig:
    """What one SMTP listener needs to know: the [smtp] settings and where it serves."""

    hostname: str
    smtp: SmtpSettings
    submission: bool = False  # relaying needs AUTH, even from trusted networks
    # [domains].masquerade: senders at hosts below these domains are rewritten to them,
    # except on submission and for authenticated senders (SPEC §3: not rewritten there).
    masquerade: tuple[str, ...] = ()
    auth_failure_delay: float = 1.0  # before each 535: guessing passwords costs time
    dkim: Signer | None = None  # signs mail from trusted or authenticated clients


class _Mode(enum.Enum):
    COMMAND = "command"
    DATA = "data"
    CHUNK = "chunk"  # counting off a BDAT chunk (relayhub.smtp.bdat)
    CLOSED = "closed"


@dataclass
class _Transaction:
    """One MAIL ... DATA exchange."""

    sender: Mailbox | None
    body_type: str
    smtputf8: bool
    ret: str | None
    envid: str | None
    masquerade: bool = False  # rewrite From:/Sender: as the envelope sender was
    recipients: list[RecipientRequest] = field(default_factory=list)  # after alias expansion
    accepted: list[str] = field(default_factory=list)  # the RCPT addresses, as the client gave
    keys: set[str] = field(default_factory=set)  # Member.key of each recipient: each once
    chunked: bool = False  # a BDAT came: DATA is refused in this transaction (RFC 3030)


Reply = tuple[int, str, str] | list[str]  # (code, status, text), or ready-made lines
# What a command handler returns: a reply now, one later, or None when it answered itself.
Outcome = Reply | defer.Deferred[Reply] | None


# --------------------------------------------------------------------------- AUTH (pure)


class AuthCancelled(SMTPReply):
    """The client answered a challenge with "*" (RFC 4954 §4)."""

    def __init__(self) -> None:
        super().__init__(501, "5.7.0", "Authentication cancelled")


class AuthMalformed(SMTPReply):
    """A SASL response that is not base64 text (RFC 4954 §4)."""

    def __init__(self) -> None:
        super().__init__(501, "5.5.2", "Cannot decode response")


class AuthFailed(SMTPReply):
    """Credentials that do not name a user with that password, or cannot (RFC 4954 §6)."""

    def __init__(self) -> None:
        super().__init__(535, "5.7.8", "Error: authentication failed")


@dataclass(frozen=True)
class Credentials:
    """What an exchange ends with; the password is checked by the caller, off the reactor."""

    name: str
    password: str = field(repr=False)  # never in logs or tracebacks


class SaslExchange:
    """One AUTH exchange for PLAIN (RFC 4616) or LOGIN: each `step` takes the client's next
    response and gives the next base64 challenge or the credentials to check. No I/O."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self._name: str | None = None  # LOGIN: the user name, once given

    @classmethod
    def start(cls, arg: str) -> tuple[SaslExchange, str | None]:
        """The exchange an AUTH argument asks for, and its initial response ("=": empty,
        None: none given). Raises SMTPReply."""
        words = arg.split(" ")
        if not arg or len(words) > 2:
            raise SyntaxErrorReply("Syntax: AUTH mechanism [initial-response]")
        mechanism = words[0].upper()
        if mechanism not in AUTH_MECHANISMS:
            raise SMTPReply(504, "5.5.4", "Unrecognized authentication type")
        initial = None if len(words) == 1 else "" if words[1] == "=" else words[1]
        return cls(mechanism), initial

    def step(self, response: str | None) -> str | Credentials:
        """`response`: the client's line (None: AUTH came without an initial response).
        Raises AuthCancelled, AuthMalformed, or AuthFailed for an unusable PLAIN identity."""
        if response is None:
            return "" if self.mechanism == "PLAIN" else _LOGIN_PROMPTS[0]
        if response == "*":
            raise AuthCancelled()
        try:
            if self.mechanism == "PLAIN":
                return Credentials(*decode_sasl_plain(response))
            text = decode_sasl_text(response)
        except MalformedResponse:
            raise AuthMalformed() from None
        except BadCredentials:  # e.g. acting for another user: no proxy rights here
            raise AuthFailed() from None
        if self._name is None:
            self._name = text
            return _LOGIN_PROMPTS[1]
        return Credentials(self._name, text)


def trace_comments(tls: SessionInfo | None, auth_user: str | None) -> list[str]:
    """The comments our Received: field carries about the session (as Postfix writes them)."""
    comments = [f"({tls.comment})"] if tls is not None else []
    if auth_user is not None:
        comments.append(f"(Authenticated sender: {auth_user})")
    return comments


def with_comments(header: bytes, comments: list[str]) -> bytes:
    """Our Received: field with `comments` as folded lines after its "from" clause, where
    RFC 5321 §4.4 puts information about the connection."""
    first, crlf, rest = header.partition(b"\r\n")
    return first + crlf + b"".join(b"\t" + c.encode() + b"\r\n" for c in comments) + rest


# --------------------------------------------------------------------------- protocol


@implementer(IHandshakeListener)
class SMTPServerProtocol(Protocol, TimeoutMixin):
    """One SMTP session."""

    factory: SMTPServerFactory

    def __init__(self, config: ServerConfig, policy: AcceptancePolicy, store: QueueStore,
                 names: LocalNames | None = None) -> None:
        self.config = config
        self.policy = policy
        self.store = store
        self.names = names  # None: no alias expansion, VRFY/EXPN answer as if refused
        self._mode = _Mode.COMMAND
        self._buffer = bytearray()
        self._discarding_long_line = False
        self._pending = False  # a Deferred reply is outstanding; input is paused
        self._helo = ""
        self._esmtp = False
        self._transaction: _Transaction | None = None
        self._incoming: IncomingMessage | None = None
        self._reader: DataReader | ChunkedBody | None = None
        self._chunk: ChunkReader | None = None
        self._chunk_reply: Reply | None = None  # the answer once the chunk has been read
        self._header_stage: HeaderStage | None = None
        self._signing: MessageSigning | None = None  # DKIM, for trusted or authenticated
        self._errors = 0
        self._deadline = CommandDeadline(config.smtp.timeout)
        self._greeted = False  # our 220 has gone out
        self._connect_logged = False
        self._admitted = False  # counted in by the admission, so to be released
        self._stage = "CONNECT"
        self._counts: dict[str, int] = {}
        self.client_address = ""
        self.client_name = "unknown"
        self.client: ClientContext | None = None
        self._tls_active = False  # STARTTLS answered, or TLS from the first byte (smtps)
        self._tls: SessionInfo | None = None  # once the handshake is done
        self._sasl: SaslExchange | None = None  # an AUTH exchange waiting for a response
        self._auth: tuple[str, str] | None = None  # (user name, mechanism) after AUTH

    # -- connection ------------------------------------------------------------------

    @property
    def _transport(self) -> Any:
        # One object that is several interfaces at once (ITCPTransport, IPushProducer,
        # ITLSTransport); no single declared type covers what a session calls on it.
        return self.transport

    @property
    def _client_label(self) -> str:
        return f"{self.client_name}[{self.client_address}]"

    def connectionMade(self) -> None:
        peer: IAddress = self._transport.getPeer()
        self.client_address = getattr(peer, "host", "") or "unix"
        self._tls_active = ISSLTransport.providedBy(self.transport)
        trusted = self.policy.is_trusted(self.client_address)
        self.client = ClientContext(
            address=self.client_address,
            trusted=trusted,
            authenticated=False,
            submission=self.config.submission,
        )
        self.factory.sessions.add(self)
        self.setTimeout(self.config.smtp.timeout)
        # The name lookup runs beside the admission; the banner waits for both, and the
        # lookup ends within its own timeout (relayhub.clientname).
        named = self._name_client()
        self.factory.admission.admit(self.factory.service, self.client_address, trusted
                                     ).addCallback(lambda refusal: named.addCallback(
                                         lambda _: refusal)
                                     ).addCallbacks(self._admission, self._admission_failed)

    def _name_client(self) -> defer.Deferred[None]:
        namer = self.factory.namer
        looked_up: defer.Deferred[str] = (
            namer.name(self.client_address) if namer is not None
            else defer.succeed(self.client_name))

        def named(name: str) -> None:
            # Logged by _admission, with this name, once the session is admitted.
            self.client_name = name

        return looked_up.addCallback(named)

    def _admission(self, refusal: str) -> None:
        self._admitted = not refusal
        if self._mode is _Mode.CLOSED:  # gone while we asked
            self._release()
            return
        if refusal:
            # Logged by the admission (the master), once per client rather than per
            # connection: a flood must not flood the log too.
            self._send([f"421 4.7.0 {self.config.hostname} Error: {refusal}, try again later"])
            self._close()
            return
        self._connect_logged = True
        _LOG.info(maillog.CONNECT, client=self._client_label)
        if self._buffer:
            # It talked before our greeting: a spam engine or a smuggling attempt
            # (RFC 5321 §4.3.1: the client waits for the 220).
            self._answer((554, "5.5.0", "Error: SMTP protocol synchronization"))
            self._close()
        else:
            self._greeted = True
            self._send([f"220 {self.config.hostname} ESMTP relayhub"])

    def _admission_failed(self, failure: Failure) -> None:
        _LOG.failure("admission failed for {client}", failure, client=self._client_label)
        self._admission("service not available")

    def _release(self) -> None:
        if self._admitted:
            self._admitted = False
            self.factory.admission.release(self.factory.service, self.client_address)

    def shutdown(self) -> None:
        """The worker is stopping and the grace time is over (SPEC §9)."""
        if self._mode is not _Mode.CLOSED:
            self._send([f"421 4.3.2 {self.config.hostname} Service shutting down"])
            self._close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        if self._mode is not _Mode.CLOSED and self._stage not in ("QUIT", "CONNECT"):
            _LOG.info(maillog.LOST, stage=self._stage, client=self._client_label)
        self._mode = _Mode.CLOSED
        self._abort_incoming()
        self._release()
        self.factory.sessions.discard(self)
        counts = " ".join(f"{verb.lower()}={n}" for verb, n in self._counts.items())
        if self._connect_logged:  # a refused connection is logged by the admission alone
            _LOG.info(maillog.DISCONNECT, client=self._client_label, counts=counts)

    def handshakeCompleted(self) -> None:
        self._tls = session_info(self.transport)
        _LOG.info(maillog.TLS_ESTABLISHED, client=self._client_label,
                  tls=self._tls.comment if self._tls else "?")

    def timeoutConnection(self) -> None:
        if self._mode is _Mode.CLOSED:
            # Closed, but our last reply is still unread: a client that does not read
            # must not keep its connection (and its slot) for ever.
            self._transport.abortConnection()
            return
        _LOG.info(maillog.TIMEOUT, stage=self._stage, client=self._client_label)
        if self._tls_active and self._tls is None:
            # Mid-handshake no 421 can be sent, and a TLS close would wait for the peer
            # that has stopped talking: cut the connection.
            self._mode = _Mode.CLOSED
            self._transport.abortConnection()
            return
        self._send([f"421 4.4.2 {self.config.hostname} Error: timeout exceeded"])
        self._close()

    def _close(self) -> None:
        self._mode = _Mode.CLOSED
        self._abort_incoming()
        self._transport.loseConnection()

    # -- input -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode is _Mode.CLOSED:
            return
        self.resetTimeout()
        if not self._greeted:
            # Judged when admission answers; kept to a line however long that takes.
            self._buffer += data[: MAX_COMMAND_LINE - len(self._buffer)]
            return
        now = self.factory.clock.seconds()
        if self._deadline.overdue(now, len(data)):
            self._too_slow()
            return
        if self._mode is _Mode.DATA:
            self._feed_data(data)
        elif self._mode is _Mode.CHUNK:
            self._feed_chunk(data)
        else:
            self._buffer += data
        self._process_commands()
        self._track_deadline(now, completed_line=b"\n" in data)

    def _track_deadline(self, now: float, completed_line: bool) -> None:
        """What the client is now in the middle of sending, for the slow-command deadline."""
        deadline = self._deadline
        if self._mode is _Mode.DATA:
            if not deadline.in_data:
                deadline.start(now, data=True)
        elif self._pending or not (self._buffer or self._discarding_long_line):
            deadline.clear()  # nothing half-sent, or we are the ones to wait for
        elif completed_line or deadline.in_data or not deadline.started:
            deadline.start(now)  # what is held began in this read

    def _closed(self) -> bool:
        # A method, so that type checkers do not take the mode for fixed across calls.
        return self._mode is _Mode.CLOSED

    def _too_slow(self) -> None:
        _LOG.info(maillog.SLOW_COMMAND, stage=self._stage, what=self._deadline.what(),
                  client=self._client_label)
        self._send([f"421 4.4.2 {self.config.hostname} Error: timeout exceeded"])
        self._close()

    def _feed_data(self, data: bytes) -> None:
        assert isinstance(self._reader, DataReader)
        leftover = self._reader.feed(data)
        if leftover is not None:
            # What follows <CRLF>.<CRLF> is pipelined commands: keep it for after the reply.
            self._mode = _Mode.COMMAND
            self._buffer += leftover
            self._end_of_data()

    def _line_limit(self) -> int:
        if self._sasl is not None or bytes(self._buffer[:5]).upper() == b"AUTH ":
            return MAX_AUTH_LINE
        return MAX_COMMAND_LINE

    def _process_commands(self) -> None:
        while self._mode is _Mode.COMMAND and not self._pending:
            newline = self._buffer.find(b"\n")
            limit = self._line_limit()
            if newline < 0:
                if len(self._buffer) > limit:
                    # Do not grow without bound while waiting for the end of a line.
                    del self._buffer[:]
                    if not self._discarding_long_line:
                        self._discarding_long_line = True
                        self._answer((500, "5.5.2", "Error: line too long"))
                return
            line = bytes(self._buffer[:newline]).rstrip(b"\r")
            del self._buffer[: newline + 1]
            if self._discarding_long_line:
                self._discarding_long_line = False
                continue
            if len(line) + 2 > limit:
                self._sasl = None  # an over-long response ends the exchange too
                self._answer((500, "5.5.2", "Error: line too long"))
                continue
            if self._buffer and not self._esmtp:
                # The client sent more before our reply although PIPELINING was never
                # offered: a spam engine or a smuggling attempt (RFC 2920 §3.1).
                self._answer((554, "5.5.0", "Error: SMTP protocol synchronization"))
                self._close()
                return
            self._dispatch(line)

    def _dispatch(self, raw: bytes) -> None:
        if self._sasl is not None:
            # The client's answer to our 334, not a command; non-ASCII fails as bad base64.
            response = raw.decode("ascii", "replace").strip()
            self._execute("AUTH", lambda: self._auth_step(response))
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._answer((500, "5.5.2", "Error: command not recognized"))
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler: Callable[[str], Outcome] | None = (
            getattr(self, f"smtp_{verb}", None) if verb.isalpha() else None
        )
        if handler is None:
            self._answer((500, "5.5.2", "Error: command not recognized"))
            return
        self._stage = verb
        self._counts[verb] = self._counts.get(verb, 0) + 1
        self._execute(verb, lambda: handler(arg.strip()))

    def _execute(self, verb: str, call: Callable[[], Outcome]) -> None:
        try:
            result = call()
        except SMTPReply as refusal:
            self._answer((refusal.code, refusal.status, refusal.text))
            return
        except Exception:
            # A bug must cost one reply, never the worker (nor leave an AUTH exchange open).
            self._sasl = None
            _LOG.failure(maillog.INTERNAL_ERROR, command=verb, client=self._client_label)
            self._answer((451, "4.3.0", "Error: internal error"))
            return
        if isinstance(result, defer.Deferred):
            self._wait_for(result)
        elif result is not None:
            self._answer(result)

    def _wait_for(self, pending: defer.Deferred[Reply]) -> None:
        self._pending = True
        self._transport.pauseProducing()

        def answered(reply: Reply) -> None:
            self._pending = False
            if self._mode is _Mode.CLOSED:
                return
            self._answer(reply)
            if self._closed():  # that reply was the tenth error
                return
            self._transport.resumeProducing()
            self._process_commands()

        def failed(failure: Failure) -> None:
            if failure.check(SMTPReply):
                refusal: SMTPReply = failure.value  # type: ignore[assignment]
                answered((refusal.code, refusal.status, refusal.text))
            else:
                _LOG.failure(maillog.INTERNAL_ERROR, failure, command=self._stage,
                             client=self._client_label)
                answered((451, "4.3.0", "Error: internal error"))

        pending.addCallbacks(answered, failed)

    # -- output ----------------------------------------------------------------------

    def _send(self, lines: list[str]) -> None:
        send_now(self._transport, "".join(line + "\r\n" for line in lines).encode("utf-8"))

    def _answer(self, reply: Reply) -> None:
        if isinstance(reply, list):
            lines = reply
            code = int(lines[-1][:3])
        else:
            code, status, text = reply
            lines = [f"{code} {status} {text}"]
        self._send(lines)
        if code >= 500:
            self._errors += 1
            if self._errors >= MAX_ERRORS and self._mode is not _Mode.CLOSED:
                _LOG.warn(maillog.LIMIT, reason="too many errors", client=self._client_label,
                          reply="421 4.7.0")
                self._send([f"421 4.7.0 {self.config.hostname} Error: too many errors"])
                self._close()

    def _reject(self, stage: str, refusal: SMTPReply, recipient: str = "") -> None:
        txn = self._transaction
        _LOG.info(
            maillog.REJECT, stage=stage, client=self._client_label,
            reply=f"{refusal.code} {refusal.status} {refusal.text}",
            sender=str(txn.sender or "") if txn else "", recipient=recipient,
            proto=self._protocol_keyword, helo=self._helo,
        )

    # -- commands --------------------------------------------------------------------

    @property
    def _starttls_offered(self) -> bool:
        return self.factory.tls_options is not None and not self._tls_active

    @property
    def _auth_offered(self) -> bool:
        # SPEC §3: no password crosses the network in clear unless the administrator says so.
        return self.factory.users is not None and (
            self._tls_active or self.config.smtp.allow_plaintext_auth)

    def _ehlo_keywords(self) -> list[str]:
        keywords = ["PIPELINING", f"SIZE {self.config.smtp.max_message_size}", "8BITMIME",
                    "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN", "CHUNKING"]
        if self._starttls_offered:
            keywords.append("STARTTLS")
        if self._auth_offered:
            keywords.append("AUTH " + " ".join(AUTH_MECHANISMS))
        return [*keywords, "HELP"]

    def smtp_EHLO(self, arg: str) -> Reply:
        if not arg:
            raise SyntaxErrorReply("Syntax: EHLO hostname")
        self._helo, self._esmtp, self._transaction = arg, True, None
        names = [self.config.hostname, *self._ehlo_keywords()]
        return [f"250-{name}" for name in names[:-1]] + [f"250 {names[-1]}"]

    def smtp_HELO(self, arg: str) -> Reply:
        if not arg:
            raise SyntaxErrorReply("Syntax: HELO hostname")
        self._helo, self._esmtp, self._transaction = arg, False, None
        return [f"250 {self.config.hostname}"]

    def smtp_MAIL(self, arg: str) -> Reply:
        if not self._helo:
            return (503, "5.5.1", "Error: send HELO/EHLO first")
        if self._transaction is not None:
            return (503, "5.5.1", "Error: nested MAIL command")
        # AUTH= (RFC 4954 §5) vouches for nothing here: only our own AUTH authenticates, and
        # as the hub passes no AUTH= on, every message leaves "as if AUTH=<>" was given.
        command = parse_mail(arg, smtputf8_offered=self._esmtp)
        if command.size is not None and command.size > self.config.smtp.max_message_size:
            return (552, "5.3.4", "Message size exceeds fixed limit")
        if self.factory.space is not None:
            try:  # refused now, not after the client has sent it all ([queue] min_free_space)
                self.factory.space.check(command.size or 0)
            except SMTPReply as refusal:  # InsufficientStorage: 452 4.3.1
                self._reject("MAIL", refusal)
                raise
        masquerade = (self.config.masquerade and not self.config.submission
                      and self._auth is None)
        sender = command.sender
        if masquerade and sender is not None:
            domain = masquerade_domain(sender.domain, self.config.masquerade)
            sender = sender if domain is None else Mailbox(sender.local_part, domain)
        self._transaction = _Transaction(
            sender=sender, body_type=command.body_type, smtputf8=command.smtputf8,
            ret=command.ret, envid=command.envid, masquerade=bool(masquerade),
        )
        return (250, "2.1.0", "Ok")

    def smtp_RCPT(self, arg: str) -> Reply:
        txn = self._transaction
        if txn is None:
            return (503, "5.5.1", "Error: need MAIL command")
        if len(txn.recipients) >= self.config.smtp.max_recipients:
            return (452, "4.5.3", "Error: too many recipients")
        command = parse_rcpt(arg, utf8=txn.smtputf8)
        assert self.client is not None
        try:
            mailbox = self.policy.check_recipient(command.path, self.client)
            expansion = self.names.expand(mailbox) if self.names is not None else None
        except SMTPReply as refusal:
            self._reject("RCPT", refusal, recipient=arg)
            raise
        request = RecipientRequest(address=str(mailbox), orcpt=command.orcpt,
                                   notify=command.notify)
        if expansion is None:
            new = [(str(mailbox).lower(), request)]
        else:
            requests = recipient_requests(expansion, request, null_sender=txn.sender is None)
            new = [(m.key, r) for m, r in zip(expansion.members, requests, strict=True)]
        # A recipient named twice, directly or through lists, gets the message once.
        fresh = [(key, r) for key, r in new if key not in txn.keys]
        if len(txn.recipients) + len(fresh) > self.config.smtp.max_recipients:
            return (452, "4.5.3", "Error: too many recipients")
        txn.accepted.append(str(mailbox))
        for key, r in fresh:
            txn.keys.add(key)
            txn.recipients.append(r)
        return (250, "2.1.5", "Ok")

    def smtp_DATA(self, arg: str) -> Outcome:
        txn = self._transaction
        if arg:
            return (501, "5.5.4", "Syntax: DATA")
        if txn is None:
            return (503, "5.5.1", "Error: need RCPT command")
        if txn.chunked:
            return (503, "5.5.1", "Error: DATA after BDAT")
        if not txn.recipients:
            return (554, "5.5.1", "Error: no valid recipients")
        self._open_message(txn, DataReader)
        self._mode = _Mode.DATA
        self._send(["354 End data with <CR><LF>.<CR><LF>"])
        # Bytes the client already sent after DATA are the start of the body.
        early, self._buffer = bytes(self._buffer), bytearray()
        if early:
            self._feed_data(early)
        return None

    @property
    def _protocol_keyword(self) -> str:
        """RFC 3848: ESMTP, plus S for TLS and A for AUTH; HELO sessions are plain SMTP."""
        if not self._esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self._tls_active else "") + ("A" if self._auth else "")

    def _store_body(self, chunk: bytes) -> None:
        assert self._header_stage is not None
        self._header_stage.feed(chunk)

    def _end_of_data(self) -> None:
        txn, incoming, reader = self._transaction, self._incoming, self._reader
        assert txn is not None and incoming is not None and reader is not None
        assert self._header_stage is not None
        self._header_stage.finish()
        summary = self._header_stage.summary()
        signing = self._signing
        self._transaction, self._reader, self._header_stage = None, None, None
        self._signing = None
        refusal: MessageRefused | None = None
        if reader.defects.bare_newline:
            refusal = MessageRefused(550, "5.5.2", "Error: bare <CR> or <LF> received")
        elif reader.defects.line_too_long:
            refusal = MessageRefused(500, "5.5.2", "Error: line too long")
        elif reader.defects.too_big:
            refusal = MessageRefused(552, "5.3.4", "Error: message file too big")
        elif summary.received_count > MAX_HOPS:
            refusal = MessageRefused(554, "5.4.6", "Error: too many hops")
        if refusal is not None:
            self._abort_incoming()
            _LOG.info(maillog.REFUSED_MESSAGE, queue_id=incoming.queue_id,
                      client=self._client_label, reply=str(refusal), sender=str(txn.sender or ""))
            self._answer((refusal.code, refusal.status, refusal.text))
            return
        self._incoming = None
        envelope = Envelope(
            sender=str(txn.sender) if txn.sender else "",
            recipients=tuple(txn.recipients), body_type=txn.body_type,
            smtputf8=txn.smtputf8, ret=txn.ret, envid=txn.envid,
            client_name=self.client_name, client_address=self.client_address,
            helo=self._helo, protocol=self._protocol_keyword,
            auth_user=self._auth[0] if self._auth else None,
        )
        size = reader.size
        auth = self._auth
        ended = self.factory.clock.seconds()

        def queued(_: object) -> Reply:
            self._stage = "END-OF-MESSAGE"  # a disconnect now loses nothing
            if auth is None:
                _LOG.info(maillog.QUEUED, queue_id=incoming.queue_id, sender=envelope.sender,
                          size=size, nrcpt=len(envelope.recipients), client=self._client_label,
                          accept_seconds=self.factory.clock.seconds() - ended)
            else:
                _LOG.info(maillog.QUEUED_AUTHENTICATED, queue_id=incoming.queue_id,
                          sender=envelope.sender, size=size, nrcpt=len(envelope.recipients),
                          client=self._client_label, user=auth[0], method=auth[1],
                          accept_seconds=self.factory.clock.seconds() - ended)
            self.factory.on_queued(incoming.queue_id)
            return (250, "2.0.0", f"Ok: queued as {incoming.queue_id}")

        def not_queued(failure: Failure) -> Failure:
            _LOG.error(maillog.STORE_FAILED, queue_id=incoming.queue_id,
                       client=self._client_label, error=failure.getErrorMessage())
            if not failure.check(SMTPReply):
                return Failure(TemporaryFailure())
            return failure

        committed = signed_commit(signing, incoming, self.factory.clock.seconds(),
                                  lambda: incoming.commit(envelope, summary.subject))
        self._wait_for(committed.addCallbacks(queued, not_queued))

    def _abort_incoming(self) -> None:
        self._signing = None
        if self._incoming is not None:
            self._incoming.abort()
            self._incoming = None

    def smtp_RSET(self, arg: str) -> Reply:
        self._transaction = None
        self._abort_incoming()  # a message begun by BDAT
        return (250, "2.0.0", "Ok")

    def smtp_NOOP(self, arg: str) -> Reply:
        return (250, "2.0.0", "Ok")

    def smtp_HELP(self, arg: str) -> Reply:
        return (214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN"
                              " HELP STARTTLS AUTH")

    def _may_look_up(self, setting: str) -> bool:
        """[smtp].vrfy / .expn: "all", "trusted" (trusted network or authenticated), "off"."""
        client = self.client
        return setting == "all" or (setting == "trusted" and client is not None
                                    and (client.trusted or client.authenticated))

    def _look_up(self, command: str, arg: str, answer: Callable[[], Reply]) -> Reply:
        """Answer VRFY/EXPN and log the question and the reply code (never the names)."""
        query = _UNPRINTABLE.sub("?", arg)[:200]
        try:
            reply = answer()
        except SMTPReply as refusal:
            _LOG.info(maillog.LOOKUP, command=command, query=query, client=self._client_label,
                      reply=f"{refusal.code} {refusal.status}")
            raise
        last = reply[-1] if isinstance(reply, list) else f"{reply[0]} {reply[1]}"
        count = f" ({len(reply)} lines)" if isinstance(reply, list) and len(reply) > 1 else ""
        _LOG.info(maillog.LOOKUP, command=command, query=query, client=self._client_label,
                  reply=" ".join(last.split(" ", 2)[:2]) + count)
        return reply

    def smtp_VRFY(self, arg: str) -> Reply:
        if not arg:
            raise SyntaxErrorReply("Syntax: VRFY address")
        names = self.names
        if names is not None and self._may_look_up(self.config.smtp.vrfy):
            return self._look_up("VRFY", arg, lambda: names.vrfy(arg))
        # Refused by policy: RFC 5321 §3.5.3's non-committal reply, revealing nothing.
        return self._look_up("VRFY", arg, lambda: (
            252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery"))

    def smtp_EXPN(self, arg: str) -> Reply:
        if not arg:
            raise SyntaxErrorReply("Syntax: EXPN name")
        names = self.names
        if names is not None and self._may_look_up(self.config.smtp.expn):
            return self._look_up("EXPN", arg, lambda: names.expn(arg))
        return self._look_up("EXPN", arg, lambda: (502, "5.7.0", "Error: EXPN is not available"))

    def smtp_QUIT(self, arg: str) -> Outcome:
        self._send([f"221 2.0.0 {self.config.hostname} Bye"])
        self._close()
        return None

    # -- CHUNKING (RFC 3030; the chunk logic is relayhub.smtp.bdat) ----------------------

    def smtp_BDAT(self, arg: str) -> Outcome:
        try:
            size, last = parse_bdat(arg)
        except BadChunkSize as bad:
            # Without a size the chunk cannot be told from commands: end the session.
            self._answer((bad.code, bad.status, bad.text))
            self._close()
            return None
        txn = self._transaction
        refusal: Reply | None = None
        if txn is None:
            refusal = (503, "5.5.1", "Error: need MAIL command")
        elif not txn.recipients:
            refusal = (554, "5.5.1", "Error: no valid recipients")
        elif not txn.chunked:
            refusal = self._begin_chunked(txn)
        # A refused chunk is read all the same (RFC 3030 §2): its octets are never commands.
        sink = self._discard_chunk if refusal is not None else self._chunked_body_feed
        self._chunk = ChunkReader(size, sink)
        self._chunk_reply = refusal if refusal is not None else (
            None if last else (250, "2.0.0", f"Ok: {size} octets received"))
        self._mode = _Mode.CHUNK
        early, self._buffer = bytes(self._buffer), bytearray()
        self._feed_chunk(early)
        return None

    def _begin_chunked(self, txn: _Transaction) -> Reply | None:
        """The first BDAT of a transaction: open the message as DATA does."""
        self._abort_incoming()
        try:
            self._open_message(txn, ChunkedBody)
        except TemporaryFailure as failure:
            return (failure.code, failure.status, failure.text)
        txn.chunked = True
        return None

    def _open_message(self, txn: _Transaction,
                      reader: type[DataReader] | type[ChunkedBody]) -> None:
        """Give the transaction a queue file and what every body passes through, DATA or
        BDAT alike: the body reader, the header stage (masquerading) and our Received:
        field. Raises TemporaryFailure (logged) when the queue cannot take a message."""
        try:
            incoming = self.store.incoming()
        except TemporaryFailure as failure:
            _LOG.error(maillog.STORE_FAILED, queue_id="NOQUEUE", client=self._client_label,
                       error=str(failure))
            raise
        self._incoming = incoming
        domains = self.config.masquerade
        self._signing = start_signing(self.config.dkim, self.client, incoming.write)
        self._header_stage = HeaderStage(
            incoming.write if self._signing is None else self._signing.write,
            (lambda header: masquerade_headers(header, domains)) if txn.masquerade else None)
        self._reader = reader(
            self._store_body, max_size=self.config.smtp.max_message_size,
            max_line_length=self.config.smtp.max_line_length,
            normalize_bare_newlines=self.config.smtp.bare_newline == "normalize")
        incoming.write(with_comments(received_header(
            helo=self._helo, client_name=self.client_name, client_address=self.client_address,
            hostname=self.config.hostname, protocol=self._protocol_keyword,
            # The addresses given, not the expansion: a list's members stay private.
            queue_id=incoming.queue_id, recipients=txn.accepted,
            now=self.factory.clock.seconds(),
        ), trace_comments(self._tls, self._auth[0] if self._auth else None)))

    def _discard_chunk(self, data: bytes) -> None:
        pass

    def _chunked_body_feed(self, data: bytes) -> None:
        assert isinstance(self._reader, ChunkedBody)
        self._reader.feed(data)

    def _feed_chunk(self, data: bytes) -> None:
        assert self._chunk is not None
        leftover = self._chunk.feed(data)
        if leftover is None:
            return
        self._mode = _Mode.COMMAND
        self._buffer += leftover
        self._chunk, reply = None, self._chunk_reply
        if reply is not None:
            self._answer(reply)
            return
        assert isinstance(self._reader, ChunkedBody)
        self._reader.finish()
        self._end_of_data()

    # -- STARTTLS and AUTH -------------------------------------------------------------

    def smtp_STARTTLS(self, arg: str) -> Outcome:
        if arg:
            raise SyntaxErrorReply("Syntax: STARTTLS")
        if self._tls_active:
            return (503, "5.5.1", "Error: TLS already active")
        options = self.factory.tls_options
        if options is None:
            return (454, "4.7.0", "TLS not available due to temporary reason")
        self._send(["220 2.0.0 Ready to start TLS"])
        if self._buffer:
            # RFC 3207 §5, CVE-2011-0411: what came after STARTTLS was sent in plaintext,
            # maybe injected by someone in the middle; it must never run inside TLS.
            _LOG.warn(maillog.STARTTLS_PIPELINED, size=len(self._buffer),
                      client=self._client_label)
            del self._buffer[:]
        # RFC 3207 §4.2: back to the state after the greeting; nothing learnt in plaintext
        # (EHLO, a transaction, an authentication) carries over.
        self._helo, self._esmtp, self._transaction, self._sasl, self._auth = (
            "", False, None, None, None)
        assert self.client is not None
        self.client = replace(self.client, authenticated=False)
        self._transport.startTLS(options)
        self._tls_active = True
        return None

    def smtp_AUTH(self, arg: str) -> Outcome:
        if not self._esmtp:
            return (503, "5.5.1", "Error: send EHLO first")
        if not self._auth_offered:
            if self._starttls_offered:
                return (538, "5.7.11", "Encryption required for requested authentication "
                                       "mechanism")
            return (503, "5.5.1", "Error: authentication not enabled")
        if self._auth is not None:
            return (503, "5.5.1", "Error: already authenticated")
        if self._transaction is not None:
            return (503, "5.5.1", "Error: MAIL transaction in progress")
        self._sasl, initial = SaslExchange.start(arg)
        return self._auth_step(initial)

    def _auth_step(self, response: str | None) -> Outcome:
        exchange = self._sasl
        assert exchange is not None
        try:
            step = exchange.step(response)
        except AuthFailed:
            self._sasl = None
            return self._auth_failed("", exchange.mechanism)
        except SMTPReply:
            self._sasl = None
            raise
        if isinstance(step, str):
            return [f"334 {step}"]
        self._sasl = None
        users = self.factory.users
        assert users is not None  # AUTH is not offered without them
        checked = check_password(self.factory.clock, users, step.name, step.password)
        return checked.addCallback(self._authenticated, step.name, exchange.mechanism)

    def _authenticated(self, user: User | None, name: str, mechanism: str
                       ) -> Reply | defer.Deferred[Reply]:
        if user is None:
            return self._auth_failed(name, mechanism)
        assert self.client is not None
        self._auth = (user.name, mechanism)
        self.client = replace(self.client, authenticated=True)
        _LOG.info(maillog.AUTH_OK, client=self._client_label, method=mechanism, user=user.name)
        return (235, "2.7.0", "Authentication successful")

    def _auth_failed(self, name: str, mechanism: str) -> defer.Deferred[Reply]:
        """535 after the delay. The session's input stays paused meanwhile (it is a pending
        reply); the reactor serves every other session. The 535 counts toward MAX_ERRORS."""
        _LOG.info(maillog.AUTH_FAILED, client=self._client_label, method=mechanism,
                  user=_UNPRINTABLE.sub("?", name)[:64])
        failed = AuthFailed()
        delayed: defer.Deferred[Reply] = task.deferLater(
            self.factory.clock, self.config.auth_failure_delay,
            lambda: (failed.code, failed.status, failed.text))
        return delayed


class SMTPServerFactory(ServerFactory):
    """Builds sessions for one kind of listener (`service`: smtp, submission, smtps); the
    connection limits are the admission's (in a worker: the master, across all workers)."""

    noisy = False  # our own connect/disconnect lines say it better

    def __init__(
        self, config: ServerConfig, policy: AcceptancePolicy, store: QueueStore, clock: Any,
        admission: Admission, *, service: str = "smtp",
        on_queued: Callable[[str], None] = lambda queue_id: None,
        names: LocalNames | None = None, tls_options: Any = None,
        users: UserDatabase | None = None, space: FreeSpace | None = None,
        namer: ClientNamer | None = None,
    ) -> None:
        self.config = config
        self.space = space  # free space in the queue's file system, checked at MAIL
        self.namer = namer  # client names by forward-confirmed reverse DNS; None: "unknown"
        # STARTTLS is offered with these (an IOpenSSLServerConnectionCreator, built by
        # relayhub.tls when the worker starts); AUTH is offered with `users`.
        self.tls_options = tls_options
        self.users = users
        self.admission = admission
        self.service = service
        self.sessions: set[SMTPServerProtocol] = set()
        self.names = names  # aliases and users for RCPT expansion, VRFY and EXPN
        self.on_queued = on_queued  # tells the queue manager there is new mail
        self.policy = policy
        self.store = store
        self.clock = clock

    def buildProtocol(self, addr: IAddress | None) -> SMTPServerProtocol:  # type: ignore[override]
        protocol = SMTPServerProtocol(self.config, self.policy, self.store, self.names)
        protocol.factory = self
        return protocol
