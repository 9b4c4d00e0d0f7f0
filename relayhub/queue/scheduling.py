"""The queue manager's SQL: lease due recipients, record attempt results, find the next due
time. Each function runs inside one transaction on the store's worker thread."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from relayhub.delivery.results import Outcome
from relayhub.queue.store import RecipientStatus, RecipientUpdate

_PENDING = (RecipientStatus.QUEUED.value, RecipientStatus.DEFERRED.value)
_STATUS_OF = {
    Outcome.DELIVERED: RecipientStatus.DELIVERED,
    Outcome.DEFERRED: RecipientStatus.DEFERRED,
    Outcome.BOUNCED: RecipientStatus.BOUNCED,
}

_DUE = f"""
    SELECT r.message_id, r.idx FROM recipients r JOIN messages m ON m.id = r.message_id
    WHERE r.status IN {_PENDING} AND r.next_attempt <= :now AND m.held = 0
      AND (r.lease_until IS NULL OR r.lease_until <= :now)
    ORDER BY r.next_attempt, r.message_id, r.idx
    LIMIT :limit
"""
_NEXT_DUE = f"""
    SELECT MIN(COALESCE(r.lease_until, r.next_attempt)) FROM recipients r
    JOIN messages m ON m.id = r.message_id
    WHERE r.status IN {_PENDING} AND m.held = 0
"""


def claim_due(db: sqlite3.Connection, now: float, limit: int, lease: float
              ) -> dict[str, set[int]]:
    """Lease due recipients; returns message ID -> leased recipient indexes."""
    db.execute("BEGIN IMMEDIATE")
    try:
        rows = db.execute(_DUE, {"now": now, "limit": limit}).fetchall()
        db.executemany(
            "UPDATE recipients SET lease_until = ? WHERE message_id = ? AND idx = ?",
            [(now + lease, mid, idx) for mid, idx in rows],
        )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    claimed: dict[str, set[int]] = {}
    for mid, idx in rows:
        claimed.setdefault(mid, set()).add(idx)
    return claimed


def release_leases(db: sqlite3.Connection) -> int:
    cursor = db.execute("UPDATE recipients SET lease_until = NULL WHERE lease_until IS NOT NULL")
    return cursor.rowcount


def next_due(db: sqlite3.Connection) -> float | None:
    value = db.execute(_NEXT_DUE).fetchone()[0]
    return None if value is None else float(value)


def record_attempts(
    db: sqlite3.Connection, queue_id: str, updates: Sequence[RecipientUpdate], now: float
) -> bool:
    """Write results and history; delete the message once no recipient is pending.
    Returns True when the message left the queue (the caller removes its body file)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for update in updates:
            result = update.result
            error = None if result.outcome is Outcome.DELIVERED else (
                f"{result.status} {result.text}"
            )
            db.execute(
                "UPDATE recipients SET status = ?, attempts = attempts + 1, next_attempt = ?,"
                " last_error = COALESCE(?, last_error), lease_until = NULL,"
                " delay_warned = delay_warned OR ? WHERE message_id = ? AND idx = ?",
                (_STATUS_OF[result.outcome].value, update.next_attempt, error,
                 update.delay_warned, queue_id, update.index),
            )
            db.execute(
                "INSERT INTO history (message_id, time, recipient_idx, relay, dsn, text)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (queue_id, now, update.index, result.relay, result.status, result.text),
            )
        pending = db.execute(
            f"SELECT COUNT(*) FROM recipients WHERE message_id = ? AND status IN {_PENDING}",
            (queue_id,),
        ).fetchone()[0]
        finished = bool(pending == 0)
        if finished:
            db.execute("DELETE FROM messages WHERE id = ?", (queue_id,))  # cascades
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return finished
