"""The AMP commands between the master and its children (workers, queue manager).

Children reach the master over a socketpair inherited as file descriptor 3; values stay
small (queue IDs, addresses), never message bodies (AMP values are limited to 64 KiB).
"""

from __future__ import annotations

from typing import ClassVar, TypeAlias

from twisted.protocols import amp

ArgumentList: TypeAlias = list[tuple[bytes, amp.Argument]]


class NewMail(amp.Command):
    """Worker → master: mail was queued (after its 250; one for the messages of a short
    interval under load); the master wakes the queue manager, so delivery starts at once
    instead of at its next scan."""

    requiresAnswer = False


class Wake(amp.Command):
    """Master → queue manager: look at the queue now."""

    requiresAnswer = False


class Refresh(amp.Command):
    """Master → worker or queue manager: re-read the users and aliases files now; answers
    once what they hold is in use (`relayhubctl user add` returns only then, SPEC §8)."""


class Admit(amp.Command):
    """Worker → master: may this new session go on? Connection limits count across every
    worker, so only the master can answer. `refusal` is empty when it may."""

    arguments: ClassVar[ArgumentList] = [(b"service", amp.Unicode()), (b"address", amp.Unicode()),
                            (b"exempt", amp.Boolean())]
    response: ClassVar[ArgumentList] = [(b"refusal", amp.Unicode())]


class Release(amp.Command):
    """Worker → master: a session admitted earlier has ended."""

    arguments: ClassVar[ArgumentList] = [(b"service", amp.Unicode()), (b"address", amp.Unicode())]
    requiresAnswer = False


class Lend(amp.Command):
    """Worker → master: lend me up to `wanted` SMTP slots for trusted clients (see
    relayhub.admission); `in_use` is how many of my lent slots are busy, for `status`."""

    arguments: ClassVar[ArgumentList] = [(b"wanted", amp.Integer()), (b"in_use", amp.Integer())]
    response: ClassVar[ArgumentList] = [(b"granted", amp.Integer())]


class GiveBack(amp.Command):
    """Worker → master: these lent slots are spare again; `in_use` as for Lend."""

    arguments: ClassVar[ArgumentList] = [(b"count", amp.Integer()), (b"in_use", amp.Integer())]
    requiresAnswer = False


class Metrics(amp.Command):
    """Master → child: this process's metric samples, as JSON (relayhub.metrics); the
    master adds up every process's for /metrics. A few kilobytes, well under AMP's limit."""

    response: ClassVar[ArgumentList] = [(b"samples", amp.Unicode())]


class FinalMetrics(amp.Command):
    """Child → master, as the child stops (a reload's old workers): its last samples, so
    that what it counted since the last scrape is not lost with it."""

    arguments: ClassVar[ArgumentList] = [(b"samples", amp.Unicode())]


class Reclaim(amp.Command):
    """Master → worker: give back every lent slot you are not using now (the master is about
    to refuse a client while slots sit idle); answers how many, and how many are in use."""

    response: ClassVar[ArgumentList] = [(b"returned", amp.Integer()), (b"in_use", amp.Integer())]
