"""Worker scaling: relayhub's accept rate with `[server].workers = 1`, then 2, in one run and
one table, with the CPU each relayhub process used during each level (loopback only).

    .venv/bin/python bench/scaling.py            # 3000 messages per level
    .venv/bin/python bench/scaling.py --quick    # smoke test, about a minute
    .venv/bin/python bench/scaling.py --workers 1,2,4 --sessions 10,50
"""

# What is measured, for each worker count in turn (one relayhub at a time):
#
#   bench.accept.Relayhub starts `twistd relayhub` with a generated configuration: a master,
#   N protocol workers (one SO_REUSEPORT socket each, so the kernel spreads connections) and
#   one queue manager.  bench.smtp_load sends 4 KB messages to <postmaster@localhost> over
#   1, 10 and 50 concurrent sessions; "250" means the message is fsync'd in the queue.  The
#   queue manager then delivers each one into the postmaster Maildir, so every worker count
#   does the same work: acceptance in the workers, delivery in the one queue manager.
#
# Columns:
#   msg/s, p50/p99   smtp_load's accept rate and "." -> 250 latency (its clock starts once
#                    every session has connected and said EHLO);
#   drain s          seconds after the last 250 until the Maildir held every accepted message:
#                    the delivery backlog the queue manager built up during the level;
#   cpu %            the whole machine's busy CPU during the level, in % of one core (2 cores
#                    = 200), from /proc/stat; iowait is shown in the breakdown below the table;
#   busiest          the relayhub process that used the most CPU during the level, in % of
#                    one core, from /proc/<pid>/stat (a Twisted process is one reactor thread
#                    plus fsync/SQLite threads that share the GIL: near 100 % it is saturated).
#
# Under the table, for each level: every hub process's CPU and the share of the level it
# had a thread waiting for the disk ("fsync wait") or for the queue database's lock ("lock
# wait"; see StateSampler), the load generator's CPU (it runs on the same cores), everything
# else on the machine by process name, and iowait.
#
# Before each level the benchmark waits until the previous one has been delivered and the
# hub's processes are idle (bench.accept.wait_idle), so no level is charged another's
# backlog, then (bounded by --quiet-wait) until the rest of the machine is idle too: on a
# shared machine a test suite started meanwhile takes a core, and the level says so.

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

# `python bench/scaling.py` puts bench/ itself on sys.path; the modules import as bench.*.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import smtp_load  # noqa: E402
from bench.accept import (  # noqa: E402
    MAIL_FROM,
    RCPT,
    Relayhub,
    ServerFailed,
    _raise_exit,
    default_twistd,
    wait_idle,
)
from bench.postfix import alive, process_tree  # noqa: E402

HEADER = ("workers", *smtp_load.COLUMNS, "drain s", "cpu %", "busiest")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
# Above this share of one core used by processes other than ours, a level gets a footnote.
OTHERS_NOTE = 0.15
# Log levels worth showing under the table: anything but info means relayhub had a problem.
_LOG_PROBLEMS = ("#warn]", "#error]", "#critical]")


# --------------------------------------------------------------------------- CPU sampling


def _machine_ticks() -> tuple[int, int, int, int]:
    """(busy, iowait, steal, total) jiffies of all CPUs together, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (
            int(x) for x in f.readline().split()[1:9])
    # Guest time is already in user.  Steal is time the hypervisor gave to other machines:
    # not ours to use, so not "busy" either.
    return (user + nice + system + irq + softirq, iowait, steal,
            user + nice + system + idle + iowait + irq + softirq + steal)


@dataclass(frozen=True)
class Proc:
    """One process as /proc/<pid>/stat shows it."""

    name: str
    ppid: int
    start: int  # boot-relative start time: tells a reused pid from the same process
    ticks: int  # CPU ticks of the process and of the children it has reaped


def _all_processes() -> dict[int, Proc]:
    """Every process on the machine, by pid.

    The ticks include those of the children it has reaped (cutime, cstime): a test suite's
    or a build's short-lived processes are charged to it instead of being lost; see
    LevelCpu.between for the children that were already counted alive.
    """
    found: dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        # The name is in parentheses and may itself contain spaces or parentheses.
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        if name.startswith("kworker/"):
            # Kernel workers rename themselves after the work queue they run (ext4 writeback,
            # block I/O...): one name for all of them keeps the breakdown short.
            name = "kworker"
        found[int(entry)] = Proc(name, int(fields[1]), int(fields[19]),
                                 sum(int(x) for x in fields[11:15]))
    return found


def wait_quiet(timeout: float, share: float = 0.15) -> float:
    """Wait until the whole machine uses under `share` of one core; return seconds waited.

    The hub is idle by then (wait_idle), so what is left is other work on the machine (a
    test suite, a build): it would take cores from the level and make its figures noise.
    """
    window = 0.5
    start = time.monotonic()
    busy0, _io, _steal, total0 = _machine_ticks()
    quiet = 0
    while quiet < 2 and time.monotonic() - start < timeout:
        time.sleep(window)
        busy1, _io, _steal, total1 = _machine_ticks()
        used = (busy1 - busy0) / max(total1 - total0, 1) * NCPU
        quiet = quiet + 1 if used < share else 0
        busy0, total0 = busy1, total1
    return time.monotonic() - start


def _role(pid: int, master: int) -> str:
    """A name for one of the hub's processes, as relayhub's log names it."""
    if pid == master:
        return "master"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid}"
    if b"relayhub.process.qmgr" in argv:
        return "qmgr"
    if b"relayhub.process.worker" in argv:
        # The master numbers its workers in RELAYHUB_WORKER; reading another process's
        # environment needs the same user (or root), so fall back to the pid.
        with contextlib.suppress(OSError):
            for var in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if var.startswith(b"RELAYHUB_WORKER="):
                    return f"worker-{var.split(b'=', 1)[1].decode()}"
        return f"worker({pid})"
    return Path(argv[0].decode(errors="replace")).name or f"pid {pid}"


@dataclass
class CpuSnapshot:
    """CPU counters of the machine, of this process and of every hub process, at one moment."""

    at: float
    machine: tuple[int, int, int, int]
    own: float  # CPU seconds of this process (the load generator)
    ticks: dict[int, int]  # hub pid -> utime+stime ticks
    roles: dict[int, str]  # hub pid -> role, read while the process is alive
    everyone: dict[int, Proc]  # every process on the machine

    @classmethod
    def take(cls, master: int) -> CpuSnapshot:
        ticks = process_tree(master)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(time.monotonic(), _machine_ticks(), usage.ru_utime + usage.ru_stime, ticks,
                   {pid: _role(pid, master) for pid in ticks}, _all_processes())


@dataclass
class LevelCpu:
    """What each process used between two snapshots, in fractions of one core."""

    hub: dict[str, float]  # role -> share of one core
    client: float
    others: dict[str, float]  # any other process, by command name -> share of one core
    machine: float  # busy share of one core summed over all cores (2 cores: up to 2.0)
    iowait: float  # same unit
    steal: float  # same unit
    # role -> (fsync wait, lock wait) shares of StateSampler's samples
    waits: dict[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot) -> LevelCpu:
        wall = max(after.at - before.at, 1e-9)

        def used(ticks_after: int, ticks_before: int) -> float:
            return (ticks_after - ticks_before) / CLK_TCK / wall

        hub: dict[str, float] = {}
        for pid, ticks in after.ticks.items():
            # A process born during the level (a restarted worker) used all its ticks in it.
            role = after.roles.get(pid) or before.roles.get(pid) or f"pid {pid}"
            hub[role] = hub.get(role, 0.0) + used(ticks, before.ticks.get(pid, 0))
        others: dict[str, float] = {}
        ours = {os.getpid(), *before.ticks, *after.ticks}

        def same(pid: int) -> bool:
            old, new = before.everyone.get(pid), after.everyone.get(pid)
            return old is not None and new is not None and old.start == new.start

        for pid, proc in after.everyone.items():
            if pid not in ours:
                old = before.everyone[pid].ticks if same(pid) else 0  # else: born meanwhile
                others[proc.name] = others.get(proc.name, 0.0) + used(proc.ticks, old)
        for pid, proc in before.everyone.items():
            if pid in ours or same(pid):
                continue
            # It ended during the level, and the ancestor that reaped it got all its ticks
            # in cutime: take back those it had before the level, already counted then.
            parent = proc.ppid
            while parent > 1 and not same(parent) and parent in before.everyone:
                parent = before.everyone[parent].ppid
            if (reaper := after.everyone.get(parent)) is not None:
                others[reaper.name] = others.get(reaper.name, 0.0) - used(proc.ticks, 0)
        others = {name: share for name, share in others.items() if share > 0}
        b0, io0, st0, total0 = before.machine
        b1, io1, st1, total1 = after.machine
        scale = NCPU / max(total1 - total0, 1)
        return cls(hub, client=(after.own - before.own) / wall, others=others,
                   machine=(b1 - b0) * scale, iowait=(io1 - io0) * scale,
                   steal=(st1 - st0) * scale)

    def busiest(self) -> tuple[str, float]:
        return max(self.hub.items(), key=lambda item: item[1], default=("-", 0.0))

    @property
    def other_total(self) -> float:
        """CPU that neither the hub nor the load generator used: other processes, and what
        no live process is charged for ("unattributed": the kernel's interrupt work for
        loopback TCP and the disk, processes that ended during the level)."""
        return max(self.machine - sum(self.hub.values()) - self.client, 0.0)

    def breakdown(self) -> str:
        parts = []
        for role, share in sorted(self.hub.items()):
            disk, lock = self.waits.get(role, (0.0, 0.0))
            waits = [f"{what} {w:.0%}" for what, w in (("fsync wait", disk), ("lock wait", lock))
                     if w >= 0.005]
            parts.append(f"{role} {share:.0%}" + (f" ({', '.join(waits)})" if waits else ""))
        parts.append(f"load generator {self.client:.0%}")
        top = sorted(((v, k) for k, v in self.others.items() if v >= 0.02), reverse=True)[:4]
        named = sum(v for v, _k in top)
        detail = [f"{k} {v:.0%}" for v, k in top]
        if self.other_total - named >= 0.02:
            detail.append(f"unattributed {self.other_total - named:.0%}")
        parts.append(f"everything else {self.other_total:.0%}"
                     + (f" ({', '.join(detail)})" if detail else ""))
        steal = f", steal {self.steal:.0%}" if self.steal >= 0.01 else ""
        return (", ".join(parts) + f"; machine {self.machine:.0%} of {NCPU * 100}%, "
                f"iowait {self.iowait:.0%}{steal}")


class StateSampler:
    """Looks, every `interval` seconds during a level, at what each thread of each hub
    process is doing, like top's S column plus the kernel function it sleeps in (wchan).

    - "fsync wait": a thread in D (uninterruptible sleep), here a thread waiting for the
      disk: an fsync of the queue (workers, qmgr) or of a Maildir file (qmgr).
    - "lock wait": a thread other than the reactor's asleep in nanosleep.  relayhub sleeps
      in a thread only while the queue database is locked by another connection: SQLite's
      busy handler (usleep between retries) or the store's own retry back-off.

    Each is the share of samples in which the process had at least one such thread.  An idle
    reactor and an idle thread pool wait in epoll/futex and count as neither.
    """

    def __init__(self, roles: dict[int, str], interval: float = 0.03) -> None:
        self.roles, self.interval = roles, interval
        self.samples = 0
        self.disk: Counter[str] = Counter()  # role -> samples with a thread in D
        self.lock: Counter[str] = Counter()  # role -> samples with a thread in nanosleep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples += 1
            for pid, role in self.roles.items():
                disk = lock = False
                with contextlib.suppress(OSError):  # the process or a thread has ended
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                        state = raw[raw.rindex(")") + 2]
                        disk = disk or state == "D"
                        if state == "S" and not lock and tid != str(pid):
                            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
                            lock = wchan == "hrtimer_nanosleep"
                self.disk[role] += disk
                self.lock[role] += lock

    def shares(self, role: str) -> tuple[float, float] | None:
        """(fsync wait, lock wait) of a role, as shares of the samples."""
        if not self.samples:
            return None
        return self.disk[role] / self.samples, self.lock[role] / self.samples

    def __enter__(self) -> StateSampler:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)


# --------------------------------------------------------------------------- delivery


def delivered(mail_root: Path) -> int:
    """Messages in every Maildir under the hub's mail root (new/ and cur/)."""
    count = 0
    with contextlib.suppress(FileNotFoundError):
        for mailbox in mail_root.iterdir():
            for sub in ("new", "cur"):
                with contextlib.suppress(FileNotFoundError), os.scandir(mailbox / sub) as it:
                    count += sum(1 for _ in it)
    return count


def wait_delivered(mail_root: Path, target: int, timeout: float) -> float | None:
    """monotonic() time at which the Maildirs first held `target` messages; None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if delivered(mail_root) >= target:
            return now
        if now >= deadline:
            return None
        time.sleep(0.05)


# --------------------------------------------------------------------------- the hub


class ScalingHub(Relayhub):
    """bench.accept's relayhub, which also reads its own log after shutting down.

    Relayhub.stop() removes the directory (and the log with it) unless `keep`; the shutdown
    is the part of the log most worth checking, so the removal is done here afterwards.
    """

    def __init__(self, twistd: str, workers: int, keep: bool, lifetime: float) -> None:
        super().__init__(twistd, workers, keep, lifetime)
        self.exit_status: int | None = None
        self.stop_seconds = 0.0
        self.problems: list[str] = []  # warn/error/critical lines of the log

    @property
    def mail_root(self) -> Path:
        return self.dir / "relayhub" / "mail"  # [server].state_dir / "mail"

    def stop(self) -> None:
        keep, self.keep = self.keep, True
        proc = self.proc
        t0 = time.monotonic()
        try:
            super().stop()
        finally:
            self.keep = keep
            self.stop_seconds = time.monotonic() - t0
            self.exit_status = proc.returncode if proc is not None else None
            with contextlib.suppress(OSError):
                self.problems = [line for line in self.log.read_text(errors="replace")
                                 .splitlines() if any(tag in line for tag in _LOG_PROBLEMS)]
            if not keep:
                shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Row:
    workers: int
    load: smtp_load.LevelResult
    drain: float | None  # None: not every accepted message was delivered within --settle
    cpu: LevelCpu

    def cells(self) -> list[str]:
        role, share = self.cpu.busiest()
        drain = f"{self.drain:.2f}" if self.drain is not None else "-"
        return [str(self.workers), *smtp_load.format_row(self.load), drain,
                f"{self.cpu.machine * 100:.0f}", f"{role} {share:.0%}"]


@dataclass
class HubRun:
    workers: int
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def bench_workers(run: HubRun, args: argparse.Namespace, lifetime: float,
                  seen: set[int]) -> None:
    """One relayhub with run.workers workers: warm-up, every level, shutdown; fills `run`
    as it goes, so that an interrupted run still has the levels measured before."""
    workers = run.workers
    label = f"workers={workers}"
    hub = ScalingHub(args.twistd, workers, args.keep, lifetime)

    def level(sessions: int, messages: int) -> smtp_load.LevelResult:
        return smtp_load.run_level_sync(
            hub.host, hub.port, sessions, messages, size=args.size, rcpt=RCPT,
            mail_from=MAIL_FROM, time_limit=args.time_limit)

    try:
        with hub:
            if args.keep:
                print(f"  ({label}: relayhub directory {hub.dir})", flush=True)
            assert hub.proc is not None
            master = hub.proc.pid
            expected = 0  # messages the Maildir should hold once the queue has drained
            if args.warmup:
                # First-use costs (imports, SQLite pages, the first Maildir) are not the
                # steady state.  One session would warm one worker only: the kernel picks a
                # worker per connection (SO_REUSEPORT hash), so give it a few to spread.
                warm = level(max(1, min(2 * workers, args.warmup)), args.warmup)
                expected += warm.accepted
                if wait_delivered(hub.mail_root, expected, args.settle) is None:
                    run.notes.append(f"{label}: warm-up mail not delivered within "
                                     f"{args.settle:.0f}s")
            for sessions in args.sessions:
                if wait_idle(hub.processes, timeout=args.settle) >= args.settle:
                    run.notes.append(f"{label} sessions={sessions}: hub still busy after "
                                     f"{args.settle:.0f}s of waiting; measured anyway")
                if args.quiet_wait and wait_quiet(args.quiet_wait) >= args.quiet_wait:
                    run.notes.append(f"{label} sessions={sessions}: the machine was still "
                                     f"busy after {args.quiet_wait:.0f}s of waiting for it")
                seen.update(hub.processes())
                before = CpuSnapshot.take(master)
                with StateSampler(before.roles) as states:
                    load = level(sessions, args.messages)
                after = CpuSnapshot.take(master)
                seen.update(after.ticks)
                expected += load.accepted
                reached = wait_delivered(hub.mail_root, expected, args.settle)
                cpu = LevelCpu.between(before, after)
                cpu.waits = {role: waits for role in set(before.roles.values())
                             if (waits := states.shares(role)) is not None}
                row = Row(workers, load, None if reached is None else reached - after.at, cpu)
                run.rows.append(row)
                print(f"  {label} sessions={sessions}: {load.accepted} msgs, "
                      f"{load.rate:.0f} msg/s, {load.errors} errors", flush=True)
                run.notes += smtp_load.notes(load, label)
                busy_others = sum(row.cpu.others.values())
                if busy_others > OTHERS_NOTE:
                    run.notes.append(f"{label} sessions={sessions}: other processes used "
                                     f"{busy_others:.0%} of a core meanwhile: the machine "
                                     "was not quiet, the figures are low and noisy")
                if reached is None:
                    run.notes.append(f"{label} sessions={sessions}: only "
                                     f"{delivered(hub.mail_root)} of {expected} messages in "
                                     f"the Maildir {args.settle:.0f}s after the load")
            # More files than 250s would be duplicate deliveries.
            wait_idle(hub.processes, timeout=args.settle)
            if (count := delivered(hub.mail_root)) != expected:
                run.notes.append(f"{label}: the Maildir holds {count} messages for "
                                 f"{expected} accepted")
            seen.update(hub.processes())
            if not hub.running():
                run.failures.append(f"relayhub ({label}) exited during the run:\n"
                                    f"{hub.log_tail()}")
    except ServerFailed as exc:
        run.failures.append(f"{label}: {exc}")
    finally:
        # Also after a Ctrl-C: how the hub shut down is part of what it did.
        if hub.exit_status not in (None, 0):
            run.failures.append(f"relayhub ({label}) exited with status {hub.exit_status} "
                                f"after {hub.stop_seconds:.1f}s of shutdown")
        if hub.problems:
            shown = "\n".join(f"    | {line}" for line in hub.problems[:10])
            more = len(hub.problems) - 10
            run.notes.append(f"{label}: {len(hub.problems)} warning/error line(s) in "
                             f"relayhub's log{f' (first 10; {more} more)' if more > 0 else ''}"
                             f":\n{shown}")


# --------------------------------------------------------------------------- main


def ratio_line(rows: Sequence[Row], workers: Sequence[int], sessions: Sequence[int]) -> str:
    """msg/s of the last worker count over the first, at each concurrency level."""
    first, last = workers[0], workers[-1]
    rate = {(r.workers, r.load.sessions): r.load.rate for r in rows}
    parts = []
    for s in sessions:
        a, b = rate.get((first, s)), rate.get((last, s))
        parts.append(f"sessions {s}: {b / a:.2f}x" if a and b is not None else
                     f"sessions {s}: -")
    return f"msg/s ratio workers={last} / workers={first}: " + ", ".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="relayhub accept rate with workers = 1 and workers = 2 in one run, with "
        "per-process CPU (loopback only).")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 200 messages per level, 20 s limit, 30 s settle")
    p.add_argument("--workers", type=smtp_load.parse_levels, default=[1, 2],
                   help="comma-separated [server].workers values, in order (default 1,2)")
    p.add_argument("--sessions", type=smtp_load.parse_levels, default=[1, 10, 50],
                   help="comma-separated concurrency levels (default 1,10,50)")
    p.add_argument("--messages", type=int, help="messages per level (default 3000; quick 200)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (default 4096)")
    p.add_argument("--time-limit", type=float,
                   help="seconds per level before it is cut short (default 60; quick 20)")
    p.add_argument("--warmup", type=int, help="unmeasured messages first (default 100; quick 20)")
    p.add_argument("--settle", type=float,
                   help="max seconds to wait for delivery and idleness around a level "
                   "(default 60; quick 30)")
    p.add_argument("--quiet-wait", type=float,
                   help="max seconds to wait before each level for the machine to be idle "
                   "apart from us (default 120; quick 15; 0: do not wait)")
    p.add_argument("--twistd", default=default_twistd(), help="twistd to run relayhub with")
    p.add_argument("--keep", action="store_true",
                   help="keep relayhub's temporary directories (paths are printed)")
    args = p.parse_args(argv)
    for name, normal, small in (("messages", 3000, 200), ("time_limit", 60.0, 20.0),
                                ("warmup", 100, 20), ("settle", 60.0, 30.0),
                                ("quiet_wait", 120.0, 15.0)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else normal)
    if (args.messages < 1 or args.size < 200 or args.time_limit <= 0 or args.warmup < 0
            or args.settle <= 0 or args.quiet_wait < 0):
        p.error("--messages >= 1, --size >= 200, --time-limit and --settle > 0, --warmup and "
                "--quiet-wait >= 0 please")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    # Bounds each hub's life even if we are SIGKILLed (bench.postfix.spawn_guard): every
    # level at its time limit plus the reply timeout, drain and idle waits, start and stop.
    lifetime = ((len(args.sessions) + 1) * (args.time_limit + 30 + 2 * args.settle
                                            + args.quiet_wait) + 300)
    print(f"scaling benchmark: {args.size}-byte messages to <{RCPT}> (local Maildir delivery), "
          f"{args.messages} per level, sessions {','.join(map(str, args.sessions))}, "
          f"workers {','.join(map(str, args.workers))}, {NCPU} CPUs", flush=True)

    runs: list[HubRun] = []
    seen: set[int] = set()  # every hub process, to prove afterwards that none outlived us
    interrupted = False
    try:
        for workers in args.workers:
            runs.append(HubRun(workers))
            bench_workers(runs[-1], args, lifetime, seen)
    except (KeyboardInterrupt, SystemExit):  # _raise_exit: Ctrl-C, SIGTERM, SIGHUP
        interrupted = True  # the `with` in bench_workers has stopped the hub
    rows = [row for run in runs for row in run.rows]
    print()
    print(smtp_load.format_table([row.cells() for row in rows], HEADER))
    if len(args.workers) > 1:
        print(ratio_line(rows, args.workers, args.sessions))
    print(f"(cpu %: whole machine during the level, {NCPU * 100} = all {NCPU} cores busy; "
          "busiest: the relayhub process with the most CPU, % of one core)")
    print("CPU during each level, % of one core:")
    for row in rows:
        print(f"  workers={row.workers} sessions={row.load.sessions}: {row.cpu.breakdown()}")
    for run in runs:
        for note in run.notes:
            print(f"  * {note}")
    failures = [f for run in runs for f in run.failures]
    if interrupted:
        failures.append("interrupted; relayhub was stopped")
    sys.stdout.flush()
    for failure in failures:
        print(f"\n{failure}", file=sys.stderr)
    # Relayhub.stop() ends its own processes; this only proves it (reported, never killed).
    if leftovers := alive(seen):
        print(f"\nrelayhub processes still running after clean-up: {sorted(leftovers)}",
              file=sys.stderr)
        return 1
    if failures or any(row.load.errors for row in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
