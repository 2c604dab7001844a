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
    recipients: Sequence[str] = ()
    """Bare lower-cased to+cc+bcc, for `?to=` search."""


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


def _locked_in_order(ids_sql: str) -> str:
    """A CTE body that locks the emails rows of `ids_sql` in id order. Statements that update
    many emails lock through it first: two of them that share rows then wait for each other
    instead of deadlocking (each would otherwise lock in the order its plan meets the rows)."""
    return f"SELECT id FROM emails WHERE id IN ({ids_sql}) ORDER BY id FOR NO KEY UPDATE"


def _event_insert(type_sql: str, data_sql: str, source: str) -> str:
    """SQL that records one event per row of `source` (a CTE), in the same statement."""
    return (
        "INSERT INTO events (email_id, account_id, type, data)"
        f" SELECT id, account_id, {type_sql}, {data_sql} FROM {source}"
    )


async def insert_email(
    conn: Conn,
    email: NewEmail,
    *,
    event_type: str,
    suppressed: Mapping[str, str] | None = None,
) -> datetime:
    """Insert the email and its first events; returns created_at.

    `suppressed` maps each recipient left out of the envelope (as given) to the reason it is
    on the suppression list: one `email.suppressed` event each, before `event_type` (which is
    skipped when the email itself is `suppressed`, so that status has no empty twin event).
    """
    events: list[dict[str, Any]] = [
        {"type": "email.suppressed", "data": {"recipient": addr, "reason": reason}}
        for addr, reason in (suppressed or {}).items()
    ]
    if email.status != "suppressed" or not events:
        events.append({"type": event_type, "data": {}})
    cur = await conn.execute(
        "WITH e AS (INSERT INTO emails (id, account_id, status, from_email, to_addrs, cc_addrs,"
        " bcc_addrs, reply_to, envelope_to, subject, content, message_id, tags, metadata,"
        " scheduled_at, recipients)"
        " VALUES (%(id)s, %(account_id)s, %(status)s, %(from_email)s, %(to)s,"
        " %(cc)s, %(bcc)s, %(reply_to)s, %(envelope_to)s, %(subject)s, %(content)s,"
        " %(message_id)s, %(tags)s, %(metadata)s, %(scheduled_at)s, %(recipients)s)"
        " RETURNING id, account_id, created_at),"
        # ORDER BY n: the events' seq follows the list's order.
        " ev AS (INSERT INTO events (email_id, account_id, type, data)"
        " SELECT e.id, e.account_id, x.value->>'type', x.value->'data'"
        " FROM e, jsonb_array_elements(%(events)s) WITH ORDINALITY AS x(value, n) ORDER BY x.n)"
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
            "recipients": list(email.recipients),
            "events": Jsonb(events),
        },
    )
    row = await cur.fetchone()
    assert row is not None
    created_at: datetime = row[0]
    return created_at


@dataclass(frozen=True)
class GroupInsert:
    """What `insert_emails_unless_suppressed` did: created_at of each inserted email by id,
    and the groups it left out because one of their emails names a suppressed recipient."""

    created: dict[str, datetime]
    held: set[int]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


async def insert_emails_unless_suppressed(
    conn: Conn, groups: Sequence[Sequence[tuple[NewEmail, Sequence[str]]]]
) -> GroupInsert:
    """Insert many emails and their first event (`email.<status>`) in one statement, so in
    autocommit mode in one round trip and one commit: the group commit of concurrent requests.

    Each group is one request's emails, as (email, canonical envelope addresses). A group
    with a recipient on its account's suppression list is left out whole (the caller takes
    the one-by-one path for it, which drops the recipient and records why); the others are
    inserted. One statement: all of it or nothing of it.
    """
    rows = [
        {
            "g": g,
            "n": n,
            "id": email.id,
            "account_id": email.account_id,
            "status": email.status,
            "from_email": email.from_email,
            "to_addrs": list(email.to),
            "cc_addrs": list(email.cc),
            "bcc_addrs": list(email.bcc),
            "reply_to": list(email.reply_to),
            "envelope_to": list(email.envelope_to),
            "subject": email.subject,
            "content": dict(email.content),
            "message_id": email.message_id,
            "tags": dict(email.tags),
            "metadata": email.metadata,
            "scheduled_at": _iso(email.scheduled_at),
            "recipients": list(email.recipients),
            "canon": list(canonical),
        }
        for g, group in enumerate(groups)
        for n, (email, canonical) in enumerate(group)
    ]
    cur = await conn.execute(
        "WITH input AS (SELECT * FROM jsonb_to_recordset(%(rows)s) AS x(g int, n int, id text,"
        " account_id text, status text, from_email text, to_addrs text[], cc_addrs text[],"
        " bcc_addrs text[], reply_to text[], envelope_to text[], subject text, content jsonb,"
        " message_id text, tags jsonb, metadata jsonb, scheduled_at timestamptz,"
        " recipients text[], canon text[])),"
        " held AS (SELECT DISTINCT i.g FROM input i JOIN suppressions s"
        " ON s.account_id = i.account_id AND s.email = ANY(i.canon)),"
        " e AS (INSERT INTO emails (id, account_id, status, from_email, to_addrs, cc_addrs,"
        " bcc_addrs, reply_to, envelope_to, subject, content, message_id, tags, metadata,"
        " scheduled_at, recipients)"
        " SELECT id, account_id, status, from_email, to_addrs, cc_addrs, bcc_addrs, reply_to,"
        " envelope_to, subject, content, message_id, tags, metadata, scheduled_at, recipients"
        " FROM input WHERE g NOT IN (SELECT g FROM held) ORDER BY g, n"
        " RETURNING id, account_id, status, created_at),"
        " ev AS (INSERT INTO events (email_id, account_id, type, data)"
        " SELECT e.id, e.account_id, 'email.' || e.status, '{}'::jsonb"
        " FROM e JOIN input i USING (id) ORDER BY i.g, i.n)"
        " SELECT id, created_at, NULL::int FROM e UNION ALL SELECT NULL, NULL, g FROM held",
        {"rows": Jsonb(rows)},
    )
    created: dict[str, datetime] = {}
    held: set[int] = set()
    for email_id, created_at, group in await cur.fetchall():
        if group is None:
            created[email_id] = created_at
        else:
            held.add(group)
    return GroupInsert(created, held)


async def mark_published(conn: Conn, email_ids: Sequence[str]) -> None:
    """The broker confirmed these: the sweeper need not republish them."""
    await conn.execute(
        f"WITH locked AS MATERIALIZED ({_locked_in_order('SELECT unnest(%s::text[])')})"
        " UPDATE emails SET published = true"
        " WHERE id IN (SELECT id FROM locked) AND NOT published",
        (list(email_ids),),
    )


async def get_email(conn: Conn, account_id: str, email_id: str) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_PUBLIC_EMAIL_COLUMNS} FROM emails WHERE account_id = %s AND id = %s",
            (account_id, email_id),
        )
        return await cur.fetchone()


Cursor = tuple[datetime, str] | None
"""A list's keyset cursor: the sort key of the last row of the previous page, or None."""


def _newest_first(
    clauses: Sequence[str],
    params: Sequence[Any],
    *,
    before: Cursor,
    limit: int,
    key: tuple[str, str] = ("created_at", "id"),
) -> tuple[str, list[Any]]:
    """` WHERE … ORDER BY … LIMIT` and its parameters for one page of a list, newest first,
    after `before`: keyset pagination on `key`, which stays exact while rows arrive."""
    clauses, params = list(clauses), list(params)
    if before is not None:
        clauses.append(f"({key[0]}, {key[1]}) < (%s, %s)")
        params += [before[0], before[1]]
    return (
        f" WHERE {' AND '.join(clauses)} ORDER BY {key[0]} DESC, {key[1]} DESC LIMIT %s",
        [*params, limit],
    )


@dataclass(frozen=True)
class EmailFilter:
    """`GET /v1/emails` filters; None means any."""

    status: str | None = None
    recipient: str | None = None  # bare, lower-cased
    tag: tuple[str, str] | None = None
    since: datetime | None = None
    until: datetime | None = None


async def list_emails(
    conn: Conn,
    account_id: str,
    *,
    limit: int,
    before: Cursor,
    where: EmailFilter = EmailFilter(),
) -> list[dict[str, Any]]:
    """Newest first (`_newest_first`), filtered by `where`."""
    clauses, params = ["account_id = %s"], list[Any]([account_id])
    if where.status is not None:
        clauses.append("status = %s")
        params.append(where.status)
    if where.recipient is not None:
        clauses.append("recipients @> ARRAY[%s]::text[]")
        params.append(where.recipient)
    if where.tag is not None:
        clauses.append("tags @> %s")
        params.append(Jsonb({where.tag[0]: where.tag[1]}))
    if where.since is not None:
        clauses.append("created_at >= %s")
        params.append(where.since)
    if where.until is not None:
        clauses.append("created_at < %s")
        params.append(where.until)
    page, args = _newest_first(clauses, params, before=before, limit=limit)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {_PUBLIC_EMAIL_COLUMNS} FROM emails{page}", args)
        return await cur.fetchall()


async def cancel_email(conn: Conn, account_id: str, email_id: str) -> str | None:
    """`scheduled`/`queued` → `canceled`; returns the status found (None: no such email).
    A sender that later receives its message cannot claim it."""
    cur = await conn.execute(
        "WITH c AS (UPDATE emails SET status = 'canceled', updated_at = clock_timestamp(),"
        " lease_until = NULL WHERE account_id = %(account)s AND id = %(id)s"
        " AND status IN ('scheduled', 'queued') RETURNING id, account_id),"
        " ev AS (" + _event_insert("'email.canceled'", "'{}'::jsonb", "c") + ")"
        " SELECT 'canceled' FROM c UNION ALL"
        " SELECT status FROM emails WHERE account_id = %(account)s AND id = %(id)s"
        " AND NOT EXISTS (SELECT 1 FROM c)",
        {"account": account_id, "id": email_id},
    )
    row = await cur.fetchone()
    return None if row is None else row[0]


async def release_scheduled(conn: Conn, *, limit: int) -> list[str]:
    """Scheduled emails whose time has come → `queued` (unpublished: the caller publishes)."""
    cur = await conn.execute(
        "WITH r AS (UPDATE emails SET status = 'queued', published = false,"
        " updated_at = clock_timestamp()"
        " WHERE id IN (SELECT id FROM emails WHERE status = 'scheduled'"
        " AND scheduled_at <= clock_timestamp() ORDER BY scheduled_at LIMIT %(limit)s"
        " FOR UPDATE SKIP LOCKED) AND status = 'scheduled' RETURNING id, account_id),"
        " ev AS (" + _event_insert("'email.queued'", "'{}'::jsonb", "r") + ")"
        " SELECT id FROM r",
        {"limit": limit},
    )
    return [row[0] for row in await cur.fetchall()]


async def next_scheduled_at(conn: Conn) -> datetime | None:
    cur = await conn.execute("SELECT min(scheduled_at) FROM emails WHERE status = 'scheduled'")
    row = await cur.fetchone()
    return None if row is None else row[0]


# ---------------------------------------------------------------- idempotency


@dataclass(frozen=True)
class StoredResponse:
    request_hash: bytes
    response_code: int
    response_body: Any


async def lock_idempotency_key(conn: Conn, account_id: str, key: str) -> bool:
    """Take the key for this transaction; False when another request holds it right now."""
    cur = await conn.execute(
        "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))", (account_id + "/" + key,)
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def stored_response(
    conn: Conn, account_id: str, key: str, *, ttl_s: float
) -> StoredResponse | None:
    """The response the first request with this key got, if within the window."""
    async with conn.cursor(row_factory=class_row(StoredResponse)) as cur:
        await cur.execute(
            "SELECT request_hash, response_code, response_body FROM idempotency_keys"
            " WHERE account_id = %s AND key = %s"
            " AND created_at > clock_timestamp() - make_interval(secs => %s)",
            (account_id, key, ttl_s),
        )
        return await cur.fetchone()


async def store_response(
    conn: Conn, account_id: str, key: str, *, request_hash: bytes, code: int, body: Any
) -> None:
    """Remember the response (replacing an expired entry for the same key)."""
    await conn.execute(
        "INSERT INTO idempotency_keys (account_id, key, request_hash, response_code,"
        " response_body) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account_id, key) DO UPDATE"
        " SET request_hash = EXCLUDED.request_hash, response_code = EXCLUDED.response_code,"
        " response_body = EXCLUDED.response_body, created_at = clock_timestamp()",
        (account_id, key, request_hash, code, Jsonb(body)),
    )


async def prune_idempotency_keys(conn: Conn, *, ttl_s: float) -> int:
    cur = await conn.execute(
        "DELETE FROM idempotency_keys"
        " WHERE created_at < clock_timestamp() - make_interval(secs => %s)",
        (ttl_s,),
    )
    return cur.rowcount


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


_CLAIMED_COLUMNS = (
    "id, account_id, from_email, to_addrs, cc_addrs, bcc_addrs, reply_to, envelope_to, subject,"
    " content, raw, message_id, attempts, created_at"
)


async def claim_many(conn: Conn, email_ids: Sequence[str], *, lease_s: float) -> list[Claimed]:
    """`claim_for_send` for many emails in one statement (one round trip, one commit); the
    ones claimed now, in no particular order. Each row's condition is checked on its own, so
    an email someone else has, or a finished one, is simply not among them."""
    async with conn.cursor(row_factory=class_row(Claimed)) as cur:
        await cur.execute(
            f"WITH locked AS MATERIALIZED ({_locked_in_order('SELECT unnest(%(ids)s::text[])')}),"
            " c AS (UPDATE emails SET status = 'sending', attempts = attempts + 1,"
            " lease_until = now() + make_interval(secs => %(lease_s)s),"
            " updated_at = clock_timestamp()"
            " WHERE id IN (SELECT id FROM locked) AND status IN ('queued', 'deferred')"
            f" RETURNING {_CLAIMED_COLUMNS}),"
            " ev AS ("
            + _event_insert("'email.sending'", "jsonb_build_object('attempt', attempts)", "c")
            + ") SELECT * FROM c",
            {"ids": sorted(set(email_ids)), "lease_s": lease_s},
        )
        return await cur.fetchall()


@dataclass(frozen=True)
class Sent:
    """One relay 250 to record with `mark_sent_many` (no refused recipient, nothing to
    suppress: those take `mark_sent`)."""

    email_id: str
    reply: Mapping[str, Any]
    raw: bytes | None


async def mark_sent_many(conn: Conn, sent: Sequence[Sent]) -> set[str]:
    """`mark_sent` for many emails in one statement (one round trip, one commit); the ids
    that were `sending` and are `sent` now."""
    cur = await conn.execute(
        # %(raws)b: binary, the rendered messages go as they are (as text each byte would be
        # escaped in Python first).
        "WITH input AS (SELECT * FROM unnest(%(ids)s::text[], %(replies)s::jsonb[],"
        " %(raws)b::bytea[]) AS u(id, reply, raw)),"
        f" locked AS MATERIALIZED ({_locked_in_order('SELECT id FROM input')}),"
        " s AS (UPDATE emails e SET status = 'sent', sent_at = clock_timestamp(),"
        " updated_at = clock_timestamp(), last_response = i.reply, lease_until = NULL,"
        " raw = coalesce(e.raw, i.raw) FROM input i WHERE e.id = i.id AND e.status = 'sending'"
        " AND e.id IN (SELECT id FROM locked)"
        " RETURNING e.id, e.account_id, e.attempts, i.reply),"
        " ev AS ("
        + _event_insert(
            "'email.sent'", "jsonb_build_object('response', reply, 'attempt', attempts)", "s"
        )
        + ") SELECT id FROM s",
        {
            "ids": [s.email_id for s in sent],
            "replies": [Jsonb(dict(s.reply)) for s in sent],
            "raws": [s.raw for s in sent],
        },
    )
    return {row[0] for row in await cur.fetchall()}


def _suppress_insert(source: str) -> str:
    """SQL that puts the addresses %(suppress)s on the suppression list of the account of each
    row of `source` (a CTE with id, account_id), as hard bounces of that email."""
    return (
        "INSERT INTO suppressions (account_id, email, reason, source_email_id)"
        f" SELECT {source}.account_id, a, 'hard_bounce', {source}.id"
        f" FROM {source}, unnest(%(suppress)s::text[]) AS a"
        " ON CONFLICT (account_id, email) DO NOTHING"
    )


def _refused_json(refused: Mapping[str, Mapping[str, Any]] | None) -> Jsonb | None:
    return Jsonb({addr: dict(r) for addr, r in refused.items()}) if refused else None


async def mark_sent(
    conn: Conn,
    email_id: str,
    *,
    reply: Mapping[str, Any],
    raw: bytes | None,
    refused: Mapping[str, Mapping[str, Any]] | None = None,
    suppress: Sequence[str] = (),
) -> bool:
    """`sending` → `sent` with the relay's reply; keeps the rendered bytes for the record.

    `refused` holds the recipients the relay refused while it took the message for the others
    (each one's reply goes in the event); `suppress` the addresses among them that go on the
    suppression list (5.1.x), in the same statement.
    """
    data = "jsonb_build_object('response', %(reply)s::jsonb, 'attempt', attempts)"
    if refused:
        data += " || jsonb_build_object('refused', %(refused)s::jsonb)"
    cur = await conn.execute(
        "WITH s AS (UPDATE emails SET status = 'sent', sent_at = clock_timestamp(),"
        " updated_at = clock_timestamp(), last_response = %(reply)s, lease_until = NULL,"
        " raw = coalesce(raw, %(raw)s)"
        " WHERE id = %(id)s AND status = 'sending' RETURNING id, account_id, attempts),"
        " sup AS (" + _suppress_insert("s") + "),"
        " ev AS (" + _event_insert("'email.sent'", data, "s") + ")"
        " SELECT count(*) FROM s",
        {
            "id": email_id,
            "reply": Jsonb(dict(reply)),
            "raw": raw,
            "refused": _refused_json(refused),
            "suppress": list(suppress),
        },
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
    refused: Mapping[str, Mapping[str, Any]] | None = None,
    drop: Sequence[str] = (),
    suppress: Sequence[str] = (),
) -> datetime | None:
    """`sending` → `deferred` after a temporary failure; returns when the next attempt is due.
    The row is unpublished until its retry message is confirmed (`mark_published`): if that
    publish fails, the sweeper sends it to the send queue once it is due.

    When the relay refused every recipient but some only for now, `refused` has each one's
    reply (recorded in the event), `drop` the envelope addresses refused for good (left out of
    later attempts) and `suppress` those of them that go on the suppression list (5.1.x).
    """
    data = (
        "jsonb_build_object('response', %(reply)s::jsonb, 'attempt', %(attempt)s::int,"
        " 'next_attempt_at', to_char(next_attempt_at AT TIME ZONE 'UTC',"
        ' \'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"\'))'
    )
    if refused:
        data += " || jsonb_build_object('refused', %(refused)s::jsonb)"
    cur = await conn.execute(
        "WITH d AS (UPDATE emails SET status = 'deferred', updated_at = clock_timestamp(),"
        " last_response = %(reply)s, lease_until = NULL, raw = coalesce(raw, %(raw)s),"
        " published = false,"
        " envelope_to = ARRAY(SELECT a FROM unnest(envelope_to) WITH ORDINALITY AS t(a, n)"
        " WHERE a <> ALL(%(drop)s::text[]) ORDER BY n),"
        " next_attempt_at = clock_timestamp() + make_interval(secs => %(wait_s)s)"
        " WHERE id = %(id)s AND status = 'sending'"
        " RETURNING id, account_id, next_attempt_at),"
        " sup AS (" + _suppress_insert("d") + "),"
        " ev AS (" + _event_insert("'email.deferred'", data, "d") + ")"
        " SELECT next_attempt_at FROM d",
        {
            "id": email_id,
            "reply": Jsonb(dict(reply)),
            "raw": raw,
            "wait_s": wait_s,
            "attempt": attempt,
            "refused": _refused_json(refused),
            "drop": list(drop),
            "suppress": list(suppress),
        },
    )
    row = await cur.fetchone()
    return None if row is None else row[0]


async def mark_bounced(
    conn: Conn,
    email_id: str,
    *,
    reply: Mapping[str, Any],
    hard: bool,
    raw: bytes | None,
    refused: Mapping[str, Mapping[str, Any]] | None = None,
    suppress: Sequence[str] = (),
) -> bool:
    """`sending` → `bounced` after a permanent rejection (5xx).

    `suppress` are the addresses that go on the account's suppression list (a hard bounce, 5.1.x)
    in the same statement; `refused` each recipient's own reply when they were refused at RCPT.
    """
    data = (
        "jsonb_build_object('response', %(reply)s::jsonb, 'bounce_type', %(kind)s::text,"
        " 'attempt', attempts, 'suppressed', %(suppress)s::text[])"
    )
    if refused:
        data += " || jsonb_build_object('refused', %(refused)s::jsonb)"
    cur = await conn.execute(
        "WITH b AS (UPDATE emails SET status = 'bounced', updated_at = clock_timestamp(),"
        " last_response = %(reply)s, lease_until = NULL, raw = coalesce(raw, %(raw)s)"
        " WHERE id = %(id)s AND status = 'sending' RETURNING id, account_id, attempts),"
        " sup AS (" + _suppress_insert("b") + "),"
        " ev AS (" + _event_insert("'email.bounced'", data, "b") + ")"
        " SELECT count(*) FROM b",
        {
            "id": email_id,
            "reply": Jsonb(dict(reply)),
            "raw": raw,
            "kind": "hard" if hard else "soft",
            "refused": _refused_json(refused),
            "suppress": list(suppress),
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
    suppress: Sequence[str] = (),
) -> str | None:
    """Any unfinished status → `failed`, with a dead letter row to list and replay; returns
    the dead letter's id (None when the email is unknown or was already finished). The event
    carries the last reply, so the final attempt's answer is in the timeline too; `suppress`
    are addresses the last attempt hard-bounced (5.1.x at RCPT while others were deferred)."""
    cur = await conn.execute(
        "WITH f AS (UPDATE emails SET status = 'failed', updated_at = clock_timestamp(),"
        " last_response = coalesce(%(reply)s, last_response), lease_until = NULL,"
        " next_attempt_at = NULL, raw = coalesce(raw, %(raw)s)"
        " WHERE id = %(id)s AND status IN ('queued', 'sending', 'deferred')"
        " RETURNING id, account_id, attempts, last_response),"
        " dl AS (INSERT INTO dead_letters (id, email_id, account_id, reason, attempts,"
        " last_response) SELECT %(dlq_id)s, id, account_id, %(reason)s, attempts, last_response"
        " FROM f RETURNING id),"
        " sup AS (" + _suppress_insert("f") + "),"
        " ev AS ("
        + _event_insert(
            "'email.failed'",
            "jsonb_build_object('reason', %(reason)s::text, 'attempts', attempts,"
            " 'response', last_response, 'dead_letter_id', %(dlq_id)s::text)",
            "f",
        )
        + ") SELECT id FROM dl",
        {
            "id": email_id,
            "reason": reason,
            "reply": None if reply is None else Jsonb(dict(reply)),
            "raw": raw,
            "dlq_id": new_id("dlq"),
            "suppress": list(suppress),
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
    """Emails whose message the broker never confirmed: queued ones (it was down at
    acceptance, or a lease expired) and deferred ones whose retry publish failed, once due."""
    cur = await conn.execute(
        "SELECT id FROM emails WHERE NOT published AND status IN ('queued', 'deferred')"
        " AND (status = 'queued' OR next_attempt_at <= clock_timestamp())"
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


# ---------------------------------------------------------------- suppressions


@dataclass(frozen=True)
class Suppression:
    email: str
    reason: str
    created_at: datetime
    source_email_id: str | None


_SUPPRESSION_COLUMNS = "email, reason, created_at, source_email_id"


async def suppressed_among(conn: Conn, account_id: str, addresses: Sequence[str]) -> dict[str, str]:
    """Which of `addresses` (canonical: lower-cased) are on the account's suppression list,
    each with its reason."""
    if not addresses:
        return {}
    cur = await conn.execute(
        "SELECT email, reason FROM suppressions WHERE account_id = %s AND email = ANY(%s)",
        (account_id, list(addresses)),
    )
    return {row[0]: row[1] for row in await cur.fetchall()}


async def add_suppression(
    conn: Conn,
    account_id: str,
    email: str,
    *,
    reason: str,
    source_email_id: str | None = None,
) -> tuple[Suppression, bool]:
    """Put `email` (canonical) on the list; (the row, True) when it was added now, (the row
    already there, False) when it was on the list already."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "WITH ins AS (INSERT INTO suppressions (account_id, email, reason, source_email_id)"
            " VALUES (%(account_id)s, %(email)s, %(reason)s, %(source)s)"
            f" ON CONFLICT (account_id, email) DO NOTHING RETURNING {_SUPPRESSION_COLUMNS})"
            f" SELECT {_SUPPRESSION_COLUMNS}, true AS created FROM ins UNION ALL"
            f" SELECT {_SUPPRESSION_COLUMNS}, false FROM suppressions"
            " WHERE account_id = %(account_id)s AND email = %(email)s"
            " AND NOT EXISTS (SELECT 1 FROM ins)",
            {"account_id": account_id, "email": email, "reason": reason, "source": source_email_id},
        )
        row = await cur.fetchone()
    if row is None:
        # Deleted between the conflict and the read: rare enough to simply try again.
        return await add_suppression(
            conn, account_id, email, reason=reason, source_email_id=source_email_id
        )
    created: bool = row.pop("created")
    return Suppression(**row), created


async def list_suppressions(
    conn: Conn, account_id: str, *, limit: int, before: Cursor
) -> list[Suppression]:
    """Newest first; keyset pagination on (created_at, email)."""
    page, args = _newest_first(
        ["account_id = %s"], [account_id], before=before, limit=limit, key=("created_at", "email")
    )
    async with conn.cursor(row_factory=class_row(Suppression)) as cur:
        await cur.execute(f"SELECT {_SUPPRESSION_COLUMNS} FROM suppressions{page}", args)
        return await cur.fetchall()


async def delete_suppression(conn: Conn, account_id: str, email: str) -> bool:
    """True when `email` was on the account's list and is now off it."""
    cur = await conn.execute(
        "DELETE FROM suppressions WHERE account_id = %s AND email = %s", (account_id, email)
    )
    return cur.rowcount == 1


# ---------------------------------------------------------------- dead letters


@dataclass(frozen=True)
class DeadLetter:
    id: str
    email_id: str
    account_id: str
    reason: str
    attempts: int
    last_response: dict[str, Any] | None
    created_at: datetime
    replayed_at: datetime | None


@dataclass(frozen=True)
class Replay:
    """The outcome of one replay statement: the letter (None when there is no such letter)
    and whether its email went back to `queued` now."""

    letter: DeadLetter | None
    replayed: bool


_DEAD_LETTER_COLUMNS = (
    "id, email_id, account_id, reason, attempts, last_response, created_at, replayed_at"
)


async def list_dead_letters(
    conn: Conn,
    *,
    account_id: str | None,
    limit: int,
    before: Cursor = None,
    pending_only: bool = False,
) -> list[DeadLetter]:
    """Newest first, keyset pagination on (created_at, id); every account when `account_id`
    is None (the operator's view); `pending_only` leaves out the replayed ones."""
    clauses, params = ["true"], list[Any]()
    if account_id is not None:
        clauses.append("account_id = %s")
        params.append(account_id)
    if pending_only:
        clauses.append("replayed_at IS NULL")
    page, args = _newest_first(clauses, params, before=before, limit=limit)
    async with conn.cursor(row_factory=class_row(DeadLetter)) as cur:
        await cur.execute(f"SELECT {_DEAD_LETTER_COLUMNS} FROM dead_letters{page}", args)
        return await cur.fetchall()


async def replay_dead_letter(conn: Conn, letter_id: str, *, account_id: str | None) -> Replay:
    """Put the letter's email back to `queued` (attempts 0, unpublished, `email.replayed`
    event) if it is still `failed`, and mark the letter (and any other unreplayed letter of
    that email) replayed, all in one statement. The conditional update makes a concurrent or
    repeated replay a no-op: the letter comes back with `replayed` False."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"WITH dl AS (SELECT {_DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = %(id)s"
            " AND (%(account_id)s::text IS NULL OR account_id = %(account_id)s)),"
            " e AS (UPDATE emails SET status = 'queued', attempts = 0, published = false,"
            " lease_until = NULL, next_attempt_at = NULL, updated_at = clock_timestamp()"
            " WHERE id = (SELECT email_id FROM dl) AND status = 'failed'"
            " RETURNING id, account_id),"
            " marked AS (UPDATE dead_letters SET replayed_at = clock_timestamp()"
            " WHERE email_id IN (SELECT id FROM e) AND (id = %(id)s OR replayed_at IS NULL)"
            " RETURNING id, replayed_at),"
            " ev AS ("
            + _event_insert(
                "'email.replayed'", "jsonb_build_object('dead_letter_id', %(id)s::text)", "e"
            )
            + ")"
            " SELECT dl.id, dl.email_id, dl.account_id, dl.reason, dl.attempts,"
            " dl.last_response, dl.created_at,"
            " coalesce((SELECT replayed_at FROM marked WHERE marked.id = dl.id), dl.replayed_at)"
            " AS replayed_at, EXISTS (SELECT 1 FROM e) AS replayed FROM dl",
            {"id": letter_id, "account_id": account_id},
        )
        row = await cur.fetchone()
    if row is None:
        return Replay(None, False)
    replayed = row.pop("replayed")
    return Replay(DeadLetter(**row), replayed)


async def insert_dead_message(
    conn: Conn, *, queue: str | None, reason: str | None, headers: Mapping[str, Any], body: bytes
) -> int:
    """Keep a dead-lettered message that names no email of ours, for the operator."""
    cur = await conn.execute(
        "INSERT INTO dead_messages (queue, reason, headers, body) VALUES (%s, %s, %s, %s)"
        " RETURNING id",
        (queue, reason, Jsonb(dict(headers)), body),
    )
    row = await cur.fetchone()
    assert row is not None
    dead_id: int = row[0]
    return dead_id


# ---- webhooks


@dataclass(frozen=True)
class Webhook:
    id: str
    account_id: str
    url: str
    events: list[str]
    enabled: bool
    created_at: datetime


@dataclass(frozen=True)
class WebhookDelivery:
    id: str
    event_id: str
    event_type: str
    attempt: int
    status_code: int | None
    error: str | None
    created_at: datetime


@dataclass(frozen=True)
class FanoutPosition:
    """Where the fan-out stands in `events`: (inserting transaction's id, seq), in that order."""

    xid: int
    seq: int


@dataclass(frozen=True)
class FanoutRow:
    """One event read by the fan-out, with one matching endpoint (None: no endpoint matches)."""

    position: FanoutPosition
    event_id: str
    event_type: str
    webhook_id: str | None


@dataclass(frozen=True)
class DeliveryTarget:
    """What one delivery attempt needs: the endpoint as it is now and the event."""

    webhook_id: str
    url: str
    secret: str
    previous_secret: str | None
    """The secret a rotation replaced, while it still signs too."""
    enabled: bool
    event_id: str
    event_type: str
    email_id: str
    data: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class AttemptRecorded:
    """The endpoint after an attempt was recorded; `disabled_now` when this attempt disabled it."""

    enabled: bool
    disabled_now: bool
    disabled_reason: str | None


_WEBHOOK_COLUMNS = "id, account_id, url, events, enabled, created_at"
_WEBHOOK_DELIVERY_COLUMNS = "id, event_id, event_type, attempt, status_code, error, created_at"

# Events whose inserting transaction is below this have all committed or aborted (for this
# database): the snapshot's oldest running transaction, except those known to run in another
# database of the cluster (they cannot write our events; an unknown one counts as ours).
_FANOUT_HORIZON = (
    "WITH snap AS MATERIALIZED (SELECT pg_current_snapshot() AS s),"
    " elsewhere AS MATERIALIZED (SELECT backend_xid AS x FROM pg_stat_activity"
    " WHERE backend_xid IS NOT NULL AND datid IS NOT NULL"
    " AND datid <> (SELECT oid FROM pg_database WHERE datname = current_database())),"
    " horizon AS MATERIALIZED (SELECT coalesce(min(x), (SELECT pg_snapshot_xmax(s) FROM snap))"
    " AS h FROM snap, pg_snapshot_xip(snap.s) AS x WHERE x::xid NOT IN (SELECT x FROM elsewhere))"
)


async def create_webhook(
    conn: Conn,
    account_id: str,
    *,
    url: str,
    events: Sequence[str],
    enabled: bool,
    secret: str,
) -> Webhook:
    async with conn.cursor(row_factory=class_row(Webhook)) as cur:
        await cur.execute(
            "INSERT INTO webhooks (id, account_id, url, events, enabled, secret)"
            f" VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_WEBHOOK_COLUMNS}",
            (new_id("wh"), account_id, url, list(events), enabled, secret),
        )
        row = await cur.fetchone()
    assert row is not None
    return row


async def list_webhooks(
    conn: Conn, account_id: str, *, limit: int, before: Cursor
) -> list[Webhook]:
    """Newest first; keyset pagination on (created_at, id)."""
    page, args = _newest_first(["account_id = %s"], [account_id], before=before, limit=limit)
    async with conn.cursor(row_factory=class_row(Webhook)) as cur:
        await cur.execute(f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks{page}", args)
        return await cur.fetchall()


async def webhook_exists(conn: Conn, account_id: str, webhook_id: str) -> bool:
    cur = await conn.execute(
        "SELECT 1 FROM webhooks WHERE account_id = %s AND id = %s", (account_id, webhook_id)
    )
    return await cur.fetchone() is not None


async def get_webhook(conn: Conn, account_id: str, webhook_id: str) -> Webhook | None:
    async with conn.cursor(row_factory=class_row(Webhook)) as cur:
        await cur.execute(
            f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE account_id = %s AND id = %s",
            (account_id, webhook_id),
        )
        return await cur.fetchone()


async def update_webhook(
    conn: Conn,
    account_id: str,
    webhook_id: str,
    *,
    url: str | None = None,
    events: Sequence[str] | None = None,
    enabled: bool | None = None,
) -> Webhook | None:
    """Change what is given (None: keep it). Enabling an endpoint (again) clears its failing
    streak and why it was disabled; disabling it by hand records that. None: no such one."""
    async with conn.cursor(row_factory=class_row(Webhook)) as cur:
        await cur.execute(
            "UPDATE webhooks SET url = coalesce(%(url)s, url),"
            " events = coalesce(%(events)s, events),"
            " enabled = coalesce(%(enabled)s, enabled),"
            " failing_since = CASE WHEN %(enabled)s THEN NULL ELSE failing_since END,"
            " disabled_at = CASE WHEN %(enabled)s THEN NULL"
            " WHEN %(enabled)s = false AND enabled THEN now() ELSE disabled_at END,"
            " disabled_reason = CASE WHEN %(enabled)s THEN NULL"
            " WHEN %(enabled)s = false AND enabled THEN 'disabled through the API'"
            " ELSE disabled_reason END"
            f" WHERE account_id = %(account)s AND id = %(id)s RETURNING {_WEBHOOK_COLUMNS}",
            {
                "url": url,
                "events": None if events is None else list(events),
                "enabled": enabled,
                "account": account_id,
                "id": webhook_id,
            },
        )
        return await cur.fetchone()


async def rotate_webhook_secret(
    conn: Conn, account_id: str, webhook_id: str, *, secret: str, overlap_s: float
) -> datetime | None:
    """Make `secret` the endpoint's signing secret; the one it replaces goes on signing for
    `overlap_s`. Returns until when; None when there is no such endpoint."""
    cur = await conn.execute(
        "UPDATE webhooks SET previous_secret = secret, secret = %s,"
        " previous_secret_until = now() + make_interval(secs => %s)"
        " WHERE account_id = %s AND id = %s RETURNING previous_secret_until",
        (secret, overlap_s, account_id, webhook_id),
    )
    row = await cur.fetchone()
    return None if row is None else row[0]


async def delete_webhook(conn: Conn, account_id: str, webhook_id: str) -> bool:
    """True when the account had that endpoint (its recorded deliveries go with it)."""
    cur = await conn.execute(
        "DELETE FROM webhooks WHERE account_id = %s AND id = %s", (account_id, webhook_id)
    )
    return cur.rowcount == 1


async def list_webhook_deliveries(
    conn: Conn,
    account_id: str,
    webhook_id: str,
    *,
    limit: int,
    before: Cursor,
) -> list[WebhookDelivery]:
    """An endpoint's recorded attempts, newest first; keyset pagination on (created_at, id)."""
    page, args = _newest_first(
        ["d.webhook_id = %s", "w.account_id = %s"],
        [webhook_id, account_id],
        before=before,
        limit=limit,
        key=("d.created_at", "d.id"),
    )
    columns = ", ".join("d." + c.strip() for c in _WEBHOOK_DELIVERY_COLUMNS.split(","))
    async with conn.cursor(row_factory=class_row(WebhookDelivery)) as cur:
        await cur.execute(
            f"SELECT {columns} FROM webhook_deliveries d"
            f" JOIN webhooks w ON w.id = d.webhook_id{page}",
            args,
        )
        return await cur.fetchall()


async def webhook_events_pending(conn: Conn) -> bool:
    """Whether events past the fan-out cursor are ready to fan out (no lock taken)."""
    cur = await conn.execute(
        _FANOUT_HORIZON + " SELECT EXISTS (SELECT 1 FROM events e, webhook_cursor c"
        " WHERE (e.xid, e.seq) > (c.xid, c.seq) AND e.xid < (SELECT h FROM horizon))"
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def lock_fanout_cursor(conn: Conn) -> FanoutPosition | None:
    """Lock the cursor for this transaction; None when another fan-out holds it right now."""
    cur = await conn.execute(
        "SELECT xid::text::bigint, seq FROM webhook_cursor FOR UPDATE SKIP LOCKED"
    )
    row = await cur.fetchone()
    return None if row is None else FanoutPosition(row[0], row[1])


async def fanout_batch(conn: Conn, after: FanoutPosition, *, limit: int) -> list[FanoutRow]:
    """Up to `limit` events past `after` in fan-out order, each once per enabled endpoint of its
    account subscribed to its type (or once with no endpoint)."""
    cur = await conn.execute(
        _FANOUT_HORIZON + ", batch AS (SELECT xid, seq, id, account_id, type FROM events"
        " WHERE (xid, seq) > (%(xid)s::text::xid8, %(seq)s)"
        " AND xid < (SELECT h FROM horizon) ORDER BY xid, seq LIMIT %(limit)s)"
        " SELECT b.xid::text::bigint, b.seq, b.id, b.type, w.id FROM batch b"
        " LEFT JOIN webhooks w ON w.account_id = b.account_id AND w.enabled"
        " AND b.type = ANY (w.events)"
        " ORDER BY b.xid, b.seq, w.id",
        {"xid": after.xid, "seq": after.seq, "limit": limit},
    )
    return [
        FanoutRow(FanoutPosition(xid, seq), event_id, event_type, webhook_id)
        for xid, seq, event_id, event_type, webhook_id in await cur.fetchall()
    ]


async def move_fanout_cursor(conn: Conn, to: FanoutPosition) -> None:
    await conn.execute("UPDATE webhook_cursor SET xid = %s::text::xid8, seq = %s", (to.xid, to.seq))


async def delivery_target(conn: Conn, webhook_id: str, event_id: str) -> DeliveryTarget | None:
    """The endpoint and the event of one delivery; None when either is gone."""
    async with conn.cursor(row_factory=class_row(DeliveryTarget)) as cur:
        await cur.execute(
            "SELECT w.id AS webhook_id, w.url, w.secret,"
            " CASE WHEN w.previous_secret_until > now() THEN w.previous_secret END"
            " AS previous_secret, w.enabled, e.id AS event_id,"
            " e.type AS event_type, e.email_id, e.data, e.created_at"
            " FROM webhooks w JOIN events e ON e.account_id = w.account_id AND e.id = %s"
            " WHERE w.id = %s",
            (event_id, webhook_id),
        )
        return await cur.fetchone()


async def record_webhook_attempt(
    conn: Conn,
    *,
    webhook_id: str,
    event_id: str,
    event_type: str,
    attempt: int,
    status_code: int | None,
    error: str | None,
    ok: bool,
    gone: bool,
    disable_after_s: float,
) -> AttemptRecorded | None:
    """Record one attempt and its effect on the endpoint, in one statement: a success clears
    its failing streak; a failure starts one; a 410 (`gone`), or a failure `disable_after_s`
    into a streak, disables it. None when the endpoint was deleted meanwhile."""
    streak_over = (
        "(NOT %(ok)s AND failing_since IS NOT NULL"
        " AND failing_since <= clock_timestamp() - make_interval(secs => %(after)s))"
    )
    disable = f"(enabled AND (%(gone)s OR {streak_over}))"
    cur = await conn.execute(
        "WITH d AS (INSERT INTO webhook_deliveries (id, webhook_id, event_id, event_type,"
        " attempt, status_code, error) SELECT %(id)s, id, %(event_id)s, %(event_type)s,"
        " %(attempt)s, %(status)s, %(error)s FROM webhooks WHERE id = %(webhook)s)"
        " UPDATE webhooks SET"
        " failing_since = CASE WHEN %(ok)s THEN NULL"
        " ELSE coalesce(failing_since, clock_timestamp()) END,"
        f" disabled_at = CASE WHEN {disable} THEN now() ELSE disabled_at END,"
        f" disabled_reason = CASE WHEN {disable} THEN"
        " (CASE WHEN %(gone)s THEN 'the endpoint answered 410 Gone'"
        " ELSE %(failing_reason)s END) ELSE disabled_reason END,"
        f" enabled = enabled AND NOT {disable}"
        " WHERE id = %(webhook)s"
        " RETURNING enabled, (NOT enabled AND disabled_at = now()) AS disabled_now,"
        " disabled_reason",
        {
            "id": new_id("whd"),
            "webhook": webhook_id,
            "event_id": event_id,
            "event_type": event_type,
            "attempt": attempt,
            "status": status_code,
            "error": error,
            "ok": ok,
            "gone": gone,
            "after": disable_after_s,
            "failing_reason": f"every attempt failed for {disable_after_s / 3600:g} h",
        },
    )
    row = await cur.fetchone()
    return None if row is None else AttemptRecorded(row[0], bool(row[1]), row[2])
