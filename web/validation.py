"""Body and query validation that names every bad field, and still feeds the OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from quart import request
from quart_schema.validation import (
    QUART_SCHEMA_QUERYSTRING_ATTRIBUTE,
    QUART_SCHEMA_REQUEST_ATTRIBUTE,
    DataSource,
)

from web.problems import Problem, field_path, validation_errors, validation_problem

M = TypeVar("M", bound=BaseModel)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def loads(data: bytes | str) -> Any:
    """Strict JSON: NaN and Infinity (which Python's json accepts and PostgreSQL's jsonb does
    not) are refused; so is nesting too deep to parse."""
    try:
        return json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


async def json_body() -> Any:
    """The parsed JSON body, whatever the Content-Type; a 400 naming the problem otherwise."""
    data = await request.get_data(as_text=False)
    if not data:
        raise Problem(400, "the request body is empty; send a JSON object", slug="invalid-json")
    try:
        return loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem(
            400, f"the request body is not valid JSON: {exc}", slug="invalid-json"
        ) from exc


def parse(model: type[M], data: Any, *, prefix: tuple[str | int, ...] = ()) -> M:
    """Validate `data`; a 422 naming every bad field (per-field and cross-field rules alike)."""
    cross = getattr(model, "cross_field_errors", None)
    errors = cross(data) if cross else []
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        errors = validation_errors(exc) + errors
    else:
        if not errors:
            return parsed
    if prefix:
        errors = [{**e, "field": _prefixed(prefix, e["field"])} for e in errors]
    raise validation_problem(errors)


def _prefixed(prefix: tuple[str | int, ...], field: str) -> str:
    """`emails[1]` + `to[0]` → `emails[1].to[0]`; the whole item (`body`) is `emails[1]`."""
    head = field_path(list(prefix))
    if field == "body":
        return head
    return head + ("" if field.startswith("[") else ".") + field


def body(model: type[BaseModel]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Validate the JSON body with `model`; the handler gets it as `data`."""

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        setattr(func, QUART_SCHEMA_REQUEST_ATTRIBUTE, (model, DataSource.JSON))

        @wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await func(*args, data=parse(model, await json_body()), **kwargs)

        return wrapper

    return decorator


def query(model: type[BaseModel]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Validate the query string with `model`; the handler gets it as `query_args`."""

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        setattr(func, QUART_SCHEMA_QUERYSTRING_ATTRIBUTE, model)

        @wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            raw = {k: (v if len(v) > 1 else v[0]) for k, v in request.args.lists()}
            return await func(*args, query_args=parse(model, raw), **kwargs)

        return wrapper

    return decorator
