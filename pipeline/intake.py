"""Accepting emails: commit them (and their first event), then publish with confirms.

Suppressed recipients are dropped from the envelope in the same transaction as the insert.

202 means committed. The publish comes after the commit and its failure never fails the
request: the row stays unpublished and the sweeper republishes it (the table is the outbox).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.amqp.topology import SEND
from pipeline.errors import IdempotencyInProgress, IdempotencyMismatch
from pipeline.messages import encode_send
from pipeline.resources import Deps
from pipeline.store import queries
from pipeline.suppressions import canonical_address

log = logging.getLogger(__name__)


async def publish_and_mark(
    deps: Deps, publisher: ConfirmedPublisher, email_ids: Sequence[str]
) -> list[bool]:
    """Publish each id to the send queue, await the confirms together, record the confirmed."""
    return await publish_ids(deps.db, publisher, email_ids)


async def publish_ids(
    db: AsyncConnectionPool, publisher: ConfirmedPublisher, email_ids: Sequence[str]
) -> list[bool]:
    """`publish_and_mark` on a bare pool (for the CLI, which has no Deps)."""
    if not email_ids:
        return []
    confirmed = await publisher.publish_many([(SEND, encode_send(i), i, None) for i in email_ids])
    done = [i for i, ok in zip(email_ids, confirmed, strict=True) if ok]
    if len(done) < len(email_ids):
        log.warning(
            "broker did not confirm %d of %d publishes; the sweeper will republish them",
            len(email_ids) - len(done),
            len(email_ids),
        )
    if done:
        async with db.connection() as conn:
            await queries.mark_published(conn, done)
    return confirmed


@dataclass(frozen=True)
class Accepted:
    """What acceptance decided: the status the email was stored with, and the recipients
    left out of its envelope because the account suppresses them."""

    id: str
    status: str
    created_at: datetime
    suppressed: tuple[str, ...]


IDEMPOTENCY_TTL_S = 24 * 3600.0


@dataclass(frozen=True)
class IdempotencyRequest:
    """An `Idempotency-Key` and the fingerprint of the request that carried it."""

    key: str
    request_hash: bytes


@dataclass(frozen=True)
class Outcome:
    """The answer to an accepting request; `replayed` when it is a stored first answer."""

    code: int
    body: Any
    replayed: bool
    accepted: tuple[Accepted, ...] = ()


Respond = Callable[[list[Accepted]], tuple[int, Any]]


async def _insert(conn: queries.Conn, email: queries.NewEmail) -> Accepted:
    """Insert one email, leaving out suppressed recipients (looked up in this transaction,
    so a suppression added before the commit is honoured); no recipient left → `suppressed`."""
    canonical = {addr: canonical_address(addr) for addr in email.envelope_to}
    hits = await queries.suppressed_among(
        conn, email.account_id, list(dict.fromkeys(canonical.values()))
    )
    suppressed = {addr: hits[c] for addr, c in canonical.items() if c in hits}
    if suppressed:
        remaining = [a for a in email.envelope_to if a not in suppressed]
        email = replace(
            email, envelope_to=remaining, status=email.status if remaining else "suppressed"
        )
    created_at = await queries.insert_email(
        conn, email, event_type="email." + email.status, suppressed=suppressed
    )
    return Accepted(email.id, email.status, created_at, tuple(suppressed))


async def accept_all(
    deps: Deps,
    publisher: ConfirmedPublisher,
    account_id: str,
    emails: Sequence[queries.NewEmail],
    *,
    respond: Respond,
    idempotency: IdempotencyRequest | None = None,
) -> Outcome:
    """Commit every email in one transaction, then publish the queued ones together.

    `respond` turns what was accepted into the HTTP answer inside the transaction, so that
    with an idempotency key the answer is stored atomically with the emails: a repeat gets
    exactly the first answer and creates nothing. A repeat while the first is still in its
    transaction raises IdempotencyInProgress; with another body, IdempotencyMismatch.
    """
    async with deps.db.connection() as conn, conn.transaction():
        if idempotency is not None:
            if not await queries.lock_idempotency_key(conn, account_id, idempotency.key):
                raise IdempotencyInProgress(
                    "a request with this Idempotency-Key is still being processed"
                )
            stored = await queries.stored_response(
                conn, account_id, idempotency.key, ttl_s=IDEMPOTENCY_TTL_S
            )
            if stored is not None:
                if stored.request_hash != idempotency.request_hash:
                    raise IdempotencyMismatch(
                        "this Idempotency-Key was used with a different request body"
                    )
                return Outcome(stored.response_code, stored.response_body, replayed=True)
        accepted = [await _insert(conn, email) for email in emails]
        code, body = respond(accepted)
        if idempotency is not None:
            await queries.store_response(
                conn,
                account_id,
                idempotency.key,
                request_hash=idempotency.request_hash,
                code=code,
                body=body,
            )
    await publish_and_mark(deps, publisher, [a.id for a in accepted if a.status == "queued"])
    return Outcome(code, body, replayed=False, accepted=tuple(accepted))
