"""The `retry` role: moves temporarily failed emails into the delay tier that fits their wait.

The sender decided how long the email waits (`x-mailpipe-wait-s`, already a tier); this role
checks it against the configured tiers, republishes into that tier's queue and acks only once
the broker confirmed. The tier's queue-level TTL then dead-letters the message back to `send`.

It is also the scheduler: emails accepted with `scheduled_at` are queued and published when
their time comes.
"""

from __future__ import annotations

import logging
from functools import partial

import anyio
import psycopg
from anyio.abc import TaskStatus
from psycopg_pool import PoolTimeout

from pipeline.amqp.consumer import Delivery, consume
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.errors import PublishNotConfirmed
from pipeline.intake import publish_and_mark
from pipeline.resources import Deps
from pipeline.retry import choose_tier
from pipeline.roles.sender import WAIT_HEADER
from pipeline.store import queries

log = logging.getLogger(__name__)

SCHEDULE_POLL_S = 0.25
SCHEDULE_BATCH = 500


def tier_for(delivery: Delivery, tiers_s: tuple[int, ...]) -> int:
    """The tier named by the message, snapped to a configured one (config may have changed)."""
    try:
        wait = float(delivery.headers.get(WAIT_HEADER, tiers_s[0]))
    except (TypeError, ValueError):
        wait = tiers_s[0]
    return choose_tier(wait, tiers_s)


async def run_retry(
    deps: Deps, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    settings = deps.settings
    topology = deps.topology
    async with ConfirmedPublisher(settings.amqp.url, topology) as publisher:

        async def handle(delivery: Delivery) -> None:
            tier = tier_for(delivery, topology.tiers_s)
            try:
                await publisher.publish(
                    topology.delay_key(tier),
                    delivery.body,
                    message_id=delivery.message_id or "",
                    headers=delivery.headers,
                )
            except PublishNotConfirmed as exc:
                log.warning("delay tier %d s did not confirm (%s); requeueing", tier, exc)
                await delivery.nack(requeue=True)
                return
            await delivery.ack()

        async with anyio.create_task_group() as tg:
            await tg.start(
                partial(
                    consume,
                    settings.amqp.url,
                    topology,
                    topology.retry,
                    handle,
                    concurrency=settings.sender.concurrency,
                    stop=deps.stop,
                    grace_s=settings.shutdown.grace_s,
                )
            )
            tg.start_soon(release_scheduled, deps, publisher)
            task_status.started()


async def release_scheduled(deps: Deps, publisher: ConfirmedPublisher) -> None:
    """Queue scheduled emails as their time comes (checked every SCHEDULE_POLL_S, so within a
    second of it, also for times that passed while no retry role ran)."""
    while not deps.stop.is_set():
        try:
            async with deps.db.connection() as conn:
                due = await queries.release_scheduled(conn, limit=SCHEDULE_BATCH)
            if due:
                log.info("released %d scheduled emails", len(due))
                await publish_and_mark(deps, publisher, due)  # unconfirmed: the sweeper's
            if len(due) == SCHEDULE_BATCH:
                continue
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("could not release scheduled emails: %s", exc)
        with anyio.move_on_after(SCHEDULE_POLL_S):
            await deps.stop.wait()
