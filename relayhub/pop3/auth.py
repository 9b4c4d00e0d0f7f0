"""POP3 authentication: APOP timestamps and digests (RFC 1939 §7), SASL PLAIN and LOGIN
responses (RFC 4616, 5034; SMTP AUTH uses them too), and credential checks run off the
reactor thread."""

from __future__ import annotations

import binascii
import hashlib
import hmac
from typing import Any

from twisted.internet import defer, threads

from relayhub.users import PLAIN_PREFIX, User, UserDatabase, check_password, reload_quietly


class BadCredentials(ValueError):
    """A SASL response that does not decode to credentials we can check."""


class MalformedResponse(BadCredentials):
    """A SASL response that is not base64 of UTF-8 text at all (SMTP answers it with 501,
    RFC 4954 §4, rather than as a failed login)."""


def make_timestamp(hostname: str, now: float, pid: int, token: str) -> str:
    """The greeting's `<unique@hostname>`, unique per connection (RFC 1939 §7: "msg-id")."""
    return f"<{pid}.{int(now)}.{token}@{hostname}>"


def apop_digest(timestamp: str, secret: str) -> str:
    """MD5 hex of timestamp + shared secret, as the client computes it."""
    return hashlib.md5((timestamp + secret).encode("utf-8"), usedforsecurity=False).hexdigest()


def apop_matches(user: User, timestamp: str, digest: str) -> bool:
    """Whether `digest` proves `user`'s secret; only {PLAIN} users have one to prove."""
    if user.scheme != "plain":
        return False
    expected = apop_digest(timestamp, user.password_hash[len(PLAIN_PREFIX):])
    return hmac.compare_digest(expected.encode(), digest.lower().encode("utf-8"))


def decode_sasl_plain(response: str) -> tuple[str, str]:
    """(user name, password) from a base64 PLAIN response `[authzid] NUL authcid NUL passwd`.

    An authorization identity other than the user's own is refused: there are no proxy
    rights here. Raises BadCredentials (MalformedResponse when it is not even base64 text)."""
    text = decode_sasl_text(response)
    try:
        authzid, authcid, password = text.split("\0")
    except ValueError as exc:
        raise BadCredentials("malformed PLAIN response") from exc
    if not authcid or (authzid and authzid != authcid):
        raise BadCredentials("bad identity in PLAIN response")
    return authcid, password


def decode_sasl_text(response: str) -> str:
    """The UTF-8 text in one base64 SASL response (a LOGIN user name or password, a PLAIN
    message); "" for an empty response. Raises MalformedResponse."""
    try:
        return binascii.a2b_base64(response.encode("ascii"), strict_mode=True).decode("utf-8")
    except (ValueError, UnicodeError) as exc:  # binascii.Error is a ValueError
        raise MalformedResponse("malformed SASL response") from exc


class Authenticator:
    """Checks credentials against the users file, in the reactor's thread pool (the file may
    be re-read and a password hash costs ~0.1 s of CPU)."""

    def __init__(self, users: UserDatabase, reactor: Any) -> None:
        self.users = users
        self.reactor = reactor

    def password(self, name: str, password: str) -> defer.Deferred[User | None]:
        return check_password(self.reactor, self.users, name, password)

    def apop(self, name: str, timestamp: str, digest: str) -> defer.Deferred[User | None]:
        def check() -> User | None:
            reload_quietly(self.users)
            user = self.users.lookup(name)
            return user if user is not None and apop_matches(user, timestamp, digest) else None

        result: defer.Deferred[User | None] = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), check)
        return result
