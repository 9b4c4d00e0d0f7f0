"""Exceptions that carry the SMTP reply they map to, so policy code never formats replies."""

from __future__ import annotations


class SMTPReply(Exception):
    """A refusal or failure that maps to exactly one SMTP reply.

    `code` is the three-digit basic code, `status` the RFC 3463 enhanced code
    (e.g. "5.1.1") and `text` the human-readable rest of the line.
    """

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{code} {status} {text}")
        self.code = code
        self.status = status
        self.text = text

    @property
    def permanent(self) -> bool:
        return self.code >= 500


class SyntaxErrorReply(SMTPReply):
    """The command or its arguments cannot be parsed (501/500/555)."""

    def __init__(self, text: str, code: int = 501, status: str = "5.5.4") -> None:
        super().__init__(code, status, text)


class RecipientRefused(SMTPReply):
    """A recipient that the acceptance policy refuses at RCPT."""


class MessageRefused(SMTPReply):
    """A message refused at the end of DATA; nothing has been queued."""


class TemporaryFailure(SMTPReply):
    """A local problem (disk, database) that the client should retry later."""

    def __init__(self, text: str = "Local error in processing, try again later",
                 status: str = "4.3.0") -> None:
        super().__init__(451, status, text)


class InsufficientStorage(TemporaryFailure):
    """No room to queue mail now: the disk is full, or free space is below `[queue]
    min_free_space` or too small for the announced SIZE (RFC 5321 §4.2.5 452, RFC 3463
    4.3.1). The client keeps the message and retries; it is never a 5xx."""

    def __init__(self, text: str = "Insufficient system storage") -> None:
        SMTPReply.__init__(self, 452, "4.3.1", text)
