"""Sendmail command-line options, parsed the way Postfix's sendmail(1) reads them. Pure.

Callers (cron, mailx, git send-email, monitoring scripts) pass whatever Sendmail option they
were written for; like Postfix, options that make no sense here are accepted and ignored
(with a note under -v), so that no caller breaks. Only what cannot work is a usage error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Options that take an argument, attached ("-fme@x") or as the next word ("-f me@x"), as in
# Postfix's getopt string. Letters not here and not in FLAGS are unknown: ignored.
WITH_ARGUMENT = frozenset("ABCFLNOR VXbefhoprd".replace(" ", ""))
FLAGS = frozenset("GIUcimntvx")
# Modes (-bX) we serve; -bi (newaliases) is a no-op, since the daemon re-reads aliases.
MODES = {"m": "deliver", "s": "smtp", "p": "list", "i": "newaliases"}


class UsageError(Exception):
    """The command line cannot be served (EX_USAGE)."""


@dataclass(frozen=True)
class SendmailOptions:
    mode: str = "deliver"  # deliver | smtp (-bs) | list (-bp) | flush (-q) | newaliases (-bi)
    extract_recipients: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi: a line of one "." is data, not the end
    sender: str | None = None  # -f/-r; "" is the null sender
    full_name: str | None = None  # -F
    verbose: bool = False  # -v
    config: str | None = None  # -C: relayhub's configuration file
    body_type: str | None = None  # -B 7BIT|8BITMIME
    notify: tuple[str, ...] = ()  # -N never | success,failure,delay
    ret: str | None = None  # -R full|hdrs
    envid: str | None = None  # -V
    recipients: tuple[str, ...] = ()
    ignored: tuple[str, ...] = field(default_factory=tuple)  # reported under -v


def parse_options(argv: list[str]) -> SendmailOptions:
    """Parse a sendmail command line (without the program name). Raises UsageError."""
    values: dict[str, object] = {}
    ignored: list[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        index += 1
        if word == "--":
            break
        if not word.startswith("-") or word == "-":
            index -= 1
            break
        position = 1
        while position < len(word):
            letter = word[position]
            position += 1
            if letter == "q":  # -q or -q30m: flush now (an interval means nothing here)
                values["mode"] = "flush"
                break
            if letter in FLAGS:
                if letter == "t":
                    values["extract_recipients"] = True
                elif letter == "i":
                    values["ignore_dots"] = True
                elif letter == "v":
                    values["verbose"] = True
                else:
                    ignored.append(f"-{letter}")
                continue
            if letter not in WITH_ARGUMENT:
                ignored.append(f"-{letter}")
                continue
            if position < len(word):
                argument = word[position:]
            elif index < len(argv):
                argument = argv[index]
                index += 1
            else:
                raise UsageError(f"option -{letter} requires an argument")
            _apply(letter, argument, values, ignored)
            break
    recipients = tuple(argv[index:])
    options = SendmailOptions(recipients=recipients, ignored=tuple(ignored),
                              **values)  # type: ignore[arg-type]
    if options.mode == "deliver" and not options.extract_recipients and not recipients:
        raise UsageError("no recipients given (name them, or use -t)")
    return options


def _apply(letter: str, argument: str, values: dict[str, object], ignored: list[str]) -> None:
    if letter in "fr":
        # "<>" and "" are the null sender; "<a@b>" loses its brackets.
        sender = argument.strip()
        values["sender"] = sender[1:-1] if sender.startswith("<") and sender.endswith(">") \
            else sender
    elif letter == "F":
        values["full_name"] = argument
    elif letter == "C":
        values["config"] = argument
    elif letter == "o":
        if argument == "i":
            values["ignore_dots"] = True
        else:  # -oem, -odi, -oQ/path, -om ...: Sendmail options with no meaning here
            ignored.append(f"-o{argument}")
    elif letter == "b":
        mode = MODES.get(argument)
        if mode is None:
            raise UsageError(f"-b{argument} is not supported (only -bm, -bs, -bp, -bi)")
        values["mode"] = mode
    elif letter == "B":
        kind = argument.upper()
        if kind not in ("7BIT", "8BITMIME"):
            raise UsageError(f"-B {argument}: expected 7BIT or 8BITMIME")
        values["body_type"] = kind
    elif letter == "N":
        notify = tuple(sorted({word.strip().upper() for word in argument.split(",")}))
        if not set(notify) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or (
                "NEVER" in notify and len(notify) > 1):
            raise UsageError(f"-N {argument}: expected never, or success,failure,delay")
        values["notify"] = notify
    elif letter == "R":
        ret = argument.upper()
        if ret not in ("FULL", "HDRS"):
            raise UsageError(f"-R {argument}: expected full or hdrs")
        values["ret"] = ret
    elif letter == "V":
        values["envid"] = argument
    else:  # -A, -L, -O, -X, -e, -h, -p, -d: accepted and ignored, as Postfix does
        ignored.append(f"-{letter} {argument}")
