"""The hub's local names as every process sees them: the users file and the aliases file,
each re-read when it changes (or at once when asked: `refresh`), and the RCPT acceptance
policy over them.

A broken file keeps the last good version (SPEC §5). A process that starts while a file is
broken (a new worker after a reload) has no version of its own, so the master keeps one
too and hands it over (`LastGood`); only at the hub's start is there none to keep.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayhub.aliases import AliasDatabase, AliasSource, AliasWatcher, LocalNames
from relayhub.config import Settings
from relayhub.policy import AcceptancePolicy
from relayhub.users import UserDatabase, UsersFileError

_LOG = Logger(namespace="relayhub.directory")

# How often the users file is checked for changes (a stat; it is re-read only if changed).
USERS_POLL = 1.0


@dataclass(frozen=True)
class LastGood:
    """The texts of the users file and of the aliases files (by path, with their includes)
    as last read without a problem; None where there is no good version."""

    users: str | None = None
    aliases: Mapping[str, str | None] | None = None

    def to_json(self) -> str:
        """One line (the children read it from stdin before the configuration)."""
        return json.dumps({"users": self.users, "aliases": self.aliases})

    @classmethod
    def from_json(cls, line: str) -> LastGood:
        data = json.loads(line) if line.strip() else {}
        return cls(users=data.get("users"), aliases=data.get("aliases"))


def build_names(settings: Settings, aliases: AliasSource, users: UserDatabase
                ) -> tuple[LocalNames, AcceptancePolicy]:
    """The users-and-aliases directory and the RCPT policy over it, built the same way for
    the daemon and for relayhubctl commands that must answer as RCPT does."""
    names = LocalNames(aliases, users, settings.domains.local,
                       lambda domain: policy.classify_domain(domain) == "local",
                       max_recipients=settings.smtp.max_recipients, roster=users.users)
    policy = AcceptancePolicy(settings.domains.local, settings.domains.relay,
                              settings.domains.trusted_networks, names)
    return names, policy


class Directory(MultiService):
    """Users and aliases kept current while the process runs (files read in threads).

    Raises UsersFileError when the users file is broken and `last_good` has no version."""

    def __init__(self, settings: Settings, reactor: Any,
                 last_good: LastGood | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        kept = last_good or LastGood()
        self.users = UserDatabase(settings.users.file, fallback=kept.users)
        self.aliases = AliasDatabase(settings.aliases.file, fallback=kept.aliases)
        self.names, self.policy = build_names(settings, self.aliases, self.users)
        # One read at a time, polls and refreshes alike, applied in the order they were made.
        self._lock = defer.DeferredLock()
        self._aliases_watcher = AliasWatcher(self.aliases, reactor, lock=self._lock)
        self._aliases_watcher.setServiceParent(self)
        TimerService(USERS_POLL, self._poll_users).setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        for problem in self.users.problems:
            _LOG.error("users file broken, keeping the last good version: {problem}",
                       problem=problem)

    def last_good(self) -> LastGood:
        # A UserDatabase always has a good version: without one it cannot be built.
        return LastGood(users=self.users.text, aliases=self.aliases.texts)

    def refresh(self) -> defer.Deferred[None]:
        """Re-read whichever file changed, now; fires when the result is in use. For a
        change made by `relayhubctl`, which must not return before the hub sees it."""
        users: defer.Deferred[None] = self._lock.run(self._reload_users)
        return defer.gatherResults([users, self._aliases_watcher.refresh()]).addCallback(
            lambda _: None)

    def _poll_users(self) -> defer.Deferred[None] | None:
        if self._lock.locked:
            return None  # a read is under way; the next poll looks again
        done: defer.Deferred[None] = self._lock.run(self._reload_users)
        return done

    def _reload_users(self) -> defer.Deferred[None]:
        def failed(failure: Failure) -> None:
            if isinstance(failure.value, UsersFileError):
                # The last good table stays in use (UserDatabase keeps it).
                _LOG.error("users file not reloaded: {problems}",
                           problems="; ".join(failure.value.problems))
            else:
                _LOG.failure("users reload failed", failure)

        reloaded: defer.Deferred[bool] = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self.users.reload_if_changed)
        return reloaded.addCallbacks(lambda _: None, failed)

    def knows_mailbox(self, mailbox: str) -> bool:
        """May local delivery create this mailbox? A user, or postmaster (which always
        exists, RFC 5321 §4.5.1)."""
        return mailbox == "postmaster" or self.users.knows(mailbox)
