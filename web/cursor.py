"""Opaque list cursors: the (created_at, id) of the last row seen, so pages never skip or repeat."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from web.problems import Problem, validation_problem


def encode(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, row_id = json.loads(raw)
        when = datetime.fromisoformat(stamp)
        if not isinstance(row_id, str) or when.tzinfo is None or "\x00" in row_id:
            raise ValueError
        row_id.encode()  # a lone surrogate is no text PostgreSQL takes: UnicodeEncodeError
    except (ValueError, TypeError, RecursionError) as exc:
        problem: Problem = validation_problem(
            [{"field": "after", "message": "not a cursor this API returned"}]
        )
        raise problem from exc
    return when, row_id


Row = TypeVar("Row")


def page(
    rows: Sequence[Row], limit: int, key: Callable[[Row], tuple[datetime, str]]
) -> tuple[list[Row], bool, str | None]:
    """Trim a `limit + 1` fetch to one page: (rows, has_more, next_cursor)."""
    has_more = len(rows) > limit
    kept = list(rows[:limit])
    return kept, has_more, encode(*key(kept[-1])) if has_more else None
