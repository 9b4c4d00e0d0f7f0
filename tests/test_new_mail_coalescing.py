"""The worker's NewMail notices: the first at once, then one per interval under load."""

from __future__ import annotations

from twisted.internet.task import Clock

from relayhub.process.worker import NEW_MAIL_INTERVAL, Coalesced


def test_alone_at_once_under_load_one_per_interval_and_flushed_at_stop() -> None:
    clock = Clock()
    sent: list[float] = []
    notice = Coalesced(lambda: sent.append(clock.seconds()), NEW_MAIL_INTERVAL, clock)
    notice()
    assert sent == [0.0]  # a message alone: no delay
    for _ in range(50):  # a burst within the interval: one more notice, at its end
        clock.advance(NEW_MAIL_INTERVAL / 100)
        notice()
    assert sent == [0.0]
    clock.advance(NEW_MAIL_INTERVAL)
    assert len(sent) == 2
    clock.advance(NEW_MAIL_INTERVAL * 3)  # quiet: nothing more is sent ...
    assert len(sent) == 2
    notice()  # ... and the next message goes at once again
    assert len(sent) == 3 and sent[-1] == clock.seconds()
    notice()
    notice.flush()  # stopping: what is pending goes now
    assert len(sent) == 4 and not clock.getDelayedCalls()
