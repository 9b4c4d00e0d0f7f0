"""DKIM signing (RFC 6376 with rsa-sha256; ed25519-sha256 of RFC 8463): private keys, which
key signs a message, and the DKIM-Signature field for a stored message.

Everything but `Signing` and `signing_commit` is pure and socket-free. The field is laid
out and folded by dkimpy, and canonicalized as dkimpy does it (the tests check every
signature with dkimpy's verifier), but hashed here: dkimpy's own path takes the whole
message in memory and costs ~0.2 ms of regular expressions for a 4 KB message, and its RSA
is pure Python (6.6 ms per 2048-bit signature with the GIL held). The private-key operation
is OpenSSL's through `cryptography` for RSA (0.3 ms for 2048 bits) and libsodium's through
PyNaCl for Ed25519 (0.02 ms). The body is hashed in one streaming pass over the spooled
file, so a 30 MB message is never held in memory.

Signing happens once, at acceptance, before the 250 and off the reactor, in the queue
store's commit thread: the field is put in front of the stored body
(`IncomingMessage.prepend`), so every delivery and every retry carries the same signature,
as it carries our Received: field.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import dkim
import nacl.signing
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from twisted.internet.defer import Deferred
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
# Fields that change in transit or must not be signed (RFC 6376 §5.4; dkimpy refuses them).
NEVER_SIGNED = frozenset(name.decode() for name in dkim.DKIM.SHOULD_NOT)
HEADER_LIMIT = 256 * 1024  # as relayhub.smtp.headers.HEADER_PREFIX_LIMIT: bigger is not signed
CHUNK = 256 * 1024
FIELD_NAME = b"DKIM-Signature"
# Relaxed body canonicalization as dkimpy's (strip_trailing_whitespace, then
# compress_whitespace), but a single space is left alone instead of being replaced by
# itself: prose has one at every word, and those substitutions were most of the cost.
_TRAILING_WSP = re.compile(rb"[ \t]+(?=\r\n)")
_WSP_RUN = re.compile(rb"[ \t]{2,}|\t")
_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext
_HEADER_NAME_BYTES = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_FIELD_START = re.compile(rb"\r\n(?![ \t])")  # a line not starting with white space
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

    def __post_init__(self) -> None:
        sodium = None
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            sodium = nacl.signing.SigningKey(self.key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption()))
        object.__setattr__(self, "_sodium", sodium)

    @property
    def algorithm(self) -> str:
        return algorithm(self.key)

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


def signed_names(headers: Sequence[tuple[bytes, bytes]], wanted: Sequence[str]) -> list[bytes]:
    """The h= list: each wanted field as often as it occurs, oversigned ones once more."""
    chosen = {name.lower().encode() for name in wanted}
    present = [name.lower() for name, _value in headers if name.lower() in chosen]
    return present + [name for name in present if name.decode() in OVERSIGNED]


def header_hash_input(headers: Sequence[tuple[bytes, bytes]], names: Sequence[bytes],
                      unsigned: bytes) -> bytes:
    """What the signature covers: the fields named in h=, each instance taken from the
    bottom up (RFC 6376 §5.4.2; a name listed more often than present adds nothing), then
    the DKIM-Signature field itself with an empty b= and no final CRLF (§3.7)."""
    remaining: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in names:
            remaining.setdefault(lowered, []).append(relaxed_field(name, value))
    lines = [remaining[n].pop() for n in names if remaining.get(n)]
    lines.append(relaxed_field(FIELD_NAME, b" " + unsigned))
    return b"\r\n".join(lines)


def signature_field(key: SigningKey, domain: str, headers: Sequence[tuple[bytes, bytes]],
                    body_hash: bytes, now: float) -> bytes:
    """The folded DKIM-Signature field (with its CRLF) over `headers` and the body hash,
    laid out as dkimpy's DKIM.gen_header lays it out."""
    names = signed_names(headers, key.headers)
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


def split_header(prefix: bytes) -> tuple[bytes, int] | None:
    """The header section of a message starting with `prefix` (ending with the CRLF of its
    last field) and where the body starts; None if the section does not end in `prefix`."""
    end = prefix.find(b"\r\n\r\n")
    if end < 0:
        return None
    return prefix[: end + 2], end + 4


def sign_file(signer: Signer, file: BinaryIO, now: float) -> Signature:
    """Read the message in `file` (from its start) and sign it with the key its From:
    domain chooses. Blocking: run it off the reactor."""
    prefix = file.read(CHUNK)
    while len(prefix) < HEADER_LIMIT and b"\r\n\r\n" not in prefix:
        more = file.read(CHUNK)
        if not more:
            prefix += b"\r\n"  # all header fields, no body: the section ends at the end
            break
        prefix += more
    split = split_header(prefix)
    if split is None:
        return Signature(None, f"no end of the header section in {HEADER_LIMIT} bytes")
    header, body_start = split
    headers = parse_header(header)
    if headers is None:
        return Signature(None, "malformed header section")
    domain = from_domain(headers)
    if domain is None:
        return Signature(None, "no single From: address")
    chosen = signer.choose(domain)
    if chosen is None:
        return Signature(None, f"no key for From: domain {domain}")
    key, signing_domain = chosen
    body = RelaxedBodyHash()
    body.update(prefix[body_start:])
    while chunk := file.read(CHUNK):
        body.update(chunk)
    field_bytes = signature_field(key, signing_domain, headers, body.digest(), now)
    return Signature(field_bytes, "signed", key.selector, signing_domain)


class Signing:
    """Signing one message. `make_prefix` runs in the queue store's commit thread, just
    before the body is fsync'd: that thread hop exists for every message anyway, and a
    second one of our own cost ~0.1 ms of CPU per message, as much as an Ed25519
    signature. It never raises: a failure leaves the message unsigned, for `report` to
    log on the reactor once the message is queued. Queued unsigned rather than refused with
    a 451: some receivers may junk an unsigned message, but a 451 for a bug in signing
    would hold every sender's mail back until it is fixed."""

    def __init__(self, signer: Signer, queue_id: str, now: float) -> None:
        self.signer, self.queue_id, self.now = signer, queue_id, now
        self.signature: Signature | None = None
        self.failure: Failure | None = None

    def make_prefix(self, file: BinaryIO) -> bytes:
        try:
            self.signature = sign_file(self.signer, file, self.now)
        except Exception:
            self.failure = Failure()
            return b""
        return self.signature.field or b""

    def report(self, result: T) -> T:
        """A callback on the commit: log what signing did, pass the result on."""
        if self.failure is not None:
            maillog.SMTPD.failure(maillog.DKIM_FAILED, self.failure, queue_id=self.queue_id)
        elif self.signature is not None and self.signature.field is not None:
            maillog.SMTPD.info(maillog.DKIM_SIGNED, queue_id=self.queue_id,
                               selector=self.signature.selector, domain=self.signature.domain)
        elif self.signature is not None:
            maillog.SMTPD.debug(maillog.DKIM_SKIPPED, queue_id=self.queue_id,
                                reason=self.signature.reason)
        return result


def signing_commit(signer: Signer | None, client: ClientContext | None,
                   incoming: IncomingMessage, now: float
                   ) -> Callable[[Deferred[None]], Deferred[None]]:
    """For the end of DATA: arrange for `incoming` to be signed at its commit when `signer`
    has keys and the client is trusted or authenticated (mail relayed in from outside
    never is); returns what to apply to the commit's Deferred."""
    if signer is None or client is None or not (client.trusted or client.authenticated):
        return lambda committed: committed
    signing = Signing(signer, incoming.queue_id, now)
    try:
        incoming.prepend(signing.make_prefix)
    except NotImplementedError:  # a queue backend that cannot: queued unsigned
        maillog.SMTPD.failure(maillog.DKIM_FAILED, Failure(), queue_id=incoming.queue_id)
        return lambda committed: committed
    return lambda committed: committed.addCallback(signing.report)
