"""The fan-out: every event row becomes one message per matching endpoint on the webhooks queue.

Nothing that writes events knows about webhooks: this loop tails the `events` table instead, in
an order that cannot skip a row committed late (see migration 0004). One pass locks the cursor
row (`FOR UPDATE SKIP LOCKED`: another process holding it is already on the job), reads a batch
of events with their enabled, subscribed endpoints, publishes one message per (event, endpoint)
with publisher confirms, and moves the cursor past the events whose messages were all confirmed,
in the same transaction. A crash after the confirms and before the commit publishes that batch
again: delivery is at least once, and the receiver deduplicates on `webhook-id` (the event id).

An endpoint is matched when the event is fanned out (normally well under a second after it was
written): an endpoint created later does not get earlier events, and a disabled one gets nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pipeline.amqp.publisher import PublishItem
from pipeline.amqp.topology import WEBHOOKS
from pipeline.messages import UndecodableMessage
from pipeline.resources import Deps
from pipeline.store import queries

log = logging.getLogger(__name__)

BATCH = 500
"""Events read (and their messages published together) per pass."""
POLL_S = 0.2
"""Pause between passes that found nothing to do."""
ERROR_PAUSE_S = 1.0
"""Pause after a pass that failed (database down, broker not confirming)."""


class Publisher(Protocol):
    async def publish_many(self, items: Sequence[PublishItem]) -> list[bool]: ...


@dataclass(frozen=True)
class WebhookMessage:
    """The body of a message on the webhooks queue: which event goes to which endpoint.
    PostgreSQL holds the rest, read again at each attempt (a deleted endpoint gets nothing)."""

    webhook_id: str
    event_id: str

    @property
    def message_id(self) -> str:
        return f"{self.event_id}.{self.webhook_id}"

    def encode(self) -> bytes:
        return json.dumps({"webhook_id": self.webhook_id, "event_id": self.event_id}).encode()

    @classmethod
    def decode(cls, body: bytes) -> WebhookMessage:
        try:
            value = json.loads(body)
            webhook_id, event_id = value["webhook_id"], value["event_id"]
        except (ValueError, TypeError, KeyError) as exc:
            raise UndecodableMessage(f"not a webhook message: {body[:80]!r}") from exc
        if not (isinstance(webhook_id, str) and webhook_id.startswith("wh_")):
            raise UndecodableMessage(f"not a webhook id: {webhook_id!r}")
        if not (isinstance(event_id, str) and event_id.startswith("evt_")):
            raise UndecodableMessage(f"not an event id: {event_id!r}")
        return cls(webhook_id, event_id)


@dataclass(frozen=True)
class Pass:
    """What one fan-out pass did."""

    events: int
    """Events the cursor moved past."""
    published: int
    """Messages confirmed for them."""
    complete: bool
    """False when some publish was not confirmed (the cursor stopped before its event)."""


IDLE = Pass(0, 0, True)


def confirmed_prefix(
    rows: Sequence[queries.FanoutRow], confirmed: Sequence[bool]
) -> tuple[queries.FanoutPosition | None, int, int]:
    """How far the cursor may move: (position of the last event whose every message was
    confirmed, events passed, messages published up to there). `confirmed` has one entry per
    row with an endpoint, in order."""
    position: queries.FanoutPosition | None = None
    events = published = 0
    i = 0
    k = 0
    while i < len(rows):
        current = rows[i].position
        ok, count = True, 0
        while i < len(rows) and rows[i].position == current:
            if rows[i].webhook_id is not None:
                ok = ok and confirmed[k]
                count += 1
                k += 1
            i += 1
        if not ok:
            break
        position, events, published = current, events + 1, published + count
    return position, events, published


async def fan_out_once(
    db: AsyncConnectionPool, publisher: Publisher, *, batch: int = BATCH
) -> Pass:
    """One pass over up to `batch` events; see the module's docstring."""
    async with db.connection() as conn:
        if not await queries.webhook_events_pending(conn):
            return IDLE
        async with conn.transaction():
            cursor = await queries.lock_fanout_cursor(conn)
            if cursor is None:
                return IDLE  # another process is fanning out right now
            rows = await queries.fanout_batch(conn, cursor, limit=batch)
            items: list[PublishItem] = []
            for row in rows:
                if row.webhook_id is not None:
                    message = WebhookMessage(row.webhook_id, row.event_id)
                    items.append((WEBHOOKS, message.encode(), message.message_id, None))
            confirmed = await publisher.publish_many(items) if items else []
            position, events, published = confirmed_prefix(rows, confirmed)
            if position is not None:
                await queries.move_fanout_cursor(conn, position)
    return Pass(events, published, all(confirmed))


async def run_fanout(deps: Deps, publisher: Publisher) -> None:
    """Fan out until the stop: right away while there is a backlog, else every POLL_S."""
    while not deps.stop.is_set():
        try:
            done = await fan_out_once(deps.db, publisher)
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("webhook fan-out: database unavailable (%s)", exc)
            done = Pass(0, 0, False)
        if done.published:
            log.debug("webhook fan-out: %d events, %d messages", done.events, done.published)
        if done.complete and done.events >= BATCH:
            continue
        with anyio.move_on_after(POLL_S if done.complete else ERROR_PAUSE_S):
            await deps.stop.wait()
