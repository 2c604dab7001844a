"""The body of a message on the send queue: just the email id; PostgreSQL holds the rest."""

from __future__ import annotations

import json


class UndecodableMessage(ValueError):
    """A message on a queue that is not one of ours; it belongs in the dead letter queue."""


def encode_send(email_id: str) -> bytes:
    return json.dumps({"id": email_id}).encode()


def decode_send(body: bytes) -> str:
    try:
        value = json.loads(body)
        email_id = value["id"]
    except (ValueError, TypeError, KeyError) as exc:
        raise UndecodableMessage(f"not a send message: {body[:80]!r}") from exc
    if not isinstance(email_id, str) or not email_id.startswith("msg_"):
        raise UndecodableMessage(f"not an email id: {email_id!r}")
    return email_id
