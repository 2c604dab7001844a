"""API key authentication and scopes: 401 for a missing, unknown or revoked key, 403 for a scope."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from quart import g, request

from pipeline import keys
from pipeline.store import queries
from web.problems import Problem
from web.state import state

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mailpipe"'}


@dataclass(frozen=True)
class Caller:
    """The authenticated key and the account every read and write is scoped to."""

    key_id: str
    account_id: str
    scopes: tuple[str, ...]
    rate: float | None
    burst: int | None


def presented_key() -> str | None:
    value = request.headers.get("X-API-Key")
    if value:
        return value.strip()
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def authenticate() -> Caller:
    key = presented_key()
    if key is None:
        raise Problem(
            401, "send an API key in X-API-Key or Authorization: Bearer", headers=_CHALLENGE
        )
    lookup = keys.lookup_of(key)
    row = None
    if lookup is not None:
        async with state().deps.db.connection() as conn:
            row = await queries.key_by_lookup(conn, lookup)
    if row is None or row.revoked_at is not None or not keys.matches(key, row.hash):
        raise Problem(401, "the API key is unknown or revoked", headers=_CHALLENGE)
    return Caller(row.id, row.account_id, tuple(row.scopes), row.rate, row.burst)


def caller() -> Caller:
    value: Caller = g.caller
    return value


def require(scope: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Authenticate, then demand `scope`; runs before the body is parsed."""

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            who = await authenticate()
            g.caller = who
            if scope not in who.scopes:
                raise Problem(403, f"this API key lacks the {scope!r} scope")
            return await func(*args, **kwargs)

        return wrapper

    return decorator
