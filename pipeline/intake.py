"""Accepting emails: commit them (and their first event), then publish with confirms.

Suppressed recipients are dropped from the envelope in the same transaction as the insert.

202 means committed. The publish comes after the commit and its failure never fails the
request: the row stays unpublished and the sweeper republishes it (the table is the outbox).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup
from psycopg_pool import AsyncConnectionPool

from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.amqp.topology import SEND
from pipeline.batcher import Batcher, about_the_rows
from pipeline.errors import IdempotencyInProgress, IdempotencyMismatch
from pipeline.messages import encode_send
from pipeline.resources import Deps
from pipeline.store import queries
from pipeline.suppressions import canonical_address

log = logging.getLogger(__name__)


async def publish_and_mark(
    deps: Deps, publisher: ConfirmedPublisher, email_ids: Sequence[str]
) -> list[bool]:
    """Publish each id to the send queue, await the confirms together, record the confirmed."""
    return await publish_ids(deps.db, publisher, email_ids)


async def publish_ids(
    db: AsyncConnectionPool, publisher: ConfirmedPublisher, email_ids: Sequence[str]
) -> list[bool]:
    """`publish_and_mark` on a bare pool (for the CLI, which has no Deps)."""
    if not email_ids:
        return []
    confirmed = await publisher.publish_many([(SEND, encode_send(i), i, None) for i in email_ids])
    done = [i for i, ok in zip(email_ids, confirmed, strict=True) if ok]
    if len(done) < len(email_ids):
        log.warning(
            "broker did not confirm %d of %d publishes; the sweeper will republish them",
            len(email_ids) - len(done),
            len(email_ids),
        )
    if done:
        async with db.connection() as conn:
            await queries.mark_published(conn, done)
    return confirmed


@dataclass(frozen=True)
class Accepted:
    """What acceptance decided: the status the email was stored with, and the recipients
    left out of its envelope because the account suppresses them."""

    id: str
    status: str
    created_at: datetime
    suppressed: tuple[str, ...]


IDEMPOTENCY_TTL_S = 24 * 3600.0


@dataclass(frozen=True)
class IdempotencyRequest:
    """An `Idempotency-Key` and the fingerprint of the request that carried it."""

    key: str
    request_hash: bytes


@dataclass(frozen=True)
class Outcome:
    """The answer to an accepting request; `replayed` when it is a stored first answer."""

    code: int
    body: Any
    replayed: bool
    accepted: tuple[Accepted, ...] = ()


Respond = Callable[[list[Accepted]], tuple[int, Any]]


async def _insert(conn: queries.Conn, email: queries.NewEmail) -> Accepted:
    """Insert one email, leaving out suppressed recipients (looked up in this transaction,
    so a suppression added before the commit is honoured); no recipient left → `suppressed`."""
    canonical = {addr: canonical_address(addr) for addr in email.envelope_to}
    hits = await queries.suppressed_among(
        conn, email.account_id, list(dict.fromkeys(canonical.values()))
    )
    suppressed = {addr: hits[c] for addr, c in canonical.items() if c in hits}
    if suppressed:
        remaining = [a for a in email.envelope_to if a not in suppressed]
        email = replace(
            email, envelope_to=remaining, status=email.status if remaining else "suppressed"
        )
    created_at = await queries.insert_email(
        conn, email, event_type="email." + email.status, suppressed=suppressed
    )
    return Accepted(email.id, email.status, created_at, tuple(suppressed))


GROUP_MAX_EMAILS = 256
"""Most emails one group commit writes (a batch request of more goes alone)."""
COMMIT_GROUPS = 2
"""Group inserts in flight at once: while they run, the next group fills."""
PUBLISH_GROUPS = 4
"""Groups of publishes in flight at once (a confirm takes the broker's fsync): while they
wait, the next group fills."""
MAX_UNPUBLISHED = 1024
"""Committed emails whose publish is waiting or under way, at most; past that a request waits
for room before it is answered. Small on purpose: the API then accepts no faster than it can
publish (a measured rate is a sustained one), and no email waits long enough for the sweeper
to republish it."""


class GroupCommit:
    """The API process's acceptance of requests without an Idempotency-Key, batched.

    Concurrent requests' emails are inserted by one statement (one round trip, one commit;
    the next group fills meanwhile; pipeline.batcher), and each request is answered as soon as
    its own rows are committed. Their queued ids go to a publishing task of the process, which
    publishes whatever has gathered with the confirms awaited together and marks the confirmed
    ones by one UPDATE (`publish_groups` such groups at once, as a confirm waits for the
    broker's disk). At most `max_unpublished` ids wait or are being published: past that, a
    request waits for room before its answer.

    A request whose emails name a suppressed recipient is committed on its own in the same
    flush (the one-by-one path that drops the recipient and records why); a request whose rows
    the database refuses fails alone (the batcher splits the group until it is alone). Every
    guarantee of `accept_all` holds: nothing is answered before its commit, and a publish the
    broker does not confirm (or one a stop cuts short) leaves the row unpublished for the
    sweeper. Enter it (`async with`) to run the publishing task; leaving publishes what waits.
    """

    def __init__(
        self,
        db: AsyncConnectionPool,
        publisher: ConfirmedPublisher,
        *,
        max_emails: int = GROUP_MAX_EMAILS,
        publish_groups: int = PUBLISH_GROUPS,
        max_unpublished: int = MAX_UNPUBLISHED,
    ) -> None:
        self.db = db
        self.publisher = publisher
        self.batcher: Batcher[Sequence[queries.NewEmail], list[Accepted]] = Batcher(
            self._commit,
            max_size=max_emails,
            max_concurrent=COMMIT_GROUPS,
            size=len,
            splittable=about_the_rows,
        )
        self._max_group = max_emails
        self._max_unpublished = max_unpublished
        self._unpublished: list[str] = []  # waiting for a publish group
        self._outstanding = 0  # waiting or in a publish group
        self._arrived = anyio.Event()  # set when ids join `_unpublished`
        self._room = anyio.Event()  # set when a publish group is done
        self._groups = anyio.Semaphore(publish_groups)
        self._closing = False
        self._tg: TaskGroup | None = None
        self.publish_groups = 0
        """Publish groups started so far."""
        self.published = 0
        """Ids handed to the publishing task so far."""

    async def __aenter__(self) -> Self:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        tg.start_soon(self._publishing)
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        assert tg is not None
        self._closing = True
        self._arrived.set()
        return await tg.__aexit__(exc_type, exc, tb)

    async def accept(self, emails: Sequence[queries.NewEmail]) -> list[Accepted]:
        """Commit these emails (one request's) with whatever other requests came meanwhile,
        and hand the queued ones to the publishing task; what was accepted, once committed."""
        if self._tg is None:
            raise RuntimeError("enter the GroupCommit (async with) before accepting")
        if not emails:
            return []
        accepted = await self.batcher.submit(emails)
        queued = [a.id for a in accepted if a.status == "queued"]
        if queued:
            while self._outstanding >= self._max_unpublished:
                await self._room.wait()
            self._outstanding += len(queued)
            self._unpublished.extend(queued)
            self.published += len(queued)
            self._arrived.set()
        return accepted

    async def _publishing(self) -> None:
        """Start a publish group for whatever ids wait, `publish_groups` at a time, until the
        GroupCommit is left and nothing waits."""
        async with anyio.create_task_group() as tg:
            while True:
                if not self._unpublished:
                    if self._closing:
                        return
                    self._arrived = anyio.Event()
                    await self._arrived.wait()
                    continue
                await self._groups.acquire()
                ids = self._unpublished[: self._max_group]
                del self._unpublished[: self._max_group]
                self.publish_groups += 1
                tg.start_soon(self._publish_group, ids)

    async def _publish_group(self, ids: Sequence[str]) -> None:
        try:
            await self._publish(ids)
        finally:
            self._groups.release()
            self._outstanding -= len(ids)
            self._room.set()
            self._room = anyio.Event()

    async def _commit(
        self, requests: Sequence[Sequence[queries.NewEmail]]
    ) -> list[list[Accepted] | Exception]:
        groups = [
            [(e, [canonical_address(a) for a in e.envelope_to]) for e in emails]
            for emails in requests
        ]
        outcomes: list[list[Accepted] | Exception] = []
        async with self.db.connection() as conn:
            done = await queries.insert_emails_unless_suppressed(conn, groups)
            for g, emails in enumerate(requests):
                if g not in done.held:
                    created = done.created
                    outcomes.append([Accepted(e.id, e.status, created[e.id], ()) for e in emails])
                    continue
                try:  # committed already: never raise from here on (no retry of the others)
                    async with conn.transaction():
                        outcomes.append([await _insert(conn, e) for e in emails])
                except Exception as exc:
                    outcomes.append(exc)
        return outcomes

    async def _publish(self, ids: Sequence[str]) -> None:
        """Publish and mark; never raises (the rows are committed: whatever is not confirmed
        and marked here, the sweeper publishes)."""
        try:
            await publish_ids(self.db, self.publisher, ids)
        except Exception as exc:
            log.warning("could not mark %d emails published (%s); the sweeper will", len(ids), exc)


async def accept_all(
    deps: Deps,
    publisher: ConfirmedPublisher,
    account_id: str,
    emails: Sequence[queries.NewEmail],
    *,
    respond: Respond,
    idempotency: IdempotencyRequest | None = None,
    group: GroupCommit | None = None,
) -> Outcome:
    """Commit every email in one transaction, then publish the queued ones together.

    `respond` turns what was accepted into the HTTP answer inside the transaction, so that
    with an idempotency key the answer is stored atomically with the emails: a repeat gets
    exactly the first answer and creates nothing. A repeat while the first is still in its
    transaction raises IdempotencyInProgress; with another body, IdempotencyMismatch.

    Without an idempotency key, `group` (the process's GroupCommit) shares the commit, the
    publishes and the marking with concurrent requests.
    """
    if group is not None and idempotency is None:
        accepted = await group.accept(emails)
        code, body = respond(accepted)
        return Outcome(code, body, replayed=False, accepted=tuple(accepted))
    async with deps.db.connection() as conn, conn.transaction():
        if idempotency is not None:
            if not await queries.lock_idempotency_key(conn, account_id, idempotency.key):
                raise IdempotencyInProgress(
                    "a request with this Idempotency-Key is still being processed"
                )
            stored = await queries.stored_response(
                conn, account_id, idempotency.key, ttl_s=IDEMPOTENCY_TTL_S
            )
            if stored is not None:
                if stored.request_hash != idempotency.request_hash:
                    raise IdempotencyMismatch(
                        "this Idempotency-Key was used with a different request body"
                    )
                return Outcome(stored.response_code, stored.response_body, replayed=True)
        accepted = [await _insert(conn, email) for email in emails]
        code, body = respond(accepted)
        if idempotency is not None:
            await queries.store_response(
                conn,
                account_id,
                idempotency.key,
                request_hash=idempotency.request_hash,
                code=code,
                body=body,
            )
    await publish_and_mark(deps, publisher, [a.id for a in accepted if a.status == "queued"])
    return Outcome(code, body, replayed=False, accepted=tuple(accepted))
