"""A bounded consumer loop: `concurrency` workers, at most `concurrency` unacked messages.

aiormq runs each delivery callback in a task of its own; here that callback only hands the
message to a memory stream, so every handler runs inside our anyio task group, where stopping
and cancelling them is structured.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
import aiormq.abc
import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.amqp.connection import connect
from pipeline.amqp.topology import Topology, declare
from pipeline.errors import BrokerError

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0
"""Longest wait for each step of the shielded cleanup (cancel, channel and connection close)."""


class Delivery:
    """One received message; settle it at most once (ack, nack or reject).

    A second settlement raises RuntimeError: the broker would close the channel over an
    unknown delivery tag, taking every other in-flight message with it.
    """

    __slots__ = ("_message", "_settled")

    def __init__(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._message = message
        self._settled = False

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def message_id(self) -> str | None:
        return self._message.header.properties.message_id

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self._message.header.properties.headers or {})

    @property
    def redelivered(self) -> bool:
        return bool(self._message.redelivered)

    @property
    def delivery_mode(self) -> int | None:
        return self._message.header.properties.delivery_mode

    @property
    def routing_key(self) -> str | None:
        return self._message.routing_key

    @property
    def settled(self) -> bool:
        return self._settled

    def _claim(self, what: str) -> int:
        if self._settled:
            raise RuntimeError(f"{what}: message {self.message_id} is already settled")
        tag = self._message.delivery_tag
        if tag is None:  # only Basic.Get or Basic.Return messages lack one
            raise RuntimeError(f"{what}: message {self.message_id} has no delivery tag")
        self._settled = True
        return tag

    async def ack(self) -> None:
        tag = self._claim("ack")
        await self._settle(self._message.channel.basic_ack(tag))

    async def nack(self, requeue: bool) -> None:
        tag = self._claim("nack")
        await self._settle(self._message.channel.basic_nack(tag, requeue=requeue))

    async def reject(self, requeue: bool) -> None:
        tag = self._claim("reject")
        await self._settle(self._message.channel.basic_reject(tag, requeue=requeue))

    async def _settle(self, call: Awaitable[None]) -> None:
        try:
            await call
        except Exception as e:
            # The channel is gone, so the broker will redeliver the message anyway.
            raise BrokerError(f"could not settle message {self.message_id}: {e!r}") from e


Handler = Callable[[Delivery], Awaitable[None]]


async def consume(
    url: str,
    topology: Topology,
    queue: str,
    handler: Handler,
    *,
    concurrency: int,
    stop: anyio.Event,
    grace_s: float,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Consume `queue` with `concurrency` workers until `stop` is set, then drain.

    A handler that raises gets its message nacked without requeue, so the broker dead-letters
    it; a handler that returns without settling gets its message acked. On `stop`, no new
    message is taken, in-flight handlers get `grace_s` to finish and are then cancelled, and
    their messages stay unacked, so the broker redelivers them. Returns normally after a stop;
    raises BrokerError when the connection or the channel is lost or the broker cancels the
    consumer, so a supervisor can start again.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    connection = await connect(url)
    try:
        await _consume(
            connection, topology, queue, handler, concurrency, stop, grace_s, task_status
        )
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
            await connection.close(None)


RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 10.0


async def consume_reconnecting(
    url: str,
    topology: Topology,
    queue: str,
    handler: Handler,
    *,
    concurrency: int,
    stop: anyio.Event,
    grace_s: float,
) -> None:
    """`consume` until `stop`, reconnecting with backoff after each broker failure, for a
    consumer that must not take its role down with it (the role's other work goes on)."""
    delay = RECONNECT_MIN_S
    while not stop.is_set():
        began = anyio.current_time()
        try:
            await consume(
                url, topology, queue, handler, concurrency=concurrency, stop=stop, grace_s=grace_s
            )
        except BrokerError as exc:
            if anyio.current_time() - began > RECONNECT_MAX_S:
                delay = RECONNECT_MIN_S
            log.warning("consumer of %s: %s; again in %.1f s", queue, exc, delay)
            with anyio.move_on_after(delay):
                await stop.wait()
            delay = min(delay * 2, RECONNECT_MAX_S)


async def _consume(
    connection: aiormq.abc.AbstractConnection,
    topology: Topology,
    queue: str,
    handler: Handler,
    concurrency: int,
    stop: anyio.Event,
    grace_s: float,
    task_status: TaskStatus[None],
) -> None:
    try:
        channel = await connection.channel(publisher_confirms=False)
        await declare(channel, topology)
        await channel.basic_qos(prefetch_count=concurrency)
    except Exception as e:
        raise BrokerError(f"AMQP consumer setup for {queue!r} failed: {e!r}") from e

    # prefetch bounds the buffer: never more unacked messages than `concurrency`.
    send, receive = anyio.create_memory_object_stream[Delivery](max_buffer_size=math.inf)
    lost: list[str] = []  # why the consumer must end early, if it must
    lost_event = anyio.Event()
    stopping = False

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        try:
            send.send_nowait(Delivery(message))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # stopping: left unacked, the broker requeues it when the channel closes

    def on_lost(reason: str) -> None:
        if not stopping:
            lost.append(reason)
            lost_event.set()

    def on_broker_cancel(frame: Any) -> None:
        on_lost(f"the broker cancelled the consumer on {queue!r} (queue deleted?)")

    channel.on_consumer_cancel_callbacks.add(on_broker_cancel)
    try:
        ok = await channel.basic_consume(queue, on_message)
    except Exception as e:
        raise BrokerError(f"basic_consume on {queue!r} failed: {e!r}") from e
    consumer_tag = ok.consumer_tag
    assert consumer_tag is not None

    def on_channel_closed(closing: asyncio.Future[Any]) -> None:
        # A callback rather than an awaiting task: aiormq may finish this future with a
        # CancelledError, which inside a task would pass for a cancellation of the task.
        reason = None if closing.cancelled() else closing.exception()
        on_lost(f"AMQP channel for {queue!r} closed: {reason!r}")

    closing = channel.closing
    closing.add_done_callback(on_channel_closed)

    # Set on a stop and on a lost channel alike: workers then skip what is still buffered
    # (left unacked, so redelivered) while in-flight handlers get the grace period to finish.
    # Cancelling them at once on a lost connection would cut sends off after the relay may
    # already have taken the message: a duplicate for every send in flight.
    draining = anyio.Event()

    try:
        async with send, anyio.create_task_group() as main:
            async with anyio.create_task_group() as workers:
                for _ in range(concurrency):
                    workers.start_soon(_worker, receive.clone(), handler, draining)
                receive.close()
                task_status.started()
                log.info("consuming %s with %d workers", queue, concurrency)
                await _first_of(stop, lost_event)
                stopping = True
                draining.set()
                if not lost:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
                        try:
                            await channel.basic_cancel(consumer_tag)
                        except Exception as e:
                            log.warning("basic_cancel on %s failed: %r", queue, e)
                # Workers skip what is still buffered and leave once it is empty.
                send.close()
                workers.cancel_scope.deadline = anyio.current_time() + grace_s
            if workers.cancel_scope.cancel_called:
                log.warning("%s: in-flight handlers cancelled after %g s grace", queue, grace_s)
            main.cancel_scope.cancel()
    finally:
        stopping = True
        closing.cancel()  # detach the observer

    if lost:
        raise BrokerError(lost[0])
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT_S):
        await channel.close()


async def _first_of(*events: anyio.Event) -> None:
    """Return as soon as any of `events` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


async def _worker(
    receive: MemoryObjectReceiveStream[Delivery], handler: Handler, draining: anyio.Event
) -> None:
    async with receive:
        async for delivery in receive:
            if draining.is_set():
                continue  # left unacked: redelivered once the channel closes
            await _handle(delivery, handler)


async def _handle(delivery: Delivery, handler: Handler) -> None:
    try:
        await handler(delivery)
    except BrokerError as e:
        # A broker failure (its channel gone, or a publish unconfirmed) is not the message's
        # fault: requeue it rather than dead-letter it. If the channel is gone the broker
        # redelivers it anyway, and the claim keeps a finished email from being sent again.
        log.warning("message %s goes back to its queue: %s", delivery.message_id, e)
        if not delivery.settled:
            try:
                await delivery.nack(requeue=True)
            except BrokerError:
                pass
        return
    except Exception:
        log.exception("handler failed on message %s; dead-lettering it", delivery.message_id)
        if not delivery.settled:
            try:
                await delivery.nack(requeue=False)
            except BrokerError as e:
                log.warning("%s", e)
        return
    if not delivery.settled:
        try:
            await delivery.ack()
        except BrokerError as e:
            log.warning("%s", e)
