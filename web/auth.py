"""API key authentication, scopes and rate limiting: 401 for a missing, unknown or revoked key,
403 for a missing scope, 429 over the key's rate limit.

Keys are found by their non-secret lookup id and checked against the stored SHA-256 hash in
constant time. Rows are cached per process for at most `KEY_CACHE_TTL_S` (well under a second),
so a revoked key is refused by every process within that time.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, Final

import anyio
from quart import current_app, g, request

from pipeline import keys
from pipeline.store import queries
from web.problems import Problem
from web.ratelimit import charge
from web.state import state

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mailpipe"'}

KEY_CACHE_TTL_S: Final = 0.5
"""How long a process trusts a key row it read: a revocation takes effect within this."""


@dataclass(frozen=True)
class Caller:
    """The authenticated key and the account every read and write is scoped to."""

    key_id: str
    account_id: str
    scopes: tuple[str, ...]
    rate: float | None
    burst: int | None


class KeyCache:
    """Key rows by lookup id, each trusted for `ttl_s` (a revocation is seen after that).

    `fetch` reads a missing row once however many requests want it at the same moment: when
    an entry expires under load, every request in flight with that key would otherwise query
    the database together."""

    def __init__(
        self,
        ttl_s: float = KEY_CACHE_TTL_S,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._rows: dict[str, tuple[float, queries.ApiKey]] = {}
        self._reading: dict[str, _Read] = {}

    def get(self, lookup: str) -> queries.ApiKey | None:
        entry = self._rows.get(lookup)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._rows[lookup]
            return None
        return entry[1]

    def put(self, lookup: str, row: queries.ApiKey) -> None:
        now = self._clock()
        if len(self._rows) >= self._max:
            self._rows = {k: v for k, v in self._rows.items() if v[0] > now}
            if len(self._rows) >= self._max:
                self._rows.clear()
        self._rows[lookup] = (now + self.ttl_s, row)

    async def fetch(
        self, lookup: str, read: Callable[[], Awaitable[queries.ApiKey | None]]
    ) -> queries.ApiKey | None:
        """The cached row, else `read()`'s, shared with the callers that ask meanwhile. A
        caller whose shared read failed (or was cancelled) reads on its own."""
        row = self.get(lookup)
        if row is not None:
            return row
        pending = self._reading.get(lookup)
        if pending is not None:
            await pending.done.wait()
            if pending.ok:
                return pending.row
            return await read()
        pending = self._reading[lookup] = _Read()
        try:
            row = await read()
            pending.row, pending.ok = row, True
            if row is not None:
                self.put(lookup, row)
            return row
        finally:
            del self._reading[lookup]
            pending.done.set()


@dataclass(eq=False)
class _Read:
    """A key row being read, and its outcome for the callers waiting on it."""

    done: anyio.Event = field(default_factory=anyio.Event)
    row: queries.ApiKey | None = None
    ok: bool = False


def presented_key() -> str | None:
    value = request.headers.get("X-API-Key")
    if value:
        return value.strip()
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _key_cache() -> KeyCache:
    cache: KeyCache = current_app.extensions.setdefault("key_cache", KeyCache())
    return cache


async def _key_row(lookup: str) -> queries.ApiKey | None:
    async def read() -> queries.ApiKey | None:
        async with state().deps.db.connection() as conn:
            return await queries.key_by_lookup(conn, lookup)

    return await _key_cache().fetch(lookup, read)


async def authenticate() -> Caller:
    key = presented_key()
    if key is None:
        raise Problem(
            401, "send an API key in X-API-Key or Authorization: Bearer", headers=_CHALLENGE
        )
    lookup = keys.lookup_of(key)
    row = await _key_row(lookup) if lookup is not None else None
    if row is None or row.revoked_at is not None or not keys.matches(key, row.hash):
        raise Problem(401, "the API key is unknown or revoked", headers=_CHALLENGE)
    return Caller(row.id, row.account_id, tuple(row.scopes), row.rate, row.burst)


def caller() -> Caller:
    value: Caller = g.caller
    return value


class _Default(enum.Enum):
    COST = enum.auto()


def default_cost(scope: str) -> int:
    """`send` requests cost one email; reads and admin calls cost nothing (they only look)."""
    return 1 if scope == "send" else 0


def require(
    scope: str, *, cost: int | _Default | None = _Default.COST
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Authenticate, demand `scope`, then charge `cost` emails to the key's rate limit.

    Runs before the body is parsed, so a refused request costs no parsing. `cost` defaults to
    `default_cost(scope)`; 0 charges nothing but still reports the limit in the headers; None
    leaves charging to the handler (`await web.ratelimit.charge(n)` once n is known, as a
    batch of n emails costs n). A 403 carries the headers too (a free look at the limit).
    """
    charged = default_cost(scope) if isinstance(cost, _Default) else cost
    if charged is not None and charged < 0:
        raise ValueError("cost must be >= 0 or None")

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            who = await authenticate()
            g.caller = who
            if scope not in who.scopes:
                await charge(0)
                raise Problem(403, f"this API key lacks the {scope!r} scope")
            if charged is not None:
                await charge(charged)
            return await func(*args, **kwargs)

        return wrapper

    return decorator
