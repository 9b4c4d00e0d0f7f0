"""SMTP accept-rate load generator: N concurrent sessions, fixed message count, latencies."""

from __future__ import annotations

import argparse
import asyncio
import math
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["LevelResult", "format_table", "main", "parse_levels", "run_level", "run_level_sync"]

CLIENT_NAME = "load.bench.invalid"


@dataclass
class LevelResult:
    """What one concurrency level measured."""

    sessions: int
    requested: int
    accepted: int = 0
    errors: int = 0
    elapsed: float = 0.0  # seconds from the start signal to the last finished message
    latencies: list[float] = field(default_factory=list)  # "." sent -> 2xx read, seconds
    error_kinds: Counter[str] = field(default_factory=Counter)
    time_limited: bool = False  # the wall-clock limit stopped the level early
    client_cpu: float = 0.0  # CPU seconds this process used during the level

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, p: float) -> float:
        """Latency percentile in milliseconds (nearest rank), NaN without samples."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1] * 1000

    @property
    def client_cpu_share(self) -> float:
        """Fraction of one core the load generator itself used (near 1.0: client-bound)."""
        return self.client_cpu / self.elapsed if self.elapsed > 0 else 0.0


class SMTPReplyError(Exception):
    """The server answered with an unexpected reply code."""

    def __init__(self, stage: str, code: int, text: str) -> None:
        super().__init__(f"{stage}: {code} {text}")
        self.stage, self.code = stage, code


def make_message(size: int, mail_from: str, rcpt: str, tag: str) -> bytes:
    """A plain-text message of `size` bytes (CRLF lines, nothing to dot-stuff), then ".\\r\\n"."""
    header = (
        f"From: <{mail_from}>\r\nTo: <{rcpt}>\r\nSubject: accept benchmark {tag}\r\n"
        f"Message-ID: <{tag}@{CLIENT_NAME}>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    # 72-character lines that never start with "." (no dot-stuffing needed); the last one is
    # cut short so that header + body is exactly `size` bytes when size allows.
    line = b"The quick brown fox jumps over the lazy dog while the queue fsyncs 0123\r\n"
    body_len = max(len(line), size - len(header))
    body = (line * (body_len // len(line) + 1))[: body_len - 2]
    if body.endswith(b"\r"):
        body = body[:-1] + b" "  # never leave a bare CR
    body += b"\r\n"
    return header + body + b".\r\n"


class _Session:
    """One SMTP connection: greeting and EHLO once, then MAIL/RCPT/DATA per message."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _reply(self) -> tuple[int, str]:
        assert self.reader is not None
        lines: list[bytes] = []
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionError("server closed the connection")
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                break
        try:
            code = int(lines[-1][:3])
        except ValueError:
            raise ConnectionError(f"malformed reply {lines[-1][:80]!r}") from None
        return code, lines[-1][4:].decode("utf-8", "replace").strip()

    async def _command(self, stage: str, line: bytes, expect: int) -> None:
        assert self.writer is not None
        self.writer.write(line)
        code, text = await self._reply()
        if code // 100 != expect:
            raise SMTPReplyError(stage, code, text)

    async def connect(self) -> None:
        async with asyncio.timeout(self.timeout):
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            code, text = await self._reply()
            if code != 220:
                raise SMTPReplyError("greeting", code, text)
            await self._command("EHLO", f"EHLO {CLIENT_NAME}\r\n".encode(), 2)

    async def send(self, mail_from: str, rcpt: str, message: bytes) -> float:
        """Send one message; return the latency from writing the final "." to the 2xx."""
        assert self.writer is not None
        async with asyncio.timeout(self.timeout):
            try:
                await self._command("MAIL", f"MAIL FROM:<{mail_from}>\r\n".encode(), 2)
                await self._command("RCPT", f"RCPT TO:<{rcpt}>\r\n".encode(), 2)
                await self._command("DATA", b"DATA\r\n", 3)
            except SMTPReplyError as exc:
                if exc.code != 421:
                    await self._command("RSET", b"RSET\r\n", 2)  # keep the session usable
                raise
            # The message and its terminating "." go in one write: the clock starts when
            # the final "." is handed to the kernel, as a real client's would.
            t0 = time.perf_counter()
            self.writer.write(message)
            code, text = await self._reply()
            latency = time.perf_counter() - t0
            if code // 100 != 2:
                raise SMTPReplyError("end of DATA", code, text)
            return latency

    async def close(self, polite: bool) -> None:
        if self.writer is None:
            return
        writer, self.writer, self.reader = self.writer, None, None
        try:
            if polite:
                async with asyncio.timeout(2):
                    writer.write(b"QUIT\r\n")
                    await writer.drain()
            writer.close()
            async with asyncio.timeout(2):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            pass


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, SMTPReplyError):
        return f"{exc.stage} {exc.code}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


async def run_level(
    host: str,
    port: int,
    sessions: int,
    messages: int,
    *,
    size: int = 4096,
    rcpt: str = "postmaster@localhost",
    mail_from: str = "load@bench.example",
    time_limit: float = 60.0,
    timeout: float = 30.0,
) -> LevelResult:
    """Send `messages` messages over `sessions` concurrent connections, within time_limit.

    All sessions connect and EHLO first; the clock starts when every one is ready, so
    connection set-up (Postfix forks an smtpd per session) is not counted as accept time.
    No new message starts after time_limit; one still in flight then gets at most `timeout`
    more seconds, after which it is cancelled and counted as an error.
    """
    result = LevelResult(sessions=sessions, requested=messages)
    tickets = iter(range(messages))
    ready = asyncio.Event()
    go = asyncio.Event()
    n_ready = 0
    issued = 0  # messages started
    deadline = math.inf
    last_done = 0.0
    start = 0.0

    def fail(exc: BaseException) -> None:
        result.errors += 1
        result.error_kinds[_error_kind(exc)] += 1

    async def worker(idx: int) -> None:
        nonlocal n_ready, issued, last_done
        conn = _Session(host, port, timeout)
        try:
            try:
                await conn.connect()
            except (OSError, TimeoutError, SMTPReplyError) as exc:
                fail(exc)
                await conn.close(False)
            n_ready += 1
            if n_ready == sessions:
                ready.set()
            await go.wait()
            while time.perf_counter() < deadline and (n := next(tickets, None)) is not None:
                issued += 1
                try:
                    if conn.writer is None:
                        await conn.connect()
                    msg = make_message(size, mail_from, rcpt, f"{idx}.{n}.{time.time_ns()}")
                    result.latencies.append(await conn.send(mail_from, rcpt, msg))
                    result.accepted += 1
                except SMTPReplyError as exc:
                    fail(exc)
                    if exc.code == 421 or exc.stage in ("greeting", "EHLO", "RSET"):
                        await conn.close(False)  # the session is unusable: reconnect
                        await asyncio.sleep(0.05)  # and do not spin on a refusing server
                except (OSError, TimeoutError) as exc:  # ConnectionError is an OSError
                    fail(exc)
                    await conn.close(False)
                    await asyncio.sleep(0.05)
                last_done = time.perf_counter()
        finally:
            await conn.close(True)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    pending: set[asyncio.Task[None]] = set()
    tasks = [asyncio.create_task(worker(i)) for i in range(sessions)]
    try:
        async with asyncio.timeout(timeout + 5):
            await ready.wait()
        start = time.perf_counter()
        deadline = start + time_limit
        go.set()
        done, pending = await asyncio.wait(tasks, timeout=time_limit + timeout)
        for task in pending:
            task.cancel()
            fail(TimeoutError())
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if (exc := task.exception()) is not None:
                raise exc  # a bug in this tool, not a server error: do not hide it
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result.elapsed = max(last_done - start, 1e-9) if start else 0.0
    result.time_limited = issued < messages or bool(pending)
    result.client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return result


def run_level_sync(
    host: str,
    port: int,
    sessions: int,
    messages: int,
    *,
    size: int = 4096,
    rcpt: str = "postmaster@localhost",
    mail_from: str = "load@bench.example",
    time_limit: float = 60.0,
    timeout: float = 30.0,
) -> LevelResult:
    """run_level in a fresh event loop (each level starts from a clean loop)."""
    return asyncio.run(
        run_level(
            host,
            port,
            sessions,
            messages,
            size=size,
            rcpt=rcpt,
            mail_from=mail_from,
            time_limit=time_limit,
            timeout=timeout,
        )
    )


COLUMNS = ("sessions", "msgs", "msg/s", "p50 ms", "p99 ms", "errors")


def format_row(result: LevelResult, label: str | None = None) -> list[str]:
    row = [
        str(result.sessions),
        str(result.accepted),
        f"{result.rate:.0f}",
        f"{result.percentile(50):.2f}",
        f"{result.percentile(99):.2f}",
        str(result.errors),
    ]
    return ([label] if label is not None else []) + row


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str], width: int = 8) -> str:
    """Fixed-width columns (first left-aligned), so rows printed one by one line up."""
    widths = [max(width, len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])


def notes(result: LevelResult, label: str = "") -> list[str]:
    """Footnotes worth printing under the table for this row."""
    who = f"{label} " if label else ""
    out = []
    if result.time_limited:
        out.append(
            f"{who}sessions={result.sessions}: stopped by the time limit after "
            f"{result.accepted + result.errors} of {result.requested} messages"
        )
    if result.error_kinds:
        kinds = ", ".join(f"{k} x{v}" for k, v in result.error_kinds.most_common())
        out.append(f"{who}sessions={result.sessions}: errors: {kinds}")
    if result.client_cpu_share > 0.8:
        out.append(
            f"{who}sessions={result.sessions}: load generator used "
            f"{result.client_cpu_share:.0%} of a core: the figure may be client-bound"
        )
    return out


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("session counts must be positive")
    return levels


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--sessions",
        type=parse_levels,
        default=[1, 10, 50],
        help="comma-separated concurrency levels (default 1,10,50)",
    )
    parser.add_argument(
        "--messages", type=int, default=1000, help="messages per concurrency level (default 1000)"
    )
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument("--rcpt", default="postmaster@localhost")
    parser.add_argument("--mail-from", default="load@bench.example")
    parser.add_argument(
        "--time-limit",
        type=_positive,
        default=60.0,
        help="seconds per concurrency level before it is stopped (default 60)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=30.0,
        help="seconds to wait for any one reply (default 30)",
    )
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error("--messages must be positive")

    rows: list[list[str]] = []
    footnotes: list[str] = []
    print(format_table([], COLUMNS), flush=True)
    for level in args.sessions:
        res = run_level_sync(
            args.host,
            args.port,
            level,
            args.messages,
            size=args.size,
            rcpt=args.rcpt,
            mail_from=args.mail_from,
            time_limit=args.time_limit,
            timeout=args.timeout,
        )
        rows.append(format_row(res))
        footnotes += notes(res)
        # Print each row as soon as it is measured, aligned with the header above.
        print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    for line in footnotes:
        print(f"  * {line}")
    return 1 if any(r[-1] != "0" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
