"""The slow-command deadline: how long an SMTP client may take over one command line or one
DATA section, however steadily it keeps sending.

The idle timeout (`[smtp].timeout`, TimeoutMixin) restarts with every byte, so a client that
sends a byte every few seconds (slowloris) would hold its session, and a connection slot,
forever. So besides it:
- a command line must be complete within `timeout` of its first byte (512 octets need no
  more on any link);
- the DATA section must be complete within `timeout` plus the time its size takes at
  MIN_DATA_RATE, so a big message on a slow but honest link is never cut, while a trickle
  is cut soon after `timeout`.

Pure: the caller passes the clock's time in.
"""

from __future__ import annotations

# Octets per second a DATA transfer must average after its first `timeout` seconds: far
# below any real link (a 56k modem does 7000), far above a trickle.
MIN_DATA_RATE = 1024


class CommandDeadline:
    """Tracks the command (or DATA section) the client is in the middle of sending."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._started: float | None = None  # None: nothing half-sent
        self._data = False
        self._received = 0

    @property
    def in_data(self) -> bool:
        return self._started is not None and self._data

    def start(self, now: float, *, data: bool = False) -> None:
        """A command line (or the DATA section, after 354) has begun."""
        self._started, self._data, self._received = now, data, 0

    def clear(self) -> None:
        """Nothing is half-sent (or the server, not the client, is the one to wait for)."""
        self._started = None

    @property
    def started(self) -> bool:
        return self._started is not None

    def overdue(self, now: float, size: int) -> bool:
        """`size` more octets arrived at `now`: has the client taken too long?"""
        if self._started is None:
            return False
        self._received += size
        allowed = self.timeout + (self._received / MIN_DATA_RATE if self._data else 0.0)
        return now - self._started > allowed

    def what(self) -> str:
        return "DATA" if self._data else "command line"
