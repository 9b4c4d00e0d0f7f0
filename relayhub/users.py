"""The users file (`name:hash:Full Name` per line): parsing, lookup, re-reading on change,
password hashing and checking, and atomic edits for relayhubctl."""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import os
import re
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from twisted.internet import defer, threads
from twisted.logger import Logger

from relayhub.queue.spool import fsync_directory, open_directory

_LOG = Logger(namespace="relayhub.users")
# Mode of a users file created by relayhubctl: the hashes are readable by the daemon's group.
NEW_FILE_MODE = 0o640

# A dot-atom subset: the name is also a Maildir directory name and an unquoted local part.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")
_HASHES = {
    "argon2id": re.compile(
        r"\$argon2id\$v=[0-9]+\$m=[0-9]+,t=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"
    ),
    "bcrypt": re.compile(r"\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}"),
    "plain": re.compile(r"\{PLAIN\}.+"),  # kept only because APOP needs the secret
}


@dataclass(frozen=True)
class User:
    """One account; `name` is lower-case (it also names the Maildir)."""

    name: str
    password_hash: str = field(repr=False)  # keep hashes and secrets out of logs and tracebacks
    full_name: str

    @property
    def scheme(self) -> str:
        """ "argon2id", "bcrypt" or "plain" — what password checking must use."""
        return next(s for s, rx in _HASHES.items() if rx.fullmatch(self.password_hash))


class UsersFileError(Exception):
    """The users file is unusable; `problems` holds one "FILE:LINE: why" line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_users(text: str, filename: str) -> dict[str, User]:
    """Parse a users file into lower-cased name -> User, or raise UsersFileError listing every
    problem.

    The name ends at the first ':' and the full name starts after the last one, so a {PLAIN}
    secret may contain ':' (no hash format does) but a full name may not."""
    users: dict[str, User] = {}
    first_line: dict[str, int] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        where = f"{filename}:{number}"
        if not line or line.startswith("#"):
            continue
        if any(ch < " " or ch == "\x7f" for ch in line):  # would reach VRFY replies verbatim
            problems.append(f"{where}: control character in line")
            continue
        if line.count(":") < 2:
            problems.append(f"{where}: missing fields, expected name:hash:Full Name")
            continue
        name, rest = line.split(":", 1)
        password_hash, full_name = rest.rsplit(":", 1)
        key = name.lower()
        if not _NAME.fullmatch(name) or len(name) > 64:
            problems.append(f"{where}: bad user name {name!r} (letters, digits, '.', '_', '-')")
        elif key in first_line:
            problems.append(f"{where}: duplicate user {key!r} (first on line {first_line[key]})")
        elif not any(rx.fullmatch(password_hash) for rx in _HASHES.values()):
            # The hash itself is not quoted: it may be a plaintext secret typed in the wrong place.
            problems.append(
                f"{where}: user {key!r}: password hash is not $argon2id$, bcrypt ($2b$) "
                "or {PLAIN}secret"
            )
        else:
            users[key] = User(key, password_hash, full_name.strip())
        first_line.setdefault(key, number)
    if problems:
        raise UsersFileError(problems)
    return users


class UserDatabase:
    """The users file at `path`, re-read by reload_if_changed(); a missing file is empty.

    Reads block, which is fine for a small file read at start-up or from a thread.

    `fallback` is the text of a last good version another process read (the master's, for
    a child started by a reload): when the file is broken now, that version is used and
    `problems` says why; without one, a broken file raises UsersFileError."""

    def __init__(self, path: Path, fallback: str | None = None) -> None:
        self.path = path
        self._users: dict[str, User] = {}
        # The text of the table in use, handed to processes started later.
        self.text = ""
        self.problems: list[str] = []
        # (device, inode, size, mtime) of the last version read, good or bad; None = absent.
        self._seen: tuple[int, int, int, int] | None = None
        try:
            self.reload_if_changed()
        except UsersFileError as error:
            if fallback is None:
                raise
            self._users, self.text = parse_users(fallback, str(path)), fallback
            self.problems = error.problems

    def __len__(self) -> int:
        return len(self._users)

    def users(self) -> list[User]:
        """Everyone, for VRFY's full-name search (a snapshot: a reload replaces the table)."""
        return list(self._users.values())

    def lookup(self, name: str) -> User | None:
        return self._users.get(name.lower())

    def knows(self, local_part: str) -> bool:
        """LocalDirectory: is this local part a user?"""
        return local_part.lower() in self._users

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed; True when a new table is now in use.

        A broken file raises UsersFileError (the caller logs it) while the previous table stays
        in use; it is reported once per change, not at every poll."""
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())  # of the file we read, even if renamed over meanwhile
                seen: tuple[int, int, int, int] | None = (
                    st.st_dev,
                    st.st_ino,
                    st.st_size,
                    st.st_mtime_ns,
                )
                data = f.read() if seen != self._seen else b""
        except FileNotFoundError:
            seen, data = None, b""
        except OSError as exc:
            raise UsersFileError([f"{self.path}: {exc.strerror or exc}"]) from None
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsersFileError([f"{self.path}: not UTF-8 (byte {exc.start})"]) from None
        self._users = parse_users(text, str(self.path))
        self.text = text
        return True


# --------------------------------------------------------------------------- passwords

def is_valid_user_name(name: str) -> bool:
    """Whether `name` may be a user: it is also a Maildir name and an unquoted local part."""
    return bool(_NAME.fullmatch(name)) and len(name) <= 64


PLAIN_PREFIX = "{PLAIN}"
# bcrypt reads only the first 72 bytes; bcrypt>=5 raises on more instead of ignoring them,
# so cut as every other bcrypt implementation (htpasswd, crypt(3)) does when checking.
_BCRYPT_MAX_BYTES = 72
# Verified instead when the name is unknown, so an unknown name costs as long as a wrong
# password (argon2id with the default parameters of the hashes we write; its secret is lost).
_DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$k1CEAbyZFgtwTneWcBEdRw$"
    "h7Qu4b7+XY1XnPerRa36n7sCSpiWaRKjmoCLpNqqdA8"
)


class BadPassword(ValueError):
    """A password that cannot be stored (empty, or a character the file cannot hold)."""


class BadFullName(ValueError):
    """A full name the users file cannot hold (':' or a control character)."""


def _check_password_text(password: str, plain: bool) -> None:
    if not password:
        raise BadPassword("the password is empty")
    if "\n" in password or "\r" in password or "\0" in password:
        raise BadPassword("the password contains a line break or NUL")
    if plain and any(ch < " " or ch == "\x7f" for ch in password):
        # A {PLAIN} secret is stored in the line itself, where control characters are refused.
        raise BadPassword("a {PLAIN} password cannot contain control characters")


def check_full_name(full_name: str) -> None:
    """Raise BadFullName unless `full_name` fits the last field of a users-file line."""
    if ":" in full_name or any(ch < " " or ch == "\x7f" for ch in full_name):
        raise BadFullName("a full name cannot contain ':' or control characters")


def hash_password(password: str, *, plain: bool = False) -> str:
    """The users-file form of `password`: an argon2id hash (RFC 9106 defaults of argon2-cffi),
    or `{PLAIN}password` when `plain` (only APOP needs the secret itself).

    Slow on purpose (about 0.1 s of CPU): call it off the reactor thread."""
    _check_password_text(password, plain)
    if plain:
        return PLAIN_PREFIX + password
    return PasswordHasher().hash(password)


def verify_password(user: User, password: str) -> bool:
    """Whether `password` is `user`'s; never raises for a bad guess or an odd hash.

    argon2 and bcrypt comparisons are constant-time inside their libraries; {PLAIN} uses
    hmac.compare_digest. Blocking for ~0.1 s: call it off the reactor thread."""
    scheme = user.scheme
    if scheme == "plain":
        secret = user.password_hash[len(PLAIN_PREFIX):]
        return hmac.compare_digest(secret.encode("utf-8"), password.encode("utf-8"))
    if scheme == "bcrypt":
        try:
            return bcrypt.checkpw(password.encode("utf-8")[:_BCRYPT_MAX_BYTES],
                                  user.password_hash.encode("ascii"))
        except ValueError:  # a hash bcrypt cannot parse despite our pattern
            return False
    return _verify_argon2(user.password_hash, password)


def _verify_argon2(password_hash: str, password: str) -> bool:
    try:
        return PasswordHasher().verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def authenticate(db: UserDatabase, name: str, password: str) -> User | None:
    """The user `name` if `password` is theirs, else None (blocking: run it in a thread).

    Picks up a changed users file first. An unknown name still costs one argon2 check, so the
    time taken does not tell which names exist."""
    reload_quietly(db)
    user = db.lookup(name)
    if user is None:
        _verify_argon2(_DUMMY_HASH, password)
        return None
    return user if verify_password(user, password) else None


def reload_quietly(db: UserDatabase) -> None:
    """reload_if_changed(), logging (not raising) a broken file: the last good table stays."""
    try:
        db.reload_if_changed()
    except UsersFileError as error:
        for problem in error.problems:
            _LOG.error("users file not reloaded: {problem}", problem=problem)


def check_password(reactor: Any, db: UserDatabase, name: str,
                   password: str) -> defer.Deferred[User | None]:
    """authenticate() in the reactor's thread pool: the hash check never blocks the reactor."""
    result: defer.Deferred[User | None] = threads.deferToThreadPool(
        reactor, reactor.getThreadPool(), authenticate, db, name, password)
    return result


# --------------------------------------------------------------------------- editing the file


class UserExists(Exception):
    """`relayhubctl user add` for a name that is already in the file."""


class UnknownUser(LookupError):
    """A change to a user who is not in the file."""


def read_users(path: Path) -> list[User]:
    """The users in the file at `path`, in file order; a missing file has none.

    Raises UsersFileError for a broken file (its problems name the lines)."""
    return list(parse_users(_read_text(path), str(path)).values())


def add_user(path: Path, name: str, password_hash: str, full_name: str, *,
             group: int | None = None) -> None:
    """Append `name` to the users file (created if missing; `group` owns a new file).

    Raises UserExists, UsersFileError (the file is broken: it is not touched) or OSError."""
    check_full_name(full_name)

    def edit(lines: list[str], users: dict[str, User]) -> list[str]:
        if name.lower() in users:
            raise UserExists(name.lower())
        return [*lines, _line(name.lower(), password_hash, full_name)]

    _edit(path, edit, group)


def set_password(path: Path, name: str, password_hash: str) -> None:
    """Replace `name`'s password hash, keeping the full name and every other line."""

    def edit(lines: list[str], users: dict[str, User]) -> list[str]:
        user = users.get(name.lower())
        if user is None:
            raise UnknownUser(name.lower())
        return [_line(user.name, password_hash, user.full_name)
                if _line_user(line) == user.name else line for line in lines]

    _edit(path, edit, None)


def delete_user(path: Path, name: str) -> None:
    """Remove `name`'s line (the Maildir is left alone: mail is never deleted by accident)."""

    def edit(lines: list[str], users: dict[str, User]) -> list[str]:
        if name.lower() not in users:
            raise UnknownUser(name.lower())
        return [line for line in lines if _line_user(line) != name.lower()]

    _edit(path, edit, None)


def _line(name: str, password_hash: str, full_name: str) -> str:
    return f"{name}:{password_hash}:{full_name}"


def _line_user(line: str) -> str | None:
    """The lower-cased user a line defines, or None for comments and blank lines."""
    text = line.strip()
    if not text or text.startswith("#") or ":" not in text:
        return None
    return text.split(":", 1)[0].lower()


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsersFileError([f"{path}: not UTF-8 (byte {exc.start})"]) from None


def _edit(path: Path, edit: Callable[[list[str], dict[str, User]], list[str]],
          group: int | None) -> None:
    """Read, change and atomically replace the users file, holding an exclusive lock so that
    two concurrent edits cannot lose each other's change.

    The lock is flock(2) on the directory itself: no lock file is left next to the users
    file, and readers (the daemon) need no lock because the replacement is a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    directory = open_directory(path.parent)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        text = _read_text(path)
        users = parse_users(text, str(path))
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline, put back on writing
        new_lines = edit(lines, users)
        write_atomically(path, "".join(line + "\n" for line in new_lines).encode("utf-8"),
                         group=group)
    finally:
        os.close(directory)  # also drops the lock


def write_atomically(path: Path, data: bytes, *, group: int | None = None) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a part,
    and the new one survives a crash once this returns.

    A temporary file in the same directory is written, fsync'd, renamed over `path`, and the
    directory fsync'd. The file keeps its mode, owner and group; a new file gets mode 0640
    and, when `group` is given, that group (the daemon's, which reads it after dropping root).
    """
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) if st else NEW_FILE_MODE)
        owner = (st.st_uid, st.st_gid) if st else (-1, -1 if group is None else group)
        if owner != (os.geteuid(), os.getegid()) and owner != (-1, -1):
            # Only root may give a file away; anyone else leaves it theirs (still readable
            # by the same people as before if the group is theirs too).
            with contextlib.suppress(PermissionError):
                os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as out:
            fd = -1
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_directory(path.parent)
