"""A burst of SMTP connections opened at once: how many get their banner and EHLO reply, how
fast, and what the whole daemon's memory (PSS, every process) is while they are held.

    .venv/bin/python bench/connections.py                 # 10,000 connections to relayhub
    .venv/bin/python bench/connections.py --count 2000 --postfix

Loopback only, every connection from 127.0.0.1: a trusted client (exempt from the per-IP
limit), named from /etc/hosts without a DNS query, as a site's own hosts usually are. This
tests the daemon, not its limits, so max_connections is raised above --count.
Every connection is closed and every server stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.accept import Relayhub, default_twistd  # noqa: E402
from bench.postfix import PostfixInstance  # noqa: E402


class BurstHub(Relayhub):
    """relayhub with workers = 2 and limits above the burst (trusted loopback clients)."""

    def __init__(self, twistd: str, count: int) -> None:
        super().__init__(twistd, workers=2, keep=False, lifetime=900)
        self.count = count

    def config(self) -> str:
        return super().config().replace(
            "[smtp]\n", f"[smtp]\nmax_connections = {self.count + 100}\n", 1)


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


@dataclass
class Result:
    answered: int
    failed: int
    seconds: float
    pss_mib: float


async def burst(host: str, port: int, count: int, timeout: float,
                pids: Callable[[], list[int]]) -> Result:
    writers: list[asyncio.StreamWriter] = []
    failures: collections.Counter[str] = collections.Counter()
    done_times: list[float] = []
    start = time.perf_counter()

    async def one(index: int) -> bool:
        reader, writer = await asyncio.open_connection(host, port)
        writers.append(writer)
        banner = await reader.readline()
        if not banner.startswith(b"220"):
            failures[banner[:40].decode(errors="replace").strip() or "closed"] += 1
            return False
        writer.write(b"EHLO burst.example\r\n")
        while True:
            line = await reader.readline()
            if not line.startswith(b"250"):
                failures["EHLO: " + (line[:40].decode(errors="replace").strip() or "closed")] += 1
                return False
            if line[3:4] == b" ":
                done_times.append(time.perf_counter())
                return True

    async def guarded(index: int) -> bool:
        try:
            return await asyncio.wait_for(one(index), timeout)
        except (TimeoutError, OSError) as error:
            failures[type(error).__name__] += 1
            return False

    results = await asyncio.gather(*(guarded(i) for i in range(count)))
    answered = sum(results)
    seconds = (max(done_times) - start) if done_times else float("nan")
    await asyncio.sleep(1.0)  # held: measure memory with every session open
    pss = pss_kib(pids()) / 1024
    for writer in writers:
        writer.close()
    if failures:
        print(f"  failures: {dict(failures)}")
    return Result(answered, count - answered, seconds, pss)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--postfix", action="store_true", help="also a throw-away Postfix")
    p.add_argument("--twistd", default=default_twistd(), help="twistd to run relayhub with")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.count * 2 + 100), hard))
    print(f"{args.count} connections at once, banner + EHLO, then held; timeout "
          f"{args.timeout:.0f}s")
    print(f"{'server':<10} {'answered':>9} {'failed':>7} {'all in s':>9} {'PSS MiB':>8} "
          f"{'KiB/conn':>9}")
    rows: list[tuple[str, Result]] = []
    with BurstHub(args.twistd, args.count) as hub:
        pids = lambda: list(hub.processes())  # noqa: E731
        rows.append(("relayhub", asyncio.run(burst(hub.host, hub.port, args.count,
                                                   args.timeout, pids))))
    if args.postfix:
        with PostfixInstance(domains=["localhost"], delivery="discard",
                             main_cf={"default_process_limit": "1000"}) as pf:
            pids = lambda: list(pf.processes())  # noqa: E731
            rows.append(("postfix", asyncio.run(burst(pf.host, pf.port, args.count,
                                                      args.timeout, pids))))
    for name, r in rows:
        print(f"{name:<10} {r.answered:>9} {r.failed:>7} {r.seconds:>9.2f} {r.pss_mib:>8.1f} "
              f"{r.pss_mib * 1024 / max(r.answered, 1):>9.1f}")
    return 0 if all(r.failed == 0 for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
