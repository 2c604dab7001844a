"""Emptying a dead queue: record each message, then ack it.

A dead queue dead-letters nowhere, so a message that cannot be recorded now (the database is
down) goes back to it and its worker pauses: nothing is ever dropped. The consumer reconnects
with backoff on its own, so a broker outage never holds up the rest of its role.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import psycopg
from psycopg_pool import PoolTimeout

from pipeline.amqp.consumer import Delivery, consume_reconnecting
from pipeline.resources import Deps

log = logging.getLogger(__name__)

CONCURRENCY = 4
RECORD_ERROR_PAUSE_S = 2.0
"""How long a worker waits after it could not record a message (which is requeued)."""

Record = Callable[[Delivery], Awaitable[object]]


async def record_then_ack(deps: Deps, delivery: Delivery, record: Record) -> None:
    try:
        await record(delivery)
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


async def consume_dead_queue(deps: Deps, queue: str, record: Record) -> None:
    """Consume `queue` until the stop, recording each message with `record`."""
    await consume_reconnecting(
        deps.settings.amqp.url,
        deps.topology,
        queue,
        lambda delivery: record_then_ack(deps, delivery, record),
        concurrency=CONCURRENCY,
        stop=deps.stop,
        grace_s=deps.settings.shutdown.grace_s,
    )
