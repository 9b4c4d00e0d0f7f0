"""MIME helpers: RFC 2047 header decoding for display (8bit-to-7bit conversion joins later)."""

from __future__ import annotations

from email.header import decode_header, make_header


def decode_for_display(raw: str) -> str:
    """Decode RFC 2047 encoded-words and unfold; never raises, so a broken header still shows."""
    unfolded = " ".join(raw.split())
    try:
        return str(make_header(decode_header(unfolded)))
    except (ValueError, LookupError, UnicodeError):
        return unfolded
