"""relayhub against Postfix (SMTP) and Dovecot (POP3) on this machine: one command, one table.

    .venv/bin/python bench/compare.py             # 5 alternated runs per scenario (medians)
    .venv/bin/python bench/compare.py --quick     # 3 runs, fewer messages

Must run as root (Postfix and Dovecot), loopback only. Every server and sink is private and
stopped at the end (dead-man switches stop them if this script is killed).
"""

# What is measured, for both SMTP servers alike:
#
#   load tool -> server under test on 127.0.0.1 -> its queue (fsync'd before 250) ->
#   its queue manager -> SMTP to Postfix's smtp-sink(1), which counts and discards.
#
# relayhub runs on its defaults except `workers = 2`, the sink's address as a transport entry,
# and `tls = "none"` to the sink (Postfix's default smtp_tls_security_level is none too);
# Postfix relays to the same kind of sink with `relayhost`, with discard for local mail.
# Both allow 20 sessions per destination (both defaults).
#
# The load generator is Postfix's own smtp-source(1) (`-s 20`: 20 sessions in parallel; one
# message per connection unless `-d`), and bench/smtp_load.py for accept latency (it times
# "." -> 250 of every message). "accepted" is smtp-source's wall time; "end to end" runs from
# its start until the sink has counted every message. Runs alternate between the servers
# (A B A B ...), both servers stay up (an idle server costs nothing), and the table prints
# medians. POP3 (bench/pop3.py's scenarios) is a download-and-delete of every message.

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import pop3, smtp_load  # noqa: E402
from bench.accept import _raise_exit, default_twistd, wait_idle  # noqa: E402
from bench.postfix import PostfixInstance  # noqa: E402
from bench.relay import MAIL_FROM, RCPT, RelayingHub, SmtpSink  # noqa: E402

SMTP_SOURCE = shutil.which("smtp-source", path="/usr/sbin:/usr/bin") or "/usr/sbin/smtp-source"
MiB = 1024 * 1024


@dataclass
class Scenario:
    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, server: str, value: float) -> None:
        self.samples.setdefault(server, []).append(value)

    def median(self, server: str) -> float | None:
        values = self.samples.get(server)
        return statistics.median(values) if values else None


@dataclass
class SmtpServer:
    name: str
    host: str
    port: int
    sink: SmtpSink
    processes: Callable[[], dict[int, int]]


class TwoWorkerHub(RelayingHub):
    """relayhub as an administrator runs it: workers = 2, sink.example to the sink."""

    def __init__(self, twistd: str, lifetime: float, sink_port: int) -> None:
        super().__init__(twistd, keep=False, lifetime=lifetime, sink_port=sink_port,
                         concurrency=20)
        self.workers = 2


def smtp_source(server: SmtpServer, messages: int, size: int, persistent: bool,
                timeout: float) -> tuple[float, float | None]:
    """Seconds to send `messages` (smtp-source's wall time) and to the sink's last count."""
    base = server.sink.count
    args = [SMTP_SOURCE, "-s", "20", "-m", str(messages), "-l", str(size),
            "-f", MAIL_FROM, "-t", RCPT]
    if persistent:
        args.append("-d")
    start = time.perf_counter()
    subprocess.run([*args, f"{server.host}:{server.port}"], check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    accepted = time.perf_counter() - start
    reached = server.sink.wait_count(base + messages, timeout)
    return accepted, (reached - start if reached is not None else None)


def run_smtp(server: SmtpServer, scenarios: dict[str, Scenario], args: argparse.Namespace
             ) -> None:
    wait_idle(server.processes, timeout=30)
    accepted, e2e = smtp_source(server, args.messages, 4096, False, args.timeout)
    scenarios["conn_acc"].add(server.name, args.messages / accepted)
    if e2e:
        scenarios["conn_e2e"].add(server.name, args.messages / e2e)
    wait_idle(server.processes, timeout=30)
    _, e2e = smtp_source(server, args.messages, 4096, True, args.timeout)
    if e2e:
        scenarios["persist_e2e"].add(server.name, args.messages / e2e)
    wait_idle(server.processes, timeout=30)
    accepted, e2e = smtp_source(server, args.big, MiB, False, args.timeout)
    scenarios["big_acc"].add(server.name, args.big * MiB / accepted / 1e6)
    if e2e:
        scenarios["big_e2e"].add(server.name, args.big * MiB / e2e / 1e6)
    wait_idle(server.processes, timeout=30)
    level = smtp_load.run_level_sync(server.host, server.port, 50, args.latency_messages,
                                     size=4096, rcpt=RCPT, mail_from=MAIL_FROM, time_limit=60)
    scenarios["p99"].add(server.name, level.percentile(99))


POP3_SIZES = argparse.Namespace(messages=1000, size=4096, users=10, per_user=200)


def run_pop3(servers: list[pop3.Server], scenarios: dict[str, Scenario],
             args: argparse.Namespace) -> None:
    for scenario in ("single", "parallel"):
        users = pop3.scenario_users(scenario, POP3_SIZES)
        for server in servers:
            server.prepare(users)
            elapsed, count, _ = pop3.run_sessions(server.port, list(users))
            if count != sum(map(len, users.values())):
                raise RuntimeError(f"{server.name}: {count} messages downloaded")
            scenarios[f"pop3_{scenario}"].add(server.name, elapsed)


def ratio(scenario: Scenario, ours: str, theirs: str) -> str:
    a, b = scenario.median(ours), scenario.median(theirs)
    if a is None or b is None or a == 0 or b == 0:
        return "-"
    return f"{(a / b if scenario.higher_is_better else b / a):.2f}x"


def table(scenarios: dict[str, Scenario]) -> str:
    rows = [("scenario", "unit", "relayhub", "other", "other name", "ratio")]
    for scenario in scenarios.values():
        other = "dovecot" if scenario.key.startswith("pop3") else "postfix"
        ours, theirs = scenario.median("relayhub"), scenario.median(other)
        rows.append((scenario.label, scenario.unit,
                     "-" if ours is None else f"{ours:.3f}" if ours < 10 else f"{ours:.1f}",
                     "-" if theirs is None else f"{theirs:.3f}" if theirs < 10 else
                     f"{theirs:.1f}", other, ratio(scenario, "relayhub", other)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i in (0, 1, 4) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


@contextlib.contextmanager
def smtp_servers(args: argparse.Namespace) -> Iterator[list[SmtpServer]]:
    lifetime = 3600.0
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(SmtpSink(lifetime))
        hub = stack.enter_context(TwoWorkerHub(args.twistd, lifetime, sink.port))
        started = [SmtpServer("relayhub", hub.host, hub.port, sink, hub.processes)]
        if not args.no_postfix:
            pf_sink = stack.enter_context(SmtpSink(lifetime))
            pf = stack.enter_context(PostfixInstance(
                domains=["localhost", "bench.example"], delivery="discard",
                relayhost=(pf_sink.host, pf_sink.port),
                main_cf={"default_destination_concurrency_limit": "20"},
                max_lifetime=lifetime))
            started.append(SmtpServer("postfix", pf.host, pf.port, pf_sink, pf.processes))
        yield started


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, help="alternated runs per scenario (default 5)")
    p.add_argument("--quick", action="store_true", help="3 runs, fewer messages")
    p.add_argument("--no-postfix", action="store_true")
    p.add_argument("--no-pop3", action="store_true")
    p.add_argument("--twistd", default=default_twistd())
    args = p.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 5)
    args.messages = 1000 if args.quick else 3000
    args.big = 100 if args.quick else 300
    args.latency_messages = 1000 if args.quick else 3000
    args.timeout = 300.0
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)

    scenarios = {s.key: s for s in [
        Scenario("conn_e2e", "4 KB, one message per connection, end to end", "msg/s"),
        Scenario("conn_acc", "4 KB, one message per connection, accepted", "msg/s"),
        Scenario("persist_e2e", "4 KB, 20 persistent connections, end to end", "msg/s"),
        Scenario("big_e2e", f"1 MiB x {args.big}, end to end", "MB/s"),
        Scenario("big_acc", f"1 MiB x {args.big}, accepted", "MB/s"),
        Scenario("p99", "p99 accept latency, 50 sessions", "ms", higher_is_better=False),
        Scenario("pop3_single", "POP3 1 user x 1000 x 4 KB", "s", higher_is_better=False),
        Scenario("pop3_parallel", "POP3 10 users x 200 x 4 KB", "s", higher_is_better=False),
    ]}
    print(f"relayhub vs Postfix/Dovecot: {args.runs} alternated runs, medians; "
          f"{os.cpu_count()} CPUs; smtp-source -s 20 as the SMTP load", flush=True)
    with smtp_servers(args) as servers:
        for run in range(args.runs):
            for server in servers:
                # A warm-up before the first run: imports, spawns, first connections.
                if run == 0:
                    smtp_source(server, 200, 4096, False, args.timeout)
                run_smtp(server, scenarios, args)
            print(f"  run {run + 1}/{args.runs} done", flush=True)
    if not args.no_pop3:
        work = Path(tempfile.mkdtemp(prefix="relayhub-compare-pop3-"))
        work.chmod(0o755)  # Dovecot's unprivileged processes must reach their files
        try:
            everyone = [user for scenario in ("single", "parallel")
                        for user in pop3.scenario_users(scenario, POP3_SIZES)]
            with pop3.servers(work, not args.no_postfix, everyone, 2) as running:
                for _ in range(args.runs):
                    run_pop3(running, scenarios, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(table(scenarios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
