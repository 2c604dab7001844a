"""`/v1/dead-letters`: emails that exhausted their retries, and their replay (admin scope)."""

from __future__ import annotations

from dataclasses import asdict

from quart import Blueprint
from quart_schema import validate_response

from pipeline import deadletters
from pipeline.errors import NotReplayable, UnknownDeadLetter
from web import cursor
from web.auth import caller, require
from web.problems import Problem
from web.schemas import DeadLetter, DeadLetterList, ListQuery, ProblemDetails
from web.state import state
from web.validation import query

bp = Blueprint("dead_letters", __name__)


def _item(letter: deadletters.DeadLetter) -> DeadLetter:
    return DeadLetter.model_validate(asdict(letter))


@bp.get("/v1/dead-letters")
@validate_response(DeadLetterList)
@require("admin")
@query(ListQuery)
async def list_dead_letters(query_args: ListQuery) -> DeadLetterList:
    """Dead letters, newest first, replayed ones included (`replayed_at` set)."""
    before = cursor.decode(query_args.after) if query_args.after else None
    rows = await deadletters.list_letters(
        state().deps.db, account_id=caller().account_id, limit=query_args.limit + 1, before=before
    )
    rows, has_more, next_cursor = cursor.page(
        rows, query_args.limit, lambda r: (r.created_at, r.id)
    )
    return DeadLetterList(data=[_item(r) for r in rows], has_more=has_more, next_cursor=next_cursor)


@bp.post("/v1/dead-letters/<letter_id>/replay")
@validate_response(DeadLetter, 202)
@validate_response(ProblemDetails, 404)
@validate_response(ProblemDetails, 409)
@require("admin")
async def replay_dead_letter(letter_id: str) -> tuple[DeadLetter, int]:
    """Put the email back into the send queue with its attempts reset: 202 with the letter
    (`replayed_at` set); 409 when its email is no longer failed (replayed already)."""
    st = state()
    try:
        replayed = await deadletters.replay(
            st.deps.db, st.publisher, letter_id, account_id=caller().account_id
        )
    except UnknownDeadLetter:
        raise Problem(404, f"no dead letter {letter_id!r}") from None
    except NotReplayable as exc:
        raise Problem(409, str(exc)) from None
    return _item(replayed.letter), 202
