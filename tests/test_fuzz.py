"""Short property runs of every fuzz target (bench/fuzz_targets.py): generated inputs that
reach deep into each parser, and raw bytes. The long run is bench/fuzz.py; these keep the
invariants checked with the suite. Derandomized, so the suite does not turn red on a new
finding by chance: findings come from the long run and get a regression test."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_targets import Fixture, Target, targets
from relayhub.smtp.headers import HeaderStage

# Examples per target and kind; the slow targets (whole sessions, DSNs) get fewer.
EXAMPLES = {"pop3-session": 40, "dsn": 40, "smtp-session": 150, "mime": 150}


@pytest.fixture(scope="module")
def fixture() -> Iterator[Fixture]:
    fixture = Fixture()
    yield fixture
    fixture.close()


_NAMES = ["smtp-session", "data-framing", "address", "mail-rcpt-params", "aliases", "users",
          "config", "pop3-session", "pop3-parsers", "mime", "dsn"]


def test_every_target_is_run(fixture: Fixture) -> None:
    assert [t.name for t in targets(fixture)] == _NAMES


def _target(fixture: Fixture, name: str) -> Target:
    return next(t for t in targets(fixture) if t.name == name)


@pytest.mark.parametrize("name", _NAMES)
def test_generated_inputs(fixture: Fixture, name: str) -> None:
    target = _target(fixture, name)

    @settings(max_examples=EXAMPLES.get(name, 300), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck), database=None)
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        target.check(target.generate(rng))

    check()


@pytest.mark.parametrize("name", _NAMES)
def test_raw_bytes(fixture: Fixture, name: str) -> None:
    target = _target(fixture, name)

    @settings(max_examples=EXAMPLES.get(name, 300) // 2, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck), database=None)
    @given(st.binary(max_size=3000))
    def check(data: bytes) -> None:
        target.check(data)

    check()


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"A: b", b"From: x@h.example.org",
                                 b" folded", b"body", b"\r\n\r\n"]), max_size=30),
       st.integers(min_value=1, max_value=7))
def test_header_stage_does_not_depend_on_the_chunks(pieces: list[bytes], step: int) -> None:
    """HeaderStage searches only the new bytes for the blank line (a header sent in tiny
    pieces once cost a scan of everything held, per piece): same result for any cut."""
    data = b"".join(pieces)

    def run(size: int) -> bytes:
        out: list[bytes] = []
        stage = HeaderStage(out.append, lambda header: header.upper())
        for start in range(0, len(data), size):
            stage.feed(data[start:start + size])
        stage.finish()
        return b"".join(out)

    assert run(step) == run(max(len(data), 1))
