"""A Maildir as a POP3 maildrop: listed from file names only, stable UIDLs, an exclusive lock
across processes, and deletions held until QUIT."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# Twisted's `twisted.mail.maildir` is not used (TWISTED-NOTES): it deletes at DELE, does not
# lock, and derives UIDLs from file names that change on rename.
#
# UIDL: the message's *unique base name*, the file name up to its first "," or ":" — what
# stays when the name gains the `:2,FLAGS` info of a move from new/ to cur/ or Dovecot/Courier
# `,S=`/`,W=` fields. Our delivery writes `<sec>.M<usec>P<pid>R<random>.<host>,S=<size>`, so
# the base is unique by construction and never changes for the life of the message. RFC 1939
# §7 limits a UIDL to 1-70 characters 0x21-0x7E; a base outside that (a long host name, an odd
# foreign name) is replaced by the SHA-1 hex of the base, which is just as stable.
#
# Blocking calls that list or change directories (open_maildrop, Maildrop.open_message,
# Maildrop.commit) belong in a thread.

# In the Maildir's top directory beside tmp/new/cur; a dot file so Maildir readers skip it.
LOCK_NAME = ".relayhub-pop3.lock"
# Where messages are; tmp/ holds deliveries in progress only.
SUBDIRS = ("new", "cur")
MAX_UID_LENGTH = 70  # RFC 1939 §7

# ",W=" is the size with CRLF line ends (Dovecot), ",S=" the file size; in the part of the
# name before the ":2," info.
_SIZE_FIELD = re.compile(r",([SW])=([0-9]{1,15})(?=,|$)")
# "<seconds>." optionally followed by "M<microseconds>" (the modern Maildir name; the
# microseconds are a plain decimal number, not zero-padded).
_TIME_FIELD = re.compile(r"([0-9]{1,15})\.(?:M([0-9]{1,6})(?![0-9]))?")


class MaildropError(Exception):
    """A POP3 request about the maildrop that cannot be honoured."""


class MailboxInUse(MaildropError):
    """Another session (in any process) holds the maildrop's lock."""


class NoSuchMessage(MaildropError):
    """The message number is out of range or the message is marked as deleted."""


class MessageVanished(MaildropError):
    """The file is gone although we listed it (removed behind our back)."""


@dataclass(frozen=True)
class MessageFile:
    """One message as listed: where it is, its UIDL and the octets RETR sends for it."""

    subdir: str
    name: str
    uid: str
    size: int


def unique_base(name: str) -> str:
    """The part of a Maildir file name that no rename changes."""
    return name.split(":", 1)[0].split(",", 1)[0]


def uid_for(name: str) -> str:
    """The UIDL of the message stored under file name `name` (see the module docstring)."""
    base = unique_base(name)
    if 0 < len(base) <= MAX_UID_LENGTH and all("!" <= ch <= "~" for ch in base):
        return base
    return hashlib.sha1(base.encode("utf-8", "surrogateescape"), usedforsecurity=False).hexdigest()


def size_from_name(name: str) -> int | None:
    """The octets RETR sends, from ",W=" (CRLF size) or else ",S=" in the name; None if absent."""
    fields = {m[1]: m[2] for m in _SIZE_FIELD.finditer(name.split(":", 1)[0])}
    value = fields.get("W", fields.get("S"))
    return None if value is None else int(value)


def delivery_time(name: str) -> tuple[int, int] | None:
    """(seconds, microseconds) of delivery from the name's leading time, None if it has none."""
    match = _TIME_FIELD.match(name)
    if match is None:
        return None
    return int(match[1]), int(match[2] or 0)


def _make_dir(path: Path) -> None:
    """mkdir -p with 0700 for every directory it creates (mail stays private)."""
    if path.is_dir():
        return
    _make_dir(path.parent)
    with contextlib.suppress(FileExistsError):  # made by a delivery meanwhile
        os.mkdir(path, 0o700)


def lock_maildir(maildir: Path) -> int:
    """Take the maildrop's exclusive lock without waiting; returns the descriptor holding it.

    flock(2) on a file inside the Maildir: it is held per open file description, so it
    excludes a second session in the same process as well as in any other worker process,
    and the kernel drops it when the holder dies. Raises MailboxInUse if someone holds it."""
    fd = os.open(maildir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MailboxInUse(str(maildir)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def scan(maildir: Path) -> list[MessageFile]:
    """The messages in new/ and cur/, ordered by delivery time, then name.

    Reads only directory entries: the size and the time come from the name; only a name
    without them costs a stat. A message seen in both directories (moved by another program
    while we listed) is listed once."""
    keyed: list[tuple[tuple[int, int], str, MessageFile]] = []
    seen: set[str] = set()
    for subdir in reversed(SUBDIRS):  # cur/ first: a copy there is the newer name
        with os.scandir(maildir / subdir) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                uid = uid_for(entry.name)
                if uid in seen:
                    continue
                seen.add(uid)
                size = size_from_name(entry.name)
                when = delivery_time(entry.name)
                if size is None or when is None:
                    st = entry.stat(follow_symlinks=False)
                    size = st.st_size if size is None else size
                    when = when or (int(st.st_mtime), st.st_mtime_ns // 1000 % 1_000_000)
                keyed.append((when, entry.name, MessageFile(subdir, entry.name, uid, size)))
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [message for _when, _name, message in keyed]


def open_maildrop(maildir: Path) -> Maildrop:
    """Lock and list the Maildir `maildir` (created, empty, if missing). Blocking.

    Raises MailboxInUse, or OSError when the directory cannot be read."""
    for subdir in ("tmp", *SUBDIRS):
        _make_dir(maildir / subdir)
    lock = lock_maildir(maildir)
    try:
        return Maildrop(maildir, scan(maildir), lock)
    except BaseException:
        os.close(lock)
        raise


class Maildrop:
    """One session's view of a locked Maildir: numbered messages (1-based, fixed for the
    session, RFC 1939) and the set marked deleted, which only commit() applies."""

    def __init__(self, maildir: Path, messages: list[MessageFile], lock_fd: int) -> None:
        self.maildir = maildir
        self._root = str(maildir)  # paths joined as text: pathlib costs more than the open
        self._messages = messages
        self._deleted: set[int] = set()
        self._lock_fd: int | None = lock_fd

    def __len__(self) -> int:
        return len(self._messages)

    def stat(self) -> tuple[int, int]:
        """(messages, octets) not marked deleted."""
        live = [m.size for n, m in self.listing()]
        return len(live), sum(live)

    def listing(self) -> list[tuple[int, MessageFile]]:
        """(number, message) for every message not marked deleted."""
        return [(n, m) for n, m in enumerate(self._messages, 1) if n not in self._deleted]

    def message(self, number: int) -> MessageFile:
        """Message `number`; NoSuchMessage if out of range or marked deleted."""
        if not 1 <= number <= len(self._messages) or number in self._deleted:
            raise NoSuchMessage(number)
        return self._messages[number - 1]

    def delete(self, number: int) -> None:
        self.message(number)
        self._deleted.add(number)

    @property
    def deleted(self) -> int:
        return len(self._deleted)

    def reset(self) -> None:
        self._deleted.clear()

    def open_listed(self, number: int) -> BinaryIO:
        """Open message `number` under the name it was listed with; FileNotFoundError if it
        has been moved or removed since (then open_message, which searches, in a thread)."""
        message = self.message(number)
        fd = os.open(self.maildir / message.subdir / message.name,
                     os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        return os.fdopen(fd, "rb", buffering=0)

    def read_listed(self, number: int, limit: int) -> bytes | None:
        """The whole of message `number` under its listed name, if it is at most `limit`
        octets (else None: stream it); FileNotFoundError if it was moved or removed since.

        One open and one or two reads of a file in the page cache: cheaper than a streaming
        producer for the small messages that are most of a maildrop."""
        message = self.message(number)
        if message.size > limit:
            return None
        fd = os.open(f"{self._root}/{message.subdir}/{message.name}",
                     os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            parts = [os.read(fd, limit + 1)]
            while parts[-1] and sum(map(len, parts)) <= limit:
                parts.append(os.read(fd, limit + 1))
        finally:
            os.close(fd)
        data = b"".join(parts)
        return data if len(data) <= limit else None

    def open_message(self, number: int) -> BinaryIO:
        """Open message `number` for reading (blocking). Raises NoSuchMessage or
        MessageVanished."""
        message = self.message(number)
        for path in self._paths(message):
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                return os.fdopen(fd, "rb", buffering=0)
        raise MessageVanished(message.name)

    def commit(self) -> int:
        """Remove the messages marked deleted (the UPDATE state); returns how many could not be
        removed. A file already gone counts as removed. Blocking."""
        failures = 0
        for number in sorted(self._deleted):
            message = self._messages[number - 1]
            try:
                for path in self._paths(message):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        break
            except OSError:
                failures += 1
        if self._deleted:
            for subdir in SUBDIRS:
                # Best effort: a crash now only brings back a message the user deleted.
                with contextlib.suppress(OSError):
                    fd = os.open(self.maildir / subdir, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        self._deleted.clear()
        return failures

    def _paths(self, message: MessageFile) -> Iterator[Path]:
        """Where the file may be: the listed name first, then (listed only if asked for) any
        name with the same UIDL, as another program may have moved it from new/ to cur/."""
        yield self.maildir / message.subdir / message.name
        for subdir in SUBDIRS:
            for name in os.listdir(self.maildir / subdir):
                if (not name.startswith(".") and uid_for(name) == message.uid
                        and (subdir, name) != (message.subdir, message.name)):
                    yield self.maildir / subdir / name

    def close(self) -> None:
        """Release the lock (nothing is deleted); safe to call twice."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
