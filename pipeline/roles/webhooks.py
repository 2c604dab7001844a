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

from pipeline.amqp.consumer import consume
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.errors import BrokerError
from pipeline.resources import Deps
from pipeline.webhooks.delivery import Deliverer, http_client
from pipeline.webhooks.fanout import run_fanout

log = logging.getLogger(__name__)

CONCURRENCY = 32
"""Deliveries in flight per process (the webhooks queue's prefetch)."""
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0


async def consume_webhooks(deps: Deps, deliverer: Deliverer) -> None:
    """Consume the webhooks queue until the stop, reconnecting with backoff on its own so a
    broker outage never stops the fan-out's retries."""
    settings = deps.settings
    delay = RECONNECT_MIN_S
    while not deps.stop.is_set():
        began = anyio.current_time()
        try:
            await consume(
                settings.amqp.url,
                deps.topology,
                deps.topology.webhooks,
                deliverer.handle,
                concurrency=CONCURRENCY,
                stop=deps.stop,
                grace_s=settings.shutdown.grace_s,
            )
        except BrokerError as exc:
            if anyio.current_time() - began > RECONNECT_MAX_S:
                delay = RECONNECT_MIN_S
            log.warning("webhooks consumer: %s; again in %.1f s", exc, delay)
            with anyio.move_on_after(delay):
                await deps.stop.wait()
            delay = min(delay * 2, RECONNECT_MAX_S)


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
