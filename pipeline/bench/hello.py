"""A bare hello endpoint on the API's own Quart app and hypercorn server: `mailpipe bench`'s
ceiling for ingest. Registered only when the process runs with `MAILPIPE_BENCH_HELLO=1`."""

from __future__ import annotations

import os
from collections.abc import Mapping

from quart import Blueprint, Response
from quart_schema import hide

HELLO_ENV = "MAILPIPE_BENCH_HELLO"
HELLO_PATH = "/bench/hello"

bp = Blueprint("bench_hello", __name__)

_BODY = b'{"hello":"world"}'


def enabled(env: Mapping[str, str] = os.environ) -> bool:
    return env.get(HELLO_ENV) == "1"


@bp.get(HELLO_PATH)
@hide
async def hello() -> Response:
    """Nothing but the server, the app and its request hooks."""
    return Response(_BODY, status=200, content_type="application/json")
