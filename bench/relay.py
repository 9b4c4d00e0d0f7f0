"""End-to-end relay throughput: load tool -> relayhub -> smtp-sink, and the same path through a
throw-away Postfix, in one run and one table (loopback only; must run as root for Postfix).

    .venv/bin/python bench/relay.py --quick
    .venv/bin/python bench/relay.py --sessions 10,50 --messages 3000
"""

# The path measured, for both servers:
#
#   bench/smtp_load (N sessions, 4 KB messages to <rcpt@sink.example>)
#     -> server under test on 127.0.0.1 (relayhub under twistd, or Postfix smtpd)
#     -> its own queue (fsync'd before the 250) and queue manager
#     -> SMTP to Postfix's smtp-sink(1) on 127.0.0.1:SINKPORT, which throws the mail away.
#
# relayhub routes sink.example there with its transport map (`"[127.0.0.1]:PORT"`: no DNS);
# Postfix with `relayhost = [127.0.0.1]:PORT` (sink.example is not one of its domains, so it is
# relayed; DNS is disabled in the throw-away instance). Both use plaintext to the sink and the
# same per-destination concurrency (--concurrency, default 20 = both servers' default).
#
# Columns:
#   accept/s   messages answered 250 per second, from the load tool's own clock (it starts
#              after every session has connected and said EHLO; see smtp_load.run_level);
#   e2e/s      messages delivered per second, end to end: accepted messages divided by the
#              time from the start of the load tool's clock until smtp-sink has counted the
#              last of them (the clock's start is taken as the end of the load minus its
#              elapsed time, so the few milliseconds of the final QUITs count as delivery);
#   lag s      how long after the load tool finished the sink still waited for the rest
#              (the delivery backlog the server built up while accepting);
#   p50/p99    accept latency, "." written -> 2xx read, in milliseconds.
#
# smtp-sink counts with -c: it writes "sess=N quit=N mesg=N" to stdout each time it receives
# a "." (counted before it answers), which a reader thread timestamps. Each server gets a fresh
# sink, and before each level the benchmark waits until the previous level has been delivered
# and the server's processes are idle, so one level's backlog is not charged to the next.

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

# `python bench/relay.py` puts bench/ itself on sys.path; the modules import as bench.*.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import smtp_load  # noqa: E402
from bench.accept import (  # noqa: E402
    Relayhub,
    ServerFailed,
    _raise_exit,
    default_twistd,
    wait_idle,
)
from bench.postfix import (  # noqa: E402
    POSTCONF,
    PostfixError,
    PostfixInstance,
    alive,
    free_port,
    spawn_guard,
)

SINK_DOMAIN = "sink.example"
RCPT = f"rcpt@{SINK_DOMAIN}"
MAIL_FROM = "load@bench.example"
SMTP_SINK = shutil.which("smtp-sink", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/smtp-sink"
# Every process of the servers and sinks seen during the run, to check that none outlives it.
_started_pids: set[int] = set()
HEADER = ("server", "sessions", "msgs", "accept/s", "e2e/s", "lag s", "p50 ms", "p99 ms",
          "errors")
_COUNTER = re.compile(rb"mesg=(\d+)")


class SinkError(RuntimeError):
    """smtp-sink could not be started."""


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1:port, counting the messages it receives.

    It runs in its own session under a dead-man switch (bench.postfix.spawn_guard), so it
    does not outlive us even if we are SIGKILLed.
    """

    def __init__(self, lifetime: float, backlog: int = 1000) -> None:
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.lifetime, self.backlog = lifetime, backlog
        self.proc: subprocess.Popen[bytes] | None = None
        self._guard: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self._count = 0
        self._history: list[tuple[float, int]] = []  # (perf_counter, count) at each change

    def start(self) -> SmtpSink:
        if not Path(SMTP_SINK).exists():
            raise SinkError(f"{SMTP_SINK} not found: install the Debian 'postfix' package")
        # As root smtp-sink insists on dropping privileges after binding (-u).
        user = next((u for u in ("nobody", "postfix") if _user_exists(u)), None)
        privileges = ["-u", user] if os.geteuid() == 0 and user else []
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-c", "-4", "-h", "sink.bench.invalid", *privileges,
             f"{self.host}:{self.port}", str(self.backlog)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches only us; stop() ends it
        )
        self._guard = spawn_guard(self.lifetime, kill_group=self.proc.pid)
        self._reader = threading.Thread(target=self._read, name="smtp-sink counter", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SinkError(f"smtp-sink exited with status {self.proc.returncode}")
            with contextlib.suppress(OSError), \
                    socket.create_connection((self.host, self.port), timeout=1):
                return self  # the probe session counts as sess=1, never as a message
            time.sleep(0.05)
        raise SinkError(f"smtp-sink did not listen on {self.host}:{self.port}")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pending = b""
        while chunk := os.read(fd, 65536):
            now = time.perf_counter()
            pending += chunk
            # Counter lines end in "\r" (it redraws one terminal line); keep a partial tail.
            *complete, pending = re.split(rb"[\r\n]", pending)
            counts = [int(m.group(1)) for line in complete if (m := _COUNTER.search(line))]
            if counts and counts[-1] != self._count:
                with self._cond:
                    self._count = counts[-1]
                    self._history.append((now, self._count))
                    self._cond.notify_all()

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    def wait_count(self, target: int, timeout: float) -> float | None:
        """perf_counter time at which the count first reached target, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._count < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    return None
                self._cond.wait(min(remaining, 0.5))
            return next(t for t, n in self._history if n >= target)

    def stop(self) -> None:
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()  # by PID, the one process we started
                    self.proc.wait(5)
                if self._reader is not None:
                    self._reader.join(5)
                if self.proc.stdout is not None:
                    self.proc.stdout.close()
                self.proc = None
        finally:
            if self._guard is not None:
                self._guard.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._guard.wait(10)
                self._guard = None

    def __enter__(self) -> SmtpSink:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class RelayingHub(Relayhub):
    """bench.accept's relayhub, with sink.example routed to the sink by the transport map."""

    def __init__(self, twistd: str, keep: bool, lifetime: float, sink_port: int,
                 concurrency: int) -> None:
        super().__init__(twistd, workers=1, keep=keep, lifetime=lifetime)
        self.sink_port, self.concurrency = sink_port, concurrency

    def config(self) -> str:
        return super().config() + (
            "[routing]\n"
            f'transport = {{ "{SINK_DOMAIN}" = "[127.0.0.1]:{self.sink_port}" }}\n'
            "[delivery]\n"
            'tls = "none"\n'  # Postfix's default smtp_tls_security_level is none as well
            f"concurrency_per_destination = {self.concurrency}\n"
        )


@dataclass
class Row:
    label: str
    load: smtp_load.LevelResult
    e2e_seconds: float | None  # None: not all accepted messages reached the sink in time
    lag: float | None
    undelivered: int

    def cells(self) -> list[str]:
        load = self.load
        e2e = f"{load.accepted / self.e2e_seconds:.0f}" if self.e2e_seconds else "-"
        lag = f"{self.lag:.2f}" if self.lag is not None else "-"
        return [self.label, str(load.sessions), str(load.accepted), f"{load.rate:.0f}", e2e,
                lag, f"{load.percentile(50):.2f}", f"{load.percentile(99):.2f}",
                str(load.errors)]

    def notes(self) -> list[str]:
        out = smtp_load.notes(self.load, self.label)
        if self.undelivered:
            out.append(f"{self.label} sessions={self.load.sessions}: {self.undelivered} accepted "
                       "message(s) had not reached the sink by the drain timeout")
        return out


def run_level(label: str, host: str, port: int, sink: SmtpSink, sessions: int, messages: int,
              args: argparse.Namespace) -> Row:
    """One concurrency level: load, then wait until the sink has counted every accepted one."""
    base = sink.count
    load = smtp_load.run_level_sync(host, port, sessions, messages, size=args.size, rcpt=RCPT,
                                    mail_from=MAIL_FROM, time_limit=args.time_limit)
    t_load = time.perf_counter()
    # smtp_load starts its clock once every session is connected and has said EHLO, the
    # same start for both figures; it reports only the elapsed time, so work back from now.
    t_start = t_load - load.elapsed
    reached = sink.wait_count(base + load.accepted, args.drain)
    undelivered = 0 if reached is not None else base + load.accepted - sink.count
    return Row(label, load,
               e2e_seconds=reached - t_start if reached is not None and load.accepted else None,
               lag=max(reached - t_load, 0.0) if reached is not None else None,
               undelivered=undelivered)


def bench_server(label: str, host: str, port: int, processes: Callable[[], dict[int, int]],
                 sink: SmtpSink, args: argparse.Namespace) -> list[Row]:
    """Warm up, then each level once the previous one is delivered and the server is idle."""
    accepted = 0
    if args.warmup:
        # First-use costs (imports, process spawns, queue files, the first connection to the
        # sink) are not the steady state.
        warm = run_level(label, host, port, sink, 1, args.warmup, args)
        accepted += warm.load.accepted
        if warm.undelivered:
            print(f"  ({label}: warm-up mail not delivered within {args.drain:.0f}s)")
    rows = []
    _started_pids.update(processes())
    if sink.proc is not None:
        _started_pids.add(sink.proc.pid)
    for sessions in args.sessions:
        waited = wait_idle(processes, timeout=args.settle)
        if waited >= args.settle:
            print(f"  ({label}: still busy after {args.settle:.0f}s of waiting; measuring anyway)")
        row = run_level(label, host, port, sink, sessions, args.messages, args)
        rows.append(row)
        accepted += row.load.accepted
        print(smtp_load.format_table([row.cells()], HEADER).splitlines()[-1], flush=True)
    _started_pids.update(processes())
    # More messages at the sink than were accepted would be duplicate deliveries.
    wait_idle(processes, timeout=args.settle)
    if sink.count != accepted:
        print(f"  ({label}: the sink counted {sink.count} messages for {accepted} accepted)")
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="End-to-end relay throughput (load -> server -> smtp-sink) of relayhub and "
        "of a throw-away Postfix; loopback only, must run as root for Postfix.")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 200 messages per level, 20 s limit, 60 s drain")
    p.add_argument("--sessions", type=smtp_load.parse_levels, default=[1, 10, 50],
                   help="comma-separated concurrency levels (default 1,10,50)")
    p.add_argument("--messages", type=int, help="messages per level (default 2000; quick 200)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    p.add_argument("--time-limit", type=float,
                   help="seconds of load per level before it is cut short (default 60; quick 20)")
    p.add_argument("--drain", type=float,
                   help="max seconds after the load for the sink to receive every accepted "
                   "message (default 120; quick 60)")
    p.add_argument("--warmup", type=int, help="unmeasured messages first (default 100; quick 20)")
    p.add_argument("--settle", type=float, default=60.0,
                   help="max seconds to wait for a server to go idle before a level")
    p.add_argument("--concurrency", type=int, default=20,
                   help="sessions per destination for both servers (default 20, both defaults)")
    p.add_argument("--server", choices=("both", "relayhub", "postfix"), default="both")
    p.add_argument("--twistd", default=default_twistd(), help="twistd to run relayhub with")
    p.add_argument("--keep", action="store_true",
                   help="keep the servers' temporary directories (paths are printed)")
    args = p.parse_args(argv)
    quick = args.quick
    for name, normal, small in (("messages", 2000, 200), ("time_limit", 60.0, 20.0),
                                ("drain", 120.0, 60.0), ("warmup", 100, 20)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else normal)
    if (args.messages < 1 or args.size < 200 or args.time_limit <= 0 or args.warmup < 0
            or args.drain <= 0 or args.concurrency < 1):
        p.error("--messages, --concurrency >= 1, --size >= 200, --time-limit and --drain > 0, "
                "--warmup >= 0 please")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    # Bound every process's life even if we are SIGKILLed: every level at its limits, plus
    # warm-up, start-up and shut-down.
    lifetime = (len(args.sessions) + 1) * (args.time_limit + args.drain + args.settle + 60) + 300
    try:
        pf_version = subprocess.run([POSTCONF, "-dh", "mail_version"], capture_output=True,
                                    text=True, check=False).stdout.strip()
    except OSError:
        pf_version = "?"
    print(f"relay benchmark: {args.size}-byte messages to <{RCPT}> -> smtp-sink, "
          f"{args.messages} per level, sessions {','.join(map(str, args.sessions))}, "
          f"concurrency per destination {args.concurrency}, {os.cpu_count()} CPUs; "
          f"Postfix {pf_version}")
    print(smtp_load.format_table([], HEADER), flush=True)

    rows: list[Row] = []
    failures: list[str] = []
    try:
        if args.server in ("both", "relayhub"):
            try:
                with SmtpSink(lifetime) as sink, RelayingHub(
                        args.twistd, args.keep, lifetime, sink.port, args.concurrency) as hub:
                    if args.keep:
                        print(f"  (relayhub directory: {hub.dir})")
                    rows += bench_server("relayhub", hub.host, hub.port, hub.processes, sink, args)
                    if not hub.running():
                        failures.append(f"relayhub exited during the run:\n{hub.log_tail()}")
            except (ServerFailed, SinkError) as exc:
                failures.append(str(exc))
                print("  relayhub: did not start (details below)")
        if args.server in ("both", "postfix"):
            try:
                with SmtpSink(lifetime) as sink, PostfixInstance(
                        domains=["localhost", "bench.example"], delivery="discard",
                        relayhost=(sink.host, sink.port),
                        main_cf={"default_destination_concurrency_limit": str(args.concurrency)},
                        keep=args.keep, max_lifetime=lifetime) as pf:
                    if args.keep:
                        print(f"  (Postfix directory: {pf.base})")
                    rows += bench_server("postfix", pf.host, pf.port, pf.processes, sink, args)
            except (PostfixError, SinkError) as exc:
                failures.append(f"Postfix: {exc}")
                print("  postfix: did not start (details below)")
    except KeyboardInterrupt:
        failures.append("interrupted; the servers were stopped")
    finally:
        for line in [n for row in rows for n in row.notes()]:
            print(f"  * {line}")
        sys.stdout.flush()
        for failure in failures:
            print(f"\n{failure}", file=sys.stderr)
    # Every server stops its own processes; this only proves it (reported, never killed here).
    if leftovers := alive(_started_pids):
        print(f"\nprocesses still running after clean-up: {sorted(leftovers)}", file=sys.stderr)
        return 1
    if failures or any(r.load.errors or r.undelivered for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
