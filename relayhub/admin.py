"""`relayhubctl`: the administrator's command line for relayhub (SPEC §8)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from relayhub.config import ConfigError, load_settings

# Exit statuses, SPEC §8.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int]


def config_check(args: argparse.Namespace) -> int:
    """Load and validate the configuration; problems surface as ConfigError (exit 2)."""
    settings = load_settings(args.config)
    print(f"OK: {settings.source}")
    return EXIT_OK


def _add_config_option(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("-c", "--config", metavar="PATH", default=default,
                        help="configuration file (default: $RELAYHUB_CONFIG, then "
                             "/etc/relayhub/relayhub.toml, then built-in defaults)")


def _add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                 help: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=help)
    # -c may also follow the command words; SUPPRESS keeps a value given before them.
    _add_config_option(parser, argparse.SUPPRESS)
    return parser


def _add_config_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = _add_command(commands, "config", "configuration commands").add_subparsers(
        title="actions", metavar="ACTION", required=True)
    check = _add_command(actions, "check", "validate the configuration, report every problem")
    check.set_defaults(command=config_check)


def build_parser() -> argparse.ArgumentParser:
    """The full command tree; each group (config, later queue, user, …) adds its own parsers."""
    parser = argparse.ArgumentParser(prog="relayhubctl",
                                     description="Administer a relayhub mail hub.")
    _add_config_option(parser, None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_config_commands(commands)
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


if __name__ == "__main__":
    main()
