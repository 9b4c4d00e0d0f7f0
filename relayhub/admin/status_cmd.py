"""`relayhubctl status`: the daemon's processes and connections, and the queue totals."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from relayhub import control
from relayhub.admin.cli import EXIT_OK, Commands, add_command
from relayhub.admin.queue_cmd import (
    DaemonUnreachable,
    ask_daemon,
    command,
    duration,
    open_queue,
    print_json,
    printable,
    stats_json,
    stats_lines,
    utc,
)
from relayhub.config import Settings


async def status(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    trouble = None
    try:
        answer = await ask_daemon(reactor, settings, control.Status)
    except DaemonUnreachable as problem:
        answer, trouble = None, problem
    daemon: dict[str, Any] = json.loads(answer["status"]) if answer else {}
    async with open_queue(reactor, settings) as store:
        now = time.time()
        summary = await store.summary(now)
        hubs = await store.hubs()
    shown: dict[str, Any] = {
        "processes": daemon.get("processes", []),
        "connections": daemon.get("connections", {"smtp": 0, "pop3": 0}),
        "queue": stats_json(summary, now),
    }
    if settings.queue.backend == "postgresql":  # the hubs sharing the queue
        shown["hubs"] = [{"name": hub.name, "last_seen": utc(hub.last_seen),
                          "started": utc(hub.started)} for hub in hubs]
    if args.json:
        print_json(shown)
        return EXIT_OK
    if trouble is not None:
        print(f"relayhub does not answer: {trouble}")
    elif answer is None:
        print(f"relayhub is not running (nothing listens on "
              f"{control.socket_path(settings.server.state_dir)})")
    else:
        count = len(shown["processes"])
        print(f"relayhub is running: {count} process{'es' * (count != 1)}")
        for process in shown["processes"]:
            print(f"  {process['role']:<14} pid {process['pid']:<8} "
                  f"up {duration(process['uptime_seconds'])}")
        connections = shown["connections"]
        print(f"connections:  smtp {connections.get('smtp', 0)}, "
              f"pop3 {connections.get('pop3', 0)}")
    print("\n".join(stats_lines(summary, now)))
    if "hubs" in shown:
        print("hubs sharing the queue:")
        for hub in hubs:
            print(f"  {printable(hub.name):<30} last seen {duration(now - hub.last_seen)} ago"
                  f" ({utc(hub.last_seen)})")
    return EXIT_OK


def register(commands: Commands) -> None:
    parser = add_command(commands, "status",
                         "daemon processes, open connections and queue totals")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(command=command(status))
