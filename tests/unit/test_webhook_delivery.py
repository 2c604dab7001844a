"""The pure parts of webhook delivery: retry schedule, payload, queue message, fan-out prefix."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import psycopg
import pytest

from pipeline.amqp.topology import Topology
from pipeline.messages import UndecodableMessage
from pipeline.resources import Deps
from pipeline.settings import load_settings
from pipeline.store.queries import DeliveryTarget, FanoutPosition, FanoutRow
from pipeline.webhooks.delivery import (
    ATTEMPT_HEADER,
    FIRST_ATTEMPT_HEADER,
    RETRY_WINDOW_S,
    Deliverer,
    Outcome,
    next_delay_s,
    payload,
)
from pipeline.webhooks.fanout import WebhookMessage, confirmed_prefix

PROPOSED_TIERS = (5, 300, 1800, 7200, 18000, 36000, 43200)


def test_retries_walk_the_tiers_then_repeat_the_longest_until_the_window_ends() -> None:
    tiers = (1, 2, 4)
    assert [next_delay_s(n, 0, tiers) for n in (1, 2, 3, 4, 50)] == [1, 2, 4, 4, 4]
    assert next_delay_s(3, RETRY_WINDOW_S - 1, tiers) == 4
    assert next_delay_s(3, RETRY_WINDOW_S, tiers) is None
    assert next_delay_s(1, 10, tiers, window_s=10) is None


@pytest.mark.parametrize("tiers", [PROPOSED_TIERS, (5, 30, 120, 600, 1800, 3600, 7200), (1, 2)])
def test_a_failing_delivery_is_retried_for_at_least_24_hours(tiers: tuple[int, ...]) -> None:
    """Whatever the tiers, the last attempt comes at or after 24 h from the first."""
    elapsed, attempt = 0.0, 1
    while (delay := next_delay_s(attempt, elapsed, tiers)) is not None:
        elapsed += delay
        attempt += 1
    assert elapsed >= 24 * 3600
    assert elapsed < 24 * 3600 + max(tiers)


def test_the_proposed_production_tiers() -> None:
    """Svix-like spacing: eight attempts over about 29.6 h, the tiers alone summing past 24 h."""
    assert sum(PROPOSED_TIERS) >= 24 * 3600
    elapsed, attempt, times = 0.0, 1, [0.0]
    while (delay := next_delay_s(attempt, elapsed, PROPOSED_TIERS)) is not None:
        elapsed += delay
        attempt += 1
        times.append(elapsed)
    assert len(times) == 8
    assert times[-1] == sum(PROPOSED_TIERS)


def target(**data: object) -> DeliveryTarget:
    return DeliveryTarget(
        webhook_id="wh_1",
        url="https://example.com/hook",
        secret="whsec_AAAA",
        previous_secret=None,
        enabled=True,
        event_id="evt_1",
        event_type="email.sent",
        email_id="msg_1",
        data=dict(data),
        created_at=datetime(2026, 11, 28, 11, 0, 0, 5, tzinfo=timezone(timedelta(hours=1))),
    )


def test_payload() -> None:
    body = payload(target(attempt=1, response={"code": 250, "message": "ok"}))
    assert json.loads(body) == {
        "type": "email.sent",
        "timestamp": "2026-11-28T10:00:00.000005Z",
        "data": {"email_id": "msg_1", "attempt": 1, "response": {"code": 250, "message": "ok"}},
    }
    assert body.startswith(b'{"type":"email.sent","timestamp":')
    assert payload(target(email_id="msg_forged")) == payload(target())  # ours wins
    ts = json.loads(body)["timestamp"]
    assert datetime.fromisoformat(ts.replace("Z", "+00:00")) == target().created_at.astimezone(UTC)


def test_outcomes() -> None:
    assert Outcome(204, None).ok and not Outcome(204, None).gone
    assert Outcome(410, "HTTP 410").gone and not Outcome(410, "HTTP 410").ok
    assert not Outcome(None, "no answer within 5 s").ok
    assert not Outcome(302, "HTTP 302: redirects are not followed").ok


def test_queue_message_round_trip() -> None:
    message = WebhookMessage("wh_abc", "evt_def")
    assert WebhookMessage.decode(message.encode()) == message
    assert message.message_id == "evt_def.wh_abc"
    for bad in (b"", b"[]", b'{"webhook_id": "wh_a"}', b'{"webhook_id": 1, "event_id": "evt_b"}',
                b'{"webhook_id": "wh_a", "event_id": "msg_b"}'):  # fmt: skip
        with pytest.raises(UndecodableMessage):
            WebhookMessage.decode(bad)


def row(xid: int, seq: int, webhook: str | None) -> FanoutRow:
    return FanoutRow(FanoutPosition(xid, seq), f"evt_{seq}", "email.sent", webhook)


def test_the_cursor_moves_past_fully_confirmed_events_only() -> None:
    rows = [
        row(7, 1, "wh_a"),
        row(7, 1, "wh_b"),
        row(7, 2, None),  # no endpoint: nothing to confirm
        row(9, 3, "wh_a"),
        row(9, 4, "wh_a"),
    ]
    assert confirmed_prefix(rows, [True, True, True, True]) == (FanoutPosition(9, 4), 4, 4)
    assert confirmed_prefix(rows, [True, True, False, True]) == (FanoutPosition(7, 2), 2, 2)
    assert confirmed_prefix(rows, [True, False, True, True]) == (None, 0, 0)
    assert confirmed_prefix([row(3, 5, None)], []) == (FanoutPosition(3, 5), 1, 0)
    assert confirmed_prefix([], []) == (None, 0, 0)


class FakeDelivery:
    """The parts of `pipeline.amqp.consumer.Delivery` the deliverer uses."""

    def __init__(self, body: bytes, headers: dict[str, Any]) -> None:
        self.body = body
        self.headers = headers
        self.message_id = "evt_1.wh_1"
        self.settled = False
        self.outcome: tuple[str, bool | None] | None = None

    async def ack(self) -> None:
        self.settled, self.outcome = True, ("ack", None)

    async def nack(self, requeue: bool) -> None:
        self.settled, self.outcome = True, ("nack", requeue)

    async def reject(self, requeue: bool) -> None:
        self.settled, self.outcome = True, ("reject", requeue)


class DatabaseDown:
    def connection(self) -> Any:
        raise psycopg.OperationalError("connection refused")


class Publishes:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, str, dict[str, Any]]] = []

    async def publish(
        self, routing_key: str, body: bytes, *, message_id: str, headers: dict[str, Any]
    ) -> None:
        self.calls.append((routing_key, body, message_id, headers))


def deliverer(publisher: Publishes) -> Deliverer:
    deps = Deps(
        settings=load_settings(env={}),
        db=cast(Any, DatabaseDown()),
        redis=None,
        topology=Topology(prefix="t.", tiers_s=(1,), webhook_tiers_s=(3, 60)),
    )
    deps.stop.set()  # no pause after the outage: nothing else runs in this test
    return Deliverer(deps, cast(Any, None), cast(Any, publisher))


@pytest.mark.anyio
async def test_a_database_outage_postpones_the_message_rather_than_requeueing() -> None:
    """A requeue counts against the queue's delivery limit; a trip round the shortest tier
    does not, and it keeps the attempt number."""
    publisher = Publishes()
    message = WebhookMessage("wh_1", "evt_1")
    delivery = FakeDelivery(
        message.encode(),
        {ATTEMPT_HEADER: 3, FIRST_ATTEMPT_HEADER: 1_800_000_000, "x-death": [{"count": 1}]},
    )
    await deliverer(publisher).handle(cast(Any, delivery))
    assert publisher.calls == [
        (
            "webhooks.delay.3s",
            message.encode(),
            "evt_1.wh_1",
            {ATTEMPT_HEADER: 3, FIRST_ATTEMPT_HEADER: 1_800_000_000},
        )
    ]
    assert delivery.outcome == ("ack", None)


@pytest.mark.anyio
async def test_a_foreign_message_is_dead_lettered() -> None:
    publisher = Publishes()
    delivery = FakeDelivery(b'{"id": "msg_1"}', {})
    await deliverer(publisher).handle(cast(Any, delivery))
    assert delivery.outcome == ("reject", False)
    assert publisher.calls == []
