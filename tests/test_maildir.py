"""Maildir delivery: exact file content, durable (fsync'd) tmp → new, unique names across
processes, loop detection, and the errors that map to DSN statuses."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from relayhub.delivery import maildir
from relayhub.delivery.maildir import (
    LocalDeliveryError,
    MailboxUnavailable,
    MailLoop,
    StorageFull,
    UnsafeMailboxName,
    deliver_to_maildir,
)

REPO = Path(__file__).resolve().parent.parent
BODY = (b"Received: from client (client [192.0.2.9])\r\n\tby hub (relayhub) with ESMTP id Q1\r\n"
        b"Subject: hello\r\n\r\nDelivered-To: bob@example.org\r\n"  # body text, not a header
        b".leading dot\r\nna\xc3\xafve\r\n")
NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)R([0-9a-f]{16})\.([^/:,]+),S=(\d+)$")


@pytest.fixture
def body(tmp_path: Path) -> Path:
    path = tmp_path / "queued-body"
    path.write_bytes(BODY)
    return path


def deliver(mail_root: Path, body: Path, mailbox: str = "bob", sender: str = "alice@example.org",
            rcpt: str = "bob@example.org") -> str:
    return deliver_to_maildir(mail_root, mailbox, body, return_path=sender, delivered_to=rcpt,
                              now=1_700_000_000.25)


def test_first_delivery_creates_the_maildir_and_stores_exact_bytes(tmp_path: Path,
                                                                   body: Path) -> None:
    mail_root = tmp_path / "state" / "mail"
    name = deliver(mail_root, body)
    mailbox = mail_root / "bob"
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((mailbox / sub).stat().st_mode) == 0o700
    assert stat.S_IMODE(mailbox.stat().st_mode) == 0o700
    assert os.listdir(mailbox / "new") == [name]
    assert os.listdir(mailbox / "tmp") == [] and os.listdir(mailbox / "cur") == []
    stored = (mailbox / "new" / name).read_bytes()
    assert stored == (b"Return-Path: <alice@example.org>\r\nDelivered-To: bob@example.org\r\n"
                      + BODY)
    match = NAME.match(name)
    assert match, name
    assert match.group(1) == "1700000000" and match.group(2) == "250000"
    assert match.group(3) == str(os.getpid())
    assert int(match.group(6)) == len(stored)  # what POP3 LIST reports, without a stat
    assert stat.S_IMODE((mailbox / "new" / name).stat().st_mode) == 0o600


def test_null_sender_gets_an_empty_return_path(tmp_path: Path, body: Path) -> None:
    name = deliver(tmp_path, body, sender="")
    assert (tmp_path / "bob" / "new" / name).read_bytes().startswith(b"Return-Path: <>\r\n")


def test_file_and_directories_are_fsynced_before_returning(tmp_path: Path, body: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    mail_root = tmp_path / "mail"
    name = deliver(mail_root, body)
    mailbox = mail_root / "bob"
    # Each directory created is made durable in its parent; the file before it is linked
    # (while it is still only in tmp/), and new/ after.
    assert synced == [str(tmp_path), str(mail_root), str(mailbox), str(mailbox),
                      str(mailbox), str(mailbox / "tmp" / name.split(",S=")[0]),
                      str(mailbox / "new")]
    synced.clear()
    second = deliver(mail_root, body)
    assert synced == [str(mailbox / "tmp" / second.split(",S=")[0]), str(mailbox / "new")]


def test_many_deliveries_never_collide(tmp_path: Path, body: Path) -> None:
    names = {deliver(tmp_path, body) for _ in range(300)}  # same `now` every time
    assert len(names) == 300
    assert len(os.listdir(tmp_path / "bob" / "new")) == 300


def test_two_processes_never_collide(tmp_path: Path, body: Path) -> None:
    script = (
        "import sys; from pathlib import Path\n"
        "from relayhub.delivery.maildir import deliver_to_maildir\n"
        "for _ in range(200):\n"
        "    deliver_to_maildir(Path(sys.argv[1]), 'bob', Path(sys.argv[2]), return_path='a@x',"
        " delivered_to='bob@example.org', now=1700000000.0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(body)], env=env)
               for _ in range(2)]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    assert len(os.listdir(tmp_path / "bob" / "new")) == 400


@pytest.mark.parametrize("header", [
    b"Delivered-To: bob@example.org\r\n",
    b"delivered-to:   <Bob@Example.ORG>\r\n",
    b"Delivered-To:\r\n bob@example.org\r\n",
])
def test_loop_is_detected_by_delivered_to(tmp_path: Path, header: bytes) -> None:
    looping = tmp_path / "looping"
    looping.write_bytes(b"Received: from x\r\n" + header + b"Subject: s\r\n\r\nbody\r\n")
    with pytest.raises(MailLoop) as caught:
        deliver(tmp_path / "mail", looping)
    assert caught.value.status == "5.4.6" and caught.value.permanent
    assert caught.value.text == "mail forwarding loop for bob@example.org"
    assert not (tmp_path / "mail").exists()  # nothing written


def test_other_delivered_to_is_no_loop(tmp_path: Path) -> None:
    forwarded = tmp_path / "forwarded"
    forwarded.write_bytes(b"Delivered-To: bobby@example.org\r\nSubject: s\r\n\r\nbody\r\n")
    assert deliver(tmp_path / "mail", forwarded)


@pytest.mark.parametrize("mailbox", ["", ".hidden", "..", "../etc", "a/b", "nul\0"])
def test_unsafe_mailbox_names_are_refused(tmp_path: Path, body: Path, mailbox: str) -> None:
    with pytest.raises(UnsafeMailboxName) as caught:
        deliver(tmp_path, body, mailbox=mailbox)
    assert caught.value.status == "5.1.1" and caught.value.permanent
    assert os.listdir(tmp_path) == ["queued-body"]


def test_mailbox_that_is_not_a_directory_is_a_temporary_failure(tmp_path: Path,
                                                                 body: Path) -> None:
    (tmp_path / "bob").write_text("not a maildir")
    with pytest.raises(MailboxUnavailable) as caught:
        deliver(tmp_path, body)
    assert caught.value.status == "4.2.0" and not caught.value.permanent
    assert str(tmp_path / "bob") in caught.value.text


def test_missing_body_is_a_temporary_failure(tmp_path: Path) -> None:
    with pytest.raises(MailboxUnavailable):
        deliver(tmp_path, tmp_path / "gone")


@pytest.mark.parametrize(("code", "cls", "status"), [
    (errno.ENOSPC, StorageFull, "4.3.1"), (errno.EDQUOT, StorageFull, "4.2.2"),
    (errno.EIO, MailboxUnavailable, "4.2.0"), (errno.EACCES, MailboxUnavailable, "4.2.0"),
])
def test_os_errors_map_to_temporary_statuses(code: int, cls: type[LocalDeliveryError],
                                             status: str) -> None:
    # A full disk cannot be made on demand here (no mount rights); the mapping is pure.
    error = maildir._classify(OSError(code, os.strerror(code), "/mail/bob/tmp/x"))
    assert type(error) is cls and error.status == status and not error.permanent
    assert error.text.endswith(f"{os.strerror(code)}: /mail/bob/tmp/x")
