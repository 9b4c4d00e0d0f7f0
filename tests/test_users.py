"""Tests for relayhub.users: parsing, lookup, reload on change, password hashing and checking,
atomic edits, and `relayhubctl user` through a real subprocess."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import bcrypt
import pytest
from argon2 import PasswordHasher
from conftest import ReactorThread

from relayhub import users
from relayhub.users import (
    BadFullName,
    BadPassword,
    UnknownUser,
    User,
    UserDatabase,
    UserExists,
    UsersFileError,
    add_user,
    authenticate,
    check_password,
    delete_user,
    hash_password,
    parse_users,
    read_users,
    set_password,
    verify_password,
    write_atomically,
)

REPO = Path(__file__).resolve().parent.parent

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


# --------------------------------------------------------------------------- passwords


def test_hash_password_is_argon2id_and_verifies() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("$argon2id$")
    user = parse_users(f"alice:{stored}:Alice\n", "users")["alice"]
    assert user.scheme == "argon2id"
    assert verify_password(user, "correct horse")
    assert not verify_password(user, "correct horse ")
    assert hash_password("correct horse") != stored  # salted


def test_verify_bcrypt_and_plain() -> None:
    bob = User("bob", BCRYPT, "")
    assert verify_password(bob, "secret") and not verify_password(bob, "Secret")
    # bcrypt only ever looked at 72 bytes; bcrypt>=5 would raise instead of comparing.
    long = User("long", bcrypt.hashpw(b"a" * 72, bcrypt.gensalt(rounds=4)).decode(), "")
    assert verify_password(long, "a" * 80)
    carol = User("carol", hash_password("pa:ss wörd", plain=True), "")
    assert carol.password_hash == "{PLAIN}pa:ss wörd" and carol.scheme == "plain"
    assert verify_password(carol, "pa:ss wörd") and not verify_password(carol, "pa:ss")


@pytest.mark.parametrize(("password", "plain"), [("", False), ("a\nb", False), ("a\rb", True),
                                                 ("tab\there", True), ("nul\0", False)])
def test_passwords_the_file_cannot_hold_are_refused(password: str, plain: bool) -> None:
    with pytest.raises(BadPassword):
        hash_password(password, plain=plain)


def test_authenticate_unknown_and_wrong(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:{ARGON}:Alice\n")
    db = UserDatabase(path)
    assert authenticate(db, "ALICE", "secret") == User("alice", ARGON, "Alice")
    assert authenticate(db, "alice", "wrong") is None
    assert authenticate(db, "nobody", "secret") is None
    # A changed file is picked up at the next check; a broken one keeps the last good table.
    path.write_text(f"alice:{ARGON}:Alice\nbob:{BCRYPT}:Bob\n")
    assert authenticate(db, "bob", "secret") is not None
    path.write_text("broken\n")
    assert authenticate(db, "bob", "secret") is not None


def test_check_password_hashes_off_the_reactor_thread(
        tmp_path: Path, reactor_thread: ReactorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:{ARGON}:Alice\n")
    db = UserDatabase(path)
    threads_used: list[threading.Thread] = []
    real = users.verify_password

    def recording(user: User, password: str) -> bool:
        threads_used.append(threading.current_thread())
        return real(user, password)

    monkeypatch.setattr(users, "verify_password", recording)
    reactor = reactor_thread.reactor
    assert reactor_thread.run(check_password, reactor, db, "alice", "secret") is not None
    assert reactor_thread.run(check_password, reactor, db, "alice", "nope") is None
    reactor_thread_object = reactor_thread.run(threading.current_thread)
    assert threads_used and all(t is not reactor_thread_object for t in threads_used)


# --------------------------------------------------------------------------- editing


def test_edits_keep_comments_order_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# accounts\nalice:{ARGON}:Alice\n\n# APOP\ncarol:{{PLAIN}}x:Carol\n")
    path.chmod(0o600)
    db = UserDatabase(path)
    add_user(path, "Bob", BCRYPT, "Bob B.")
    set_password(path, "CAROL", "{PLAIN}y")
    assert path.read_text() == (f"# accounts\nalice:{ARGON}:Alice\n\n# APOP\n"
                                f"carol:{{PLAIN}}y:Carol\nbob:{BCRYPT}:Bob B.\n")
    delete_user(path, "alice")
    assert path.read_text() == (f"# accounts\n\n# APOP\n"
                                f"carol:{{PLAIN}}y:Carol\nbob:{BCRYPT}:Bob B.\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert db.reload_if_changed() and db.knows("bob") and not db.knows("alice")
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temporary file left
    with pytest.raises(UserExists):
        add_user(path, "BOB", BCRYPT, "")
    with pytest.raises(UnknownUser):
        set_password(path, "alice", BCRYPT)
    with pytest.raises(UnknownUser):
        delete_user(path, "alice")
    with pytest.raises(BadFullName):
        add_user(path, "dave", BCRYPT, "Dave: the second")


def test_new_file_and_directory_are_created_0640(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "relayhub" / "users"
    add_user(path, "alice", ARGON, "Alice")
    assert path.read_text() == f"alice:{ARGON}:Alice\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert read_users(path) == [User("alice", ARGON, "Alice")]


def test_a_broken_file_is_never_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("alice\n")
    with pytest.raises(UsersFileError):
        add_user(path, "bob", BCRYPT, "")
    assert path.read_text() == "alice\n"


def test_rewrite_is_atomic_and_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:{ARGON}:Alice\n")
    original = path.stat().st_ino
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_atomically(path, b"new content\n")
    assert path.read_text() == "new content\n"
    assert path.stat().st_ino != original  # renamed over, never truncated in place
    assert synced[0].startswith(str(tmp_path / ".users.")) and synced[-1] == str(tmp_path)

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_atomically(path, b"lost\n")
    assert path.read_text() == "new content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["users"]


# --------------------------------------------------------------------------- relayhubctl user


def relayhubctl(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relayhub.admin", "-c", str(config), *args],
                          input=stdin, capture_output=True, text=True, cwd=REPO, timeout=60)


def test_relayhubctl_user_commands(tmp_path: Path) -> None:
    users_file = tmp_path / "etc" / "users"
    config = tmp_path / "relayhub.toml"
    config.write_text(f'[users]\nfile = "{users_file}"\n')

    done = relayhubctl(config, "user", "add", "Alice", "--name", "Alice Example",
                       stdin="s3cret pass\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o640
    [alice] = read_users(users_file)
    assert alice.name == "alice" and alice.full_name == "Alice Example"
    assert alice.scheme == "argon2id" and verify_password(alice, "s3cret pass")

    assert relayhubctl(config, "user", "add", "carol", "--plain", stdin="apop\r\n"
                       ).returncode == 0
    again = relayhubctl(config, "user", "add", "alice", stdin="x\n")
    assert again.returncode == 1 and "already exists" in again.stderr

    listing = relayhubctl(config, "user", "list")
    assert listing.returncode == 0
    assert listing.stdout == "alice  Alice Example\ncarol\n"
    assert "argon2" not in listing.stdout and "apop" not in listing.stdout

    assert relayhubctl(config, "user", "passwd", "alice", stdin="changed\n").returncode == 0
    assert relayhubctl(config, "user", "passwd", "carol", stdin="apop2\n").returncode == 0
    by_name = {user.name: user for user in read_users(users_file)}
    assert verify_password(by_name["alice"], "changed")
    assert by_name["alice"].full_name == "Alice Example"
    assert by_name["carol"].password_hash == "{PLAIN}apop2"  # an APOP user stays one
    assert relayhubctl(config, "user", "passwd", "carol", "--hashed", stdin="h\n"
                       ).returncode == 0
    assert read_users(users_file)[1].scheme == "argon2id"
    assert relayhubctl(config, "user", "passwd", "nobody", stdin="x\n").returncode == 1

    assert relayhubctl(config, "user", "del", "carol").returncode == 0
    gone = relayhubctl(config, "user", "del", "carol")
    assert gone.returncode == 1 and "no user carol" in gone.stderr
    assert [u.name for u in read_users(users_file)] == ["alice"]


@pytest.mark.parametrize(("args", "stdin", "status", "message"), [
    (["user", "add", "b@d"], "x\n", 2, "bad user name"),
    (["user", "add", "bob"], "", 2, "the password is empty"),
    (["user", "add", "bob"], "\n", 2, "the password is empty"),
    (["user", "add", "bob", "--name", "a:b"], "x\n", 2, "full name"),
    (["user", "add", "bob", "--plain"], "tab\there\n", 2, "control characters"),
    (["user", "add"], "", 2, "usage"),
    (["user", "frobnicate"], "", 2, "invalid choice"),
])
def test_relayhubctl_user_usage_errors(tmp_path: Path, args: list[str], stdin: str,
                                       status: int, message: str) -> None:
    config = tmp_path / "relayhub.toml"
    config.write_text(f'[users]\nfile = "{tmp_path / "users"}"\n')
    done = relayhubctl(config, *args, stdin=stdin)
    assert done.returncode == status and message in done.stderr, done.stderr
    assert not (tmp_path / "users").exists()


def test_relayhubctl_user_with_a_broken_file_or_config(tmp_path: Path) -> None:
    users_file = tmp_path / "users"
    users_file.write_text("alice\n")
    config = tmp_path / "relayhub.toml"
    config.write_text(f'[users]\nfile = "{users_file}"\n')
    done = relayhubctl(config, "user", "add", "bob", stdin="x\n")
    assert done.returncode == 2 and f"{users_file}:1: missing fields" in done.stderr
    assert relayhubctl(config, "user", "list").returncode == 2
    assert users_file.read_text() == "alice\n"
    missing = relayhubctl(tmp_path / "nope.toml", "user", "list")
    assert missing.returncode == 2 and "cannot read" in missing.stderr
