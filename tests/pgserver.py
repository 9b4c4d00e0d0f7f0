"""A throw-away PostgreSQL server for the tests: Debian's postgresql 15 binaries, a data
directory in a temporary directory owned by an unprivileged user (initdb and postgres refuse
to run as root), listening only on a Unix socket in that directory, fsync on."""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

BIN = Path("/usr/lib/postgresql/15/bin")
USER = "nobody"
PORT = 5432  # only names the socket file: nothing listens on TCP
_databases = itertools.count(1)


def available() -> str | None:
    """Why the tests cannot start a PostgreSQL here, or None when they can."""
    if not (BIN / "initdb").exists():
        return f"{BIN}/initdb not found (apt-get install postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "runuser not found"
    return None


class PGServer:
    """One server; `start` and `stop` may be called again (a test stops it mid-load)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="relayhub-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        if os.geteuid() == 0:  # initdb and postgres refuse root: they run as USER
            entry = pwd.getpwnam(USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o755)  # the hubs (root in the tests) reach the socket
        self._as_user(str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                      "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{self.root}'\n"
                       f"port = {PORT}\nfsync = on\nsynchronous_commit = on\n"
                       "max_connections = 300\nshared_buffers = 32MB\n")
        self.start()

    def _as_user(self, *argv: str) -> None:
        prefix = ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *argv], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> None:
        self._as_user(str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                      "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_user(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.root} port={PORT} user=postgres dbname={dbname}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its DSN."""
        name = f"t{os.getpid()}_{next(_databases)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
