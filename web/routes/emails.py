"""`/v1/emails`: accept, read and list emails, and read an email's timeline."""

from __future__ import annotations

from typing import Any

from quart import Blueprint
from quart_schema import validate_response

from pipeline import intake
from pipeline.ids import new_id
from pipeline.mail.render import new_message_id
from pipeline.store import queries
from web import cursor
from web.addresses import bare, envelope_address
from web.auth import caller, require
from web.problems import Problem
from web.schemas import (
    Email,
    EmailAccepted,
    EmailList,
    EventList,
    ListQuery,
    ProblemDetails,
    SendEmail,
)
from web.state import state
from web.validation import body, query

bp = Blueprint("emails", __name__)


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
        status="queued",
        from_email=data.from_email,
        to=data.to,
        cc=data.cc,
        bcc=data.bcc,
        reply_to=[],
        envelope_to=_envelope(data),
        subject=data.subject,
        content={"body_text": data.body_text, "body_html": data.body_html},
        message_id=new_message_id(domain),
        tags={},
        metadata=None,
        scheduled_at=None,
    )


@bp.post("/v1/emails")
@validate_response(EmailAccepted, 202)
@validate_response(ProblemDetails, 422)
@require("send")
@body(SendEmail)
async def send_email(data: SendEmail) -> tuple[EmailAccepted, int]:
    """Accept one email. 202 means it is committed and will be attempted."""
    st = state()
    email = new_email(caller().account_id, data)
    created_at = await intake.accept(st.deps, st.publisher, email)
    return EmailAccepted(id=email.id, status="queued", created_at=created_at), 202


@bp.get("/v1/emails/<email_id>")
@validate_response(Email)
@require("read")
async def get_email(email_id: str) -> Email:
    """One email with its status, attempts and last SMTP reply."""
    async with state().deps.db.connection() as conn:
        row = await queries.get_email(conn, caller().account_id, email_id)
    if row is None:
        raise Problem(404, f"no email {email_id!r}")
    return Email.model_validate(row)


@bp.get("/v1/emails")
@validate_response(EmailList)
@require("read")
@query(ListQuery)
async def list_emails(query_args: ListQuery) -> EmailList:
    """Newest first, with an opaque cursor that stays exact while new emails arrive."""
    before = cursor.decode(query_args.after) if query_args.after else None
    async with state().deps.db.connection() as conn:
        rows = await queries.list_emails(
            conn, caller().account_id, limit=query_args.limit + 1, before=before
        )
    has_more = len(rows) > query_args.limit
    rows = rows[: query_args.limit]
    next_cursor = cursor.encode(rows[-1]["created_at"], rows[-1]["id"]) if has_more else None
    return EmailList(
        data=[Email.model_validate(r) for r in rows], has_more=has_more, next_cursor=next_cursor
    )


@bp.get("/v1/emails/<email_id>/events")
@validate_response(EventList)
@require("read")
async def list_events(email_id: str) -> EventList | Any:
    """The email's timeline, oldest first."""
    account_id = caller().account_id
    async with state().deps.db.connection() as conn:
        if await queries.get_email(conn, account_id, email_id) is None:
            raise Problem(404, f"no email {email_id!r}")
        rows = await queries.list_events(conn, account_id, email_id)
    return EventList.model_validate({"data": rows})
