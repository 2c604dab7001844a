"""Queue topology: pure names and arguments, plus the one coroutine that declares them.

Everything hangs off one durable direct exchange. A queue's routing key is its role
(`send`, `dead`, `delay.30s`, ...) and its name is the configurable prefix plus that key, so
several instances share one broker and a name always tells which role a queue plays.

Every queue is a quorum queue, so it replicates when RabbitMQ runs as a cluster. Queues that
dead-letter use the `at-least-once` strategy: the broker keeps a message until the target
queue confirms it, so a delay tier expiring into `send` cannot drop an email on the way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiormq.abc import AbstractChannel

DELIVERY_LIMIT = 20
"""Deliveries of one message before the broker dead-letters it: a crash-loop backstop."""

SEND = "send"
DEAD = "dead"
RETRY = "retry"
WEBHOOKS = "webhooks"
WEBHOOK_DEAD = "webhooks.dead"


def delay_key(ttl_s: int) -> str:
    """Routing key of the email delay tier that holds messages for `ttl_s` seconds."""
    return f"delay.{ttl_s}s"


def webhook_delay_key(ttl_s: int) -> str:
    """Routing key of the webhook delay tier that holds messages for `ttl_s` seconds."""
    return f"webhooks.delay.{ttl_s}s"


def exchange_name(prefix: str) -> str:
    return f"{prefix}mailpipe"


def send_queue(prefix: str) -> str:
    return prefix + SEND


def dead_queue(prefix: str) -> str:
    return prefix + DEAD


def retry_queue(prefix: str) -> str:
    return prefix + RETRY


def delay_queue(prefix: str, ttl_s: int) -> str:
    return prefix + delay_key(ttl_s)


def webhooks_queue(prefix: str) -> str:
    return prefix + WEBHOOKS


def webhook_delay_queue(prefix: str, ttl_s: int) -> str:
    return prefix + webhook_delay_key(ttl_s)


def webhook_dead_queue(prefix: str) -> str:
    return prefix + WEBHOOK_DEAD


@dataclass(frozen=True)
class QueueSpec:
    """One queue as declared: its name, the routing key that binds it, its x-arguments."""

    name: str
    routing_key: str
    arguments: dict[str, Any] = field(hash=False)


def _tiers(name: str, tiers: Iterable[int]) -> tuple[int, ...]:
    out = tuple(sorted(set(tiers)))
    for t in out:
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
            raise ValueError(
                f"{name}: every tier must be a positive whole number of seconds, got {t!r}"
            )
    return out


@dataclass(frozen=True)
class Topology:
    """Every exchange, queue and routing key of one mailpipe instance (one prefix).

    Tiers are normalised to sorted unique tuples, so two equal configs give equal topologies.
    """

    prefix: str
    tiers_s: tuple[int, ...] = ()
    webhook_tiers_s: tuple[int, ...] = ()
    delivery_limit: int = DELIVERY_LIMIT

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiers_s", _tiers("tiers_s", self.tiers_s))
        object.__setattr__(self, "webhook_tiers_s", _tiers("webhook_tiers_s", self.webhook_tiers_s))
        if self.delivery_limit < 1:
            raise ValueError(f"delivery_limit must be at least 1, got {self.delivery_limit!r}")

    @property
    def exchange(self) -> str:
        return exchange_name(self.prefix)

    def queue(self, routing_key: str) -> str:
        """The queue a routing key lands in (the prefix plus the key)."""
        return self.prefix + routing_key

    @property
    def send(self) -> str:
        return send_queue(self.prefix)

    @property
    def dead(self) -> str:
        return dead_queue(self.prefix)

    @property
    def retry(self) -> str:
        return retry_queue(self.prefix)

    @property
    def webhooks(self) -> str:
        return webhooks_queue(self.prefix)

    @property
    def webhook_dead(self) -> str:
        return webhook_dead_queue(self.prefix)

    def delay_key(self, ttl_s: int) -> str:
        """Routing key of an email delay tier; only configured tiers exist (no stray queues)."""
        if ttl_s not in self.tiers_s:
            raise ValueError(f"{ttl_s} s is not a configured delay tier {self.tiers_s}")
        return delay_key(ttl_s)

    def webhook_delay_key(self, ttl_s: int) -> str:
        """Routing key of a webhook delay tier; only configured tiers exist."""
        if ttl_s not in self.webhook_tiers_s:
            raise ValueError(f"{ttl_s} s is not a configured webhook tier {self.webhook_tiers_s}")
        return webhook_delay_key(ttl_s)

    def delay(self, ttl_s: int) -> str:
        return self.prefix + self.delay_key(ttl_s)

    def webhook_delay(self, ttl_s: int) -> str:
        return self.prefix + self.webhook_delay_key(ttl_s)

    def _dead_letter_to(self, routing_key: str) -> dict[str, Any]:
        return {
            "x-dead-letter-exchange": self.exchange,
            "x-dead-letter-routing-key": routing_key,
            # at-least-once dead-lettering needs reject-publish overflow; there is no max
            # length, so overflow never happens.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def _work(self, key: str, dead_key: str) -> QueueSpec:
        """A consumed queue: bounded redeliveries, failures dead-lettered."""
        arguments = {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            **self._dead_letter_to(dead_key),
        }
        return QueueSpec(self.queue(key), key, arguments)

    def _sink(self, key: str) -> QueueSpec:
        return QueueSpec(self.queue(key), key, {"x-queue-type": "quorum"})

    def _delay(self, key: str, ttl_s: int, back_to: str) -> QueueSpec:
        """A delay tier: never consumed; a queue-level TTL (uniform, so the head always
        expires first) dead-letters each message back to the queue it came from."""
        arguments = {
            "x-queue-type": "quorum",
            "x-message-ttl": ttl_s * 1000,
            **self._dead_letter_to(back_to),
        }
        return QueueSpec(self.queue(key), key, arguments)

    def queues(self) -> tuple[QueueSpec, ...]:
        """Every queue, in declaration order."""
        return (
            self._work(SEND, DEAD),
            self._sink(DEAD),
            self._work(RETRY, DEAD),
            *(self._delay(delay_key(t), t, SEND) for t in self.tiers_s),
            self._work(WEBHOOKS, WEBHOOK_DEAD),
            self._sink(WEBHOOK_DEAD),
            *(self._delay(webhook_delay_key(t), t, WEBHOOKS) for t in self.webhook_tiers_s),
        )


async def declare(channel: AbstractChannel, topology: Topology) -> None:
    """Declare the exchange, every queue and every binding; idempotent.

    A queue that exists with other arguments makes the broker close the channel
    (PRECONDITION_FAILED): changing a queue's arguments needs the queue deleted first.
    """
    await channel.exchange_declare(topology.exchange, exchange_type="direct", durable=True)
    for q in topology.queues():
        await channel.queue_declare(q.name, durable=True, arguments=q.arguments)
        await channel.queue_bind(q.name, topology.exchange, routing_key=q.routing_key)


async def delete_all(channel: AbstractChannel, topology: Topology) -> None:
    """Delete every queue and the exchange of a topology (test cleanup)."""
    for q in topology.queues():
        await channel.queue_delete(q.name)
    await channel.exchange_delete(topology.exchange)
