"""`/v1/suppressions`: the account's suppressed recipients (admin scope).

Addresses are stored in one canonical form (bare, lower-cased, Unicode domain), so any spelling
of an address finds its entry. Adding an address that is already on the list is idempotent:
201 with the entry as it already is (its reason and date unchanged), like the first add.
"""

from __future__ import annotations

from dataclasses import asdict

from quart import Blueprint, Response
from quart_schema import validate_response

from pipeline.store import queries
from pipeline.suppressions import canonical_address
from web import cursor
from web.auth import caller, require
from web.problems import Problem
from web.schemas import (
    ListQuery,
    ProblemDetails,
    Suppression,
    SuppressionCreate,
    SuppressionList,
)
from web.state import state
from web.validation import body, query

bp = Blueprint("suppressions", __name__)


@bp.get("/v1/suppressions")
@validate_response(SuppressionList)
@require("admin")
@query(ListQuery)
async def list_suppressions(query_args: ListQuery) -> SuppressionList:
    """Suppressed recipients, newest first, with an opaque cursor."""
    before = cursor.decode(query_args.after) if query_args.after else None
    async with state().deps.db.connection() as conn:
        rows = await queries.list_suppressions(
            conn, caller().account_id, limit=query_args.limit + 1, before=before
        )
    rows, has_more, next_cursor = cursor.page(
        rows, query_args.limit, lambda r: (r.created_at, r.email)
    )
    return SuppressionList(
        data=[Suppression.model_validate(asdict(r)) for r in rows],
        has_more=has_more,
        next_cursor=next_cursor,
    )


@bp.post("/v1/suppressions")
@validate_response(Suppression, 201)
@validate_response(ProblemDetails, 422)
@require("admin")
@body(SuppressionCreate)
async def add_suppression(data: SuppressionCreate) -> tuple[Suppression, int]:
    """Suppress a recipient (reason `manual`); 201 with the entry, also when it was there."""
    async with state().deps.db.connection() as conn:
        row, _created = await queries.add_suppression(
            conn, caller().account_id, data.email, reason="manual"
        )
    return Suppression.model_validate(asdict(row)), 201


@bp.delete("/v1/suppressions/<path:email>")
@validate_response(ProblemDetails, 404)
@require("admin")
async def delete_suppression(email: str) -> Response:
    """Take a recipient off the list: 204; 404 when it is not on it."""
    async with state().deps.db.connection() as conn:
        deleted = await queries.delete_suppression(
            conn, caller().account_id, canonical_address(email)
        )
    if not deleted:
        raise Problem(404, f"{email!r} is not on the suppression list")
    return Response(status=204)
