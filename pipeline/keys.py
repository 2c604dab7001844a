"""API key format, hashing and checking: pure functions shared by the API and the CLI.

A key is `sk_live_` or `sk_test_`, then an 8-character lookup id, then the secret. Only the
lookup id is stored in clear (to find the row); the whole key is stored as a SHA-256 hash and
compared in constant time. The secret carries 190 bits, so a fast hash is enough.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from pipeline.ids import random_base62

PREFIXES = ("sk_live_", "sk_test_")
LOOKUP_LEN = 8
SCOPES = ("send", "read", "admin")
DEMO_KEY = "sk_test_demo123456789"


@dataclass(frozen=True)
class NewKey:
    key: str
    lookup: str
    hash: bytes


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def lookup_of(key: str) -> str | None:
    """The non-secret lookup id inside `key`, or None when it is not shaped like one of ours."""
    for prefix in PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix) + LOOKUP_LEN:
            return key[len(prefix) : len(prefix) + LOOKUP_LEN]
    return None


def generate_key(*, test: bool) -> NewKey:
    """A fresh key: prefix + 8-character lookup + 32-character secret (base62)."""
    body = random_base62(8)[-LOOKUP_LEN:] + random_base62(24)[-32:]
    key = ("sk_test_" if test else "sk_live_") + body
    lookup = lookup_of(key)
    assert lookup is not None
    return NewKey(key=key, lookup=lookup, hash=hash_key(key))


def matches(key: str, stored_hash: bytes) -> bool:
    """Constant-time comparison of a presented key with the stored hash."""
    return hmac.compare_digest(hash_key(key), stored_hash)


def parse_scopes(text: str) -> tuple[str, ...]:
    """`send,read` → ('send', 'read'); raises ValueError naming an unknown scope."""
    scopes = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    for scope in scopes:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
    if not scopes:
        raise ValueError("at least one scope is needed")
    return scopes
