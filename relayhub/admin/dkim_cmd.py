"""`relayhubctl dkim keygen` and `dkim check`: make a DKIM key and the DNS record that
publishes it, and compare what DNS publishes with the configured key."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from twisted.internet import error as internet_error
from twisted.internet.defer import TimeoutError as QueryTimeout
from twisted.names import client, dns
from twisted.names import error as names_error

from relayhub import dkim
from relayhub.admin.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Commands, add_command
from relayhub.admin.queue_cmd import command, say_error, settings_of
from relayhub.config import ConfigError, Settings, _domain_name

DNS_TIMEOUT = (1.0, 3.0)


def _domain_arg(text: str) -> str:
    try:
        return _domain_name(text)
    except ValueError as problem:
        raise argparse.ArgumentTypeError(str(problem)) from None


def _selector_arg(text: str) -> str:
    if not dkim.valid_selector(text.lower()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid selector (DNS labels)")
    return text.lower()


def _default_output(args: argparse.Namespace) -> Path:
    """state_dir/dkim/SELECTOR.DOMAIN.key of the configuration."""
    return settings_of(args).server.state_dir / "dkim" / f"{args.selector}.{args.domain}.key"


def _write_key(path: Path, pem: bytes) -> None:
    """Create `path` with mode 0600 (never over an existing key: it may be published)."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
        file.flush()
        os.fsync(file.fileno())
    # root making a key for the daemon: the daemon's user (owner of the directory above the
    # key's, the state directory by default) must be able to read it.
    owner = path.parent.parent.stat() if path.parent.parent.exists() else None
    if os.geteuid() == 0 and owner is not None and owner.st_uid != 0:
        for made in (path.parent, path):
            if made.stat().st_uid == 0:
                os.chown(made, owner.st_uid, owner.st_gid)


def keygen(args: argparse.Namespace) -> int:
    try:
        path = Path(os.path.abspath(args.output)) if args.output else _default_output(args)
    except ConfigError as error:
        say_error(f"dkim keygen: {error}\n(or give --output PATH)")
        return EXIT_USAGE
    key = dkim.generate_key(args.type, args.bits)
    try:
        _write_key(path, dkim.private_pem(key))
    except FileExistsError:
        say_error(f"dkim keygen: {path} exists; a key in use must not be replaced unseen "
                  "(choose a new selector, or remove it first)")
        return EXIT_FAILED
    except OSError as error:
        say_error(f"dkim keygen: cannot write {path}: {error.strerror or error}")
        return EXIT_FAILED
    value = dkim.record_value(key)
    print(f"private key: {path} ({dkim.describe(key)}, mode 0600)")
    print("\nPublish this DNS record:\n")
    print(dkim.zone_line(args.selector, args.domain, value))
    print("\nThen sign with it (relayhub.toml; or a [[dkim.key]] table beside other keys):\n")
    print(f'[dkim]\nselector = "{args.selector}"\nprivate_key = "{path}"\n'
          f'domains = ["{args.domain}"]')
    print(f"\nand check the record once published: relayhubctl dkim check --domain {args.domain}")
    return EXIT_OK


async def lookup_txt(reactor: Any, settings: Settings, name: str) -> list[str]:
    """The TXT records at `name` (each record's strings joined); [] for NXDOMAIN or none.
    Raises ValueError saying why when DNS gives no answer."""
    nameservers = settings.delivery.nameservers
    resolver = (client.Resolver(servers=list(nameservers), timeout=DNS_TIMEOUT, reactor=reactor)
                if nameservers else
                client.Resolver(resolv="/etc/resolv.conf", timeout=DNS_TIMEOUT, reactor=reactor))
    try:
        answers, _authority, _additional = await resolver.lookupText(name.encode("idna"),
                                                                     DNS_TIMEOUT)
    except names_error.DNSNameError:
        return []
    except (names_error.DomainError, QueryTimeout, OSError, internet_error.ConnectError,
            internet_error.ConnectionClosed) as failure:
        raise ValueError(f"DNS lookup of {name} TXT failed: "
                         f"{type(failure).__name__} {failure}".strip()) from None
    return [b"".join(r.payload.data).decode("utf-8", "replace") for r in answers
            if r.type == dns.TXT]


async def check(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    try:
        signer = dkim.build_signer(settings.dkim.entries())
    except dkim.DkimKeyError as error:  # changed since the configuration was checked
        say_error(f"dkim check: {error}")
        return EXIT_USAGE
    chosen = signer.choose(args.domain) if signer else None
    if chosen is None:
        print(f"{args.domain}: no configured DKIM key signs for it")
        return EXIT_FAILED
    key, domain = chosen
    name = dkim.record_name(key.selector, domain)
    what = f"the key in {key.path} ({dkim.describe(key.key)})"
    try:
        records = [r for r in await lookup_txt(reactor, settings, name)
                   if r.lstrip().startswith("v=DKIM1") or "p=" in r]
    except ValueError as problem:
        print(f"{name}: {problem}")
        return EXIT_FAILED
    if not records:
        print(f"{name}: no DKIM record published; publish:\n"
              + dkim.zone_line(key.selector, domain, dkim.record_value(key.key)))
        return EXIT_FAILED
    if len(records) > 1:
        print(f"{name}: {len(records)} DKIM records published; receivers need exactly one")
        return EXIT_FAILED
    matches, why = dkim.record_matches(records[0], key.key)
    if not matches:
        print(f"{name}: does not match {what}: {why}")
        return EXIT_FAILED
    print(f"{name}: matches {what}")
    return EXIT_OK


def register(commands: Commands) -> None:
    group = add_command(commands, "dkim", "make DKIM keys and check their DNS records")
    actions = group.add_subparsers(title="actions", metavar="ACTION", required=True,
                                   dest="action")
    make = add_command(actions, "keygen",
                       "write a new private key (0600) and print the DNS record to publish")
    make.add_argument("--domain", required=True, type=_domain_arg)
    make.add_argument("--selector", required=True, type=_selector_arg)
    # RSA by default: every receiver verifies rsa-sha256, while many still ignore Ed25519
    # (RFC 8463) signatures; an Ed25519 key is best added beside an RSA one.
    make.add_argument("--type", choices=("rsa", "ed25519"), default="rsa",
                      help="key type (default rsa: verified everywhere)")
    make.add_argument("--bits", type=int, choices=(2048, 3072, 4096), default=2048,
                      help="RSA key size (default 2048; larger keys may not fit DNS setups)")
    make.add_argument("--output", metavar="PATH",
                      help="where to write the key (default: STATE_DIR/dkim/SELECTOR.DOMAIN.key)")
    make.set_defaults(command=keygen)
    verify = add_command(actions, "check",
                         "compare the published DNS record with the configured key")
    verify.add_argument("--domain", required=True, type=_domain_arg)
    verify.set_defaults(command=command(check))
