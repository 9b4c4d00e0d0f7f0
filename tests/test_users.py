"""Tests for relayhub.users: parsing the users file, lookup and reload on change."""

from __future__ import annotations

import os
from pathlib import Path

import bcrypt
import pytest
from argon2 import PasswordHasher

from relayhub.users import User, UserDatabase, UsersFileError, parse_users

ARGON = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("secret")
BCRYPT = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()


def test_parse_all_hash_kinds() -> None:
    text = f"""# comment line

Alice:{ARGON}:Alice Example
bob:{BCRYPT}:Bob
  carol:{{PLAIN}}pa:ss:word :  Carol C.  \r
dave.x_y-z:{BCRYPT.replace("$2b$", "$2y$")}:
"""
    users = parse_users(text, "users")
    assert list(users) == ["alice", "bob", "carol", "dave.x_y-z"]
    assert users["alice"] == User("alice", ARGON, "Alice Example")
    assert users["alice"].scheme == "argon2id"
    assert users["bob"].scheme == "bcrypt"
    # A {PLAIN} secret may contain ':'; the full name is after the last one.
    assert users["carol"].password_hash == "{PLAIN}pa:ss:word "
    assert users["carol"].full_name == "Carol C."
    assert users["carol"].scheme == "plain"
    assert users["dave.x_y-z"].full_name == ""
    assert ARGON not in repr(users["alice"])


def test_parse_reports_every_problem_with_file_and_line() -> None:
    text = "\n".join(
        [
            "alice",  # 1: missing fields
            f"bob:{BCRYPT}",  # 2: missing fields
            f"b@d:{BCRYPT}:x",  # 3: bad name
            f".dot:{BCRYPT}:x",  # 4: bad name
            f"ok:{BCRYPT}:x",  # 5
            f"OK:{ARGON}:y",  # 6: duplicate
            "eve:hunter2:Eve",  # 7: plaintext in the hash field
            "frank:$argon2i$v=19$m=8,t=1,p=1$c2FsdA$aGFzaA:x",  # 8: argon2i is not offered
            "gina:$2b$04$short:x",  # 9: truncated bcrypt
            "hank:{PLAIN}:x",  # 10: empty secret
            f"ivy:{BCRYPT}:Ivy\x1b[2J",  # 11: control character
            f"{'n' * 65}:{BCRYPT}:x",  # 12: name too long
        ]
    )
    with pytest.raises(UsersFileError) as exc:
        parse_users(text, "/etc/relayhub/users")
    problems = exc.value.problems
    assert [p.split(":")[1] for p in problems] == [
        "1", "2", "3", "4", "6", "7", "8", "9", "10", "11", "12"
    ]  # fmt: skip
    assert all(p.startswith("/etc/relayhub/users:") for p in problems)
    assert "missing fields" in problems[0]
    assert "bad user name" in problems[2]
    assert "duplicate user 'ok' (first on line 5)" in problems[4]
    assert "password hash" in problems[5] and "hunter2" not in problems[5]
    assert "control character" in problems[9]
    assert str(exc.value) == "\n".join(problems)


def test_database_missing_file_is_empty(tmp_path: Path) -> None:
    db = UserDatabase(tmp_path / "users")
    assert len(db) == 0 and db.lookup("alice") is None and not db.knows("alice")
    assert db.reload_if_changed() is False


def test_database_lookup_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:{BCRYPT}:Alice\n")
    db = UserDatabase(path)
    assert db.lookup("ALICE") == User("alice", BCRYPT, "Alice")
    assert db.knows("Alice") and not db.knows("bob")
    assert db.reload_if_changed() is False

    # Written atomically, as relayhubctl does: new inode.
    new = tmp_path / "users.new"
    new.write_text(f"alice:{BCRYPT}:Alice\nbob:{ARGON}:Bob\n")
    new.replace(path)
    assert db.reload_if_changed() is True
    assert db.knows("bob")

    # A broken version is reported once and the last good table stays in use.
    path.write_text("bob\n")
    with pytest.raises(UsersFileError) as exc:
        db.reload_if_changed()
    assert exc.value.problems == [f"{path}:1: missing fields, expected name:hash:Full Name"]
    assert db.knows("bob")
    assert db.reload_if_changed() is False

    path.write_text(f"carol:{BCRYPT}:Carol\n")
    os.utime(path, ns=(1, 1))  # same size is not enough to hide a change
    assert db.reload_if_changed() is True
    assert db.knows("carol") and not db.knows("bob")

    path.unlink()
    assert db.reload_if_changed() is True
    assert len(db) == 0


def test_database_broken_at_start_raises(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"al\xffce:{PLAIN}x:A\n")
    with pytest.raises(UsersFileError) as exc:
        UserDatabase(path)
    assert exc.value.problems == [f"{path}: not UTF-8 (byte 2)"]
    with pytest.raises(UsersFileError) as exc:
        UserDatabase(tmp_path)  # a directory
    assert exc.value.problems[0].startswith(f"{tmp_path}: ")
