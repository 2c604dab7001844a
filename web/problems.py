"""RFC 9457 problem+json for every error, so clients parse one shape whatever went wrong."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from quart import Quart, Response, json
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

TYPE_BASE = "https://mailpipe.dev/problems/"
PROBLEM_JSON = "application/problem+json"

_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    408: ("request-timeout", "Request timeout"),
    409: ("conflict", "Conflict"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("validation-error", "Validation failed"),
    429: ("rate-limited", "Too many requests"),
    500: ("internal-error", "Internal server error"),
    503: ("unavailable", "Service unavailable"),
}


class Problem(Exception):
    """Raised anywhere in a handler; becomes a problem+json response."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        errors: Sequence[Mapping[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        default_slug, default_title = _SLUGS.get(status, ("error", "Error"))
        self.status = status
        self.slug = slug or default_slug
        self.title = title or default_title
        self.detail = detail
        self.errors = list(errors) if errors is not None else None
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": TYPE_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors is not None:
            out["errors"] = self.errors
        return out

    def response(self) -> Response:
        return Response(
            json.dumps(self.body()),
            status=self.status,
            headers=self.headers,
            content_type=PROBLEM_JSON,
        )


def field_path(loc: Sequence[str | int]) -> str:
    """('to', 1) → 'to[1]'; ('attachments', 0, 'filename') → 'attachments[0].filename'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def validation_errors(
    exc: ValidationError, *, prefix: Sequence[str | int] = ()
) -> list[dict[str, str]]:
    """One entry per bad field, every one of them, in pydantic's order."""
    errors = []
    for err in exc.errors(include_url=False):
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        errors.append({"field": field_path([*prefix, *err["loc"]]), "message": message})
    return errors


def validation_problem(errors: list[dict[str, str]]) -> Problem:
    fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
    return Problem(422, f"invalid fields: {fields}", errors=errors)


def register(app: Quart) -> None:
    """Route every error, expected or not, to problem+json."""

    @app.errorhandler(Problem)
    async def _problem(exc: Problem) -> Response:
        return exc.response()

    @app.errorhandler(HTTPException)
    async def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        detail = exc.description or _SLUGS.get(status, ("", "Error"))[1]
        headers = {}
        allowed = getattr(exc, "valid_methods", None)
        if status == 405 and allowed:
            headers["Allow"] = ", ".join(allowed)
        return Problem(status, detail, headers=headers).response()

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return Problem(500, "an unexpected error occurred; it has been logged").response()
