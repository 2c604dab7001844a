"""Opaque, unguessable ids with a type prefix (`msg_…`, `evt_…`, `key_…`)."""

from __future__ import annotations

import secrets

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def random_base62(nbytes: int) -> str:
    """Base62 text of `nbytes` random bytes: URL-safe, no punctuation, easy to double-click."""
    n = int.from_bytes(secrets.token_bytes(nbytes), "big")
    width = -(-nbytes * 8 * 1000 // 5954)  # ceil(bits / log2(62))
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """A 128-bit random id: never sequential, never guessable."""
    return f"{prefix}_{random_base62(16)}"
