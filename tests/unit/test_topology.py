"""Queue naming and arguments: pure, no broker."""

from __future__ import annotations

import pytest

from pipeline.amqp import topology as t
from pipeline.amqp.topology import DELIVERY_LIMIT, Topology


def test_names_carry_the_prefix_and_the_role() -> None:
    assert t.exchange_name("p.") == "p.mailpipe"
    assert t.send_queue("p.") == "p.send"
    assert t.dead_queue("p.") == "p.dead"
    assert t.retry_queue("p.") == "p.retry"
    assert t.delay_queue("p.", 30) == "p.delay.30s"
    assert t.webhooks_queue("p.") == "p.webhooks"
    assert t.webhook_delay_queue("p.", 5) == "p.webhooks.delay.5s"
    assert t.webhook_dead_queue("p.") == "p.webhooks.dead"
    assert t.send_queue("") == "send"


def test_topology_properties_match_the_functions() -> None:
    top = Topology("x-", tiers_s=(5, 60), webhook_tiers_s=(10,))
    assert top.exchange == "x-mailpipe"
    assert (top.send, top.dead, top.retry) == ("x-send", "x-dead", "x-retry")
    assert (top.webhooks, top.webhook_dead) == ("x-webhooks", "x-webhooks.dead")
    assert top.delay(60) == "x-delay.60s"
    assert top.delay_key(60) == "delay.60s"
    assert top.webhook_delay(10) == "x-webhooks.delay.10s"
    assert top.webhook_delay_key(10) == "webhooks.delay.10s"
    assert top.queue(t.SEND) == top.send


def test_every_queue_is_bound_with_its_name_minus_the_prefix() -> None:
    top = Topology("x-", tiers_s=(5, 60), webhook_tiers_s=(10,))
    names = [q.name for q in top.queues()]
    assert len(names) == len(set(names))
    assert names == [
        "x-send",
        "x-dead",
        "x-retry",
        "x-delay.5s",
        "x-delay.60s",
        "x-webhooks",
        "x-webhooks.dead",
        "x-webhooks.delay.10s",
    ]
    for q in top.queues():
        assert q.name == "x-" + q.routing_key


def test_tiers_are_sorted_and_unique() -> None:
    top = Topology("p", tiers_s=(60, 5, 60), webhook_tiers_s=[30, 1])  # type: ignore[arg-type]
    assert top.tiers_s == (5, 60)
    assert top.webhook_tiers_s == (1, 30)
    assert top == Topology("p", tiers_s=(5, 60), webhook_tiers_s=(1, 30))


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "5"])
def test_bad_tiers_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        Topology("p", tiers_s=(bad,))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Topology("p", webhook_tiers_s=(bad,))  # type: ignore[arg-type]


def test_unknown_tier_is_refused() -> None:
    top = Topology("p", tiers_s=(5,), webhook_tiers_s=(7,))
    with pytest.raises(ValueError):
        top.delay(6)
    with pytest.raises(ValueError):
        top.webhook_delay(5)


def _args(top: Topology) -> dict[str, dict[str, object]]:
    return {q.name: q.arguments for q in top.queues()}


def test_work_queues_are_quorum_with_delivery_limit_and_dead_letter() -> None:
    top = Topology("p.", tiers_s=(5,), webhook_tiers_s=(5,))
    args = _args(top)
    expected = [("p.send", "dead"), ("p.retry", "dead"), ("p.webhooks", "webhooks.dead")]
    for queue, dead_key in expected:
        assert args[queue]["x-queue-type"] == "quorum"
        assert args[queue]["x-delivery-limit"] == DELIVERY_LIMIT
        assert args[queue]["x-dead-letter-exchange"] == "p.mailpipe"
        assert args[queue]["x-dead-letter-routing-key"] == dead_key
        assert args[queue]["x-dead-letter-strategy"] == "at-least-once"
        assert args[queue]["x-overflow"] == "reject-publish"
        assert "x-message-ttl" not in args[queue]


def test_dead_queues_are_plain_quorum_queues() -> None:
    args = _args(Topology("p."))
    assert args["p.dead"] == {"x-queue-type": "quorum"}
    assert args["p.webhooks.dead"] == {"x-queue-type": "quorum"}


def test_delay_tiers_expire_back_into_their_work_queue() -> None:
    args = _args(Topology("p.", tiers_s=(1, 30), webhook_tiers_s=(60,)))
    for queue, ttl_ms, back_to in [
        ("p.delay.1s", 1000, "send"),
        ("p.delay.30s", 30_000, "send"),
        ("p.webhooks.delay.60s", 60_000, "webhooks"),
    ]:
        assert args[queue]["x-message-ttl"] == ttl_ms
        assert args[queue]["x-dead-letter-exchange"] == "p.mailpipe"
        assert args[queue]["x-dead-letter-routing-key"] == back_to
        assert "x-delivery-limit" not in args[queue]


def test_delivery_limit_is_configurable_and_positive() -> None:
    assert _args(Topology("p.", delivery_limit=3))["p.send"]["x-delivery-limit"] == 3
    with pytest.raises(ValueError):
        Topology("p.", delivery_limit=0)
