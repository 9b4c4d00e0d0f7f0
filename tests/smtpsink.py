"""A configurable SMTP sink for tests: listens on loopback on the tests' reactor and records every
session exactly as it arrived on the wire.

    with SMTPSink(reactor_thread, host="127.0.0.3", rcpt_replies={"bad@x": "550 5.1.1 no"}) as sink:
        ...deliver to sink.host:sink.port...
        [message] = sink.wait_messages(1)
        assert message.body == b"Subject: hi\\r\\n\\r\\nhello\\r\\n"

Replies are configured per command. A reply spec is a string (a multi-line reply is written
with "\\n" between its lines), a list consumed one entry per use (the default follows when it
runs out), or a callable given the command line (or the address, for `rcpt_replies`) that
returns a reply or None for the default. `rcpt_replies` maps an address (case-insensitive) to
a spec, or is itself a callable. `hang` names a stage whose reply is withheld forever
("greeting", "EHLO", "HELO", "STARTTLS", "MAIL", "RCPT", "DATA", "RSET", "QUIT", "body" =
stop reading after 354, "dot" = after the end of data); `drop` names one at which the
connection is closed instead of answering. STARTTLS without a `tls_context` answers
`starttls_reply` and stays in plaintext, like a broken server. Options are plain attributes:
tests may change them between sessions. What is recorded is read through copies taken under a
lock.
"""

from __future__ import annotations

import copy
import datetime
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from conftest import ReactorThread
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from relayhub.smtp.data import DataReader

ReplySpec = str | Sequence[str] | Callable[[str], "str | None"] | None

DEFAULT_EXTENSIONS = ("PIPELINING", "SIZE 10485760", "8BITMIME", "SMTPUTF8", "DSN",
                      "ENHANCEDSTATUSCODES")


@dataclass
class Transaction:
    """One MAIL transaction; `data` and `body` stay None when it never reached DATA."""

    session: int  # connection number, counted from 1
    mail_from: str  # the MAIL line as received
    rcpt_to: list[str] = field(default_factory=list)  # every RCPT line, refused ones too
    accepted: list[str] = field(default_factory=list)  # addresses whose RCPT got a 2xx
    data: bytes | None = None  # wire bytes after the 354, up to and including the final ".\r\n"
    body: bytes | None = None  # `data` with the transparency dots removed and the end cut
    reply: str | None = None  # the reply to the end of data; None when withheld or dropped


@dataclass
class Session:
    number: int
    reads: list[list[str]] = field(default_factory=list)  # command lines per read from the socket
    tls: bool = False
    closed: bool = False

    @property
    def commands(self) -> list[str]:
        return [line for read in self.reads for line in read]


class _Replies:
    """Where the replies to one command come from (see the module docstring)."""

    def __init__(self, spec: ReplySpec) -> None:
        self._spec = spec
        self._queue = deque(spec) if isinstance(spec, Sequence) and not isinstance(spec, str) \
            else None

    def next(self, key: str, default: str) -> str:
        if self._queue is not None:
            return self._queue.popleft() if self._queue else default
        if callable(self._spec):
            return self._spec(key) or default
        return self._spec if isinstance(self._spec, str) else default


class SMTPSink:
    """An SMTP server on `host:port` (port 0: any free one, see `.port`) on the tests' reactor."""

    def __init__(
        self,
        reactor_thread: ReactorThread,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        tls_context: Any = None,
        greeting: str = "220 sink.test ESMTP smtpsink",
        ehlo_reply: str | None = None,
        starttls_reply: str = "220 2.0.0 Ready to start TLS",
        mail_replies: ReplySpec = None,
        rcpt_replies: Mapping[str, ReplySpec] | Callable[[str], str | None] | None = None,
        data_replies: ReplySpec = None,
        hang: str | None = None,
        drop: str | None = None,
        hang_after_dot: bool = False,
    ) -> None:
        self.rt = reactor_thread
        self.host = host
        self.extensions = list(extensions)
        self.tls_context = tls_context
        self.greeting = greeting
        self.ehlo_reply = ehlo_reply
        self.starttls_reply = starttls_reply
        self.mail_replies = _Replies(mail_replies)
        self.data_replies = _Replies(data_replies)
        self._rcpt_by_address = {a.lower(): _Replies(s) for a, s in rcpt_replies.items()} \
            if isinstance(rcpt_replies, Mapping) else {}
        self._rcpt_callable = rcpt_replies if callable(rcpt_replies) else None
        self.hang = "dot" if hang_after_dot else hang
        self.drop = drop
        self._lock = threading.Condition()
        self._sessions: list[Session] = []
        self._transactions: list[Transaction] = []
        self._live: set[_SinkProtocol] = set()
        factory = Factory.forProtocol(lambda: _SinkProtocol(self))
        self._port = reactor_thread.run(
            lambda: reactor_thread.reactor.listenTCP(port, factory, interface=host))
        self.port: int = self._port.getHost().port

    # --- reading what happened (any thread) ---

    def sessions(self) -> list[Session]:
        with self._lock:
            return copy.deepcopy(self._sessions)

    def transactions(self) -> list[Transaction]:
        with self._lock:
            return copy.deepcopy(self._transactions)

    def messages(self) -> list[Transaction]:
        """Transactions whose end of data was answered 2xx: what a real server would deliver."""
        return [t for t in self.transactions() if t.reply and t.reply.startswith("2")]

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._sessions)

    def wait_for(self, predicate: Callable[[SMTPSink], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"sink on {self.host}:{self.port}: condition not met")
                self._lock.wait(remaining)

    def wait_messages(self, count: int, timeout: float = 10.0) -> list[Transaction]:
        self.wait_for(lambda sink: len(sink.messages()) >= count, timeout)
        return self.messages()

    def wait_closed(self, timeout: float = 10.0) -> list[Session]:
        """Wait until every connection so far has been closed."""
        self.wait_for(lambda sink: all(s.closed for s in sink._sessions), timeout)
        return self.sessions()

    # --- lifetime ---

    def close(self) -> None:
        """Stop listening and cut every open connection."""
        def stop() -> Deferred[None]:
            for protocol in list(self._live):
                protocol._tx.abortConnection()
            return self._port.stopListening()  # type: ignore[no-any-return]
        self.rt.run(stop)

    def __enter__(self) -> SMTPSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- called on the reactor thread by the sessions ---

    def _changed(self, change: Callable[[], Any]) -> Any:
        with self._lock:
            result = change()
            self._lock.notify_all()
            return result

    def _rcpt_reply(self, address: str) -> str:
        default = "250 2.1.5 Ok"
        if self._rcpt_callable is not None:
            return self._rcpt_callable(address) or default
        replies = self._rcpt_by_address.get(address.lower())
        return replies.next(address, default) if replies else default


class _SinkProtocol(Protocol):
    """One sink session: commands line by line, DATA raw up to <CRLF>.<CRLF>."""

    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink
        self.buffer = b""
        self.silent = False  # a withheld reply: ignore everything from now on
        self.transaction: Transaction | None = None
        self.reader: DataReader | None = None
        self.raw = bytearray()
        self.body = bytearray()
        self.session = Session(0)

    @property
    def _tx(self) -> Any:
        return self.transport  # ITransport's zope methods are opaque to mypy: keep it dynamic

    def connectionMade(self) -> None:
        sink = self.sink
        sink._live.add(self)

        def add() -> Session:
            session = Session(len(sink._sessions) + 1)
            sink._sessions.append(session)
            return session
        self.session = sink._changed(add)
        if not self._held("greeting"):
            self.reply(sink.greeting)

    def connectionLost(self, reason: Any = None) -> None:
        self.sink._live.discard(self)
        self.sink._changed(lambda: setattr(self.session, "closed", True))

    def reply(self, text: str) -> None:
        self._tx.write(text.replace("\n", "\r\n").encode() + b"\r\n")

    def _held(self, stage: str) -> bool:
        """Withhold the reply at `stage` (hang) or close instead of giving it (drop)."""
        if (self.sink.hang or "").upper() == stage.upper():
            self.silent = True
        elif (self.sink.drop or "").upper() == stage.upper():
            self.silent = True
            self._tx.loseConnection()
        return self.silent

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        lines: list[str] = []
        while self.buffer and not self.silent:
            if self.reader is not None:
                chunk, self.buffer = self.buffer, b""
                rest = self.reader.feed(chunk)
                self.raw += chunk if rest is None else chunk[:len(chunk) - len(rest)]
                if rest is not None:
                    self.buffer = rest
                    self._end_of_data()
                continue
            line, found, self.buffer = self.buffer.partition(b"\n")
            if not found:
                self.buffer = line
                break
            lines.append(line.removesuffix(b"\r").decode("utf-8", "replace"))
            self._command(lines[-1])
        if lines:
            self.sink._changed(lambda: self.session.reads.append(lines))

    def _command(self, line: str) -> None:
        sink = self.sink
        verb = line.split(" ", 1)[0].upper()
        if self._held(verb):
            return
        if verb == "EHLO":
            self.transaction = None
            texts = ["sink.test", *(e for e in sink.extensions
                                    if not (e == "STARTTLS" and self.session.tls))]
            self.reply(sink.ehlo_reply or "\n".join(
                f"250{'-' if i < len(texts) - 1 else ' '}{text}" for i, text in enumerate(texts)))
        elif verb == "HELO":
            self.transaction = None
            self.reply("250 sink.test")
        elif verb == "STARTTLS":
            if self.session.tls:
                self.reply("454 4.7.0 TLS already active")
                return
            self.reply(sink.starttls_reply)
            if sink.starttls_reply.startswith("2") and sink.tls_context is not None:
                self.buffer = b""  # RFC 3207 §5: nothing sent before the handshake counts
                self.transaction = None
                self._tx.startTLS(sink.tls_context)
                sink._changed(lambda: setattr(self.session, "tls", True))
        elif verb == "MAIL":
            reply = sink.mail_replies.next(line, "250 2.1.0 Ok")
            if reply.startswith("2"):
                txn = self.transaction = Transaction(self.session.number, line)
                sink._changed(lambda: sink._transactions.append(txn))
            self.reply(reply)
        elif verb == "RCPT":
            if self.transaction is None:
                self.reply("503 5.5.1 Error: need MAIL command")
                return
            address = line.partition("<")[2].partition(">")[0]
            reply = sink._rcpt_reply(address)
            txn = self.transaction

            def record() -> None:
                txn.rcpt_to.append(line)
                if reply.startswith("2"):
                    txn.accepted.append(address)
            sink._changed(record)
            self.reply(reply)
        elif verb == "DATA":
            if self.transaction is None or not self.transaction.accepted:
                self.reply("554 5.5.1 Error: no valid recipients")
                return
            if self._held("body"):
                self._tx.pauseProducing()
            self.raw, self.body = bytearray(), bytearray()
            self.reader = DataReader(self.body.extend, max_size=1 << 40, max_line_length=1 << 40)
            self.reply("354 End data with <CR><LF>.<CR><LF>")
        elif verb == "RSET":
            self.transaction = None
            self.reply("250 2.0.0 Ok")
        elif verb == "NOOP":
            self.reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            self._tx.loseConnection()
        else:
            self.reply("502 5.5.2 Error: command not recognized")

    def _end_of_data(self) -> None:
        assert self.reader is not None and self.transaction is not None
        txn, bare_newline = self.transaction, self.reader.defects.bare_newline
        self.reader, self.transaction = None, None
        held = self._held("dot")
        reply = None if held else "550 5.5.2 Bare newline in DATA" if bare_newline else \
            self.sink.data_replies.next(txn.mail_from, "250 2.0.0 Ok: queued")

        def record() -> None:
            txn.data, txn.body, txn.reply = bytes(self.raw), bytes(self.body), reply
        self.sink._changed(record)
        if reply is not None:
            self.reply(reply)


class TestCA:
    """A throw-away certificate authority issuing server certificates for STARTTLS tests."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "relayhub test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._name = subject
        self._cert = (
            self._builder(subject, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    def _builder(self, subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self._name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1)))

    @property
    def trust_root(self) -> Any:
        """For `optionsForClientTLS(trustRoot=...)` (and `TLSPolicy.trust_root`)."""
        pem = self._cert.public_bytes(serialization.Encoding.PEM)
        return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem)])

    def server_context(self, *dns_names: str) -> Any:
        """Server TLS options with a certificate for `dns_names`, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
        cert = (
            self._builder(subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        return ssl.PrivateCertificate.loadPEM(pem).options()
