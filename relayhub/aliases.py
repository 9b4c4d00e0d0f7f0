"""The aliases(5) file: parsing, expansion into final recipients, and the VRFY/EXPN answers.

Where expansion happens, and why: at acceptance (RCPT) time, in the SMTP server, before
anything is queued. Each final recipient becomes its own queue entry (`RecipientRequest`)
carrying ORCPT `rfc822;<the address the client gave>` (unless the client sent its own ORCPT)
and, for members of a list that has an `owner-NAME` alias, the owner as its envelope sender.
The queue, the scheduler and the DSN code already keep state, retries and reports per
recipient, so a list member whose server is down is retried alone, a bouncing member is
reported to the list owner with the list address as Original-Recipient, and delivered
members are never sent twice. Expanding later, at delivery, would instead need one queue
entry to fan out into several with their own state — something the store cannot record —
and would make `250` at RCPT promise an expansion that a later edit of the file may change.
The price: a message keeps the expansion of the moment it arrived (an edit applies to new
mail only), and mail that enters the queue without RCPT (our own reports) must be expanded by
whoever queues it, through `LocalNames.expand_request`.

Names are local parts of every local domain at once (as in Postfix and sendmail): `staff`
is staff@ each local domain. A member without a domain takes the domain of the address being
expanded. Expansion is recursive and visits each alias and include file once, so loops end;
a name met again while it is being expanded (`alice: alice, archive@x`, or a→b→a) means the
user of that name, if there is one, and is cut otherwise. `\\name` is the user, never an alias.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from relayhub import maillog
from relayhub.address import Mailbox, parse_mailbox, quote_local_part
from relayhub.errors import SMTPReply, SyntaxErrorReply, TemporaryFailure
from relayhub.queue.store import RecipientRequest
from relayhub.users import User

_LOG = maillog.ALIASES

# C0 (but tab), DEL and C1 controls would reach SMTP replies and logs verbatim; surrogates
# are no characters at all.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_INCLUDE = ":include:"
_BLANK = " \t"
# RFC 5321 §4.5.3.1.1.
MAX_NAME_OCTETS = 64
# How often the files are looked at for changes (SPEC §5: without a restart).
POLL_INTERVAL = 1.0


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class LocalName:
    """A member naming a local part: an alias or a user. `verbatim` (written `\\name`) means
    the user, never an alias. `name` is lower-cased and unquoted."""

    name: str
    verbatim: bool = False


@dataclass(frozen=True)
class Address:
    """A member with a domain; expanded further when the domain is one of ours."""

    mailbox: Mailbox


@dataclass(frozen=True)
class Include:
    """`:include:path`: the members listed in another file. `path` is as written; `resolved`
    is it made absolute against the directory of the file that names it."""

    path: str
    resolved: str


Target = LocalName | Address | Include


@dataclass(frozen=True)
class AliasTable:
    """Alias name (lower-case, unquoted) -> members in file order, and the members of each
    include file by resolved path. Immutable: a reload builds a new table."""

    aliases: Mapping[str, tuple[Target, ...]] = field(default_factory=dict)
    includes: Mapping[str, tuple[Target, ...]] = field(default_factory=dict)


class AliasFileError(Exception):
    """The aliases file (or an include file) is unusable; `problems` holds one "FILE:LINE: why"
    line per problem. `files` is what was read, so that a watcher retries only after a change."""

    def __init__(self, problems: list[str], files: Mapping[str, Signature] | None = None) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.files: Mapping[str, Signature] = files or {}


# --------------------------------------------------------------------------- parsing


def _split_logical_lines(text: str) -> list[tuple[int, str, str | None]]:
    """(first line number, text, problem) per logical line, in file order: continuation lines
    (starting with white space) joined on; blank and comment lines skipped without ending a
    logical line. A line that cannot be used is an entry with its problem."""
    logical: list[tuple[int, str, str | None]] = []
    current: int | None = None  # index in `logical` of the entry continuation lines join
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        stripped = line.strip(_BLANK)
        if _CONTROL.search(line):
            logical.append((number, "", "control character in line"))
        elif not stripped or stripped.startswith("#"):
            continue
        elif line[0] not in _BLANK:
            current = len(logical)
            logical.append((number, line, None))
        elif current is None:
            logical.append((number, "", "continuation line without an alias"))
        else:
            start, so_far, _ = logical[current]
            logical[current] = (start, so_far + " " + stripped, None)
    return logical


def _split_members(text: str) -> list[str]:
    """Split at commas outside double quotes; ValueError for an unterminated quote."""
    members: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            members.append("".join(current))
            current = []
            continue
        current.append(char)
    if quoted:
        raise ValueError("unterminated quoted string")
    members.append("".join(current))
    return [m.strip(_BLANK) for m in members if m.strip(_BLANK)]


def _closing_quote(text: str) -> int | None:
    """The index of the '"' that ends the quoted string `text` starts with, or None."""
    escaped = False
    for index, char in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return index
    return None


def _whole_quoted(token: str) -> str | None:
    """The content of `token` when all of it is one quoted string ("a b" -> a b), else None."""
    if not token.startswith('"') or _closing_quote(token) != len(token) - 1:
        return None
    return _QUOTED_PAIR.sub(r"\1", token[1:-1])


def _is_dot_string(text: str) -> bool:
    """Can `text` be written without quotes, as an RFC 5321 dot-string (UTF-8 allowed)?"""
    try:
        return quote_local_part(text) == text  # it quotes exactly what is no dot-string
    except ValueError:  # a control character
        return False


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_name(name: str) -> str | None:
    """Why `name` (lower-cased) cannot be an alias or member local name, or None."""
    if not name:
        return "empty name"
    if "@" in name:
        return f"name {name!r} contains '@'"
    if len(name.encode()) > MAX_NAME_OCTETS:
        return f"name {name!r} is longer than {MAX_NAME_OCTETS} octets"
    try:
        quote_local_part(name)  # it must be writable as a local part in replies and headers
    except ValueError:
        return f"name {name!r} cannot be a local part (tab?)"
    return None


def _parse_member(token: str, directory: str) -> Target:
    """One member as written; ValueError says why it is refused."""
    content = _whole_quoted(token)
    if content is not None:  # "|cmd", "/file", ":include:/a,b" and "two words" are quoted
        text = content
    elif token.startswith('"') and "@" not in token:
        raise ValueError(f"bad member {token!r}")
    else:
        text = token
    if text.startswith("|"):
        raise ValueError(f"program target {token!r} is not allowed (|command deliveries are off)")
    if text.startswith("/"):
        raise ValueError(f"file target {token!r} is not allowed (/file deliveries are off)")
    if text[: len(_INCLUDE)].lower() == _INCLUDE:
        path = text[len(_INCLUDE) :].strip(_BLANK)
        if not path:
            raise ValueError(":include: without a file name")
        return Include(path, os.path.normpath(os.path.join(directory, path)))
    if content is not None:
        return _local_name(content.lower(), verbatim=False)
    if text.startswith("\\"):
        if not _is_dot_string(text[1:]):
            raise ValueError(f"bad member {token!r}")
        return _local_name(text[1:].lower(), verbatim=True)
    if "@" in text:
        try:
            return Address(parse_mailbox(text))
        except ValueError as error:
            raise ValueError(f"bad address {token!r}: {error}") from None
    if not _is_dot_string(text):
        hint = " (missing comma?)" if any(c in text for c in _BLANK) else ""
        raise ValueError(f"bad member {token!r}{hint}")
    return _local_name(text.lower(), verbatim=False)


def _local_name(name: str, verbatim: bool) -> LocalName:
    why = _check_name(name)
    if why:
        raise ValueError(why)
    if verbatim and not _is_dot_string(name):  # lower-casing may leave the dot-string
        raise ValueError(f"bad member \\{name}")
    return LocalName(name, verbatim)


def _parse_members(text: str, directory: str, where: str, problems: list[str]
                   ) -> list[Target]:
    try:
        tokens = _split_members(text)
    except ValueError as error:
        problems.append(f"{where}: {error}")
        return []
    members: list[Target] = []
    for token in tokens:
        try:
            members.append(_parse_member(token, directory))
        except ValueError as error:
            problems.append(f"{where}: {error}")
    return members


def _split_name(line: str) -> tuple[str, str]:
    """(alias name, members text) of a logical line; ValueError says what is wrong."""
    if line.startswith('"'):
        end = _closing_quote(line)
        if end is None:
            raise ValueError("unterminated quoted alias name")
        name = _QUOTED_PAIR.sub(r"\1", line[1:end])
        rest = line[end + 1 :].lstrip(_BLANK)
        if not rest.startswith(":"):
            raise ValueError("missing ':' after the alias name")
        return name, rest[1:]
    name, colon, rest = line.partition(":")
    if not colon:
        raise ValueError("missing ':' after the alias name")
    name = name.strip(_BLANK)
    if not _is_dot_string(name):
        raise ValueError(f"bad alias name {name!r} (quote names with spaces or specials)")
    return name, rest


@dataclass(frozen=True)
class _IncludeRef:
    """Where an :include: is named, for error messages."""

    resolved: str
    where: str


def _parse(text: str, filename: str) -> tuple[AliasTable, list[_IncludeRef], list[str]]:
    problems: list[str] = []
    directory = os.path.dirname(os.path.abspath(filename))
    aliases: dict[str, tuple[Target, ...]] = {}
    first_line: dict[str, int] = {}
    refs: list[_IncludeRef] = []
    for number, line, problem in _split_logical_lines(text):
        where = f"{filename}:{number}"
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        try:
            name, rest = _split_name(line)
        except ValueError as error:
            problems.append(f"{where}: {error}")
            continue
        key = name.lower()
        why = _check_name(key)
        if why:
            problems.append(f"{where}: {why}")
            continue
        if key in first_line:
            problems.append(f"{where}: duplicate alias {key!r} (first on line {first_line[key]})")
            continue
        first_line[key] = number
        count = len(problems)
        members = _parse_members(rest, directory, where, problems)
        if not members and len(problems) == count:
            problems.append(f"{where}: alias {key!r} has no members")
        aliases[key] = tuple(members)
        refs += [_IncludeRef(m.resolved, where) for m in members if isinstance(m, Include)]
    return AliasTable(aliases), refs, problems


def parse_aliases(text: str, filename: str) -> AliasTable:
    """Parse aliases(5) text into a table without include contents (see `load_aliases`), or
    raise AliasFileError listing every problem as "FILE:LINE: why". Never raises anything
    else, whatever the text."""
    table, _refs, problems = _parse(text, filename)
    if problems:
        raise AliasFileError(problems)
    return table


def _parse_include(text: str, filename: str
                   ) -> tuple[tuple[Target, ...], list[_IncludeRef], list[str]]:
    problems: list[str] = []
    members: list[Target] = []
    refs: list[_IncludeRef] = []
    directory = os.path.dirname(os.path.abspath(filename))
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        where = f"{filename}:{number}"
        if _CONTROL.search(line):
            problems.append(f"{where}: control character in line")
            continue
        stripped = line.strip(_BLANK)
        if stripped and not stripped.startswith("#"):
            found = _parse_members(stripped, directory, where, problems)
            members += found
            refs += [_IncludeRef(m.resolved, where) for m in found if isinstance(m, Include)]
    return tuple(members), refs, problems


def _format_name(name: str) -> str:
    # A name starting with '#' would read back as a comment line.
    return name if _is_dot_string(name) and not name.startswith("#") else _quote(name)


def _format_member(target: Target) -> str:
    if isinstance(target, Include):
        text = _INCLUDE + target.path
        needs_quotes = any(c in target.path for c in ',"\\') or target.path != target.path.strip()
        return _quote(text) if needs_quotes else text
    if isinstance(target, Address):
        return str(target.mailbox)
    if target.verbatim:
        return "\\" + target.name
    return _format_name(target.name)


def format_aliases(table: AliasTable) -> str:
    """The table as aliases(5) text that `parse_aliases` reads back to an equal table (with
    the same file name, against which relative include paths resolve)."""
    return "".join(
        f"{_format_name(name)}: {', '.join(_format_member(m) for m in members)}\n"
        for name, members in table.aliases.items()
    )


# --------------------------------------------------------------------------- loading files

# (device, inode, size, mtime in ns) of a file as read; None when it does not exist.
Signature = tuple[int, int, int, int] | None
# How load_aliases reads one file: its text (None: missing) and signature; OSError otherwise.
Reader = Callable[[str], tuple[str | None, Signature]]


def _read(path: str) -> tuple[str | None, Signature]:
    """The file's text and signature; (None, None) when missing; OSError otherwise."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())  # of the file read, even if renamed over meanwhile
            data = f.read()
    except FileNotFoundError:
        return None, None
    seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    try:
        return data.decode("utf-8-sig"), seen
    except UnicodeDecodeError as error:
        raise OSError(f"not UTF-8 (byte {error.start})") from None


def signature(path: str) -> Signature:
    """The file's signature now; None when it is missing or cannot be looked at (reading it
    then reports why, once)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _why(error: OSError) -> str:
    return error.strerror or str(error)


@dataclass(frozen=True)
class LoadedAliases:
    """A table read from disk, with the signature and the text of every file it depends on
    (the texts let a process started later use this version when the files are broken)."""

    table: AliasTable
    files: Mapping[str, Signature]
    texts: Mapping[str, str | None] = field(default_factory=dict)


def reader_of(texts: Mapping[str, str | None]) -> Reader:
    """A Reader over texts kept in memory (a last good version), not the files now."""

    def read(path: str) -> tuple[str | None, Signature]:
        return texts.get(path), None

    return read


def load_aliases(path: Path, read: Reader = _read) -> LoadedAliases:
    """Read the aliases file and, transitively, its include files (blocking: call it from a
    thread or at start-up). A missing aliases file is an empty table; a missing include file
    is a problem at the line naming it. Raises AliasFileError with every problem."""
    main = os.fspath(path)
    files: dict[str, Signature] = {}
    texts: dict[str, str | None] = {}
    try:
        text, files[main] = read(main)
    except OSError as error:
        files[main] = signature(main)
        raise AliasFileError([f"{main}: cannot read: {_why(error)}"], files) from None
    texts[main] = text
    if text is None:
        return LoadedAliases(AliasTable(), files, texts)
    table, pending, problems = _parse(text, main)
    includes: dict[str, tuple[Target, ...]] = {}
    while pending:
        ref = pending.pop(0)
        if ref.resolved in files:
            continue
        try:
            content, files[ref.resolved] = read(ref.resolved)
        except OSError as error:
            files[ref.resolved] = signature(ref.resolved)
            problems.append(f"{ref.where}: cannot read {ref.resolved}: {_why(error)}")
            continue
        if content is None:
            problems.append(f"{ref.where}: cannot read {ref.resolved}: No such file")
            continue
        texts[ref.resolved] = content
        members, refs, found = _parse_include(content, ref.resolved)
        problems += found
        includes[ref.resolved] = members
        pending += refs
    if problems:
        raise AliasFileError(problems, files)
    return LoadedAliases(AliasTable(table.aliases, includes), files, texts)


def changed(files: Mapping[str, Signature]) -> bool:
    """Has any of these files changed (appeared, gone, replaced, written) since it was read?"""
    return not files or any(signature(path) != seen for path, seen in files.items())


# --------------------------------------------------------------------------- expansion


class UserLookup(Protocol):
    """The users database as expansion needs it."""

    def lookup(self, name: str) -> User | None: ...


@dataclass(frozen=True)
class Member:
    """One final recipient of an expansion.

    `local` is a mailbox here: `user` is its account, None for postmaster without an account
    or an unknown name (local delivery bounces those). `owner` is the envelope sender to use
    (the nearest enclosing list's owner-NAME), None to keep the message's."""

    address: str
    local: bool
    user: User | None = None
    owner: str | None = None

    @property
    def key(self) -> str:
        """Equal for addresses that reach the same mailbox: one delivery each."""
        if self.local:
            return "local:" + parse_mailbox(self.address).unquoted_local_part.lower()
        return self.address.lower()


@dataclass(frozen=True)
class Expansion:
    """What an address stands for: `alias` is False when it is not an alias (then `members`
    is the address itself)."""

    address: str
    alias: bool
    members: tuple[Member, ...]


@dataclass(frozen=True)
class NameView:
    """A consistent snapshot of what names mean: every expansion and VRFY/EXPN answer is a
    pure function of one of these."""

    table: AliasTable
    users: UserLookup
    local_domains: tuple[str, ...]
    is_local_domain: Callable[[str], bool]
    roster: Callable[[], Iterable[User]] | None = None  # for full-name VRFY matches

    def is_user(self, name: str) -> bool:
        return name == "postmaster" or self.users.lookup(name) is not None

    def knows(self, name: str) -> bool:
        return name in self.table.aliases or self.is_user(name)


class UnknownAddress(SMTPReply):
    """VRFY/EXPN/expand of a name that is neither a user nor an alias."""

    def __init__(self, what: str) -> None:
        super().__init__(550, "5.1.1", f"<{what}>: Recipient address rejected: User unknown")


class AmbiguousName(SMTPReply):
    """VRFY of a name that matches several users' full names (RFC 5321 §3.5.3)."""

    def __init__(self, what: str) -> None:
        super().__init__(553, "5.1.4", f"{what}: User ambiguous")


class ExpansionTooLarge(SMTPReply):
    """An alias that stands for more recipients than one message may have."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(550, "5.5.3",
                         f"<{what}>: Recipient address rejected: alias expands to more than "
                         f"{limit} recipients")


class EmptyExpansion(SMTPReply):
    """An alias whose members all vanish (loops, empty include files): nobody would get it."""

    def __init__(self, what: str) -> None:
        super().__init__(550, "5.1.1",
                         f"<{what}>: Recipient address rejected: alias has no recipients")


class AliasesUnavailable(TemporaryFailure):
    """No good aliases table has been loaded: any local name might be an alias, so local
    recipients are deferred (451) rather than refused or delivered wrongly."""

    def __init__(self) -> None:
        super().__init__("Temporary lookup failure: aliases file unusable", "4.3.0")


def _local_address(name: str, domain: str) -> str:
    return f"{quote_local_part(name)}@{domain}"


@dataclass
class _Frame:
    members: Iterator[Target]
    ancestors: frozenset[str]  # alias names being expanded on the way here
    domain: str
    owner: str | None


def expand(mailbox: Mailbox, view: NameView, *, limit: int) -> Expansion:
    """What `mailbox` stands for: itself, or (for an alias) its final recipients.

    Pure. Raises ExpansionTooLarge beyond `limit` members and EmptyExpansion for an alias with
    none; unknown local names are not refused here (that is the acceptance policy's job for
    the address itself, and a bounce's for an unknown list member)."""
    address = str(mailbox)
    if not view.is_local_domain(mailbox.domain):
        return Expansion(address, False, (Member(address, local=False),))
    name = mailbox.unquoted_local_part.lower()
    if name not in view.table.aliases:
        return Expansion(address, False, (
            Member(address, local=True, user=view.users.lookup(name)),))
    members: dict[str, Member] = {}
    expanded = {name}
    seen_includes: set[str] = set()

    def owner_of(alias: str, domain: str, inherited: str | None) -> str | None:
        owner = f"owner-{alias}"
        return _local_address(owner, domain) if owner in view.table.aliases else inherited

    def add(member: Member) -> None:
        if member.key not in members:
            members[member.key] = member
            if len(members) > limit:
                raise ExpansionTooLarge(address, limit)

    # An explicit stack, not recursion: a long chain of aliases must not hit Python's limit.
    stack = [_Frame(iter(view.table.aliases[name]), frozenset({name}), mailbox.domain,
                    owner_of(name, mailbox.domain, None))]
    while stack:
        frame = stack[-1]
        target = next(frame.members, None)
        if target is None:
            stack.pop()
            continue
        if isinstance(target, Include):
            if target.resolved not in seen_includes:
                seen_includes.add(target.resolved)
                stack.append(_Frame(iter(view.table.includes.get(target.resolved, ())),
                                    frame.ancestors, frame.domain, frame.owner))
            continue
        if isinstance(target, Address):
            if not view.is_local_domain(target.mailbox.domain):
                add(Member(str(target.mailbox), local=False, owner=frame.owner))
                continue
            local, domain = target.mailbox.unquoted_local_part.lower(), target.mailbox.domain
            verbatim = False
        else:
            local, domain, verbatim = target.name, frame.domain, target.verbatim
        if not verbatim and local in view.table.aliases and local not in frame.ancestors:
            if local not in expanded:  # each alias once: a second mention adds nobody new
                expanded.add(local)
                stack.append(_Frame(iter(view.table.aliases[local]), frame.ancestors | {local},
                                    domain, owner_of(local, domain, frame.owner)))
        elif verbatim or local not in frame.ancestors or view.is_user(local):
            # A name naming itself (directly or round a loop) is the user of that name.
            add(Member(_local_address(local, domain), local=True,
                       user=view.users.lookup(local), owner=frame.owner))
        # else: a loop back to an alias that is no user: cut.
    if not members:
        raise EmptyExpansion(address)
    return Expansion(address, True, tuple(members.values()))


def recipient_requests(expansion: Expansion, request: RecipientRequest, *,
                       null_sender: bool) -> tuple[RecipientRequest, ...]:
    """The queue entries for one accepted recipient: the request itself when it is no alias;
    else one per member, each with the client's ORCPT or else the alias address as ORCPT
    (RFC 3461 §4.2) so that reports name what the sender wrote.

    A member of a list with an owner gets the owner as its sender and the default NOTIFY: the
    owner, not the original sender, hears of its failures (RFC 3461 §6.2.7.3). Other members
    keep NOTIFY (§6.2.7.4, aliases). A message from the null sender keeps it: a report about a
    report is never sent (RFC 5321 §4.5.5), so nobody must be made its sender."""
    if not expansion.alias:
        return (request,)
    original = request.orcpt or (
        f"rfc822;{expansion.address}" if expansion.address.isascii()
        else f"utf-8;{expansion.address}"  # RFC 6533
    )
    requests = []
    for member in expansion.members:
        owner = None if null_sender else member.owner
        requests.append(RecipientRequest(
            address=member.address, orcpt=original,
            notify=request.notify if owner is None else (), sender=owner))
    return tuple(requests)


# --------------------------------------------------------------------------- VRFY and EXPN

_SPECIALS = set('()<>[]:;@\\,"')


def _display(user: User | None, address: str) -> str:
    """`Full Name <user@domain>`, or `<addr>` when there is no full name."""
    if user is None or not user.full_name:
        return f"<{address}>"
    name = user.full_name
    if _SPECIALS & set(name):
        name = _quote(name)
    return f"{name} <{address}>"


def _query(arg: str, view: NameView) -> tuple[str, str, Mailbox | None]:
    """(lower-cased local name, domain, mailbox if one was given) of a VRFY/EXPN argument:
    "Smith", "Fred Smith", "<smith@example.org>", "smith@example.org", "\"a b\"", with an
    optional SMTPUTF8 parameter (RFC 6531 §3.7.4)."""
    text = arg.strip()
    if text[-9:].upper() == " SMTPUTF8":
        text = text[:-9].rstrip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if not text or _CONTROL.search(text):
        raise SyntaxErrorReply("Syntax: a user name or an address is needed")
    quoted = _whole_quoted(text)
    if quoted is None and "@" in text:
        try:
            mailbox = parse_mailbox(text)
        except ValueError:
            raise SyntaxErrorReply("Bad address syntax", code=501, status="5.1.3") from None
        return mailbox.unquoted_local_part.lower(), mailbox.domain, mailbox
    if not view.local_domains:
        raise UnknownAddress(text)
    return (text if quoted is None else quoted).lower(), view.local_domains[0], None


def _single(lines: list[str]) -> list[str]:
    """Reply lines with continuation marks: `250-...` for all but the last."""
    return [f"250-2.1.5 {line}" for line in lines[:-1]] + [f"250 2.1.5 {lines[-1]}"]


def vrfy_reply(arg: str, view: NameView) -> list[str]:
    """The VRFY answer (RFC 5321 §3.5.1): a user `250 Full Name <user@domain>`, an alias
    `250 <alias@domain>`; raises UnknownAddress (550), AmbiguousName (553) or a syntax error.
    An address in a domain not ours is not verified (252)."""
    name, domain, mailbox = _query(arg, view)
    if mailbox is not None and not view.is_local_domain(domain):
        return [f"252 2.0.0 <{mailbox}>: not a local address, cannot verify"]
    if name in view.table.aliases:
        return _single([f"<{_local_address(name, domain)}>"])
    if view.is_user(name):
        return _single([_display(view.users.lookup(name), _local_address(name, domain))])
    if mailbox is None and view.roster is not None:
        # RFC 5321 §3.5.1 lets a server match on other strings such as the full name.
        wanted = name.split()
        matches = [u for u in view.roster()
                   if wanted and (u.full_name.lower().split()[: len(wanted)] == wanted
                                  or u.full_name.lower().split()[-len(wanted):] == wanted)]
        if len(matches) > 1:
            raise AmbiguousName(arg.strip())
        if matches:
            return _single([_display(matches[0], _local_address(matches[0].name, domain))])
    raise UnknownAddress(str(mailbox) if mailbox else _quoted_address(name, domain))


def _quoted_address(name: str, domain: str) -> str:
    """name@domain for a reply; a name that no local part can hold (tab) is shown as is."""
    try:
        return _local_address(name, domain)
    except ValueError:
        return name


def expn_reply(arg: str, view: NameView, *, limit: int) -> list[str]:
    """The EXPN answer (RFC 5321 §3.5.2): one `250-` line per final recipient, `Full Name
    <user@domain>` for local users and `<addr>` for others; a user stands for itself.
    Raises UnknownAddress (550) for anything else, or what `expand` raises."""
    name, domain, mailbox = _query(arg, view)
    if (mailbox is not None and not view.is_local_domain(domain)) or not view.knows(name):
        raise UnknownAddress(str(mailbox) if mailbox else _quoted_address(name, domain))
    expansion = expand(Mailbox(quote_local_part(name), domain), view, limit=limit)
    return _single([_display(m.user, m.address) for m in expansion.members])


# --------------------------------------------------------------------------- live tables


class AliasDatabase:
    """The aliases file at `path` and the table currently in use.

    `check()` (blocking, for a thread) reads the files again when one has changed; `apply()`
    (on the reactor thread) adopts what it found. A broken version keeps the last good table;
    when there has never been one, `usable` is False.

    `fallback` holds the texts of a last good version that another process read before (the
    master's, for a child started by a reload): it is used when the files are broken now."""

    def __init__(self, path: Path, fallback: Mapping[str, str | None] | None = None) -> None:
        self.path = path
        self.table = AliasTable()
        self.usable = False
        self.problems: tuple[str, ...] = ()
        # The texts of the table in use, handed to processes started later.
        self.texts: Mapping[str, str | None] | None = None
        # The files behind the last attempt, good or bad: nothing is re-read until one changes.
        self._files: Mapping[str, Signature] = {}
        self.reload_if_changed()
        if not self.usable and fallback is not None:
            try:
                kept = load_aliases(path, reader_of(fallback))
            except AliasFileError:
                return  # not a good version after all: nothing to keep
            self.table, self.usable, self.texts = kept.table, True, kept.texts

    def check(self) -> LoadedAliases | AliasFileError | None:
        """A new table or why there is none, or None when no file has changed. Blocking."""
        if not changed(self._files):
            return None
        try:
            return load_aliases(self.path)
        except AliasFileError as error:
            return error

    def apply(self, outcome: LoadedAliases | AliasFileError | None) -> bool:
        """Adopt the outcome of `check()`; True when a new table is in use."""
        if outcome is None:
            return False
        self._files = outcome.files
        if isinstance(outcome, AliasFileError):
            self.problems = tuple(outcome.problems)
            return False
        self.table, self.usable, self.problems = outcome.table, True, ()
        self.texts = outcome.texts
        return True

    def reload_if_changed(self) -> bool:
        """check() and apply() in one blocking call (start-up, relayhubctl, SIGHUP)."""
        return self.apply(self.check())


class AliasWatcher(Service):
    """Polls the aliases file and its includes every `interval` seconds (a cheap stat) and
    reloads them in a thread when one has changed, logging what happened. `refresh()` does
    the same at once; `lock` keeps it and the polls (and the caller's other reads) in order,
    so that an older read can never be applied after a newer one."""

    def __init__(self, db: AliasDatabase, reactor: Any, interval: float = POLL_INTERVAL,
                 lock: defer.DeferredLock | None = None) -> None:
        self.db = db
        self.reactor = reactor
        self.interval = interval
        self.lock = lock or defer.DeferredLock()
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._report(not self.db.problems)  # a kept last good version is not news
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _poll(self) -> None:
        if self.lock.locked:  # a slow disk or a refresh under way: never two reads at once
            return
        self.refresh()

    def refresh(self) -> defer.Deferred[None]:
        """Look at the files now; fires once what they hold is in use (or logged)."""
        done: defer.Deferred[None] = self.lock.run(self._check)
        return done

    def _check(self) -> defer.Deferred[None]:
        checked: defer.Deferred[LoadedAliases | AliasFileError | None] = (
            threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.db.check))
        return checked.addCallbacks(self._checked, self._failed)

    def _checked(self, outcome: LoadedAliases | AliasFileError | None) -> None:
        if outcome is not None:
            self._report(self.db.apply(outcome))

    def _failed(self, failure: Failure) -> None:
        _LOG.failure(maillog.ALIASES_FAILED, failure, path=str(self.db.path))

    def _report(self, loaded: bool) -> None:
        state = "keeping the last good version" if self.db.usable else \
            "local recipients are deferred until it is fixed"
        for problem in self.db.problems:
            _LOG.error(maillog.ALIASES_BROKEN, path=str(self.db.path), problem=problem,
                       state=state)
        if loaded and self.db.usable:
            _LOG.info(maillog.ALIASES_LOADED, path=str(self.db.path),
                      aliases=len(self.db.table.aliases), includes=len(self.db.table.includes))


class AliasSource(Protocol):
    """What LocalNames reads: an AliasDatabase, or FixedAliases."""

    @property
    def table(self) -> AliasTable: ...

    @property
    def usable(self) -> bool: ...


@dataclass(frozen=True)
class FixedAliases:
    """A table that never changes (checks, tests)."""

    table: AliasTable
    usable: bool = True


class LocalNames:
    """Local parts of our domains, users and aliases together, as RCPT acceptance, VRFY,
    EXPN and `relayhubctl aliases` see them. Each call takes one snapshot (`view()`), so a
    reload in between cannot mix two tables in one answer."""

    def __init__(self, aliases: AliasSource, users: UserLookup, local_domains: Sequence[str],
                 is_local_domain: Callable[[str], bool], *, max_recipients: int,
                 roster: Callable[[], Iterable[User]] | None = None) -> None:
        self.aliases = aliases
        self.users = users
        self.local_domains = tuple(local_domains)
        self.is_local_domain = is_local_domain
        self.max_recipients = max_recipients
        self.roster = roster

    def view(self) -> NameView:
        if not self.aliases.usable:
            raise AliasesUnavailable()
        return NameView(self.aliases.table, self.users, self.local_domains,
                        self.is_local_domain, self.roster)

    def knows(self, local_part: str) -> bool:
        """LocalDirectory: a user, postmaster or an alias (451 while aliases are unusable)."""
        return self.view().knows(local_part.lower())

    def expand(self, mailbox: Mailbox) -> Expansion:
        """What RCPT queues for `mailbox` (see `expand`); 451 for a local one while there is
        no usable aliases table."""
        if not self.is_local_domain(mailbox.domain):  # needs no table: never deferred for it
            return Expansion(str(mailbox), False, (Member(str(mailbox), local=False),))
        return expand(mailbox, self.view(), limit=self.max_recipients)

    def expand_request(self, request: RecipientRequest, *, null_sender: bool = False
                       ) -> tuple[RecipientRequest, ...]:
        """The queue entries for mail that enters the queue without RCPT (reports to a list
        owner or to postmaster): as RCPT would queue them. Never refuses: what cannot be
        expanded is queued as it is, and delivery reports what becomes of it."""
        try:
            expansion = self.expand(parse_mailbox(request.address))
        except (SMTPReply, ValueError):
            return (request,)
        return recipient_requests(expansion, request, null_sender=null_sender)

    def vrfy(self, arg: str) -> list[str]:
        return vrfy_reply(arg, self.view())

    def expn(self, arg: str) -> list[str]:
        return expn_reply(arg, self.view(), limit=self.max_recipients)
