"""`relayhubctl user add|passwd|del|list`: the accounts in the `[users].file` (SPEC §6)."""

from __future__ import annotations

import argparse
import getpass
import os
import pwd
import sys
from pathlib import Path
from typing import Any

from relayhub import control
from relayhub.admin.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands, add_command
from relayhub.admin.queue_cmd import DaemonUnreachable, ask_daemon, run, say_error
from relayhub.config import Settings, load_settings
from relayhub.users import (
    BadFullName,
    BadPassword,
    UnknownUser,
    UserExists,
    UsersFileError,
    add_user,
    check_full_name,
    delete_user,
    hash_password,
    is_valid_user_name,
    read_users,
    set_password,
)


class _Refused(Exception):
    """Ends the command with a message and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _read_password() -> str:
    """From a prompt with confirmation on a terminal, else one line of stdin (for scripts)."""
    if sys.stdin is None:
        raise _Refused("no password: stdin is closed", EXIT_USAGE)
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Retype password: "):
            raise _Refused("passwords do not match", EXIT_FAILED)
        return first
    line = sys.stdin.readline()
    return line.removesuffix("\n").removesuffix("\r")


def _new_file_group(settings: Settings) -> int | None:
    """The daemon's group, which must read a users file that root creates (mode 0640)."""
    if os.geteuid() != 0 or not settings.server.user:
        return None
    return pwd.getpwnam(settings.server.user).pw_gid


def _checked_name(name: str) -> str:
    if not is_valid_user_name(name):
        raise _Refused(f"bad user name {name!r} (letters, digits, '.', '_', '-'; at most 64)",
                       EXIT_USAGE)
    return name.lower()


async def _tell_daemon(reactor: Any, settings: Settings) -> int:
    """A running daemon re-reads the users file in every process before this returns (SPEC
    §8: it sees each change at once); without a daemon there is nobody to tell."""
    try:
        answer = await ask_daemon(reactor, settings, control.Refresh)
    except DaemonUnreachable as problem:
        say_error(f"{settings.users.file} is written, but relayhub was not told ({problem}); "
                  "it notices the change within a second")
        return EXIT_OK
    for unconfirmed in answer["problems"] if answer else []:
        say_error(f"{settings.users.file} is written, but not yet seen by {unconfirmed}")
    return EXIT_OK


def _run(action: str, args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    path: Path = settings.users.file
    try:
        if action == "list":
            users = read_users(path)
            width = max((len(user.name) for user in users), default=0)
            for user in users:
                print(f"{user.name:<{width}}  {user.full_name}".rstrip())
            return EXIT_OK
        name = _checked_name(args.name)
        if action == "add":
            check_full_name(args.full_name)  # before asking for a password
            add_user(path, name, hash_password(_read_password(), plain=args.plain),
                     args.full_name, group=_new_file_group(settings))
        elif action == "passwd":
            current = {user.name: user for user in read_users(path)}.get(name)
            if current is None:
                raise UnknownUser(name)
            plain = args.plain or (current.scheme == "plain" and not args.hashed)
            set_password(path, name, hash_password(_read_password(), plain=plain))
        else:
            delete_user(path, name)
    except _Refused as refused:
        print(f"relayhubctl: {refused}", file=sys.stderr)
        return refused.status
    except UsersFileError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    except (BadPassword, BadFullName) as error:
        print(f"relayhubctl: {error}", file=sys.stderr)
        return EXIT_USAGE
    except UserExists as error:
        print(f"relayhubctl: user {error} already exists in {path}", file=sys.stderr)
        return EXIT_FAILED
    except UnknownUser as error:
        print(f"relayhubctl: no user {error.args[0]} in {path}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:
        print(f"relayhubctl: {path}: {error.strerror or error}", file=sys.stderr)
        return EXIT_FAILED
    return run(lambda reactor: _tell_daemon(reactor, settings))


def register(commands: Commands) -> None:
    actions = add_command(commands, "user", "POP3 and SMTP AUTH accounts").add_subparsers(
        title="actions", metavar="ACTION", required=True)

    add = add_command(actions, "add", "add a user; the password is asked for (or read "
                                      "from stdin)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--name", dest="full_name", default="", metavar="FULL_NAME",
                     help="the user's full name, shown by VRFY/EXPN")
    add.add_argument("--plain", action="store_true",
                     help="store the password as {PLAIN} (needed for APOP only)")
    add.set_defaults(command=lambda args: _run("add", args))

    passwd = add_command(actions, "passwd", "change a user's password (a {PLAIN} one stays "
                                            "{PLAIN} unless --hashed)")
    passwd.add_argument("name", metavar="NAME")
    kind = passwd.add_mutually_exclusive_group()
    kind.add_argument("--plain", action="store_true", help="store it as {PLAIN} (APOP)")
    kind.add_argument("--hashed", action="store_true", help="store it as an argon2id hash")
    passwd.set_defaults(command=lambda args: _run("passwd", args))

    delete = add_command(actions, "del", "remove a user (the mailbox is kept)")
    delete.add_argument("name", metavar="NAME")
    delete.set_defaults(command=lambda args: _run("del", args))

    listing = add_command(actions, "list", "list users: name and full name")
    listing.set_defaults(command=lambda args: _run("list", args))
