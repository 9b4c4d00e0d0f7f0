"""Where relayhub's time goes under load: each process's CPU share and its top functions.

    .venv/bin/python bench/profile.py                       # 3,000 x 4 KB, 20 sessions
    .venv/bin/python bench/profile.py --size 1048576 --messages 200
    .venv/bin/python bench/profile.py --no-py-spy           # CPU per process only
    .venv/bin/python bench/profile.py --persistent --gil --inclusive   # see below

relayhub (workers = 2) relays to Postfix's smtp-sink, loaded by smtp-source as in
bench/compare.py, while `py-spy record` samples every process (py-spy must be installed:
`pip install py-spy`; it needs root or ptrace rights). Printed per process: CPU seconds per
1,000 messages (user + system, from /proc, every thread), and the functions with the most
samples in which that process was running (waiting in epoll or on a queue is left out).

`--persistent`: smtp-source -d (many messages per connection). `--gil`: only samples of a
thread holding the GIL, i.e. Python's own CPU, leaving out threads blocked in fsync and the
like, which py-spy otherwise counts as running. `--inclusive`: the functions with the most
samples in their whole call tree, not only as the leaf. `--keep`: keep py-spy's raw files.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.accept import default_twistd  # noqa: E402
from bench.compare import SMTP_SOURCE, TwoWorkerHub  # noqa: E402
from bench.relay import MAIL_FROM, RCPT, SmtpSink  # noqa: E402

# Leaf frames of a sample that is waiting, not working.
_IDLE = ("Condition.wait", "EPollReactor.doPoll (twisted/internet/epollreactor.py:227)",
         "Queue.get (queue.py", "_worker (concurrent/futures/thread.py")
_LINE = re.compile(r":\d+\)")


def cpu_seconds(pid: int) -> float:
    """User + system time of every thread of `pid` so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def role(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return "?"
    for module, name in (("process.worker", "worker"), ("process.qmgr", "queue-manager")):
        if module in command:
            return name
    return "master"


def top_functions(raw: Path, count: int, inclusive: bool = False
                  ) -> tuple[int, list[tuple[float, str]]]:
    """py-spy's raw (collapsed) stacks: busy samples, and the top leaf functions (a system
    call counts for the function that made it), or with `inclusive` the functions with the
    most samples anywhere in their stack (the frames every sample shares are left out)."""
    counts: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        frames = stack.split(";")
        if frames[-1].startswith(_IDLE):
            continue
        busy += int(number)
        names = {_LINE.sub(")", frame) for frame in frames} if inclusive else {
            _LINE.sub(")", frames[-1])}
        for name in names:
            counts[name] += int(number)
    ranked = [(100 * n / max(busy, 1), name) for name, n in counts.most_common()
              if not inclusive or n < busy]
    return busy, ranked[:count]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--no-py-spy", action="store_true")
    p.add_argument("--persistent", action="store_true", help="smtp-source -d")
    p.add_argument("--gil", action="store_true", help="py-spy --gil: Python's own CPU only")
    p.add_argument("--inclusive", action="store_true", help="rank by whole call tree")
    p.add_argument("--keep", action="store_true", help="keep py-spy's raw files")
    p.add_argument("--twistd", default=default_twistd())
    args = p.parse_args()
    spy = None if args.no_py_spy else shutil.which("py-spy") or str(
        Path(sys.executable).with_name("py-spy"))
    if spy is not None and not Path(spy).exists():
        print("py-spy not found: pip install py-spy (or --no-py-spy)", file=sys.stderr)
        return 2
    out = Path(tempfile.mkdtemp(prefix="relayhub-profile-"))
    with SmtpSink(900) as sink, TwoWorkerHub(args.twistd, 900, sink.port) as hub:
        warm = [SMTP_SOURCE, "-s", "5", "-m", "100", "-l", str(args.size), "-f", MAIL_FROM,
                "-t", RCPT, f"{hub.host}:{hub.port}"]
        subprocess.run(warm, check=True, stdout=subprocess.DEVNULL)
        sink.wait_count(100, 60)
        pids = sorted(hub.processes())
        roles = {pid: role(pid) for pid in pids}
        spies = [] if spy is None else [
            subprocess.Popen([spy, "record", "-p", str(pid), "-f", "raw", "-r", "200",
                              *(["--gil"] if args.gil else []), "-o", str(out / f"{pid}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for pid in pids]
        time.sleep(1.0 if spies else 0)
        before = {pid: cpu_seconds(pid) for pid in pids}
        base = sink.count
        start = time.perf_counter()
        subprocess.run([SMTP_SOURCE, "-s", "20", *(["-d"] if args.persistent else []),
                        "-m", str(args.messages), "-l", str(args.size), "-f", MAIL_FROM,
                        "-t", RCPT, f"{hub.host}:{hub.port}"], check=True,
                       stdout=subprocess.DEVNULL)
        accepted = time.perf_counter() - start
        reached = sink.wait_count(base + args.messages, 300)
        delivered = (reached or time.perf_counter()) - start
        used = {pid: cpu_seconds(pid) - before[pid] for pid in pids}
        for process in spies:
            process.send_signal(signal.SIGINT)
        for process in spies:
            process.wait(60)
    total = sum(used.values())
    print(f"{args.messages} x {args.size} B, smtp-source -s 20{' -d' * args.persistent}: accepted "
          f"{args.messages / accepted:.0f} msg/s, end to end {args.messages / delivered:.0f} "
          f"msg/s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"relayhub CPU: {1000 * total / args.messages:.2f} s per 1,000 messages")
    for pid in pids:
        print(f"\n{roles[pid]} (pid {pid}): {1000 * used[pid] / args.messages:.2f} s per 1,000 "
              f"messages, {100 * used[pid] / max(total, 1e-9):.0f}% of relayhub's CPU")
        raw = out / f"{pid}.txt"
        if raw.exists():
            _, top = top_functions(raw, args.top, args.inclusive)
            for share, name in top:
                print(f"  {share:5.1f}%  {name[:100]}")
    if args.keep:
        print(f"\npy-spy's raw files: {out}")
    else:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
