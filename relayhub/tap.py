"""twistd plugin options and the service `twistd relayhub` runs: the master process, which
starts the protocol workers and the queue manager (relayhub.process)."""

from __future__ import annotations

import sys
from typing import ClassVar

from twisted.python import usage

from relayhub.config import ConfigError, Settings, read_config, settings_from_text
from relayhub.process.master import MasterService
from relayhub.queue.backends import schema_problem


class Options(usage.Options):
    synopsis = "[-c CONFIG]"
    longdesc = (
        "Runs the relayhub mail hub. Without -c, $RELAYHUB_CONFIG, then "
        "/etc/relayhub/relayhub.toml, then the built-in defaults apply."
    )
    optParameters: ClassVar[list[list[str | None]]] = [
        ["config", "c", None, "configuration file (TOML)"],
    ]

    config: tuple[str, str | None]  # (source, text) as read once, for the children
    settings: Settings

    def postOptions(self) -> None:
        try:
            self.config = read_config(self["config"])
            self.settings = settings_from_text(*self.config)
        except ConfigError as error:
            # One line per problem and exit 1; a traceback helps no administrator here.
            sys.stderr.write(f"{error}\n")
            raise SystemExit(1) from None
        problem = schema_problem(self.settings)
        if problem is not None:
            sys.stderr.write(f"{self.settings.source}: queue.dsn: {problem}\n")
            raise SystemExit(1)


def makeService(options: Options) -> MasterService:
    from twisted.internet import reactor

    return MasterService(options["config"], options.config, options.settings, reactor)
