"""The open-files limit: every connection is a file descriptor, in the worker that serves it
(and briefly in the kernel's accept queue), so `[smtp].max_connections` (2,000 by default)
needs more than the usual soft limit of 1,024. At start the soft limit is raised to the hard
limit, which the administrator (or systemd's LimitNOFILE=) sets; children inherit it."""

from __future__ import annotations

import contextlib
import resource


def raise_open_files_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        # An infinite hard limit is not a valid soft one on Linux (nr_open caps it).
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        # On failure it stays as it was; the caller warns when that is too low.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
