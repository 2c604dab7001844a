"""A publisher that only reports success once the broker has confirmed the message.

The email table is the outbox: a publish that raises is retried later by the sweeper, so this
class never retries on its own; it fails fast and lets the caller decide.

Failing fast includes outages: once a connect failed or a confirm timed out, publishes fail at
once (no new connect) for a short window that grows while the broker stays away
(`DOWN_MIN_S` .. `DOWN_MAX_S`); after it one caller tries again while the others keep failing
at once. Without it every API request during a hung-broker outage would wait the whole timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiormq
import aiormq.abc
import anyio
from aiormq import spec

from pipeline.amqp.connection import connect, safe_url
from pipeline.amqp.topology import Topology, declare
from pipeline.errors import BrokerError, PublishNotConfirmed

log = logging.getLogger(__name__)

DOWN_MIN_S = 1.0
DOWN_MAX_S = 5.0
"""The window in which publishes fail without a connect attempt after the broker failed one;
it doubles from the first to the second while failures go on and closes on a success."""

PublishItem = tuple[str, bytes, str, Mapping[str, Any] | None]
"""(routing_key, body, message_id, headers) for `ConfirmedPublisher.publish_many`."""


@dataclass(eq=False)
class _Link:
    """One connection and its confirm channel, and the publishes waiting on it.

    When the channel closes, aiormq rejects pending confirms, but a publish still waiting to
    enqueue its frame (the writer's queue is bounded) would wait forever for a writer that is
    gone; so a closed channel cancels every publish registered here.
    """

    connection: aiormq.abc.AbstractConnection
    channel: aiormq.Channel
    waiting: set[anyio.CancelScope] = field(default_factory=set)
    broken: bool = False
    """A confirm timed out on it: the broker may be hung; do not trust the link any more."""

    def __post_init__(self) -> None:
        self._closing = self.channel.closing
        self._closing.add_done_callback(self._on_closed)

    def _on_closed(self, _: asyncio.Future[Any] | None = None) -> None:
        for scope in list(self.waiting):
            scope.cancel()

    @property
    def usable(self) -> bool:
        return not (self.broken or self.channel.is_closed or self.connection.is_closed)

    async def close(self, timeout_s: float) -> None:
        self._closing.cancel()  # detach the observer
        self._on_closed()
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout_s):
            await self.connection.close(None)


class ConfirmedPublisher:
    """Persistent, mandatory publishes on a confirm channel, one connection per publisher.

    Connects on first use and again after the connection is lost; concurrent callers share one
    (re)connect attempt and its failure. Every publish, reconnect included, takes at most
    `timeout_s`; after a failed connect or a confirm timeout, publishes fail at once for a
    short while (see the module's docstring). The topology is declared once per connection.
    """

    def __init__(
        self,
        url: str,
        topology: Topology,
        *,
        timeout_s: float = 5,
        content_type: str = "application/json",
    ) -> None:
        self._url = url
        self._topology = topology
        self._timeout_s = timeout_s
        self._content_type = content_type
        self._lock = anyio.Lock()
        self._link: _Link | None = None
        # Bumped by every connect attempt; a caller that waited for the lock while an attempt
        # ran shares that attempt's failure instead of making its own.
        self._attempt = 0
        self._last_error: BrokerError | None = None
        # The broker failed us: until `_down_until` (anyio time) no connect is attempted.
        self._down_until = 0.0
        self._down_for = 0.0
        # aiormq matches a Basic.Return to its publish by message_id, so two unconfirmed
        # publishes with one id would be confused: the same id waits for the previous one.
        self._in_flight: dict[str, anyio.Event] = {}
        self._closed = False

    @property
    def connection(self) -> aiormq.abc.AbstractConnection | None:
        """The current connection, if any (for health checks and tests)."""
        return self._link.connection if self._link is not None else None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; later publishes raise PublishNotConfirmed."""
        self._closed = True
        link, self._link = self._link, None
        if link is not None:
            await link.close(self._timeout_s)

    async def check(self) -> None:
        """Raise BrokerError unless a confirm channel is open (connecting if need be)."""
        with anyio.fail_after(self._timeout_s):
            await self._ready_link()

    def _broker_down(self, error: BrokerError) -> None:
        """A connect failed or a confirm timed out: distrust the link, open the window."""
        if self._link is not None:
            self._link.broken = True
        self._last_error = error
        now = anyio.current_time()
        if now < self._down_until:
            return  # the same outage, already counted
        self._down_for = min(max(2 * self._down_for, DOWN_MIN_S), DOWN_MAX_S)
        self._down_until = now + self._down_for

    def _fail_fast(self) -> None:
        """Raise when the broker failed recently: within the window, or while another caller
        is already trying it again."""
        if self._last_error is None:
            return
        left = self._down_until - anyio.current_time()
        if left > 0 or self._lock.locked():
            raise BrokerError(
                f"broker unavailable ({self._last_error}); next try in {max(left, 0):.1f} s"
            )

    async def _ready_link(self) -> _Link:
        if self._link is not None and self._link.usable:
            return self._link
        self._fail_fast()
        attempt = self._attempt
        async with self._lock:
            if self._closed:
                raise PublishNotConfirmed("publisher is closed")
            if self._link is not None and self._link.usable:
                return self._link
            if self._attempt != attempt and self._last_error is not None:
                raise BrokerError(str(self._last_error))
            self._attempt += 1
            old, self._link = self._link, None
            if old is not None:
                await old.close(self._timeout_s)
            try:
                self._link = await self._open()
            except BrokerError as e:
                self._broker_down(e)
                raise
            self._last_error = None
            self._down_until = self._down_for = 0.0
            return self._link

    async def _open(self) -> _Link:
        connection = await connect(self._url, timeout_s=self._timeout_s)
        try:
            channel = await connection.channel(publisher_confirms=True)
            assert isinstance(channel, aiormq.Channel)  # basic_publish(wait=...) is not abstract
            await declare(channel, self._topology)
        except BaseException as e:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout_s):
                await connection.close(None)
            if isinstance(e, Exception):
                raise BrokerError(
                    f"AMQP channel setup on {safe_url(self._url)} failed: {e!r}"
                ) from e
            raise
        log.info("publisher connected to %s", safe_url(self._url))
        return _Link(connection, channel)

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm.

        Raises PublishNotConfirmed on a nack, a return (no queue bound to `routing_key`),
        no confirm within `timeout_s`, or a lost connection: the message may or may not be
        queued then, so the caller must be ready to publish it again.
        """
        try:
            with anyio.fail_after(self._timeout_s):
                await self._publish(routing_key, body, message_id, headers)
        except TimeoutError:
            error = PublishNotConfirmed(
                f"publish {message_id} to {routing_key!r} not confirmed within "
                f"{self._timeout_s:g} s"
            )
            self._broker_down(error)
            raise error from None

    async def publish_many(self, items: Sequence[PublishItem]) -> list[bool]:
        """Publish every item with all confirms awaited together; True where confirmed.

        Never raises for one item's failure (one warning sums up the batch), so a batch
        caller can mark the confirmed ones and leave the rest to the outbox sweep. The batch
        shares one link, one timeout and one watch on the channel (a task per item and a
        scope per publish cost more than the publish itself); an id already in flight, or
        twice in the batch, takes the one-by-one path.
        """
        if not items:
            return []
        ids = [item[2] for item in items]
        if len(set(ids)) < len(ids) or any(i in self._in_flight for i in ids):
            return await self._publish_each(items)
        results = [False] * len(items)
        errors: list[BaseException] = []
        done = anyio.Event()
        for message_id in ids:
            self._in_flight[message_id] = done
        try:
            with anyio.fail_after(self._timeout_s):
                link = await self._ready_link()
                with anyio.CancelScope() as lost:
                    link.waiting.add(lost)
                    try:
                        if not link.usable:
                            lost.cancel()
                        sends = [
                            self._send(
                                link.channel, key, body, self._properties(message_id, headers)
                            )
                            for key, body, message_id, headers in items
                        ]
                        outcomes = await asyncio.gather(*sends, return_exceptions=True)
                    finally:
                        link.waiting.discard(lost)
            if lost.cancelled_caught:
                errors.append(PublishNotConfirmed("connection lost before the confirms"))
            else:
                for i, (outcome, message_id) in enumerate(zip(outcomes, ids, strict=True)):
                    if isinstance(outcome, spec.Basic.Ack):
                        results[i] = True
                    elif isinstance(outcome, BrokerError):
                        errors.append(outcome)
                    else:  # a nack, or what a send that was cut short left
                        errors.append(PublishNotConfirmed(f"publish {message_id} got {outcome!r}"))
        except TimeoutError:
            error = PublishNotConfirmed(
                f"{len(items)} publishes not confirmed within {self._timeout_s:g} s"
            )
            self._broker_down(error)
            errors.append(error)
        except BrokerError as e:
            errors.append(e)
        finally:
            for message_id in ids:
                del self._in_flight[message_id]
            done.set()
        if errors:
            log.warning(
                "%d of %d publishes not confirmed; first: %s",
                results.count(False),
                len(items),
                errors[0],
            )
        return results

    def _properties(
        self, message_id: str, headers: Mapping[str, Any] | None
    ) -> spec.Basic.Properties:
        return spec.Basic.Properties(
            delivery_mode=2,
            message_id=message_id,
            content_type=self._content_type,
            headers=dict(headers) if headers else None,
        )

    async def _publish_each(self, items: Sequence[PublishItem]) -> list[bool]:
        """`publish_many` one publish (and task) per item."""
        results = [False] * len(items)
        errors: list[BrokerError] = []

        async def one(i: int, item: PublishItem) -> None:
            routing_key, body, message_id, headers = item
            try:
                await self.publish(routing_key, body, message_id=message_id, headers=headers)
            except BrokerError as e:
                errors.append(e)
            else:
                results[i] = True

        async with anyio.create_task_group() as tg:
            for i, item in enumerate(items):
                tg.start_soon(one, i, item)
        if errors:
            log.warning(
                "%d of %d publishes not confirmed; first: %s", len(errors), len(items), errors[0]
            )
        return results

    async def _publish(
        self,
        routing_key: str,
        body: bytes,
        message_id: str,
        headers: Mapping[str, Any] | None,
    ) -> None:
        while (previous := self._in_flight.get(message_id)) is not None:
            await previous.wait()
        done = self._in_flight[message_id] = anyio.Event()
        try:
            try:
                link = await self._ready_link()
            except PublishNotConfirmed:
                raise
            except BrokerError as e:
                raise PublishNotConfirmed(f"publish {message_id}: {e}") from e
            properties = self._properties(message_id, headers)
            with anyio.CancelScope() as lost:
                link.waiting.add(lost)
                try:
                    if not link.usable:
                        lost.cancel()
                    confirmation = await self._send(link.channel, routing_key, body, properties)
                finally:
                    link.waiting.discard(lost)
            if lost.cancelled_caught:
                raise PublishNotConfirmed(
                    f"publish {message_id}: connection lost before the confirm"
                )
            if not isinstance(confirmation, spec.Basic.Ack):
                raise PublishNotConfirmed(f"publish {message_id} got {confirmation!r}")
        finally:
            del self._in_flight[message_id]
            done.set()

    async def _send(
        self,
        channel: aiormq.Channel,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
    ) -> object:
        """basic_publish with aiormq's failures translated into PublishNotConfirmed."""
        message_id = properties.message_id
        try:
            # wait=False: the channel lock is released once the frame is queued for the
            # writer instead of after each socket drain, so many publishes stay in flight.
            return await channel.basic_publish(
                body,
                exchange=self._topology.exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                wait=False,
            )
        except aiormq.PublishError as e:
            # mandatory=True and no queue bound to the routing key: Basic.Return (then Ack).
            raise PublishNotConfirmed(
                f"publish {message_id} to {self._topology.exchange!r} / {routing_key!r} "
                f"returned by the broker: {e}"
            ) from e
        except aiormq.DeliveryError as e:
            raise PublishNotConfirmed(f"publish {message_id} nacked by the broker") from e
        except asyncio.CancelledError as e:
            # aiormq rejects pending confirms with CancelledError when the connection is closed
            # with close()'s default reason; only a cancel request on this task is a real cancel.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise PublishNotConfirmed(
                f"publish {message_id}: connection closed before the confirm"
            ) from e
        except Exception as e:
            raise PublishNotConfirmed(
                f"publish {message_id}: connection lost before the confirm ({e!r})"
            ) from e
