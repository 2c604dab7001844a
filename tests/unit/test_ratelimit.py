"""GCRA math and headers (pure), the Lua script on the real Redis, and the limiter's fallback."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import coredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import ratelimit as ratelimit_module
from pipeline.ratelimit import (
    GCRA_SCRIPT,
    US,
    Decision,
    Limit,
    RateLimiter,
    decide,
    gcra,
    headers,
    refusal_detail,
)
from tests.tcp_proxy import tcp_proxy

REDIS = ("127.0.0.1", 6379)

# ---------------------------------------------------------------- pure math


@pytest.mark.parametrize(
    ("rate", "burst", "interval", "window"),
    [
        (2, 5, 500_000, 3),
        (10, 20, 100_000, 2),
        (3, 3, 333_334, 1),
        (0.3, 3, 3_333_334, 10),
        (0.1, 1, 10_000_000, 10),
        (1000, 1, 1000, 1),
        (7, 1, 142_858, 1),
    ],
)
def test_limit_interval_and_window(rate: float, burst: int, interval: int, window: int) -> None:
    limit = Limit(rate, burst)
    assert limit.interval_us == interval
    assert limit.tolerance_us == interval * burst
    assert limit.window_s == window


@pytest.mark.parametrize(("rate", "burst"), [(0, 5), (-1, 5), (1, 0), (float("inf"), 1)])
def test_limit_refuses_nonsense(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        Limit(rate, burst)


def test_burst_then_steady_rate() -> None:
    limit = Limit(2, 5)  # one token every 0.5 s, five at once
    tat = None
    now = 10 * US
    results = []
    for _ in range(8):
        allowed, tat = gcra(tat, now, limit, 1)
        results.append(allowed)
    assert results == [True] * 5 + [False] * 3
    assert tat == now + 5 * limit.interval_us
    allowed, tat2 = gcra(tat, now + limit.interval_us - 1, limit, 1)
    assert not allowed and tat2 == tat
    allowed, _ = gcra(tat, now + limit.interval_us, limit, 1)
    assert allowed


def test_cost_zero_only_looks_and_cost_above_burst_never_passes() -> None:
    limit = Limit(2, 5)
    assert gcra(None, 100, limit, 0) == (True, 100)
    assert gcra(None, 100, limit, 5) == (True, 100 + 5 * limit.interval_us)
    assert gcra(None, 100, limit, 6) == (False, 100)


def test_decision_values_and_headers() -> None:
    limit = Limit(2, 5)
    full = decide(True, 0, limit, 0, shared=True)
    assert (full.remaining, full.reset_s, full.retry_after_s) == (5, 0, None)
    one_used = decide(True, 500_000, limit, 1, shared=True)
    assert (one_used.remaining, one_used.reset_s) == (4, 1)
    assert headers(one_used) == {
        "RateLimit-Policy": '"default";q=5;w=3',
        "RateLimit": '"default";r=4;t=1',
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "4",
        "X-RateLimit-Reset": "1",
    }
    # Empty bucket: the next token comes in 0.5 s, announced as 1 (rounded up, >= 1).
    empty = decide(False, 2_500_000, limit, 1, shared=True)
    assert (empty.remaining, empty.reset_s, empty.retry_after_s) == (0, 3, 1)
    # Three tokens wanted with 1.2 tokens there: 0.9 s to wait -> 1; four wanted: 1.4 s -> 2.
    partial = decide(False, 1_900_000, limit, 3, shared=True)
    assert (partial.remaining, partial.retry_after_s) == (1, 1)
    assert decide(False, 1_900_000, limit, 4, shared=True).retry_after_s == 2


def test_cost_above_burst_still_names_a_wait_and_says_why() -> None:
    limit = Limit(2, 5)
    decision = decide(False, 0, limit, 6, shared=True)
    assert decision.exceeds_burst and decision.retry_after_s is not None
    assert decision.retry_after_s >= 1
    assert decision.remaining == 5
    assert "costs 6 emails" in refusal_detail(decision)
    assert "burst is 5" in refusal_detail(decision)
    limited = decide(False, 2_500_000, limit, 1, shared=True)
    assert "retry in 1 s" in refusal_detail(limited)


limits = st.builds(
    Limit,
    rate=st.sampled_from([0.5, 1, 2, 3, 7, 10, 50, 333]),
    burst=st.integers(1, 30),
)
steps = st.lists(
    st.tuples(st.integers(0, 3 * US), st.integers(0, 6)), min_size=1, max_size=40
)  # (time since the previous request in µs, cost)


def _run(limit: Limit, plan: list[tuple[int, int]]) -> tuple[int | None, int, Decision]:
    tat: int | None = None
    now = 1_000 * US
    decision = decide(True, 0, limit, 0, shared=False)
    for gap, cost in plan:
        now += gap
        allowed, tat = gcra(tat, now, limit, cost)
        decision = decide(allowed, tat - now, limit, cost, shared=False)
    return tat, now, decision


@given(limits, steps)
def test_remaining_is_what_passes_right_now(limit: Limit, plan: list[tuple[int, int]]) -> None:
    """X-RateLimit-Remaining = how many one-email requests would pass at this instant."""
    tat, now, decision = _run(limit, plan)
    passed = 0
    while True:
        allowed, tat = gcra(tat, now, limit, 1)
        if not allowed:
            break
        passed += 1
    assert passed == decision.remaining
    assert 0 <= decision.remaining <= limit.burst


@given(limits, steps)
def test_retry_after_is_enough_and_reset_fills_the_bucket(
    limit: Limit, plan: list[tuple[int, int]]
) -> None:
    tat, now, decision = _run(limit, plan)
    if decision.retry_after_s is not None and not decision.exceeds_burst:
        assert decision.retry_after_s >= 1
        assert gcra(tat, now + decision.retry_after_s * US, limit, decision.cost)[0]
        # ...and it is the least whole number of seconds that is enough.
        if decision.retry_after_s > 1:
            late = now + (decision.retry_after_s - 1) * US
            assert not gcra(tat, late, limit, decision.cost)[0]
    later = now + decision.reset_s * US
    _, full_tat = gcra(tat, later, limit, 0)
    assert decide(True, full_tat - later, limit, 0, shared=False).remaining == limit.burst


@given(limits, st.lists(st.integers(0, 200_000), min_size=1, max_size=200))
def test_never_more_than_burst_plus_rate_times_time(limit: Limit, gaps: list[int]) -> None:
    tat: int | None = None
    now = start = 5 * US
    accepted = 0
    for gap in gaps:
        now += gap
        allowed, tat = gcra(tat, now, limit, 1)
        accepted += allowed
    assert accepted <= limit.burst + (now - start) // limit.interval_us


# ---------------------------------------------------------------- the Lua script on Redis


@pytest.fixture
async def redis() -> AsyncIterator[coredis.Redis[bytes]]:
    client: coredis.Redis[bytes] = coredis.Redis(host=REDIS[0], port=REDIS[1])
    async with client:
        yield client


@pytest.fixture
def prefix() -> str:
    return f"test:{secrets.token_hex(6)}:"


async def _cleanup(redis: coredis.Redis[bytes], prefix: str) -> None:
    found = [key async for key in redis.scan_iter(match=f"{prefix}*")]
    if found:
        await redis.delete(found)


@pytest.mark.anyio
async def test_script_matches_the_python_step(redis: coredis.Redis[bytes], prefix: str) -> None:
    limit = Limit(2, 5)
    key = f"{prefix}k"
    args = [limit.interval_us, limit.burst]
    try:
        reply: Any = await GCRA_SCRIPT([key], [*args, 0], client=redis)
        assert list(reply) == [1, 0]
        assert await redis.exists([key]) == 0  # a look writes nothing
        outcomes: list[tuple[int, int]] = []
        for _ in range(7):
            reply = await GCRA_SCRIPT([key], [*args, 1], client=redis)
            outcomes.append((reply[0], reply[1]))
        assert [a for a, _ in outcomes] == [1] * 5 + [0, 0]
        # Each accepted request moves the TAT one interval further ahead (minus elapsed time).
        aheads = [ahead for _, ahead in outcomes]
        assert all(0 < ahead <= limit.tolerance_us for ahead in aheads)
        assert aheads[4] > 4 * limit.interval_us
        ttl_ms = await redis.pttl(key)
        assert 0 < ttl_ms <= limit.tolerance_us // 1000 + 1
        reply = await GCRA_SCRIPT([key], [*args, 6], client=redis)
        assert reply[0] == 0
    finally:
        await _cleanup(redis, prefix)


@pytest.mark.anyio
async def test_one_call_decides_many_in_order(redis: coredis.Redis[bytes], prefix: str) -> None:
    """Requests sharing a call get what one call each would give, a key named twice included."""
    small, large = Limit(1, 2), Limit(5, 10)
    asks = [("a", small, 1), ("b", large, 4), ("a", small, 1), ("a", small, 1), ("b", large, 7)]
    args = [n for _, limit, cost in asks for n in (limit.interval_us, limit.burst, cost)]
    try:
        reply: Any = await GCRA_SCRIPT([f"{prefix}{k}" for k, _, _ in asks], args, client=redis)
        allowed = [reply[i] for i in range(0, len(reply), 2)]
        assert allowed == [1, 1, 1, 0, 0]
        aheads = [reply[i] for i in range(1, len(reply), 2)]
        assert aheads[2] > small.interval_us  # the second "a" saw the first one's charge
        assert aheads[4] >= 4 * large.interval_us - 1000  # the refused "b" names b's state
    finally:
        await _cleanup(redis, prefix)


@pytest.mark.anyio
async def test_concurrent_requests_share_script_calls(
    redis: coredis.Redis[bytes], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    script = ratelimit_module.GCRA_SCRIPT

    async def counted(keys: list[str], args: list[int], *, client: Any) -> Any:
        calls.append(len(keys))
        return await script(keys, args, client=client)

    monkeypatch.setattr(ratelimit_module, "GCRA_SCRIPT", counted)
    limit = Limit(0.5, 40)
    results: list[Decision] = []
    try:
        async with RateLimiter(redis, prefix=prefix, timeout_s=2) as limiter:

            async def hit() -> None:
                results.append(await limiter.acquire("key", limit, 1))

            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(hit)
        assert sum(calls) == 50 and len(calls) < 50
        assert sum(d.allowed for d in results) == 40
        assert sorted(d.remaining for d in results if d.allowed) == list(range(40))
    finally:
        await _cleanup(redis, prefix)


@pytest.mark.anyio
async def test_shared_limiter_is_exact_under_concurrency(
    redis: coredis.Redis[bytes], prefix: str
) -> None:
    """Two limiters (two processes' worth) on one Redis let exactly one burst through."""
    limit = Limit(0.5, 10)  # refills one token in 2 s: nothing refills during the test
    results: list[Decision] = []
    try:
        async with (
            RateLimiter(redis, prefix=prefix, timeout_s=2) as one,
            RateLimiter(redis, prefix=prefix, timeout_s=2) as two,
        ):

            async def hit(limiter: RateLimiter) -> None:
                results.append(await limiter.acquire("key_a", limit, 1))

            async with anyio.create_task_group() as tg:
                for i in range(30):
                    tg.start_soon(hit, one if i % 2 else two)
            other = await one.acquire("key_b", limit, 1)
        assert all(d.shared for d in results)
        assert sum(d.allowed for d in results) == 10
        assert sorted(d.remaining for d in results if d.allowed) == list(range(10))
        assert other.allowed and other.remaining == 9  # keys are independent
    finally:
        await _cleanup(redis, prefix)


# ---------------------------------------------------------------- fallback


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000 * US

    def __call__(self) -> int:
        return self.now


@pytest.mark.anyio
async def test_without_redis_every_decision_is_local() -> None:
    clock = FakeClock()
    limiter = RateLimiter(None, prefix="x:", timeout_s=0.05, clock_us=clock)
    limit = Limit(2, 3)
    got = [await limiter.acquire("k", limit, 1) for _ in range(4)]
    assert [d.allowed for d in got] == [True, True, True, False]
    assert not any(d.shared for d in got)
    assert got[-1].retry_after_s == 1
    clock.now += 500_000
    assert (await limiter.acquire("k", limit, 1)).allowed


async def _until(predicate: Callable[[], Awaitable[bool]], within: float = 10) -> None:
    with anyio.fail_after(within):
        while True:
            if await predicate():
                return
            await anyio.sleep(0.02)


@pytest.mark.anyio
@pytest.mark.parametrize("outage", ["cut", "hang"])
async def test_outage_falls_back_logs_once_and_resumes(
    redis: coredis.Redis[bytes], prefix: str, outage: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline.ratelimit")
    limit = Limit(1, 4)
    try:
        async with tcp_proxy(*REDIS) as proxy:
            client: coredis.Redis[bytes] = coredis.Redis(
                host=proxy.host, port=proxy.port, stream_timeout=0.25, connect_timeout=0.25
            )
            async with (
                client,
                RateLimiter(client, prefix=prefix, timeout_s=0.25, backoff_s=0.05) as limiter,
            ):
                first = await limiter.acquire("k", limit, 1)
                assert first.shared and first.allowed and first.remaining == 3

                proxy.cut() if outage == "cut" else proxy.hang()
                during = [await limiter.acquire("k", limit, 1) for _ in range(6)]
                assert not any(d.shared for d in during)
                # The fallback continues from the shared state: 3 tokens were left.
                assert [d.allowed for d in during] == [True, True, True, False, False, False]
                assert not limiter.shared
                assert all(d.retry_after_s == 1 for d in during[3:])

                proxy.restore()

                async def shared_again() -> bool:
                    return (await limiter.acquire("k", limit, 0)).shared

                await _until(shared_again)
                assert limiter.shared
        messages = [r.getMessage() for r in caplog.records]
        assert sum("unavailable" in m for m in messages) == 1, messages
        assert sum("answers again" in m for m in messages) == 1, messages
    finally:
        await _cleanup(redis, prefix)
