"""The relayhubctl command tree: global options, exit statuses, and dispatch to the
command-group modules beside this one (each has a `register(commands)`)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable
from typing import TypeAlias

from relayhub.config import ConfigError

# Exit statuses, SPEC §8.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int]
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

# Every relayhub/admin/*_cmd.py module is a command group with a register(commands).
GROUP_SUFFIX = "_cmd"


def _add_config_option(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("-c", "--config", metavar="PATH", default=default,
                        help="configuration file (default: $RELAYHUB_CONFIG, then "
                             "/etc/relayhub/relayhub.toml, then built-in defaults)")


def add_command(commands: Commands, name: str, help: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=help)
    # -c may also follow the command words; SUPPRESS keeps a value given before them.
    _add_config_option(parser, argparse.SUPPRESS)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The full command tree; each group module adds its own parsers."""
    parser = argparse.ArgumentParser(prog="relayhubctl",
                                     description="Administer a relayhub mail hub.")
    _add_config_option(parser, None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    package = importlib.import_module("relayhub.admin")
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        if module.endswith(GROUP_SUFFIX):
            importlib.import_module(f"relayhub.admin.{module}").register(commands)
    return parser


def run(argv: list[str]) -> int:
    """Run one relayhubctl command and return its exit status (never raises SystemExit)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2)
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    command: Command = args.command
    try:
        return command(args)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:]))

