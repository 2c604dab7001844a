"""Dead letters: emails that exhausted their retries, or that the broker gave up on.

Shared by the API (`/v1/dead-letters`), the CLI (`mailpipe dlq`) and the sweeper:

- `list_letters` lists them newest first (one account, or every account for the operator).
- `replay` puts one back: in one statement the email goes back to `queued` with its attempts
  reset to 0 and an `email.replayed` event, and the letter gets `replayed_at`; only then is the
  email published to the send queue with a confirm. A publish the broker does not confirm is
  not an error: the row is an unpublished `queued` email, which the sweeper republishes.
  Replaying a letter whose email is no longer `failed` (replayed already) is refused.
- `record_dead` is what the sweeper does with each message the broker dead-lettered: an email
  of ours is marked `failed` with the broker's reason (a dead letter row); anything else is kept
  in `dead_messages` and logged.
- `keep_dead` keeps any dead-lettered message in `dead_messages` and logs it: what the webhooks
  role does with its own dead queue (a delivery that crash-looped, or a message not ours).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from psycopg_pool import AsyncConnectionPool

from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.errors import NotReplayable, UnknownDeadLetter
from pipeline.intake import publish_ids
from pipeline.messages import UndecodableMessage, decode_send
from pipeline.store import queries
from pipeline.store.queries import DeadLetter

__all__ = [
    "DeadLetter",
    "Death",
    "Recorded",
    "Replayed",
    "death_of",
    "describe_death",
    "jsonable",
    "list_letters",
    "record_dead",
    "replay",
    "replay_all",
]

log = logging.getLogger(__name__)

REPLAY_BATCH = 200


@dataclass(frozen=True)
class Replayed:
    """A replayed letter; `published` is False when the broker did not confirm the publish
    (the sweeper republishes the email shortly)."""

    letter: DeadLetter
    published: bool


async def list_letters(
    db: AsyncConnectionPool,
    *,
    account_id: str | None,
    limit: int,
    before: tuple[datetime, str] | None = None,
    pending_only: bool = False,
) -> list[DeadLetter]:
    """Newest first; every account's when `account_id` is None."""
    async with db.connection() as conn:
        return await queries.list_dead_letters(
            conn, account_id=account_id, limit=limit, before=before, pending_only=pending_only
        )


async def _requeue(db: AsyncConnectionPool, letter_id: str, account_id: str | None) -> DeadLetter:
    async with db.connection() as conn:
        outcome = await queries.replay_dead_letter(conn, letter_id, account_id=account_id)
    if outcome.letter is None:
        raise UnknownDeadLetter(f"no dead letter {letter_id!r}")
    if not outcome.replayed:
        raise NotReplayable(
            f"dead letter {letter_id} cannot be replayed: its email {outcome.letter.email_id}"
            " is no longer failed (replayed already?)"
        )
    return outcome.letter


async def replay(
    db: AsyncConnectionPool,
    publisher: ConfirmedPublisher,
    letter_id: str,
    *,
    account_id: str | None = None,
) -> Replayed:
    """Put one dead letter's email back into the send queue with its attempts reset.

    Raises UnknownDeadLetter (no such letter, or another account's) or NotReplayable (its email
    is not `failed` any more).
    """
    letter = await _requeue(db, letter_id, account_id)
    [published] = await publish_ids(db, publisher, [letter.email_id])
    return Replayed(letter, published)


async def replay_all(
    db: AsyncConnectionPool, publisher: ConfirmedPublisher, *, account_id: str | None = None
) -> list[Replayed]:
    """Replay every letter not replayed yet (of one account, or of all), oldest last; each
    letter is looked at once, so one that cannot be replayed is skipped, not retried."""
    done: list[Replayed] = []
    before: tuple[datetime, str] | None = None
    while True:
        page = await list_letters(
            db, account_id=account_id, limit=REPLAY_BATCH, before=before, pending_only=True
        )
        if not page:
            return done
        before = (page[-1].created_at, page[-1].id)
        letters = []
        for pending in page:
            try:
                letters.append(await _requeue(db, pending.id, account_id))
            except NotReplayable as exc:
                log.info("%s", exc)
        confirmed = await publish_ids(db, publisher, [letter.email_id for letter in letters])
        done += [Replayed(letter, ok) for letter, ok in zip(letters, confirmed, strict=True)]


# ---------------------------------------------------------------- what the broker dead-lettered


@dataclass(frozen=True)
class Death:
    """The broker's latest `x-death` entry of a message: why and where it died."""

    reason: str | None
    queue: str | None
    count: int | None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def death_of(headers: Mapping[str, Any]) -> Death:
    """The most recent death of a dead-lettered message (RabbitMQ puts it first in `x-death`;
    the `x-first-death-*` headers are the fallback)."""
    deaths = headers.get("x-death")
    if isinstance(deaths, Sequence) and deaths and isinstance(deaths[0], Mapping):
        latest = deaths[0]
        count = latest.get("count")
        return Death(
            _text(latest.get("reason")),
            _text(latest.get("queue")),
            count if isinstance(count, int) else None,
        )
    return Death(
        _text(headers.get("x-first-death-reason")), _text(headers.get("x-first-death-queue")), None
    )


def describe_death(death: Death) -> str:
    """A dead letter's `reason`, for people."""
    queue = death.queue or "an unknown queue"
    match death.reason:
        case "delivery_limit":
            return f"delivery limit reached in {queue} (redelivered too often; a crash loop?)"
        case "rejected":
            return f"rejected by a consumer of {queue}"
        case "expired":
            return f"expired in {queue}"
        case "maxlen":
            return f"{queue} was full"
        case None:
            return "dead-lettered by the broker (no x-death header)"
        case other:
            return f"dead-lettered by the broker from {queue}: {other}"


def jsonable(value: Any) -> Any:
    """AMQP header values as JSON (timestamps as RFC 3339, binary as base64)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(raw).decode()}
    if isinstance(value, Decimal):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


@dataclass(frozen=True)
class Recorded:
    """What `record_dead` did: `failed` (ref = the dead letter id), `ignored` (ref = the
    email's status: a stale copy of a finished email) or `stored` (ref = the dead_messages id)."""

    outcome: str
    ref: str
    reason: str


async def record_dead(
    db: AsyncConnectionPool, *, body: bytes, headers: Mapping[str, Any]
) -> Recorded:
    """Record one message from the dead letter queue (the caller acks it afterwards)."""
    reason = describe_death(death_of(headers))
    try:
        email_id: str | None = decode_send(body)
    except UndecodableMessage:
        email_id = None
    async with db.connection() as conn:
        if email_id is not None:
            letter_id = await queries.mark_failed(conn, email_id, reason=reason)
            if letter_id is not None:
                log.warning("email %s failed: %s (dead letter %s)", email_id, reason, letter_id)
                return Recorded("failed", letter_id, reason)
            status = await queries.email_status(conn, email_id)
            if status is not None:
                log.info("dead-lettered copy of %s ignored: it is %s", email_id, status)
                return Recorded("ignored", status, reason)
        dead_id = await queries.insert_dead_message(
            conn,
            queue=death_of(headers).queue,
            reason=reason,
            headers=jsonable(dict(headers)),
            body=body,
        )
    log.error(
        "dead-lettered message names no email of ours (%s); kept as dead_messages id %d: %r",
        reason,
        dead_id,
        body[:80],
    )
    return Recorded("stored", str(dead_id), reason)


async def keep_dead(
    db: AsyncConnectionPool, *, body: bytes, headers: Mapping[str, Any], what: str
) -> Recorded:
    """Keep one dead-lettered message in `dead_messages` (the caller acks it afterwards) and
    log it at ERROR, saying `what` it was."""
    death = death_of(headers)
    reason = describe_death(death)
    async with db.connection() as conn:
        dead_id = await queries.insert_dead_message(
            conn, queue=death.queue, reason=reason, headers=jsonable(dict(headers)), body=body
        )
    log.error("%s was dead-lettered (%s); kept as dead_messages id %d", what, reason, dead_id)
    return Recorded("stored", str(dead_id), reason)
