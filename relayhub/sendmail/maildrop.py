"""The maildrop: how relayhub-sendmail hands a message to the daemon, running or not.

Postfix's postdrop design without a set-group-ID program: `<state_dir>/maildrop/` is owned
by the service user with mode 1733 (anyone may create files, nobody but the owner may list
the directory, and the sticky bit stops users from removing each other's files). The command
writes `tmp.<token>`, fsyncs it, renames it to `<token>` and fsyncs the directory: only
then does it exit 0, so an accepted message survives a crash or a power cut. The daemon's
pickup (relayhub.sendmail.pickup) moves each file into the queue store.

Trust comes from the kernel, never from the file: the submitting user is the file's owner
(st_uid; a file with more than one link is refused, so a hard link to someone else's file
cannot borrow its owner), and the pickup checks the envelope sender against that user's
rights again. Files are created mode 0644 so that a daemon running as its own user can read
them; their names are 128-bit random tokens in a directory others cannot list.

File layout: the message (CRLF line ends), then the envelope as one JSON object, then a
16-byte trailer: the JSON object's length as 15 decimal digits and a LF.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from relayhub.masquerade import masquerade_domain

DIRECTORY = "maildrop"
MODE = 0o1733
FILE_MODE = 0o644
TMP_PREFIX = "tmp."
_TRAILER = 16


class MaildropError(Exception):
    """A maildrop file that cannot be used (not a plain file, bad layout, too big)."""


@dataclass(frozen=True)
class DropEnvelope:
    sender: str  # "" is the null sender
    recipients: tuple[str, ...]
    body_type: str = "7BIT"
    smtputf8: bool = False
    notify: tuple[str, ...] = ()
    ret: str | None = None
    envid: str | None = None
    protocol: str = "local"  # "local", or the RFC 3848 keyword of a -bs session
    helo: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> DropEnvelope:
        try:
            raw = json.loads(data.decode("utf-8"))
            return cls(
                sender=str(raw["sender"]),
                recipients=tuple(str(r) for r in raw["recipients"]),
                body_type=str(raw.get("body_type", "7BIT")),
                smtputf8=bool(raw.get("smtputf8", False)),
                notify=tuple(str(n) for n in raw.get("notify", ())),
                ret=None if raw.get("ret") is None else str(raw["ret"]),
                envid=None if raw.get("envid") is None else str(raw["envid"]),
                protocol=str(raw.get("protocol", "local")),
                helo=str(raw.get("helo", "")),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise MaildropError(f"bad envelope: {error}") from None


@dataclass(frozen=True)
class Drop:
    """A maildrop file as the pickup reads it."""

    name: str
    uid: int  # who wrote it (the file's owner)
    envelope: DropEnvelope
    message: bytes


def maildrop_path(state_dir: Path) -> Path:
    return Path(state_dir) / DIRECTORY


def ensure_maildrop(state_dir: Path) -> Path:
    """Create the maildrop (mode 1733) if missing, owned as the state directory is. Local
    users must reach it: the state directory gets search permission for others (0711,
    like /var/spool/postfix; its queue/ and mail/ stay 0700, and nobody else may list it)."""
    info = Path(state_dir).stat()
    if info.st_uid == os.geteuid() and not info.st_mode & stat.S_IXOTH:
        os.chmod(state_dir, stat.S_IMODE(info.st_mode) | 0o011)
    path = maildrop_path(state_dir)
    if not path.is_dir():
        with contextlib.suppress(FileExistsError):  # made by another caller meanwhile
            path.mkdir()
        owner = Path(state_dir).stat()
        if os.geteuid() == 0 and path.stat().st_uid != owner.st_uid:
            os.chown(path, owner.st_uid, owner.st_gid)
    if stat.S_IMODE(path.stat().st_mode) != MODE and path.stat().st_uid == os.geteuid():
        os.chmod(path, MODE)  # mkdir's mode is cut by the umask
    return path


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        # Other users may not read the maildrop (so they cannot list each other's mail),
        # and a directory opened without read permission cannot be fsync'd: flush every
        # file system instead. Rare (local submissions by non-root users) and still correct.
        os.sync()
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DropWriter:
    """One message being written into the maildrop; `commit` makes it durable."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.token = secrets.token_hex(16)
        self._tmp = directory / f"{TMP_PREFIX}{self.token}"
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     FILE_MODE)
        os.fchmod(fd, FILE_MODE)  # whatever the caller's umask
        self._file = os.fdopen(fd, "wb")
        self.size = 0
        self._done = False

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def commit(self, envelope: DropEnvelope) -> Path:
        """Write the envelope, fsync file and directory; the file is then the daemon's."""
        blob = envelope.to_json()
        self._file.write(blob + b"%015d\n" % len(blob))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.directory / self.token
        os.rename(self._tmp, final)
        _fsync_directory(self.directory)
        self._done = True
        return final

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._file.close()
            self._tmp.unlink(missing_ok=True)


def pending(directory: Path) -> list[str]:
    """Names of committed maildrop files, oldest first."""
    entries = []
    with os.scandir(directory) as found:
        for entry in found:
            if not entry.name.startswith(TMP_PREFIX) and not entry.name.startswith("."):
                try:
                    entries.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
                except FileNotFoundError:
                    continue
    return [name for _mtime, name in sorted(entries)]


def stale_temporaries(directory: Path, older_than: float, now: float) -> list[str]:
    """tmp. files of commands that died before their commit."""
    names = []
    with os.scandir(directory) as found:
        for entry in found:
            if entry.name.startswith(TMP_PREFIX):
                try:
                    if now - entry.stat(follow_symlinks=False).st_mtime > older_than:
                        names.append(entry.name)
                except FileNotFoundError:
                    continue
    return names


def read_drop(directory: Path, name: str, max_size: int) -> Drop:
    """Read one committed file (blocking: call it in a thread). Raises MaildropError."""
    try:
        fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise MaildropError(f"cannot open: {error.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise MaildropError("not a regular file")
    with os.fdopen(fd, "rb") as file:
        if info.st_nlink != 1:
            raise MaildropError("has other links")
        if info.st_size > max_size:
            raise MaildropError(f"too big ({info.st_size} bytes)")
        data = file.read(max_size + 1)
    trailer = data[-_TRAILER:]
    if len(data) < _TRAILER or not trailer[:15].isdigit() or trailer[15:] != b"\n":
        raise MaildropError("no envelope trailer")
    length = int(trailer[:15])
    if length > len(data) - _TRAILER:
        raise MaildropError("bad envelope length")
    end = len(data) - _TRAILER
    envelope = DropEnvelope.from_json(data[end - length:end])
    return Drop(name, info.st_uid, envelope, data[:end - length])


# --------------------------------------------------------------------------- sender rights


@dataclass(frozen=True)
class SenderRules:
    """Which envelope senders a caller may use (SPEC §2 [sendmail] allow_any_sender)."""

    hostname: str
    local_domains: tuple[str, ...]
    masquerade: tuple[str, ...] = ()
    allow_any_sender: bool = False
    privileged_uids: frozenset[int] = field(default_factory=lambda: frozenset({0}))

    def default_sender(self, user: str) -> str:
        """The calling user at [server].hostname, or at its masquerade domain."""
        domain = masquerade_domain(self.hostname, self.masquerade) or self.hostname
        return f"{user}@{domain}"

    def own_domains(self) -> set[str]:
        return {self.hostname, *self.local_domains, *self.masquerade}

    def permitted(self, sender: str, uid: int) -> bool:
        """Root (and the service user) may use any sender; others only the null sender or
        one in our own domains, unless allow_any_sender."""
        if uid in self.privileged_uids or self.allow_any_sender or sender == "":
            return True
        domain = sender.rpartition("@")[2].lower().removesuffix(".")
        return "@" in sender and domain in self.own_domains()

    def qualify(self, recipient: str) -> str:
        """A bare user name is local: user@hostname when that is a local domain, else at
        the first local domain."""
        if "@" in recipient:
            return recipient
        domain = self.hostname if self.hostname in self.local_domains or not \
            self.local_domains else self.local_domains[0]
        return f"{recipient}@{domain}"


def rules_for(hostname: str, local: Iterable[str], masquerade: Sequence[str],
              allow_any_sender: bool, privileged: Iterable[int] = (0,)) -> SenderRules:
    return SenderRules(hostname, tuple(local), tuple(masquerade), allow_any_sender,
                       frozenset(privileged))
