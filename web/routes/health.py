"""Liveness, readiness and metrics: no authentication, for load balancers and Prometheus."""

from __future__ import annotations

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Blueprint, Response, current_app
from quart_schema import validate_response

from web.schemas import Health, Readiness
from web.state import state

bp = Blueprint("health", __name__)

CHECK_TIMEOUT_S = 2.0


@bp.get("/health")
@validate_response(Health)
async def health() -> Health:
    """200 while the process runs."""
    return Health(status="ok")


async def _check_postgres() -> None:
    async with state().deps.db.connection(timeout=CHECK_TIMEOUT_S) as conn:
        await conn.execute("SELECT 1")


async def _check_rabbitmq() -> None:
    await state().publisher.check()


async def _check_redis() -> None:
    redis = state().deps.redis
    if redis is None:
        raise RuntimeError("not configured in this process")
    await redis.ping()


@bp.get("/ready")
@validate_response(Readiness, 200)
@validate_response(Readiness, 503)
async def ready() -> tuple[Readiness, int]:
    """200 when PostgreSQL, RabbitMQ and Redis all answer; 503 naming those that do not."""
    checks = {"postgres": _check_postgres, "rabbitmq": _check_rabbitmq, "redis": _check_redis}
    results: dict[str, str] = {}

    async def run(name: str) -> None:
        try:
            with anyio.fail_after(CHECK_TIMEOUT_S):
                await checks[name]()
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"failing: {type(exc).__name__}: {exc}".strip()

    async with anyio.create_task_group() as tg:
        for name in checks:
            tg.start_soon(run, name)
    failing = [n for n in checks if results[n] != "ok"]
    status = "ok" if not failing else "unavailable: " + ", ".join(failing)
    return Readiness(status=status, checks=dict(sorted(results.items()))), (503 if failing else 200)


@bp.get("/metrics")
async def metrics() -> Response:
    """Prometheus text format."""
    body = current_app.extensions["metrics"].render()
    return Response(body, content_type=CONTENT_TYPE_LATEST)
