"""Throw-away Postfix instance in a private directory, listening only on loopback."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal

__all__ = [
    "Delivery",
    "PostfixError",
    "PostfixInstance",
    "alive",
    "free_port",
    "process_tree",
    "spawn_guard",
    "wait_for_banner",
]

Delivery = Literal["maildir", "discard", "hold"]

_SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
POSTFIX = shutil.which("postfix", path=_SBIN) or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf", path=_SBIN) or "/usr/sbin/postconf"


def _guard_main(argv: Sequence[str]) -> None:
    """Dead-man switch body, run in its own interpreter by spawn_guard()."""
    parent, lifetime, group, remove = int(argv[0]), float(argv[1]), int(argv[2]), argv[3]
    command = list(argv[4:])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal Ctrl-C is for our parent
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the parent cleaned up itself
    end = time.monotonic() + lifetime
    while os.getppid() == parent and time.monotonic() < end:
        time.sleep(0.5)
    orphaned = os.getppid() != parent
    if command:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
                check=False,
            )

    def group_alive() -> bool:
        try:
            os.killpg(group, 0)
        except OSError:
            return False
        return True

    if group > 0:
        # The group is the session spawn_guard's caller created for its server, so this
        # reaches exactly that server's processes (Postfix's master has its own group, but
        # `command` stopped it above).
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            if group_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, sig)
            until = time.monotonic() + wait
            while group_alive() and time.monotonic() < until:
                time.sleep(0.2)
    if remove and orphaned:
        shutil.rmtree(remove, ignore_errors=True)


def spawn_guard(
    lifetime: float,
    *,
    command: Sequence[str] = (),
    kill_group: int = 0,
    remove: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a dead-man switch for a server this process started.

    If this process dies without cleaning up (SIGKILL, OOM, a CI timeout), or after
    `lifetime` seconds, the guard runs `command`, then
    SIGTERM/SIGKILLs process group `kill_group` (0: none), and, only if this process died,
    removes `remove`.  Stop it with .terminate() after cleaning up normally.
    """
    # Imported from this file's directory as a top-level module: the guard needs nothing
    # but the standard library, whichever way the caller imported us.
    bootstrap = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
        "import postfix; postfix._guard_main(sys.argv[1:])"
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            bootstrap,
            str(os.getpid()),
            str(lifetime),
            str(kill_group),
            str(remove or ""),
            *command,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C meant for us must not kill it first
    )


class PostfixError(RuntimeError):
    """Postfix could not be configured, started or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on host a moment ago (bind port 0, then release it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_banner(
    host: str, port: int, timeout: float, running: Callable[[], bool] | None = None
) -> str:
    """Connect until the server sends its 220 greeting and return that line.

    `running`, when given, returns False once the server process has died, so that a server
    that crashed at start-up fails fast instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if running is not None and not running():
            raise PostfixError(f"server for {host}:{port} exited before accepting connections")
        try:
            with socket.create_connection((host, port), timeout=2.0) as s:
                line = s.makefile("rb").readline().decode("utf-8", "replace").rstrip("\r\n")
                s.sendall(b"QUIT\r\n")
            if line.startswith("220"):
                return line
            last = PostfixError(f"unexpected greeting {line!r}")
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise PostfixError(f"no SMTP greeting on {host}:{port} within {timeout:.0f}s: {last}")


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, utime+stime ticks) of a process from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[11]) + int(fields[12])


def process_tree(root: int) -> dict[int, int]:
    """Live (non-zombie) processes in the tree under root, including root: pid -> CPU ticks."""
    stats: dict[int, tuple[str, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
            stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (_state, ppid, _cpu) in stats.items():
        children.setdefault(ppid, []).append(pid)
    tree: dict[int, int] = {}
    todo = [root] if root in stats else []
    while todo:
        pid = todo.pop()
        state, _ppid, cpu = stats[pid]
        if state != "Z":
            tree[pid] = cpu
        todo.extend(children.get(pid, ()))
    return tree


def alive(pids: Iterable[int]) -> set[int]:
    """The pids that still belong to a running (not zombie) process."""
    return {p for p in pids if (st := _proc_stat(p)) is not None and st[0] != "Z"}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PostfixInstance:
    """A private Postfix (own config, queue, data and Maildir directories) on 127.0.0.1:port.

    Nothing it accepts can leave the machine: it listens on loopback only, makes no DNS
    lookups, and every transport that could reach another host is `error:` unless a loopback
    `relayhost` is given.  Recipient domains (``domains``; ``None`` = every domain, handy as
    a catch-all relay target) are virtual(8) mailbox domains; ``delivery`` chooses what
    happens to a message after Postfix has queued it (fsync'd) and said 250:

    - "maildir": delivered into a Maildir — ``<dir>/mail/<domain>/<local>/`` for each address
      in ``mailboxes``, ``<dir>/mail/catchall/`` for every other address;
    - "discard": qmgr hands it to discard(8), which drops it;
    - "hold": it goes straight into the hold queue and is never delivered.

    With ``catchall=False`` there is no catch-all: a recipient in ``domains`` that is not in
    ``mailboxes`` is refused at RCPT (``550 5.1.1 ... User unknown in virtual mailbox table``).

    ``relayhost=("127.0.0.1", port)`` makes Postfix relay mail for other domains there.
    ``main_cf`` / ``master_cf`` add or override settings.  Must run as root, like any Postfix.

        with PostfixInstance(mailboxes=["postmaster@localhost"]) as pf:
            ...  # SMTP to pf.host:pf.port, then pf.messages("postmaster@localhost")
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        domains: Iterable[str] | None = ("localhost",),
        mailboxes: Iterable[str] = (),
        catchall: bool = True,
        delivery: Delivery = "maildir",
        relayhost: tuple[str, int] | None = None,
        hostname: str = "postfix.bench.invalid",
        main_cf: Mapping[str, str] | None = None,
        master_cf: Sequence[str] = (),
        base_dir: str | os.PathLike[str] | None = None,
        keep: bool = False,
        start_timeout: float = 30.0,
        max_lifetime: float = 3600.0,
    ) -> None:
        if delivery not in ("maildir", "discard", "hold"):
            raise ValueError(f"unknown delivery mode {delivery!r}")
        if relayhost is not None and not _is_loopback(relayhost[0]):
            # The bench and the tests must never talk to anything but this machine.
            raise ValueError(f"relayhost must be a loopback address, not {relayhost[0]!r}")
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port(self.host)
        self.domains = None if domains is None else [d.lower() for d in domains]
        self.mailboxes = [m.lower() for m in mailboxes]
        self.catchall = catchall
        self.delivery: Delivery = delivery
        self.relayhost = relayhost
        self.hostname = hostname
        self.extra_main_cf = dict(main_cf or {})
        self.extra_master_cf = list(master_cf)
        self.keep = keep
        self.start_timeout = start_timeout
        self.max_lifetime = max_lifetime
        self._base_arg = base_dir
        self._own_base = False
        self.base: Path | None = None
        self.master_pid: int | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: BinaryIO | None = None

    # ---- paths and inspection ----------------------------------------------------------

    def _dir(self, name: str) -> Path:
        if self.base is None:
            raise PostfixError("instance directory not created yet (call start())")
        return self.base / name

    @property
    def config_dir(self) -> Path:
        return self._dir("etc")

    @property
    def queue_dir(self) -> Path:
        return self._dir("spool")

    @property
    def mail_dir(self) -> Path:
        return self._dir("mail")

    @property
    def log_file(self) -> Path:
        return self._dir("log") / "postfix.log"

    def maildir(self, address: str) -> Path:
        """The Maildir that "maildir" delivery uses for address (it may not exist yet)."""
        address = address.lower()
        if address in self.mailboxes:
            local, _, domain = address.rpartition("@")
            return self.mail_dir / domain / local
        return self.mail_dir / "catchall"

    def messages(self, address: str) -> list[Path]:
        """Message files delivered so far to address (its Maildir's new/ and cur/)."""
        md = self.maildir(address)
        files = sorted(
            p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir()
        )
        if address.lower() in self.mailboxes:
            return files
        # The catch-all is shared: pick this address's copies by virtual(8)'s Delivered-To.
        want = f"delivered-to: {address.lower()}"
        return [p for p in files if want in p.read_bytes().decode("utf-8", "replace").lower()]

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def queue_size(self) -> int:
        """Messages still in the queue (maildrop, incoming, active, deferred, hold)."""
        total = 0
        for q in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(self.queue_dir / q):
                total += len(files)
        return total

    # ---- configuration -------------------------------------------------------------------

    def _main_cf(self) -> dict[str, str]:
        assert self.base is not None
        pw = pwd.getpwnam("postfix")
        nowhere = "error:5.7.1 throw-away bench Postfix never delivers off this machine"
        cf: dict[str, str] = {
            "compatibility_level": "3.6",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self._dir("data")),
            # Containers and CI have no syslog: postlogd writes this file instead.
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.base),
            # Fixed names, so Postfix never looks up the machine's own FQDN.
            "myhostname": self.hostname,
            "mydomain": self.hostname.partition(".")[2] or "invalid",
            "myorigin": "$myhostname",
            "smtpd_banner": "$myhostname ESMTP Postfix (bench)",
            "biff": "no",
            # Loopback only (master.cf also binds the smtpd to 127.0.0.1:PORT explicitly).
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # No DNS anywhere: no client reverse lookups, no MX/A lookups for delivery
            # (smtp_dns_support_level replaces the deprecated disable_dns_lookups in 3.x).
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            # Every recipient domain is a virtual(8) mailbox domain; the local(8) class is
            # empty, so neither the system alias file nor passwd is ever consulted.
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "local_transport": nowhere,
            "relay_domains": "",
            "virtual_mailbox_domains": (
                "static:all" if self.domains is None else ", ".join(self.domains)
            ),
            "virtual_mailbox_maps": f"texthash:{self.config_dir / 'vmailbox'}"
            + (", static:catchall/" if self.catchall else ""),
            "virtual_mailbox_base": str(self.mail_dir),
            # virtual(8) needs an unprivileged owner; mail_owner is the one user we know exists.
            "virtual_minimum_uid": str(pw.pw_uid),
            "virtual_uid_maps": f"static:{pw.pw_uid}",
            "virtual_gid_maps": f"static:{pw.pw_gid}",
            "virtual_transport": "discard" if self.delivery == "discard" else "virtual",
            "default_transport": nowhere,
            "relay_transport": nowhere,
            # Only our own domains are accepted, unless a (loopback) relayhost is configured.
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "notify_classes": "",
        }
        if self.delivery == "hold":
            cf["smtpd_end_of_data_restrictions"] = "check_client_access static:HOLD"
        if self.relayhost is not None:
            host, port = self.relayhost
            cf["relayhost"] = f"[{host}]:{port}"
            cf["default_transport"] = cf["relay_transport"] = "smtp"
            cf["smtpd_relay_restrictions"] = "permit_mynetworks, reject_unauth_destination"
        cf.update(self.extra_main_cf)
        return cf

    def _master_cf(self) -> list[str]:
        # Debian's stock service list with chroot "n" everywhere (a private queue directory
        # has none of the files a chroot needs) and the smtpd bound to loopback:PORT only.
        services = [
            f"{self.host}:{self.port} inet n - n - - smtpd",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "local unix - n n - - local",
            "virtual unix - n n - - virtual",
            "lmtp unix - - n - - lmtp",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        return services + self.extra_master_cf

    def _write_config(self) -> None:
        assert self.base is not None
        pw = pwd.getpwnam("postfix")
        # Postfix daemons drop to mail_owner and must traverse every parent of the queue
        # directory, so the private tree is 0755 (mkdtemp makes it 0700).
        self.base.chmod(0o755)
        for name in ("etc", "spool", "log"):
            self._dir(name).mkdir(mode=0o755, exist_ok=True)
        # virtual(8) creates the Maildirs as mail_owner (virtual_uid_maps above).
        self.mail_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(self.mail_dir, pw.pw_uid, pw.pw_gid)
        lines = ["# Written by bench/postfix.py for a throw-away instance."]
        lines += [f"{k} = {v}" for k, v in self._main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text("\n".join(self._master_cf()) + "\n")
        # Explicit mailboxes; a trailing "/" means Maildir.  (virtual(8) refuses regexp
        # substitution, so a per-address catch-all is not possible; see static:catchall/.)
        (self.config_dir / "vmailbox").write_text(
            "".join(f"{m} {m.rpartition('@')[2]}/{m.rpartition('@')[0]}/\n" for m in self.mailboxes)
        )

    # ---- process control -------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def postconf(self, *args: str) -> str:
        """Run postconf against this instance's configuration and return its output."""
        res = subprocess.run(
            [POSTCONF, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if res.returncode != 0:
            raise PostfixError(f"postconf {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _diagnostics(self) -> str:
        try:
            console = (self._dir("log") / "start-fg.out").read_text(errors="replace")
        except OSError:
            console = ""
        return (
            f"--- postfix start-fg output ---\n{console[-3000:]}\n"
            f"--- {self.log_file} ---\n{self.log_text()[-3000:]}"
        )

    def start(self) -> PostfixInstance:
        """Create the directory and configuration, start Postfix, wait for its greeting."""
        if os.geteuid() != 0:
            raise PostfixError("a Postfix instance needs root (master(8) must run as root)")
        if not Path(POSTFIX).exists():
            raise PostfixError(f"{POSTFIX} not found: install the Debian 'postfix' package")
        if self._base_arg is None:
            self.base = Path(tempfile.mkdtemp(prefix="bench-postfix-"))
            self._own_base = True
        else:
            self.base = Path(self._base_arg).resolve()
            self.base.mkdir(parents=True, exist_ok=True)
        try:
            self._write_config()
            # "postfix -c DIR" exports MAIL_CONFIG=DIR itself; as root no
            # alternate_config_directories entry in /etc/postfix/main.cf is needed.
            # "start-fg" runs the same checks as "start" (post-install create-missing makes
            # the queue and data directories with Postfix's owners and modes), then runs
            # master(8) as our descendant instead of daemonizing it, so it is reaped when it
            # exits (this VM's PID 1 reaps orphans only lazily) and its exit is observable.
            # Own session: a Ctrl-C meant for us must not reach it before stop() runs.
            self._console = (self._dir("log") / "start-fg.out").open("wb")
            self._proc = subprocess.Popen(
                [POSTFIX, "-c", str(self.config_dir), "start-fg"],
                stdin=subprocess.DEVNULL,
                stdout=self._console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self._watchdog = spawn_guard(
                self.max_lifetime,
                command=[POSTFIX, "-c", str(self.config_dir), "stop"],
                kill_group=self._proc.pid,
                remove=self.base if self._own_base and not self.keep else None,
            )
            try:
                wait_for_banner(self.host, self.port, self.start_timeout, running=self._running)
            except PostfixError as exc:
                raise PostfixError(f"{exc}\n{self._diagnostics()}") from None
            self.master_pid = self._read_master_pid()
        except BaseException:
            self.stop()
            raise
        return self

    def processes(self) -> dict[int, int]:
        """Live Postfix processes (master and its children): pid -> CPU ticks so far."""
        return process_tree(self._proc.pid) if self._proc is not None else {}

    def stop(self) -> None:
        """Stop Postfix, wait until none of its processes is left, remove our directory."""
        try:
            if self._proc is not None:
                started = set(self.processes())
                if self._running():
                    self._run("stop", timeout=60)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and (self._running() or alive(started)):
                    time.sleep(0.1)
                # Last resort, and only processes we started, by PID: whatever is left of the
                # start-fg wrapper, the master and its children (which normally notice the
                # master has gone and exit on their own).
                leftovers = alive(started)
                for pid in leftovers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(10)
                self._proc = None
                self.master_pid = None
                if leftovers:
                    raise PostfixError(f"Postfix processes {sorted(leftovers)} had to be killed")
        finally:
            if self._console is not None:
                self._console.close()
                self._console = None
            if self._watchdog is not None:
                self._watchdog.terminate()  # its SIGTERM handler exits without touching Postfix
                try:
                    self._watchdog.wait(10)
                except subprocess.TimeoutExpired:
                    self._watchdog.kill()
                    self._watchdog.wait()
                self._watchdog = None
            if self.base is not None and self._own_base and not self.keep:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    # Smoke test: start, show the greeting and the effective non-default settings, stop.
    with PostfixInstance() as pf:
        print(wait_for_banner(pf.host, pf.port, 5))
        print(pf.postconf("-n"), end="")
        print(f"running on {pf.host}:{pf.port}, master PID {pf.master_pid}, dir {pf.base}")
    print("stopped", file=sys.stderr)
