"""`relayhubctl reload`: make the running daemon re-read its configuration, aliases, users
and certificates (the same as SIGHUP to the master)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from relayhub import control
from relayhub.admin.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands, add_command
from relayhub.admin.queue_cmd import DaemonUnreachable, ask_daemon, command
from relayhub.config import Settings


async def reload(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    try:
        answer = await ask_daemon(reactor, settings, control.Reload)
    except DaemonUnreachable as problem:
        print(f"relayhub does not answer: {problem}", file=sys.stderr)
        return EXIT_FAILED
    if answer is None:
        print("relayhub is not running", file=sys.stderr)
        return EXIT_FAILED
    if answer["problems"]:
        # The daemon refused the new configuration and keeps running the old one.
        print("reload refused, the running configuration stays:", file=sys.stderr)
        for line in answer["problems"]:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    print("reloaded")
    return EXIT_OK


def register(commands: Commands) -> None:
    parser = add_command(commands, "reload", "re-read configuration, aliases, users and "
                                             "certificates in the running daemon")
    parser.set_defaults(command=command(reload))
