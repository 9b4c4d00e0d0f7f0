"""What ships in etc/ and systemd/ is valid: the production configuration, the aliases and
users files, and the systemd units (systemd-analyze verify)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hubprocess import REPO
from test_tls import PemCA

from relayhub.aliases import load_aliases
from relayhub.config import settings_from_text
from relayhub.users import UserDatabase


def test_production_configuration_is_valid_with_real_certificate_files(tmp_path: Path) -> None:
    cert, key = PemCA().write_server(tmp_path, "mail.example.org")
    cert.rename(tmp_path / "fullchain.pem")
    key.rename(tmp_path / "privkey.pem")
    text = (REPO / "etc" / "relayhub.toml").read_text()
    text = text.replace("/etc/relayhub/tls/", f"{tmp_path}/")
    settings = settings_from_text("etc/relayhub.toml", text)
    assert settings.smtp.listen == ("tcp:25",) and settings.domains.local == ("example.org",)
    assert settings.tls.enabled and settings.delivery.tls == "opportunistic"


def test_aliases_file_has_the_rfc_2142_roles_and_loads_cleanly() -> None:
    loaded = load_aliases(REPO / "etc" / "aliases")
    names = {name.lower() for name in loaded.table.aliases}
    assert {"abuse", "security", "noc", "hostmaster", "webmaster", "root"} <= names


def test_users_file_is_empty_and_valid() -> None:
    users = UserDatabase(REPO / "etc" / "users")
    users.reload_if_changed()
    assert len(users) == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian: systemd)")
def test_systemd_units_verify(tmp_path: Path) -> None:
    # The units name the production install (/opt/relayhub); systemd-analyze insists that
    # ExecStart exists, so the copy checked points at this test's twistd, nothing else.
    twistd = Path(sys.executable).with_name("twistd")
    for unit in ("relayhub.service", "relayhub.socket"):
        text = (REPO / "systemd" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/opt/relayhub/bin/twistd", str(twistd)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "relayhub.service"),
         str(tmp_path / "relayhub.socket")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_installs_what_swaks_needs_for_tls() -> None:
    """`--no-install-recommends` drops Net::SSLeay, which swaks only recommends; without it
    `swaks --tls` stops with "TLS not available" (issue 14, defect 4)."""
    ci = (REPO / ".ci" / "run").read_text()
    assert "libnet-ssleay-perl" in ci
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed here (.ci/run installs it)")
    support = subprocess.run(["swaks", "--support"], capture_output=True, text=True, check=False)
    assert "=== TLS supported" in support.stdout + support.stderr
