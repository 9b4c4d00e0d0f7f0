"""POP3 through the real multi-process daemon: UIDLs survive a restart, and a mailbox
locked by a session on one worker is [IN-USE] for a session on another."""

from __future__ import annotations

import poplib
import re
import smtplib
import time
from pathlib import Path

from hubprocess import Hub

from relayhub.users import hash_password


def make_hub(tmp_path: Path) -> Hub:
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('secret')}:Alice Example\n")
    return Hub(tmp_path, {"server": {"workers": 2}, "users": {"file": str(users)},
                          "pop3": {"allow_plaintext_auth": True}})


def deliver(hub: Hub, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", hub.smtp_port) as client:
        for n in range(count):
            client.sendmail("postmaster@localhost", ["alice@localhost"],
                            f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode())
    new = hub.state_dir / "mail" / "alice" / "new"
    deadline = time.monotonic() + 20
    while len(list(new.glob("*"))) < count if new.is_dir() else True:
        assert time.monotonic() < deadline, "not delivered"
        time.sleep(0.1)


def login(hub: Hub) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", hub.pop3_port, timeout=30)
    client.user("alice")
    client.pass_("secret")
    return client


def test_uidls_survive_a_restart(tmp_path: Path) -> None:
    hub = make_hub(tmp_path).start()
    try:
        deliver(hub, 3)
        client = login(hub)
        before = client.uidl()[1]
        client.quit()
        hub.stop()
        hub.start()
        client = login(hub)
        assert client.uidl()[1] == before and len(before) == 3
        client.quit()
    finally:
        hub.stop()


def test_in_use_for_a_session_on_another_worker(tmp_path: Path) -> None:
    hub = make_hub(tmp_path).start()
    try:
        deliver(hub, 1)
        holder = login(hub)
        log = hub.wait_for_log("login: user=<alice>")
        holder_worker = re.findall(r"(worker-\d)\.\d\[\d+\] \[relayhub.pop3d\] login: user=<alice>",
                                   log)[-1]
        other_seen = False
        for _ in range(40):  # the kernel spreads connections over the workers' sockets
            client = poplib.POP3("127.0.0.1", hub.pop3_port, timeout=30)
            client.user("alice")
            try:
                client.pass_("secret")
                raise AssertionError("a second login to a locked mailbox succeeded")
            except poplib.error_proto as refusal:
                assert refusal.args[0].startswith(b"-ERR [IN-USE]"), refusal
            client.quit()
            lines = hub.wait_for_log("mailbox in use: user=<alice>").splitlines()
            refused_by = [re.match(r".*(worker-\d)\.\d\[", line) for line in lines
                          if "mailbox in use: user=<alice>" in line]
            if any(m and m.group(1) != holder_worker for m in refused_by):
                other_seen = True
                break
        assert other_seen, "no second session landed on the other worker in 40 tries"
        holder.quit()
        assert login(hub).stat()[0] == 1  # released at QUIT
    finally:
        hub.stop()
