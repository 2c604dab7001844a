"""create_app: the Quart app over the process's resources, with docs, errors and request ids."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from quart import Quart, Response, g, request
from quart_schema import Info, QuartSchema
from quart_schema.openapi import OpenAPIProvider

from web import problems, ratelimit
from web.metrics import ApiMetrics
from web.routes import dead_letters, emails, health, suppressions, webhooks
from web.state import AppState

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


class _OpenAPI(OpenAPIProvider):
    """The OpenAPI document, with every request body marked required: each endpoint that takes
    one answers 400 without it (quart-schema leaves `required` out)."""

    def build_request_body(self, model: Any, source: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        body, components = super().build_request_body(model, source)
        return {**body, "required": True}, components


def create_app(app_state: AppState) -> Quart:
    settings = app_state.deps.settings
    app = Quart("mailpipe")
    app.config["MAX_CONTENT_LENGTH"] = settings.api.max_request_bytes
    app.config["BODY_TIMEOUT"] = 30  # a slow body is cut off instead of holding a worker
    app.config["QUART_SCHEMA_CONVERSION_PREFERENCE"] = "pydantic"
    app.extensions["mailpipe"] = app_state
    app.extensions["metrics"] = metrics = ApiMetrics()
    QuartSchema(
        app,
        info=Info(title="mailpipe", version="1", description="Transactional email API"),
        openapi_path="/openapi.json",
        swagger_ui_path="/docs",
        redoc_ui_path=None,
        scalar_ui_path=None,
        security_schemes={
            "apiKey": {"type": "apiKey", "in_": "header", "name": "X-API-Key"},
            "bearer": {"type": "http", "scheme": "bearer"},
        },
        security=[{"apiKey": []}, {"bearer": []}],
        openapi_provider_class=_OpenAPI,
    )
    problems.register(app)
    ratelimit.register(app, app_state)
    app.register_blueprint(health.bp)
    app.register_blueprint(emails.bp)
    app.register_blueprint(suppressions.bp)
    app.register_blueprint(dead_letters.bp)
    app.register_blueprint(webhooks.bp)
    from pipeline.bench import hello

    if hello.enabled():  # `mailpipe bench`'s ceiling: the same server, nothing but hello
        app.register_blueprint(hello.bp)

    @app.before_request
    async def _start() -> None:
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        g.started = time.perf_counter()
        if "\x00" in request.path:  # no id of ours holds a NUL; PostgreSQL text cannot either
            raise problems.Problem(404, "no such resource")

    @app.after_request
    async def _finish(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id") or uuid.uuid4().hex
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.requests.labels(request.method, rule, str(response.status_code)).inc()
        if "started" in g:
            metrics.latency.labels(rule).observe(time.perf_counter() - g.started)
        return response

    return app
