"""Helpers for the failure-path tests: a pipeline in front of a scripted SMTP sink, and ways to
look at what it recorded (events, dead letters, queues, the `mailpipe` CLI).

    async with scripted_service(test_db, prefix, script=always("451 4.7.1 later")) as (svc, sink):
        ...

Every wait polls against a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import anyio
from psycopg.rows import dict_row

from pipeline.amqp.connection import connect
from tests.integration.conftest import Service, run_service, settings_for, test_env
from tests.smtp_sink import RcptScript, Script, SmtpSink, smtp_sink

DEADLINE_S = 20.0

# Generous limits: these tests are about failures, not about the rate limiter.
QUIET_ENV = {"MAILPIPE_RATE_LIMIT_RATE": "1000", "MAILPIPE_RATE_LIMIT_BURST": "1000"}

T = TypeVar("T")


def service_env(db_url: str, prefix: str, sink: SmtpSink, **env: str) -> dict[str, str]:
    """The settings environment of a service (or a CLI run) against `sink`."""
    return test_env(
        db_url, prefix, SMTP_HOST=sink.host, SMTP_PORT=str(sink.port), **(QUIET_ENV | env)
    )


@asynccontextmanager
async def scripted_service(
    db_url: str,
    prefix: str,
    *,
    script: Script | None = None,
    rcpt_script: RcptScript | None = None,
    roles: tuple[str, ...] = ("api", "sender", "retry", "sweeper"),
    **env: str,
) -> AsyncIterator[tuple[Service, SmtpSink]]:
    async with smtp_sink(script, rcpt_script=rcpt_script) as sink:
        settings = settings_for(
            db_url, prefix, SMTP_HOST=sink.host, SMTP_PORT=str(sink.port), **(QUIET_ENV | env)
        )
        async with run_service(settings, roles) as svc:
            svc.extra["sink"] = sink
            yield svc, sink


async def eventually(
    check: Callable[[], Awaitable[T | None]], what: str, within: float = DEADLINE_S
) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    with anyio.move_on_after(within):
        while True:
            result = await check()
            if result:
                return result
            await anyio.sleep(0.05)
    raise AssertionError(f"timed out after {within:g} s waiting for {what}")


async def post_email(svc: Service, key: str | None = None, **fields: Any) -> dict[str, Any]:
    from tests.integration.conftest import email_body

    r = await svc.http.post("/v1/emails", json=email_body(**fields), headers=svc.auth(key))
    assert r.status_code == 202, r.text
    body: dict[str, Any] = r.json()
    return body


async def events(svc: Service, email_id: str) -> list[dict[str, Any]]:
    r = await svc.http.get(f"/v1/emails/{email_id}/events", headers=svc.auth())
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


async def get_email(svc: Service, email_id: str) -> dict[str, Any]:
    r = await svc.http.get(f"/v1/emails/{email_id}", headers=svc.auth())
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def dead_letters(svc: Service, key: str | None = None, **params: Any) -> dict[str, Any]:
    r = await svc.http.get("/v1/dead-letters", params=params, headers=svc.auth(key))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def db_rows(svc: Service, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Rows straight from the test's database (for what the API does not show)."""
    async with svc.deps.db.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return await cur.fetchall()


async def queue_depth(svc: Service, queue: str) -> int:
    connection = await connect(svc.settings.amqp.url)
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(queue, passive=True)
        assert ok.message_count is not None
        return ok.message_count
    finally:
        await connection.close()


def timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


async def mailpipe_cli(env: dict[str, str], *args: str) -> CliResult:
    """Run the real `mailpipe` command line (a subprocess) with this environment only."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    done = await anyio.run_process(
        [sys.executable, "-m", "pipeline", *args], env=keep | env, check=False
    )
    return CliResult(done.returncode, done.stdout.decode(), done.stderr.decode())


async def email_published(svc: Service, email_id: str) -> bool:
    rows = await db_rows(svc, "SELECT published FROM emails WHERE id = %s", email_id)
    return bool(rows and rows[0]["published"])


__all__ = [
    "DEADLINE_S",
    "CliResult",
    "db_rows",
    "dead_letters",
    "email_published",
    "events",
    "eventually",
    "get_email",
    "mailpipe_cli",
    "post_email",
    "queue_depth",
    "scripted_service",
    "service_env",
    "timestamp",
]
