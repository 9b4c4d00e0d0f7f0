"""A running daemon and its users and aliases files: `relayhubctl user add|del` is in effect
in every worker when the command returns (SPEC §8), and a broken file read at a reload
(SIGHUP) keeps the last good version and logs why, file and line (SPEC §5)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubprocess import REPO, Hub, SMTPConnection

from relayhub.aliases import AliasDatabase
from relayhub.directory import LastGood
from relayhub.users import UserDatabase, UsersFileError

USERS = "alice:{PLAIN}x:Alice Liddell\n"
ALIASES = "team: alice\n"
ROUNDS = 6
# Enough sessions per check that each of the two workers serves some of them.
SESSIONS = 4


def relayhubctl(hub: Hub, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relayhub.admin", "-c", str(hub.config_path),
                           *args], input=stdin, capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def rcpt_codes(hub: Hub, address: str) -> list[int]:
    """The RCPT answer for `address` in SESSIONS fresh sessions (spread over the workers)."""
    codes = []
    for _ in range(SESSIONS):
        with SMTPConnection(hub.smtp_port) as conn:
            conn.reply()
            conn.command("EHLO client.test")
            conn.command("MAIL FROM:<postmaster@localhost>")
            codes.append(int(conn.command(f"RCPT TO:<{address}>")[-1][:3]))
    return codes


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    (tmp_path / "users").write_text(USERS)
    (tmp_path / "aliases").write_text(ALIASES)
    running = Hub(tmp_path, {
        "server": {"workers": 2},
        "users": {"file": str(tmp_path / "users")},
        "aliases": {"file": str(tmp_path / "aliases")},
    }).start()
    yield running
    running.stop()


def test_user_add_and_del_are_in_effect_when_the_command_returns(hub: Hub) -> None:
    for round_ in range(ROUNDS):
        name = f"newbie{round_}"
        added = relayhubctl(hub, "user", "add", name, "--plain", stdin="pw\n")
        assert added.returncode == 0, added.stderr
        assert rcpt_codes(hub, f"{name}@localhost") == [250] * SESSIONS, f"round {round_}"
        deleted = relayhubctl(hub, "user", "del", name)
        assert deleted.returncode == 0, deleted.stderr
        assert rcpt_codes(hub, f"{name}@localhost") == [550] * SESSIONS, f"round {round_}"


def test_user_commands_without_a_daemon_just_write_the_file(tmp_path: Path) -> None:
    idle = Hub(tmp_path, {"users": {"file": str(tmp_path / "users")}})  # never started
    done = relayhubctl(idle, "user", "add", "bob", "--plain", stdin="pw\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert (tmp_path / "users").read_text() == "bob:{PLAIN}pw:\n"


def sighup(hub: Hub) -> None:
    assert hub.process is not None
    old = set(hub.children("worker"))
    os.kill(hub.process.pid, signal.SIGHUP)
    # The reload is done when a new generation serves and the old one has gone.
    hub.wait(lambda: len(hub.children("worker")) == 2 and not old & set(hub.children("worker")),
             timeout=20)


def test_broken_aliases_at_sighup_keep_the_last_good_table(hub: Hub, tmp_path: Path) -> None:
    assert rcpt_codes(hub, "team@localhost") == [250] * SESSIONS
    (tmp_path / "aliases").write_text(ALIASES + "prog: |/bin/false\nno colon here\n")
    sighup(hub)
    assert rcpt_codes(hub, "team@localhost") == [250] * SESSIONS
    assert rcpt_codes(hub, "alice@localhost") == [250] * SESSIONS
    assert rcpt_codes(hub, "prog@localhost") == [550] * SESSIONS
    where = tmp_path / "aliases"
    hub.wait_for_log(f"{where}:2: program target '|/bin/false' is not allowed",
                     f"{where}:3: missing ':' after the alias name",
                     "keeping the last good version")
    # Fixed: the new table is used at once, without another signal.
    (tmp_path / "aliases").write_text(ALIASES + "prog: alice\n")
    hub.wait(lambda: rcpt_codes(hub, "prog@localhost") == [250] * SESSIONS, timeout=5)


def test_broken_users_at_sighup_keep_the_last_good_table(hub: Hub, tmp_path: Path) -> None:
    assert rcpt_codes(hub, "alice@localhost") == [250] * SESSIONS
    (tmp_path / "users").write_text(USERS + "bob-without-hash\n")
    sighup(hub)
    assert rcpt_codes(hub, "alice@localhost") == [250] * SESSIONS
    assert rcpt_codes(hub, "bob-without-hash@localhost") == [550] * SESSIONS
    hub.wait_for_log(f"{tmp_path / 'users'}:2: missing fields")
    with SMTPConnection(hub.pop3_port) as pop:  # the kept table still authenticates
        assert pop.reply()[0].startswith("+OK")
        assert pop.command("USER alice")[0].startswith("+OK")
        assert pop.command("PASS x")[0].startswith("+OK")


def test_broken_users_file_at_start_is_refused_with_its_lines(tmp_path: Path) -> None:
    (tmp_path / "users").write_text(USERS + "bob-without-hash\n")
    hub = Hub(tmp_path, {"users": {"file": str(tmp_path / "users")}})
    with pytest.raises(RuntimeError, match="exited 1"):
        hub.start()
    assert f"{tmp_path / 'users'}:2: missing fields" in hub.log()


def test_databases_fall_back_on_a_last_good_version(tmp_path: Path) -> None:
    aliases, users = tmp_path / "aliases", tmp_path / "users"
    aliases.write_text(ALIASES + "lists: :include:lists\n")
    (tmp_path / "lists").write_text("bob\n")
    users.write_text(USERS)
    good = LastGood(users=UserDatabase(users).text, aliases=AliasDatabase(aliases).texts)
    assert good == LastGood.from_json(good.to_json())

    aliases.write_text("broken\n")
    (tmp_path / "lists").unlink()  # the include file's kept text is used too
    users.write_text("broken\n")
    kept_aliases = AliasDatabase(aliases, fallback=good.aliases)
    assert kept_aliases.usable and set(kept_aliases.table.aliases) == {"team", "lists"}
    assert kept_aliases.problems == (f"{aliases}:1: missing ':' after the alias name",)
    assert kept_aliases.reload_if_changed() is False  # the broken file is not re-read
    kept_users = UserDatabase(users, fallback=good.users)
    assert kept_users.knows("alice") and kept_users.problems
    with pytest.raises(UsersFileError):
        UserDatabase(users)  # no good version anywhere: refused
    assert not AliasDatabase(aliases).usable
