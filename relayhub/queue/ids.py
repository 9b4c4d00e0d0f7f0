"""Queue IDs: base62 arrival time in microseconds plus random characters, sortable by arrival."""

from __future__ import annotations

import random
import re
import string

ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
# 62**10 microseconds is about 26 million years, so the width (and thus the sort order,
# which follows ASCII order of ALPHABET) never changes.
TIME_WIDTH = 10
# Two processes allocating in the same microsecond collide with odds 62**-5 (~1e-9);
# O_EXCL on the body file catches even that.
RANDOM_WIDTH = 5

QUEUE_ID_RE = re.compile(r"[0-9A-Za-z]{10,20}")


def new_queue_id(now: float, rng: random.Random) -> str:
    """Return a queue ID for a message arriving at epoch time `now`."""
    micros = int(now * 1_000_000)
    if micros < 0:
        raise ValueError(f"time before the epoch: {now!r}")
    digits: list[str] = []
    for _ in range(TIME_WIDTH):
        micros, digit = divmod(micros, 62)
        digits.append(ALPHABET[digit])
    if micros:
        raise ValueError(f"time too far in the future: {now!r}")
    # One draw for the whole suffix: a SystemRandom reads the kernel's generator per draw.
    number = rng.randrange(62 ** RANDOM_WIDTH)
    suffix: list[str] = []
    for _ in range(RANDOM_WIDTH):
        number, digit = divmod(number, 62)
        suffix.append(ALPHABET[digit])
    return "".join(reversed(digits)) + "".join(suffix)


def is_queue_id(text: str) -> bool:
    """True when `text` has the shape of a queue ID (safe to use as a file name)."""
    return QUEUE_ID_RE.fullmatch(text) is not None
