"""`relayhubctl aliases ...`: show what an address expands to, and check the aliases file."""

from __future__ import annotations

import argparse
import sys

from relayhub.address import parse_forward_path, parse_mailbox, quote_local_part
from relayhub.admin.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands, add_command
from relayhub.aliases import (
    AliasFileError,
    FixedAliases,
    LocalNames,
    load_aliases,
    recipient_requests,
)
from relayhub.config import Settings, load_settings
from relayhub.directory import build_names
from relayhub.errors import SMTPReply
from relayhub.policy import AcceptancePolicy, ClientContext
from relayhub.queue.store import RecipientRequest
from relayhub.users import UserDatabase, UsersFileError

# RCPT as a trusted client sends it: every domain is accepted, local names must exist.
_ADMIN = ClientContext("127.0.0.1", trusted=True, authenticated=True)


def _problems(lines: list[str]) -> int:
    for line in lines:
        print(line, file=sys.stderr)
    return EXIT_USAGE


def load_names(settings: Settings) -> tuple[LocalNames, AcceptancePolicy]:
    """build_names() over the files as they are now; AliasFileError or UsersFileError when
    one of them is unusable."""
    aliases = load_aliases(settings.aliases.file)
    return build_names(settings, FixedAliases(aliases.table), UserDatabase(settings.users.file))


def aliases_expand(args: argparse.Namespace) -> int:
    """Print the recipients that RCPT TO:<ADDRESS> would queue, one per line."""
    settings = load_settings(args.config)
    try:
        names, policy = load_names(settings)
    except (AliasFileError, UsersFileError) as error:
        return _problems(error.problems)
    text = args.address.strip().removeprefix("<").removesuffix(">")
    try:
        if text and "@" not in text and settings.domains.local:  # a bare name
            text = f"{quote_local_part(text)}@{settings.domains.local[0]}"
        path = parse_forward_path(f"<{text}>", utf8=True)
    except (SMTPReply, ValueError):
        print(f"{args.address}: not an address", file=sys.stderr)
        return EXIT_USAGE
    try:
        mailbox = policy.check_recipient(path, _ADMIN)
        expansion = names.expand(mailbox)
    except SMTPReply as refusal:  # exactly what RCPT would answer
        print(f"{refusal.code} {refusal.status} {refusal.text}", file=sys.stderr)
        return EXIT_FAILED
    for request in recipient_requests(expansion, RecipientRequest(str(mailbox)),
                                      null_sender=False):
        owner = f"  (envelope sender {request.sender})" if request.sender else ""
        print(f"{request.address}{owner}")
    return EXIT_OK


def aliases_check(args: argparse.Namespace) -> int:
    """Validate the aliases file and its include files: problems (exit 2), or a summary with
    warnings about members that nothing will deliver to (exit 0)."""
    settings = load_settings(args.config)
    path = settings.aliases.file
    try:
        loaded = load_aliases(path)
    except AliasFileError as error:
        return _problems(error.problems)
    if not path.exists():
        print(f"OK: {path}: no such file, so no aliases")
        return EXIT_OK
    aliases = FixedAliases(loaded.table)
    try:
        users = UserDatabase(settings.users.file)
    except UsersFileError as error:
        print(f"warning: members not checked, the users file is unusable: {error.problems[0]}")
    else:
        names, _policy = build_names(settings, aliases, users)
        for warning in _warnings(names, settings):
            print(f"warning: {warning}")
    print(f"OK: {path}: {len(loaded.table.aliases)} aliases, "
          f"{len(loaded.table.includes)} include files")
    return EXIT_OK


def _warnings(names: LocalNames, settings: Settings) -> list[str]:
    if not settings.domains.local:
        return []
    domain = settings.domains.local[0]
    warnings: list[str] = []
    for name in names.aliases.table.aliases:
        try:
            expansion = names.expand(parse_mailbox(f"{quote_local_part(name)}@{domain}"))
        except SMTPReply as refusal:
            warnings.append(f"alias {name!r}: {refusal.text}")
            continue
        warnings += [f"alias {name!r}: {m.address} is neither a user nor an alias"
                     for m in expansion.members
                     if m.local and m.user is None and m.key != "local:postmaster"]
    return warnings


def register(commands: Commands) -> None:
    actions = add_command(commands, "aliases", "aliases commands").add_subparsers(
        title="actions", metavar="ACTION", required=True)
    expand = add_command(actions, "expand",
                         "show the recipients mail to ADDRESS is queued for, as RCPT does")
    expand.add_argument("address", metavar="ADDRESS",
                        help="an address, or a bare name at the first local domain")
    expand.set_defaults(command=aliases_expand)
    check = add_command(actions, "check",
                        "validate the aliases file and its include files, report every problem")
    check.set_defaults(command=aliases_check)
