"""Builds the POP3 server factory from the settings, ready to put behind any endpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relayhub.config import Settings
from relayhub.pop3.auth import Authenticator
from relayhub.pop3.server import Pop3Config, POP3Factory
from relayhub.users import UserDatabase


def pop3_factory(settings: Settings, users: UserDatabase, reactor: Any, *,
                 tls_context_factory: Any = None, implicit_tls: bool = False,
                 timeout: float = 600.0, auth_failure_delay: float = 1.0,
                 max_connections: int = 1000,
                 on_session: Callable[[str, bool], None] = lambda address, opened: None,
                 ) -> POP3Factory:
    """A factory for one POP3 listener, serving `<state_dir>/mail/<user>/` Maildirs.

    `tls_context_factory` (e.g. `ssl.CertificateOptions`) enables STLS; `implicit_tls` marks
    a pop3s listener whose endpoint already wraps TLS (plaintext rules then never apply).
    `timeout` is the RFC 1939 idle timeout, never under ten minutes in production."""
    config = Pop3Config(
        hostname=settings.server.hostname,
        allow_plaintext_auth=settings.pop3.allow_plaintext_auth,
        apop=settings.pop3.apop,
        timeout=timeout,
        auth_failure_delay=auth_failure_delay,
        max_connections=max_connections,
        implicit_tls=implicit_tls,
    )
    return POP3Factory(config, Authenticator(users, reactor), settings.server.state_dir / "mail",
                       reactor, tls_context_factory=tls_context_factory, on_session=on_session)
