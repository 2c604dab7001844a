"""Rate limits on the real API, Redis and PostgreSQL: exact bursts, steady rates, two API
processes sharing one Redis, honest headers, and Redis outages made with a TCP proxy."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import coredis
import httpx
import pytest

from pipeline import keys
from pipeline.store import queries
from tests.integration.conftest import Service, email_body, run_service, settings_for
from tests.tcp_proxy import tcp_proxy

pytestmark = pytest.mark.anyio

REDIS = ("127.0.0.1", 6379)
POLICY = re.compile(r'"default";q=(\d+);w=(\d+)')
STATE = re.compile(r'"default";r=(\d+);t=(\d+)')
FALLBACK = re.compile(r'mailpipe_ratelimit_fallback_decisions_total\{outcome="(\w+)"\} ([\d.]+)')


@asynccontextmanager
async def limited(
    db_url: str,
    prefix: str,
    *,
    rate: float,
    burst: int,
    redis_url: str | None = None,
    redis_timeout_ms: int = 1000,
) -> AsyncIterator[Service]:
    """An API-only service whose config limit is `rate`/s with `burst`.

    The Redis timeout is generous unless a test is about it: servers and load generator share
    one event loop here, whose stalls under load (tens of ms) would otherwise count as a slow
    Redis and switch to the per-process fallback in the middle of an exactness test.
    """
    env = {
        "MAILPIPE_RATE_LIMIT_RATE": str(rate),
        "MAILPIPE_RATE_LIMIT_BURST": str(burst),
        "MAILPIPE_RATE_LIMIT_REDIS_TIMEOUT_MS": str(redis_timeout_ms),
    }
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    async with run_service(settings_for(db_url, prefix, **env), roles=("api",)) as svc:
        yield svc


def limit_headers(r: httpx.Response) -> dict[str, int]:
    """The rate-limit headers, checked for agreement with each other."""
    policy = POLICY.fullmatch(r.headers["RateLimit-Policy"])
    now = STATE.fullmatch(r.headers["RateLimit"])
    assert policy and now, r.headers
    q, w = int(policy[1]), int(policy[2])
    remaining, t = int(now[1]), int(now[2])
    assert r.headers["X-RateLimit-Limit"] == str(q)
    assert r.headers["X-RateLimit-Remaining"] == str(remaining)
    assert r.headers["X-RateLimit-Reset"] == str(t)
    assert 0 <= remaining <= q
    return {"q": q, "w": w, "remaining": remaining, "t": t}


def retry_after(r: httpx.Response) -> int:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"] == "https://mailpipe.dev/problems/rate-limited"
    value = int(r.headers["Retry-After"])
    assert value >= 1
    return value


async def post(svc: Service, key: str | None = None) -> httpx.Response:
    return await svc.http.post("/v1/emails", json=email_body(), headers=svc.auth(key))


async def burst(sends: list[Callable[[], Awaitable[httpx.Response]]]) -> list[httpx.Response]:
    """Run every send at once; the responses in the same order."""
    out: list[Any] = [None] * len(sends)

    async def one(i: int) -> None:
        out[i] = await sends[i]()

    async with anyio.create_task_group() as tg:
        for i in range(len(sends)):
            tg.start_soon(one, i)
    return out


async def steady(
    sends: list[Callable[[], Awaitable[httpx.Response]]], seconds: float
) -> tuple[Counter[int], float]:
    """Each send in its own loop, back to back, for `seconds`: (status counts, elapsed)."""
    statuses: Counter[int] = Counter()
    start = anyio.current_time()

    async def loop(send: Callable[[], Awaitable[httpx.Response]]) -> None:
        while anyio.current_time() - start < seconds:
            statuses[(await send()).status_code] += 1

    async with anyio.create_task_group() as tg:
        for send in sends:
            tg.start_soon(loop, send)
    return statuses, anyio.current_time() - start


async def new_key(
    svc: Service,
    account: str,
    scopes: tuple[str, ...] = keys.SCOPES,
    *,
    rate: float | None = None,
    burst: int | None = None,
) -> tuple[str, str]:
    """(key, key id), with the key's own limits when given."""
    new = keys.generate_key(test=True)
    async with svc.deps.db.connection() as conn:
        acc = await queries.ensure_account(conn, account)
        row = await queries.insert_key(
            conn,
            account_id=acc.id,
            lookup=new.lookup,
            hash=new.hash,
            scopes=scopes,
            rate=rate,
            burst=burst,
        )
    return new.key, row.id


async def fallback_counts(svc: Service) -> dict[str, float]:
    """mailpipe_ratelimit_fallback_decisions_total by outcome, from /metrics."""
    text = (await svc.http.get("/metrics")).text
    return {outcome: float(value) for outcome, value in FALLBACK.findall(text)}


NONE = {"allowed": 0, "limited": 0}


def within_one_burst(accepted: int, rate: float, burst: int, elapsed: float) -> None:
    expected = rate * elapsed
    assert accepted <= burst + expected + 1, (accepted, expected)
    assert accepted >= expected - burst, (accepted, expected)


# ---------------------------------------------------------------- one process


async def test_burst_of_3b_lets_exactly_b_through_and_retry_after_works(
    test_db: str, prefix: str
) -> None:
    async with limited(test_db, prefix, rate=1, burst=5) as svc:
        responses = await burst([lambda: post(svc)] * 15)
        assert Counter(r.status_code for r in responses) == {202: 5, 429: 10}
        assert await fallback_counts(svc) == NONE  # Redis decided every one
        refused = [r for r in responses if r.status_code == 429]
        waits = {retry_after(r) for r in refused}
        assert waits == {1}  # one token per second: the next one is less than a second away
        for r in refused:
            assert limit_headers(r)["remaining"] == 0
            assert "rate limit exceeded" in r.json()["detail"]

        await anyio.sleep(max(waits))  # honouring Retry-After is what is under test
        again = await post(svc)
        assert again.status_code == 202, again.text
        assert limit_headers(again)["remaining"] == 0


async def test_headers_on_every_authenticated_answer(test_db: str, prefix: str) -> None:
    async with limited(test_db, prefix, rate=1, burst=3) as svc:
        seen = []
        for _ in range(3):
            r = await post(svc)
            assert r.status_code == 202, r.text
            seen.append(limit_headers(r))
        assert [h["q"] for h in seen] == [3, 3, 3]
        assert [h["w"] for h in seen] == [3, 3, 3]  # ceil(3 / 1)
        assert [h["remaining"] for h in seen] == [2, 1, 0]
        for n, h in enumerate(seen, start=1):
            assert n - 1 <= h["t"] <= n  # n tokens spent, one refills per second

        refused = await post(svc)
        assert retry_after(refused) == 1
        assert limit_headers(refused)["remaining"] == 0
        assert limit_headers(refused)["t"] >= 2

        # Reads carry the headers but spend nothing.
        email_id = (await svc.http.get("/v1/emails", headers=svc.auth())).json()["data"][0]["id"]
        reads = [
            await svc.http.get(path, headers=svc.auth())
            for path in ("/v1/emails", f"/v1/emails/{email_id}", f"/v1/emails/{email_id}/events")
        ]
        assert [r.status_code for r in reads] == [200, 200, 200]
        left = [limit_headers(r)["remaining"] for r in reads]
        assert left == sorted(left)  # never decreasing: reads only look

        # A 403 is authenticated too: headers, for the key's own bucket (untouched).
        read_only, _ = await new_key(svc, "test", ("read",))
        forbidden = await post(svc, read_only)
        assert forbidden.status_code == 403
        assert limit_headers(forbidden)["remaining"] == 3

        # A key's own limits win over the config's.
        own, _ = await new_key(svc, "test", rate=4, burst=2)
        r = await post(svc, own)
        assert limit_headers(r) == {"q": 2, "w": 1, "remaining": 1, "t": 1}

        # Unauthenticated answers have none.
        for r in (
            await svc.http.post("/v1/emails", json=email_body()),
            await svc.http.get("/health"),
        ):
            assert "RateLimit" not in r.headers and "X-RateLimit-Limit" not in r.headers


async def test_steady_load_stays_within_one_burst_of_rate_times_time(
    test_db: str, prefix: str
) -> None:
    async with limited(test_db, prefix, rate=10, burst=5) as svc:
        statuses, elapsed = await steady([lambda: post(svc)] * 4, seconds=2)
        assert set(statuses) <= {202, 429}, statuses
        within_one_burst(statuses[202], 10, 5, elapsed)
        assert await fallback_counts(svc) == NONE


async def test_a_batch_costs_one_token_per_email(test_db: str, prefix: str) -> None:
    async with limited(test_db, prefix, rate=1, burst=5) as svc:

        async def batch(n: int) -> httpx.Response:
            body = {"emails": [email_body() for _ in range(n)]}
            return await svc.http.post("/v1/emails/batch", json=body, headers=svc.auth())

        too_big = await batch(6)
        assert too_big.status_code == 429, too_big.text
        detail = too_big.json()["detail"]
        assert "costs 6 emails" in detail and "burst is 5" in detail
        # No wait ever makes it fit; Retry-After still names one (every 429 does).
        assert int(too_big.headers["Retry-After"]) >= 1
        assert limit_headers(too_big)["remaining"] == 5  # nothing was taken

        three = await batch(3)
        assert three.status_code == 202, three.text
        assert limit_headers(three)["remaining"] == 2
        over = await batch(3)
        assert retry_after(over) == 1  # one more token is due within the second
        assert limit_headers(over)["remaining"] == 2

        # Refused before it was charged (a malformed batch): the headers are there anyway.
        malformed = await svc.http.post("/v1/emails/batch", json={}, headers=svc.auth())
        assert malformed.status_code == 422
        assert limit_headers(malformed)["remaining"] == 2
        assert await fallback_counts(svc) == NONE


# ---------------------------------------------------------------- two processes


async def test_two_api_processes_together_accept_no_more_than_one(
    test_db: str, prefix: str
) -> None:
    async with (
        limited(test_db, prefix, rate=1, burst=6) as one,
        limited(test_db, prefix, rate=1, burst=6) as two,
    ):
        key = one.key  # made by the first, used on both
        responses = await burst([lambda: post(one, key), lambda: post(two, key)] * 9)
        assert Counter(r.status_code for r in responses) == {202: 6, 429: 12}
        by_process = Counter(
            (i % 2, r.status_code) for i, r in enumerate(responses) if r.status_code == 202
        )
        assert sum(by_process.values()) == 6

        fast, _ = await new_key(one, "test", rate=10, burst=5)
        statuses, elapsed = await steady(
            [lambda: post(one, fast), lambda: post(two, fast)] * 2, seconds=2
        )
        assert set(statuses) <= {202, 429}, statuses
        within_one_burst(statuses[202], 10, 5, elapsed)
        assert await fallback_counts(one) == NONE
        assert await fallback_counts(two) == NONE


# ---------------------------------------------------------------- Redis outages


async def test_tcp_proxy_cut_hang_restore() -> None:
    """The proxy itself, against Redis: forwards, resets, stalls, and recovers."""
    async with tcp_proxy(*REDIS) as proxy:
        stream = await anyio.connect_tcp(proxy.host, proxy.port)
        async with stream:
            await stream.send(b"PING\r\n")
            assert await stream.receive() == b"+PONG\r\n"
            proxy.hang()
            await stream.send(b"PING\r\n")
            with anyio.move_on_after(0.2) as scope:
                await stream.receive()
            assert scope.cancelled_caught  # nothing comes back while hung
            proxy.restore()
            assert await stream.receive() == b"+PONG\r\n"  # held back, not lost
            proxy.cut()
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
                await stream.send(b"PING\r\n")
                await stream.receive()
        late = await anyio.connect_tcp(proxy.host, proxy.port)
        async with late:  # accepted, then reset at once
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
                await late.send(b"PING\r\n")
                await late.receive()
        proxy.restore()
        again = await anyio.connect_tcp(proxy.host, proxy.port)
        async with again:
            await again.send(b"PING\r\n")
            assert await again.receive() == b"+PONG\r\n"
        assert proxy.accepted == 3


@pytest.mark.parametrize("outage", ["cut", "hang"])
async def test_redis_outage_falls_back_then_shares_again(
    test_db: str, prefix: str, outage: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.ratelimit")
    rate, b = 1, 4
    async with (
        tcp_proxy(*REDIS) as proxy,
        limited(
            test_db,
            prefix,
            rate=rate,
            burst=b,
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            redis_timeout_ms=250,  # short enough for a hang to show, long enough for load
        ) as svc,
    ):
        lookup = keys.lookup_of(svc.key)
        assert lookup is not None
        async with svc.deps.db.connection() as conn:
            row = await queries.key_by_lookup(conn, lookup)
        assert row is not None
        redis_key = f"{svc.settings.redis.prefix}ratelimit:{row.id}"

        warm = await svc.http.get("/v1/emails", headers=svc.auth())  # Redis answers, spends 0
        assert warm.status_code == 200 and limit_headers(warm)["remaining"] == b
        assert await fallback_counts(svc) == NONE

        proxy.cut() if outage == "cut" else proxy.hang()
        responses = await burst([lambda: post(svc)] * (3 * b))
        assert Counter(r.status_code for r in responses) == {202: b, 429: 2 * b}
        for r in responses:
            limit_headers(r)
        waits = {retry_after(r) for r in responses if r.status_code == 429}
        assert await fallback_counts(svc) == {"allowed": b, "limited": 2 * b}

        await anyio.sleep(max(waits))  # the fallback's Retry-After holds too
        honoured = await post(svc)
        assert honoured.status_code == 202, honoured.text

        statuses, elapsed = await steady([lambda: post(svc)] * 2, seconds=1.5)
        assert set(statuses) <= {202, 429}, statuses
        assert statuses[202] <= rate * elapsed + 1  # the bucket was empty: only the refill

        proxy.restore()

        async def decided_by_redis() -> bool:
            before = await fallback_counts(svc)
            r = await svc.http.get("/v1/emails", headers=svc.auth())
            assert r.status_code == 200
            return await fallback_counts(svc) == before

        with anyio.fail_after(10):  # polls: the limiter probes Redis after a short back-off
            while True:
                if await decided_by_redis():
                    break
                await anyio.sleep(0.05)
        after = await post(svc)
        assert after.status_code in (202, 429)
        limit_headers(after)
        async with coredis.Redis(host=REDIS[0], port=REDIS[1]) as direct:
            assert await direct.exists([redis_key]) == 1  # the shared state moves again

    messages = [r.getMessage() for r in caplog.records if r.name == "pipeline.ratelimit"]
    assert sum("unavailable" in m for m in messages) == 1, messages
    assert sum("answers again" in m for m in messages) == 1, messages
