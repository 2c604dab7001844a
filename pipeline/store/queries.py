"""Every SQL statement mailpipe runs, as named functions over a psycopg async connection.

Callers own the transaction (`async with conn.transaction()`); each function is one round trip.
State changes and the event that records them are written by the same statement, so the timeline
can never disagree with the status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb

from pipeline.ids import new_id

Conn = AsyncConnection[Any]

# ---------------------------------------------------------------- accounts and keys


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class ApiKey:
    id: str
    account_id: str
    lookup: str
    hash: bytes
    scopes: list[str]
    rate: float | None
    burst: int | None
    created_at: datetime
    revoked_at: datetime | None


async def create_account(conn: Conn, name: str) -> Account:
    async with conn.cursor(row_factory=class_row(Account)) as cur:
        await cur.execute(
            "INSERT INTO accounts (id, name) VALUES (%s, %s) RETURNING id, name, created_at",
            (new_id("acc"), name),
        )
        row = await cur.fetchone()
    assert row is not None
    return row


async def account_by_name(conn: Conn, name: str) -> Account | None:
    async with conn.cursor(row_factory=class_row(Account)) as cur:
        await cur.execute("SELECT id, name, created_at FROM accounts WHERE name = %s", (name,))
        return await cur.fetchone()


async def ensure_account(conn: Conn, name: str) -> Account:
    """The account called `name`, created when missing (idempotent under concurrency)."""
    await conn.execute(
        "INSERT INTO accounts (id, name) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
        (new_id("acc"), name),
    )
    account = await account_by_name(conn, name)
    assert account is not None
    return account


_KEY_COLUMNS = "id, account_id, lookup, hash, scopes, rate, burst, created_at, revoked_at"


async def insert_key(
    conn: Conn,
    *,
    account_id: str,
    lookup: str,
    hash: bytes,
    scopes: Sequence[str],
    rate: float | None = None,
    burst: int | None = None,
    key_id: str | None = None,
) -> ApiKey:
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(
            "INSERT INTO api_keys (id, account_id, lookup, hash, scopes, rate, burst)"
            f" VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_KEY_COLUMNS}",
            (key_id or new_id("key"), account_id, lookup, hash, list(scopes), rate, burst),
        )
        row = await cur.fetchone()
    assert row is not None
    return row


async def key_by_lookup(conn: Conn, lookup: str) -> ApiKey | None:
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE lookup = %s", (lookup,))
        return await cur.fetchone()


async def list_keys(conn: Conn, account_id: str) -> list[ApiKey]:
    async with conn.cursor(row_factory=class_row(ApiKey)) as cur:
        await cur.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE account_id = %s ORDER BY created_at",
            (account_id,),
        )
        return await cur.fetchall()


async def revoke_key(conn: Conn, key_id: str) -> bool:
    """True when a live key was revoked now."""
    cur = await conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL", (key_id,)
    )
    return cur.rowcount == 1


async def revoke_key_by_lookup(conn: Conn, lookup: str) -> bool:
    cur = await conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE lookup = %s AND revoked_at IS NULL",
        (lookup,),
    )
    return cur.rowcount == 1


async def upsert_key(
    conn: Conn, *, account_id: str, lookup: str, hash: bytes, scopes: Sequence[str]
) -> None:
    """Create or re-enable a fixed key (the development demo key)."""
    await conn.execute(
        "INSERT INTO api_keys (id, account_id, lookup, hash, scopes) VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (lookup) DO UPDATE SET revoked_at = NULL, hash = EXCLUDED.hash,"
        " scopes = EXCLUDED.scopes, account_id = EXCLUDED.account_id",
        (new_id("key"), account_id, lookup, hash, list(scopes)),
    )


# ---------------------------------------------------------------- emails


@dataclass(frozen=True)
class NewEmail:
    """An accepted email, as the API hands it to the store."""

    id: str
    account_id: str
    status: str
    from_email: str
    to: Sequence[str]
    cc: Sequence[str]
    bcc: Sequence[str]
    reply_to: Sequence[str]
    envelope_to: Sequence[str]
    subject: str
    content: Mapping[str, Any]
    message_id: str
    tags: Mapping[str, str]
    metadata: Any
    scheduled_at: datetime | None


@dataclass(frozen=True)
class Claimed:
    """What a sender needs to attempt one email it now owns."""

    id: str
    account_id: str
    from_email: str
    to_addrs: list[str]
    cc_addrs: list[str]
    bcc_addrs: list[str]
    reply_to: list[str]
    envelope_to: list[str]
    subject: str
    content: dict[str, Any]
    raw: bytes | None
    message_id: str
    attempts: int
    created_at: datetime


_PUBLIC_EMAIL_COLUMNS = (
    "id, status, from_email, to_addrs AS to, cc_addrs AS cc, bcc_addrs AS bcc, subject, tags,"
    " metadata, scheduled_at, attempts, last_response, created_at, updated_at, sent_at"
)


def _event_insert(type_sql: str, data_sql: str, source: str) -> str:
    """SQL that records one event per row of `source` (a CTE), in the same statement."""
    return (
        "INSERT INTO events (email_id, account_id, type, data)"
        f" SELECT id, account_id, {type_sql}, {data_sql} FROM {source}"
    )


async def insert_email(conn: Conn, email: NewEmail, *, event_type: str) -> datetime:
    """Insert the email and its first event; returns created_at."""
    cur = await conn.execute(
        "WITH e AS (INSERT INTO emails (id, account_id, status, from_email, to_addrs, cc_addrs,"
        " bcc_addrs, reply_to, envelope_to, subject, content, message_id, tags, metadata,"
        " scheduled_at) VALUES (%(id)s, %(account_id)s, %(status)s, %(from_email)s, %(to)s,"
        " %(cc)s, %(bcc)s, %(reply_to)s, %(envelope_to)s, %(subject)s, %(content)s,"
        " %(message_id)s, %(tags)s, %(metadata)s, %(scheduled_at)s)"
        " RETURNING id, account_id, created_at),"
        " ev AS (" + _event_insert("%(event_type)s", "'{}'::jsonb", "e") + ")"
        " SELECT created_at FROM e",
        {
            "id": email.id,
            "account_id": email.account_id,
            "status": email.status,
            "from_email": email.from_email,
            "to": list(email.to),
            "cc": list(email.cc),
            "bcc": list(email.bcc),
            "reply_to": list(email.reply_to),
            "envelope_to": list(email.envelope_to),
            "subject": email.subject,
            "content": Jsonb(dict(email.content)),
            "message_id": email.message_id,
            "tags": Jsonb(dict(email.tags)),
            "metadata": None if email.metadata is None else Jsonb(email.metadata),
            "scheduled_at": email.scheduled_at,
            "event_type": event_type,
        },
    )
    row = await cur.fetchone()
    assert row is not None
    created_at: datetime = row[0]
    return created_at


async def mark_published(conn: Conn, email_ids: Sequence[str]) -> None:
    """The broker confirmed these: the sweeper need not republish them."""
    await conn.execute(
        "UPDATE emails SET published = true WHERE id = ANY(%s) AND NOT published",
        (list(email_ids),),
    )


async def get_email(conn: Conn, account_id: str, email_id: str) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_PUBLIC_EMAIL_COLUMNS} FROM emails WHERE account_id = %s AND id = %s",
            (account_id, email_id),
        )
        return await cur.fetchone()


async def list_emails(
    conn: Conn, account_id: str, *, limit: int, before: tuple[datetime, str] | None
) -> list[dict[str, Any]]:
    """Newest first; keyset pagination on (created_at, id) stays exact while rows arrive."""
    where, params = "account_id = %s", [account_id]
    if before is not None:
        where += " AND (created_at, id) < (%s, %s)"
        params += [before[0], before[1]]
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_PUBLIC_EMAIL_COLUMNS} FROM emails WHERE {where}"
            " ORDER BY created_at DESC, id DESC LIMIT %s",
            [*params, limit],
        )
        return await cur.fetchall()


async def list_events(conn: Conn, account_id: str, email_id: str) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT id, type, created_at, data FROM events"
            " WHERE account_id = %s AND email_id = %s ORDER BY seq",
            (account_id, email_id),
        )
        return await cur.fetchall()


async def email_status(conn: Conn, email_id: str) -> str | None:
    cur = await conn.execute("SELECT status FROM emails WHERE id = %s", (email_id,))
    row = await cur.fetchone()
    return None if row is None else row[0]


# ---------------------------------------------------------------- sending


async def claim_for_send(conn: Conn, email_id: str, *, lease_s: float) -> Claimed | None:
    """`queued`/`deferred` → `sending` for this sender only; None when someone else has it or
    it is finished. The conditional update is what keeps a redelivered message from being sent
    twice."""
    async with conn.cursor(row_factory=class_row(Claimed)) as cur:
        await cur.execute(
            "WITH c AS (UPDATE emails SET status = 'sending', attempts = attempts + 1,"
            " lease_until = now() + make_interval(secs => %(lease_s)s),"
            " updated_at = clock_timestamp()"
            " WHERE id = %(id)s AND status IN ('queued', 'deferred')"
            " RETURNING id, account_id, from_email, to_addrs, cc_addrs, bcc_addrs, reply_to,"
            " envelope_to, subject, content, raw, message_id, attempts, created_at),"
            " ev AS ("
            + _event_insert("'email.sending'", "jsonb_build_object('attempt', attempts)", "c")
            + ") SELECT * FROM c",
            {"id": email_id, "lease_s": lease_s},
        )
        return await cur.fetchone()


async def mark_sent(
    conn: Conn, email_id: str, *, reply: Mapping[str, Any], raw: bytes | None
) -> bool:
    """`sending` → `sent` with the relay's reply; keeps the rendered bytes for the record."""
    cur = await conn.execute(
        "WITH s AS (UPDATE emails SET status = 'sent', sent_at = clock_timestamp(),"
        " updated_at = clock_timestamp(), last_response = %(reply)s, lease_until = NULL,"
        " raw = coalesce(raw, %(raw)s)"
        " WHERE id = %(id)s AND status = 'sending' RETURNING id, account_id),"
        " ev AS ("
        + _event_insert("'email.sent'", "jsonb_build_object('response', %(reply)s::jsonb)", "s")
        + ")"
        " SELECT count(*) FROM s",
        {"id": email_id, "reply": Jsonb(dict(reply)), "raw": raw},
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def mark_deferred(
    conn: Conn,
    email_id: str,
    *,
    reply: Mapping[str, Any],
    attempt: int,
    wait_s: float,
    raw: bytes | None,
) -> datetime | None:
    """`sending` → `deferred` after a temporary failure; returns when the next attempt is due."""
    cur = await conn.execute(
        "WITH d AS (UPDATE emails SET status = 'deferred', updated_at = clock_timestamp(),"
        " last_response = %(reply)s, lease_until = NULL, raw = coalesce(raw, %(raw)s),"
        " next_attempt_at = clock_timestamp() + make_interval(secs => %(wait_s)s)"
        " WHERE id = %(id)s AND status = 'sending'"
        " RETURNING id, account_id, next_attempt_at),"
        " ev AS ("
        + _event_insert(
            "'email.deferred'",
            "jsonb_build_object('response', %(reply)s::jsonb, 'attempt', %(attempt)s::int,"
            " 'next_attempt_at', to_char(next_attempt_at AT TIME ZONE 'UTC',"
            ' \'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"\'))',
            "d",
        )
        + ") SELECT next_attempt_at FROM d",
        {
            "id": email_id,
            "reply": Jsonb(dict(reply)),
            "raw": raw,
            "wait_s": wait_s,
            "attempt": attempt,
        },
    )
    row = await cur.fetchone()
    return None if row is None else row[0]


async def mark_bounced(
    conn: Conn, email_id: str, *, reply: Mapping[str, Any], hard: bool, raw: bytes | None
) -> bool:
    """`sending` → `bounced` after a permanent rejection (5xx)."""
    cur = await conn.execute(
        "WITH b AS (UPDATE emails SET status = 'bounced', updated_at = clock_timestamp(),"
        " last_response = %(reply)s, lease_until = NULL, raw = coalesce(raw, %(raw)s)"
        " WHERE id = %(id)s AND status = 'sending' RETURNING id, account_id),"
        " ev AS ("
        + _event_insert(
            "'email.bounced'",
            "jsonb_build_object('response', %(reply)s::jsonb, 'bounce_type', %(kind)s::text)",
            "b",
        )
        + ") SELECT count(*) FROM b",
        {
            "id": email_id,
            "reply": Jsonb(dict(reply)),
            "raw": raw,
            "kind": "hard" if hard else "soft",
        },
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def mark_failed(
    conn: Conn,
    email_id: str,
    *,
    reason: str,
    reply: Mapping[str, Any] | None = None,
    raw: bytes | None = None,
) -> str | None:
    """Any unfinished status → `failed`, with a dead letter row to list and replay; returns
    the dead letter's id (None when the email was already finished)."""
    cur = await conn.execute(
        "WITH f AS (UPDATE emails SET status = 'failed', updated_at = clock_timestamp(),"
        " last_response = coalesce(%(reply)s, last_response), lease_until = NULL,"
        " raw = coalesce(raw, %(raw)s)"
        " WHERE id = %(id)s AND status IN ('queued', 'sending', 'deferred')"
        " RETURNING id, account_id, attempts, last_response),"
        " dl AS (INSERT INTO dead_letters (id, email_id, account_id, reason, attempts,"
        " last_response) SELECT %(dlq_id)s, id, account_id, %(reason)s, attempts, last_response"
        " FROM f RETURNING id),"
        " ev AS ("
        + _event_insert(
            "'email.failed'",
            "jsonb_build_object('reason', %(reason)s::text, 'attempts', attempts,"
            " 'dead_letter_id', %(dlq_id)s::text)",
            "f",
        )
        + ") SELECT id FROM dl",
        {
            "id": email_id,
            "reason": reason,
            "reply": None if reply is None else Jsonb(dict(reply)),
            "raw": raw,
            "dlq_id": new_id("dlq"),
        },
    )
    row = await cur.fetchone()
    return None if row is None else row[0]


async def release_claim(conn: Conn, email_id: str) -> bool:
    """Give an unsent claim back (`sending` → `queued`), e.g. when a stop interrupts it."""
    cur = await conn.execute(
        "UPDATE emails SET status = 'queued', attempts = greatest(attempts - 1, 0),"
        " lease_until = NULL, updated_at = clock_timestamp(), published = false"
        " WHERE id = %s AND status = 'sending'",
        (email_id,),
    )
    return cur.rowcount == 1


# ---------------------------------------------------------------- sweeping


async def unpublished_emails(conn: Conn, *, older_than_s: float, limit: int) -> list[str]:
    """Queued emails the broker never confirmed (it was down at acceptance, or a lease expired)."""
    cur = await conn.execute(
        "SELECT id FROM emails WHERE status = 'queued' AND NOT published"
        " AND updated_at < clock_timestamp() - make_interval(secs => %s)"
        " ORDER BY created_at LIMIT %s",
        (older_than_s, limit),
    )
    return [row[0] for row in await cur.fetchall()]


async def reclaim_expired_leases(conn: Conn, *, limit: int) -> list[str]:
    """Emails stuck in `sending` past their lease (their sender died) go back to `queued`."""
    cur = await conn.execute(
        "WITH r AS (UPDATE emails SET status = 'queued', lease_until = NULL, published = false,"
        " updated_at = clock_timestamp()"
        " WHERE id IN (SELECT id FROM emails WHERE status = 'sending'"
        " AND lease_until < clock_timestamp() ORDER BY lease_until LIMIT %(limit)s"
        " FOR UPDATE SKIP LOCKED) AND status = 'sending' RETURNING id, account_id),"
        " ev AS ("
        + _event_insert("'email.queued'", '\'{"reason": "lease_expired"}\'::jsonb', "r")
        + ")"
        " SELECT id FROM r",
        {"limit": limit},
    )
    return [row[0] for row in await cur.fetchall()]
