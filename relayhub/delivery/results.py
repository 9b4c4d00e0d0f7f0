"""What one delivery attempt did for one recipient: the record couriers return, the queue
store keeps as history, and delivery status notifications report."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"  # final: the next hop or the mailbox took it
    DEFERRED = "deferred"  # try again later (4xx, connection or DNS trouble)
    BOUNCED = "bounced"  # final: permanent failure, the sender hears of it


@dataclass(frozen=True)
class AttemptResult:
    """One recipient's result of one attempt.

    `status` is the RFC 3463 code ("2.0.0", "4.4.1", "5.1.1"); `text` is the diagnostic: the
    remote reply when `remote_reply` is true ("550 5.1.1 <x>: User unknown"), otherwise our
    own explanation ("connect to mx.example[192.0.2.1]:25: Connection refused").
    `relay` names where it went, Postfix style: "mx.example[192.0.2.1]:25", "local", "none".
    """

    recipient: str
    outcome: Outcome
    status: str
    text: str
    relay: str = "none"
    remote_mta: str | None = None  # DNS name of the remote MTA, for Remote-MTA: in a DSN
    remote_reply: bool = False
    dsn_relayed: bool = False  # delivered to a hop without DSN: NOTIFY=SUCCESS gets "relayed"
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" when the hop spoke TLS
    verified: str | None = None  # what authenticated the hop: "dane" | "mta-sts" | "ca" | "none"

    @classmethod
    def deferred(cls, recipient: str, status: str, text: str, relay: str = "none"
                 ) -> AttemptResult:
        return cls(recipient, Outcome.DEFERRED, status, text, relay)

    @classmethod
    def bounced(cls, recipient: str, status: str, text: str, relay: str = "none"
                ) -> AttemptResult:
        return cls(recipient, Outcome.BOUNCED, status, text, relay)
