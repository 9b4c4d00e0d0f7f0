"""MTA-STS (RFC 8461), the pure part: the `_mta-sts` TXT record, the policy file, and which
MX host names a policy allows. No I/O here; fetching and caching are in mta_sts_source."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 §3.3: senders may limit the body; 64 KiB is ample
MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: at most about one year
MODES = ("enforce", "testing", "none")

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class PolicyError(ValueError):
    """A TXT record or policy file that is not valid MTA-STS; the message says why."""


@dataclass(frozen=True)
class StsRecord:
    """The `_mta-sts.<domain>` TXT record: only its id matters (it changes with the policy)."""

    id: str


@dataclass(frozen=True)
class Policy:
    """A parsed policy file: `mx` holds the patterns as published, lower-cased."""

    mode: str
    mx: tuple[str, ...]
    max_age: int

    def allows(self, host: str) -> bool:
        """Whether the MX host `host` matches one of the policy's patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def parse_txt(strings: Iterable[str]) -> StsRecord | None:
    """The record among a name's TXT records (each given as its strings joined), or None
    when none starts with "v=STSv1"; PolicyError when one is malformed or several are there
    (RFC 8461 §3.1: then the domain has no usable record)."""
    candidates = [text for text in strings if text.startswith("v=STSv1")]
    if not candidates:
        return None
    if len(candidates) > 1:
        raise PolicyError("more than one v=STSv1 TXT record")
    fields: dict[str, str] = {}
    for part in candidates[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, equals, value = part.partition("=")
        if not equals:
            raise PolicyError(f"TXT field {part!r} has no '='")
        fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1":
        raise PolicyError("TXT record does not start with v=STSv1")
    record_id = fields.get("id", "")
    if not _ID.fullmatch(record_id):
        raise PolicyError(f"TXT id {record_id!r} is not 1 to 32 letters and digits")
    return StsRecord(record_id)


def parse_policy(body: bytes) -> Policy:
    """The policy in a `.well-known/mta-sts.txt` body; PolicyError if it is not valid."""
    if len(body) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    first = True
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"policy line {line[:60]!r} is not 'key: value'")
        key, value = key.strip(), value.strip(" \t")
        if first and (key, value) != ("version", "STSv1"):
            raise PolicyError("policy does not start with 'version: STSv1'")
        first = False
        if key == "mx":
            mx.append(value.lower().removesuffix("."))
        else:
            fields.setdefault(key, value)  # unknown keys are ignored (§3.2); first one wins
    if first:
        raise PolicyError("policy is empty")
    mode = fields.get("mode")
    if mode not in MODES:
        raise PolicyError(f"policy mode {mode!r} is not enforce, testing or none")
    raw_age = fields.get("max_age", "")
    if not raw_age.isdigit() or len(raw_age) > 10:
        raise PolicyError(f"policy max_age {raw_age!r} is not a number of seconds")
    max_age = min(int(raw_age), MAX_AGE_LIMIT)
    if mode != "none" and not mx:
        raise PolicyError(f"policy in mode {mode} names no mx")
    bad = [pattern for pattern in mx if not _valid_pattern(pattern)]
    if bad:
        raise PolicyError(f"policy mx {bad[0]!r} is not a host name or *.domain pattern")
    return Policy(mode, tuple(mx), max_age)


def _valid_pattern(pattern: str) -> bool:
    labels = pattern.removeprefix("*.").split(".")
    return len(labels) >= 1 and all(_LABEL.fullmatch(label) for label in labels)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: an exact (case-insensitive) name, or "*.d" matching one label + ".d"."""
    pattern = pattern.lower().removesuffix(".")
    host = host.lower().removesuffix(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


def policy_text(policy: Policy) -> str:
    """The canonical policy file for `policy`, as stored in the cache."""
    lines = ["version: STSv1", f"mode: {policy.mode}", *(f"mx: {p}" for p in policy.mx),
             f"max_age: {policy.max_age}"]
    return "\r\n".join(lines) + "\r\n"


def policy_url(domain: str) -> str:
    return f"https://mta-sts.{domain}/.well-known/mta-sts.txt"


def matching_hosts(policy: Policy, hosts: Sequence[str]) -> list[str]:
    """The hosts, in order, that `policy` allows."""
    return [host for host in hosts if policy.allows(host)]
