"""Per-API-key rate limiting: GCRA in one Redis Lua script, with a per-process fallback.

GCRA (the generic cell rate algorithm) keeps one number per key, the theoretical arrival time
(TAT): the instant at which the bucket would be full again. A key with rate r and burst b emits
one token every T = 1/r seconds and tolerates being up to b·T ahead of the clock. A request
costing n tokens is allowed when `max(TAT, now) + n·T - now <= b·T`; the TAT then moves to
`max(TAT, now) + n·T`. Everything a client is told follows from `ahead = TAT - now`:

    tokens left        = floor((b·T - ahead) / T)
    seconds until full = ceil(ahead)
    retry after        = ceil(ahead + n·T - b·T)   (when refused)

The shared limiter runs that step in a Lua script on Redis's own clock (`TIME`), so every API
process, whatever its host clock, agrees. Times are whole microseconds and T is rounded up to a
whole microsecond (a conservative error of at most 1 µs per token). Concurrent requests share
one script call (one round trip) that decides each of them in turn, in arrival order, exactly
as one call each would; while a call runs, the next one's requests gather.

When Redis fails or is slower than the configured timeout, decisions fall back to the same GCRA
held in this process's memory (seeded with the last state Redis reported for each key), Redis is
left alone for a short back-off, and one request at a time probes it until it answers again.
A Redis call is never cancelled half-way: it runs in the limiter's own task group and the
request only stops waiting for it, so no request waits longer than the timeout for Redis.
(The keys of one call must live on one Redis node: a single Redis, not a cluster.)
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import TracebackType
from typing import Any

import anyio
import coredis
from anyio.abc import TaskGroup
from coredis.commands import Script

log = logging.getLogger(__name__)

US = 1_000_000
BACKOFF_S = 0.5
"""After a failed Redis call, decisions stay local this long before Redis is tried again."""
_MAX_LOCAL_KEYS = 10_000

# One GCRA step per key, in order: KEYS[i] with ARGV[3i-2 .. 3i] = interval (µs per token),
# burst, cost. Returns {allowed_1 (1/0), TAT - now in µs after the decision, allowed_2, ...}.
# A key named twice sees the first decision's state, as two calls in a row would.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then
    tat = now
  end
  local new_tat = tat + cost * interval
  if new_tat - now > burst * interval then
    out[2 * i - 1] = 0
    out[2 * i] = tat - now
  else
    if cost > 0 then
      local ttl_ms = math.floor((new_tat - now) / 1000) + 1
      redis.call('SET', key, string.format('%d', new_tat), 'PX', ttl_ms)
    end
    out[2 * i - 1] = 1
    out[2 * i] = new_tat - now
  end
end
return out
"""
GCRA_SCRIPT: Script[bytes] = Script(script=GCRA_LUA)
MAX_PER_CALL = 256
"""Most decisions one script call makes (the rest wait for the next call)."""


@dataclass(frozen=True, slots=True)
class Limit:
    """A key's limit: `rate` tokens (emails) per second, at most `burst` at once."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)) or self.burst < 1:
            raise ValueError(f"a limit needs rate > 0 and burst >= 1, got {self.rate}/{self.burst}")

    @property
    def interval_us(self) -> int:
        """Microseconds per token, rounded up."""
        return max(1, math.ceil(US / self.rate))

    @property
    def tolerance_us(self) -> int:
        """How far ahead of the clock the TAT may run: the whole bucket."""
        return self.interval_us * self.burst

    @property
    def window_s(self) -> int:
        """ceil(b / r): the seconds an empty bucket takes to fill (`w` of RateLimit-Policy)."""
        return _window_s(self.rate, self.burst)


@functools.lru_cache(maxsize=1024)
def _window_s(rate: float, burst: int) -> int:
    """Exact (the rate as written, not its binary float), and asked for on every answer."""
    return math.ceil(Fraction(burst) / Fraction(repr(rate)))


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one request against a key's limit, and what its headers say."""

    limit: Limit
    cost: int
    allowed: bool
    remaining: int
    """Whole tokens left after this decision."""
    reset_s: int
    """Whole seconds (rounded up) until the bucket is full again."""
    retry_after_s: int | None
    """When refused: whole seconds (>= 1) until the cost is available (for a cost above the
    burst, which never fits: until the bucket is full); None when allowed."""
    shared: bool
    """True when Redis decided; False for the per-process fallback."""

    @property
    def exceeds_burst(self) -> bool:
        """The cost can never be paid: it is larger than the whole bucket."""
        return self.cost > self.limit.burst


def gcra(tat_us: int | None, now_us: int, limit: Limit, cost: int) -> tuple[bool, int]:
    """One GCRA step (the Lua script's twin): (allowed, TAT after the decision)."""
    tat = now_us if tat_us is None or tat_us < now_us else tat_us
    new_tat = tat + cost * limit.interval_us
    if new_tat - now_us > limit.tolerance_us:
        return False, tat
    return True, new_tat


def _ceil_s(us: int) -> int:
    return -(-us // US)


def decide(allowed: bool, ahead_us: int, limit: Limit, cost: int, *, shared: bool) -> Decision:
    """The header values from a decision and `ahead_us` = TAT - now after it."""
    ahead = max(0, ahead_us)
    remaining = min(limit.burst, max(0, (limit.tolerance_us - ahead) // limit.interval_us))
    retry_after: int | None = None
    if not allowed and cost <= limit.burst:
        wait_us = ahead + cost * limit.interval_us - limit.tolerance_us
        retry_after = max(1, _ceil_s(wait_us))
    elif not allowed:
        # Never fits; every 429 still names a wait (API.md), so: until the bucket is full.
        retry_after = max(1, _ceil_s(ahead))
    return Decision(
        limit=limit,
        cost=cost,
        allowed=allowed,
        remaining=remaining,
        reset_s=_ceil_s(ahead),
        retry_after_s=retry_after,
        shared=shared,
    )


def headers(decision: Decision) -> dict[str, str]:
    """The IETF RateLimit headers and the X-RateLimit-* ones (API.md, "Rate limits")."""
    limit = decision.limit
    return {
        "RateLimit-Policy": f'"default";q={limit.burst};w={limit.window_s}',
        "RateLimit": f'"default";r={decision.remaining};t={decision.reset_s}',
        "X-RateLimit-Limit": str(limit.burst),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(decision.reset_s),
    }


def refusal_detail(decision: Decision) -> str:
    """The 429 problem's detail: what was exceeded and what to do."""
    limit = decision.limit
    rate = f"{limit.rate:g}/s with a burst of {limit.burst}"
    if decision.exceeds_burst:
        return (
            f"this request costs {decision.cost} emails but this API key's burst is "
            f"{limit.burst} ({rate}): send at most {limit.burst} at once"
        )
    return (
        f"rate limit exceeded ({rate}); retry in {decision.retry_after_s} s "
        f"(this request costs {decision.cost}, {decision.remaining} left)"
    )


@dataclass(eq=False, slots=True)
class _Ask:
    """One request's decision, made by the next script call."""

    key: str
    args: tuple[int, int, int]
    done: anyio.Event = field(default_factory=anyio.Event)
    reply: tuple[bool, int] | str = "no reply"


def _monotonic_us() -> int:
    return time.monotonic_ns() // 1000


class RateLimiter:
    """GCRA per key id, shared through Redis, with a per-process fallback.

    Enter it (`async with`) to run Redis calls in its own task group; without Redis (or not
    entered) every decision is local.
    """

    def __init__(
        self,
        redis: coredis.Redis[bytes] | None,
        *,
        prefix: str,
        timeout_s: float,
        backoff_s: float = BACKOFF_S,
        clock_us: Callable[[], int] = _monotonic_us,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._backoff_us = int(backoff_s * US)
        self._clock_us = clock_us
        self._tg: TaskGroup | None = None
        self._asks: list[_Ask] = []  # waiting for the next script call
        self._calling = False
        self._tats: dict[str, int] = {}  # local TATs, on clock_us
        self._healthy = True
        self._retry_at_us = 0
        self._probing = False
        self._epoch = 0  # bumped on every change between healthy and outage
        self._outage_started_us = 0
        self._outage_decisions = 0

    async def __aenter__(self) -> RateLimiter:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        assert tg is not None
        tg.cancel_scope.cancel()
        return await tg.__aexit__(exc_type, exc, tb)

    @property
    def shared(self) -> bool:
        """Whether decisions currently go to Redis (False during an outage)."""
        return self._redis is not None and self._healthy

    def redis_key(self, key_id: str) -> str:
        return f"{self._prefix}ratelimit:{key_id}"

    async def acquire(self, key_id: str, limit: Limit, cost: int) -> Decision:
        """Take `cost` tokens from `key_id`'s bucket if they are there; cost 0 only looks."""
        if cost < 0:
            raise ValueError("cost must be >= 0")
        if self._should_try_redis():
            probing = not self._healthy
            epoch = self._epoch
            if probing:
                self._probing = True
            try:
                reply = await self._call_redis(key_id, limit, cost)
            finally:
                if probing:
                    self._probing = False
            if isinstance(reply, str):
                self._failed(reply, epoch)
            else:
                allowed, ahead_us = reply
                self._remember(key_id, self._clock_us() + ahead_us)
                if probing:
                    self._recovered()
                return decide(allowed, ahead_us, limit, cost, shared=True)
        return self._local(key_id, limit, cost)

    def _should_try_redis(self) -> bool:
        if self._redis is None or self._tg is None:
            return False
        if self._healthy:
            return True
        return not self._probing and self._clock_us() >= self._retry_at_us

    async def _call_redis(self, key_id: str, limit: Limit, cost: int) -> tuple[bool, int] | str:
        """The script's reply, or why there is none (failed, or no answer within the timeout).

        The request joins the next script call (started now unless one is running: then the
        call after it), and waits at most the timeout for it."""
        assert self._tg is not None
        ask = _Ask(self.redis_key(key_id), (limit.interval_us, limit.burst, cost))
        self._asks.append(ask)
        if not self._calling:
            self._calling = True
            self._tg.start_soon(self._call_loop)
        with anyio.move_on_after(self._timeout_s):
            await ask.done.wait()
        if not ask.done.is_set():
            return f"no answer within {self._timeout_s * 1000:g} ms"
        return ask.reply

    async def _call_loop(self) -> None:
        """Script calls for whatever requests are waiting, one call at a time, until none is."""
        try:
            while self._asks:
                asks, self._asks = self._asks[:MAX_PER_CALL], self._asks[MAX_PER_CALL:]
                replies = await self._call_many(asks)
                for ask, reply in zip(asks, replies, strict=True):
                    ask.reply = reply
                    ask.done.set()
        finally:
            self._calling = False

    async def _call_many(self, asks: Sequence[_Ask]) -> list[tuple[bool, int] | str]:
        assert self._redis is not None
        args: list[int] = []
        for ask in asks:
            args.extend(ask.args)
        try:
            reply: Any = await GCRA_SCRIPT([ask.key for ask in asks], args, client=self._redis)
            pairs = [(int(reply[i]), int(reply[i + 1])) for i in range(0, 2 * len(asks), 2)]
        except Exception as exc:
            return [f"{type(exc).__name__}: {exc}"] * len(asks)
        return [(allowed == 1, ahead_us) for allowed, ahead_us in pairs]

    def _failed(self, reason: str, epoch: int) -> None:
        """Back off from Redis; log when this opens an outage (not for a call that began before
        the last change of state, which says nothing new)."""
        now = self._clock_us()
        self._retry_at_us = now + self._backoff_us
        if self._healthy and epoch == self._epoch:
            self._healthy = False
            self._epoch += 1
            self._outage_started_us = now
            self._outage_decisions = 0
            log.warning(
                "Redis rate limiter unavailable (%s): limiting per process until it answers",
                reason,
            )

    def _recovered(self) -> None:
        if not self._healthy:
            self._healthy = True
            self._epoch += 1
            lasted_s = (self._clock_us() - self._outage_started_us) / US
            log.warning(
                "Redis rate limiter answers again after %.1f s (%d local decisions): shared again",
                lasted_s,
                self._outage_decisions,
            )

    def _remember(self, key_id: str, tat_us: int) -> None:
        """Mirror the key's state so a fallback starts where the shared limiter left off."""
        tats = self._tats
        if len(tats) >= _MAX_LOCAL_KEYS and key_id not in tats:
            now = self._clock_us()
            for stale in [k for k, t in tats.items() if t <= now]:
                del tats[stale]  # a full bucket is the same as no entry
            if len(tats) >= _MAX_LOCAL_KEYS:
                tats.clear()
        tats[key_id] = tat_us

    def _local(self, key_id: str, limit: Limit, cost: int) -> Decision:
        now = self._clock_us()
        allowed, tat = gcra(self._tats.get(key_id), now, limit, cost)
        if allowed and cost > 0:
            self._remember(key_id, tat)
        if not self._healthy:
            self._outage_decisions += 1
        return decide(allowed, tat - now, limit, cost, shared=False)
