"""The users file (`name:hash:Full Name` per line): parsing, lookup, and re-reading on change."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

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

    Reads block, which is fine for a small file read at start-up or from a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, User] = {}
        # (device, inode, size, mtime) of the last version read, good or bad; None = absent.
        self._seen: tuple[int, int, int, int] | None = None
        self.reload_if_changed()

    def __len__(self) -> int:
        return len(self._users)

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
        return True
