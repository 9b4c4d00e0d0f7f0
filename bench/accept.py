"""Accept-rate benchmark: relayhub against a throw-away Postfix on this machine, over loopback."""

# What each server has done when it answers 250 to the final "." (what the latency measures):
#
#   relayhub  SPEC §3: the message and its envelope are durably stored (fsync'd) in its queue
#             before "250 2.0.0 Ok: queued as ID".  postmaster@localhost is a local recipient,
#             so after the 250 the hub delivers it into a Maildir (tmp/ -> fsync -> new/) and
#             records the recipient as delivered.
#   Postfix   smtpd streams the message to cleanup(8), which writes the queue file and
#             fsync()s it before smtpd says "250 2.0.0 Ok: queued as ID" (checked with strace
#             on 3.7.11).  With the default --postfix-delivery=maildir, qmgr then hands it to
#             virtual(8), which writes an fsync'd Maildir file, and the queue file is removed:
#             the same work after the 250 as relayhub, competing for the same CPUs and disk
#             while the load runs.  "discard" drops it after queueing; "hold" leaves it in the
#             hold queue (least work after the 250: the bare accept path).
#
# The servers run one after the other, each alone on the machine.  Before each concurrency
# level the benchmark waits until the server's processes are idle, so one level's delivery
# backlog is not charged to the next.  Sessions connect and EHLO before the clock starts
# (Postfix forks an smtpd per session); see smtp_load.run_level.

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import BinaryIO

# `python bench/accept.py` puts bench/ itself on sys.path; the modules import as bench.*.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import smtp_load  # noqa: E402
from bench.postfix import (  # noqa: E402
    POSTCONF,
    Delivery,
    PostfixError,
    PostfixInstance,
    alive,
    free_port,
    process_tree,
    spawn_guard,
    wait_for_banner,
)

RCPT = "postmaster@localhost"
MAIL_FROM = "load@bench.example"
HEADER = ("server", *smtp_load.COLUMNS)


class ServerFailed(RuntimeError):
    """A server under test could not be started."""


def default_twistd() -> str:
    """twistd of the interpreter running us (the project venv), else the repo's .venv."""
    for candidate in (Path(sys.executable).parent / "twistd", REPO / ".venv/bin/twistd"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("twistd") or "twistd"


def wait_idle(
    processes: Callable[[], dict[int, int]], timeout: float = 60.0, share: float = 0.05
) -> float:
    """Wait until a server's processes together use under `share` of one CPU; return seconds.

    Uses /proc CPU ticks over two consecutive 0.5 s windows, so it works alike for one
    Twisted process and for Postfix's family of processes, without knowing their queues.
    """
    window = 0.5
    budget = os.sysconf("SC_CLK_TCK") * window * share
    start = time.monotonic()
    before = processes()
    quiet = 0
    while quiet < 2 and time.monotonic() - start < timeout:
        time.sleep(window)
        now = processes()
        # A process born inside the window used all of its ticks inside the window.
        used = sum(cpu - before.get(pid, 0) for pid, cpu in now.items())
        quiet = quiet + 1 if used <= budget else 0
        before = now
    return time.monotonic() - start


class Relayhub:
    """relayhub under twistd with a generated config, on free loopback ports."""

    def __init__(self, twistd: str, workers: int, keep: bool, lifetime: float) -> None:
        self.twistd, self.workers, self.keep, self.lifetime = twistd, workers, keep, lifetime
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.dir = Path(tempfile.mkdtemp(prefix="bench-relayhub-"))
        self.log = self.dir / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._guard: subprocess.Popen[bytes] | None = None
        self._logf: BinaryIO | None = None

    def config(self) -> str:
        def q(s: str) -> str:
            return json.dumps(s)  # a valid TOML basic string for these ASCII values

        return (
            "[server]\n"
            f"state_dir = {q(str(self.dir / 'relayhub'))}\n"
            f"workers = {self.workers}\n"
            "[smtp]\n"
            f"listen = [{q(f'tcp:{self.port}:interface={self.host}')}]\n"
            "[pop3]\n"
            f"listen = [{q(f'tcp:{free_port(self.host)}:interface={self.host}')}]\n"
            "[domains]\n"
            'local = ["localhost", "bench.example"]\n'
        )

    def start(self) -> Relayhub:
        cfg = self.dir / "relayhub.toml"
        cfg.write_text(self.config())
        self._logf = self.log.open("wb")
        # Benchmark the code in this checkout: the venv's editable install is a symlink farm
        # (build/__editable__.*) that misses modules added since the last `pip install -e`.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [self.twistd, "-n", "--pidfile=", "relayhub", "-c", str(cfg)],
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches only us; stop() shuts it down in order
        )
        self._guard = spawn_guard(
            self.lifetime, kill_group=self.proc.pid, remove=None if self.keep else self.dir
        )
        try:
            wait_for_banner(self.host, self.port, 60, running=self.running)
        except PostfixError as exc:  # wait_for_banner's error type, whatever the server
            raise ServerFailed(f"relayhub did not start: {exc}\n{self.log_tail()}") from None
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "    | (no log)"
        return "\n".join(f"    | {line}" for line in text[-lines:]) or "    | (empty log)"

    def processes(self) -> dict[int, int]:
        return process_tree(self.proc.pid) if self.proc is not None else {}

    def stop(self) -> None:
        try:
            if self.proc is not None:
                family = set(self.processes())
                if self.running():
                    self.proc.terminate()  # twistd shuts down gracefully on SIGTERM
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(45)  # longer than the default shutdown_grace (30s)
                # Last resort, by PID and only what we started: twistd and its workers.
                for pid in alive(family):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
                self.proc = None
        finally:
            if self._logf is not None:
                self._logf.close()
                self._logf = None
            if self._guard is not None:
                self._guard.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._guard.wait(10)
                self._guard = None
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Relayhub:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def bench_server(
    label: str,
    host: str,
    port: int,
    processes: Callable[[], dict[int, int]],
    args: argparse.Namespace,
) -> list[smtp_load.LevelResult]:
    """Warm up, then measure each concurrency level after the server has gone idle."""

    def level(sessions: int, messages: int) -> smtp_load.LevelResult:
        return smtp_load.run_level_sync(
            host,
            port,
            sessions,
            messages,
            size=args.size,
            rcpt=RCPT,
            mail_from=MAIL_FROM,
            time_limit=args.time_limit,
        )

    if args.warmup:
        # First-use costs (imports, process spawns, SQLite/queue files) are not the steady state.
        level(1, args.warmup)
    results = []
    for sessions in args.sessions:
        waited = wait_idle(processes, timeout=args.settle)
        if waited >= args.settle:
            print(f"  ({label}: still busy after {args.settle:.0f}s of waiting; measuring anyway)")
        res = level(sessions, args.messages)
        results.append(res)
        print(smtp_load.format_table([smtp_load.format_row(res, label)], HEADER).splitlines()[-1])
        sys.stdout.flush()
    return results


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the `with` blocks stop both servers; from then on
    # further signals are ignored so that impatience cannot interrupt that clean-up.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Accept-rate benchmark of relayhub against a throw-away Postfix (loopback "
        "only; must run as root for Postfix).",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 200 messages per level, 20 s limit (CI-sized)",
    )
    p.add_argument(
        "--sessions",
        type=smtp_load.parse_levels,
        default=[1, 10, 50],
        help="comma-separated concurrency levels (default 1,10,50)",
    )
    p.add_argument("--messages", type=int, help="messages per level (default 3000; quick 200)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    p.add_argument(
        "--time-limit",
        type=float,
        help="seconds per level before it is cut short (default 60; quick 20)",
    )
    p.add_argument("--warmup", type=int, help="unmeasured messages first (default 100; quick 20)")
    p.add_argument(
        "--settle",
        type=float,
        default=60.0,
        help="max seconds to wait for a server to go idle before a level",
    )
    p.add_argument("--server", choices=("both", "relayhub", "postfix"), default="both")
    p.add_argument(
        "--postfix-delivery",
        choices=("maildir", "discard", "hold"),
        default="maildir",
        help="what Postfix does after its 250 (default maildir)",
    )
    p.add_argument("--workers", type=int, default=1, help="relayhub [server].workers (default 1)")
    p.add_argument("--twistd", default=default_twistd(), help="twistd to run relayhub with")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the servers' temporary directories (paths are printed)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    if args.messages is None:
        args.messages = 200 if quick else 3000
    if args.time_limit is None:
        args.time_limit = 20.0 if quick else 60.0
    if args.warmup is None:
        args.warmup = 20 if quick else 100
    if args.messages < 1 or args.size < 200 or args.time_limit <= 0 or args.warmup < 0:
        p.error("--messages >= 1, --size >= 200, --time-limit > 0 and --warmup >= 0 please")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    # Bound every server's life even if we are SIGKILLed: all levels at their time limit,
    # plus settling, start-up and shut-down.
    lifetime = len(args.sessions) * (args.time_limit + args.settle + 60) + 300
    try:
        pf_version = subprocess.run(
            [POSTCONF, "-dh", "mail_version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pf_version = "?"
    print(
        f"accept benchmark: {args.size}-byte messages to <{RCPT}>, {args.messages} per level, "
        f"sessions {','.join(map(str, args.sessions))}, {os.cpu_count()} CPUs; "
        f"relayhub workers={args.workers}; Postfix {pf_version} delivery={args.postfix_delivery}"
    )
    print(smtp_load.format_table([], HEADER))
    sys.stdout.flush()

    results: list[tuple[str, smtp_load.LevelResult]] = []
    failures: list[str] = []
    try:
        if args.server in ("both", "relayhub"):
            try:
                with Relayhub(args.twistd, args.workers, args.keep, lifetime) as hub:
                    if args.keep:
                        print(f"  (relayhub directory: {hub.dir})")
                    for r in bench_server("relayhub", hub.host, hub.port, hub.processes, args):
                        results.append(("relayhub", r))
                    if not hub.running():
                        failures.append(f"relayhub exited during the run:\n{hub.log_tail()}")
            except ServerFailed as exc:
                failures.append(str(exc))
                print("  relayhub: did not start (details below)")
        if args.server in ("both", "postfix"):
            delivery: Delivery = args.postfix_delivery
            try:
                with PostfixInstance(
                    domains=["localhost", "bench.example"],
                    mailboxes=[RCPT],
                    delivery=delivery,
                    keep=args.keep,
                    max_lifetime=lifetime,
                ) as pf:
                    if args.keep:
                        print(f"  (Postfix directory: {pf.base})")
                    for r in bench_server("postfix", pf.host, pf.port, pf.processes, args):
                        results.append(("postfix", r))
            except PostfixError as exc:
                failures.append(f"Postfix: {exc}")
                print("  postfix: did not start (details below)")
    except KeyboardInterrupt:
        failures.append("interrupted; the servers were stopped")
    finally:
        for line in [n for label, r in results for n in smtp_load.notes(r, label)]:
            print(f"  * {line}")
        sys.stdout.flush()
        for failure in failures:
            print(f"\n{failure}", file=sys.stderr)
    if failures or any(r.errors for _label, r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
