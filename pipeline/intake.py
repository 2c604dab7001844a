"""Accepting emails: commit them (and their first event), then publish with confirms.

202 means committed. The publish comes after the commit and its failure never fails the
request: the row stays unpublished and the sweeper republishes it (the table is the outbox).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.amqp.topology import SEND
from pipeline.messages import encode_send
from pipeline.resources import Deps
from pipeline.store import queries

log = logging.getLogger(__name__)


async def publish_and_mark(
    deps: Deps, publisher: ConfirmedPublisher, email_ids: Sequence[str]
) -> list[bool]:
    """Publish each id to the send queue, await the confirms together, record the confirmed."""
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
        async with deps.db.connection() as conn:
            await queries.mark_published(conn, done)
    return confirmed


async def accept(deps: Deps, publisher: ConfirmedPublisher, email: queries.NewEmail) -> datetime:
    """Commit one email, then hand it to the broker; returns its created_at."""
    async with deps.db.connection() as conn, conn.transaction():
        created_at = await queries.insert_email(conn, email, event_type="email." + email.status)
    if email.status == "queued":
        await publish_and_mark(deps, publisher, [email.id])
    return created_at
