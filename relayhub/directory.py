"""The hub's local names as every process sees them: the users file and the aliases file,
each re-read when it changes, and the RCPT acceptance policy over them."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayhub.aliases import AliasDatabase, AliasSource, AliasWatcher, LocalNames
from relayhub.config import Settings
from relayhub.policy import AcceptancePolicy
from relayhub.users import UserDatabase, UsersFileError

_LOG = Logger(namespace="relayhub.directory")

# How often the users file is checked for changes (a stat; it is re-read only if changed).
USERS_POLL = 1.0


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
    """Users and aliases kept current while the process runs (files read in threads)."""

    def __init__(self, settings: Settings, reactor: Any) -> None:
        super().__init__()
        self.users = UserDatabase(settings.users.file)
        self.aliases = AliasDatabase(settings.aliases.file)
        self.names, self.policy = build_names(settings, self.aliases, self.users)
        AliasWatcher(self.aliases, reactor).setServiceParent(self)
        TimerService(USERS_POLL, self._reload_users).setServiceParent(self)

    def _reload_users(self) -> Any:
        def failed(failure: Failure) -> None:
            if isinstance(failure.value, UsersFileError):
                # The last good table stays in use (UserDatabase keeps it).
                _LOG.error("users file not reloaded: {problems}",
                           problems="; ".join(failure.value.problems))
            else:
                _LOG.failure("users reload failed", failure)

        return threads.deferToThread(self.users.reload_if_changed).addErrback(failed)

    def knows_mailbox(self, mailbox: str) -> bool:
        """May local delivery create this mailbox? A user, or postmaster (which always
        exists, RFC 5321 §4.5.1)."""
        return mailbox == "postmaster" or self.users.knows(mailbox)
