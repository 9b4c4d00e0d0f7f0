"""`relayhubctl queue migrate --to DSN_OR_PATH`: move a stopped hub's queue from its
configured backend to the other one (relayhub.queue.migrate does the moving)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import threads

from relayhub import control
from relayhub.admin.cli import EXIT_FAILED, EXIT_OK
from relayhub.admin.queue_cmd import DaemonUnreachable, ask_daemon, say_error
from relayhub.config import Settings


class MoveStopped(Exception):
    """The move failed after both sides were open (MigrationError is for opening them)."""


async def queue_migrate(reactor: Any, settings: Settings, args: argparse.Namespace) -> int:
    # Imported here: psycopg is loaded only by the commands that need it.
    from relayhub.queue import migrate

    try:
        running = await ask_daemon(reactor, settings, control.Status) is not None
    except DaemonUnreachable:
        running = True  # something holds the control socket: do not move under it
    if running:
        say_error("relayhub is running: stop it before moving its queue")
        return EXIT_FAILED
    queue = settings.queue

    def open_and_move() -> tuple[int, str, str]:
        # One thread call for both steps: an SQLite connection may only be used by the
        # thread that opened it, and the reactor's pool hands out any of its threads.
        source, target = migrate.open_sides(
            queue.backend, settings.server.state_dir, queue.dsn, settings.server.hostname,
            args.to, args.all_hubs)
        try:
            moved = migrate.move(source, target, lambda line: print(line, flush=True))
        except Exception as problem:
            raise MoveStopped(str(problem).strip()) from problem
        finally:
            source.close()
            target.close()
        return moved, source.name, target.name

    try:
        moved, source_name, target_name = await threads.deferToThread(open_and_move)
    except migrate.MigrationError as problem:
        say_error(str(problem))
        return EXIT_FAILED
    except MoveStopped as problem:
        say_error(f"the move stopped: {problem}; run the command again to finish")
        return EXIT_FAILED
    other = "sqlite" if queue.backend == "postgresql" else "postgresql"
    print(f"moved {moved} message{'s' * (moved != 1)} from {source_name} to {target_name}; "
          f'set [queue] backend = "{other}" before starting relayhub')
    return EXIT_OK


def add_migrate(action: Callable[[str, str, Callable[..., Coroutine[Any, Any, int]]],
                                 argparse.ArgumentParser]) -> None:
    parser = action("migrate", "move the queue of this (stopped) hub to the other backend",
                    queue_migrate)
    parser.add_argument("--to", required=True, metavar="DSN_OR_PATH",
                        help="a PostgreSQL connection string (from SQLite), or the SQLite "
                             "state directory (from PostgreSQL)")
    parser.add_argument("--all-hubs", action="store_true",
                        help="from PostgreSQL: every hub's messages, not only this hub's")
