"""The outbound SMTP client against real SMTP sinks on loopback, and the DATA encoder."""

from __future__ import annotations

import io
import itertools
import re
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import pytest
from conftest import ReactorThread
from hypothesis import given
from hypothesis import strategies as st
from smtpsink import SMTPSink, TestCA
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError

from relayhub.delivery.results import AttemptResult, Outcome
from relayhub.smtp.client import (
    ClientProtocol,
    OutboundBody,
    OutboundMessage,
    OutboundRecipient,
    Reply,
    SessionResult,
    Timeouts,
    TLSPolicy,
    deliver_session,
    parse_ehlo,
    parse_reply_line,
)
from relayhub.smtp.data import DataReader
from relayhub.smtp.encoder import DotStuffer, LineEndEncoder

FAST = Timeouts(*([5.0] * 9))
PLAIN = TLSPolicy("none")
ALL_EXTENSIONS = ("PIPELINING", "SIZE 10000000", "8BITMIME", "SMTPUTF8", "DSN",
                  "ENHANCEDSTATUSCODES")
BODY = b"Subject: test\r\n\r\nHello.\r\n"


# --- the encoder ---------------------------------------------------------------------------

def encode(chunks: Sequence[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.encode(c) for c in chunks) + stuffer.finish()


def normalise(body: bytes) -> bytes:
    crlf = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    return crlf if crlf.endswith(b"\r\n") or not crlf else crlf + b"\r\n"


@pytest.mark.parametrize(("chunks", "wire"), [
    ([b""], b".\r\n"),
    ([b".hidden\r\n"], b"..hidden\r\n.\r\n"),
    ([b"a\r\n", b".\r\n", b"b"], b"a\r\n..\r\nb\r\n.\r\n"),
    ([b"a\r", b"\n.b\r\n"], b"a\r\n..b\r\n.\r\n"),  # CRLF split across chunks
    ([b"a\r", b"", b"\n", b"."], b"a\r\n..\r\n.\r\n"),
    ([b"a\n.\nb\r.\r"], b"a\r\n..\r\nb\r\n..\r\n.\r\n"),  # bare LF and CR become CRLF
    ([b"a\r\r\n"], b"a\r\n\r\n.\r\n"),  # never the \r\r\n Twisted sends
])
def test_dot_stuffer_examples(chunks: list[bytes], wire: bytes) -> None:
    assert encode(chunks) == wire


@given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\r\n.", b".\r\n"]),
                max_size=40).map(b"".join),
       st.lists(st.integers(min_value=0, max_value=60), max_size=8))
def test_dot_stuffer_round_trips_through_our_reader(body: bytes, cuts: list[int]) -> None:
    bounds = [0, *sorted(c for c in cuts if c <= len(body)), len(body)]
    wire = encode([body[a:b] for a, b in itertools.pairwise(bounds)])
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", wire)
    received: list[bytes] = []
    reader = DataReader(received.append, max_size=1 << 20, max_line_length=1 << 20)
    rests = [reader.feed(wire[i:i + 7]) for i in range(0, len(wire), 7)]
    assert rests[:-1] == [None] * (len(rests) - 1) and rests[-1] == b""  # ends exactly at the end
    assert b"".join(received) == normalise(body)
    assert not reader.defects.any


@given(st.lists(st.sampled_from([b"\r\n", b".", b"x", b"\r\n.", b".\r\n", b"\xff"]),
                max_size=40).map(b"".join),
       st.lists(st.integers(min_value=0, max_value=80), max_size=8))
def test_a_body_known_to_be_crlf_only_goes_out_the_same_unchecked(body: bytes,
                                                                 cuts: list[int]) -> None:
    # crlf_only skips the line-end check; for such a body (in any chunking, a CRLF split
    # between chunks included) the wire bytes must be exactly those of the checking path,
    # for DATA (dot-stuffed) and for BDAT (LineEndEncoder alone).
    bounds = [0, *sorted(c for c in cuts if c <= len(body)), len(body)]
    chunks = [body[a:b] for a, b in itertools.pairwise(bounds)]
    for make in (DotStuffer, LineEndEncoder):
        checked, trusted = make(), make(crlf_only=True)
        assert (b"".join(map(checked.encode, chunks)) + checked.finish()
                == b"".join(map(trusted.encode, chunks)) + trusted.finish())


# --- pure reply parsing --------------------------------------------------------------------

def test_reply_parsing() -> None:
    assert parse_reply_line(b"250-PIPELINING\r") == (250, False, "PIPELINING")
    assert parse_reply_line(b"354") == (354, True, "")
    assert parse_reply_line(b"550 5.1.1 bad\x00\x1b") == (550, True, "5.1.1 bad??")
    for bad in (b"25 ok", b"250x", b"650 no", b"hello"):
        with pytest.raises(ValueError):
            parse_reply_line(bad)
    ehlo = parse_ehlo(Reply(250, ("mx.test hi", "pipelining", "SIZE 1000", "DSN", "")))
    assert ehlo.keywords == {"PIPELINING", "SIZE", "DSN"} and ehlo.size_limit == 1000
    assert parse_ehlo(Reply(250, ("mx.test", "SIZE"))).size_limit is None
    assert Reply(550, ("5.1.1 no",)).status == "5.1.1"
    assert Reply(550, ("4.1.1 class mismatch",)).status == "5.0.0"
    assert Reply(451, ("try later",)).status == "4.0.0"


# --- sessions against sinks ----------------------------------------------------------------

@dataclass
class Body:
    """A message body as the queue would offer it, remembering how it was opened."""

    data: bytes = BODY
    crlf_only: bool = False  # offered as known to have CRLF line ends only
    opened: list[bool] = field(default_factory=list)  # the eight_bit_ok argument of each call
    files: list[io.BytesIO] = field(default_factory=list)

    def open(self, eight_bit_ok: bool) -> Deferred[OutboundBody]:
        self.opened.append(eight_bit_ok)
        self.files.append(io.BytesIO(self.data))
        return succeed(OutboundBody(self.files[-1], self.crlf_only))


def message(*recipients: str | OutboundRecipient, body: Body | None = None,
            **fields: Any) -> OutboundMessage:
    body = body or Body()
    rcpts = tuple(r if isinstance(r, OutboundRecipient) else OutboundRecipient(r)
                  for r in recipients or ("rcpt@example.net",))
    fields = {"queue_id": "Q1", "sender": "sender@example.org", "size": len(body.data), **fields}
    return OutboundMessage(recipients=rcpts, open_body=body.open, **fields)


def deliver(rt: ReactorThread, sink: SMTPSink, *messages: OutboundMessage,
            tls: TLSPolicy = PLAIN, timeouts: Timeouts = FAST, port: int | None = None
            ) -> SessionResult:
    session = rt.run(deliver_session, rt.reactor, host="sink.test", address=sink.host,
                     port=port or sink.port, messages=messages, helo_name="hub.test", tls=tls,
                     timeouts=timeouts)
    return cast(SessionResult, session)  # ReactorThread.run waits for the Deferred


def only(result: SessionResult) -> AttemptResult:
    [[attempt]] = result.results
    return attempt


@pytest.fixture(autouse=True)
def no_timer_left_behind(reactor_thread: ReactorThread) -> Iterator[None]:
    """Every session cancels its timers: none of ours may still be scheduled afterwards."""
    yield

    def ours() -> list[Any]:
        return [c for c in reactor_thread.reactor.getDelayedCalls()
                if isinstance(getattr(c.func, "__self__", None), ClientProtocol)
                or getattr(c.func, "__name__", "") == "abortConnection"]
    assert reactor_thread.run(ours) == []


@pytest.fixture
def sink(reactor_thread: ReactorThread) -> Iterator[SMTPSink]:
    with SMTPSink(reactor_thread, "127.0.0.3", extensions=ALL_EXTENSIONS) as running:
        yield running


def test_plain_delivery(reactor_thread: ReactorThread, sink: SMTPSink) -> None:
    body = Body()
    result = deliver(reactor_thread, sink, message("rcpt@example.net", body=body))
    assert result.connected and result.reached_transaction
    assert only(result) == AttemptResult(
        "rcpt@example.net", Outcome.DELIVERED, "2.0.0", "250 2.0.0 Ok: queued",
        relay=f"sink.test[127.0.0.3]:{sink.port}", remote_mta="sink.test", remote_reply=True)
    [received] = sink.messages()
    assert received.body == BODY and received.accepted == ["rcpt@example.net"]
    assert received.mail_from == f"MAIL FROM:<sender@example.org> SIZE={len(BODY)}"
    assert body.opened == [True] and all(f.closed for f in body.files)
    [session] = sink.wait_closed()
    assert session.commands[0] == "EHLO hub.test" and session.commands[-1] == "QUIT"


def test_pipelining_used_only_when_offered(reactor_thread: ReactorThread) -> None:
    for offered in (True, False):
        extensions = ALL_EXTENSIONS if offered else ("8BITMIME", "ENHANCEDSTATUSCODES")
        with SMTPSink(reactor_thread, "127.0.0.3", extensions=extensions) as sink:
            result = deliver(reactor_thread, sink, message("a@example.net", "b@example.net"))
            assert [r.outcome for r in result.results[0]] == [Outcome.DELIVERED] * 2
            reads = sink.wait_closed()[0].reads
        envelope = ["MAIL FROM:<sender@example.org>", "RCPT TO:<a@example.net>",
                    "RCPT TO:<b@example.net>", "DATA"]
        if offered:
            assert [line.split(" SIZE=")[0] for line in reads[1]] == envelope
        else:
            assert reads[1:5] == [[line] for line in envelope]


def test_helo_fallback(reactor_thread: ReactorThread) -> None:
    with SMTPSink(reactor_thread, "127.0.0.3", ehlo_reply="502 5.5.1 EHLO not here") as sink:
        result = deliver(reactor_thread, sink, message(size=123, body_type="8BITMIME"))
        assert only(result).outcome is Outcome.DELIVERED
        commands = sink.wait_closed()[0].commands
    assert commands[:3] == ["EHLO hub.test", "HELO hub.test", "MAIL FROM:<sender@example.org>"]


def test_each_recipient_reply_is_honoured(reactor_thread: ReactorThread) -> None:
    replies = {"bad@example.net": "550 5.1.1 <bad@example.net>: no such user",
               "later@example.net": "450-4.2.1 mailbox busy\n450 4.2.1 come back later"}
    with SMTPSink(reactor_thread, "127.0.0.3", rcpt_replies=replies) as sink:
        result = deliver(reactor_thread, sink,
                         message("bad@example.net", "good@example.net", "later@example.net"))
        [received] = sink.messages()
    bad, good, later = result.results[0]
    assert (bad.outcome, bad.status, bad.text) == (
        Outcome.BOUNCED, "5.1.1", "550 5.1.1 <bad@example.net>: no such user")
    assert bad.remote_reply and bad.remote_mta == "sink.test"
    assert (later.outcome, later.status) == (Outcome.DEFERRED, "4.2.1")
    assert later.text == "450 4.2.1 mailbox busy 4.2.1 come back later"
    assert good.outcome is Outcome.DELIVERED
    assert received.accepted == ["good@example.net"]


@pytest.mark.parametrize("pipelining", [True, False])
def test_nobody_accepted_means_no_data_and_a_reset(reactor_thread: ReactorThread,
                                                   pipelining: bool) -> None:
    extensions = ("PIPELINING",) if pipelining else ()
    with SMTPSink(reactor_thread, "127.0.0.3", extensions=extensions,
                  rcpt_replies={"bad@example.net": "550 5.1.1 no"}) as sink:
        result = deliver(reactor_thread, sink, message("bad@example.net"),
                         message("good@example.net", queue_id="Q2"))
        commands = sink.wait_closed()[0].commands
        assert [t.accepted for t in sink.messages()] == [["good@example.net"]]
    assert [[r.outcome for r in m] for m in result.results] == [[Outcome.BOUNCED],
                                                                [Outcome.DELIVERED]]
    first = commands[1:commands.index("RSET")]
    assert ("DATA" in first) is pipelining  # pipelined DATA is sent, and refused by the sink
    assert commands.index("RSET") < commands.index("MAIL FROM:<sender@example.org>", 2)


def test_refused_sender_bounces_all(reactor_thread: ReactorThread) -> None:
    with SMTPSink(reactor_thread, "127.0.0.3", extensions=(),
                  mail_replies=["553 5.7.1 sender rejected"]) as sink:
        result = deliver(reactor_thread, sink, message("a@example.net", "b@example.net"),
                         message("c@example.net"))
        commands = sink.wait_closed()[0].commands
    assert [(r.outcome, r.status) for r in result.results[0]] == [(Outcome.BOUNCED, "5.7.1")] * 2
    assert result.results[1][0].outcome is Outcome.DELIVERED
    assert commands[1:4] == ["MAIL FROM:<sender@example.org>", "RSET",
                             "MAIL FROM:<sender@example.org>"]


def test_temporary_failure_after_dot_defers(reactor_thread: ReactorThread) -> None:
    with SMTPSink(reactor_thread, "127.0.0.3", data_replies=["451 4.3.0 try again later"]
                  ) as sink:
        result = deliver(reactor_thread, sink, message("a@example.net", "b@example.net"))
    assert [(r.outcome, r.status, r.text) for r in result.results[0]] == [
        (Outcome.DEFERRED, "4.3.0", "451 4.3.0 try again later")] * 2


@pytest.mark.parametrize("how", ["drop", "hang"])
def test_lost_reply_after_dot_defers_and_never_resends(reactor_thread: ReactorThread,
                                                       how: str) -> None:
    with SMTPSink(reactor_thread, "127.0.0.3", hang="dot" if how == "hang" else None,
                  drop="dot" if how == "drop" else None) as sink:
        result = deliver(reactor_thread, sink, message("a@example.net"),
                         message("b@example.net", queue_id="Q2"),
                         timeouts=replace(FAST, dot=0.5))
        sink.wait_closed()
        [transaction] = sink.transactions()
        assert sink.connections == 1
    assert transaction.body == BODY and transaction.reply is None
    [[first], [second]] = result.results
    assert (first.outcome, first.status) == (Outcome.DEFERRED, "4.4.2")
    assert "reply was lost" in first.text and "not sent again" in first.text
    assert ("timed out" in first.text) is (how == "hang")
    assert (second.outcome, second.status) == (Outcome.DEFERRED, "4.4.2")


def test_size_limit_bounces_without_sending(reactor_thread: ReactorThread) -> None:
    with SMTPSink(reactor_thread, "127.0.0.3", extensions=["SIZE 1000"]) as sink:
        body = Body(b"x" * 1500 + b"\r\n")
        result = deliver(reactor_thread, sink, message(body=body), message(queue_id="Q2"))
        commands = sink.wait_closed()[0].commands
    big = result.results[0][0]
    assert (big.outcome, big.status) == (Outcome.BOUNCED, "5.3.4")
    assert "1502 exceeds size limit 1000" in big.text and body.opened == []
    assert result.results[1][0].outcome is Outcome.DELIVERED
    assert [c for c in commands if c.startswith("MAIL")] == [
        f"MAIL FROM:<sender@example.org> SIZE={len(BODY)}"]


def test_smtputf8_to_a_hop_without_it_bounces(reactor_thread: ReactorThread) -> None:
    with SMTPSink(reactor_thread, "127.0.0.3", extensions=["8BITMIME"]) as sink:
        result = deliver(reactor_thread, sink, message("jörg@example.net", smtputf8=True))
        assert not [c for c in sink.wait_closed()[0].commands if c.startswith("MAIL")]
    assert (only(result).outcome, only(result).status) == (Outcome.BOUNCED, "5.6.7")
    assert "SMTPUTF8 is required, but was not offered by host" in only(result).text


def test_mail_parameters(reactor_thread: ReactorThread, sink: SMTPSink) -> None:
    body = Body(b"Subject: caf\xc3\xa9\r\n\r\n\xc3\xa9\r\n")
    deliver(reactor_thread, sink, message("jörg@example.net", body=body, body_type="8BITMIME",
                                          smtputf8=True))
    assert sink.messages()[0].mail_from == (
        f"MAIL FROM:<sender@example.org> SIZE={len(body.data)} BODY=8BITMIME SMTPUTF8")
    assert body.opened == [True]
    with SMTPSink(reactor_thread, "127.0.0.3", extensions=()) as plain:
        deliver(reactor_thread, plain, message(body=body, body_type="8BITMIME"))
        assert plain.messages()[0].mail_from == "MAIL FROM:<sender@example.org>"
    assert body.opened == [True, False]  # the caller is asked for a 7-bit body


def test_dsn_parameters_only_when_offered(reactor_thread: ReactorThread) -> None:
    rcpt = OutboundRecipient("b@example.net", notify=("SUCCESS", "FAILURE"),
                             orcpt="rfc822;b+x=y@example.net")
    quiet = OutboundRecipient("c@example.net", notify=("NEVER",))
    dsn_message = message(rcpt, quiet, ret="HDRS", envid="id 1+2", sender="")
    with SMTPSink(reactor_thread, "127.0.0.3", extensions=["DSN"]) as sink:
        result = deliver(reactor_thread, sink, dsn_message)
        [received] = sink.messages()
    assert received.mail_from == "MAIL FROM:<> RET=HDRS ENVID=id+201+2B2"
    assert received.rcpt_to == [
        "RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx+3Dy@example.net",
        "RCPT TO:<c@example.net> NOTIFY=NEVER"]
    assert not any(r.dsn_relayed for r in result.results[0])
    with SMTPSink(reactor_thread, "127.0.0.3", extensions=["PIPELINING"]) as sink:
        result = deliver(reactor_thread, sink, dsn_message)
        [received] = sink.messages()
    assert received.mail_from == "MAIL FROM:<>"
    assert received.rcpt_to == ["RCPT TO:<b@example.net>", "RCPT TO:<c@example.net>"]
    assert [r.dsn_relayed for r in result.results[0]] == [True, False]


def test_two_messages_share_one_connection(reactor_thread: ReactorThread,
                                           sink: SMTPSink) -> None:
    result = deliver(reactor_thread, sink, message("a@example.net"),
                     message("b@example.net", queue_id="Q2", body=Body(b"second\r\n")))
    assert [[r.outcome for r in m] for m in result.results] == [[Outcome.DELIVERED]] * 2
    assert [m.body for m in sink.messages()] == [BODY, b"second\r\n"]
    [session] = sink.wait_closed()
    assert "RSET" not in session.commands


@pytest.mark.parametrize(("newline", "crlf_only"),
                         [(b"\r\n", False), (b"\r\n", True), (b"\n", False)])
def test_dots_on_every_chunk_boundary_arrive_intact(
        reactor_thread: ReactorThread, sink: SMTPSink, newline: bytes, crlf_only: bool) -> None:
    # The smuggling probe: a "." line straddling every 16 KiB boundary (and so every
    # 64 KiB chunk of ours), a first line starting with ".", and commands after each "." that
    # would run if the data ended early.
    boundaries = range(16384, 6 * 16384 + 1, 16384)
    body = b".first line" + newline
    for boundary in boundaries:
        lines, rest = divmod(boundary - len(newline) - len(body), 80)
        body += (b"x" * 78 + b"\r\n") * lines + b"x" * rest
        body += newline + b"." + newline + b"RSET\r\nMAIL FROM:<evil@example.com>\r\n"
    body += b"last"
    assert all(body[b - len(newline):b + 1 + len(newline)] == newline + b"." + newline
               for b in boundaries)
    # crlf_only: offered as the queue offers a body it measured at acceptance.
    result = deliver(reactor_thread, sink, message(body=Body(body, crlf_only)))
    assert only(result).outcome is Outcome.DELIVERED
    [received] = sink.messages()
    assert received.body == normalise(body) and received.data is not None
    assert received.data.startswith(b"..first line\r\n")
    assert received.data.endswith(b"last\r\n.\r\n")
    [session] = sink.wait_closed()
    assert [c.split()[0] for c in session.commands] == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


def test_bare_line_ends_go_out_as_crlf(reactor_thread: ReactorThread, sink: SMTPSink) -> None:
    result = deliver(reactor_thread, sink, message(body=Body(b"a\nb\rc\r\n.\nend")))
    assert only(result).outcome is Outcome.DELIVERED
    [received] = sink.messages()
    assert received.data == b"a\r\nb\r\nc\r\n..\r\nend\r\n.\r\n"
    assert received.body == b"a\r\nb\r\nc\r\n.\r\nend\r\n"


def test_connection_refused(reactor_thread: ReactorThread, sink: SMTPSink) -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.3", 0))
        port = probe.getsockname()[1]
    result = deliver(reactor_thread, sink, message("a@example.net", "b@example.net"), port=port)
    assert not result.connected and not result.reached_transaction
    assert [(r.outcome, r.status, r.text) for r in result.results[0]] == [
        (Outcome.DEFERRED, "4.4.1",
         f"connect to sink.test[127.0.0.3]:{port}: Connection refused")] * 2


def test_connect_timeout(reactor_thread: ReactorThread, sink: SMTPSink) -> None:
    # A listener with a full backlog: the kernel drops further SYNs, so connect() hangs.
    with socket.socket() as full, socket.socket() as filler:
        full.bind(("127.0.0.3", 0))
        full.listen(0)
        filler.connect(full.getsockname())
        result = deliver(reactor_thread, sink, message(), port=full.getsockname()[1],
                         timeouts=replace(FAST, connect=0.3))
    assert (only(result).status, result.connected) == ("4.4.1", False)
    assert only(result).text.endswith(": Connection timed out")


@pytest.mark.parametrize(("stage", "timeout", "words"), [
    ("greeting", "greeting", "receiving the initial server greeting"),
    ("EHLO", "helo", "performing the EHLO handshake"),
    ("MAIL", "mail", "sending MAIL FROM"),
    ("RCPT", "rcpt", "sending RCPT TO"),
    ("DATA", "data", "sending DATA"),
    ("body", "block", "sending the body"),
    ("dot", "dot", "waiting for the reply to the end of data"),
])
def test_every_stage_times_out(reactor_thread: ReactorThread, stage: str, timeout: str,
                               words: str) -> None:
    # Without pipelining each command waits for its own reply. The body must outgrow the
    # socket buffers before a sink that stopped reading can stall the writer.
    body = Body((b"z" * 1022 + b"\r\n") * (16384 if stage == "body" else 1))
    with SMTPSink(reactor_thread, "127.0.0.3", extensions=(), hang=stage) as sink:
        result = deliver(reactor_thread, sink, message(body=body),
                         timeouts=replace(FAST, **{timeout: 0.3}))
    attempt = only(result)
    assert (attempt.outcome, attempt.status) == (Outcome.DEFERRED, "4.4.2")
    assert attempt.text.startswith(
        f"conversation with sink.test[127.0.0.3]:{sink.port} timed out while {words}")
    assert result.reached_transaction is (stage not in ("greeting", "EHLO"))
    assert all(f.closed for f in body.files)


def test_quit_reply_is_not_awaited_long(reactor_thread: ReactorThread) -> None:
    with SMTPSink(reactor_thread, "127.0.0.3", hang="QUIT") as sink:
        result = deliver(reactor_thread, sink, message(), timeouts=replace(FAST, quit=0.3))
        assert only(result).outcome is Outcome.DELIVERED
        sink.wait_closed()


def test_refused_greeting_defers_for_the_next_mx(reactor_thread: ReactorThread) -> None:
    with SMTPSink(reactor_thread, "127.0.0.3", greeting="554 5.7.1 go away") as sink:
        result = deliver(reactor_thread, sink, message())
        assert "QUIT" in sink.wait_closed()[0].commands
    assert (result.connected, result.reached_transaction) == (True, False)
    assert (only(result).outcome, only(result).status, only(result).text) == (
        Outcome.DEFERRED, "4.7.1", "554 5.7.1 go away")


def test_malformed_reply_defers(reactor_thread: ReactorThread) -> None:
    with SMTPSink(reactor_thread, "127.0.0.3", greeting="hello, I am not SMTP") as sink:
        result = deliver(reactor_thread, sink, message())
    assert (only(result).status, only(result).text) == (
        "4.5.0", f"sink.test[127.0.0.3]:{sink.port} sent a malformed reply while receiving the"
        " initial server greeting: b'hello, I am not SMTP'")


def test_421_defers_the_rest(reactor_thread: ReactorThread) -> None:
    with SMTPSink(reactor_thread, "127.0.0.3",
                  rcpt_replies={"b@example.net": "421 4.3.2 shutting down"}) as sink:
        result = deliver(reactor_thread, sink, message("a@example.net", "b@example.net"),
                         message("c@example.net", queue_id="Q2"))
        session = sink.wait_closed()[0]
    assert [[(r.outcome, r.text) for r in m] for m in result.results] == [
        [(Outcome.DEFERRED, "421 4.3.2 shutting down")] * 2,
        [(Outcome.DEFERRED, "421 4.3.2 shutting down")]]
    assert "QUIT" not in session.commands and len(sink.transactions()) == 1


def test_ipv6(reactor_thread: ReactorThread) -> None:
    try:
        sink = SMTPSink(reactor_thread, "::1")
    except CannotListenError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with sink:
        result = deliver(reactor_thread, sink, message())
    assert only(result).outcome is Outcome.DELIVERED
    assert only(result).relay == f"sink.test[::1]:{sink.port}"


# --- STARTTLS ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def tls_sink(rt: ReactorThread, ca: TestCA, *names: str, **options: Any) -> SMTPSink:
    return SMTPSink(rt, "127.0.0.3", extensions=(*ALL_EXTENSIONS, "STARTTLS"),
                    tls_context=ca.server_context(*names), **options)


def test_opportunistic_tls_is_used_and_recorded(reactor_thread: ReactorThread,
                                                ca: TestCA) -> None:
    # The certificate is for another name and from an unknown CA: opportunistic TLS
    # encrypts anyway.
    with tls_sink(reactor_thread, TestCA(), "elsewhere.test") as sink:
        result = deliver(reactor_thread, sink, message(), tls=TLSPolicy("opportunistic"))
        [session] = sink.wait_closed()
        assert sink.messages()[0].body == BODY
    assert only(result).outcome is Outcome.DELIVERED
    assert re.fullmatch(r"TLSv1\.[23] \S+", only(result).tls or "")
    assert session.tls and session.reads[1:3] == [["STARTTLS"], ["EHLO hub.test"]]


def test_verify_rejects_a_certificate_for_another_name(reactor_thread: ReactorThread,
                                                       ca: TestCA) -> None:
    with tls_sink(reactor_thread, ca, "other.test") as sink:
        result = deliver(reactor_thread, sink, message(), tls=TLSPolicy("verify", ca.trust_root))
        assert sink.transactions() == []
    assert (only(result).outcome, only(result).status) == (Outcome.DEFERRED, "4.7.5")
    assert only(result).text == (f"TLS handshake failed with sink.test[127.0.0.3]:{sink.port}:"
                                 " certificate does not match sink.test")
    assert not result.reached_transaction


def test_verify_rejects_an_unknown_ca(reactor_thread: ReactorThread, ca: TestCA) -> None:
    with tls_sink(reactor_thread, TestCA("another CA"), "sink.test") as sink:
        result = deliver(reactor_thread, sink, message(), tls=TLSPolicy("verify", ca.trust_root))
        assert sink.transactions() == []
    assert (only(result).status, only(result).text.endswith("certificate verify failed")) == (
        "4.7.5", True)


def test_verify_accepts_the_right_name(reactor_thread: ReactorThread, ca: TestCA) -> None:
    with tls_sink(reactor_thread, ca, "mx.example.net") as sink:
        result = deliver(reactor_thread, sink, message(),
                         tls=TLSPolicy("verify", ca.trust_root, server_name="mx.example.net"))
    assert only(result).outcome is Outcome.DELIVERED and only(result).tls


def test_required_tls_not_offered(reactor_thread: ReactorThread, sink: SMTPSink) -> None:
    result = deliver(reactor_thread, sink, message(), tls=TLSPolicy("required"))
    assert (only(result).outcome, only(result).status) == (Outcome.DEFERRED, "4.7.4")
    assert only(result).text.startswith("TLS is required, but was not offered by host")
    assert not sink.transactions()


def test_opportunistic_tls_refused_goes_on_in_plaintext(reactor_thread: ReactorThread,
                                                        ca: TestCA) -> None:
    with tls_sink(reactor_thread, ca, "sink.test", starttls_reply="454 4.7.0 not now") as sink:
        result = deliver(reactor_thread, sink, message(), tls=TLSPolicy("opportunistic"))
    assert only(result).outcome is Outcome.DELIVERED and only(result).tls is None


def test_opportunistic_handshake_failure_defers(reactor_thread: ReactorThread) -> None:
    # A server that says 220 to STARTTLS but never speaks TLS.
    with SMTPSink(reactor_thread, "127.0.0.3", extensions=["STARTTLS"]) as sink:
        result = deliver(reactor_thread, sink, message(), tls=TLSPolicy("opportunistic"))
        assert sink.transactions() == []
    assert (only(result).outcome, only(result).status) == (Outcome.DEFERRED, "4.7.5")
    assert only(result).text.startswith("TLS handshake failed with ")
    assert (result.connected, result.reached_transaction) == (True, False)


def test_replies_injected_before_the_tls_handshake_are_dropped(reactor_thread: ReactorThread,
                                                               ca: TestCA) -> None:
    # A plaintext "250" sent along with the 220 (STARTTLS response injection) must not be
    # read as the reply to the EHLO inside TLS: that would desynchronise every later reply.
    body = Body((b"a" * 998 + b"\r\n") * 4000)  # and a body that makes the TLS layer push back
    with tls_sink(reactor_thread, ca, "sink.test",
                  starttls_reply="220 2.0.0 go ahead\n250 injected") as sink:
        result = deliver(reactor_thread, sink, message(body=body), tls=TLSPolicy("opportunistic"))
        [session] = sink.wait_closed()
        assert [m.body for m in sink.messages()] == [body.data]
    assert only(result).outcome is Outcome.DELIVERED and only(result).tls
    assert [c.split()[0] for c in session.reads[3]] == ["MAIL", "RCPT", "DATA"]
