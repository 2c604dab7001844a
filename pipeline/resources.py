"""The long-lived resources every role shares, opened once per process and closed on the way out.

AMQP connections are not here: each actor and publisher owns its own, so a broker outage
costs a reconnect in that actor, not a restart of the process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import anyio
import coredis
from psycopg_pool import AsyncConnectionPool

from pipeline.amqp.topology import Topology
from pipeline.bootstrap import sync_demo_key
from pipeline.errors import StoreError
from pipeline.ratelimit import RateLimiter
from pipeline.settings import Settings
from pipeline.store.migrate import migrate

log = logging.getLogger(__name__)


@dataclass
class Deps:
    """What a role needs, passed down explicitly (no module-level connections)."""

    settings: Settings
    db: AsyncConnectionPool
    redis: coredis.Redis[bytes] | None
    topology: Topology
    stop: anyio.Event = field(default_factory=anyio.Event)
    listening: dict[str, int] = field(default_factory=dict)
    """Ports the roles actually bound, by role (useful when a port of 0 asked for any)."""
    limiter: RateLimiter | None = None
    """The API's rate limiter (Redis, with a per-process fallback); None without Redis."""


def topology_for(settings: Settings) -> Topology:
    return Topology(
        prefix=settings.amqp.prefix,
        tiers_s=settings.retry.tiers_s,
        webhook_tiers_s=settings.webhooks.retry_tiers_s,
    )


@asynccontextmanager
async def open_pool(settings: Settings) -> AsyncIterator[AsyncConnectionPool]:
    """A psycopg pool in autocommit mode: callers open explicit transactions."""
    pool = AsyncConnectionPool(
        settings.database.url,
        min_size=settings.database.pool_min,
        max_size=settings.database.pool_max,
        kwargs={"autocommit": True, "options": "-c TimeZone=UTC"},
        open=False,
        name="mailpipe",
    )
    await pool.open()
    try:
        try:
            await pool.wait(timeout=30)
        except Exception as exc:
            raise StoreError(f"PostgreSQL did not answer within 30 s: {exc}") from exc
        yield pool
    finally:
        with anyio.CancelScope(shield=True):
            await pool.close()


@asynccontextmanager
async def open_resources(settings: Settings, *, with_redis: bool) -> AsyncIterator[Deps]:
    """Migrate, then open the pool (and Redis for the API); closes them in reverse order."""
    await migrate(settings.database.url)
    async with AsyncExitStack() as stack:
        db = await stack.enter_async_context(open_pool(settings))
        await sync_demo_key(db, enabled=settings.dev.demo_key)
        redis = None
        limiter = None
        if with_redis:
            client: coredis.Redis[bytes] = coredis.Redis.from_url(
                settings.redis.url,
                stream_timeout=settings.rate_limit.redis_timeout_ms / 1000,
                connect_timeout=max(settings.rate_limit.redis_timeout_ms / 1000, 0.2),
            )
            redis = await stack.enter_async_context(client)
            limiter = await stack.enter_async_context(
                RateLimiter(
                    redis,
                    prefix=settings.redis.prefix,
                    timeout_s=settings.rate_limit.redis_timeout_ms / 1000,
                )
            )
        yield Deps(
            settings=settings,
            db=db,
            redis=redis,
            topology=topology_for(settings),
            limiter=limiter,
        )
