"""`relayhubctl config ...`: configuration commands."""

from __future__ import annotations

import argparse

from relayhub.admin.cli import EXIT_OK, Commands, add_command
from relayhub.config import load_settings


def config_check(args: argparse.Namespace) -> int:
    """Load and validate the configuration; problems surface as ConfigError (exit 2)."""
    settings = load_settings(args.config)
    print(f"OK: {settings.source}")
    return EXIT_OK


def register(commands: Commands) -> None:
    actions = add_command(commands, "config", "configuration commands").add_subparsers(
        title="actions", metavar="ACTION", required=True)
    check = add_command(actions, "check", "validate the configuration, report every problem")
    check.set_defaults(command=config_check)
