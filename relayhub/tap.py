"""twistd plugin options and the service `twistd relayhub` runs: the master process, which
starts the protocol workers and the queue manager (relayhub.process)."""

from __future__ import annotations

import sys
from typing import ClassVar

from twisted.logger import Logger
from twisted.python import usage

from relayhub.config import ConfigError, Settings, read_config, settings_from_text
from relayhub.fdlimit import raise_open_files_limit
from relayhub.process.master import MasterService
from relayhub.queue.backends import schema_problem
from relayhub.users import UsersFileError

JSON_OBSERVER = "relayhub.jsonlog.master_observer"

_LOG = Logger(namespace="relayhub.master")
# Descriptors besides client connections: listeners, queue files, the database, pipes.
FD_MARGIN = 256


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
        if self.settings.log.format == "json" and self.parent is not None:
            # twistd's own --logger option (a name it imports after this): the master's
            # log becomes JSON lines.
            self.parent["logger"] = self.parent.get("logger") or JSON_OBSERVER
        problem = schema_problem(self.settings)
        if problem is not None:
            sys.stderr.write(f"{self.settings.source}: queue.dsn: {problem}\n")
            raise SystemExit(1)


def makeService(options: Options) -> MasterService:
    from twisted.internet import reactor

    soft, _hard = raise_open_files_limit()
    wanted = options.settings.smtp.max_connections + FD_MARGIN
    if soft < wanted:
        _LOG.warn("open files limit {soft} is below [smtp].max_connections + {margin}: raise "
                  "LimitNOFILE (systemd) or ulimit -n", soft=soft, margin=FD_MARGIN)
    try:
        return MasterService(options["config"], options.config, options.settings, reactor)
    except UsersFileError as error:
        # With no good version of the users file yet there is none to keep: refuse to start,
        # one line per problem, as for the configuration.
        sys.stderr.write(f"{error}\n")
        raise SystemExit(1) from None
