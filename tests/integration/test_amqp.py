"""The confirmed publisher and the bounded consumer against a real RabbitMQ.

Every test declares its own prefix and deletes its queues and exchange afterwards. Waiting is
always polling against a deadline, never a sleep.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import aiormq
import aiormq.abc
import anyio
import pytest

from pipeline.amqp import publisher as publisher_module
from pipeline.amqp.connection import connect
from pipeline.amqp.consumer import Delivery, consume
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.amqp.topology import SEND, Topology, declare, delay_key, delete_all
from pipeline.errors import BrokerError, PublishNotConfirmed

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
DEADLINE_S = 15


@pytest.fixture
async def top(run_id: str) -> AsyncIterator[Topology]:
    topology = Topology(f"{run_id}.{secrets.token_hex(3)}.", tiers_s=(1,), webhook_tiers_s=(1,))
    yield topology
    with anyio.CancelScope(shield=True):
        connection = await connect(URL)
        try:
            channel = await connection.channel()
            await delete_all(channel, topology)
        finally:
            await connection.close()


@pytest.fixture
async def admin(top: Topology) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A plain channel for looking into queues, with the topology declared."""
    connection = await connect(URL)
    try:
        channel = await connection.channel()
        await declare(channel, top)
        yield channel
    finally:
        await connection.close()


async def depth(channel: aiormq.abc.AbstractChannel, queue: str) -> int:
    ok = await channel.queue_declare(queue, passive=True)
    assert ok.message_count is not None
    return ok.message_count


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll `check` until it holds, failing at the deadline: the broker has no event to await."""
    with anyio.fail_after(DEADLINE_S):
        while True:
            if await check():
                return
            await anyio.sleep(0.05)


async def wait_depth(channel: aiormq.abc.AbstractChannel, queue: str, n: int) -> None:
    async def check() -> bool:
        return await depth(channel, queue) == n

    await eventually(check)


async def get_one(channel: aiormq.abc.AbstractChannel, queue: str) -> aiormq.abc.DeliveredMessage:
    """The next message of `queue` (acked), polled until the deadline."""
    with anyio.fail_after(DEADLINE_S):
        while True:
            message = await channel.basic_get(queue, no_ack=True)
            if isinstance(message.delivery, aiormq.spec.Basic.GetOk):
                return message
            await anyio.sleep(0.05)


@asynccontextmanager
async def consuming(
    topology: Topology,
    queue: str,
    handler: Callable[[Delivery], Awaitable[None]],
    *,
    concurrency: int = 4,
    grace_s: float = 5,
    url: str = URL,
) -> AsyncIterator[anyio.Event]:
    """Run `consume` in the background; yields its stop event and stops it on exit."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(
            partial(
                consume,
                url,
                topology,
                queue,
                handler,
                concurrency=concurrency,
                stop=stop,
                grace_s=grace_s,
            )
        )
        try:
            yield stop
        finally:
            stop.set()


def collector() -> tuple[Callable[[Delivery], Awaitable[None]], list[Delivery], anyio.Event]:
    seen: list[Delivery] = []
    got = anyio.Event()

    async def handler(d: Delivery) -> None:
        seen.append(d)
        await d.ack()
        got.set()

    return handler, seen, got


async def test_round_trip_keeps_id_headers_and_persistence(
    top: Topology, admin: aiormq.abc.AbstractChannel
) -> None:
    handler, seen, got = collector()
    async with ConfirmedPublisher(URL, top, timeout_s=5) as pub:
        await pub.publish(SEND, b'{"id": 1}', message_id="msg_1", headers={"attempt": 2, "k": "v"})
    async with consuming(top, top.send, handler):
        with anyio.fail_after(DEADLINE_S):
            await got.wait()
    [d] = seen
    assert d.body == b'{"id": 1}'
    assert d.message_id == "msg_1"
    assert d.headers == {"attempt": 2, "k": "v"}
    assert d.delivery_mode == 2
    assert d.redelivered is False
    assert d.routing_key == SEND
    assert await depth(admin, top.send) == 0


async def test_publish_many_confirms_every_message(
    top: Topology, admin: aiormq.abc.AbstractChannel
) -> None:
    items = [(SEND, b"x%d" % i, f"msg_{i}", None) for i in range(300)]
    async with ConfirmedPublisher(URL, top) as pub:
        assert await pub.publish_many(items) == [True] * 300
    await wait_depth(admin, top.send, 300)


async def test_publish_many_reports_each_failure_without_raising(
    top: Topology, admin: aiormq.abc.AbstractChannel
) -> None:
    items = [
        (SEND, b"a", "msg_a", None),
        ("nowhere", b"b", "msg_b", None),
        (SEND, b"c", "msg_c", {"h": 1}),
        (SEND, b"d", "msg_a", None),  # same id twice in one batch
    ]
    async with ConfirmedPublisher(URL, top) as pub:
        assert await pub.publish_many(items) == [True, False, True, True]
    await wait_depth(admin, top.send, 3)


async def test_unroutable_publish_raises(top: Topology, admin: aiormq.abc.AbstractChannel) -> None:
    async with ConfirmedPublisher(URL, top) as pub:
        with pytest.raises(PublishNotConfirmed, match="NO_ROUTE"):
            await pub.publish("no-such-queue", b"x", message_id="msg_lost")
        # The channel survives a return.
        await pub.publish(SEND, b"y", message_id="msg_kept")
    await wait_depth(admin, top.send, 1)


async def test_failing_handler_dead_letters_the_message(
    top: Topology, admin: aiormq.abc.AbstractChannel
) -> None:
    calls = 0

    async def handler(d: Delivery) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("boom")

    async with ConfirmedPublisher(URL, top) as pub:
        await pub.publish(SEND, b"bad", message_id="msg_bad")
    async with consuming(top, top.send, handler):
        message = await get_one(admin, top.dead)
    assert message.body == b"bad"
    assert message.header.properties.message_id == "msg_bad"
    assert calls == 1
    assert await depth(admin, top.send) == 0


async def test_delay_tier_expires_back_into_send(
    top: Topology, admin: aiormq.abc.AbstractChannel
) -> None:
    async with ConfirmedPublisher(URL, top) as pub:
        await pub.publish(top.delay_key(1), b"later", message_id="msg_later")
    start = anyio.current_time()
    message = await get_one(admin, top.send)
    assert anyio.current_time() - start >= 0.5
    assert message.body == b"later"
    assert message.header.properties.message_id == "msg_later"
    headers: dict[str, Any] = dict(message.header.properties.headers or {})
    [death] = headers["x-death"]
    assert death["reason"] == "expired"
    assert death["queue"] == top.queue(delay_key(1))


async def test_concurrency_bounds_in_flight_handlers(top: Topology) -> None:
    in_flight = peak = done = 0
    all_done = anyio.Event()

    async def handler(d: Delivery) -> None:
        nonlocal in_flight, peak, done
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.02)
        in_flight -= 1
        await d.ack()
        done += 1
        if done == 30:
            all_done.set()

    async with ConfirmedPublisher(URL, top) as pub:
        items = [(SEND, b"m", f"msg_{i}", None) for i in range(30)]
        assert all(await pub.publish_many(items))
    async with consuming(top, top.send, handler, concurrency=3):
        with anyio.fail_after(DEADLINE_S):
            await all_done.wait()
    assert peak == 3


async def test_returning_handler_is_acked_and_double_settle_refused(
    top: Topology, admin: aiormq.abc.AbstractChannel
) -> None:
    errors: list[BaseException] = []
    got = anyio.Event()

    async def handler(d: Delivery) -> None:
        if d.message_id == "msg_twice":
            await d.ack()
            try:
                await d.nack(requeue=True)
            except RuntimeError as e:
                errors.append(e)
        got.set()  # msg_silent returns without settling

    async with ConfirmedPublisher(URL, top) as pub:
        await pub.publish(SEND, b"1", message_id="msg_twice")
        await pub.publish(SEND, b"2", message_id="msg_silent")

    async def both_handled() -> bool:
        return len(errors) == 1 and got.is_set() and await depth(admin, top.send) == 0

    async with consuming(top, top.send, handler, concurrency=1):
        await eventually(both_handled)
    assert "already settled" in str(errors[0])
    # Nothing came back after the consumer's channel closed: both were acked exactly once.
    assert await depth(admin, top.send) == 0
    assert await depth(admin, top.dead) == 0


async def test_stop_lets_in_flight_handlers_finish_within_grace(
    top: Topology, admin: aiormq.abc.AbstractChannel
) -> None:
    stop = anyio.Event()
    started = 0
    all_started = anyio.Event()
    acked: list[str] = []

    async def handler(d: Delivery) -> None:
        nonlocal started
        started += 1
        if started == 3:
            all_started.set()
        await stop.wait()
        await anyio.sleep(0.2)  # work that runs past the stop
        await d.ack()
        acked.append(d.message_id or "")

    async with ConfirmedPublisher(URL, top) as pub:
        assert all(await pub.publish_many([(SEND, b"m", f"msg_{i}", None) for i in range(3)]))
    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            await tg.start(
                partial(consume, URL, top, top.send, handler, concurrency=3, stop=stop, grace_s=10)
            )
            await all_started.wait()
            stop.set()
    assert sorted(acked) == ["msg_0", "msg_1", "msg_2"]
    assert await depth(admin, top.send) == 0


async def test_handler_slower_than_grace_is_cancelled_and_redelivered(
    top: Topology, admin: aiormq.abc.AbstractChannel, caplog: pytest.LogCaptureFixture
) -> None:
    stop = anyio.Event()
    started = anyio.Event()
    cancelled = anyio.Event()

    async def slow(d: Delivery) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    async with ConfirmedPublisher(URL, top) as pub:
        await pub.publish(SEND, b"slow", message_id="msg_slow")
    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            await tg.start(
                partial(consume, URL, top, top.send, slow, concurrency=2, stop=stop, grace_s=0.3)
            )
            await started.wait()
            stop.set()
            t0 = anyio.current_time()
        assert anyio.current_time() - t0 < 0.3 + 5
    assert cancelled.is_set()
    assert "in-flight handlers cancelled after 0.3 s grace" in caplog.text

    handler, seen, got = collector()
    async with consuming(top, top.send, handler):
        with anyio.fail_after(DEADLINE_S):
            await got.wait()
    [d] = seen
    assert d.message_id == "msg_slow"
    assert d.redelivered is True


async def test_publisher_reconnects_after_its_connection_closes(
    top: Topology, admin: aiormq.abc.AbstractChannel
) -> None:
    async with ConfirmedPublisher(URL, top) as pub:
        await pub.publish(SEND, b"1", message_id="msg_1")
        first = pub.connection
        assert first is not None
        await first.close()
        await pub.publish(SEND, b"2", message_id="msg_2")
        assert pub.connection is not None and pub.connection is not first
    await wait_depth(admin, top.send, 2)


def count_connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every connect the publisher makes."""
    calls: list[str] = []
    real = publisher_module.connect

    async def counting(url: str, *, timeout_s: float = 5) -> aiormq.abc.AbstractConnection:
        calls.append(url)
        return await real(url, timeout_s=timeout_s)

    monkeypatch.setattr(publisher_module, "connect", counting)
    return calls


async def test_concurrent_publishes_share_one_reconnect(
    top: Topology, admin: aiormq.abc.AbstractChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_connects(monkeypatch)
    async with ConfirmedPublisher(URL, top) as pub:
        assert (
            await pub.publish_many([(SEND, b"x", f"a{i}", None) for i in range(50)]) == [True] * 50
        )
        assert len(calls) == 1
        connection = pub.connection
        assert connection is not None
        await connection.close()
        assert (
            await pub.publish_many([(SEND, b"x", f"b{i}", None) for i in range(50)]) == [True] * 50
        )
        assert len(calls) == 2
    await wait_depth(admin, top.send, 100)


async def test_concurrent_publishes_share_one_failed_connect(
    top: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_connects(monkeypatch)
    async with ConfirmedPublisher("amqp://guest:guest@127.0.0.1:1/", top, timeout_s=2) as pub:
        with anyio.fail_after(4):
            results = await pub.publish_many([(SEND, b"x", f"m{i}", None) for i in range(20)])
    assert results == [False] * 20
    assert len(calls) == 1


async def test_publishes_in_flight_when_the_connection_closes_fail_cleanly(
    top: Topology, admin: aiormq.abc.AbstractChannel
) -> None:
    async with ConfirmedPublisher(URL, top) as pub:
        await pub.publish(SEND, b"0", message_id="msg_warm")
        connection = pub.connection
        assert connection is not None
        results: list[bool] = []

        async def batch() -> None:
            items = [(SEND, b"x", f"msg_{i}", None) for i in range(500)]
            results.extend(await pub.publish_many(items))

        async with anyio.create_task_group() as tg:
            tg.start_soon(batch)
            await anyio.lowlevel.checkpoint()
            await connection.close()
        assert len(results) == 500  # each failure reported as False, none raised
        await pub.publish(SEND, b"after", message_id="msg_after")
    # At least the confirmed ones are there (unconfirmed ones may or may not be).
    await wait_depth(admin, top.send, await depth(admin, top.send))
    assert await depth(admin, top.send) >= 2 + sum(results)


async def test_publisher_against_a_closed_port_fails_within_timeout(top: Topology) -> None:
    url = "amqp://guest:s3cr3tpw@127.0.0.1:1/"
    async with ConfirmedPublisher(url, top, timeout_s=2) as pub:
        with anyio.fail_after(4), pytest.raises(PublishNotConfirmed) as info:
            await pub.publish(SEND, b"x", message_id="msg_x")
        results = await pub.publish_many([(SEND, b"x", f"msg_{i}", None) for i in range(5)])
    assert results == [False] * 5
    assert "s3cr3tpw" not in str(info.value)
    assert "s3cr3tpw" not in str(info.value.__cause__)


async def test_publisher_against_a_silent_server_times_out() -> None:
    """A peer that accepts TCP but never speaks AMQP must not hang the caller."""
    top = Topology("unused.")
    held: list[Any] = []

    async def hold(stream: Any) -> None:
        held.append(stream)
        await anyio.sleep_forever()

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, hold)
            async with ConfirmedPublisher(
                f"amqp://guest:guest@127.0.0.1:{port}/", top, timeout_s=0.5
            ) as pub:
                t0 = anyio.current_time()
                with pytest.raises(PublishNotConfirmed, match=r"timed out|not confirmed"):
                    await pub.publish(SEND, b"x", message_id="msg_x")
                assert anyio.current_time() - t0 < 2
            tg.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()


async def test_connect_error_names_no_password() -> None:
    with pytest.raises(BrokerError) as info:
        await connect("amqp://guest:s3cr3tpw@127.0.0.1:1/", timeout_s=2)
    assert "s3cr3tpw" not in str(info.value)
    assert "127.0.0.1:1" in str(info.value)


async def test_consumer_raises_when_the_broker_cancels_it(
    top: Topology, admin: aiormq.abc.AbstractChannel
) -> None:
    handler, _, _ = collector()
    stop = anyio.Event()
    with (
        anyio.fail_after(DEADLINE_S),
        pytest.RaisesGroup(pytest.RaisesExc(BrokerError, match="cancelled")),
    ):
        async with anyio.create_task_group() as tg:
            await tg.start(
                partial(consume, URL, top, top.retry, handler, concurrency=1, stop=stop, grace_s=1)
            )
            await admin.queue_delete(top.retry)
            await anyio.sleep_forever()  # the consumer's error ends the group


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl")
async def test_consumer_raises_when_its_connection_is_killed(top: Topology) -> None:
    name = f"{top.prefix}consumer"
    handler, _, _ = collector()
    stop = anyio.Event()

    async def kill() -> None:
        pid = await connection_pid(name)
        await anyio.to_thread.run_sync(_rabbitmqctl, "close_connection", pid, "test kill")

    with (
        anyio.fail_after(DEADLINE_S * 3),
        pytest.RaisesGroup(pytest.RaisesExc(BrokerError, match="closed")),
    ):
        async with anyio.create_task_group() as tg:
            await tg.start(
                partial(
                    consume,
                    f"{URL}?name={name}",
                    top,
                    top.send,
                    handler,
                    concurrency=1,
                    stop=stop,
                    grace_s=1,
                )
            )
            await kill()
            await anyio.sleep_forever()


async def connection_pid(name: str) -> str:
    """The broker's id of the connection whose client named itself `name`."""
    with anyio.fail_after(DEADLINE_S * 2):
        while True:
            out = await anyio.to_thread.run_sync(
                _rabbitmqctl, "list_connections", "pid", "client_properties"
            )
            pids = [line.split("\t")[0] for line in out.splitlines() if name in line]
            if pids:
                return pids[0]


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl")
async def test_publisher_reconnects_after_the_broker_drops_it(
    top: Topology, admin: aiormq.abc.AbstractChannel
) -> None:
    name = f"{top.prefix}publisher"
    async with ConfirmedPublisher(f"{URL}?name={name}", top) as pub:
        await pub.publish(SEND, b"1", message_id="msg_1")
        first = pub.connection
        assert first is not None
        pid = await connection_pid(name)
        await anyio.to_thread.run_sync(_rabbitmqctl, "close_connection", pid, "test kill")
        with anyio.fail_after(DEADLINE_S), pytest.raises(aiormq.ConnectionClosed):
            await first.closing
        await pub.publish(SEND, b"2", message_id="msg_2")
        assert pub.connection is not first
    await wait_depth(admin, top.send, 2)
