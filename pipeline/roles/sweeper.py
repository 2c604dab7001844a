"""The `sweeper` role: repairs what crashes and outages leave behind.

Every `sweeper.interval_s` it gives emails stuck in `sending` past their lease back to the
queue (their sender died mid-send), and republishes queued emails the broker never confirmed
(it was down at acceptance, or the lease was just reclaimed). Several sweepers may run: the
reclaim skips rows another one holds, and a duplicate publish is harmless because a sender only
sends what it can claim.

It also consumes the dead letter queue: whatever the broker dead-lettered (a message a consumer
rejected, such as garbage on the send queue, or one that hit the quorum queue's delivery limit)
is recorded before it is acked: an email of ours becomes `failed` with the broker's reason (a
dead letter, listable and replayable), anything else is kept in `dead_messages` and logged.
"""

from __future__ import annotations

import logging

import anyio
import psycopg
from anyio.abc import TaskStatus
from psycopg_pool import PoolTimeout

from pipeline.amqp.consumer import Delivery, consume_reconnecting
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.deadletters import record_dead
from pipeline.errors import BrokerError
from pipeline.intake import IDEMPOTENCY_TTL_S, publish_and_mark
from pipeline.resources import Deps
from pipeline.store import queries

log = logging.getLogger(__name__)

BATCH = 500
UNCONFIRMED_AFTER_S = 10.0
"""An unpublished row younger than this may still be in its API request's hands."""
DEAD_CONCURRENCY = 4
"""Dead-lettered messages recorded at once."""
RECORD_ERROR_PAUSE_S = 2.0
"""How long the dead letter consumer backs off after it could not record a message."""


async def sweep_once(deps: Deps, publisher: ConfirmedPublisher) -> tuple[int, int]:
    """One pass; returns (reclaimed, republished)."""
    async with deps.db.connection() as conn:
        reclaimed = await queries.reclaim_expired_leases(conn, limit=BATCH)
    republished = 0
    if reclaimed:
        log.warning("reclaimed %d emails whose sender's lease expired", len(reclaimed))
        republished += sum(await publish_and_mark(deps, publisher, reclaimed))
    while True:
        async with deps.db.connection() as conn:
            ids = await queries.unpublished_emails(
                conn, older_than_s=UNCONFIRMED_AFTER_S, limit=BATCH
            )
        if not ids:
            break
        confirmed = await publish_and_mark(deps, publisher, ids)
        republished += sum(confirmed)
        if not all(confirmed) or len(ids) < BATCH:
            break
    if republished:
        log.info("republished %d unconfirmed emails", republished)
    async with deps.db.connection() as conn:
        await queries.prune_idempotency_keys(conn, ttl_s=IDEMPOTENCY_TTL_S)
    return len(reclaimed), republished


async def record_dead_delivery(deps: Deps, delivery: Delivery) -> None:
    """Record one dead-lettered message, then ack it. The dead queue dead-letters nowhere, so
    a message that cannot be recorded now (database down) is requeued, never dropped."""
    try:
        await record_dead(deps.db, body=delivery.body, headers=delivery.headers)
    except Exception as exc:
        if isinstance(exc, psycopg.Error | PoolTimeout):
            log.warning("cannot record a dead-lettered message (%s); requeueing it", exc)
        else:
            log.exception("cannot record dead-lettered message %s; requeueing", delivery.message_id)
        await delivery.nack(requeue=True)
        with anyio.move_on_after(RECORD_ERROR_PAUSE_S):
            await deps.stop.wait()
        return
    await delivery.ack()


async def consume_dead(deps: Deps) -> None:
    """Consume the dead letter queue until the stop, reconnecting with backoff on its own so a
    broker outage never holds up the sweeps."""
    await consume_reconnecting(
        deps.settings.amqp.url,
        deps.topology,
        deps.topology.dead,
        lambda delivery: record_dead_delivery(deps, delivery),
        concurrency=DEAD_CONCURRENCY,
        stop=deps.stop,
        grace_s=deps.settings.shutdown.grace_s,
    )


async def run_sweeper(
    deps: Deps, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    interval = deps.settings.sweeper.interval_s
    async with (
        ConfirmedPublisher(deps.settings.amqp.url, deps.topology) as publisher,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(consume_dead, deps)
        task_status.started()
        while not deps.stop.is_set():
            try:
                await sweep_once(deps, publisher)
            except BrokerError as exc:
                log.warning("sweep could not reach the broker: %s", exc)
            with anyio.move_on_after(interval):
                await deps.stop.wait()
