"""`/v1/emails`: accept, read and list emails, and read an email's timeline."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from quart import Blueprint, Response, request
from quart_schema import (
    document_headers,
    document_request,
    document_response,
    validate_response,
)

from pipeline import intake
from pipeline.errors import IdempotencyError
from pipeline.ids import new_id
from pipeline.mail.render import new_message_id
from pipeline.store import queries
from pipeline.suppressions import canonical_address
from web import cursor
from web.addresses import bare, envelope_address
from web.auth import caller, require
from web.problems import Problem, validation_problem
from web.ratelimit import charge
from web.schemas import (
    MAX_BATCH,
    BatchRequest,
    BatchResult,
    Email,
    EmailAccepted,
    EmailList,
    EmailListQuery,
    EventList,
    IdempotencyHeaders,
    ProblemDetails,
    SendEmail,
)
from web.state import state
from web.validation import body, json_body, parse, query

JSON = "application/json"

bp = Blueprint("emails", __name__)


IDEMPOTENCY_HEADER = "Idempotency-Key"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _no_email(email_id: str) -> Problem:
    return Problem(404, f"no email {email_id!r}")


def _checked_id(email_id: str) -> str:
    """An id from the path; one that no email could have (NUL, odd Unicode) is a 404 like any
    other unknown id, without a query (PostgreSQL would refuse the NUL with an error)."""
    if not _ID.fullmatch(email_id):
        raise _no_email(email_id)
    return email_id


def _envelope(data: SendEmail) -> list[str]:
    """Bare recipients of to+cc+bcc, each once (case-insensitively), in order."""
    seen: dict[str, str] = {}
    for value in [*data.to, *data.cc, *data.bcc]:
        addr = envelope_address(value)
        seen.setdefault(addr.lower(), addr)
    return list(seen.values())


def new_email(account_id: str, data: SendEmail) -> queries.NewEmail:
    domain = bare(data.from_email).rpartition("@")[2]
    return queries.NewEmail(
        id=new_id("msg"),
        account_id=account_id,
        status="scheduled" if data.scheduled_at else "queued",
        from_email=data.from_email,
        to=data.to,
        cc=data.cc,
        bcc=data.bcc,
        reply_to=data.reply_to,
        envelope_to=_envelope(data),
        subject=data.subject,
        content={
            "body_text": data.body_text,
            "body_html": data.body_html,
            "headers": data.headers,
            "attachments": [a.model_dump() for a in data.attachments],
        },
        message_id=new_message_id(domain),
        tags=data.tags,
        metadata=data.metadata,
        scheduled_at=data.scheduled_at,
        recipients=list(
            dict.fromkeys(canonical_address(bare(a)) for a in [*data.to, *data.cc, *data.bcc])
        ),
    )


async def idempotency_request() -> intake.IdempotencyRequest | None:
    """The request's `Idempotency-Key` with a fingerprint of method, path and JSON body."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= 256 or not key.isprintable():
        raise validation_problem(
            [{"field": IDEMPOTENCY_HEADER, "message": "must be 1 to 256 printable characters"}]
        )
    body = json.dumps(await json_body(), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(f"{request.method} {request.path}\n{body}".encode()).digest()
    return intake.IdempotencyRequest(key, digest)


async def accept(emails: list[queries.NewEmail], respond: intake.Respond) -> Response:
    """Commit, publish and answer; replays a stored answer for a repeated Idempotency-Key."""
    st = state()
    try:
        outcome = await intake.accept_all(
            st.deps,
            st.publisher,
            caller().account_id,
            emails,
            respond=respond,
            idempotency=await idempotency_request(),
            group=st.group_commit,
        )
    except IdempotencyError as exc:
        raise Problem(409, str(exc), slug="idempotency-conflict") from None
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    return Response(
        json.dumps(outcome.body), status=outcome.code, headers=headers, content_type=JSON
    )


def accepted_json(item: intake.Accepted) -> dict[str, Any]:
    return EmailAccepted.model_validate(
        {"id": item.id, "status": item.status, "created_at": item.created_at}
    ).model_dump(mode="json")


@bp.post("/v1/emails")
@document_response(EmailAccepted, 202)
@document_response(ProblemDetails, 409)
@document_response(ProblemDetails, 413)
@document_response(ProblemDetails, 422)
@document_headers(IdempotencyHeaders)
@require("send")
@body(SendEmail)
async def send_email(data: SendEmail) -> Response:
    """Accept one email. 202 means it is committed and will be attempted.

    Recipients on the account's suppression list are left out of the envelope; when none
    remain the email is `suppressed` and nothing is sent. With `scheduled_at` it waits as
    `scheduled` until then. An `Idempotency-Key` makes a repeat return the first answer."""
    email = new_email(caller().account_id, data)
    return await accept([email], lambda accepted: (202, accepted_json(accepted[0])))


@bp.post("/v1/emails/batch")
@document_request(BatchRequest)
@document_response(BatchResult, 202)
@document_response(ProblemDetails, 409)
@document_response(ProblemDetails, 413)
@document_response(ProblemDetails, 422)
@document_headers(IdempotencyHeaders)
@require("send", cost=None)
async def send_batch() -> Response:
    """Accept up to 100 emails, each validated on its own; results in request order.

    Valid items are committed in one transaction and published together; each invalid item
    gets its own problem. The batch costs one rate-limit token per email."""
    raw = await json_body()
    items = raw.get("emails") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        raise validation_problem(
            [{"field": "emails", "message": f"a list of 1 to {MAX_BATCH} emails is required"}]
        )
    await charge(len(items))
    account_id = caller().account_id
    slots: list[queries.NewEmail | Problem] = []
    for index, item in enumerate(items):
        try:
            slots.append(new_email(account_id, parse(SendEmail, item, prefix=("emails", index))))
        except Problem as problem:
            slots.append(problem)
    emails = [s for s in slots if isinstance(s, queries.NewEmail)]

    def respond(accepted: list[intake.Accepted]) -> tuple[int, Any]:
        results = iter(accepted)
        data = [
            {"error": slot.body()}
            if isinstance(slot, Problem)
            else {k: v for k, v in accepted_json(next(results)).items() if k != "created_at"}
            for slot in slots
        ]
        return 202, {"data": data}

    return await accept(emails, respond)


@bp.get("/v1/emails/<email_id>")
@validate_response(Email)
@document_response(ProblemDetails, 404)
@require("read")
async def get_email(email_id: str) -> Email:
    """One email with its status, attempts and last SMTP reply."""
    _checked_id(email_id)
    async with state().deps.db.connection() as conn:
        row = await queries.get_email(conn, caller().account_id, email_id)
    if row is None:
        raise _no_email(email_id)
    return Email.model_validate(row)


@bp.get("/v1/emails")
@validate_response(EmailList)
@document_response(ProblemDetails, 422)
@require("read")
@query(EmailListQuery)
async def list_emails(query_args: EmailListQuery) -> EmailList:
    """Newest first, with an opaque cursor that stays exact while new emails arrive.
    Filters: `status`, `to` (any of to, cc, bcc), `tag=name:value`, `since`, `until`."""
    before = cursor.decode(query_args.after) if query_args.after else None
    where = queries.EmailFilter(
        status=query_args.status,
        recipient=canonical_address(bare(query_args.to)) if query_args.to else None,
        tag=query_args.tag_pair(),
        since=query_args.since,
        until=query_args.until,
    )
    async with state().deps.db.connection() as conn:
        rows = await queries.list_emails(
            conn, caller().account_id, limit=query_args.limit + 1, before=before, where=where
        )
    rows, has_more, next_cursor = cursor.page(
        rows, query_args.limit, lambda r: (r["created_at"], r["id"])
    )
    return EmailList(
        data=[Email.model_validate(r) for r in rows], has_more=has_more, next_cursor=next_cursor
    )


@bp.get("/v1/emails/<email_id>/events")
@validate_response(EventList)
@document_response(ProblemDetails, 404)
@require("read")
async def list_events(email_id: str) -> EventList | Any:
    """The email's timeline, oldest first."""
    account_id = caller().account_id
    _checked_id(email_id)
    async with state().deps.db.connection() as conn:
        if await queries.get_email(conn, account_id, email_id) is None:
            raise _no_email(email_id)
        rows = await queries.list_events(conn, account_id, email_id)
    return EventList.model_validate({"data": rows})


@bp.post("/v1/emails/<email_id>/cancel")
@validate_response(Email)
@document_response(ProblemDetails, 404)
@document_response(ProblemDetails, 409)
@require("send", cost=0)
async def cancel_email(email_id: str) -> Email:
    """Cancel a `scheduled` or `queued` email: 200 with the email; 409 once sending started."""
    account_id = caller().account_id
    _checked_id(email_id)
    async with state().deps.db.connection() as conn:
        async with conn.transaction():
            found = await queries.cancel_email(conn, account_id, email_id)
        if found is None:
            raise _no_email(email_id)
        if found != "canceled":
            raise Problem(
                409,
                f"email {email_id!r} is {found}; only scheduled or queued emails can be canceled",
            )
        row = await queries.get_email(conn, account_id, email_id)
    return Email.model_validate(row)
