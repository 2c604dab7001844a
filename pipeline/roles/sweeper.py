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
from functools import partial

import anyio
from anyio.abc import TaskStatus

from pipeline.amqp.consumer import Delivery
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.deadletters import record_dead
from pipeline.errors import BrokerError
from pipeline.intake import IDEMPOTENCY_TTL_S, publish_and_mark
from pipeline.resources import Deps
from pipeline.roles.dead_queue import consume_dead_queue
from pipeline.store import queries

log = logging.getLogger(__name__)

BATCH = 500
UNCONFIRMED_AFTER_S = 10.0
"""An unpublished row younger than this may still be in its API request's hands."""


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


async def record_dead_message(deps: Deps, delivery: Delivery) -> None:
    await record_dead(deps.db, body=delivery.body, headers=delivery.headers)


async def run_sweeper(
    deps: Deps, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    interval = deps.settings.sweeper.interval_s
    async with (
        ConfirmedPublisher(deps.settings.amqp.url, deps.topology) as publisher,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(
            consume_dead_queue, deps, deps.topology.dead, partial(record_dead_message, deps)
        )
        task_status.started()
        while not deps.stop.is_set():
            try:
                await sweep_once(deps, publisher)
            except BrokerError as exc:
                log.warning("sweep could not reach the broker: %s", exc)
            with anyio.move_on_after(interval):
                await deps.stop.wait()
