"""The long fuzz run: every target in bench/fuzz_targets.py, each bounded by a count of inputs
and a time, with generated inputs (grammar-aware, see the targets' generators) and raw random
bytes mixed. A failing input is saved under `--failures` (one file per failure, the exact
bytes) and the run goes on; one input that takes longer than `--hang` seconds is a failure
too. The totals go to stdout as a table and, with `--json`, to a file.

    nice -n 10 .venv/bin/python bench/fuzz.py --count 100000 --seconds 900 --json fuzz.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

# `python bench/fuzz.py` puts bench/ itself on sys.path; the modules import as bench.*.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.fuzz_targets import Fixture, Target, targets  # noqa: E402


class Hang(Exception):
    """One input ran past the hang limit."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang()


def run_target(target: Target, count: int, seconds: float, seed: int, hang: float,
               failures_dir: Path) -> dict[str, object]:
    rng = random.Random(f"{seed}:{target.name}")
    started = time.monotonic()
    done, failures, kinds = 0, 0, set()
    while done < count and time.monotonic() - started < seconds:
        roll = rng.random()
        if roll < 0.8:
            data = target.generate(rng)
        elif roll < 0.9:  # a generated input, mutated
            mutated = bytearray(target.generate(rng))
            for _ in range(rng.randint(1, 4)):
                if mutated:
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = bytes(mutated)
        else:
            data = rng.randbytes(rng.choice((0, 1, 8, 64, 512, 4096)))
        signal.setitimer(signal.ITIMER_REAL, hang)
        try:
            target.check(data)
        except BaseException as error:
            if isinstance(error, KeyboardInterrupt):
                raise
            failures += 1
            kind = f"{type(error).__name__}: {str(error)[:300]}"
            name = hashlib.sha256(data).hexdigest()[:16]
            failures_dir.mkdir(parents=True, exist_ok=True)
            (failures_dir / f"{target.name}-{name}.bin").write_bytes(data)
            if kind not in kinds:
                kinds.add(kind)
                print(f"FAIL {target.name} {name}: {kind}", file=sys.stderr)
                traceback.print_exc(limit=-2, file=sys.stderr)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        done += 1
    return {"target": target.name, "inputs": done,
            "seconds": round(time.monotonic() - started, 1), "failures": failures,
            "kinds": sorted(kinds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--count", type=int, default=100_000, help="inputs per target")
    parser.add_argument("--seconds", type=float, default=600.0, help="time per target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hang", type=float, default=10.0, help="seconds for one input")
    parser.add_argument("--only", action="append", help="run just these targets")
    parser.add_argument("--failures", type=Path, default=Path("fuzz-failures"))
    parser.add_argument("--json", type=Path, help="write the totals here too")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGALRM, _alarm)
    fixture = Fixture()
    rows = []
    try:
        for target in targets(fixture):
            if args.only and target.name not in args.only:
                continue
            row = run_target(target, args.count, args.seconds, args.seed, args.hang,
                             args.failures)
            rows.append(row)
            print(f"{row['target']:18} {row['inputs']:>9} inputs {row['seconds']:>8}s "
                  f"{row['failures']:>4} failures", flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    finally:
        fixture.close()
    total = sum(int(str(r["inputs"])) for r in rows)
    failed = sum(int(str(r["failures"])) for r in rows)
    print(f"{'total':18} {total:>9} inputs, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
