"""Delivery throughput with DKIM signing off and on, in one run and one table: the path of
bench/relay.py (load tool -> relayhub -> Postfix's smtp-sink) with no key, an RSA-2048 key
and an Ed25519 key for the senders' From: domain (loopback only).

    .venv/bin/python bench/dkim_signing.py --quick
    .venv/bin/python bench/dkim_signing.py --sessions 10,50 --messages 2000
"""

# Each mode gets a fresh hub and a fresh sink; the load client connects from 127.0.0.1, a
# trusted network, so every message of a signing mode is signed (From: <load@bench.example>).
# The first "vs off" compares e2e/s (messages delivered per second, end to end) with the
# "off" rows of the same concurrency level (issue 13: signing may cost at most 15% of it);
# "cpu ms/msg" is the CPU time of all the hub's processes per message, from /proc, and its
# "vs off" the same comparison, which a busy shared machine disturbs far less.

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

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
from bench.relay import (  # noqa: E402
    HEADER,
    RelayingHub,
    Row,
    SinkError,
    SmtpSink,
    run_level,
)
from relayhub import dkim  # noqa: E402

# "nokey": a key for another domain, so each message goes through the thread and is read,
# but not signed: what the plumbing costs without the signature.
MODES = ("off", "rsa", "ed25519", "nokey")


class SigningHub(RelayingHub):
    """bench.relay's hub, signing mail from bench.example with a fresh key of `kind`."""

    def __init__(self, kind: str, workers: int, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.kind = kind
        self.workers = workers

    def config(self) -> str:
        if self.kind == "off":
            return super().config()
        kind = "ed25519" if self.kind == "nokey" else self.kind
        domain = "other.invalid" if self.kind == "nokey" else "bench.example"
        key = self.dir / f"{kind}.key"
        key.write_bytes(dkim.private_pem(dkim.generate_key(kind)))
        key.chmod(0o600)
        return super().config() + (
            f'[dkim]\nselector = "bench"\nprivate_key = "{key}"\ndomains = ["{domain}"]\n')


TICKS = os.sysconf("SC_CLK_TCK")


def bench_hub(label: str, hub: Relayhub, sink: SmtpSink, args: argparse.Namespace
              ) -> list[tuple[Row, float]]:
    """bench.relay.bench_server's levels, each with the CPU time the hub's processes spent
    per delivered message: unlike msg/s on a shared machine, that does not depend on what
    else runs."""
    if args.warmup:
        run_level(label, hub.host, hub.port, sink, 1, args.warmup, args)
    rows = []
    for sessions in args.sessions:
        wait_idle(hub.processes, timeout=args.settle)
        before = sum(hub.processes().values())
        row = run_level(label, hub.host, hub.port, sink, sessions, args.messages, args)
        wait_idle(hub.processes, timeout=args.settle)
        cpu = (sum(hub.processes().values()) - before) / TICKS / max(row.load.accepted, 1)
        rows.append((row, cpu * 1000))
        print(smtp_load.format_table([row.cells()], HEADER).splitlines()[-1], flush=True)
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="relayhub delivery throughput, DKIM off vs on")
    p.add_argument("--quick", action="store_true", help="200 messages per level")
    p.add_argument("--sessions", type=smtp_load.parse_levels, default=[10, 50],
                   help="comma-separated concurrency levels (default 10,50)")
    p.add_argument("--messages", type=int, help="messages per level (default 2000; quick 200)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds of load per level")
    p.add_argument("--drain", type=float, default=120.0,
                   help="max seconds for the sink to receive every accepted message")
    p.add_argument("--warmup", type=int, default=100, help="unmeasured messages first")
    p.add_argument("--settle", type=float, default=60.0,
                   help="max seconds to wait for the hub to go idle before a level")
    p.add_argument("--concurrency", type=int, default=20, help="sessions per destination")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="the hub's worker processes (default: the CPU count, as the daemon's "
                        "own default)")
    p.add_argument("--modes", default="off,rsa,ed25519,off",
                   help=f"comma-separated, of {', '.join(MODES)}, in this order, repeats "
                        "allowed (default off,rsa,ed25519,off)")
    p.add_argument("--twistd", default=default_twistd(), help="twistd to run relayhub with")
    args = p.parse_args(argv)
    if args.messages is None:
        args.messages = 200 if args.quick else 2000
    args.modes = [m for m in args.modes.split(",") if m]  # repeats allowed
    if not set(args.modes) <= set(MODES) or args.messages < 1:
        p.error(f"--modes takes {', '.join(MODES)}; --messages >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    lifetime = (len(args.sessions) + 1) * (args.time_limit + args.drain + args.settle + 60) + 300
    print(f"DKIM benchmark: {args.size}-byte messages -> relayhub ({args.workers} workers) -> "
          f"smtp-sink, {args.messages} per level, sessions "
          f"{','.join(map(str, args.sessions))}, {os.cpu_count()} CPUs; modes "
          f"{', '.join(args.modes)}", flush=True)
    rows: list[tuple[str, list[tuple[Row, float]]]] = []
    failures: list[str] = []
    for mode in args.modes:
        print(f"  ({mode} ...)", flush=True)
        try:
            with SmtpSink(lifetime) as sink, SigningHub(
                    mode, args.workers, args.twistd, False, lifetime, sink.port,
                    args.concurrency) as hub:
                rows.append((mode, bench_hub(f"dkim {mode}", hub, sink, args)))
                signed = hub.log.read_text(errors="replace").count("DKIM-Signature field added")
                if mode not in ("off", "nokey") and signed == 0:
                    failures.append(f"{mode}: no message was signed")
        except (ServerFailed, SinkError) as exc:
            failures.append(f"{mode}: {exc}")
    header = (*HEADER, "vs off", "cpu ms/msg", "vs off")
    table = []
    for _mode, mode_rows in rows:
        for index, (row, cpu) in enumerate(mode_rows):
            # Against the mean of every "off" run of the level (--modes off,rsa,ed25519,off
            # brackets the signing runs, so a drift of the shared machine shows).
            offs = [r[index] for m, r in rows if m == "off" and index < len(r)]
            off_rates = [x for r, _cpu in offs if (x := rate(r)) is not None]
            off_cpu = [c for _r, c in offs]
            mine = rate(row)
            delta = "-"
            if off_rates and mine is not None:
                base = sum(off_rates) / len(off_rates)
                delta = f"{(mine - base) / base * 100:+.1f}%"
            cpu_delta = "-"
            if off_cpu and sum(off_cpu):
                base = sum(off_cpu) / len(off_cpu)
                cpu_delta = f"{(cpu - base) / base * 100:+.1f}%"
            table.append([*row.cells(), delta, f"{cpu:.2f}", cpu_delta])
    print()
    print(smtp_load.format_table(table, header))
    for failure in failures:
        print(f"\n{failure}", file=sys.stderr)
    return 1 if failures or any(r.load.errors or r.undelivered for _m, rs in rows
                                for r, _cpu in rs) else 0


def rate(row: Row) -> float | None:
    """Messages delivered per second, end to end."""
    return row.load.accepted / row.e2e_seconds if row.e2e_seconds else None


if __name__ == "__main__":
    sys.exit(main())
