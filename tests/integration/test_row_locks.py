"""Statements that update many emails at once lock them in id order, so two of them sharing
rows wait for each other instead of deadlocking; and a `sent` commit that fails anyway (a
deadlock, a dropped connection) is tried again rather than leaving the email `sending`."""

from __future__ import annotations

import logging
import random
from types import MappingProxyType
from typing import Any

import anyio
import psycopg
import pytest

from pipeline.mail.smtp_pool import SendResult
from pipeline.roles.sender import Sender
from pipeline.store import queries
from tests.integration.conftest import Service
from tests.procs import ensure_account, new_emails

pytestmark = pytest.mark.anyio


async def insert(db_url: str, emails: list[queries.NewEmail]) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        async with conn.transaction():
            for email in emails:
                await queries.insert_email(conn, email, event_type="email.queued")


async def test_claims_sent_commits_and_publish_marks_never_deadlock(test_db: str) -> None:
    """The sender's batched `sent` commit and the sweeper's batched publish mark over the same
    rows, each given them in its own shuffled order, many times at once."""
    account = await ensure_account(test_db, "locks")
    rng = random.Random(7)
    for _ in range(5):
        emails = new_emails(account, [f"s{n}" for n in range(200)])
        await insert(test_db, emails)
        ids = [e.id for e in emails]
        async with await psycopg.AsyncConnection.connect(test_db, autocommit=True) as conn:
            claimed = await queries.claim_many(conn, ids, lease_s=300)
        assert len(claimed) == len(ids)

        async def mark_sent(chunk: list[str]) -> None:
            async with await psycopg.AsyncConnection.connect(test_db, autocommit=True) as c:
                await queries.mark_sent_many(
                    c, [queries.Sent(i, {"code": 250, "message": "ok"}, None) for i in chunk]
                )

        async def mark_published(chunk: list[str]) -> None:
            async with await psycopg.AsyncConnection.connect(test_db, autocommit=True) as c:
                await queries.mark_published(c, chunk)

        async with anyio.create_task_group() as tg:
            for job in (mark_sent, mark_published, mark_sent, mark_published):
                chunk = rng.sample(ids, 150)
                tg.start_soon(job, chunk)
        async with await psycopg.AsyncConnection.connect(test_db, autocommit=True) as conn:
            await queries.mark_sent_many(
                conn, [queries.Sent(i, {"code": 250, "message": "ok"}, None) for i in ids]
            )
            cur = await conn.execute(
                "SELECT count(*) FROM emails WHERE id = ANY(%s) AND status = 'sent'", (ids,)
            )
            assert (await cur.fetchone()) == (len(ids),)


async def test_a_failed_sent_commit_is_tried_again(
    service: Service, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first `sent` commit fails as a deadlock victim would; the second one lands, and the
    email is `sent` at once (not `sending` until its lease, then sent twice)."""
    [email] = new_emails(service.account_id, ["retried"])
    await insert(service.settings.database.url, [email])
    async with service.deps.db.connection() as conn:
        [claimed] = await queries.claim_many(conn, [email.id], lease_s=300)
    real = queries.mark_sent_many
    calls: list[int] = []

    async def flaky(conn: Any, sent: Any) -> set[str]:
        calls.append(len(sent))
        if len(calls) == 1:
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        return await real(conn, sent)

    monkeypatch.setattr(queries, "mark_sent_many", flaky)
    caplog.set_level(logging.WARNING, logger="pipeline.roles.sender")
    sender = Sender(service.deps, smtp=None, publisher=None)  # type: ignore[arg-type]
    reply = SendResult(250, "2.0.0", "queued as 1", MappingProxyType({}))
    await sender.record_sent(claimed, reply, b"raw message")
    assert len(calls) == 2
    async with service.deps.db.connection() as conn:
        cur = await conn.execute("SELECT status, raw FROM emails WHERE id = %s", (email.id,))
        assert await cur.fetchone() == ("sent", b"raw message")
    assert any("retrying" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


def SendResultFor250() -> Any:
    from types import MappingProxyType

    from pipeline.mail.smtp_pool import SendResult

    return SendResult(250, "2.0.0", "queued as 1", MappingProxyType({}))
