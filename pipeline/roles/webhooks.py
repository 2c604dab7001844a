"""The `webhooks` role: fans events out to the account endpoints and delivers them.

Two loops share one confirmed publisher: the fan-out tails the events table and publishes one
message per (event, endpoint) (pipeline/webhooks/fanout.py); `CONCURRENCY` consumer workers on
the webhooks queue deliver them over one guarded HTTP client, retrying through the webhook delay
tiers (pipeline/webhooks/delivery.py). Several processes may run the role: one fan-out pass runs
at a time across them (the cursor row is locked), and the queue spreads the deliveries.

A third loop empties the `webhooks.dead` queue (deliveries the broker gave up on after
`x-delivery-limit` redeliveries, messages that are not ours): each is kept in `dead_messages`
and logged at ERROR, so none is lost and the queue does not grow for ever.
"""

from __future__ import annotations

import logging
from functools import partial

import anyio
from anyio.abc import TaskStatus

from pipeline.amqp.consumer import Delivery, consume_reconnecting
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.deadletters import keep_dead
from pipeline.messages import UndecodableMessage
from pipeline.resources import Deps
from pipeline.roles.dead_queue import consume_dead_queue
from pipeline.webhooks.delivery import Deliverer, http_client
from pipeline.webhooks.fanout import WebhookMessage, run_fanout

log = logging.getLogger(__name__)

CONCURRENCY = 32
"""Deliveries in flight per process (the webhooks queue's prefetch)."""


def dead_what(body: bytes) -> str:
    """What a dead-lettered webhooks message was, for the log."""
    try:
        message = WebhookMessage.decode(body)
    except UndecodableMessage:
        return f"a message that is not a webhook delivery ({body[:80]!r})"
    return f"the delivery of event {message.event_id} to endpoint {message.webhook_id}"


async def keep_dead_message(deps: Deps, delivery: Delivery) -> None:
    await keep_dead(
        deps.db, body=delivery.body, headers=delivery.headers, what=dead_what(delivery.body)
    )


async def consume_webhooks(deps: Deps, deliverer: Deliverer) -> None:
    """Consume the webhooks queue until the stop, reconnecting with backoff on its own so a
    broker outage never stops the fan-out's retries."""
    await consume_reconnecting(
        deps.settings.amqp.url,
        deps.topology,
        deps.topology.webhooks,
        deliverer.handle,
        concurrency=CONCURRENCY,
        stop=deps.stop,
        grace_s=deps.settings.shutdown.grace_s,
    )


async def run_webhooks(
    deps: Deps, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    settings = deps.settings
    async with (
        ConfirmedPublisher(settings.amqp.url, deps.topology) as publisher,
        http_client(settings.webhooks) as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(run_fanout, deps, publisher)
        tg.start_soon(consume_webhooks, deps, Deliverer(deps, client, publisher))
        tg.start_soon(
            consume_dead_queue, deps, deps.topology.webhook_dead, partial(keep_dead_message, deps)
        )
        task_status.started()
