"""The queue's scheduling SQL: what the queue manager leases and records, and the
administrator's changes to it; each function is one transaction on the store's worker thread."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence

from relayhub.delivery.results import Outcome
from relayhub.queue.store import (
    Changed,
    HistoryEntry,
    PausedDomain,
    QueueSummary,
    RecipientStatus,
    RecipientUpdate,
    Recorded,
    Selection,
)

_PENDING = (RecipientStatus.QUEUED.value, RecipientStatus.DEFERRED.value)
_STATUS_OF = {
    Outcome.DELIVERED: RecipientStatus.DELIVERED,
    Outcome.DEFERRED: RecipientStatus.DEFERRED,
    Outcome.BOUNCED: RecipientStatus.BOUNCED,
}

# A pause holds back a domain's recipients, except those given up on: bouncing them
# delivers nothing to the paused domain.
_NOT_PAUSED = """
    (r.give_up = 1 OR NOT EXISTS (
        SELECT 1 FROM paused p
        WHERE p.domain = r.domain AND (p.until IS NULL OR p.until > :now)))
"""
_DUE = f"""
    SELECT r.message_id, r.idx FROM recipients r JOIN messages m ON m.id = r.message_id
    WHERE r.status IN {_PENDING} AND r.next_attempt <= :now AND m.held = 0
      AND (r.lease_until IS NULL OR r.lease_until <= :now) AND {_NOT_PAUSED}
    ORDER BY r.next_attempt, r.message_id, r.idx
    LIMIT :limit
"""
_NEXT_DUE = f"""
    SELECT MIN(t) FROM (
        SELECT MIN(COALESCE(r.lease_until, r.next_attempt)) AS t FROM recipients r
        JOIN messages m ON m.id = r.message_id
        WHERE r.status IN {_PENDING} AND m.held = 0 AND {_NOT_PAUSED}
        UNION ALL
        SELECT MIN(until) FROM paused WHERE until > :now
    )
"""
# The leased pairs given as a JSON array of [queue ID, index]: no limit on their number.
_LEASED = f"""
    SELECT r.message_id, r.idx,
           m.held = 0 AND r.give_up = 0 AND r.status IN {_PENDING} AND {_NOT_PAUSED} AS ok
    FROM json_each(:pairs) j
    JOIN recipients r ON r.message_id = json_extract(j.value, '$[0]')
                     AND r.idx = json_extract(j.value, '$[1]')
    JOIN messages m ON m.id = r.message_id
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


def next_due(db: sqlite3.Connection, now: float) -> float | None:
    value = db.execute(_NEXT_DUE, {"now": now}).fetchone()[0]
    return None if value is None else float(value)


def confirm_leased(db: sqlite3.Connection, pairs: Sequence[tuple[str, int]], now: float
                   ) -> set[tuple[str, int]]:
    """The leased pairs that may still be attempted; the others that exist lose their lease.

    The check reads one snapshot, so every change an administrator commits is wholly before
    it or wholly after it. It runs before every SMTP transaction, so it takes no write lock
    unless a lease must end: then the UPDATE upgrades the transaction, and if another write
    committed since the snapshot, SQLite refuses (SQLITE_BUSY_SNAPSHOT) and the store's busy
    retry runs the whole check again on a fresh snapshot.
    """
    args = {"pairs": json.dumps(pairs), "now": now}
    # Nearly always every pair may go: then the one SELECT (its own snapshot) is the check,
    # without a transaction around it. Otherwise it is checked again and the leases that
    # must end are ended in one transaction.
    rows = db.execute(_LEASED, args).fetchall()
    if all(ok for _mid, _idx, ok in rows):
        return {(mid, idx) for mid, idx, _ok in rows}
    db.execute("BEGIN")
    try:
        rows = db.execute(_LEASED, args).fetchall()
        dropped = [(mid, idx) for mid, idx, ok in rows if not ok]
        db.executemany("UPDATE recipients SET lease_until = NULL WHERE message_id = ? AND idx = ?",
                       dropped)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return {(mid, idx) for mid, idx, ok in rows if ok}


def record_attempts(
    db: sqlite3.Connection,
    records: Sequence[tuple[str, Sequence[RecipientUpdate], float]],
) -> list[Recorded]:
    """Write the results of several messages' attempts in one transaction (one fsync: the
    queue manager records every message as its reply arrives, and every process shares the
    one writer lock). Per message, see `_record`."""
    db.execute("BEGIN IMMEDIATE")
    try:
        recorded = [_record(db, queue_id, updates, now) for queue_id, updates, now in records]
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return recorded


def _record(
    db: sqlite3.Connection, queue_id: str, updates: Sequence[RecipientUpdate], now: float
) -> Recorded:
    """Write results and history; delete the message once no recipient is pending. On
    REMOVED the caller removes the body file; a message deleted meanwhile stays gone."""
    if all(update.result.outcome is not Outcome.DEFERRED for update in updates):
        # Every result is final: when no other recipient is pending, the message leaves the
        # queue at once, without first writing rows that its deletion removes again (the
        # usual case, and the most frequent write of the queue manager).
        pending = db.execute(
            f"SELECT idx FROM recipients WHERE message_id = ? AND status IN {_PENDING}",
            (queue_id,)).fetchall()
        if {idx for (idx,) in pending} <= {update.index for update in updates}:
            deleted = db.execute("DELETE FROM messages WHERE id = ?", (queue_id,)).rowcount
            return Recorded.REMOVED if deleted else Recorded.VANISHED  # cascades
    if db.execute("SELECT 1 FROM messages WHERE id = ?", (queue_id,)).fetchone() is None:
        # `relayhubctl queue delete` ran during the attempt: nothing left to record.
        return Recorded.VANISHED
    for update in updates:
        result = update.result
        error = None if result.outcome is Outcome.DELIVERED else (
            f"{result.status} {result.text}"
        )
        # A recipient given up on while this attempt was under way is due at once, so
        # that the next scan bounces it instead of waiting for the retry.
        db.execute(
            "UPDATE recipients SET status = ?, attempts = attempts + 1,"
            " next_attempt = CASE WHEN give_up = 1 AND ? IS NOT NULL THEN ? ELSE ? END,"
            " last_error = COALESCE(?, last_error), lease_until = NULL,"
            " delay_warned = delay_warned OR ? WHERE message_id = ? AND idx = ?",
            (_STATUS_OF[result.outcome].value, update.next_attempt, now,
             update.next_attempt, error, update.delay_warned, queue_id, update.index),
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
    return Recorded.REMOVED if finished else Recorded.KEPT


# -- the administrator's changes (relayhubctl queue ...) -----------------------------------


def _selected(db: sqlite3.Connection, selection: Selection) -> list[tuple[str, bool]]:
    """(queue ID, held) of the selected messages that exist, oldest first."""
    if selection.everything:
        where, args = "", {}
    elif selection.domain is not None:
        where = (f"WHERE id IN (SELECT message_id FROM recipients"
                 f" WHERE domain = :domain AND status IN {_PENDING})")
        args = {"domain": selection.domain}
    else:
        where = "WHERE id IN (SELECT value FROM json_each(:ids))"
        args = {"ids": json.dumps(selection.queue_ids)}
    rows = db.execute(f"SELECT id, held FROM messages {where} ORDER BY arrival, id", args)
    return [(mid, bool(held)) for mid, held in rows]


def _ids_json(ids: Sequence[str]) -> str:
    return json.dumps(list(ids))


def _make_due(db: sqlite3.Connection, ids: Sequence[str], now: float,
              domain: str | None = None) -> None:
    """Pending recipients of `ids` (only `domain`'s, if given) become due at `now`; ones due
    earlier keep their place in line."""
    db.execute(
        "UPDATE recipients SET next_attempt = MIN(COALESCE(next_attempt, :now), :now)"
        f" WHERE message_id IN (SELECT value FROM json_each(:ids)) AND status IN {_PENDING}"
        " AND (:domain IS NULL OR domain = :domain)",
        {"now": now, "ids": _ids_json(ids), "domain": domain},
    )


@contextlib.contextmanager
def _writing(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction; BEGIN IMMEDIATE so that a busy database is waited out at the
    start (busy_timeout) instead of failing at the first write."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def hold(db: sqlite3.Connection, selection: Selection) -> Changed:
    with _writing(db):
        found = _selected(db, selection)
        changed = [mid for mid, held in found if not held]
        db.execute("UPDATE messages SET held = 1 WHERE id IN (SELECT value FROM json_each(?))",
                   (_ids_json(changed),))
    return Changed(tuple(changed), tuple(mid for mid, held in found if held))


def release(db: sqlite3.Connection, selection: Selection, now: float) -> Changed:
    with _writing(db):
        found = _selected(db, selection)
        changed = [mid for mid, held in found if held]
        db.execute("UPDATE messages SET held = 0 WHERE id IN (SELECT value FROM json_each(?))",
                   (_ids_json(changed),))
        _make_due(db, changed, now)
    return Changed(tuple(changed), tuple(mid for mid, held in found if not held))


def flush(db: sqlite3.Connection, selection: Selection, now: float) -> Changed:
    with _writing(db):
        found = _selected(db, selection)
        changed = [mid for mid, held in found if not held]  # SPEC §8: not even by flush
        _make_due(db, changed, now, selection.domain)
    return Changed(tuple(changed), tuple(mid for mid, held in found if held))


def delete(db: sqlite3.Connection, selection: Selection) -> Changed:
    """Remove the rows (recipients and history cascade); the caller removes body files."""
    with _writing(db):
        changed = [mid for mid, _held in _selected(db, selection)]
        db.execute("DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?))",
                   (_ids_json(changed),))
    return Changed(tuple(changed))


def bounce(db: sqlite3.Connection, queue_ids: Sequence[str], now: float) -> Changed:
    with _writing(db):
        changed = [mid for mid, _held in _selected(db, Selection(tuple(queue_ids)))]
        ids = _ids_json(changed)
        # Released too: a held message is never picked, and the bounce needs the manager.
        db.execute("UPDATE messages SET held = 0 WHERE id IN (SELECT value FROM json_each(?))",
                   (ids,))
        db.execute(
            "UPDATE recipients SET give_up = 1, next_attempt = :now"
            f" WHERE message_id IN (SELECT value FROM json_each(:ids)) AND status IN {_PENDING}",
            {"now": now, "ids": ids},
        )
    return Changed(tuple(changed))


def pause(db: sqlite3.Connection, domain: str, until: float | None, now: float) -> None:
    with _writing(db):
        db.execute("DELETE FROM paused WHERE until <= ?", (now,))  # expired: forget them
        db.execute("INSERT INTO paused (domain, until) VALUES (?, ?)"
                   " ON CONFLICT (domain) DO UPDATE SET until = excluded.until", (domain, until))


def resume(db: sqlite3.Connection, domain: str, now: float) -> bool:
    with _writing(db):
        was_paused = db.execute(
            "DELETE FROM paused WHERE domain = ? AND (until IS NULL OR until > ?)", (domain, now)
        ).rowcount > 0
        db.execute("DELETE FROM paused WHERE until <= ?", (now,))
        if was_paused:
            db.execute(
                "UPDATE recipients SET next_attempt = MIN(COALESCE(next_attempt, :now), :now)"
                f" WHERE domain = :domain AND status IN {_PENDING}",
                {"now": now, "domain": domain},
            )
    return was_paused


def history(db: sqlite3.Connection, queue_id: str) -> list[HistoryEntry]:
    rows = db.execute(
        "SELECT h.time, r.address, h.relay, h.dsn, h.text FROM history h"
        " LEFT JOIN recipients r ON r.message_id = h.message_id AND r.idx = h.recipient_idx"
        " WHERE h.message_id = ? ORDER BY h.time, h.id", (queue_id,))
    return [HistoryEntry(*row) for row in rows]


def summary(db: sqlite3.Connection, now: float) -> QueueSummary:
    db.execute("BEGIN")  # one snapshot for every count
    try:
        messages, held, oldest = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(held), 0), MIN(arrival) FROM messages").fetchone()
        recipients = dict.fromkeys((s.value for s in RecipientStatus), 0)
        recipients.update(db.execute("SELECT status, COUNT(*) FROM recipients GROUP BY status"))
        by_domain = dict(db.execute(
            f"SELECT domain, COUNT(*) AS n FROM recipients WHERE status IN {_PENDING}"
            " GROUP BY domain ORDER BY n DESC, domain"))
        in_flight = db.execute(
            f"SELECT COUNT(*) FROM recipients WHERE status IN {_PENDING} AND lease_until > ?",
            (now,)).fetchone()[0]
        paused = tuple(PausedDomain(domain, until) for domain, until in db.execute(
            "SELECT domain, until FROM paused WHERE until IS NULL OR until > ? ORDER BY domain",
            (now,)))
    finally:
        db.execute("ROLLBACK")
    return QueueSummary(messages=messages, held=held, recipients=recipients,
                        oldest_arrival=oldest, by_domain=by_domain, in_flight=in_flight,
                        paused=paused)
