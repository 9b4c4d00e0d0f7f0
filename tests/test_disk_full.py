"""A full disk, for real: the state directory is a small tmpfs that the test fills. New mail
is refused with 452 4.3.1 at MAIL below `[queue] min_free_space` (or for a SIZE that cannot
fit) and at the end of DATA when the disk fills meanwhile; what was queued before is intact;
Maildir delivery into a full disk is deferred, not bounced; and everything resumes once
space returns, without a restart."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubprocess import REPO, Hub, SMTPConnection

from relayhub.errors import InsufficientStorage
from relayhub.queue.space import FreeSpace, free_bytes, is_out_of_space

SIZE = "8m"
MIN_FREE = 1024 * 1024  # [queue] min_free_space in these tests
CHUNK = 1024 * 1024
USERS = "alice:{PLAIN}x:Alice\n"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of SIZE at tmp_path/state (skipped, saying why, where mount is not allowed)."""
    mount_point = tmp_path / "state"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


class Filler:
    """One file that takes the file system's space, leaving about `leave` bytes free."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "filler"

    def leave(self, leave: int) -> None:
        # ENOSPC: as full as it gets.
        with open(self.path, "ab") as f, contextlib.suppress(OSError):
            while (free_bytes(self.path.parent) or 0) > leave:
                want = min(CHUNK, (free_bytes(self.path.parent) or 0) - leave)
                f.write(b"\0" * max(want, 4096))
                f.flush()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture
def hub(tmp_path: Path, small_fs: Path) -> Iterator[Hub]:
    (tmp_path / "users").write_text(USERS)
    running = Hub(tmp_path, {
        "users": {"file": str(tmp_path / "users")},
        "queue": {"min_free_space": MIN_FREE},
        "delivery": {"retry_min": "1s", "retry_max": "2s"},
    })
    assert running.state_dir == small_fs
    running.start()
    yield running
    running.stop()


def relayhubctl(hub: Hub, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "relayhub.admin", "-c", str(hub.config_path),
                           *args], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr


def mail_reply(hub: Hub, parameters: str = "") -> str:
    with SMTPConnection(hub.smtp_port) as conn:
        conn.reply()
        conn.command("EHLO client.test")
        return conn.command(f"MAIL FROM:<postmaster@localhost>{parameters}")[-1]


def bodies(hub: Hub) -> dict[str, bytes]:
    directory = hub.state_dir / "queue" / "bodies"
    return {path.name: path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def big_body(size: int, tag: str) -> bytes:
    line = (tag * 80)[:76].encode() + b"\r\n"
    return b"Subject: " + tag.encode() + b"\r\n\r\n" + line * (size // len(line))


def delivered_intact(hub: Hub, message: bytes) -> bool:
    """alice's one Maildir message ends with exactly the text of `message` (line ends aside)."""
    [path] = (hub.state_dir / "mail" / "alice" / "new").iterdir()
    text = message.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
    return path.read_bytes().replace(b"\r\n", b"\n").endswith(b"\n\n" + text)


def test_mail_is_refused_below_min_free_space_and_for_a_size_that_cannot_fit(
        hub: Hub, small_fs: Path) -> None:
    free = free_bytes(small_fs)
    assert free is not None and free > 4 * MIN_FREE
    assert mail_reply(hub, " SIZE=1000").startswith("250 ")
    # A SIZE that would leave less than min_free_space: refused at once, before DATA.
    assert mail_reply(hub, f" SIZE={free - MIN_FREE + 4096}") == \
        "452 4.3.1 Insufficient system storage"

    filler = Filler(small_fs)
    filler.leave(MIN_FREE // 2)  # below min_free_space, not yet full
    hub.wait(lambda: mail_reply(hub).startswith("452 4.3.1"), timeout=5)
    hub.wait_for_log("NOQUEUE: reject: MAIL from")

    filler.remove()  # space returns: accepted again without a restart
    hub.wait(lambda: mail_reply(hub).startswith("250 "), timeout=5)
    hub.send(["alice@localhost"])
    hub.wait(lambda: len(hub.mailbox("alice")) == 1)


def test_disk_full_during_data_is_452_and_what_was_queued_is_intact(
        hub: Hub, small_fs: Path) -> None:
    relayhubctl(hub, "queue", "pause", "--domain", "localhost")
    kept_id = hub.send(["alice@localhost"], big_body(300_000, "kept"))
    before = bodies(hub)
    assert len(before) == 1

    filler = Filler(small_fs)
    filler.leave(3 * MIN_FREE)  # MAIL is still accepted; a 5 MB message cannot fit
    with SMTPConnection(hub.smtp_port, timeout=60) as conn:
        conn.reply()
        conn.command("EHLO client.test")
        assert conn.command("MAIL FROM:<postmaster@localhost>")[-1].startswith("250 ")
        assert conn.command("RCPT TO:<alice@localhost>")[-1].startswith("250 ")
        assert conn.command("DATA")[-1].startswith("354 ")
        conn.send(big_body(5 * 1024 * 1024, "lost") + b".\r\n")
        assert conn.reply() == ["452 4.3.1 Insufficient system storage"]
        # The session goes on; the partial body is gone.
        assert conn.command("NOOP")[-1].startswith("250 ")
    assert bodies(hub) == before
    hub.wait_for_log("queue write failed")

    filler.remove()
    relayhubctl(hub, "queue", "resume", "--domain", "localhost")
    [delivered] = hub.wait(lambda: hub.mailbox("alice"))
    assert kept_id in delivered["Received"]
    assert delivered_intact(hub, big_body(300_000, "kept"))
    assert "Traceback" not in hub.log()


def test_maildir_delivery_into_a_full_disk_is_deferred_then_delivered(
        hub: Hub, small_fs: Path) -> None:
    relayhubctl(hub, "queue", "pause", "--domain", "localhost")
    body = big_body(1024 * 1024, "maildir")
    hub.send(["alice@localhost"], body)
    filler = Filler(small_fs)
    filler.leave(200_000)  # the queue's database still fits its writes; the Maildir copy not

    relayhubctl(hub, "queue", "resume", "--domain", "localhost")
    hub.wait_for_log("status=deferred", timeout=20)
    deferred = [line for line in hub.log().splitlines() if "status=deferred" in line]
    assert "dsn=4.3.1" in deferred[0], deferred[0]
    assert hub.mailbox("alice") == [] and hub.mailbox("postmaster") == []  # no bounce

    filler.remove()
    hub.wait(lambda: hub.mailbox("alice"), timeout=30)
    assert delivered_intact(hub, body)
    assert hub.mailbox("postmaster") == []


def test_sqlite_full_counts_as_out_of_space(small_fs: Path) -> None:
    db = sqlite3.connect(small_fs / "full.db")
    Filler(small_fs).leave(64 * 1024)
    with pytest.raises(sqlite3.Error) as raised:
        db.execute("CREATE TABLE t (b BLOB)")
        db.execute("INSERT INTO t VALUES (?)", (os.urandom(1024 * 1024),))
        db.commit()
    db.close()
    assert is_out_of_space(raised.value)
    assert not is_out_of_space(sqlite3.OperationalError("no such table"))
    assert is_out_of_space(OSError(28, "No space left on device"))


def test_free_space_is_measured_at_most_once_a_second() -> None:
    now = [100.0]
    measured = []

    def measure(path: Path) -> int | None:
        measured.append(now[0])
        return 5000

    space = FreeSpace(Path("/"), 1000, lambda: now[0], measure)
    space.check(4000)
    with pytest.raises(InsufficientStorage):
        space.check(4001)
    now[0] += 0.5
    space.check()
    now[0] += 0.6
    space.check()
    assert measured == [100.0, 101.1]
    assert FreeSpace(Path("/"), 10, lambda: 0.0, lambda path: None).check(10**12) is None
