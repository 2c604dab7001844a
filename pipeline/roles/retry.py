"""The `retry` role: moves temporarily failed emails into the delay tier that fits their wait.

The sender decided how long the email waits (`x-mailpipe-wait-s`, already a tier); this role
checks it against the configured tiers, republishes into that tier's queue and acks only once
the broker confirmed. The tier's queue-level TTL then dead-letters the message back to `send`.
"""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskStatus

from pipeline.amqp.consumer import Delivery, consume
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.errors import PublishNotConfirmed
from pipeline.resources import Deps
from pipeline.retry import choose_tier
from pipeline.roles.sender import WAIT_HEADER

log = logging.getLogger(__name__)


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

        await consume(
            settings.amqp.url,
            topology,
            topology.retry,
            handle,
            concurrency=settings.sender.concurrency,
            stop=deps.stop,
            grace_s=settings.shutdown.grace_s,
            task_status=task_status,
        )
