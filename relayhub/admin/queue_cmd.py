"""`relayhubctl queue ...`: list, show and change the mail queue (SPEC §8), with or without a
running daemon."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import replace
from email import policy as email_policy
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

from twisted.internet import defer, error
from twisted.internet.task import react
from twisted.protocols import amp
from twisted.python.failure import Failure

from relayhub import control
from relayhub.admin.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands, add_command
from relayhub.config import Settings, load_settings, parse_duration
from relayhub.queue.backends import STORE_ERRORS, open_store
from relayhub.queue.ids import is_queue_id
from relayhub.queue.sqlite import SQLiteQueueStore
from relayhub.queue.store import (
    Changed,
    HistoryEntry,
    MessageFilter,
    QueueStore,
    QueueSummary,
    RecipientStatus,
    Selection,
    StoredMessage,
    StoredRecipient,
    normalize_domain,
)

Main = Callable[[Any], Coroutine[Any, Any, int]]

# How long relayhubctl waits for a daemon to answer on the control socket.
CONTROL_TIMEOUT = 10.0
# The most of a body file read for `queue show` headers: a header section is never longer.
HEADER_LIMIT = 1024 * 1024
# Terminal control characters in a subject or address must not reach the administrator's
# terminal as they are (escape sequences); they are shown as \xNN.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


class QueueUnavailable(Exception):
    """The queue cannot be used (permissions, a newer schema, no queue yet for a change)."""


class DaemonUnreachable(Exception):
    """Something listens on the control socket but gives no usable answer."""


# -- running a command: settings, reactor, store, daemon ---------------------------------


def run(main: Main) -> int:
    """Run `main(reactor)` under twisted's `react` and return its exit status."""
    status: list[int] = []

    def start(reactor: Any) -> defer.Deferred[None]:
        done = defer.Deferred.fromCoroutine(main(reactor)).addCallback(status.append)

        def failed(failure: Failure) -> None:
            if failure.check(QueueUnavailable):
                say_error(str(failure.value))
            elif failure.check(BrokenPipeError):  # `relayhubctl queue list | head`
                # Python's own advice: point stdout at devnull so the exit flush is quiet.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            else:  # a bug: show it whole
                failure.printTraceback(file=sys.stderr)

        done.addErrback(failed)
        return done

    with contextlib.suppress(SystemExit):  # react ends with sys.exit; the status is ours
        react(start)
    return status[0] if status else EXIT_FAILED


def say_error(text: str) -> None:
    print(f"relayhubctl: {text}", file=sys.stderr)


def settings_of(args: argparse.Namespace) -> Settings:
    """The configuration (ConfigError leaves relayhubctl with status 2, see admin.cli)."""
    return load_settings(args.config)


@contextlib.asynccontextmanager
async def open_queue(reactor: Any, settings: Settings, *, must_exist: bool = False
                     ) -> AsyncIterator[QueueStore]:
    """The queue store of `settings`, opened for one command and closed after it.

    When relayhub has never run with this state_dir there is no queue database yet. It is
    not created here: relayhubctl often runs as root, and a root-owned queue would lock the
    daemon (which runs as the service user) out of it. Reading commands then see an empty
    queue; a change that must persist (`must_exist`) fails.
    """
    state_dir = settings.server.state_dir
    shared = settings.queue.backend == "postgresql"
    where = "the shared queue" if shared else state_dir
    with contextlib.ExitStack() as cleanup:
        if shared:
            # Its body copies (`queue show`) go to a scratch directory, for the same reason.
            scratch = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="relayhubctl-"))
            settings = replace(settings, server=replace(settings.server,
                                                        state_dir=Path(scratch)))
        store = open_store(settings, reactor=reactor)
        if isinstance(store, SQLiteQueueStore) and not store.db_path.exists():
            if must_exist:
                raise QueueUnavailable(
                    f"no queue in {state_dir} yet: start relayhub once to create it")
            scratch = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="relayhubctl-"))
            store = SQLiteQueueStore(Path(scratch), reactor=reactor)
        try:
            await store.open()
        except STORE_ERRORS as problem:  # SchemaTooNewError is a RuntimeError
            raise QueueUnavailable(f"cannot open the queue in {where}: {problem}"
                                   ) from None
        try:
            yield store
        except STORE_ERRORS as problem:
            raise QueueUnavailable(f"queue operation failed: {problem}") from None
        finally:
            await store.close()


async def ask_daemon(reactor: Any, settings: Settings, command: type[amp.Command]
                     ) -> dict[str, Any] | None:
    """Send a control command; None when no daemon listens (it is not running)."""
    call = defer.Deferred.fromCoroutine(
        control.call(reactor, settings.server.state_dir, command))
    call.addTimeout(CONTROL_TIMEOUT, reactor)
    try:
        return await call
    except (OSError, error.ConnectError, error.ConnectionClosed, defer.TimeoutError,
            amp.RemoteAmpError) as problem:
        where = control.socket_path(settings.server.state_dir)
        raise DaemonUnreachable(f"no answer on {where}: {problem}") from None


async def wake_daemon(reactor: Any, settings: Settings) -> str:
    """Tell a running daemon that the queue changed; a note on what happens next."""
    try:
        answered = await ask_daemon(reactor, settings, control.Wake) is not None
    except DaemonUnreachable as problem:
        # The queue manager also looks at the queue by itself at least once a minute.
        return f"relayhub could not be notified ({problem}); it notices within a minute"
    if not answered:
        return "relayhub is not running: it acts on the change when it starts"
    return "relayhub was notified"


# -- presentation ------------------------------------------------------------------------


def utc(timestamp: float | None) -> str | None:
    """SPEC §8 time stamps: "2026-11-26T20:00:00Z"."""
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def printable(text: str) -> str:
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def duration(seconds: float) -> str:
    """A short human duration: "45s", "12m", "3h 05m", "2d 04h"."""
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m" if minutes else f"{secs}s"


def print_json(value: object) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


def recipient_json(recipient: StoredRecipient) -> dict[str, Any]:
    return {
        "address": recipient.address,
        "status": recipient.status.value,
        "attempts": recipient.attempts,
        "next_attempt": None if recipient.final else utc(recipient.next_attempt),
        "last_error": recipient.last_error,
    }


def message_json(message: StoredMessage, settings: Settings) -> dict[str, Any]:
    """One message as `queue list --json` prints it (SPEC §8), and the hub that accepted
    it (this one, for a queue of its own)."""
    return {
        "id": message.queue_id,
        "hub": message.hub or settings.server.hostname,
        "size": message.size,
        "arrival": utc(message.arrival),
        "sender": message.envelope.sender,
        "held": message.held,
        "subject": message.subject,
        "recipients": [recipient_json(r) for r in message.recipients],
    }


def stats_json(summary: QueueSummary, now: float) -> dict[str, Any]:
    """`queue stats --json` (SPEC §8); the age is whole seconds, 0 for an empty queue."""
    oldest = 0 if summary.oldest_arrival is None else int(now - summary.oldest_arrival)
    return {
        "messages": summary.messages,
        "recipients": dict(summary.recipients),
        "held": summary.held,
        "oldest_age_seconds": max(oldest, 0),
        "by_domain": dict(summary.by_domain),
    }


def _recipient_lines(recipient: StoredRecipient) -> list[str]:
    state = recipient.status.value
    if recipient.attempts:
        state += f", {recipient.attempts} attempt{'s' * (recipient.attempts != 1)}"
    if recipient.give_up and not recipient.final:
        state += ", to be returned to the sender"
    elif recipient.status is RecipientStatus.DEFERRED and recipient.next_attempt is not None:
        state += f", next {utc(recipient.next_attempt)}"
    lines = [f"  -> {printable(recipient.address)}  {state}"]
    if recipient.last_error and recipient.status is not RecipientStatus.DELIVERED:
        lines.append(f"       {printable(recipient.last_error)}")
    return lines


def message_lines(message: StoredMessage) -> list[str]:
    """One message in the `mailq` manner: ID ("!" when held), size, arrival, sender, the
    subject, then each recipient with its state and last error."""
    sender = message.envelope.sender or "<>"
    mark = "!" if message.held else ""
    lines = [f"{message.queue_id + mark:<21} {message.size:>9}  {utc(message.arrival)}  "
             f"{printable(sender)}"]
    if message.subject:
        lines.append(f"  Subject: {printable(message.subject)}")
    if message.hub:  # a queue shared by several hubs: which one accepted it
        lines.append(f"  Hub: {printable(message.hub)}")
    for recipient in message.recipients:
        lines += _recipient_lines(recipient)
    return lines


def _size(octets: int) -> str:
    if octets < 1024:
        return f"{octets} bytes"
    if octets < 1024 * 1024:
        return f"{octets / 1024:.1f} KiB"
    return f"{octets / (1024 * 1024):.1f} MiB"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


# -- queue list / show / stats -----------------------------------------------------------


async def queue_list(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    only = MessageFilter(held=args.held, deferred=args.deferred,
                         domain=normalize_domain(args.domain) if args.domain else None)
    async with open_queue(reactor, settings) as store:
        messages = await store.list_messages(only)
    if args.json:
        print_json([message_json(m, settings) for m in messages])
        return EXIT_OK
    if not messages:
        print("Mail queue is empty" if only == MessageFilter() else "No matching messages")
        return EXIT_OK
    print(f"{'Queue ID':<21} {'Size':>9}  {'Arrival':<20}  Sender")
    for message in messages:
        print("\n".join(message_lines(message)))
    pending = sum(not r.final for m in messages for r in m.recipients)
    held = sum(m.held for m in messages)
    print(f"\n-- {_plural(len(messages), 'message')}, {_plural(pending, 'recipient')} pending, "
          f"{_size(sum(m.size for m in messages))}"
          + (f"; {held} held (marked !)" if held else ""))
    return EXIT_OK


def read_header_section(path: str) -> tuple[list[tuple[str, str]], bytes | None]:
    """The header fields of a body file, unfolded, and the whole file when it is small
    enough to have been read at once; ([], None) when the file is gone."""
    try:
        with open(path, "rb") as body:
            head = body.read(HEADER_LIMIT)
            whole = head if not body.read(1) else None
    except FileNotFoundError:  # delivered or deleted since it was listed
        return [], None
    end = head.find(b"\r\n\r\n")
    section = head if end < 0 else head[:end + 2]
    parsed = HeaderParser(policy=email_policy.compat32).parsestr(
        section.decode("utf-8", "replace"), headersonly=True)
    return [(name, _FOLD.sub("", str(value))) for name, value in parsed.items()], whole


def _read_body(path: str) -> bytes | None:
    try:
        with open(path, "rb") as body:
            return body.read()
    except FileNotFoundError:
        return None


def history_json(entry: HistoryEntry) -> dict[str, Any]:
    return {"time": utc(entry.time), "recipient": entry.recipient, "relay": entry.relay,
            "dsn": entry.dsn, "text": entry.text}


def _envelope_lines(message: StoredMessage) -> list[str]:
    env = message.envelope
    client = f"{env.client_name or 'unknown'} [{env.client_address}]" if env.client_address \
        else env.client_name or "local"
    parts = [f"helo={env.helo}" if env.helo else "", env.protocol,
             f"auth={env.auth_user}" if env.auth_user else ""]
    options = [f"BODY={env.body_type}", "SMTPUTF8" if env.smtputf8 else "",
               f"RET={env.ret}" if env.ret else "", f"ENVID={env.envid}" if env.envid else ""]
    return [
        f"Client:     {printable(client)} {' '.join(p for p in parts if p)}",
        f"Envelope:   {printable(' '.join(o for o in options if o))}",
    ]


async def queue_show(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    async with open_queue(reactor, settings) as store:
        message = await store.get_message(args.id)
        history = await store.history(args.id) if message else []
        path = await store.fetch_body(args.id) if message else ""
        # Read while the store is open: a shared queue's copy lives only as long.
        headers, _ = read_header_section(path) if message else ([], None)
        body = _read_body(path) if message and args.body else None
    if message is None:
        say_error(f"{args.id}: no such message in the queue")
        return EXIT_FAILED
    if args.json:
        shown = message_json(message, settings)
        shown["headers"] = [{"name": name, "value": value} for name, value in headers]
        shown["history"] = [history_json(entry) for entry in history]
        if args.body:
            shown["body"] = None if body is None else body.decode("utf-8", "replace")
        print_json(shown)
        return EXIT_OK
    status = "held: not delivered until released" if message.held else "not held"
    print(f"Queue ID:   {message.queue_id}\n"
          f"Arrival:    {utc(message.arrival)} ({duration(time.time() - message.arrival)} ago)\n"
          f"Size:       {message.size} bytes\n"
          f"Sender:     {printable(message.envelope.sender or '<>')}\n"
          f"Subject:    {printable(message.subject)}\n"
          + (f"Hub:        {printable(message.hub)}\n" if message.hub else "")
          + f"Status:     {status}")
    print("\n".join(_envelope_lines(message)))
    print("Recipients:")
    for recipient in message.recipients:
        print("\n".join(_recipient_lines(recipient)))
    print("Headers:")
    for name, value in headers:
        print(f"  {name}: {printable(' '.join(value.split()))}")
    print("History:" if history else "History:   no delivery attempt yet")
    for entry in history:
        print(f"  {utc(entry.time)}  {printable(entry.recipient or '?')}  relay={entry.relay}"
              f"  dsn={entry.dsn}  {printable(entry.text)}")
    if args.body:
        print("Message:")
        sys.stdout.flush()
        sys.stdout.buffer.write(body if body is not None else b"(body file gone)\n")
    return EXIT_OK


async def queue_stats(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    async with open_queue(reactor, settings) as store:
        now = time.time()
        summary = await store.summary(now)
    if args.json:
        print_json(stats_json(summary, now))
    else:
        print("\n".join(stats_lines(summary, now)))
    return EXIT_OK


def stats_lines(summary: QueueSummary, now: float) -> list[str]:
    counts = ", ".join(f"{status} {n}" for status, n in summary.recipients.items())
    lines = [
        f"messages:     {summary.messages} ({summary.held} held)",
        f"recipients:   {counts}",
        f"in delivery:  {summary.in_flight} recipients",
    ]
    if summary.oldest_arrival is not None:
        lines.append(f"oldest:       {duration(now - summary.oldest_arrival)} "
                     f"(arrived {utc(summary.oldest_arrival)})")
    for pause in summary.paused:
        until = "until resumed" if pause.until is None else f"until {utc(pause.until)}"
        lines.append(f"paused:       {pause.domain} {until}")
    if summary.by_domain:
        lines.append("not yet final, by domain:")
        lines += [f"  {n:>7}  {printable(domain)}" for domain, n in summary.by_domain.items()]
    return lines


# -- queue changes -----------------------------------------------------------------------


def _selection(args: argparse.Namespace, *, default_all: bool = False
               ) -> Selection | str:
    """The messages named on the command line, or the usage problem."""
    ids = tuple(args.ids)
    domain = getattr(args, "domain", None)
    given = sum((bool(ids), args.all, domain is not None))
    if given > 1:
        return "give queue IDs, --all or --domain, not several of them"
    if args.all or (given == 0 and default_all):
        return Selection(everything=True)
    if domain is not None:
        if not normalize_domain(domain):
            return "--domain needs a domain name"
        return Selection(domain=normalize_domain(domain))
    if not ids:
        return "give queue IDs" + (" or --all" if hasattr(args, "all") else "")
    return Selection(queue_ids=ids)


def _report(changed: Changed, requested: Sequence[str], verb: str, unchanged_why: str) -> int:
    """Print what happened to each message; status 1 when a requested ID was not found."""
    for queue_id in changed.changed:
        print(f"{queue_id}: {verb}")
    for queue_id in changed.unchanged:
        print(f"{queue_id}: {unchanged_why}")
    found = set(changed.changed) | set(changed.unchanged)
    missing = [q for q in dict.fromkeys(requested) if q not in found]
    for queue_id in missing:
        reason = "no such message in the queue" if is_queue_id(queue_id) else "not a queue ID"
        say_error(f"{queue_id}: {reason}")
    return EXIT_FAILED if missing else EXIT_OK


async def _change(reactor: Any, settings: Settings, args: argparse.Namespace,
                  operation: Callable[[QueueStore, Selection, float], defer.Deferred[Changed]],
                  verb: str, unchanged_why: str, *, default_all: bool = False) -> int:
    selection = _selection(args, default_all=default_all)
    if isinstance(selection, str):
        say_error(f"queue {args.action}: {selection}")
        return EXIT_USAGE
    async with open_queue(reactor, settings) as store:
        changed = await operation(store, selection, time.time())
    status = _report(changed, selection.queue_ids, verb, unchanged_why)
    if changed.changed:
        print(await wake_daemon(reactor, settings))
    elif not selection.queue_ids:
        print("nothing to do")
    return status


async def queue_flush(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    return await _change(reactor, settings, args, lambda s, sel, now: s.flush(sel, now),
                         "due now", "held: not flushed (release it first)", default_all=True)


async def queue_hold(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    return await _change(reactor, settings, args, lambda s, sel, now: s.hold(sel),
                         "held", "already held")


async def queue_release(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    return await _change(reactor, settings, args, lambda s, sel, now: s.release(sel, now),
                         "released, due now", "not held")


async def queue_delete(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    return await _change(reactor, settings, args, lambda s, sel, now: s.delete(sel),
                         "deleted", "")


async def queue_bounce(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    args.all = False  # bounce takes IDs only: returning every message is never meant
    return await _change(reactor, settings, args,
                         lambda s, sel, now: s.bounce(sel.queue_ids, now),
                         "to be returned to the sender", "")


async def queue_pause(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    domain = normalize_domain(args.domain)
    until = None
    if args.duration is not None:
        try:
            until = time.time() + parse_duration(args.duration)
        except ValueError as problem:
            say_error(f"queue pause: --for: {problem}")
            return EXIT_USAGE
    if not domain:
        say_error("queue pause: --domain needs a domain name")
        return EXIT_USAGE
    async with open_queue(reactor, settings, must_exist=True) as store:
        await store.pause(domain, until)
    print(f"{domain}: paused " + ("until resumed" if until is None else f"until {utc(until)}"))
    print(await wake_daemon(reactor, settings))
    return EXIT_OK


async def queue_resume(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    domain = normalize_domain(args.domain)
    async with open_queue(reactor, settings) as store:
        was_paused = await store.resume(domain, time.time())
    if not was_paused:
        print(f"{domain}: was not paused")
        return EXIT_OK
    print(f"{domain}: resumed, its recipients are due now")
    print(await wake_daemon(reactor, settings))
    return EXIT_OK


# -- the command tree --------------------------------------------------------------------


def command(action: Callable[[Any, Settings, argparse.Namespace], Coroutine[Any, Any, int]]
            ) -> Callable[[argparse.Namespace], int]:
    """An argparse command running `action` under the reactor, after the configuration has
    loaded (a configuration error is status 2 before anything else happens)."""

    def run_command(args: argparse.Namespace) -> int:
        settings = settings_of(args)
        return run(lambda reactor: action(reactor, settings, args))

    return run_command


def register(commands: Commands) -> None:
    queue = add_command(commands, "queue", "inspect and manage the mail queue")
    actions = queue.add_subparsers(title="actions", metavar="ACTION", required=True,
                                   dest="action")

    def action(name: str, help: str, run_it: Callable[..., Coroutine[Any, Any, int]]
               ) -> argparse.ArgumentParser:
        parser = add_command(actions, name, help)
        parser.set_defaults(command=command(run_it))
        return parser

    listing = action("list", "list queued messages (like mailq)", queue_list)
    listing.add_argument("--json", action="store_true", help="print one JSON array")
    listing.add_argument("--held", action="store_true", help="held messages only")
    listing.add_argument("--deferred", action="store_true",
                         help="messages with a deferred recipient that are not held")
    listing.add_argument("--domain", metavar="D",
                         help="messages with a recipient in D not yet delivered or bounced")

    show = action("show", "one message: envelope, headers, delivery history", queue_show)
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.add_argument("--body", action="store_true", help="include the message itself")

    stats = action("stats", "queue totals", queue_stats)
    stats.add_argument("--json", action="store_true", help="print one JSON object")

    for name, help, run_it, domain in (
        ("flush", "deliver now (all messages when none are named)", queue_flush, True),
        ("hold", "keep messages from delivery until released", queue_hold, False),
        ("release", "release held messages; they are due at once", queue_release, False),
        ("delete", "remove messages silently (no notice to anyone)", queue_delete, True),
    ):
        parser = action(name, help, run_it)
        parser.add_argument("ids", metavar="ID", nargs="*")
        parser.add_argument("--all", action="store_true", help="every queued message")
        if domain:
            parser.add_argument("--domain", metavar="D",
                                help="messages with a recipient in D not yet final"
                                     + (" (only D's recipients are flushed)"
                                        if name == "flush" else ""))

    bounce = action("bounce", "give up: return messages to their senders with a "
                              "delivery status notification", queue_bounce)
    bounce.add_argument("ids", metavar="ID", nargs="+")

    pause = action("pause", "hold back deliveries to a destination domain", queue_pause)
    pause.add_argument("--domain", metavar="D", required=True)
    pause.add_argument("--for", dest="duration", metavar="DURATION",
                       help='for how long, e.g. "30m" or "2h" (default: until resumed)')

    resume = action("resume", "end a pause; the domain's mail is due at once", queue_resume)
    resume.add_argument("--domain", metavar="D", required=True)

    from relayhub.admin.migration import add_migrate  # it imports this module

    add_migrate(action)
