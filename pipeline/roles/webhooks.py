"""The `webhooks` role: fans events out to the account endpoints and delivers them.

Two loops share one confirmed publisher: the fan-out tails the events table and publishes one
message per (event, endpoint) (pipeline/webhooks/fanout.py); `CONCURRENCY` consumer workers on
the webhooks queue deliver them over one guarded HTTP client, retrying through the webhook delay
tiers (pipeline/webhooks/delivery.py). Several processes may run the role: one fan-out pass runs
at a time across them (the cursor row is locked), and the queue spreads the deliveries.
"""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskStatus

from pipeline.amqp.consumer import consume_reconnecting
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.resources import Deps
from pipeline.webhooks.delivery import Deliverer, http_client
from pipeline.webhooks.fanout import run_fanout

log = logging.getLogger(__name__)

CONCURRENCY = 32
"""Deliveries in flight per process (the webhooks queue's prefetch)."""


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
        task_status.started()
