"""Tests for relayhub.config (TOML settings, SPEC §2) and `relayhubctl config check`."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_tls import PemCA

from relayhub import config
from relayhub.admin.cli import run
from relayhub.config import (
    BUILTIN_SOURCE,
    ConfigError,
    NextHop,
    Settings,
    load_settings,
    parse_duration,
    parse_next_hop,
    parse_settings,
    parse_size,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A real /etc/relayhub/relayhub.toml on the test machine must not leak into the tests.
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "no-such-dir" / "relayhub.toml")
    monkeypatch.delenv("RELAYHUB_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "relayhub.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --------------------------------------------------------------------------- value syntax


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("5m", 300), ("4h", 14400), ("5d", 432000), ("0s", 0), ("1.5h", 5400),
    (" 2m ", 120),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "5x", "", "-5s", "s", "5 minutes", "1h30m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a duration \(a number with s, m, h or d"):
        parse_duration(text)


@pytest.mark.parametrize(("value", "size"), [
    (0, 0), (512, 512), ("512", 512), ("100B", 100), ("10MB", 10_000_000), ("2KB", 2000),
    ("1GB", 10**9), ("64KiB", 65536), ("35MiB", 35 * 2**20), ("1GiB", 2**30),
    ("1.5KiB", 1536), ("35 MiB", 35 * 2**20), ("8mib", 8 * 2**20),
])
def test_parse_size(value: int | str, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["35XB", "", "MiB", "-1", "1.2.3MB", -1])
def test_parse_size_rejects(value: int | str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(value)
    quoted = f'"{value}"' if isinstance(value, str) else str(value)
    assert str(caught.value) == (
        f"{quoted} is not a size (bytes, or a number with B, KB, MB, GB, KiB, MiB, GiB)"
    )


@pytest.mark.parametrize(("text", "hop"), [
    ("[10.1.2.3]:25", NextHop("10.1.2.3", 25, mx=False)),
    ("mx.lab.example.org", NextHop("mx.lab.example.org", None, mx=True)),
    ("Mail.Example.ORG.", NextHop("mail.example.org", None, mx=True)),
    ("host:2525", NextHop("host", 2525, mx=True)),
    ("[smtp.provider.net]:587", NextHop("smtp.provider.net", 587, mx=False)),
    ("[smtp.provider.net]", NextHop("smtp.provider.net", None, mx=False)),
    ("[::1]:25", NextHop("::1", 25, mx=False)),
    ("[2001:DB8::1]", NextHop("2001:db8::1", None, mx=False)),
])
def test_parse_next_hop(text: str, hop: NextHop) -> None:
    assert parse_next_hop(text) == hop
    assert parse_next_hop(str(hop)) == hop


def test_next_hop_str() -> None:
    assert str(NextHop("10.1.2.3", 25, mx=False)) == "[10.1.2.3]:25"
    assert str(NextHop("mx.example.org", None, mx=True)) == "mx.example.org"
    assert str(NextHop("::1", 25, mx=False)) == "[::1]:25"


@pytest.mark.parametrize(("text", "why"), [
    ("", '"" is not a next hop (host, host:port, [host] or [host]:port)'),
    ("[10.1.2.3", '"[10.1.2.3" is not a next hop (host, host:port, [host] or [host]:port)'),
    ("host:", '"host:" is not a next hop (host, host:port, [host] or [host]:port)'),
    ("::1", '"::1" is not a next hop (host, host:port, [host] or [host]:port)'),
    ("[]:25", '"[]:25" is not a next hop (host, host:port, [host] or [host]:port)'),
    ("host:0", '"host:0": port 0 is not between 1 and 65535'),
    ("[::1]:70000", '"[::1]:70000": port 70000 is not between 1 and 65535'),
    ("bad_host", '"bad_host" is not a valid domain name'),
    ("10.1.2.3:25", '"10.1.2.3:25": write an IP address in brackets, as "[10.1.2.3]"'),
])
def test_parse_next_hop_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_next_hop(text)
    assert str(caught.value) == why


# --------------------------------------------------------------------------- defaults


def test_builtin_defaults(tmp_path: Path) -> None:
    settings = load_settings(environ={})
    assert settings.source == BUILTIN_SOURCE
    assert settings.server.state_dir == tmp_path / "relayhub-data"
    assert settings.server.workers == (os.cpu_count() or 1)
    assert settings.server.user == ""
    assert settings.server.shutdown_grace == 30
    assert settings.smtp.listen == ("tcp:2525:interface=127.0.0.1",)
    assert settings.smtp.submission == settings.smtp.smtps == ()
    assert settings.smtp.max_message_size == 35 * 2**20
    assert settings.smtp.max_line_length == 64 * 2**10
    assert (settings.smtp.max_recipients, settings.smtp.max_connections,
            settings.smtp.max_connections_per_ip) == (1000, 2000, 50)
    assert settings.smtp.timeout == 300
    assert (settings.smtp.vrfy, settings.smtp.expn, settings.smtp.bare_newline) == (
        "trusted", "trusted", "reject")
    assert settings.smtp.allow_plaintext_auth is True
    assert not settings.tls.enabled
    assert settings.tls.certificate is settings.tls.private_key is None
    assert settings.domains.local == ("localhost",)
    assert settings.domains.relay == settings.domains.masquerade == ()
    assert settings.domains.trusted_networks == (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert settings.routing.relayhost is None
    assert dict(settings.routing.transport) == {}
    assert (settings.delivery.retry_min, settings.delivery.retry_max,
            settings.delivery.max_lifetime, settings.delivery.delay_warning) == (
        300, 3600, 5 * 86400, 4 * 3600)
    assert settings.delivery.concurrency_per_destination == 20
    assert settings.delivery.tls == "opportunistic"
    assert settings.delivery.smtp_port == 25
    assert settings.delivery.nameservers == ()
    assert settings.aliases.file == tmp_path / "relayhub-data" / "aliases"
    assert settings.users.file == tmp_path / "relayhub-data" / "users"
    assert settings.pop3.listen == ("tcp:1110:interface=127.0.0.1",)
    assert settings.pop3.pop3s == ()
    assert settings.pop3.allow_plaintext_auth is True
    assert settings.pop3.apop is False
    assert (settings.queue.backend, settings.queue.dsn) == ("sqlite", "")
    assert settings.queue.min_free_space == 100_000_000
    assert settings.queue.lease == 60.0
    assert settings.log.format == "text"
    assert settings.metrics.listen == ()
    assert settings == parse_settings({}, BUILTIN_SOURCE)


def test_settings_are_immutable() -> None:
    settings = parse_settings({"routing": {"transport": {"a.example": "[10.0.0.1]"}}}, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.smtp.timeout = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.routing.transport["b.example"] = NextHop("h", None, True)  # type: ignore[index]


def test_environment_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[smtp]\nmax_recipients = 7\n')
    settings = load_settings(environ={"RELAYHUB_CONFIG": path})
    assert (settings.source, settings.smtp.max_recipients) == (path, 7)
    # An explicit path beats the environment.
    other = write(tmp_path, "", name="other.toml")
    assert load_settings(other, environ={"RELAYHUB_CONFIG": path}).smtp.max_recipients == 1000


def test_default_path_used_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(write(tmp_path, "[server]\nworkers = 3\n"))
    monkeypatch.setattr(config, "DEFAULT_PATH", path)
    settings = load_settings(environ={})
    assert (settings.source, settings.server.workers) == (str(path), 3)


def test_relative_paths_are_made_absolute(tmp_path: Path) -> None:
    settings = parse_settings({"server": {"state_dir": "spool"},
                               "users": {"file": "../etc/users"}}, "f")
    assert settings.server.state_dir == tmp_path / "spool"
    assert settings.aliases.file == tmp_path / "spool" / "aliases"  # follows state_dir
    assert settings.users.file == tmp_path.parent / "etc" / "users"


SPEC_EXAMPLE = """
[server]
hostname = "mail.example.org"
state_dir = "/var/spool/relayhub"
workers = 2
shutdown_grace = "30s"

[smtp]
listen = ["tcp:25"]
submission = ["tcp:587"]
smtps = []
max_message_size = "35MiB"
max_recipients = 1000
max_connections = 2000
max_connections_per_ip = 50
timeout = "5m"
max_line_length = "64KiB"
allow_plaintext_auth = false
vrfy = "trusted"
expn = "trusted"
bare_newline = "reject"

[domains]
local = ["example.org"]
relay = ["eng.example.org", ".lab.example.org"]
trusted_networks = ["127.0.0.0/8", "::1/128", "10.0.0.0/8"]
masquerade = ["example.org"]

[routing]
relayhost = ""
transport = { "eng.example.org" = "[10.1.2.3]:25", ".lab.example.org" = "mx.lab.example.org" }

[delivery]
retry_min = "5m"
retry_max = "1h"
max_lifetime = "5d"
delay_warning = "0s"
concurrency_per_destination = 20
tls = "opportunistic"
smtp_port = 25
nameservers = ["127.0.0.1:5353", "[::1]:53", "10.0.0.1", "2001:db8::53"]

[aliases]
file = "/etc/relayhub/aliases"

[users]
file = "/etc/relayhub/users"

[pop3]
listen = ["tcp:110", "systemd:domain=INET:name=pop3"]
pop3s = []
apop = false

[queue]
backend = "sqlite"

[log]
format = "text"

[metrics]
listen = []                            # e.g. ["tcp:9325:interface=127.0.0.1"]: Prometheus /metrics
"""


def test_spec_example(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SPEC_EXAMPLE))
    assert settings.server.hostname == "mail.example.org"
    assert settings.domains.relay == ("eng.example.org", ".lab.example.org")
    assert dict(settings.routing.transport) == {
        "eng.example.org": NextHop("10.1.2.3", 25, mx=False),
        ".lab.example.org": NextHop("mx.lab.example.org", None, mx=True),
    }
    assert settings.delivery.delay_warning == 0
    assert settings.delivery.nameservers == (
        ("127.0.0.1", 5353), ("::1", 53), ("10.0.0.1", 53), ("2001:db8::53", 53))
    assert settings.aliases.file == Path("/etc/relayhub/aliases")
    assert settings.pop3.allow_plaintext_auth is False  # public listener, rule says no
    assert settings.queue.backend == "sqlite"


def test_domains_are_normalised() -> None:
    settings = parse_settings({
        "domains": {"local": ["Example.ORG."], "relay": [".Lab.Example.org"]},
        "routing": {"relayhost": "[Smtp.Provider.NET]:587",
                    "transport": {"ENG.example.org.": "[10.1.2.3]"}},
    }, "f")
    assert settings.domains.local == ("example.org",)
    assert settings.domains.relay == (".lab.example.org",)
    assert settings.routing.relayhost == NextHop("smtp.provider.net", 587, mx=False)
    assert list(settings.routing.transport) == ["eng.example.org"]


@pytest.mark.parametrize(("smtp", "expected"), [
    ({}, True),
    ({"listen": ["tcp:25:interface=127.0.0.2"], "submission": ["unix:/run/relayhub.sock"]}, True),
    ({"listen": ["tcp6:2525:interface=\\:\\:1"]}, True),
    ({"listen": ["tcp:2525:127.0.0.1"]}, True),  # positional interface
    ({"listen": []}, True),
    ({"listen": ["tcp:25"]}, False),
    ({"listen": ["tcp:25:interface=0.0.0.0"]}, False),
    ({"listen": ["tcp:25:interface=10.0.0.1"]}, False),
    ({"submission": ["tcp:587"]}, False),  # listen default is loopback, submission is not
    ({"listen": ["systemd:domain=INET:name=smtp"]}, False),
    ({"listen": ["tcp:25"], "allow_plaintext_auth": True}, True),  # explicit wins
    ({"allow_plaintext_auth": False}, False),
])
def test_plaintext_auth_loopback_rule(smtp: dict[str, object], expected: bool) -> None:
    assert parse_settings({"smtp": smtp}, "f").smtp.allow_plaintext_auth is expected


def test_pop3_loopback_rule_is_separate() -> None:
    settings = parse_settings({"smtp": {"listen": ["tcp:25"]}}, "f")
    assert (settings.smtp.allow_plaintext_auth, settings.pop3.allow_plaintext_auth) == (
        False, True)
    settings = parse_settings({"pop3": {"listen": ["tcp:110"]}}, "f")
    assert settings.pop3.allow_plaintext_auth is False
    assert settings.smtp.allow_plaintext_auth is True


def test_tls_files(tmp_path: Path) -> None:
    issued_cert, issued_key = PemCA().write_server(tmp_path, "hub.test")
    cert, key = issued_cert.rename(tmp_path / "cert.pem"), issued_key.rename(tmp_path / "key.pem")
    settings = parse_settings({"tls": {"certificate": "cert.pem", "private_key": str(key)},
                               "smtp": {"smtps": ["tcp:465"]}}, "f")
    assert settings.tls.enabled
    assert (settings.tls.certificate, settings.tls.private_key) == (cert, key)
    # Without private_key the certificate file holds the key too.
    both = tmp_path / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    assert parse_settings({"tls": {"certificate": str(both)}}, "f").tls.private_key is None


# --------------------------------------------------------------------------- problems


BAD_CASES = [
    ('[smtp]\nmax_message_size = "35XB"\n',
     'smtp.max_message_size: "35XB" is not a size (bytes, or a number with B, KB, MB, GB, '
     'KiB, MiB, GiB)'),
    ('[smtp]\nlisen = ["tcp:25"]\n', "smtp.lisen: unknown key (did you mean listen?)"),
    ("[smpt]\n", "smpt: unknown section (did you mean smtp?)"),
    ("[smtp]\ntimeout = 300\n",
     'smtp.timeout: expected a duration string such as "30s" or "5m", found integer 300'),
    ('[smtp]\nmax_recipients = "many"\n',
     'smtp.max_recipients: expected an integer, found string "many"'),
    ("[smtp]\nmax_connections = 0\n", "smtp.max_connections: must be at least 1, not 0"),
    ('[smtp]\nvrfy = "yes"\n', 'smtp.vrfy: "yes" is not one of "all", "trusted", "off"'),
    ('[smtp]\nbare_newline = "fix"\n',
     'smtp.bare_newline: "fix" is not one of "reject", "normalize"'),
    ('[smtp]\nallow_plaintext_auth = "yes"\n',
     'smtp.allow_plaintext_auth: expected true or false, found string "yes"'),
    ('[smtp]\nlisten = ["tcp:smtp"]\n',
     "smtp.listen[0]: \"tcp:smtp\" is not a valid endpoint: invalid literal for int() with "
     "base 10: 'smtp'"),
    ('[smtp]\nlisten = ["tcp:25", "bogus:25"]\n',
     "smtp.listen[1]: \"bogus:25\" is not a valid endpoint: Unknown endpoint type: 'bogus'"),
    ('[smtp]\nsubmission = ["systemd:domain=INET:index=0:name=x"]\n',
     'smtp.submission[0]: "systemd:domain=INET:index=0:name=x" is not a valid endpoint: '
     "needs domain=INET|INET6|UNIX and one of name=NAME or index=N"),
    ('[smtp]\nsmtps = ["tcp:465"]\n',
     'smtp.smtps: "tcp:465" needs [tls] certificate (or an ssl: endpoint with its own '
     "certificate)"),
    ('[pop3]\npop3s = ["tcp:995"]\n',
     'pop3.pop3s: "tcp:995" needs [tls] certificate (or an ssl: endpoint with its own '
     "certificate)"),
    ('[smtp]\nmax_line_length = "512B"\n',
     'smtp.max_line_length: "512B": must be at least 1000 bytes'),
    ('[server]\nshutdown_grace = "soon"\n',
     'server.shutdown_grace: "soon" is not a duration (a number with s, m, h or d, '
     'e.g. "30s", "5m")'),
    ('[server]\nuser = "no-such-user-relayhub-test"\n',
     'server.user: no such user "no-such-user-relayhub-test"'),
    ('[server]\nhostname = "mail_server"\n',
     'server.hostname: "mail_server" is not a valid domain name'),
    ('[domains]\nlocal = ["example.org", "exa mple.org"]\n',
     'domains.local[1]: "exa mple.org" is not a valid domain name'),
    ('[domains]\nlocal = ["example.org"]\nrelay = ["example.org"]\n',
     'domains.relay: "example.org" is also in domains.local (a domain is one or the other)'),
    ('[domains]\ntrusted_networks = ["10.0.0.1/8"]\n',
     "domains.trusted_networks[0]: 10.0.0.1/8 has host bits set"),
    ('[domains]\ntrusted_networks = "10.0.0.0/8"\n',
     'domains.trusted_networks: expected an array, found string "10.0.0.0/8"'),
    ('[routing]\nrelayhost = "[smtp.provider.net:587"\n',
     'routing.relayhost: "[smtp.provider.net:587" is not a next hop (host, host:port, '
     "[host] or [host]:port)"),
    ('[routing.transport]\n"eng.example.org" = "[10.1.2.3]:x"\n',
     'routing.transport["eng.example.org"]: "[10.1.2.3]:x" is not a next hop (host, '
     "host:port, [host] or [host]:port)"),
    ('[routing.transport]\neng.example.org = "[10.1.2.3]"\n',
     'routing.transport["eng"]: expected a next-hop string, found a table (quote domain names '
     'used as keys: "eng.example.org" = "[10.1.2.3]:25")'),
    ('[delivery]\nretry_min = "2h"\nretry_max = "1h"\n',
     "delivery.retry_min: 7200s is longer than delivery.retry_max (3600s)"),
    ('[delivery]\nnameservers = ["ns.example.org"]\n',
     'delivery.nameservers[0]: "ns.example.org" is not a name server (an IP address, with '
     ":port or as [IPv6]:port)"),
    ('[delivery]\ntls = "must"\n',
     'delivery.tls: "must" is not one of "none", "opportunistic", "required", "verify"'),
    ("[delivery]\nsmtp_port = 70000\n", "delivery.smtp_port: must be 1 to 65535, not 70000"),
    ('[queue]\nbackend = "postgresql"\n',
     'queue.dsn: is empty; backend "postgresql" needs a connection string'),
    ('[queue]\nlease = "0s"\n', 'queue.lease: "0s": must be longer than 0s'),
    ('[metrics]\nlisten = ["tcp:metrics"]\n',
     'metrics.listen[0]: "tcp:metrics" is not a valid endpoint: invalid literal for int() '
     "with base 10: 'metrics'"),
    ('[metrics]\nlisten = "tcp:9325"\n',
     'metrics.listen: expected an array, found string "tcp:9325"'),
    ('[queue]\nbackend = "mysql"\n', 'queue.backend: "mysql" is not one of "sqlite", "postgresql"'),
    ('[log]\nformat = "xml"\n', 'log.format: "xml" is not one of "text", "json"'),
    ('[tls]\ncertificate = "missing.pem"\n',
     'tls.certificate: cannot read "{dir}/missing.pem": No such file or directory'),
    ("smtp = 1\n", "smtp: expected a [section] table, found integer 1"),
    ("verbose = true\n", "verbose: unknown key outside any section"),
]


@pytest.mark.parametrize(("text", "problem"), BAD_CASES)
def test_bad_configuration(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "relayhub.toml"
    expected = f"{path}: " + problem.replace("{dir}", str(tmp_path))
    assert problems_of(tmp_path, text) == [expected]


def test_metrics_and_json_log(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[metrics]\nlisten = ["tcp:9325:interface=127.0.0.1"]'
                                             '\n\n[log]\nformat = "json"\n'))
    assert settings.metrics.listen == ("tcp:9325:interface=127.0.0.1",)
    assert settings.log.format == "json"


def test_private_key_without_certificate(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("x")
    assert problems_of(tmp_path, '[tls]\nprivate_key = "key.pem"\n') == [
        f"{tmp_path / 'relayhub.toml'}: tls.private_key: is set but tls.certificate is not"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
        [smpt]
        [smtp]
        timeout = 300
        max_connections = 0
        listen = ["tcp:smtp", 25]
        [delivery]
        tls = "must"
        retry_min = "2h"
        retry_max = "1h"
    """)
    keys = [p.split(": ")[1] for p in problems]
    assert keys == ["smpt", "smtp.listen[0]", "smtp.listen[1]", "smtp.max_connections",
                    "smtp.timeout", "delivery.tls", "delivery.retry_min"]
    assert all(p.startswith(f"{tmp_path / 'relayhub.toml'}: ") for p in problems)


def test_toml_syntax_error(tmp_path: Path) -> None:
    assert problems_of(tmp_path, '[smtp]\ntimeout = "5m" "6m"\n') == [
        f"{tmp_path / 'relayhub.toml'}: line 2: Expected newline or end of document after a "
        "statement (column 16)"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(str(tmp_path / "nope.toml"))
    assert caught.value.problems == [
        f"{tmp_path / 'nope.toml'}: cannot read: No such file or directory"]


def test_bad_default_hostname_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "build_box")
    with pytest.raises(ConfigError) as caught:
        parse_settings({}, BUILTIN_SOURCE)
    assert caught.value.problems == [
        f'{BUILTIN_SOURCE}: server.hostname: "build_box" is not a valid domain name '
        "(built-in default; set server.hostname)"]


# --------------------------------------------------------------------------- commands


def test_config_check_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["config", "check"]) == 0
    assert capsys.readouterr().out == f"OK: {BUILTIN_SOURCE}\n"
    good = write(tmp_path, "[log]\nformat = 'text'\n", name="good.toml")
    assert run(["config", "check", "-c", good]) == 0
    assert capsys.readouterr().out == f"OK: {good}\n"
    bad = write(tmp_path, "[log]\nformat = 'xml'\n")
    assert run(["-c", bad, "config", "check"]) == 2
    assert capsys.readouterr().err == f'{bad}: log.format: "xml" is not one of "text", "json"\n'
    assert run(["config"]) == 2  # usage error
    assert run(["frobnicate"]) == 2


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RELAYHUB_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _bad_config(tmp_path: Path) -> tuple[str, list[str]]:
    path = write(tmp_path, '[smtp]\nmax_message_size = "35XB"\ntimeout = "never"\n\n[bogus]\n')
    return path, [
        f"{path}: bogus: unknown section",
        f'{path}: smtp.max_message_size: "35XB" is not a size (bytes, or a number with B, KB, '
        "MB, GB, KiB, MiB, GiB)",
        f'{path}: smtp.timeout: "never" is not a duration (a number with s, m, h or d, '
        'e.g. "30s", "5m")',
    ]


def test_relayhubctl_config_check(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "relayhubctl"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "relayhub.admin"]
    bad, lines = _bad_config(tmp_path)
    result = subprocess.run([*command, "-c", bad, "config", "check"], capture_output=True,
                            text=True, env=_env(), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == lines
    assert "Traceback" not in result.stderr
    assert result.stdout == ""

    good = write(tmp_path, "", name="empty.toml")
    result = subprocess.run([*command, "-c", good, "config", "check"], capture_output=True,
                            text=True, env=_env(), cwd=tmp_path, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"OK: {good}\n", "")

    result = subprocess.run([*command, "config", "nonsense"], capture_output=True, text=True,
                            env=_env(), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "usage: relayhubctl" in result.stderr


def test_twistd_refuses_bad_config(tmp_path: Path) -> None:
    twistd = Path(sys.executable).parent / "twistd"
    command = ([str(twistd)] if twistd.exists()
               else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"])
    bad, lines = _bad_config(tmp_path)
    result = subprocess.run([*command, "-n", "--pidfile=", "relayhub", "-c", bad],
                            capture_output=True, text=True, env=_env(), cwd=tmp_path,
                            timeout=60)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == 1
    for line in lines:
        assert line in result.stderr.splitlines()


def test_settings_type_is_exported() -> None:
    assert [f.name for f in dataclasses.fields(Settings)] == [
        "source", "server", "smtp", "tls", "domains", "routing", "delivery", "sendmail",
        "aliases", "users", "pop3", "queue", "log", "metrics", "dkim"]


def test_min_free_space_takes_a_size() -> None:
    assert parse_settings({"queue": {"min_free_space": "2MiB"}}, "f"
                          ).queue.min_free_space == 2 * 1024 * 1024
    assert parse_settings({"queue": {"min_free_space": 0}}, "f").queue.min_free_space == 0
    with pytest.raises(ConfigError) as error:
        parse_settings({"queue": {"min_free_space": "lots"}}, "f")
    assert error.value.problems == [
        'f: queue.min_free_space: "lots" is not a size (bytes, or a number with B, KB, MB, '
        'GB, KiB, MiB, GiB)']
