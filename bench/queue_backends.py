"""End-to-end relay throughput by queue backend: SQLite and PostgreSQL, one hub and two hubs,
in one run and one table (loopback only; run as root: PostgreSQL runs as nobody, smtp-sink
drops to nobody).

    .venv/bin/python bench/queue_backends.py --quick
    .venv/bin/python bench/queue_backends.py --sessions 20 --messages 3000

The path: bench/smtp_load (N sessions, 4 KB messages to <rcpt@sink.example>) -> relayhub
(its queue: SQLite in its state directory, or a PostgreSQL server started here in a temporary
directory, fsync on) -> smtp-sink. With two hubs the load tool splits the sessions and
messages between them; with SQLite each hub has its own queue (two independent hubs behind
one name), with PostgreSQL both share one queue and each delivers whatever it claims.

Columns: accept/s = messages answered 250 per second (load tool's clock, all hubs together);
e2e/s = accepted messages / time from the load's start until smtp-sink has counted the last.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench import smtp_load  # noqa: E402
from bench.accept import ServerFailed, _raise_exit, default_twistd, wait_idle  # noqa: E402
from bench.relay import MAIL_FROM, RCPT, RelayingHub, SinkError, SmtpSink  # noqa: E402

HEADER = ("backend", "hubs", "sessions", "msgs", "accept/s", "e2e/s", "p50 ms", "p99 ms",
          "errors")


class BackendHub(RelayingHub):
    """bench.relay's hub with a name and a [queue] section."""

    def __init__(self, twistd: str, lifetime: float, sink_port: int, concurrency: int,
                 name: str, dsn: str | None) -> None:
        super().__init__(twistd, keep=False, lifetime=lifetime, sink_port=sink_port,
                         concurrency=concurrency)
        self.name, self.dsn = name, dsn

    def config(self) -> str:
        text = super().config().replace("[server]\n", f'[server]\nhostname = "{self.name}"\n', 1)
        if self.dsn is not None:
            text += f'[queue]\nbackend = "postgresql"\ndsn = "{self.dsn}"\n'
        return text


def measure(hubs: Sequence[BackendHub], sink: SmtpSink, args: argparse.Namespace
            ) -> tuple[list[smtp_load.LevelResult], float | None]:
    """Load every hub at once (sessions and messages split evenly); the results and the
    end-to-end seconds (None when not all accepted mail reached the sink in time)."""
    base = sink.count
    results: list[smtp_load.LevelResult | None] = [None] * len(hubs)

    def load(i: int, hub: BackendHub) -> None:
        results[i] = smtp_load.run_level_sync(
            hub.host, hub.port, max(args.sessions // len(hubs), 1),
            args.messages // len(hubs), size=args.size, rcpt=RCPT, mail_from=MAIL_FROM,
            time_limit=args.time_limit)

    threads = [threading.Thread(target=load, args=(i, hub)) for i, hub in enumerate(hubs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [r for r in results if r is not None]
    t_load = time.perf_counter()
    t_start = t_load - max(r.elapsed for r in done)
    accepted = sum(r.accepted for r in done)
    reached = sink.wait_count(base + accepted, args.drain)
    return done, (reached - t_start if reached is not None and accepted else None)


def run_case(backend: str, count: int, dsn: str | None, args: argparse.Namespace,
             lifetime: float) -> list[str]:
    with ExitStack() as stack:
        sink = stack.enter_context(SmtpSink(lifetime))
        hubs = [stack.enter_context(BackendHub(args.twistd, lifetime, sink.port,
                                               args.concurrency, f"hub{i}.bench", dsn))
                for i in range(count)]
        if args.warmup:
            for hub in hubs:
                smtp_load.run_level_sync(hub.host, hub.port, 1, args.warmup, size=args.size,
                                         rcpt=RCPT, mail_from=MAIL_FROM,
                                         time_limit=args.time_limit)
            sink.wait_count(args.warmup * count, args.drain)
        for hub in hubs:
            wait_idle(hub.processes, timeout=args.settle)
        results, e2e = measure(hubs, sink, args)
    accepted = sum(r.accepted for r in results)
    elapsed = max(r.elapsed for r in results)
    latencies = sorted(x for r in results for x in r.latencies)

    def pct(p: float) -> str:
        if not latencies:
            return "-"
        return f"{latencies[min(int(len(latencies) * p / 100), len(latencies) - 1)] * 1000:.2f}"

    return [backend, str(count), str(sum(r.sessions for r in results)), str(accepted),
            f"{accepted / elapsed:.0f}" if elapsed else "-",
            f"{accepted / e2e:.0f}" if e2e else "-", pct(50), pct(99),
            str(sum(r.errors for r in results))]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 400 messages per case, 20 s limit")
    p.add_argument("--sessions", type=int, default=20, help="sessions in all (default 20)")
    p.add_argument("--messages", type=int, help="messages per case (default 2000; quick 400)")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--time-limit", type=float, help="seconds of load (default 60; quick 20)")
    p.add_argument("--drain", type=float, default=120.0)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--settle", type=float, default=30.0)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--twistd", default=default_twistd())
    args = p.parse_args(argv)
    if args.messages is None:
        args.messages = 400 if args.quick else 2000
    if args.time_limit is None:
        args.time_limit = 20.0 if args.quick else 60.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import pgserver

    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    lifetime = 4 * (args.time_limit + args.drain + args.settle + 60) + 300
    if (why := pgserver.available()) is not None:
        print(f"cannot start PostgreSQL: {why}", file=sys.stderr)
        return 1
    print(f"queue backends: {args.messages} x {args.size}-byte messages per case, "
          f"{args.sessions} sessions in all, -> smtp-sink", flush=True)
    rows: list[list[str]] = []
    server = pgserver.PGServer()
    try:
        for backend, count in (("sqlite", 1), ("sqlite", 2), ("postgresql", 1),
                               ("postgresql", 2)):
            dsn = server.new_database() if backend == "postgresql" else None
            try:
                rows.append(run_case(backend, count, dsn, args, lifetime))
            except (ServerFailed, SinkError) as exc:
                rows.append([backend, str(count), "-", "-", "-", "-", "-", "-", "failed"])
                print(f"  {backend} x{count}: {exc}", file=sys.stderr)
            print(smtp_load.format_table([rows[-1]], HEADER).splitlines()[-1], flush=True)
    finally:
        server.close()
    print()
    print(smtp_load.format_table(rows, HEADER))
    return 0 if all(r[-1] == "0" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
