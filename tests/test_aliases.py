"""Tests for relayhub.aliases: parsing, formatting, loading with includes, expansion, the
VRFY/EXPN answers as pure functions, reloading, and `relayhubctl aliases`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest
from hubprocess import write_toml
from hypothesis import given, settings
from hypothesis import strategies as st

from relayhub.address import Mailbox
from relayhub.admin.cli import run
from relayhub.aliases import (
    Address,
    AliasDatabase,
    AliasesUnavailable,
    AliasFileError,
    AliasTable,
    AmbiguousName,
    EmptyExpansion,
    ExpansionTooLarge,
    FixedAliases,
    Include,
    LocalName,
    LocalNames,
    NameView,
    UnknownAddress,
    expand,
    expn_reply,
    format_aliases,
    load_aliases,
    parse_aliases,
    recipient_requests,
    vrfy_reply,
)
from relayhub.errors import SMTPReply, SyntaxErrorReply
from relayhub.queue.store import RecipientRequest
from relayhub.users import User

FILE = "/etc/relayhub/aliases"
LOCAL = ("example.org", "example.net")
USERS = {
    "smith": User("smith", "{PLAIN}x", "Fred Smith"),
    "jones": User("jones", "{PLAIN}x", "Fred Jones"),
    "alice": User("alice", "{PLAIN}x", "Alice Liddell"),
    "bob": User("bob", "{PLAIN}x", ""),
    "carol": User("carol", "{PLAIN}x", "Carol, the Admin"),
    "staff": User("staff", "{PLAIN}x", "Staff Account"),
}


class Users:
    def __init__(self, users: dict[str, User] = USERS) -> None:
        self.users = users

    def lookup(self, name: str) -> User | None:
        return self.users.get(name.lower())


def view(text: str, includes: dict[str, str] | None = None, *,
         roster: Iterable[User] | None = None) -> NameView:
    table = parse_aliases(text, FILE)
    members = {path: parse_aliases(f"x: {body}", path).aliases["x"]
               for path, body in (includes or {}).items()}
    return NameView(AliasTable(table.aliases, members), Users(), LOCAL,
                    lambda domain: domain in LOCAL,
                    None if roster is None else (lambda: list(roster)))


def addresses(text: str, address: str, limit: int = 100,
              includes: dict[str, str] | None = None) -> list[str]:
    local, domain = address.split("@")
    return [m.address for m in expand(Mailbox(local, domain), view(text, includes),
                                      limit=limit).members]


def problems(text: str) -> list[str]:
    with pytest.raises(AliasFileError) as exc:
        parse_aliases(text, FILE)
    return exc.value.problems


# --------------------------------------------------------------------------- parsing


def test_parse_the_spec_example() -> None:
    table = parse_aliases(
        "# comment\n"
        "postmaster: root\n"
        "root:       alice\n"
        "staff:      alice, bob, carol@other.example, :include:/etc/relayhub/lists/staff\n"
        "everyone:   staff, dave\n"
        '"quoted name": alice\n', FILE)
    assert table.aliases == {
        "postmaster": (LocalName("root"),),
        "root": (LocalName("alice"),),
        "staff": (LocalName("alice"), LocalName("bob"),
                  Address(Mailbox("carol", "other.example")),
                  Include("/etc/relayhub/lists/staff", "/etc/relayhub/lists/staff")),
        "everyone": (LocalName("staff"), LocalName("dave")),
        "quoted name": (LocalName("alice"),),
    }


def test_continuation_comments_case_and_quoting() -> None:
    table = parse_aliases(
        "Staff: Alice,\r\n"
        "\tBob@Example.ORG.\n"
        "  # a comment inside does not end the entry\n"
        "\n"
        '  , "Mary Ann", \\Carol, "john smith"@Other.Example\n'
        'lists: :INCLUDE: lists/a , ":include:lists/b,c"\n', FILE)
    assert table.aliases["staff"] == (
        LocalName("alice"), Address(Mailbox("Bob", "example.org")), LocalName("mary ann"),
        LocalName("carol", verbatim=True), Address(Mailbox('"john smith"', "other.example")))
    assert table.aliases["lists"] == (Include("lists/a", "/etc/relayhub/lists/a"),
                                      Include("lists/b,c", "/etc/relayhub/lists/b,c"))


def test_every_problem_named_with_file_and_line() -> None:
    found = problems(
        "ok: alice\n"                      # 1
        "prog: alice, |/usr/bin/vacation\n"  # 2
        'quoted: "|/bin/sh -c evil"\n'     # 3
        "file: /var/mail/dump\n"          # 4
        "  continued\n"                     # 5 continues line 4, reported there
        "OK: bob\n"                         # 6 duplicate (case-insensitive)
        "nocolon alice\n"                   # 7
        "two words: alice\n"                # 8
        "empty:\n"                          # 9
        "missing: alice bob\n"              # 10
        'open: "alice\n'                    # 11
        "bad: Fred <fred@example.org>\n"    # 12
        "ctl: al\x1bice\n"                  # 13
        "long: " + "x" * 65 + "\n"           # 14
        "inc: :include:\n")                 # 15
    lines = [p.split(":")[1] for p in found]
    assert lines == ["2", "3", "4", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15"]
    assert all(p.startswith(FILE + ":") for p in found)
    assert "program target '|/usr/bin/vacation' is not allowed" in found[0]
    assert "file target '/var/mail/dump continued' is not allowed" in found[2]
    assert "duplicate alias 'ok' (first on line 1)" in found[3]
    assert "missing comma" in found[7]


def test_continuation_before_any_alias() -> None:
    assert problems("  alice\nx: y\n") == [f"{FILE}:1: continuation line without an alias"]


def test_format_round_trip() -> None:
    text = ('"#hash": a\nstaff: Alice, \\bob, "Mary Ann", "x,y"@Example.ORG, :include:l/a\n'
            'inc: ":include: odd, name"\n"q\\"uote": "back\\\\slash"\n')
    table = parse_aliases(text, FILE)
    formatted = format_aliases(table)
    assert formatted.startswith('"#hash": a\n')
    assert parse_aliases(formatted, FILE) == table


# --------------------------------------------------------------------------- loading


def test_load_with_relative_and_nested_includes(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "staff").write_text("# staff\nalice\n\nbob@example.org\n"
                                              ":include:more\n")
    (tmp_path / "lists" / "more").write_text("carol, dave@remote.example\n")
    aliases = tmp_path / "aliases"
    aliases.write_bytes(b"\xef\xbb\xbfstaff: :include:lists/staff\n")  # a BOM is ignored
    loaded = load_aliases(aliases)
    staff, more = str(tmp_path / "lists" / "staff"), str(tmp_path / "lists" / "more")
    assert set(loaded.table.includes) == {staff, more}
    assert loaded.table.includes[more] == (LocalName("carol"),
                                           Address(Mailbox("dave", "remote.example")))
    assert set(loaded.files) == {str(aliases), staff, more}


def test_load_problems(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    assert load_aliases(aliases).table == AliasTable()  # missing file: no aliases
    (tmp_path / "inc").write_text("ok\n|prog\n")
    aliases.write_text("a: :include:nowhere\nb: :include:inc\n")
    with pytest.raises(AliasFileError) as exc:
        load_aliases(aliases)
    assert exc.value.problems == [
        f"{aliases}:1: cannot read {tmp_path / 'nowhere'}: No such file",
        f"{tmp_path / 'inc'}:2: program target '|prog' is not allowed (|command deliveries "
        "are off)",
    ]
    aliases.write_bytes(b"a: b\xff\n")
    with pytest.raises(AliasFileError, match="not UTF-8"):
        load_aliases(aliases)


# --------------------------------------------------------------------------- expansion

PEOPLE = """
example-people: staff, everyone, dave@remote.example
staff: alice, bob, :include:/lists/staff
everyone: staff, smith, :include:/lists/staff
"""


def test_nested_aliases_and_includes_each_address_once() -> None:
    assert addresses(PEOPLE, "Example-People@example.org",
                     includes={"/lists/staff": "carol, Alice@example.net, eve@remote.example"}
                     ) == ["alice@example.org", "bob@example.org", "carol@example.org",
                           "eve@remote.example", "smith@example.org", "dave@remote.example"]


def test_loop_is_cut() -> None:
    text = "a: b, x@remote.example\nb: a, y@remote.example\n"
    assert addresses(text, "a@example.org") == ["y@remote.example", "x@remote.example"]
    with pytest.raises(EmptyExpansion):
        addresses("a: b\nb: a\n", "a@example.org")


def test_alias_naming_itself_delivers_to_the_user() -> None:
    assert addresses("alice: alice, archive@remote.example\n", "alice@example.org") == [
        "alice@example.org", "archive@remote.example"]
    # Also round a loop, when the name is a user.
    assert addresses("smith: team\nteam: smith, bob\n", "smith@example.org") == [
        "smith@example.org", "bob@example.org"]
    # \name is the user even when an alias of that name exists.
    assert addresses("x: \\alice, y\nalice: bob\ny: alice\n", "x@example.org") == [
        "alice@example.org", "bob@example.org"]


def test_alias_wins_over_user_and_unknown_members_are_kept() -> None:
    assert addresses("staff: alice, nobody\n", "staff@example.net") == [
        "alice@example.net", "nobody@example.net"]
    assert addresses("", "Smith@example.org") == ["Smith@example.org"]  # not an alias: as is
    assert addresses("", "x@remote.example") == ["x@remote.example"]


def test_owner_is_the_nearest_list_owner() -> None:
    text = ("outer: inner, smith\ninner: alice\nowner-inner: bob\n"
            "plain: carol\nowner-outer: root\n")
    members = expand(Mailbox("outer", "example.org"), view(text), limit=10).members
    assert [(m.address, m.owner) for m in members] == [
        ("alice@example.org", "owner-inner@example.org"),
        ("smith@example.org", "owner-outer@example.org")]


def test_expansion_limit() -> None:
    text = "big: " + ", ".join(f"u{n}@remote.example" for n in range(11)) + "\n"
    assert len(addresses(text, "big@example.org", limit=11)) == 11
    with pytest.raises(ExpansionTooLarge) as exc:
        addresses(text, "big@example.org", limit=10)
    assert (exc.value.code, exc.value.status) == (550, "5.5.3")
    assert "alias expands to more than 10 recipients" in exc.value.text


def test_long_chain_does_not_recurse() -> None:
    text = "".join(f"a{n}: a{n + 1}\n" for n in range(5000)) + "a5000: alice\n"
    assert addresses(text, "a0@example.org") == ["alice@example.org"]


def test_recipient_requests_keep_orcpt_notify_and_owner() -> None:
    expansion = expand(Mailbox("Staff", "example.org"),
                       view("staff: alice, x@remote.example\nowner-staff: bob\n"), limit=10)
    request = RecipientRequest("Staff@example.org", notify=("NEVER",))
    # A list with an owner: the owner is told of failures, whatever the sender asked.
    assert recipient_requests(expansion, request, null_sender=False) == (
        RecipientRequest("alice@example.org", "rfc822;Staff@example.org", (),
                         "owner-staff@example.org"),
        RecipientRequest("x@remote.example", "rfc822;Staff@example.org", (),
                         "owner-staff@example.org"),
    )
    # A plain alias passes NOTIFY on (RFC 3461 §6.2.7.4).
    plain_alias = expand(Mailbox("team", "example.org"), view("team: alice, bob\n"), limit=10)
    assert {r.notify for r in recipient_requests(plain_alias, request, null_sender=False)} == {
        ("NEVER",)}
    given_orcpt = RecipientRequest("Staff@example.org", orcpt="rfc822;list@old.example")
    assert {r.orcpt for r in recipient_requests(expansion, given_orcpt, null_sender=True)} == {
        "rfc822;list@old.example"}
    from_null = recipient_requests(expansion, request, null_sender=True)
    assert {(r.sender, r.notify) for r in from_null} == {(None, ("NEVER",))}
    plain = RecipientRequest("alice@example.org")
    not_alias = expand(Mailbox("alice", "example.org"), view(""), limit=10)
    assert recipient_requests(not_alias, plain, null_sender=False) == (plain,)


# --------------------------------------------------------------------------- VRFY and EXPN


def test_vrfy_answers() -> None:
    names = view("example-people: smith, alice\n\"mary ann\": alice\n")
    assert vrfy_reply("Smith", names) == ["250 2.1.5 Fred Smith <smith@example.org>"]
    assert vrfy_reply("<smith@Example.NET>", names) == ["250 2.1.5 Fred Smith <smith@example.net>"]
    assert vrfy_reply("smith@example.org SMTPUTF8", names) == [
        "250 2.1.5 Fred Smith <smith@example.org>"]
    assert vrfy_reply("bob", names) == ["250 2.1.5 <bob@example.org>"]
    assert vrfy_reply("carol", names) == ['250 2.1.5 "Carol, the Admin" <carol@example.org>']
    assert vrfy_reply("Example-People", names) == ["250 2.1.5 <example-people@example.org>"]
    assert vrfy_reply('"Mary Ann"', names) == ['250 2.1.5 <"mary ann"@example.org>']
    assert vrfy_reply("postmaster", names) == ["250 2.1.5 <postmaster@example.org>"]
    assert vrfy_reply("x@remote.example", names)[0].startswith("252 2.0.0 ")
    for unknown in ("nobody", "<nobody@example.org>"):
        with pytest.raises(UnknownAddress) as exc:
            vrfy_reply(unknown, names)
        assert (exc.value.code, exc.value.status) == (550, "5.1.1")
    with pytest.raises(SyntaxErrorReply):
        vrfy_reply("<bad@@address>", names)


def test_vrfy_full_names_and_ambiguity() -> None:
    names = view("", roster=USERS.values())
    assert vrfy_reply("Jones", names) == ["250 2.1.5 Fred Jones <jones@example.org>"]
    assert vrfy_reply("Alice Liddell", names) == ["250 2.1.5 Alice Liddell <alice@example.org>"]
    with pytest.raises(AmbiguousName) as exc:
        vrfy_reply("Fred", names)
    assert (exc.value.code, exc.value.status) == (553, "5.1.4")


def test_expn_answers() -> None:
    names = view(PEOPLE, {"/lists/staff": "carol, eve@remote.example"})
    assert expn_reply("Example-People", names, limit=100) == [
        "250-2.1.5 Alice Liddell <alice@example.org>",
        "250-2.1.5 <bob@example.org>",
        '250-2.1.5 "Carol, the Admin" <carol@example.org>',
        "250-2.1.5 <eve@remote.example>",
        "250-2.1.5 Fred Smith <smith@example.org>",
        "250 2.1.5 <dave@remote.example>",
    ]
    assert expn_reply("smith", names, limit=100) == ["250 2.1.5 Fred Smith <smith@example.org>"]
    for unknown in ("nobody", "x@remote.example"):
        with pytest.raises(UnknownAddress):
            expn_reply(unknown, names, limit=100)


# --------------------------------------------------------------------------- live tables


def bump(path: Path, text: str) -> None:
    """Write `text` and make sure the change is seen even within one mtime tick."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_database_reloads_and_keeps_last_good_table(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    db = AliasDatabase(path)
    assert db.usable and db.table == AliasTable()
    assert not db.reload_if_changed()
    bump(path, "a: :include:inc\n")
    (tmp_path / "inc").write_text("alice\n")
    assert db.reload_if_changed()
    assert db.table.includes[str(tmp_path / "inc")] == (LocalName("alice"),)
    bump(tmp_path / "inc", "bob\n")  # an include file changing is a change too
    assert db.reload_if_changed()
    good = db.table
    bump(path, "a: alice\nb: |prog\n")
    assert not db.reload_if_changed()
    assert db.table is good and db.usable
    assert db.problems == (f"{path}:2: program target '|prog' is not allowed (|command "
                           "deliveries are off)",)
    assert not db.reload_if_changed()  # reported once per change, not at every poll


def test_unusable_at_start_defers_local_recipients(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_text("broken\n")
    db = AliasDatabase(path)
    assert not db.usable and db.problems
    names = LocalNames(db, Users(), LOCAL, lambda d: d in LOCAL, max_recipients=10)
    with pytest.raises(AliasesUnavailable) as exc:
        names.knows("smith")
    assert (exc.value.code, exc.value.status) == (451, "4.3.0")
    # Mail for other domains does not depend on the aliases.
    assert [m.address for m in names.expand(Mailbox("x", "remote.example")).members] == [
        "x@remote.example"]
    bump(path, "fixed: smith\n")
    assert db.reload_if_changed() and names.knows("fixed")


def test_local_names_expand_request() -> None:
    names = LocalNames(FixedAliases(parse_aliases("team: smith, bob\n", FILE)), Users(), LOCAL,
                       lambda d: d in LOCAL, max_recipients=10)
    assert [r.address for r in names.expand_request(RecipientRequest("team@example.org"))] == [
        "smith@example.org", "bob@example.org"]


# --------------------------------------------------------------------------- relayhubctl


@pytest.fixture
def ctl_config(tmp_path: Path) -> Path:
    (tmp_path / "users").write_text("smith:{PLAIN}x:Fred Smith\nalice:{PLAIN}x:Alice\n")
    (tmp_path / "staff").write_text("alice\n")
    (tmp_path / "aliases").write_text(
        "team: smith, :include:staff, x@remote.example\nowner-team: smith\n"
        "ghosts: nobody\n")
    config = tmp_path / "relayhub.toml"
    write_toml(config, {
        "server": {"hostname": "hub.test", "state_dir": str(tmp_path / "state")},
        "domains": {"local": ["example.org"]},
        "aliases": {"file": str(tmp_path / "aliases")},
        "users": {"file": str(tmp_path / "users")},
    })
    return config


def test_ctl_expand(ctl_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["-c", str(ctl_config), "aliases", "expand", "Team"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "smith@example.org  (envelope sender owner-team@example.org)",
        "alice@example.org  (envelope sender owner-team@example.org)",
        "x@remote.example  (envelope sender owner-team@example.org)",
    ]
    assert run(["-c", str(ctl_config), "aliases", "expand", "<TEAM@example.org>"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert run(["aliases", "expand", "smith@example.org", "-c", str(ctl_config)]) == 0
    assert capsys.readouterr().out == "smith@example.org\n"
    assert run(["-c", str(ctl_config), "aliases", "expand", "nobody@example.org"]) == 1
    assert capsys.readouterr().err == (
        "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown\n")
    assert run(["-c", str(ctl_config), "aliases", "expand", "bad@@x"]) == 2


def test_ctl_check(ctl_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["-c", str(ctl_config), "aliases", "check"]) == 0
    out = capsys.readouterr().out.splitlines()
    aliases = ctl_config.parent / "aliases"
    assert out == ["warning: alias 'ghosts': nobody@example.org is neither a user nor an alias",
                   f"OK: {aliases}: 3 aliases, 1 include files"]
    aliases.write_text("team: smith\nteam: |prog\n")
    assert run(["-c", str(ctl_config), "aliases", "check"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{aliases}:2: duplicate alias 'team' (first on line 1)"]


# --------------------------------------------------------------------------- properties


def only_alias_file_error(text: str) -> AliasTable | None:
    try:
        return parse_aliases(text, FILE)
    except AliasFileError:
        return None


@given(st.text())
@settings(max_examples=500)
def test_parser_raises_only_its_own_error(text: str) -> None:
    only_alias_file_error(text)


PIECES = ["a", "B", "staff", "owner-staff", "x.y", '"two words"', '"q\\"t"', "\\alice",
          "bob@Example.ORG", '"a,b"@x.example', "u@[192.0.2.1]", ":include:l/f",
          '":include:/a, b"', "|prog", "/file", "@", ",", ", ", ":", "#", "\t", " ", "\n",
          "\n ", "\n\t", "\n#c\n", '"', "\\", "é", "\r\n", "İ"]


@given(st.lists(st.sampled_from(PIECES), max_size=30))
@settings(max_examples=1000)
def test_parse_format_parse_is_stable(pieces: list[str]) -> None:
    for text in ("".join(pieces), "name: " + "".join(pieces)):
        table = only_alias_file_error(text)
        if table is not None:
            assert parse_aliases(format_aliases(table), FILE) == table


@given(st.text())
@settings(max_examples=300)
def test_arbitrary_text_that_parses_round_trips(text: str) -> None:
    table = only_alias_file_error(text)
    if table is not None:
        assert parse_aliases(format_aliases(table), FILE) == table


def test_specific_exceptions_carry_replies() -> None:
    for error in (UnknownAddress("x"), AmbiguousName("x"), ExpansionTooLarge("x", 1),
                  EmptyExpansion("x"), AliasesUnavailable()):
        assert isinstance(error, SMTPReply)


def test_expand_request_never_refuses() -> None:
    names = LocalNames(FixedAliases(parse_aliases("loop: loop2\nloop2: loop\n", FILE)),
                       Users(), LOCAL, lambda d: d in LOCAL, max_recipients=10)
    for address in ("loop@example.org", "nobody@example.org", "not an address"):
        request = RecipientRequest(address)
        assert names.expand_request(request, null_sender=True) == (request,)
