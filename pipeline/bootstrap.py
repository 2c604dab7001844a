"""Start-up data: the development demo account and key exist only while `dev.demo_key` is true."""

from __future__ import annotations

import logging

from psycopg_pool import AsyncConnectionPool

from pipeline import keys
from pipeline.store import queries

log = logging.getLogger(__name__)

DEMO_ACCOUNT = "demo"


async def sync_demo_key(db: AsyncConnectionPool, *, enabled: bool) -> None:
    """Create (or re-enable) the demo key under the dev config; revoke it under any other."""
    lookup = keys.lookup_of(keys.DEMO_KEY)
    assert lookup is not None
    async with db.connection() as conn, conn.transaction():
        if enabled:
            account = await queries.ensure_account(conn, DEMO_ACCOUNT)
            await queries.upsert_key(
                conn,
                account_id=account.id,
                lookup=lookup,
                hash=keys.hash_key(keys.DEMO_KEY),
                scopes=keys.SCOPES,
            )
        elif await queries.revoke_key_by_lookup(conn, lookup):
            log.warning("revoked the development demo key: dev.demo_key is off")
