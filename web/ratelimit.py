"""The rate limiter in the app: charge the caller's key, 429 when over, headers on every answer.

`require(scope)` (web.auth) charges the default cost before the handler runs; a handler whose
cost is known only after parsing its body (the batch endpoint: N emails cost N) is declared
with `require("send", cost=None)` and calls `await charge(n)` itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from quart import Quart, Response, current_app, g

from pipeline.ratelimit import Decision, Limit, RateLimiter, headers, refusal_detail
from web.problems import Problem
from web.state import AppState, state

if TYPE_CHECKING:
    from web.auth import Caller
    from web.metrics import ApiMetrics

log = logging.getLogger(__name__)

_LIMITER = "rate_limiter"


def limit_of(who: Caller) -> Limit:
    """The key's own rate and burst, else `rate_limit.*` from config (also for a key row whose
    values make no sense, which the CLI refuses to create: a 5xx would be worse)."""
    config = state().deps.settings.rate_limit
    try:
        return Limit(
            rate=config.rate if who.rate is None else who.rate,
            burst=config.burst if who.burst is None else who.burst,
        )
    except ValueError as exc:
        log.warning("API key %s: %s; using rate_limit.* from config", who.key_id, exc)
        return Limit(rate=config.rate, burst=config.burst)


async def _decide(cost: int) -> Decision:
    """Ask the limiter for the caller's key; remember the decision for the headers."""
    who: Caller = g.caller
    limiter: RateLimiter = current_app.extensions[_LIMITER]
    decision = await limiter.acquire(who.key_id, limit_of(who), cost)
    g.rate_limit = decision
    if not decision.shared:
        metrics: ApiMetrics = current_app.extensions["metrics"]
        outcome = "allowed" if decision.allowed else "limited"
        metrics.ratelimit_fallback.labels(outcome).inc()
    return decision


async def charge(cost: int) -> Decision:
    """Take `cost` emails from the authenticated caller's budget (0 = only look).

    The decision's headers go on the response whatever happens next; over the limit (or a cost
    above the burst) raises a 429 problem with Retry-After.
    """
    decision = await _decide(cost)
    if not decision.allowed:
        extra = {}
        if decision.retry_after_s is not None:
            extra["Retry-After"] = str(decision.retry_after_s)
        raise Problem(429, refusal_detail(decision), headers=extra)
    return decision


def register(app: Quart, app_state: AppState) -> None:
    """Install the process's limiter and the after-request hook that adds the headers."""
    deps = app_state.deps
    app.extensions[_LIMITER] = deps.limiter or RateLimiter(
        None, prefix=deps.settings.redis.prefix, timeout_s=0
    )

    @app.after_request
    async def _rate_limit_headers(response: Response) -> Response:
        decision: Decision | None = g.get("rate_limit")
        if decision is None and g.get("caller") is not None:
            # Authenticated, but answered before charging (a handler that charges itself
            # refused the request first): a free look, so every such answer has the headers.
            decision = await _decide(0)
        if decision is not None:
            response.headers.update(headers(decision))
        return response
