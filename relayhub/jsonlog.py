"""`[log] format = "json"`: one JSON object per log line on the master's stdout.

An object carries the text line's fields as keys, named as the text line names them
(`to=<{recipient}>` gives "to", `dsn={status}` gives "dsn"; a field without a "name=" keeps
its event name, e.g. "queue_id", "client"), plus "time", "level", "process" (master,
worker-1.1, queue-manager), "role", "pid", "namespace" and "message", the text line itself.

Children write their finished objects to the stdout they share with the master
(relayhub.process.child); the master writes its own, and passes on what a child printed
outside its log (stderr) as an object of its own.
"""

from __future__ import annotations

import json
import os
import re
import string
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

# Keys every object has; an event field of the same name is left to the message text.
RESERVED = frozenset({"time", "level", "process", "role", "pid", "namespace", "message",
                      "traceback"})
# Event keys the master sets on a child's relayed line (relayhub.process.supervisor).
RELAYED_ROLE = "relayhub_child_role"
RELAY_FORMAT = "{child}[{pid}] {text}"

_NAMED_FIELD = re.compile(r"(\w+)=<?$")
_FIELD_BASE = re.compile(r"\w*")


def text_keys(log_format: str) -> tuple[tuple[str, str], ...]:
    """(JSON key, event key) for each field of a log format, in order."""
    pairs: list[tuple[str, str]] = []
    try:
        parsed = list(string.Formatter().parse(log_format))
    except ValueError:
        return ()
    for literal, field, _spec, _conversion in parsed:
        base = _FIELD_BASE.match(field or "")
        name = base[0] if base else ""
        if name and not name.isdigit():
            named = _NAMED_FIELD.search(literal)
            key = named[1] if named else name
            if key not in RESERVED and (key, name) not in pairs:
                pairs.append((key, name))
    return tuple(pairs)


def _plain(value: object) -> object:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


class _Records:
    """Builds an event's object; remembers each format's keys (there are a few dozen)."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[tuple[str, str], ...]] = {}

    def record(self, event: dict[str, Any]) -> dict[str, Any]:
        log_format = event.get("log_format") or ""
        keys = self._keys.get(log_format)
        if keys is None:
            keys = self._keys[log_format] = text_keys(log_format)
        level = event.get("log_level", LogLevel.info)
        record: dict[str, Any] = {
            "level": getattr(level, "name", str(level)),
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        record.update((key, _plain(event[name])) for key, name in keys if name in event)
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            record["traceback"] = failure.getTraceback()
        return record


@implementer(ILogObserver)
class ChildJsonObserver:
    """A child's side: one finished JSON object per event, to the stdout it shares with the
    master (through relayhub.process.child.LogWriter, as text lines are)."""

    def __init__(self, write: Callable[[bytes], None], name: str, role: str, pid: int) -> None:
        self._write = write
        self._head = {"process": name, "role": role, "pid": pid}
        self._records = _Records()

    def __call__(self, event: dict[str, Any]) -> None:
        record = {"time": _time(event), **self._head, **self._records.record(event)}
        self._write((json.dumps(record, ensure_ascii=False) + "\n").encode())


def relay(logger: Logger, line: str, *, child: str, role: str, pid: int | None) -> None:
    """Pass one line a child wrote outside its log (stderr: a crash before logging began)
    into the master's log, as a warning of that child's."""
    logger.emit(LogLevel.warn, RELAY_FORMAT, child=child, pid=pid, text=line,
                **{RELAYED_ROLE: role})


def _time(event: dict[str, Any]) -> str:
    stamp = datetime.fromtimestamp(event.get("log_time") or 0.0, UTC)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


@implementer(ILogObserver)
class JsonLogObserver:
    """The master's log: its own events and its children's, one JSON object per line."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.pid = os.getpid()
        self._records = _Records()

    def __call__(self, event: dict[str, Any]) -> None:
        role = event.get(RELAYED_ROLE)
        if role is None:
            head = {"time": _time(event), "process": "master", "role": "master",
                    "pid": self.pid}
            line = json.dumps({**head, **self._records.record(event)}, ensure_ascii=False)
        else:
            level = event.get("log_level", LogLevel.warn)
            line = json.dumps({"time": _time(event), "process": event.get("child"),
                               "role": role, "pid": event.get("pid"), "level": level.name,
                               "message": event.get("text")}, ensure_ascii=False)
        self.out.write(line + "\n")
        self.out.flush()


def master_observer() -> JsonLogObserver:
    """For twistd's "logger" option: the master logs JSON to its standard output."""
    return JsonLogObserver(sys.stdout)
