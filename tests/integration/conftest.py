"""Integration fixtures: a fresh database and queue prefix per test, the pipeline in-process.

Every test gets its own database (cloned from a migrated template, so it is cheap) and its own
AMQP prefix, so no test sees another's rows or messages, and the machine's shared services are
only ever added to and cleaned up after, never stopped.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from psycopg import sql

from pipeline import keys
from pipeline.amqp.connection import connect
from pipeline.amqp.topology import delete_all
from pipeline.resources import Deps, open_resources
from pipeline.settings import Settings, load_settings
from pipeline.store import queries
from pipeline.store.migrate import migrate
from pipeline.supervisor import run_roles
from tests.smtp_sink import smtp_sink

PG_ADMIN = os.environ.get("MAILPIPE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_counter = itertools.count()


def _db_url(name: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def template_db(run_id: str) -> Iterator[str]:
    """A migrated database that each test's database is cloned from."""
    name = f"mailpipe_{run_id}_tpl"
    anyio.run(migrate, _db_url(name))
    yield name
    _drop(name)


def _drop(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def test_db(template_db: str, run_id: str) -> Iterator[str]:
    name = f"mailpipe_{run_id}_{next(_counter)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    yield _db_url(name)
    _drop(name)


def test_env(db_url: str, prefix: str, **overrides: str) -> dict[str, str]:
    """Environment for `load_settings`: isolated names, free ports, fast timings."""
    env = {
        "DATABASE_URL": db_url,
        "MAILPIPE_AMQP_PREFIX": prefix,
        "MAILPIPE_REDIS_PREFIX": prefix,
        "MAILPIPE_API_PORT": "0",
        "MAILPIPE_SANDBOX_PORT": "0",
        "MAILPIPE_SHUTDOWN_GRACE_S": "5",
        "MAILPIPE_SWEEPER_INTERVAL_S": "0.5",
        "MAILPIPE_RETRY_TIERS_S": "1,2,4",
        "MAILPIPE_RETRY_BASE_DELAY_S": "1",
        "MAILPIPE_RETRY_MAX_DELAY_S": "4",
        # Generous by default: only the rate-limit tests want to hit the limit.
        "MAILPIPE_RATE_LIMIT_RATE": "1000",
        "MAILPIPE_RATE_LIMIT_BURST": "1000",
    }
    env.update(overrides)
    return env


@pytest.fixture
def prefix(run_id: str) -> str:
    return f"{run_id}.{next(_counter)}."


@dataclass
class Service:
    """A running pipeline and what a test needs to talk to it."""

    deps: Deps
    http: httpx.AsyncClient
    key: str
    account_id: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return self.deps.settings

    async def new_key(self, account: str, scopes: tuple[str, ...] = keys.SCOPES) -> tuple[str, str]:
        """A fresh (key, account_id) for `account` (created when missing)."""
        new = keys.generate_key(test=True)
        async with self.deps.db.connection() as conn:
            acc = await queries.ensure_account(conn, account)
            await queries.insert_key(
                conn, account_id=acc.id, lookup=new.lookup, hash=new.hash, scopes=scopes
            )
        return new.key, acc.id

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"X-API-Key": key or self.key}

    async def wait_status(self, email_id: str, status: str, within: float = 20) -> dict[str, Any]:
        """Poll the API until the email reaches `status` (or fail with what it was)."""
        last: dict[str, Any] = {}
        with anyio.move_on_after(within):
            while True:
                r = await self.http.get(f"/v1/emails/{email_id}", headers=self.auth())
                last = r.json()
                if last.get("status") == status:
                    return last
                await anyio.sleep(0.05)
        raise AssertionError(f"{email_id} never reached {status!r}; last seen {last}")


@asynccontextmanager
async def run_service(
    settings: Settings, roles: tuple[str, ...] = ("api", "sender", "retry", "sweeper")
) -> AsyncIterator[Service]:
    async with open_resources(settings, with_redis="api" in roles) as deps:
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(
                    lambda task_status: run_roles(
                        deps, roles, handle_signals=False, task_status=task_status
                    )
                )
                base = f"http://127.0.0.1:{deps.listening.get('api', 0)}"
                async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                    service = Service(deps=deps, http=http, key="", account_id="")
                    service.key, service.account_id = await service.new_key("test")
                    yield service
                deps.stop.set()
        finally:
            await _delete_topology(settings, deps)


async def _delete_topology(settings: Settings, deps: Deps) -> None:
    with anyio.CancelScope(shield=True):
        connection = await connect(settings.amqp.url)
        try:
            channel = await connection.channel()
            await delete_all(channel, deps.topology)
        finally:
            await connection.close()


def settings_for(db_url: str, prefix: str, **overrides: str) -> Settings:
    return load_settings(env=test_env(db_url, prefix, **overrides))


@pytest.fixture
async def sink() -> AsyncIterator[Any]:
    async with smtp_sink() as s:
        yield s


@pytest.fixture
async def service(test_db: str, prefix: str, sink: Any) -> AsyncIterator[Service]:
    settings = settings_for(test_db, prefix, SMTP_HOST="127.0.0.1", SMTP_PORT=str(sink.port))
    async with run_service(settings) as svc:
        svc.extra["sink"] = sink
        yield svc


def email_body(**fields: Any) -> Mapping[str, Any]:
    body: dict[str, Any] = {
        "from_email": "Sender <sender@example.com>",
        "to": "rcpt@example.org",
        "subject": "Hello",
        "body_text": "Hi there",
    }
    body.update(fields)
    return body
