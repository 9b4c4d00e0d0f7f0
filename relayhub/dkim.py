"""DKIM signing (RFC 6376 with rsa-sha256; ed25519-sha256 of RFC 8463): private keys, which
key signs a message, and the DKIM-Signature field for a stored message.

Everything but `Signing` and `signing_commit` is pure and socket-free. The field is laid
out and folded by dkimpy, and canonicalized as dkimpy does it (the tests check every
signature with dkimpy's verifier), but hashed here: dkimpy's own path takes the whole
message in memory and costs ~0.2 ms of regular expressions for a 4 KB message, and its RSA
is pure Python (6.6 ms per 2048-bit signature with the GIL held). The private-key operation
is OpenSSL's through `cryptography` for RSA (0.3 ms for 2048 bits) and libsodium's through
PyNaCl for Ed25519 (0.02 ms). The body is hashed as it streams to the queue, so a 30 MB
message is never held in memory and never read back.

Signing happens once, at acceptance, before the 250 (`MessageSigning`): the field is put
in front of the stored body (`IncomingMessage.prepend`) as part of its commit, so every
delivery and every retry carries the same signature, as it carries our Received: field.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import dkim
import nacl.signing
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayhub import maillog

if TYPE_CHECKING:
    from relayhub.policy import ClientContext
    from relayhub.queue.store import IncomingMessage

T = TypeVar("T")

MIN_RSA_BITS = 2048  # RFC 8301 §3.2: 1024 is the floor; large receivers now want 2048
# The header fields signed by default: RFC 6376 §5.4.1's list, as OpenDKIM and dkimpy sign
# them, with List-Unsubscribe-Post (RFC 8058: one-click unsubscribe must be signed).
DEFAULT_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "resent-date", "resent-from", "resent-sender", "resent-to",
    "resent-cc", "resent-message-id", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post", "list-owner",
    "list-archive",
)
# Signed once more than they occur, so that none can be added later (RFC 6376 §8.15).
OVERSIGNED = frozenset({"from"})
_OVERSIGNED_BYTES = frozenset(name.encode() for name in OVERSIGNED)
# Fields that change in transit or must not be signed (RFC 6376 §5.4; dkimpy refuses them).
NEVER_SIGNED = frozenset(name.decode() for name in dkim.DKIM.SHOULD_NOT)
HEADER_LIMIT = 256 * 1024  # as relayhub.smtp.headers.HEADER_PREFIX_LIMIT: bigger is not signed
FIELD_NAME = b"DKIM-Signature"
# Relaxed body canonicalization as dkimpy's (strip_trailing_whitespace, then
# compress_whitespace), but a single space is left alone instead of being replaced by
# itself: prose has one at every word, and those substitutions were most of the cost.
_TRAILING_WSP = re.compile(rb"[ \t]+(?=\r\n)")
_WSP_RUN = re.compile(rb"[ \t]{2,}|\t")
_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext
_HEADER_NAME_BYTES = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_FIELD_START = re.compile(rb"\r\n(?![ \t])")  # a line not starting with white space
_PLAIN_FROM = re.compile(  # conservative: letters, digits and the common punctuation
    r"[ \t]*(?:(?:\"[^\"\\]*\"[ \t]*|[A-Za-z0-9 \t.'_-]*)<[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+"
    r"@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>|[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+"
    r"@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*))[ \t]*")
_SELECTOR = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}"
                       r"[a-z0-9])?)*")

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DkimKeyError(ValueError):
    """A private key file that cannot sign; the text says why (for a config error line)."""


# --------------------------------------------------------------------------- keys


def load_private_key(path: Path) -> PrivateKey:
    """The PEM private key in `path`: RSA of at least 2048 bits, or Ed25519."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DkimKeyError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise DkimKeyError(f"{str(path)!r} is encrypted; store the key without a "
                           "passphrase (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm) as error:
        why = str(error).split(". ")[0].rstrip(".")  # its first sentence; the rest is a URL
        raise DkimKeyError(f"{str(path)!r} is not a PEM private key ({why})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"{str(path)!r}: RSA key of {key.key_size} bits; at least "
                               f"{MIN_RSA_BITS} are needed (relayhubctl dkim keygen makes one)")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    kind = type(key).__name__.removesuffix("PrivateKey")
    raise DkimKeyError(f"{str(path)!r}: {kind} keys do not sign DKIM; use RSA (2048 bits or "
                       "more) or Ed25519")


def generate_key(kind: str, bits: int = MIN_RSA_BITS) -> PrivateKey:
    """A new private key: kind "rsa" (`bits`) or "ed25519"."""
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def algorithm(key: PrivateKey) -> str:
    return "ed25519-sha256" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa-sha256"


def describe(key: PrivateKey) -> str:
    """ "rsa-sha256, 2048 bits" or "ed25519-sha256"."""
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-sha256, {key.key_size} bits"
    return "ed25519-sha256"


def record_value(key: PrivateKey) -> str:
    """The DNS TXT record that publishes `key`'s public half (RFC 6376 §3.6.1, RFC 8463 §4)."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def record_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"


def zone_line(selector: str, domain: str, value: str) -> str:
    """`value` as a zone-file TXT line, in character-strings of at most 255 octets."""
    strings = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{record_name(selector, domain)}. IN TXT ( {strings} )" if len(value) > 255 else \
        f"{record_name(selector, domain)}. IN TXT {strings}"


def parse_record(text: str) -> dict[str, str]:
    """The tags of a DKIM key record (what a TXT lookup joined); ValueError if malformed."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, equals, value = part.partition("=")
        if not equals:
            raise ValueError(f"{part.strip()!r} is not a tag=value pair")
        tags[name.strip()] = re.sub(r"\s+", "", value)
    return tags


def record_matches(text: str, key: PrivateKey) -> tuple[bool, str]:
    """Whether a published record carries `key`'s public half, and why not."""
    try:
        published = parse_record(text)
    except ValueError as error:
        return False, f"malformed record: {error}"
    expected = parse_record(record_value(key))
    if published.get("v", "DKIM1") != "DKIM1":
        return False, f"v={published['v']}, not DKIM1"
    if published.get("k", "rsa") != expected["k"]:
        return False, f"k={published.get('k', 'rsa')} but the key is {expected['k']}"
    if not published.get("p"):
        return False, "p= is empty: the key is revoked"
    if published["p"] != expected["p"]:
        return False, "p= is another public key"
    return True, "matches"


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class SigningKey:
    """One configured key: a selector, the domains it signs for, and what it signs."""

    selector: str
    domains: tuple[str, ...]
    headers: tuple[str, ...]
    path: Path
    key: PrivateKey = field(repr=False, compare=False)

    # Ed25519 signs with libsodium (PyNaCl, which dkimpy uses to verify it too): 3x faster
    # than OpenSSL's Ed25519 here (23 against 76 us). Made once, with the key.
    _sodium: nacl.signing.SigningKey | None = field(init=False, repr=False, compare=False)
    # `headers` as signed_names wants them, made once rather than per message.
    wanted: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "wanted", wanted_names(self.headers))
        sodium = None
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            sodium = nacl.signing.SigningKey(self.key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption()))
        object.__setattr__(self, "_sodium", sodium)

    @property
    def algorithm(self) -> str:
        return algorithm(self.key)

    @property
    def signs_in_thread(self) -> bool:
        """RSA: OpenSSL's 0.3 ms private-key operation releases the GIL, so in a thread it
        runs beside the reactor (which otherwise spends a third of a message's time on it);
        Ed25519's 0.02 ms costs less than the thread hop."""
        return isinstance(self.key, rsa.RSAPrivateKey)

    def sign(self, digest: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 over the SHA-256 `digest`, or Ed25519 over the digest itself
        (RFC 8463 §3: ed25519-sha256 signs the hash)."""
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        assert self._sodium is not None
        return self._sodium.sign(digest).signature


@dataclass(frozen=True)
class Signer:
    """The keys of one configuration, loaded once per process."""

    keys: tuple[SigningKey, ...]

    def choose(self, domain: str) -> tuple[SigningKey, str] | None:
        """The key for mail whose From: is at `domain`, and the d= domain it signs as: the
        most specific configured domain that is `domain` or one of its parents."""
        name = domain.lower().removesuffix(".")
        best: tuple[SigningKey, str] | None = None
        for key in self.keys:
            for configured in key.domains:
                if (name == configured or name.endswith("." + configured)) and (
                        best is None or len(configured) > len(best[1])):
                    best = (key, configured)
        return best


def build_signer(entries: Iterable[tuple[str, Path, Sequence[str], Sequence[str]]]
                 ) -> Signer | None:
    """A Signer for (selector, private_key, domains, headers) entries; None for none.
    Raises DkimKeyError."""
    keys = tuple(SigningKey(selector, tuple(domains), tuple(headers), path,
                            load_private_key(path))
                 for selector, path, domains, headers in entries)
    return Signer(keys) if keys else None


def check_header_names(names: Sequence[str]) -> list[str]:
    """Problems with a `headers` list (empty when it can be used)."""
    problems = [f"{name!r} is not a header field name" for name in names
                if not _HEADER_NAME.fullmatch(name)]
    lowered = [name.lower() for name in names]
    problems += [f"{name!r} must not be signed (it changes in transit)"
                 for name in lowered if name in NEVER_SIGNED]
    if "from" not in lowered:
        problems.append('must include "from" (RFC 6376 §5.4)')
    return problems


def valid_selector(text: str) -> bool:
    return bool(_SELECTOR.fullmatch(text))


# --------------------------------------------------------------------------- signing


def _relaxed(lines: bytes) -> bytes:
    """Whole lines with trailing white space removed and runs of it made one space; the
    regular expressions run only when a plain substring search finds work for them (a
    regex scan costs ~50 ns per byte, a substring search almost nothing)."""
    if b" \r\n" in lines or b"\t\r\n" in lines:
        lines = _TRAILING_WSP.sub(b"", lines)
    if b"\t" in lines or b"  " in lines:
        lines = _WSP_RUN.sub(b" ", lines)
    return lines


class RelaxedBodyHash:
    """SHA-256 of a body under relaxed canonicalization (RFC 6376 §3.4.4), fed in chunks
    of any size; equal to hashing dkimpy's `Relaxed.canonicalize_body` of the whole."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._partial = b""  # the unfinished last line
        self._empty = 0  # empty lines seen but not yet hashed: they count only if text follows

    def update(self, data: bytes) -> None:
        data = self._partial + data
        cut = data.rfind(b"\r\n") + 2
        if cut < 2:
            self._partial = data
            return
        self._partial = data[cut:]
        self._lines(_relaxed(data[:cut]))

    def _lines(self, lines: bytes) -> None:
        end = len(lines)
        while end >= 2 and lines.endswith(b"\r\n", 0, end) and (
                end == 2 or lines.endswith(b"\r\n", 0, end - 2)):
            end -= 2
        if end == 0:
            self._empty += len(lines) // 2
            return
        self._hash.update(b"\r\n" * self._empty)
        self._hash.update(lines[:end])
        self._empty = (len(lines) - end) // 2

    def digest(self) -> bytes:
        if self._partial:
            # As dkimpy: an unended last line is compressed but keeps its trailing space.
            # (Never the case here: a stored body ends with CRLF.)
            self._lines(_WSP_RUN.sub(b" ", self._partial) + b"\r\n")
            self._partial = b""
        return self._hash.digest()


@dataclass(frozen=True)
class Signature:
    """A field to put in front of the message (None: not signed, `reason` says why)."""

    field: bytes | None
    reason: str
    selector: str = ""
    domain: str = ""


def from_domain(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The domain of the one From: field's address; None if there is not exactly one."""
    values = [value for name, value in headers if name.lower() == b"from"]
    if len(values) != 1:
        return None
    text = re.sub(r"\r?\n", "", values[0].decode("utf-8", "surrogateescape"))
    # The usual shapes (`Name <a@b>`, `"Name" <a@b>`, `a@b`) without the RFC 5322 parser,
    # which costs more than the signature itself; anything else goes to the parser.
    plain = _PLAIN_FROM.fullmatch(text)
    if plain is not None:
        return (plain.group(1) or plain.group(2)).lower()
    addresses = [address for _name, address in getaddresses([text]) if "@" in address]
    return addresses[0].rpartition("@")[2].lower() if addresses else None


def parse_header(header: bytes) -> list[tuple[bytes, bytes]] | None:
    """(name, value) of each field of a header section (CRLF line ends, ending with the
    CRLF of its last field); a value keeps its folding and its final CRLF, as dkimpy's
    rfc822_parse gives it. None when a line is neither a field nor a continuation."""
    fields = []
    for text in _FIELD_START.split(header[:-2]) if header else ():
        name, colon, value = text.partition(b":")
        if not colon or not _HEADER_NAME_BYTES.fullmatch(name):
            return None
        fields.append((name, value + b"\r\n"))
    return fields


def relaxed_field(name: bytes, value: bytes) -> bytes:
    """A field in relaxed header canonicalization (RFC 6376 §3.4.2), as dkimpy's
    Relaxed.canonicalize_headers: name lower-cased, value unfolded, white space runs made
    one space, and none around the colon or at the end; without the final CRLF."""
    value = value.replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return name.lower().rstrip() + b":" + value.strip()


def signed_names(headers: Sequence[tuple[bytes, bytes]], wanted: Iterable[str] | frozenset[bytes]
                 ) -> list[bytes]:
    """The h= list: each wanted field as often as it occurs, oversigned ones once more."""
    chosen = wanted if isinstance(wanted, frozenset) else wanted_names(wanted)
    present = [lowered for name, _value in headers if (lowered := name.lower()) in chosen]
    return present + [name for name in present if name in _OVERSIGNED_BYTES]


def wanted_names(headers: Iterable[str]) -> frozenset[bytes]:
    """Configured header names as signed_names compares them."""
    return frozenset(name.lower().encode() for name in headers)


def header_hash_input(headers: Sequence[tuple[bytes, bytes]], names: Sequence[bytes],
                      unsigned: bytes) -> bytes:
    """What the signature covers: the fields named in h=, each instance taken from the
    bottom up (RFC 6376 §5.4.2; a name listed more often than present adds nothing), then
    the DKIM-Signature field itself with an empty b= and no final CRLF (§3.7)."""
    remaining: dict[bytes, list[bytes]] = {}
    listed = set(names)
    for name, value in headers:
        lowered = name.lower()
        if lowered in listed:
            remaining.setdefault(lowered, []).append(relaxed_field(name, value))
    lines = [remaining[n].pop() for n in names if remaining.get(n)]
    lines.append(relaxed_field(FIELD_NAME, b" " + unsigned))
    return b"\r\n".join(lines)


def signature_field(key: SigningKey, domain: str, headers: Sequence[tuple[bytes, bytes]],
                    body_hash: bytes, now: float) -> bytes:
    """The folded DKIM-Signature field (with its CRLF) over `headers` and the body hash,
    laid out as dkimpy's DKIM.gen_header lays it out."""
    names = signed_names(headers, key.wanted)
    fields = [
        (b"v", b"1"), (b"a", key.algorithm.encode()), (b"c", b"relaxed/relaxed"),
        (b"d", domain.encode()), (b"s", key.selector.encode()),
        (b"t", str(int(now)).encode()), (b"h", b" : ".join(names)),
        (b"bh", base64.b64encode(body_hash)), (b"b", b""),
    ]
    namelen = len(FIELD_NAME)
    unsigned = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=namelen)
    digest = hashlib.sha256(header_hash_input(headers, names, unsigned)).digest()
    fields[-1] = (b"b", base64.b64encode(key.sign(digest)))
    value: bytes = dkim.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n",
                             namelen=namelen)
    return FIELD_NAME + b": " + value


class MessageSigning:
    """Signs one message while it is received, from the bytes on their way to the queue
    (after masquerading, without our Received: field): the header section is kept, the body
    hashed as it streams by, and `finish` makes the field at the end of DATA. Nothing is
    read back from disk or rewritten there.

    It runs on the reactor: the hashing costs about what copying the bytes does, and
    Ed25519's private-key operation (0.02 ms) less than a thread hop would; RSA's (0.3 ms)
    goes to a thread (`SigningKey.signs_in_thread`). It never raises: a failure leaves the
    message unsigned (queued, not refused: a 451 for a bug in signing would hold every
    sender's mail back until it is fixed, while some receivers may only junk an unsigned
    message), and `report` logs it."""

    def __init__(self, signer: Signer, write: Callable[[bytes], None]) -> None:
        self._signer = signer
        self._write = write
        self._head = bytearray()  # the start of the message, until its header section ends
        self._headers: list[tuple[bytes, bytes]] = []
        self._chosen: tuple[SigningKey, str] | None = None
        self._body: RelaxedBodyHash | None = None  # while a signature is being made
        self.outcome: Signature | None = None  # once decided
        self.failure: Failure | None = None

    def write(self, data: bytes) -> None:
        """Pass `data` on to the queue, and take it in."""
        self._write(data)
        if self._body is not None:
            self._body.update(data)
        elif self.outcome is None:
            self._collect(data)

    def _collect(self, data: bytes) -> None:
        start = max(0, len(self._head) - 3)  # a blank line may begin in what was held
        self._head += data
        end = self._head.find(b"\r\n\r\n", start)
        if self._head.startswith(b"\r\n"):
            self._decide(Signature(None, "no header fields"))
        elif end >= 0 and end + 2 <= HEADER_LIMIT:
            head = bytes(self._head)
            self._begin(head[:end + 2], head[end + 4:])
        elif end >= 0 or len(self._head) > HEADER_LIMIT:
            self._decide(Signature(None, f"no end of the header section in {HEADER_LIMIT} "
                                         "bytes"))

    def _decide(self, outcome: Signature) -> None:
        self.outcome, self._head, self._body = outcome, bytearray(), None

    def _begin(self, header: bytes, body: bytes) -> None:
        """The header section is complete: choose the key, start hashing the body."""
        self._head = bytearray()
        try:
            headers = parse_header(header)
            domain = None if headers is None else from_domain(headers)
            chosen = None if domain is None else self._signer.choose(domain)
            if headers is None:
                self._decide(Signature(None, "malformed header section"))
            elif domain is None:
                self._decide(Signature(None, "no single From: address"))
            elif chosen is None:
                self._decide(Signature(None, f"no key for From: domain {domain}"))
            else:
                self._headers, self._chosen = headers, chosen
                self._body = RelaxedBodyHash()
                self._body.update(body)
        except Exception:
            self.failure = Failure()
            self._decide(Signature(None, "failed"))

    def finish(self, now: float) -> Deferred[bytes]:
        """The data has ended: the DKIM-Signature field to put in front of the message, or
        b"" (`outcome` says why); never fails."""
        make = self._field_maker(now)
        if make is None:
            return succeed(b"")
        key, _domain = self._chosen or (None, "")
        made = deferToThread(make) if key is not None and key.signs_in_thread else maybeDeferred(
            make)
        return made.addCallbacks(self._signed, self._failed)

    def finish_here(self, now: float) -> bytes:
        """`finish`, with the private-key operation on this thread (blocking)."""
        make = self._field_maker(now)
        if make is None:
            return b""
        try:
            return self._signed(make())
        except Exception:
            return self._failed(Failure())

    def _field_maker(self, now: float) -> Callable[[], bytes] | None:
        """What makes the field (None: nothing to sign), fed with everything received."""
        if self.outcome is None and self._body is None:
            # All header fields, no body: the section ends where the message does.
            head = bytes(self._head)
            self._begin(head if head.endswith(b"\r\n") else head + b"\r\n", b"")
        if self.outcome is not None or self._body is None or self._chosen is None:
            return None
        key, domain = self._chosen
        return partial(signature_field, key, domain, self._headers, self._body.digest(), now)

    def _signed(self, field_bytes: bytes) -> bytes:
        assert self._chosen is not None
        key, domain = self._chosen
        self._decide(Signature(field_bytes, "signed", key.selector, domain))
        return field_bytes

    def _failed(self, failure: Failure) -> bytes:
        self.failure = failure
        self._decide(Signature(None, "failed"))
        return b""

    def report(self, queue_id: str, log: Logger = maillog.SMTPD) -> None:
        """Log what signing did (once the message is queued)."""
        outcome = self.outcome
        if self.failure is not None:
            log.failure(maillog.DKIM_FAILED, self.failure, queue_id=queue_id)
        elif outcome is not None and outcome.field is not None:
            log.info(maillog.DKIM_SIGNED, queue_id=queue_id, selector=outcome.selector,
                     domain=outcome.domain)
        elif outcome is not None:
            log.debug(maillog.DKIM_SKIPPED, queue_id=queue_id, reason=outcome.reason)


def sign_message(signer: Signer, message: bytes, now: float) -> Signature:
    """The signature of a whole message held in memory (what MessageSigning makes of it)."""
    signing = MessageSigning(signer, lambda data: None)
    signing.write(message)
    signing.finish_here(now)
    assert signing.outcome is not None
    return signing.outcome


def start_signing(signer: Signer | None, client: ClientContext | None,
                  write: Callable[[bytes], None]) -> MessageSigning | None:
    """For the start of DATA: a MessageSigning in front of `write` when `signer` has keys and
    the client is trusted or authenticated (mail relayed in from outside never is)."""
    if signer is None or client is None or not (client.trusted or client.authenticated):
        return None
    return MessageSigning(signer, write)


def signed_commit(signing: MessageSigning | None, incoming: IncomingMessage, now: float,
                  commit: Callable[[], Deferred[None]], log: Logger = maillog.SMTPD
                  ) -> Deferred[None]:
    """For the end of DATA: put the signature in front of `incoming`, then `commit` it (the
    report of what signing did follows once the message is queued)."""
    if signing is None:
        return commit()

    def then_commit(field_bytes: bytes) -> Deferred[None]:
        if field_bytes:
            try:
                incoming.prepend(field_bytes)
            except NotImplementedError:  # a queue that cannot (relayhub-sendmail -bs)
                signing.failure = Failure()
        return commit().addCallback(report)

    def report(result: T) -> T:
        signing.report(incoming.queue_id, log)
        return result

    return signing.finish(now).addCallback(then_commit)
