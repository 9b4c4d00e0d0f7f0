"""Tests for relayhub.dkim: key loading, key choice by domain, streaming body
canonicalization, the signature field (checked with dkimpy's own verifier), the [dkim]
configuration errors, and signing a message in the SQLite store before its commit."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from dkim.canonicalization import Relaxed
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from relayhub import dkim as rdkim
from relayhub.config import ConfigError, settings_from_text
from relayhub.policy import ClientContext
from relayhub.queue import spool
from relayhub.queue.sqlite import SQLiteQueueStore
from relayhub.queue.store import Envelope, RecipientRequest

ENVELOPE = Envelope(sender="alice@example.org", recipients=(RecipientRequest("b@example.com"),))
TRUSTED = ClientContext(address="10.0.0.1", trusted=True, authenticated=False)

MESSAGE = (
    b"Received: from client.test (client.test [127.0.0.1])\r\n\tby hub.test (relayhub)\r\n"
    b"From: Alice <alice@mail.example.org>\r\nTo: bob@example.com\r\n"
    b"Subject: hello\r\n  folded subject\r\nDate: Thu, 3 Dec 2026 12:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n\r\n"
    b"Hello  Bob,\t \r\n\r\nsee you\r\n\r\n\r\n"
)


def write_key(path: Path, kind: str, bits: int = 2048) -> Path:
    path.write_bytes(rdkim.private_pem(rdkim.generate_key(kind, bits)))
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("keys")
    return {kind: write_key(tmp / f"{kind}.pem", kind) for kind in ("rsa", "ed25519")}


def signer_for(path: Path, domains: tuple[str, ...] = ("example.org",),
               selector: str = "s1") -> rdkim.Signer:
    signer = rdkim.build_signer([(selector, path, domains, rdkim.DEFAULT_HEADERS)])
    assert signer is not None
    return signer


def dns_for(selector: str, domain: str, key: rdkim.PrivateKey):  # type: ignore[no-untyped-def]
    record = rdkim.record_value(key).encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"{selector}._domainkey.{domain}.".encode()
        return record

    return dnsfunc


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_signature_verifies_with_dkimpy(keys: dict[str, Path], kind: str) -> None:
    signer = signer_for(keys[kind])
    signature = rdkim.sign_message(signer, MESSAGE, now=1_790_000_000)
    assert signature.field is not None, signature.reason
    assert (signature.selector, signature.domain) == ("s1", "example.org")
    signed = signature.field + MESSAGE
    tags = dkim.util.parse_tag_value(signature.field.split(b":", 1)[1])
    assert tags[b"a"] == rdkim.algorithm(signer.keys[0].key).encode()
    assert tags[b"c"] == b"relaxed/relaxed" and tags[b"d"] == b"example.org"
    assert tags[b"h"].replace(b" ", b"").split(b":") == [
        b"from", b"to", b"subject", b"date", b"message-id", b"from"]  # From oversigned
    assert dkim.verify(signed, dnsfunc=dns_for("s1", "example.org", signer.keys[0].key))
    # Relaxed canonicalization: re-folding and trailing blank lines do not matter ...
    assert dkim.verify(signed.replace(b"Hello  Bob", b"Hello Bob") + b"\r\n",
                       dnsfunc=dns_for("s1", "example.org", signer.keys[0].key))
    # ... but a changed body, or an added From:, does.
    assert not dkim.verify(signed.replace(b"see you", b"see me"),
                           dnsfunc=dns_for("s1", "example.org", signer.keys[0].key))
    assert not dkim.verify(signed.replace(b"To:", b"From: eve@evil.test\r\nTo:"),
                           dnsfunc=dns_for("s1", "example.org", signer.keys[0].key))


def test_most_specific_domain_chooses(keys: dict[str, Path]) -> None:
    signer = rdkim.build_signer([
        ("org", keys["rsa"], ("example.org",), rdkim.DEFAULT_HEADERS),
        ("sales", keys["ed25519"], ("sales.example.org", "example.net"), ("from",)),
    ])
    assert signer is not None
    assert signer.choose("example.org")[0].selector == "org"  # type: ignore[index]
    assert signer.choose("eu.Sales.Example.org.") == (signer.keys[1], "sales.example.org")
    assert signer.choose("mail.example.org") == (signer.keys[0], "example.org")
    assert signer.choose("example.net") == (signer.keys[1], "example.net")
    assert signer.choose("notexample.org") is None
    assert signer.choose("example.org.evil.test") is None


@pytest.mark.parametrize(("header", "expected"), [
    (b"From: a@x.example\r\n", "x.example"),
    (b'From: "Doe, J" <j@Y.Example>\r\n', "y.example"),
    (b"From: a@x.example\r\nFrom: b@x.example\r\n", None),  # two From: fields
    (b"To: a@x.example\r\n", None),
    (b"From: undisclosed\r\n", None),
])
def test_from_domain(header: bytes, expected: str | None) -> None:
    headers = [(bytes(n), bytes(v)) for n, v in dkim.rfc822_parse(header + b"\r\n")[0]]
    assert rdkim.from_domain(headers) == expected


FROM_TOKENS = st.sampled_from(["a", "b.example", "@", "<", ">", '"', " ", ",", "(", ")",
                                "Sales", ":", ";", "\\", "\t", "x@y.example", "."])


@given(st.lists(FROM_TOKENS, max_size=12).map("".join))
def test_from_domain_fast_path_agrees_with_the_rfc5322_parser(value: str) -> None:
    """The shortcut for the usual From: shapes gives what email.utils' parser gives."""
    parsed = [a for _n, a in getaddresses([value]) if "@" in a]
    expected = parsed[0].rpartition("@")[2].lower() if parsed else None
    plain = rdkim._PLAIN_FROM.fullmatch(value)
    if plain is not None:
        assert (plain.group(1) or plain.group(2)).lower() == expected
    assert rdkim.from_domain([(b"From", value.encode() + b"\r\n")]) == expected


def test_not_signed_without_a_key_for_the_domain(keys: dict[str, Path]) -> None:
    signature = rdkim.sign_message(signer_for(keys["rsa"], ("other.test",)), MESSAGE, 0)
    assert signature.field is None and "mail.example.org" in signature.reason


@given(cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12))
def test_signing_while_receiving_is_chunking_blind(keys: dict[str, Path], cuts: list[int]) -> None:
    """Fed in pieces of any size (a header section split anywhere, even inside its blank
    line), the streaming signer passes every byte on and makes the same field (Ed25519
    signatures are deterministic) as for the whole message at once."""
    signer = signer_for(keys["ed25519"])
    passed: list[bytes] = []
    signing = rdkim.MessageSigning(signer, passed.append)
    position = 0
    for cut in cuts:
        signing.write(MESSAGE[position:position + cut])
        position += cut
    signing.write(MESSAGE[position:])
    assert b"".join(passed) == MESSAGE
    assert signing.finish_here(1_790_000_000) == rdkim.sign_message(signer, MESSAGE,
                                                               1_790_000_000).field


def test_a_message_of_header_fields_only_is_signed(keys: dict[str, Path]) -> None:
    signer = signer_for(keys["ed25519"])
    header_only = MESSAGE[:MESSAGE.index(b"\r\n\r\n") + 2]
    signature = rdkim.sign_message(signer, header_only, 1_790_000_000)
    assert signature.field is not None
    assert dkim.verify(signature.field + header_only,
                       dnsfunc=dns_for("s1", "example.org", signer.keys[0].key))


@pytest.mark.parametrize(("message", "reason"), [
    (b"\r\nno header at all\r\n", "no header fields"),
    (b"From: a@example.org\r\nnot a field\r\n\r\nbody\r\n", "malformed header section"),
    (b"X-Long: " + b"a" * rdkim.HEADER_LIMIT + b"\r\nFrom: a@example.org\r\n\r\nbody\r\n",
     "no end of the header section"),
])
def test_messages_that_are_not_signed_say_why(keys: dict[str, Path], message: bytes,
                                              reason: str) -> None:
    signature = rdkim.sign_message(signer_for(keys["ed25519"]), message, 0)
    assert signature.field is None and signature.reason.startswith(reason)


BODY_LINES = st.lists(st.sampled_from(
    [b"", b" ", b"\t", b"a", b"a  b", b"x\t \t", b"  lead", b"tr  "]), max_size=12)


@given(lines=BODY_LINES, tail=st.sampled_from([b"", b"end", b"end  "]),
       cuts=st.lists(st.integers(min_value=1, max_value=7), max_size=8))
def test_streaming_body_hash_is_dkimpys(lines: list[bytes], tail: bytes, cuts: list[int]) -> None:
    body = b"".join(line + b"\r\n" for line in lines) + tail
    expected = hashlib.sha256(Relaxed.canonicalize_body(body)).digest()
    hasher = rdkim.RelaxedBodyHash()
    position = 0
    for cut in cuts:  # chunks of arbitrary sizes, CRLF split between two of them too
        hasher.update(body[position:position + cut])
        position += cut
    hasher.update(body[position:])
    assert hasher.digest() == expected


FIELD_TEXT = st.lists(st.sampled_from([b"a", b"B c", b" ", b"\t", b"  x  ", b"\r\n ", b"\r\n\t",
                                       b"<a@b>", b";"]), max_size=8).map(b"".join)


@given(fields=st.lists(st.tuples(st.sampled_from([b"From", b"subject", b"X-Y"]),
                                 FIELD_TEXT), min_size=1, max_size=5))
def test_header_parsing_and_canonicalization_are_dkimpys(
        fields: list[tuple[bytes, bytes]]) -> None:
    header = b"".join(name + b":" + value.lstrip(b"\r\n") + b"\r\n" for name, value in fields)
    expected = [(bytes(n), bytes(v)) for n, v in dkim.rfc822_parse(header + b"\r\n")[0]]
    parsed = rdkim.parse_header(header)
    assert parsed == expected
    assert [rdkim.relaxed_field(n, v) + b"\r\n" for n, v in parsed] == [
        n + b":" + v for n, v in Relaxed.canonicalize_headers(expected)]


@pytest.mark.parametrize("size", [0, 10, 3000])
def test_insert_front_moves_content_up(tmp_path: Path, size: int) -> None:
    path = tmp_path / "body"
    content = bytes(range(256)) * (size // 256 + 1)
    path.write_bytes(content[:size])
    with open(path, "r+b") as file:
        spool.insert_front(file, b"DKIM-Signature: x\r\n", chunk=1000)
    assert path.read_bytes() == b"DKIM-Signature: x\r\n" + content[:size]


def test_zone_line_splits_long_values(keys: dict[str, Path]) -> None:
    key = rdkim.load_private_key(keys["rsa"])
    value = rdkim.record_value(key)
    line = rdkim.zone_line("s1", "example.org", value)
    assert line.startswith('s1._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')
    strings = line.split('"')[1::2]
    assert all(len(s) <= 255 for s in strings) and "".join(strings) == value
    assert rdkim.record_matches("".join(strings), key) == (True, "matches")
    other = rdkim.record_value(rdkim.generate_key("ed25519"))
    assert rdkim.record_matches(other, key)[0] is False


# --------------------------------------------------------------------------- configuration


def config_problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        settings_from_text("hub.toml", text)
    return raised.value.problems


def test_small_rsa_key_is_a_config_error(tmp_path: Path) -> None:
    small = write_key(tmp_path / "small.pem", "rsa", 1024)
    [problem] = config_problems(
        f'[dkim]\nselector = "s1"\nprivate_key = "{small}"\ndomains = ["example.org"]\n')
    assert problem.startswith("hub.toml: dkim.private_key: ")
    assert "1024 bits" in problem and "2048" in problem


def test_unusable_key_files_are_config_errors(tmp_path: Path, keys: dict[str, Path]) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    (tmp_path / "ec.pem").write_bytes(ec_key)
    (tmp_path / "public.pem").write_bytes(
        rsa.generate_private_key(65537, 2048).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    problems = config_problems(
        f'[dkim]\nselector = "s1"\nprivate_key = "{tmp_path / "missing.pem"}"\n'
        f'domains = ["example.org"]\n'
        f'[[dkim.key]]\nselector = "s2"\nprivate_key = "{tmp_path / "ec.pem"}"\n'
        f'domains = ["example.net"]\n'
        f'[[dkim.key]]\nselector = "s3"\nprivate_key = "{tmp_path / "public.pem"}"\n'
        f'domains = ["example.com"]\nheaders = ["subject"]\n')
    assert len(problems) == 4, problems
    assert any(p.startswith("hub.toml: dkim.private_key: cannot read") for p in problems)
    assert any(p.startswith("hub.toml: dkim.key[0].private_key: ") and "Ed25519" in p
               for p in problems)
    assert any(p.startswith("hub.toml: dkim.key[1].private_key: ") and "not a PEM private key"
               in p for p in problems)
    assert any(p.startswith("hub.toml: dkim.key[1].headers: ") and '"from"' in p
               for p in problems)


def test_half_a_dkim_section_is_an_error(keys: dict[str, Path]) -> None:
    [problem] = config_problems('[dkim]\nselector = "s1"\n')
    assert problem == "hub.toml: dkim.selector: is set but dkim.private_key is not"
    [problem] = config_problems(f'[dkim]\nselector = "s1"\nprivate_key = "{keys["rsa"]}"\n')
    assert problem.startswith("hub.toml: dkim.domains: ")


def test_dkim_settings_entries(keys: dict[str, Path]) -> None:
    settings = settings_from_text("hub.toml", (
        f'[dkim]\nselector = "S1"\nprivate_key = "{keys["rsa"]}"\ndomains = ["example.org"]\n'
        f'[[dkim.key]]\nselector = "ed"\nprivate_key = "{keys["ed25519"]}"\n'
        f'domains = ["example.net"]\nheaders = ["From", "Subject"]\n'))
    [own, extra] = settings.dkim.entries()
    assert own == ("s1", keys["rsa"], ("example.org",), rdkim.DEFAULT_HEADERS)
    assert extra == ("ed", keys["ed25519"], ("example.net",), ("from", "subject"))
    assert settings_from_text("hub.toml", "").dkim.entries() == []


# --------------------------------------------------------------------------- with the store


class BrokenKey(rdkim.SigningKey):
    def sign(self, digest: bytes) -> bytes:
        raise RuntimeError("the HSM is on fire")


def receive_signed(reactor_thread: Any, store: SQLiteQueueStore, signer: rdkim.Signer,
                   body: bytes, client: ClientContext = TRUSTED) -> str:
    """On the reactor, as the SMTP server's end of DATA: write `body` (in 1000-byte chunks),
    commit with signing; the queue ID once the signing has been reported."""

    def run() -> Deferred[str]:
        incoming = store.incoming()
        signing = rdkim.start_signing(signer, client, incoming.write)
        write = incoming.write if signing is None else signing.write
        for start in range(0, len(body), 1000):
            write(body[start:start + 1000])
        committed = rdkim.signed_commit(signing, incoming, reactor_thread.reactor.seconds(),
                                        lambda: incoming.commit(ENVELOPE))
        return committed.addCallback(lambda _: incoming.queue_id)

    return reactor_thread.run(run)  # type: ignore[no-any-return]


@pytest.fixture
def store(reactor_thread: Any, tmp_path: Path) -> Iterator[SQLiteQueueStore]:
    s = SQLiteQueueStore(tmp_path)
    reactor_thread.run(s.open)
    yield s
    reactor_thread.run(s.close)


@pytest.mark.parametrize("lines", [10, 100_000])  # 2.4 MB: beyond one chunk and one buffer
def test_signature_is_stored_in_front_of_the_body(reactor_thread: Any, store: SQLiteQueueStore,
                                                  keys: dict[str, Path], lines: int) -> None:
    signer = signer_for(keys["ed25519"])
    body = MESSAGE + b"more text  \r\n" * lines
    queue_id = receive_signed(reactor_thread, store, signer, body)
    stored = Path(store.body_path(queue_id)).read_bytes()
    assert stored.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256;") and stored.endswith(body)
    [message] = reactor_thread.run(store.list_messages)
    assert message.size == len(stored)
    assert dkim.verify(stored, dnsfunc=dns_for("s1", "example.org", signer.keys[0].key))


def test_a_signing_failure_queues_the_message_unsigned(reactor_thread: Any,
                                                      store: SQLiteQueueStore,
                                                      keys: dict[str, Path]) -> None:
    good = signer_for(keys["rsa"]).keys[0]
    broken = rdkim.Signer((BrokenKey(good.selector, good.domains, good.headers, good.path,
                                     good.key),))
    queue_id = receive_signed(reactor_thread, store, broken, MESSAGE)
    assert Path(store.body_path(queue_id)).read_bytes() == MESSAGE


def test_only_trusted_or_authenticated_clients_are_signed(
        reactor_thread: Any, store: SQLiteQueueStore, keys: dict[str, Path]) -> None:
    signer = signer_for(keys["ed25519"])
    outside = ClientContext(address="192.0.2.9", trusted=False, authenticated=False)
    unsigned = receive_signed(reactor_thread, store, signer, MESSAGE, outside)
    assert Path(store.body_path(unsigned)).read_bytes() == MESSAGE
    user = ClientContext(address="192.0.2.9", trusted=False, authenticated=True)
    signed = receive_signed(reactor_thread, store, signer, MESSAGE, user)
    assert Path(store.body_path(signed)).read_bytes().startswith(b"DKIM-Signature: ")
