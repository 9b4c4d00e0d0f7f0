"""Local delivery into Maildir mailboxes: fsync'd tmp/ → new/, unique names, loop detection."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
from pathlib import Path

from relayhub.queue.spool import BUFFER_SIZE, fsync_directory
from relayhub.smtp.headers import HEADER_PREFIX_LIMIT

_DELIVERED_TO = re.compile(rb"^delivered-to:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)",
                           re.IGNORECASE | re.MULTILINE)
# Attempts at a fresh unique name; a second clash would mean a broken clock *and* RNG.
_NAME_ATTEMPTS = 3


class LocalDeliveryError(Exception):
    """Local delivery failed; `status` is the RFC 3463 code, `text` the diagnostic."""

    def __init__(self, status: str, text: str, permanent: bool) -> None:
        super().__init__(f"{status} {text}")
        self.status = status
        self.text = text
        self.permanent = permanent


class MailLoop(LocalDeliveryError):
    """The message already carries our `Delivered-To:` for this recipient (permanent)."""

    def __init__(self, address: str) -> None:
        super().__init__("5.4.6", f"mail forwarding loop for {address}", permanent=True)


class UnsafeMailboxName(LocalDeliveryError):
    """A mailbox name that would leave the mail root or hide as a dot file (permanent)."""

    def __init__(self, name: str) -> None:
        super().__init__("5.1.1", f"mailbox name not allowed: {name!r}", permanent=True)


class MailboxUnavailable(LocalDeliveryError):
    """The mailbox cannot be written (not a directory, permissions, I/O error).

    Temporary (4.2.0), as Postfix's local(8) does: these are administration mistakes that
    get fixed, and the recipient still bounces after `max_lifetime`.
    """

    def __init__(self, text: str) -> None:
        super().__init__("4.2.0", text, permanent=False)


class StorageFull(LocalDeliveryError):
    """No space: the file system (4.3.1) or the user's quota (4.2.2, "mailbox full").

    Temporary: space usually comes back (a user empties the mailbox) long before
    `max_lifetime`, and bouncing at once would lose mail for a passing condition.
    """

    def __init__(self, status: str, text: str) -> None:
        super().__init__(status, text, permanent=False)


def deliver_to_maildir(mail_root: Path, mailbox: str, body_path: Path, *, return_path: str,
                       delivered_to: str, now: float) -> str:
    """Store a queued body in the Maildir `mail_root/mailbox`; returns the file name in new/.

    Blocking (call it in a thread). The file holds `Return-Path:` and `Delivered-To:` and then
    the stored body (which starts with our `Received:`), with CRLF line ends exactly as
    received, because POP3 sends CRLF: the file size is then the octets RETR sends before
    dot-stuffing, and the name carries it as `,S=<size>` (the Dovecot/Courier convention) so
    LIST needs no stat and no read. Names are `<sec>.M<usec>P<pid>R<random>.<host>,S=<size>`;
    the usual `Q<counter>` is left out because it needs process-global state; 64 random bits
    stand in for it, and O_EXCL in tmp/ plus link(2) (never rename, which would overwrite)
    into new/ make a clash fail and retry rather than lose a message.

    The file is fsync'd before it is linked into new/ and new/ is fsync'd after, so a return
    means the message survives a crash. tmp/ is not fsync'd: its entry is only a leftover.
    Missing directories are created (0700) and their parents fsync'd.

    Raises a `LocalDeliveryError`: `UnsafeMailboxName`, `MailLoop`, `StorageFull` or
    `MailboxUnavailable` (any other OSError, including reading the body).
    """
    if not mailbox or mailbox.startswith(".") or "/" in mailbox or "\0" in mailbox:
        raise UnsafeMailboxName(mailbox)
    if any(c in value for value in (return_path, delivered_to) for c in "\r\n"):
        raise ValueError("CR or LF in an envelope address")
    maildir = mail_root / mailbox
    prefix = f"Return-Path: <{return_path}>\r\nDelivered-To: {delivered_to}\r\n".encode()
    tmp_path: Path | None = None
    try:
        if _already_delivered_to(body_path, delivered_to):
            raise MailLoop(delivered_to)
        for sub in ("tmp", "new", "cur"):
            _make_dirs(maildir / sub)
        tmp_path, size = _write_tmp(maildir / "tmp", prefix, body_path, now)
        name = _link_into_new(tmp_path, maildir / "new", size, now)
        fsync_directory(maildir / "new")
    except OSError as exc:
        raise _classify(exc) from exc
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):  # after the link it is only a second name
                os.unlink(tmp_path)
    return name


def _already_delivered_to(body_path: Path, address: str) -> bool:
    """Whether the header section (bounded read) has `Delivered-To: <address>`."""
    with open(body_path, "rb") as body:
        prefix = body.read(HEADER_PREFIX_LIMIT)
    end = prefix.find(b"\r\n\r\n")
    header = prefix if end < 0 else prefix[: end + 2]
    if header.startswith(b"\r\n"):  # no header section at all
        return False
    wanted = address.lower()
    for match in _DELIVERED_TO.finditer(header):
        value = b" ".join(match.group(1).split()).decode("utf-8", "replace")
        if value.strip("<>").lower() == wanted:
            return True
    return False


def _make_dirs(path: Path) -> None:
    """mkdir -p with mode 0700, fsyncing the parent of each directory created."""
    if path.is_dir():
        return
    _make_dirs(path.parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if path.is_dir():  # another delivery made it meanwhile
            return
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None
    fsync_directory(path.parent)


def _unique_base(now: float) -> str:
    seconds = int(now)
    usec = int((now - seconds) * 1_000_000)
    # Maildir reserves "/" and ":" in names; "," separates our ",S=" field.
    host = (socket.gethostname().replace("/", r"\057").replace(":", r"\072")
            .replace(",", r"\054"))
    return f"{seconds}.M{usec}P{os.getpid()}R{secrets.token_hex(8)}.{host}"


def _write_tmp(tmp_dir: Path, prefix: bytes, body_path: Path, now: float) -> tuple[Path, int]:
    """Write prefix + body into a new file in tmp/, fsync'd; returns its path and size."""
    for _ in range(_NAME_ATTEMPTS):
        path = tmp_dir / _unique_base(now)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb", buffering=BUFFER_SIZE) as out, open(body_path, "rb") as body:
                out.write(prefix)
                size = len(prefix)
                while chunk := body.read(BUFFER_SIZE):
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return path, size
    raise FileExistsError(errno.EEXIST, "no unique name found", str(tmp_dir))


def _link_into_new(tmp_path: Path, new_dir: Path, size: int, now: float) -> str:
    name = f"{tmp_path.name},S={size}"
    for _ in range(_NAME_ATTEMPTS):
        try:
            os.link(tmp_path, new_dir / name)
        except FileExistsError:
            name = f"{_unique_base(now)},S={size}"
            continue
        return name
    raise FileExistsError(errno.EEXIST, "no unique name found", str(new_dir))


def _classify(exc: OSError) -> LocalDeliveryError:
    text = f"maildir delivery failed: {exc.strerror or exc}"
    if exc.filename:
        text += f": {exc.filename}"
    if exc.errno == errno.ENOSPC:
        return StorageFull("4.3.1", text)
    if exc.errno == errno.EDQUOT:
        return StorageFull("4.2.2", text)
    return MailboxUnavailable(text)
