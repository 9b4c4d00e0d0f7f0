"""Load relayhub's TOML configuration (SPEC §2) into typed, validated, immutable settings."""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import pwd
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

from twisted.internet.endpoints import serverFromString

DEFAULT_PATH = Path("/etc/relayhub/relayhub.toml")
BUILTIN_SOURCE = "<built-in defaults>"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one "FILE: key: why" line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class NextHop:
    """Where mail goes next: `mx` names are resolved by MX lookup, others ("[host]") directly."""

    host: str
    port: int | None
    mx: bool

    def __str__(self) -> str:
        host = self.host if self.mx else f"[{self.host}]"
        return host if self.port is None else f"{host}:{self.port}"


@dataclass(frozen=True)
class ServerSettings:
    hostname: str
    state_dir: Path
    workers: int
    user: str
    shutdown_grace: float


@dataclass(frozen=True)
class SmtpSettings:
    """SMTP listeners and limits.

    `allow_plaintext_auth`, when absent from the file, is true exactly when every endpoint
    in `listen` and `submission` binds a loopback interface (interface=127.x or ::1, or a
    unix: socket) — so the built-in defaults work out of the box while a public listener
    never offers AUTH without TLS by accident. An explicit value always wins.
    """

    listen: tuple[str, ...]
    submission: tuple[str, ...]
    smtps: tuple[str, ...]
    max_message_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_ip: int
    timeout: float
    max_line_length: int
    allow_plaintext_auth: bool
    vrfy: str
    expn: str
    bare_newline: str
    reverse_dns: bool  # forward-confirmed client names (relayhub.clientname)
    reverse_dns_timeout: float  # the banner waits for the lookup at most this long


@dataclass(frozen=True)
class TlsSettings:
    certificate: Path | None
    private_key: Path | None  # None with a certificate: the key is in the certificate file

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class DomainSettings:
    """Domain names are lower-case without a trailing dot; relay entries may be ".suffix"."""

    local: tuple[str, ...]
    relay: tuple[str, ...]
    trusted_networks: tuple[IPNetwork, ...]
    masquerade: tuple[str, ...]


@dataclass(frozen=True)
class RoutingSettings:
    relayhost: NextHop | None
    transport: Mapping[str, NextHop]  # read-only; keys are domains or ".suffix"


@dataclass(frozen=True)
class DeliverySettings:
    retry_min: float
    retry_max: float
    max_lifetime: float
    delay_warning: float  # 0 disables the warning
    concurrency_per_destination: int
    tls: str
    smtp_port: int
    nameservers: tuple[tuple[str, int], ...]  # empty: use /etc/resolv.conf
    mta_sts: bool = True  # RFC 8461 policies of destinations are honoured
    dane: bool = True  # RFC 7672 TLSA records, only with the AD bit of a trusted resolver
    dnssec_nameservers: tuple[tuple[str, int], ...] = ()  # empty: `nameservers` on loopback


@dataclass(frozen=True)
class SendmailSettings:
    allow_any_sender: bool  # may a non-root caller of relayhub-sendmail set -f freely


@dataclass(frozen=True)
class AliasesSettings:
    file: Path


@dataclass(frozen=True)
class UsersSettings:
    file: Path


@dataclass(frozen=True)
class Pop3Settings:
    """POP3 listeners; `allow_plaintext_auth` follows the loopback rule of SmtpSettings
    (over `listen` only, since `pop3s` is always encrypted)."""

    listen: tuple[str, ...]
    pop3s: tuple[str, ...]
    allow_plaintext_auth: bool
    apop: bool


@dataclass(frozen=True)
class QueueSettings:
    backend: str
    dsn: str
    min_free_space: int  # bytes; below this, new mail gets 452 4.3.1
    lease: float  # postgresql: a dead hub's claimed work goes to another after this


@dataclass(frozen=True)
class LogSettings:
    format: str


@dataclass(frozen=True)
class MetricsSettings:
    listen: tuple[str, ...]  # endpoints serving Prometheus text format at /metrics


@dataclass(frozen=True)
class DkimKeySettings:
    """One [[dkim.key]] table."""

    selector: str
    private_key: Path
    domains: tuple[str, ...]
    headers: tuple[str, ...] | None  # None: those of [dkim]


@dataclass(frozen=True)
class DkimSettings:
    """DKIM signing (relayhub.dkim); nothing is signed unless some key is configured."""

    selector: str
    private_key: Path | None
    domains: tuple[str, ...]
    headers: tuple[str, ...]
    key: tuple[DkimKeySettings, ...]

    def entries(self) -> list[tuple[str, Path, tuple[str, ...], tuple[str, ...]]]:
        """(selector, private key, domains, headers) of every key, [dkim]'s own first."""
        own = [(self.selector, self.private_key, self.domains, self.headers)
               ] if self.selector and self.private_key else []
        return own + [(k.selector, k.private_key, k.domains,
                       self.headers if k.headers is None else k.headers) for k in self.key]


@dataclass(frozen=True)
class Settings:
    source: str  # the file the settings came from, or BUILTIN_SOURCE
    server: ServerSettings
    smtp: SmtpSettings
    tls: TlsSettings
    domains: DomainSettings
    routing: RoutingSettings
    delivery: DeliverySettings
    sendmail: SendmailSettings
    aliases: AliasesSettings
    users: UsersSettings
    pop3: Pop3Settings
    queue: QueueSettings
    log: LogSettings
    metrics: MetricsSettings
    dkim: DkimSettings


# --------------------------------------------------------------------------- value syntax

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_DURATION_UNITS = MappingProxyType({"s": 1, "m": 60, "h": 3600, "d": 86400})
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)
_SIZE_UNITS = MappingProxyType(
    {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
     "kib": 2**10, "mib": 2**20, "gib": 2**30}
)
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NEXT_HOP_RE = re.compile(r"(?:\[(?P<literal>[^\[\]]*)\]|(?P<name>[^\[\]:]*))(?::(?P<port>\d+))?")
_NAMESERVER_RE = re.compile(r"(?:\[(?P<v6>[^\[\]]*)\]|(?P<v4>[\d.]+))(?::(?P<port>\d+))?")


def _quote(value: object) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)


def parse_duration(text: str) -> float:
    """Seconds in "30s", "5m", "4h", "5d" (fractions such as "1.5h" allowed; "0s" is 0)."""
    match = _DURATION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f'{_quote(text)} is not a duration (a number with s, m, h or d, e.g. "30s", "5m")'
        )
    return float(Decimal(match[1]) * _DURATION_UNITS[match[2]])


def parse_size(value: int | str) -> int:
    """Bytes in an integer or in "512", "10MB", "64KiB", "35MiB" (KB/MB/GB: 1000s; KiB…: 1024s)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or match[2].lower() not in _SIZE_UNITS:
        raise ValueError(
            f"{_quote(value)} is not a size (bytes, or a number with B, KB, MB, GB, KiB, MiB, GiB)"
        )
    return int(Decimal(match[1]) * _SIZE_UNITS[match[2].lower()])


def _domain(text: str) -> str:
    """A host or domain name, lower-cased without its trailing dot (A-labels only)."""
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    # An all-numeric last label is an IP address (or a typo), never a DNS name.
    if len(name) > 253 or not all(map(_LABEL_RE.fullmatch, labels)) or labels[-1].isdigit():
        hint = "" if text.isascii() else ' (write internationalised names as "xn--" A-labels)'
        raise ValueError(f"{_quote(text)} is not a valid domain name{hint}")
    return name


def _domain_or_suffix(text: str) -> str:
    """A domain, or ".suffix" standing for every sub-domain of suffix."""
    return "." + _domain(text[1:]) if text.startswith(".") else _domain(text)


def _port_number(text: str, original: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{_quote(original)}: port {port} is not between 1 and 65535")
    return port


def parse_next_hop(text: str) -> NextHop:
    """"host", "host:port" (MX lookup), "[host]", "[host]:port", "[10.1.2.3]:25", "[::1]:25"."""
    match = _NEXT_HOP_RE.fullmatch(text.strip())
    if match is None or not (match["literal"] or match["name"]):
        raise ValueError(
            f"{_quote(text)} is not a next hop (host, host:port, [host] or [host]:port)"
        )
    port = None if match["port"] is None else _port_number(match["port"], text)
    if match["literal"] is not None:
        try:
            return NextHop(str(ipaddress.ip_address(match["literal"])), port, mx=False)
        except ValueError:
            return NextHop(_domain(match["literal"]), port, mx=False)
    try:
        address = ipaddress.ip_address(match["name"])
    except ValueError:
        return NextHop(_domain(match["name"]), port, mx=True)
    # An MX lookup of an address makes no sense; the bracket form says "use as given".
    raise ValueError(f'{_quote(text)}: write an IP address in brackets, as "[{address}]"')


def _parse_nameserver(text: str) -> tuple[str, int]:
    """"10.0.0.1" (port 53), "127.0.0.1:5353", "[::1]:53", or a bare IPv6 address."""
    match = _NAMESERVER_RE.fullmatch(text)
    host, port = (match["v6"] or match["v4"], match["port"]) if match else (text, None)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{_quote(text)} is not a name server (an IP address, with :port or as [IPv6]:port)"
        ) from None
    return str(address), 53 if port is None else _port_number(port, text)


def _endpoint_fields(description: str) -> tuple[str, list[str], dict[str, str]]:
    """Split a Twisted endpoint description at unescaped colons: (type, args, keywords)."""
    fields, current, escaped = [], "", False
    for char in description:
        if escaped or char not in ":\\":
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        else:
            fields.append(current)
            current = ""
    kind, *rest = [*fields, current]
    args = [field for field in rest if "=" not in field]
    keywords = dict(field.split("=", 1) for field in rest if "=" in field)
    return kind, args, keywords


def _binds_loopback(description: str) -> bool:
    kind, args, keywords = _endpoint_fields(description)
    if kind == "unix":
        return True
    positional = args[1] if kind in ("tcp", "tcp6") and len(args) > 1 else ""
    try:
        return ipaddress.ip_address(keywords.get("interface", positional)).is_loopback
    except ValueError:  # no interface (all addresses) or a host name
        return False


def _exception_text(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    # TypeErrors from Twisted's parsers name private functions: "_parseTCP() got an ...".
    return re.sub(r"^\w+\(\) (got an )?", "", text) or type(error).__name__


def _check_endpoint(description: str) -> None:
    kind, args, keywords = _endpoint_fields(description)
    if kind == "systemd":
        # Outside systemd the inherited descriptors cannot be resolved: check syntax only.
        if (
            not hasattr(socket, "AF_" + keywords.get("domain", "?"))
            or ("name" in keywords) == ("index" in keywords)
            or not keywords.get("index", "0").isdigit()
        ):
            raise ValueError("needs domain=INET|INET6|UNIX and one of name=NAME or index=N")
        return
    if kind in ("tcp", "tcp6", "ssl") and args and args[0].isdigit() and int(args[0]) > 65535:
        raise ValueError(f"port {args[0]} is not between 0 and 65535")
    # Imported here, not at module level: importing the reactor installs the default one,
    # and twistd must be free to install the reactor it was asked for first.
    from twisted.internet import reactor

    # Builds the endpoint object only; nothing listens. (Twisted leaves it unannotated.)
    serverFromString(reactor, description)


# --------------------------------------------------------------------------- value parsers
# Each takes a raw TOML value and returns the typed value or raises ValueError(why).

_Parser = Callable[[object], Any]


class _Invalid(ValueError):
    """Several problems inside one array or table value, each as (key suffix, why)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(why for _suffix, why in problems))
        self.problems = problems


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, list | dict):
        return "array" if isinstance(value, list) else "table"
    kind = {int: "integer", float: "float", str: "string"}.get(type(value), "date/time")
    return f"{kind} {_quote(value)}"


def _expected(what: str, value: object) -> ValueError:
    return ValueError(f"expected {what}, found {_describe(value)}")


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value)
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _expected("true or false", value)
    return value


def _integer(minimum: int, maximum: int | None = None) -> _Parser:
    def parse(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _expected("an integer", value)
        if value < minimum or (maximum is not None and value > maximum):
            limits = f"at least {minimum}" if maximum is None else f"{minimum} to {maximum}"
            raise ValueError(f"must be {limits}, not {value}")
        return value

    return parse


def _duration(allow_zero: bool) -> _Parser:
    def parse(value: object) -> float:
        if not isinstance(value, str):
            raise _expected('a duration string such as "30s" or "5m"', value)
        seconds = parse_duration(value)
        if seconds == 0 and not allow_zero:
            raise ValueError(f"{_quote(value)}: must be longer than 0s")
        return seconds

    return parse


def _size(minimum: int) -> _Parser:
    def parse(value: object) -> int:
        if not isinstance(value, int | str) or isinstance(value, bool):
            raise _expected('a size in bytes or a string such as "35MiB"', value)
        size = parse_size(value)
        if size < minimum:
            raise ValueError(f"{_quote(value)}: must be at least {minimum} bytes")
        return size

    return parse


def _choice(*options: str) -> _Parser:
    def parse(value: object) -> str:
        if _string(value) not in options:
            raise ValueError(f"{_quote(value)} is not one of {', '.join(map(_quote, options))}")
        return str(value)

    return parse


def _path(value: object) -> Path:
    # Relative paths are taken against the current directory, once, at load time.
    if not _string(value):
        raise ValueError("must not be empty")
    return Path(os.path.abspath(str(value)))


def _readable_file(value: object) -> Path | None:
    if not _string(value):
        return None
    path = _path(value)
    try:
        path.open("rb").close()  # the daemon may drop privileges later; checked at load time
    except OSError as error:
        raise ValueError(f"cannot read {_quote(str(path))}: {error.strerror}") from None
    return path


def _hostname(value: object) -> str:
    return _domain(_string(value))


def _domain_name(value: object) -> str:
    text = _string(value)
    if text.startswith("."):
        raise ValueError(f'{_quote(text)}: only domains.relay takes ".suffix" entries')
    return _domain(text)


def _relay_domain(value: object) -> str:
    return _domain_or_suffix(_string(value))


def _user(value: object) -> str:
    name = _string(value)
    if name:
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise ValueError(f"no such user {_quote(name)}") from None
    return name


def _network(value: object) -> IPNetwork:
    return ipaddress.ip_network(_string(value), strict=True)  # its ValueError names the value


def _endpoint(value: object) -> str:
    text = _string(value)
    try:
        _check_endpoint(text)
    except Exception as error:  # Twisted's parsers raise ValueError, TypeError, KeyError, OSError
        why = _exception_text(error)
        raise ValueError(f"{_quote(text)} is not a valid endpoint: {why}") from None
    return text


def _next_hop(value: object) -> NextHop:
    if isinstance(value, dict):
        raise ValueError(
            'expected a next-hop string, found a table (quote domain names used as keys: '
            '"eng.example.org" = "[10.1.2.3]:25")'
        )
    return parse_next_hop(_string(value))


def _relayhost(value: object) -> NextHop | None:
    return _next_hop(value) if _string(value) else None


def _nameserver(value: object) -> tuple[str, int]:
    return _parse_nameserver(_string(value))


def _array(item: _Parser) -> _Parser:
    def parse(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _expected("an array", value)
        items, problems = [], []
        for index, element in enumerate(value):
            try:
                items.append(item(element))
            except ValueError as error:
                problems.append((f"[{index}]", str(error)))
        if problems:
            raise _Invalid(problems)
        return tuple(items)

    return parse


def _transport(value: object) -> Mapping[str, NextHop]:
    if not isinstance(value, dict):
        raise _expected("a table", value)
    routes: dict[str, NextHop] = {}
    problems = []
    for name, hop in value.items():
        try:
            domain = _domain_or_suffix(name)
            if domain in routes:
                raise ValueError(f"{_quote(domain)} is listed twice")
            routes[domain] = _next_hop(hop)
        except ValueError as error:
            problems.append((f"[{_quote(name)}]", str(error)))
    if problems:
        raise _Invalid(problems)
    return MappingProxyType(routes)


def _dkim_selector(value: object) -> str:
    from relayhub.dkim import valid_selector  # lazily: it brings dkimpy and cryptography

    text = _string(value).lower()
    if text and not valid_selector(text):
        raise ValueError(f"{_quote(text)} is not a valid selector (DNS labels: a-z, 0-9, -)")
    return text


def _dkim_headers(value: object) -> tuple[str, ...]:
    from relayhub.dkim import check_header_names

    names = _array(_string)(value)
    problems = check_header_names(names)
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(name.lower() for name in names)


_DKIM_KEY_PARSERS: Mapping[str, _Parser] = MappingProxyType({
    "selector": _dkim_selector, "private_key": _path, "domains": _array(_domain_name),
    "headers": _dkim_headers,
})


def _dkim_keys(value: object) -> tuple[DkimKeySettings, ...]:
    """[[dkim.key]] tables: selector, private_key and domains required, headers optional."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise _expected("[[dkim.key]] tables", value)
    keys, problems = [], []
    for index, table in enumerate(value):
        parsed: dict[str, Any] = {"headers": None}
        for name, raw in table.items():
            if name not in _DKIM_KEY_PARSERS:
                problems.append((f"[{index}].{name}", _unknown("key", name,
                                                               list(_DKIM_KEY_PARSERS))))
                continue
            try:
                parsed[name] = _DKIM_KEY_PARSERS[name](raw)
            except _Invalid as error:
                problems += [(f"[{index}].{name}{sfx}", why) for sfx, why in error.problems]
            except ValueError as error:
                problems.append((f"[{index}].{name}", str(error)))
        for name in ("selector", "private_key", "domains"):
            if name not in table:
                problems.append((f"[{index}].{name}", "is required in a [[dkim.key]] table"))
            elif not parsed.get(name, True):
                problems.append((f"[{index}].{name}", "must not be empty"))
        if parsed.get("private_key"):
            problems += [(f"[{index}].private_key", why)
                         for _key, why in _dkim_key_problems("", parsed["private_key"])]
        if len(parsed) == len(_DKIM_KEY_PARSERS):
            keys.append(DkimKeySettings(**parsed))
    if problems:
        raise _Invalid(problems)
    return tuple(keys)


def _dkim_problems(dkim: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Half a [dkim] key, or a key file that cannot sign, stops start-up (one line each)."""
    problems: list[tuple[str, str]] = []
    selector, private_key = dkim.get("selector"), dkim.get("private_key")
    if "selector" in dkim and "private_key" in dkim:
        if bool(selector) != bool(private_key):
            given, missing = ("selector", "private_key") if selector else ("private_key",
                                                                           "selector")
            problems.append((f"dkim.{given}", f"is set but dkim.{missing} is not"))
        elif selector and not dkim.get("domains", True):
            problems.append(("dkim.domains", "must name the From: domains to sign for"))
    if selector and private_key:
        problems += _dkim_key_problems("dkim.private_key", private_key)
    return problems


def _dkim_key_problems(key: str, path: Path) -> list[tuple[str, str]]:
    from relayhub.dkim import DkimKeyError, load_private_key

    try:
        load_private_key(path)
    except DkimKeyError as error:
        return [(key, str(error))]
    return []


# --------------------------------------------------------------------------- schema

_Values = Mapping[str, Mapping[str, Any]]  # section -> key -> parsed value


@dataclass(frozen=True)
class _Computed:
    """A default that depends on the host or on other settings, as a raw TOML value."""

    compute: Callable[[_Values], object]


def _loopback_only(section: str, *keys: str) -> _Computed:
    return _Computed(
        lambda values: all(
            _binds_loopback(endpoint) for key in keys for endpoint in values[section].get(key, ())
        )
    )


def _under_state_dir(name: str) -> _Computed:
    return _Computed(
        lambda values: str(values["server"].get("state_dir", Path("relayhub-data")) / name)
    )


_ENDPOINTS = _array(_endpoint)
_DOMAINS = _array(_domain_name)

# section -> (settings class, {key: (parser, default as a raw TOML value)}); SPEC §2.
_SCHEMA: Mapping[str, tuple[type, Mapping[str, tuple[_Parser, object]]]] = MappingProxyType({
    "server": (ServerSettings, {
        "hostname": (_hostname, _Computed(lambda _: socket.getfqdn())),
        "state_dir": (_path, "./relayhub-data"),
        "workers": (_integer(1), _Computed(lambda _: os.cpu_count() or 1)),
        "user": (_user, ""),
        "shutdown_grace": (_duration(allow_zero=True), "30s"),
    }),
    "smtp": (SmtpSettings, {
        "listen": (_ENDPOINTS, ["tcp:2525:interface=127.0.0.1"]),
        "submission": (_ENDPOINTS, []),
        "smtps": (_ENDPOINTS, []),
        "max_message_size": (_size(1), "35MiB"),
        "max_recipients": (_integer(1), 1000),
        "max_connections": (_integer(1), 2000),
        "max_connections_per_ip": (_integer(1), 50),
        "timeout": (_duration(allow_zero=False), "5m"),
        # RFC 5321 §4.5.3.1.6: a server must take 1000-octet lines (998 + CRLF).
        "max_line_length": (_size(1000), "64KiB"),
        "allow_plaintext_auth": (_boolean, _loopback_only("smtp", "listen", "submission")),
        "vrfy": (_choice("all", "trusted", "off"), "trusted"),
        "expn": (_choice("all", "trusted", "off"), "trusted"),
        "bare_newline": (_choice("reject", "normalize"), "reject"),
        "reverse_dns": (_boolean, True),
        "reverse_dns_timeout": (_duration(allow_zero=False), "5s"),
    }),
    "tls": (TlsSettings, {
        "certificate": (_readable_file, ""),
        "private_key": (_readable_file, ""),
    }),
    "domains": (DomainSettings, {
        "local": (_DOMAINS, ["localhost"]),
        "relay": (_array(_relay_domain), []),
        "trusted_networks": (_array(_network), ["127.0.0.0/8", "::1/128"]),
        "masquerade": (_DOMAINS, []),
    }),
    "routing": (RoutingSettings, {
        "relayhost": (_relayhost, ""),
        "transport": (_transport, {}),
    }),
    "delivery": (DeliverySettings, {
        "retry_min": (_duration(allow_zero=False), "5m"),
        "retry_max": (_duration(allow_zero=False), "1h"),
        "max_lifetime": (_duration(allow_zero=True), "5d"),
        "delay_warning": (_duration(allow_zero=True), "4h"),
        "concurrency_per_destination": (_integer(1), 20),
        "tls": (_choice("none", "opportunistic", "required", "verify"), "opportunistic"),
        "smtp_port": (_integer(1, 65535), 25),
        "nameservers": (_array(_nameserver), []),
        "mta_sts": (_boolean, True),
        "dane": (_boolean, True),
        "dnssec_nameservers": (_array(_nameserver), []),
    }),
    "sendmail": (SendmailSettings, {"allow_any_sender": (_boolean, False)}),
    "aliases": (AliasesSettings, {"file": (_path, _under_state_dir("aliases"))}),
    "users": (UsersSettings, {"file": (_path, _under_state_dir("users"))}),
    "pop3": (Pop3Settings, {
        "listen": (_ENDPOINTS, ["tcp:1110:interface=127.0.0.1"]),
        "pop3s": (_ENDPOINTS, []),
        "allow_plaintext_auth": (_boolean, _loopback_only("pop3", "listen")),
        "apop": (_boolean, False),
    }),
    "queue": (QueueSettings, {
        "backend": (_choice("sqlite", "postgresql"), "sqlite"),
        "dsn": (_string, ""),
        "min_free_space": (_size(0), "100MB"),
        "lease": (_duration(allow_zero=False), "60s"),
    }),
    "log": (LogSettings, {"format": (_choice("text", "json"), "text")}),
    "metrics": (MetricsSettings, {"listen": (_ENDPOINTS, [])}),
    "dkim": (DkimSettings, {
        "selector": (_dkim_selector, ""),
        "private_key": (lambda value: _path(value) if _string(value) else None, ""),
        "domains": (_DOMAINS, []),
        "headers": (_dkim_headers, _Computed(lambda _: list(_default_dkim_headers()))),
        "key": (_dkim_keys, []),
    }),
})


def _default_dkim_headers() -> tuple[str, ...]:
    from relayhub.dkim import DEFAULT_HEADERS

    return DEFAULT_HEADERS


def _unknown(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"unknown {kind}" + (f" (did you mean {close[0]}?)" if close else "")


def _key_pair_problems(certificate: Path, private_key: Path | None) -> list[tuple[str, str]]:
    """A certificate without a usable, matching key stops start-up and reload here, rather
    than in a worker that would then serve without TLS."""
    # Imported here: relayhub.tls imports this module for the settings it reads.
    from relayhub.tls import TLSSetupError, load_key_pair

    try:
        load_key_pair(certificate, private_key)
    except TLSSetupError as error:
        return [(error.key, error.why)]
    return []


def _cross_checks(values: _Values) -> list[tuple[str, str]]:
    """Problems that involve more than one key, as (key, why); skips keys that failed."""
    smtp, pop3, tls, domains = values["smtp"], values["pop3"], values["tls"], values["domains"]
    delivery, queue = values["delivery"], values["queue"]
    problems = [
        ("domains.relay", f"{_quote(name)} is also in domains.local (a domain is one or the other)")
        for name in domains.get("relay", ())
        if name in domains.get("local", ())
    ]
    if delivery.get("retry_min", 0) > delivery.get("retry_max", float("inf")):
        problems.append((
            "delivery.retry_min",
            f"{delivery['retry_min']:g}s is longer than delivery.retry_max "
            f"({delivery['retry_max']:g}s)",
        ))
    if queue.get("backend") == "postgresql" and not queue.get("dsn", True):
        problems.append(("queue.dsn", 'is empty; backend "postgresql" needs a connection string'))
    # Part of the schema (SPEC §2) but not built yet: refused, never silently ignored.
    if tls.get("private_key") and "certificate" in tls and tls["certificate"] is None:
        problems.append(("tls.private_key", "is set but tls.certificate is not"))
    if tls.get("certificate") and "private_key" in tls:
        problems += _key_pair_problems(tls["certificate"], tls["private_key"])
    problems += _dkim_problems(values["dkim"])
    if tls.get("certificate", True) is None:
        # Implicit TLS on a plain socket needs our certificate; "ssl:" endpoints carry their own.
        problems += [
            (f"{section}.{key}", f"{_quote(endpoint)} needs [tls] certificate "
                                 "(or an ssl: endpoint with its own certificate)")
            for section, key, endpoints in (
                ("smtp", "smtps", smtp.get("smtps", ())), ("pop3", "pop3s", pop3.get("pop3s", ()))
            )
            for endpoint in endpoints
            if _endpoint_fields(endpoint)[0] in ("tcp", "tcp6", "unix", "systemd")
        ]
    return problems


# --------------------------------------------------------------------------- loading


def parse_settings(data: Mapping[str, object], source: str) -> Settings:
    """Validate parsed TOML `data`; `source` names the file in messages. Raises ConfigError."""
    problems: list[str] = []
    for name, value in data.items():
        if name not in _SCHEMA:
            kind = "section" if isinstance(value, dict) else "key outside any section"
            problems.append(f"{source}: {name}: {_unknown(kind, name, list(_SCHEMA))}")
        elif not isinstance(value, dict):
            problems.append(f"{source}: {name}: {_expected('a [section] table', value)}")

    values: dict[str, dict[str, Any]] = {section: {} for section in _SCHEMA}
    computed: list[tuple[str, str, _Parser, _Computed]] = []

    def apply(section: str, key: str, parse: _Parser, raw: object, note: str = "") -> None:
        try:
            values[section][key] = parse(raw)
        except _Invalid as error:
            problems.extend(f"{source}: {section}.{key}{sfx}: {why}" for sfx, why in error.problems)
        except ValueError as error:
            problems.append(f"{source}: {section}.{key}: {error}{note}")

    for section, (_cls, keys) in _SCHEMA.items():
        given = data.get(section)
        given = given if isinstance(given, dict) else {}
        problems.extend(
            f"{source}: {section}.{key}: {_unknown('key', key, list(keys))}"
            for key in given if key not in keys
        )
        for key, (parse, default) in keys.items():
            if key in given:
                apply(section, key, parse, given[key])
            elif isinstance(default, _Computed):
                computed.append((section, key, parse, default))  # after the keys it depends on
            else:
                apply(section, key, parse, default)
    for section, key, parse, default in computed:
        # Only the host's name can fail here; say where the bad value came from.
        note = f" (built-in default; set {section}.{key})"
        apply(section, key, parse, default.compute(values), note)

    problems.extend(f"{source}: {key}: {why}" for key, why in _cross_checks(values))
    if problems:
        raise ConfigError(problems)
    sections = {section: cls(**values[section]) for section, (cls, _keys) in _SCHEMA.items()}
    return Settings(source=source, **sections)


def _toml_problem(source: str, error: tomllib.TOMLDecodeError, text: str) -> str:
    # Python 3.11's TOMLDecodeError carries its position only inside the message.
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(error))
    if match:
        return f"{source}: line {match[2]}: {match[1]} (column {match[3]})"
    message = str(error).removesuffix(" (at end of document)")
    return f"{source}: line {text.count(chr(10)) + 1}: {message} (at end of file)"


def load_settings(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] = os.environ
) -> Settings:
    """Load `path`, else $RELAYHUB_CONFIG, else DEFAULT_PATH if it exists, else the defaults."""
    return settings_from_text(*read_config(path, environ))


def read_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] = os.environ
) -> tuple[str, str | None]:
    """Which configuration applies, and its text: (source, text), text None for the
    built-in defaults. The master passes exactly this to its children, so they all run the
    configuration it validated even if the file changes meanwhile."""
    if path is None:
        path = environ.get("RELAYHUB_CONFIG") or None
    if path is None and DEFAULT_PATH.exists():
        path = DEFAULT_PATH
    if path is None:
        return BUILTIN_SOURCE, None
    source = os.fspath(path)
    try:
        return source, Path(source).read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError([f"{source}: cannot read: {error.strerror or error}"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([f"{source}: cannot read: not UTF-8 (byte {error.start})"]) from None


def settings_from_text(source: str, text: str | None) -> Settings:
    """Parse and validate configuration text (None: the built-in defaults)."""
    if text is None:
        return parse_settings({}, BUILTIN_SOURCE)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([_toml_problem(source, error, text)]) from None
    return parse_settings(data, source)
