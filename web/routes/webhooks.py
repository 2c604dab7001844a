"""`/v1/webhooks`: the account's event endpoints and their recorded deliveries (admin scope).

A URL is checked when it is saved, DNS included: https only, and every address its host resolves
to must be public, unless `webhooks.allow_private` (development). The delivery checks it again on
every connection, since what a name resolves to can change.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

import anyio
from quart import Blueprint, Response
from quart_schema import validate_response
from quart_schema.validation import QUART_SCHEMA_REQUEST_ATTRIBUTE, DataSource

from pipeline.store import queries
from pipeline.webhooks import EVENT_TYPES, signing, ssrf
from web import cursor
from web.auth import caller, require
from web.problems import Problem, validation_problem
from web.schemas import (
    ListQuery,
    ProblemDetails,
    Webhook,
    WebhookCreate,
    WebhookCreated,
    WebhookDelivery,
    WebhookDeliveryList,
    WebhookList,
    WebhookSecretRotated,
    WebhookUpdate,
)
from web.state import state
from web.validation import json_body, parse, query

bp = Blueprint("webhooks", __name__)
F = TypeVar("F", bound=Callable[..., Any])


_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _checked_id(webhook_id: str) -> str:
    """A path id that cannot be one of ours (NUL, lone surrogates, ...) is simply not found."""
    if not _ID.fullmatch(webhook_id):
        raise Problem(404, f"no webhook {webhook_id!r}")
    return webhook_id


def _item(row: queries.Webhook) -> Webhook:
    return Webhook.model_validate(asdict(row))


async def _url_errors(url: Any) -> list[dict[str, str]]:
    """The address rules for `url` (a string the model accepted), DNS included."""
    settings = state().deps.settings.webhooks
    try:
        with anyio.fail_after(settings.timeout_s):
            await ssrf.check_url(url, allow_private=settings.allow_private)
    except TimeoutError:
        return [{"field": "url", "message": "the host name did not resolve in time"}]
    except ssrf.UnsafeUrl as exc:
        return [{"field": "url", "message": str(exc)}]
    return []


M = TypeVar("M", WebhookCreate, WebhookUpdate)


async def _valid_body(model: type[M]) -> M:
    """The body, with the model's errors and the URL's address check reported together."""
    raw = await json_body()
    errors: list[dict[str, str]] = []
    data = None
    try:
        data = parse(model, raw)
    except Problem as problem:
        errors = [dict(e) for e in problem.errors or []]
    if isinstance(raw, dict) and isinstance(raw.get("url"), str):
        if not any(e["field"] == "url" for e in errors):
            errors += await _url_errors(raw["url"])
    if errors or data is None:
        raise validation_problem(errors)
    return data


@bp.get("/v1/webhooks")
@validate_response(WebhookList)
@require("admin")
@query(ListQuery)
async def list_webhooks(query_args: ListQuery) -> WebhookList:
    """The account's endpoints, newest first, with an opaque cursor (secrets are not shown)."""
    before = cursor.decode(query_args.after) if query_args.after else None
    async with state().deps.db.connection() as conn:
        rows = await queries.list_webhooks(
            conn, caller().account_id, limit=query_args.limit + 1, before=before
        )
    rows, has_more, next_cursor = cursor.page(
        rows, query_args.limit, lambda r: (r.created_at, r.id)
    )
    return WebhookList(data=[_item(r) for r in rows], has_more=has_more, next_cursor=next_cursor)


def _documents(model: type[WebhookCreate | WebhookUpdate]) -> Callable[[F], F]:
    """Show `model` as the request body in the OpenAPI document (validated by the handler)."""

    def decorator(func: F) -> F:
        setattr(func, QUART_SCHEMA_REQUEST_ATTRIBUTE, (model, DataSource.JSON))
        return func

    return decorator


@bp.post("/v1/webhooks")
@validate_response(WebhookCreated, 201)
@validate_response(ProblemDetails, 422)
@require("admin")
@_documents(WebhookCreate)
async def create_webhook() -> tuple[WebhookCreated, int]:
    """Add an endpoint: 201 with its signing secret, shown only this once."""
    data = await _valid_body(WebhookCreate)
    secret = signing.new_secret()
    async with state().deps.db.connection() as conn:
        row = await queries.create_webhook(
            conn,
            caller().account_id,
            url=data.url,
            events=data.events or EVENT_TYPES,
            enabled=data.enabled,
            secret=secret,
        )
    return WebhookCreated.model_validate({**asdict(row), "secret": secret}), 201


@bp.get("/v1/webhooks/<webhook_id>")
@validate_response(Webhook)
@validate_response(ProblemDetails, 404)
@require("admin")
async def get_webhook(webhook_id: str) -> Webhook:
    """One endpoint (its secret is not shown)."""
    async with state().deps.db.connection() as conn:
        row = await queries.get_webhook(conn, caller().account_id, _checked_id(webhook_id))
    if row is None:
        raise Problem(404, f"no webhook {webhook_id!r}")
    return _item(row)


@bp.patch("/v1/webhooks/<webhook_id>")
@validate_response(Webhook)
@validate_response(ProblemDetails, 404)
@validate_response(ProblemDetails, 422)
@require("admin")
@_documents(WebhookUpdate)
async def update_webhook(webhook_id: str) -> Webhook:
    """Change an endpoint's `url`, `events` or `enabled`; what is left out stays. Enabling it
    again (after a 410 or a day of failures disabled it) starts its failure count afresh. The
    secret stays (`rotate-secret` makes a new one)."""
    _checked_id(webhook_id)
    data = await _valid_body(WebhookUpdate)
    async with state().deps.db.connection() as conn:
        row = await queries.update_webhook(
            conn,
            caller().account_id,
            webhook_id,
            url=data.url,
            events=data.events,
            enabled=data.enabled,
        )
    if row is None:
        raise Problem(404, f"no webhook {webhook_id!r}")
    return _item(row)


SECRET_OVERLAP_S = 24 * 3600.0
"""How long a rotated-out secret goes on signing (a second signature on every request)."""


@bp.post("/v1/webhooks/<webhook_id>/rotate-secret")
@validate_response(WebhookSecretRotated)
@validate_response(ProblemDetails, 404)
@require("admin")
async def rotate_secret(webhook_id: str) -> WebhookSecretRotated:
    """A new signing secret, shown only in this answer. For the next 24 h every request is
    signed with both (two `v1,` signatures): switch the receiver over, nothing is rejected."""
    secret = signing.new_secret()
    async with state().deps.db.connection() as conn:
        until = await queries.rotate_webhook_secret(
            conn,
            caller().account_id,
            _checked_id(webhook_id),
            secret=secret,
            overlap_s=SECRET_OVERLAP_S,
        )
    if until is None:
        raise Problem(404, f"no webhook {webhook_id!r}")
    return WebhookSecretRotated(id=webhook_id, secret=secret, previous_secret_expires_at=until)


@bp.delete("/v1/webhooks/<webhook_id>")
@validate_response(ProblemDetails, 404)
@require("admin")
async def delete_webhook(webhook_id: str) -> Response:
    """Remove an endpoint and its recorded deliveries: 204; 404 when there is no such one."""
    async with state().deps.db.connection() as conn:
        deleted = await queries.delete_webhook(conn, caller().account_id, _checked_id(webhook_id))
    if not deleted:
        raise Problem(404, f"no webhook {webhook_id!r}")
    return Response(status=204)


@bp.get("/v1/webhooks/<webhook_id>/deliveries")
@validate_response(WebhookDeliveryList)
@validate_response(ProblemDetails, 404)
@require("admin")
@query(ListQuery)
async def list_deliveries(webhook_id: str, query_args: ListQuery) -> WebhookDeliveryList:
    """Every recorded attempt to deliver an event to this endpoint, newest first."""
    _checked_id(webhook_id)
    before = cursor.decode(query_args.after) if query_args.after else None
    account_id = caller().account_id
    async with state().deps.db.connection() as conn:
        if not await queries.webhook_exists(conn, account_id, webhook_id):
            raise Problem(404, f"no webhook {webhook_id!r}")
        rows = await queries.list_webhook_deliveries(
            conn, account_id, webhook_id, limit=query_args.limit + 1, before=before
        )
    rows, has_more, next_cursor = cursor.page(
        rows, query_args.limit, lambda r: (r.created_at, r.id)
    )
    return WebhookDeliveryList(
        data=[WebhookDelivery.model_validate(asdict(r)) for r in rows],
        has_more=has_more,
        next_cursor=next_cursor,
    )
