"""Tests for relayhub.policy: domain classes, trusted networks and RCPT acceptance (SPEC §3)."""

from __future__ import annotations

import ipaddress

import pytest

from relayhub.address import Mailbox, parse_forward_path
from relayhub.errors import RecipientRefused, SyntaxErrorReply
from relayhub.policy import AcceptancePolicy, ClientContext, CombinedDirectory


class Names:
    """A LocalDirectory over a fixed set of lower-case names."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)

    def knows(self, local_part: str) -> bool:
        return local_part in self.names


POLICY = AcceptancePolicy(
    local_domains=["Example.org", "example.net."],
    relay_domains=["eng.example.org", ".lab.example.org"],
    trusted_networks=["127.0.0.0/8", "::1/128", ipaddress.ip_network("10.0.0.0/8")],
    directory=CombinedDirectory(Names("alice", "bob"), Names("staff")),
    local_addresses=["192.0.2.25", "2001:db8::25"],
)
UNTRUSTED = ClientContext("198.51.100.7", trusted=False, authenticated=False, submission=False)
TRUSTED = ClientContext("10.1.2.3", trusted=True, authenticated=False, submission=False)
AUTHED = ClientContext("198.51.100.7", trusted=False, authenticated=True, submission=True)
SUBMISSION_TRUSTED = ClientContext("10.1.2.3", trusted=True, authenticated=False, submission=True)
SUBMISSION_ANON = ClientContext("198.51.100.7", trusted=False, authenticated=False, submission=True)


def check(address: str, client: ClientContext, *, utf8: bool = False) -> Mailbox:
    return POLICY.check_recipient(parse_forward_path(address, utf8=utf8), client)


def refusal(address: str, client: ClientContext) -> tuple[int, str, str]:
    with pytest.raises(RecipientRefused) as exc:
        check(address, client)
    return exc.value.code, exc.value.status, exc.value.text


@pytest.mark.parametrize(
    ("ip", "trusted"),
    [
        ("127.0.0.1", True),
        ("10.255.0.1", True),
        ("::1", True),
        ("::ffff:10.0.0.1", True),
        ("::ffff:127.0.0.1", True),
        ("11.0.0.1", False),
        ("::2", False),
        ("::ffff:11.0.0.1", False),
        ("unix", False),
        ("", False),
    ],
)
def test_is_trusted(ip: str, trusted: bool) -> None:
    assert POLICY.is_trusted(ip) is trusted


@pytest.mark.parametrize(
    ("domain", "kind"),
    [
        ("example.org", "local"),
        ("EXAMPLE.ORG", "local"),
        ("example.org.", "local"),
        ("example.net", "local"),
        ("sub.example.org", "remote"),  # local domains are exact names
        ("eng.example.org", "relay"),
        ("Eng.Example.Org", "relay"),
        ("x.eng.example.org", "remote"),  # exact relay names are exact
        ("lab.example.org", "remote"),  # ".suffix" is sub-domains only
        ("a.lab.example.org", "relay"),
        ("a.b.LAB.example.org", "relay"),
        ("xlab.example.org", "remote"),
        ("example.com", "remote"),
        ("[192.0.2.25]", "local"),
        ("[IPv6:2001:db8::25]", "local"),
        ("[192.0.2.26]", "remote"),
        ("[127.0.0.1]", "remote"),
    ],
)
def test_classify_domain(domain: str, kind: str) -> None:
    assert POLICY.classify_domain(domain) == kind


def test_local_recipients() -> None:
    assert check("<alice@example.org>", UNTRUSTED) == Mailbox("alice", "example.org")
    assert check("<ALICE@Example.NET>", UNTRUSTED) == Mailbox("ALICE", "example.net")
    assert check('<"alice"@example.org>', UNTRUSTED) == Mailbox('"alice"', "example.org")
    assert check("<staff@example.org>", UNTRUSTED) == Mailbox("staff", "example.org")
    assert check("<bob@[192.0.2.25]>", UNTRUSTED) == Mailbox("bob", "[192.0.2.25]")
    assert check("<PostMaster@example.net>", UNTRUSTED) == Mailbox("PostMaster", "example.net")
    assert check("<Postmaster>", UNTRUSTED) == Mailbox("postmaster", "example.org")


def test_unknown_local_user() -> None:
    for client in (UNTRUSTED, TRUSTED, AUTHED):
        assert refusal("<carol@example.org>", client) == (
            550,
            "5.1.1",
            "<carol@example.org>: Recipient address rejected: User unknown",
        )


def test_relay_domain_accepted_from_anyone() -> None:
    assert check("<x@eng.example.org>", UNTRUSTED) == Mailbox("x", "eng.example.org")
    assert check("<x@a.lab.example.org>", UNTRUSTED) == Mailbox("x", "a.lab.example.org")


def test_remote_needs_trust_or_auth() -> None:
    assert refusal("<x@example.com>", UNTRUSTED) == (
        554,
        "5.7.1",
        "<x@example.com>: Relay access denied",
    )
    assert refusal("<x@[192.0.2.26]>", UNTRUSTED)[:2] == (554, "5.7.1")
    assert check("<x@example.com>", TRUSTED) == Mailbox("x", "example.com")
    assert check("<x@example.com>", AUTHED) == Mailbox("x", "example.com")
    # A trusted client's source route is ignored, the mailbox delivered to (RFC 5321 §3.6.1).
    assert check("<@a.example:x@example.com>", TRUSTED) == Mailbox("x", "example.com")


def test_submission_requires_auth_for_everything() -> None:
    for client in (SUBMISSION_TRUSTED, SUBMISSION_ANON):
        for address in ("<x@example.com>", "<alice@example.org>", "<Postmaster>"):
            assert refusal(address, client) == (530, "5.7.0", "Authentication required")
    assert check("<alice@example.org>", AUTHED) == Mailbox("alice", "example.org")


def test_no_local_domains_postmaster() -> None:
    policy = AcceptancePolicy([], [], [], Names())
    with pytest.raises(RecipientRefused) as exc:
        policy.check_recipient(parse_forward_path("<Postmaster>", utf8=False), UNTRUSTED)
    assert exc.value.code == 550


# Every way of naming a destination that the domain check does not see. Each targets one of
# our own domains (local or relay), so only trick detection stands between it and relaying.
RELAY_TRICKS = [
    "<alice%example.com@example.org>",
    "<alice%example.com@example.org.>",  # percent hack, trailing root dot
    "<ALICE%EXAMPLE.COM@EXAMPLE.ORG>",
    "<alice%example.com%example.net@example.org>",
    "<alice%example.com@[192.0.2.25]>",
    "<example.com!alice@example.org>",
    "<EXAMPLE.COM!Alice@Example.Net>",
    "<a!b!alice@example.org>",
    '<"alice@example.com"@example.org>',
    '<"alice@example.com"@Example.ORG.>',
    '<"alice\\@example.com"@example.org>',
    '<"alice%example.com"@example.org>',
    '<"example.com!alice"@example.org>',
    "<@example.com:alice@example.org>",
    "<@example.org,@example.com:alice@example.org>",
    "<@EXAMPLE.COM:ALICE@EXAMPLE.ORG>",
    "<alice%example.com@eng.example.org>",
    "<example.com!alice@x.lab.example.org>",
    '<"alice@example.com"@eng.example.org>',
    "<@example.com:alice@eng.example.org>",
    "<postmaster%example.com@example.org>",
    "<alice%192.0.2.1@example.org>",
]


@pytest.mark.parametrize("address", RELAY_TRICKS)
def test_relay_tricks_refused_from_untrusted(address: str) -> None:
    with pytest.raises(RecipientRefused) as exc:
        check(address, UNTRUSTED)
    assert (exc.value.code, exc.value.status) == (554, "5.7.1")
    assert exc.value.text.endswith(": Relay access denied")


@pytest.mark.parametrize(
    "address",
    [
        "<alice@example.com%example.org@example.net>",
        "<alice%example.com.@example.org>",
        "<alice%[192.0.2.1]@example.org>",
        "<@[192.0.2.1]:alice@example.org>",
        "<alice@example.com@example.org>",
    ],
)
def test_unparseable_tricks_stop_at_the_parser(address: str) -> None:
    with pytest.raises(SyntaxErrorReply) as exc:
        parse_forward_path(address, utf8=False)
    assert exc.value.code == 501


@pytest.mark.parametrize("client", [TRUSTED, AUTHED], ids=["trusted", "authenticated"])
def test_ordinary_recipients_accepted(client: ClientContext) -> None:
    for address in ("<alice@example.org>", "<x@eng.example.org>", "<x@example.com>"):
        assert str(check(address, client)) == address[1:-1]


def test_trusted_client_trick_to_local_domain_is_just_unknown() -> None:
    # We do not implement the percent hack, so for a trusted client it is an unknown user.
    assert refusal("<alice%example.com@example.org>", TRUSTED)[:2] == (550, "5.1.1")
