"""Server TLS for every listener: the [tls] certificate and key checked and loaded into
options a current security review accepts (TLS 1.2/1.3, ECDHE with AEAD ciphers only)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import ISSLTransport

from relayhub.config import Settings, _endpoint_fields

# TLS 1.2 suites: forward secrecy (ECDHE) and AEAD (AES-GCM, ChaCha20-Poly1305) only, the
# strongest first; the server's order wins. TLS 1.3 suites are OpenSSL's, all of them AEAD.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
))

_PRIVATE_KEY_PEM = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----\r?\n.*?-----END \1-----", re.DOTALL)
_PUBLIC_KEY_DER = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class TLSSetupError(Exception):
    """A certificate or key that cannot be used; `key` names the setting ("tls.private_key")
    and `why` says what is wrong with which file, so either fits on one line."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key
        self.why = why


@dataclass(frozen=True)
class KeyPair:
    """A server certificate, the chain sent after it, and its private key."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKeyTypes


def _quoted(path: Path) -> str:
    return json.dumps(str(path))  # as relayhub.config quotes values in its messages


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TLSSetupError(key, f"cannot read {_quoted(path)}: {error.strerror}") from None


def load_key_pair(certificate: Path, private_key: Path | None, *,
                  cert_key: str = "tls.certificate",
                  key_key: str = "tls.private_key") -> KeyPair:
    """Read and check a PEM certificate file (server certificate first, then its chain) and
    its key (`private_key` None: the key is in the certificate file). Raises TLSSetupError
    naming `cert_key` or `key_key` for a missing or unreadable file, a file holding no
    certificate or key, an encrypted key, or a key that does not match the certificate."""
    try:
        certificates = x509.load_pem_x509_certificates(_read(certificate, cert_key))
    except ValueError:
        raise TLSSetupError(cert_key, f"{_quoted(certificate)} holds no PEM certificate") from None
    key_path, key_setting = (private_key, key_key) if private_key else (certificate, cert_key)
    # The key may share a file with certificates (private_key unset): take its own block.
    block = _PRIVATE_KEY_PEM.search(_read(key_path, key_setting))
    if block is None:
        raise TLSSetupError(key_setting, f"{_quoted(key_path)} holds no PEM private key")
    try:
        key = serialization.load_pem_private_key(block.group(0), password=None)
    except TypeError:  # cryptography's way of saying "encrypted, and no password given"
        raise TLSSetupError(key_setting, f"{_quoted(key_path)}: the key is encrypted (a "
                            "daemon cannot ask for a passphrase)") from None
    except ValueError as error:
        raise TLSSetupError(key_setting, f"{_quoted(key_path)}: unusable key: {error}") from None
    leaf = certificates[0]
    if leaf.public_key().public_bytes(*_PUBLIC_KEY_DER) != \
            key.public_key().public_bytes(*_PUBLIC_KEY_DER):
        raise TLSSetupError(key_setting, f"{_quoted(key_path)} does not match the certificate "
                                         f"in {_quoted(certificate)}")
    return KeyPair(leaf, tuple(certificates[1:]), key)


def server_options(pair: KeyPair) -> ssl.CertificateOptions:
    """TLS server options for `pair`: TLS 1.2 and 1.3 only, TLS12_CIPHERS in the server's
    order, no renegotiation. The context is built here, so that problems show at start-up."""
    options = ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(pair.private_key),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(pair.certificate),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in pair.chain],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
    )
    # CertificateOptions already sets OP_CIPHER_SERVER_PREFERENCE and OP_NO_COMPRESSION;
    # renegotiation only serves a client-triggered CPU-exhaustion attack on a mail server.
    options.getContext().set_options(SSL.OP_NO_RENEGOTIATION)
    return options


def server_tls_options(settings: Settings) -> ssl.CertificateOptions | None:
    """Options from [tls], None when TLS is off. Called when a worker starts, never cached
    at import: a reload starts new workers, which so read renewed certificates."""
    tls = settings.tls
    if tls.certificate is None:
        return None
    return server_options(load_key_pair(tls.certificate, tls.private_key))


def endpoint_tls_options(description: str) -> ssl.CertificateOptions | None:
    """For an "ssl:" endpoint, options from its own privateKey/certKey/extraCertChain files
    under the same protocol and cipher policy (its other TLS keywords are ignored); None for
    any other endpoint. Needed because a worker adopts the bare socket the master bound."""
    kind, _args, keywords = _endpoint_fields(description)
    if kind != "ssl":
        return None
    key = Path(keywords.get("privateKey", "server.pem"))
    certificate = Path(keywords.get("certKey", str(key)))
    setting = f"endpoint {description!r}"
    pair = load_key_pair(certificate, key, cert_key=setting, key_key=setting)
    if "extraCertChain" in keywords:
        chain_file = Path(keywords["extraCertChain"])
        try:
            chain = x509.load_pem_x509_certificates(_read(chain_file, setting))
        except ValueError:
            raise TLSSetupError(setting, f"{_quoted(chain_file)} holds no PEM certificate"
                                ) from None
        pair = KeyPair(pair.certificate, pair.chain + tuple(chain), pair.private_key)
    return server_options(pair)


@dataclass(frozen=True)
class SessionInfo:
    """What a finished handshake agreed on; str() is the log form "TLSv1.3 TLS_AES_..."."""

    version: str
    cipher: str
    bits: int

    def __str__(self) -> str:
        return f"{self.version} {self.cipher}"

    @property
    def comment(self) -> str:
        """The Received: comment, as Postfix words it."""
        return f"using {self.version} with cipher {self.cipher} ({self.bits} bits)"


def session_info(transport: Any) -> SessionInfo | None:
    """The TLS session on `transport` once its handshake is done, else None."""
    # Via a bool: narrowed to ISSLTransport, the transport would lack getHandle for mypy.
    secure = ISSLTransport.providedBy(transport)
    if not secure:
        return None
    connection: SSL.Connection = transport.getHandle()
    version, cipher = connection.get_protocol_version_name(), connection.get_cipher_name()
    if cipher is None:  # the handshake has not finished
        return None
    return SessionInfo(version, cipher, connection.get_cipher_bits() or 0)
