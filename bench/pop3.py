"""POP3 download benchmark: relayhub's POP3 service against a throw-away Dovecot, same messages."""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

# Two scenarios, each a full fetchmail-style session per user (USER/PASS, STAT, then RETR n and
# DELE n for every message, QUIT — the deletions happen at QUIT):
#
#     single    one user downloads and deletes 1,000 messages of 4 KB
#     parallel  10 users at once, 200 messages of 4 KB each
#
# Both servers get identical Maildirs, rebuilt before every round (so neither has warm caches
# or indexes from the round before), with the file names relayhub's delivery writes
# (`<sec>.M<usec>P<pid>R<random>.<host>,S=<size>`). Both check {PLAIN} passwords, so the
# login cost is comparable (relayhub's default argon2id would add ~0.1 s of CPU per login).
#
# relayhub runs as the daemon (`twistd relayhub`) with `--workers` processes (default: the CPU
# count, the daemon's own default) sharing the POP3 port. Dovecot (Debian `dovecot-pop3d`)
# runs from a private configuration directory on a loopback port, with a passwd-file, as
# `nobody`; it forks a pop3 process per session. Neither is left running: both are stopped
# at the end, and a dead-man switch (bench.postfix.spawn_guard) stops them if this script is killed.
#
#     python bench/pop3.py [--rounds 5] [--no-dovecot]

# `python bench/pop3.py` puts bench/ itself on sys.path; the modules import as bench.*.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.accept import default_twistd  # noqa: E402
from bench.postfix import free_port, spawn_guard  # noqa: E402

PASSWORD = "bench-password"
DOVECOT = shutil.which("dovecot", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/dovecot"
START_TIMEOUT = 20.0
# A server that outlives this (the script was killed) is stopped by the dead-man switch.
GUARD_LIFETIME = 3600.0


class ServerFailed(RuntimeError):
    """A server under test could not be started."""


# --------------------------------------------------------------------------- messages


def make_message(number: int, size: int) -> bytes:
    """A message of exactly `size` octets with CRLF line ends; some lines start with "."
    so that both servers dot-stuff."""
    head = (f"Return-Path: <bench@example.org>\r\nDelivered-To: user@example.org\r\n"
            f"From: bench@example.org\r\nSubject: benchmark message {number}\r\n\r\n").encode()
    body = bytearray()
    line = 0
    while len(head) + len(body) < size:
        prefix = b"." if line % 10 == 0 else b""
        body += prefix + b"%06d " % line + b"x" * 66 + b"\r\n"
        line += 1
    message = head + bytes(body)
    return message[: size - 2] + b"\r\n"


def fill_maildir(maildir: Path, messages: list[bytes], owner: tuple[int, int] | None) -> None:
    """A fresh Maildir holding `messages` in new/, named as relayhub's delivery names them."""
    shutil.rmtree(maildir, ignore_errors=True)
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, mode=0o700)
    base = int(time.time())
    for index, message in enumerate(messages):
        name = f"{base}.M{index}P{os.getpid()}R{index:016x}.bench,S={len(message)}"
        (maildir / "new" / name).write_bytes(message)
    if owner is not None:
        for path in [maildir, *maildir.rglob("*")]:
            os.chown(path, *owner)


def replace_file(path: Path, text: str) -> None:
    """Write by rename: a server re-reading the file never sees half of it."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    temporary.chmod(0o644)
    os.replace(temporary, path)


def remaining(maildir: Path) -> int:
    return sum(1 for sub in ("new", "cur") for _ in (maildir / sub).iterdir())


# --------------------------------------------------------------------------- client


class Pop3Client:
    """A minimal POP3 client that reads multi-line responses in large recv() calls, so the
    client's own cost stays far below either server's."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buffer = bytearray()
        self.status()

    def _fill(self) -> None:
        data = self.sock.recv(256 * 1024)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data

    def status(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        if not line.startswith(b"+OK"):
            raise RuntimeError(f"server said {line!r}")
        return line

    def command(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.status()

    def body(self) -> int:
        """Read a multi-line body; returns its octets on the wire (dot-stuffed)."""
        start = 0
        while True:
            if self.buffer.startswith(b".\r\n"):
                end = 0
                break
            end = self.buffer.find(b"\r\n.\r\n", start)
            if end >= 0:
                end += 2
                break
            start = max(0, len(self.buffer) - 4)
            self._fill()
        del self.buffer[: end + 3]
        return end

    def close(self) -> None:
        self.sock.close()


def download_and_delete(port: int, user: str) -> tuple[int, int]:
    """One fetchmail-style session; returns (messages, octets received in bodies)."""
    client = Pop3Client(port)
    try:
        client.command(f"USER {user}")
        client.command(f"PASS {PASSWORD}")
        count = int(client.command("STAT").split()[1])
        octets = 0
        for number in range(1, count + 1):
            client.command(f"RETR {number}")
            octets += client.body()
            client.command(f"DELE {number}")
        client.command("QUIT")
        return count, octets
    finally:
        client.close()


def run_sessions(port: int, users: list[str]) -> tuple[float, int, int]:
    """All users' sessions at once; (wall-clock seconds, messages, octets)."""
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(users) + 1)

    def one(user: str) -> None:
        barrier.wait()
        try:
            results.append(download_and_delete(port, user))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed, sum(r[0] for r in results), sum(r[1] for r in results)


# --------------------------------------------------------------------------- servers


def wait_for_greeting(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), \
                socket.create_connection(("127.0.0.1", port), timeout=2) as probe:
            if probe.makefile("rb").readline().startswith(b"+OK"):
                probe.sendall(b"QUIT\r\n")
                return
        time.sleep(0.1)
    raise ServerFailed(f"no POP3 greeting on port {port} within {START_TIMEOUT:.0f}s")


class Server:
    """A POP3 server in its own process group, with a dead-man switch."""

    name = ""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.guard: subprocess.Popen[bytes] | None = None
        self.log = directory / "server.log"

    @property
    def mail_root(self) -> Path:
        raise NotImplementedError

    owner: tuple[int, int] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self, users: Mapping[str, list[bytes]]) -> None:
        for user, messages in users.items():
            fill_maildir(self.mail_root / user, messages, self.owner)

    def __enter__(self) -> Server:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.guard = spawn_guard(GUARD_LIFETIME, kill_group=self.process.pid)
        try:
            wait_for_greeting(self.port, self.process, self.log)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
            # Dovecot's children leave after their master; wait for the whole group.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.process.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        if self.guard is not None:
            self.guard.terminate()
            self.guard.wait(5)


class RelayhubServer(Server):
    """The daemon as an administrator runs it (`twistd relayhub`, `workers` processes
    sharing the POP3 port), like Dovecot with its process per session."""

    name = "relayhub"

    def __init__(self, directory: Path, users: list[str], workers: int) -> None:
        super().__init__(directory)
        self.workers = workers
        # Every user of every scenario from the start: the daemon reads the file when it
        # starts (a change later would need a reload).
        replace_file(directory / "users",
                     "".join(f"{user}:{{PLAIN}}{PASSWORD}:Bench\n" for user in users))

    @property
    def mail_root(self) -> Path:
        return self.directory / "state" / "mail"

    def command(self) -> list[str]:
        d = self.directory
        (d / "relayhub.toml").write_text(
            f'[server]\nhostname = "bench.test"\nstate_dir = "{d / "state"}"\n'
            f"workers = {self.workers}\n"
            f'[smtp]\nlisten = ["tcp:{free_port()}:interface=127.0.0.1"]\n'
            f'[pop3]\nlisten = ["tcp:{self.port}:interface=127.0.0.1"]\n'
            "allow_plaintext_auth = true\n"
            f'[users]\nfile = "{d / "users"}"\n')
        return [default_twistd(), "-n", "--pidfile=", "relayhub", "-c", str(d / "relayhub.toml")]


class DovecotServer(Server):
    name = "dovecot"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        nobody = pwd.getpwnam("nobody")
        self.owner = (nobody.pw_uid, nobody.pw_gid)

    @property
    def mail_root(self) -> Path:
        return self.directory / "mail"

    def command(self) -> list[str]:
        d = self.directory
        (d / "dovecot.conf").write_text(f"""\
base_dir = {d}/run
state_dir = {d}/state
instance_name = relayhub-bench-{os.getpid()}
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
log_path = {d}/dovecot.log
mail_location = maildir:{d}/mail/%u
passdb {{
  driver = passwd-file
  args = {d}/passwd
}}
userdb {{
  driver = passwd-file
  args = {d}/passwd
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
""")
        self.mail_root.mkdir(exist_ok=True)
        (d / "passwd").touch()
        return [DOVECOT, "-F", "-c", str(d / "dovecot.conf")]

    def prepare(self, users: Mapping[str, list[bytes]]) -> None:
        uid, gid = self.owner or (0, 0)
        replace_file(self.directory / "passwd", "".join(
            f"{user}:{{PLAIN}}{PASSWORD}:{uid}:{gid}::{self.directory}/home/{user}::\n"
            for user in users))
        # Dovecot re-reads a passwd file at most once a second: let the new one be seen.
        time.sleep(1.05 - time.time() % 1)
        super().prepare(users)


# --------------------------------------------------------------------------- main


def scenario_users(scenario: str, args: argparse.Namespace) -> dict[str, list[bytes]]:
    if scenario == "single":
        return {"solo": [make_message(i, args.size) for i in range(args.messages)]}
    return {f"user{k}": [make_message(i, args.size) for i in range(args.per_user)]
            for k in range(args.users)}


@contextlib.contextmanager
def servers(work: Path, dovecot: bool, users: list[str], workers: int
            ) -> Iterator[list[Server]]:
    with contextlib.ExitStack() as stack:
        started: list[Server] = []
        for name in ["relayhub"] + (["dovecot"] if dovecot else []):
            directory = work / name
            directory.mkdir(mode=0o755)
            server = RelayhubServer(directory, users, workers) if name == "relayhub" \
                else DovecotServer(directory)
            started.append(stack.enter_context(server))
        yield started


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=1000, help="single scenario")
    parser.add_argument("--users", type=int, default=10, help="parallel scenario")
    parser.add_argument("--per-user", type=int, default=200, help="parallel scenario")
    parser.add_argument("--size", type=int, default=4096, help="octets per message")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="relayhub's worker processes (default: the CPU count, as the "
                             "daemon's own default)")
    parser.add_argument("--no-dovecot", action="store_true")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (server logs, Maildirs) for a look")
    args = parser.parse_args(argv)
    scenarios = {
        "single": f"1 user x {args.messages} msgs x {args.size} B",
        "parallel": f"{args.users} users x {args.per_user} msgs x {args.size} B (parallel)",
    }

    dovecot = not args.no_dovecot
    skipped = ""
    if dovecot and not Path(DOVECOT).exists():
        dovecot, skipped = False, f"dovecot skipped: {DOVECOT} missing (apt-get install " \
                                  "dovecot-pop3d)"
    elif dovecot and os.geteuid() != 0:
        dovecot, skipped = False, "dovecot skipped: needs root (runs its sessions as nobody)"

    work = Path(tempfile.mkdtemp(prefix="relayhub-pop3-bench-"))
    work.chmod(0o755)  # Dovecot's unprivileged processes must reach their files
    times: dict[tuple[str, str], list[float]] = {}
    totals: dict[str, tuple[int, int]] = {}
    try:
        everyone = [user for scenario in scenarios for user in scenario_users(scenario, args)]
        with servers(work, dovecot, everyone, args.workers) as running:
            for _round in range(args.rounds):
                for scenario in scenarios:
                    users = scenario_users(scenario, args)
                    expected = sum(len(m) for ms in users.values() for m in ms)
                    for server in running:
                        server.prepare(users)
                        elapsed, count, _octets = run_sessions(server.port, list(users))
                        left = sum(remaining(server.mail_root / user) for user in users)
                        if count != sum(map(len, users.values())) or left:
                            raise RuntimeError(f"{server.name} {scenario}: {count} downloaded, "
                                               f"{left} left behind")
                        times.setdefault((scenario, server.name), []).append(elapsed)
                        totals[scenario] = (count, expected)
    except ServerFailed as exc:
        print(f"server failed to start: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    header = f"{'scenario':<45} {'server':<9} {'median s':>9} {'best s':>8} {'msg/s':>8} " \
             f"{'MiB/s':>7}"
    print(header)
    print("-" * len(header))
    for scenario, label in scenarios.items():
        count, octets = totals[scenario]
        for (measured, server_name), samples in times.items():
            if measured != scenario:
                continue
            median = statistics.median(samples)
            print(f"{label:<45} {server_name:<9} {median:>9.3f} {min(samples):>8.3f} "
                  f"{count / median:>8.0f} {octets / median / 2**20:>7.1f}")
    print(f"({args.rounds} rounds; download with RETR then DELE of every message, QUIT; "
          f"relayhub with {args.workers} workers; {os.cpu_count()} CPUs)")
    if skipped:
        print(skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
