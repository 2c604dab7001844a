"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

The secret is `whsec_` + base64 of random bytes; the HMAC key is those bytes (the base64 payload
decoded). Each request carries `webhook-id`, `webhook-timestamp` (unix seconds) and
`webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`; the signature header
may hold several space-separated signatures (during a secret rotation), any one of which may match.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

from pipeline.errors import MailpipeError

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
"""Random bytes in a new secret (the spec asks for 24 to 64)."""
TOLERANCE_S = 300
"""How far a `webhook-timestamp` may be from now, either way, for `verify` to accept it."""


class SignatureError(MailpipeError):
    """A webhook request does not carry a valid signature (or its secret is malformed)."""


def new_secret() -> str:
    """A fresh signing secret, shown to the user once."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret: its base64 payload, decoded (the `whsec_` prefix is optional)."""
    payload = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the secret is not whsec_ followed by base64") from None
    if not key:
        raise SignatureError("the secret is empty")
    return key


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256>` of `{msg_id}.{timestamp}.{body}`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_headers(
    secret: str, msg_id: str, timestamp: int, body: bytes, *, previous: str | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers for one delivery attempt. With the `previous`
    secret of a rotation, its signature follows the new one (space-separated): a receiver
    that still has the old secret accepts the request too."""
    signatures = [signature(s, msg_id, timestamp, body) for s in (secret, previous) if s]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float | None = TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Check a received request; raise SignatureError saying what is wrong.

    Header names are matched case-insensitively. `tolerance_s` None skips the timestamp check
    (for re-checking a stored request long after it arrived).
    """
    lower = {k.lower(): v for k, v in headers.items()}
    missing = [
        h for h in ("webhook-id", "webhook-timestamp", "webhook-signature") if h not in lower
    ]
    if missing:
        raise SignatureError(f"missing header {missing[0]}")
    msg_id = lower["webhook-id"].strip()
    try:
        timestamp = int(lower["webhook-timestamp"].strip())
    except ValueError:
        raise SignatureError("webhook-timestamp is not a whole number of seconds") from None
    if tolerance_s is not None:
        current = time.time() if now is None else now
        if abs(current - timestamp) > tolerance_s:
            raise SignatureError(
                f"webhook-timestamp is {current - timestamp:+.0f} s from now "
                f"(tolerance {tolerance_s:g} s)"
            )
    expected = signature(secret, msg_id, timestamp, body).encode()
    for candidate in lower["webhook-signature"].split():
        version, _, _ = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(candidate.encode(), expected):
            return
    raise SignatureError("no v1 signature in webhook-signature matches")
