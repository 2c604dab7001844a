"""The `sender` role: actors that claim queued emails, send them over SMTP and record the outcome.

Per message: claim (`queued`/`deferred` → `sending`, conditional, with a lease), render once
(the bytes are stored with the outcome and reused on every later attempt), send, commit the
outcome, and only then ack. A temporary failure goes to the retry queue (acked once that
publish is confirmed); an email whose attempts are exhausted becomes a dead letter.
"""

from __future__ import annotations

import base64
import itertools
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC
from functools import partial

import anyio
import psycopg
from anyio.abc import TaskStatus
from psycopg_pool import PoolTimeout

from pipeline.amqp.consumer import Delivery, consume
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.amqp.topology import RETRY
from pipeline.batcher import Batcher, FlushTimeout, about_the_rows
from pipeline.errors import DeliveryError, Permanent, PublishNotConfirmed
from pipeline.mail.classify import (
    RecipientsDeferred,
    RecipientsRefused,
    SmtpReply,
    is_hard_bounce,
)
from pipeline.mail.dkim import load_signers, sign_for
from pipeline.mail.render import (
    Attachment,
    OutgoingEmail,
    envelope_sender,
    render,
    sender_address,
)
from pipeline.mail.smtp_pool import SendResult, SmtpPool
from pipeline.messages import UndecodableMessage, decode_send, encode_send
from pipeline.resources import Deps
from pipeline.retry import RetryPolicy, exhausted, next_wait_s
from pipeline.store import queries
from pipeline.suppressions import (
    permanently_refused,
    recipients_to_suppress,
    refused_to_suppress,
)

log = logging.getLogger(__name__)

DB_ERROR_PAUSE_S = 2.0
"""How long a worker backs off after PostgreSQL failed it (a pause, not synchronisation)."""
DB_SHIELD_S = 10.0
"""Longest a claim, a `sent` commit or a claim's release holds off a cancellation (a lost
broker connection cancels the handlers): none of them may be cut in two."""
SENT_RETRY_PAUSE_S = 0.05
"""First pause before a failed `sent` commit is tried again (doubling, at most 1 s)."""
BATCH_MAX = 64
BATCH_LINGER_S = 0.010
"""Claims and `sent` commits of concurrent handlers share one statement, of at most this many
emails (and at most half of the process's messages in flight, so that a batch that has them
goes at once); while one runs the next fills, and under load it waits up to this long for
more (pipeline.batcher). A lone email never waits."""
ATTEMPT_HEADER = "x-mailpipe-attempt"
WAIT_HEADER = "x-mailpipe-wait-s"


def outgoing(claimed: queries.Claimed) -> OutgoingEmail:
    """The render input of a claimed email; the Date is the acceptance time, like the id."""
    content = claimed.content
    created = claimed.created_at.astimezone(UTC)
    return OutgoingEmail(
        from_email=claimed.from_email,
        to=tuple(claimed.to_addrs),
        cc=tuple(claimed.cc_addrs),
        bcc=tuple(claimed.bcc_addrs),
        reply_to=tuple(claimed.reply_to),
        subject=claimed.subject,
        body_text=content.get("body_text"),
        body_html=content.get("body_html"),
        headers=content.get("headers") or {},
        attachments=tuple(
            Attachment(
                filename=a["filename"],
                content=base64.b64decode(a["content"]),
                content_type=a.get("content_type"),
                content_id=a.get("content_id"),
            )
            for a in content.get("attachments") or ()
        ),
        message_id=claimed.message_id,
        date=created,
    )


def exhausted_reason(attempts: int) -> str:
    """A dead letter's reason when its email used up `retry.max_attempts`."""
    return f"retries exhausted after {attempts} attempt{'' if attempts == 1 else 's'}"


def envelope_from(claimed: queries.Claimed) -> str:
    return sender_address(claimed.from_email)


class Sender:
    """One process's sending logic, shared by its actors."""

    def __init__(self, deps: Deps, smtp: SmtpPool, publisher: ConfirmedPublisher) -> None:
        self.deps = deps
        self.smtp = smtp
        self.publisher = publisher
        retry = deps.settings.retry
        self.policy = RetryPolicy(
            retry.base_delay_s, retry.max_delay_s, retry.max_attempts, retry.tiers_s
        )
        self.lease_s = deps.settings.sweeper.lease_s
        self.signers = load_signers(deps.settings.dkim)
        in_flight = deps.settings.sender.actors * deps.settings.sender.concurrency
        batch = max(1, min(BATCH_MAX, in_flight // 2))
        self.claims: Batcher[str, queries.Claimed | None] = Batcher(
            self._claim,
            max_size=batch,
            max_wait_s=BATCH_LINGER_S,
            splittable=about_the_rows,
            flush_timeout_s=DB_SHIELD_S,
        )
        self.marks: Batcher[queries.Sent, bool] = Batcher(
            self._mark_sent,
            max_size=batch,
            max_wait_s=BATCH_LINGER_S,
            splittable=about_the_rows,
            flush_timeout_s=DB_SHIELD_S,
        )

    async def _claim(self, email_ids: Sequence[str]) -> list[queries.Claimed | None]:
        """One conditional claim for many emails. An id twice in a batch (a redelivered copy
        in flight with its original) gets its row once: the other copy is redundant."""
        async with self.deps.db.connection() as conn:
            rows = {
                c.id: c for c in await queries.claim_many(conn, email_ids, lease_s=self.lease_s)
            }
        return [rows.pop(i, None) for i in email_ids]

    async def _mark_sent(self, sent: Sequence[queries.Sent]) -> list[bool]:
        async with self.deps.db.connection() as conn:
            done = await queries.mark_sent_many(conn, sorted(sent, key=lambda s: s.email_id))
        return [s.email_id in done for s in sent]

    def render(self, claimed: queries.Claimed) -> bytes:
        """The message as every attempt sends it: MIME, then the DKIM signature if the sender's
        domain has a key."""
        email = outgoing(claimed)
        domain = envelope_sender(email).rpartition("@")[2]
        return sign_for(self.signers, domain, render(email))

    async def handle(self, delivery: Delivery) -> None:
        """One message; a database outage requeues it and pauses this worker instead of
        dead-lettering an email that did nothing wrong."""
        try:
            await self.attempt(delivery)
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("database unavailable (%s); requeueing and pausing", exc)
            if not delivery.settled:
                await delivery.nack(requeue=True)
            await anyio.sleep(DB_ERROR_PAUSE_S)

    async def attempt(self, delivery: Delivery) -> None:
        try:
            email_id = decode_send(delivery.body)
        except UndecodableMessage as exc:
            log.error("dead-lettering a message that is not ours: %s", exc)
            await delivery.reject(requeue=False)  # the send queue dead-letters it
            return
        # Shielded: cancelled between its commit and its answer, a claim would sit unknown to
        # anyone until its lease runs out. Concurrent handlers' claims share one statement.
        claimed: queries.Claimed | None = None
        with anyio.move_on_after(DB_SHIELD_S, shield=True) as claiming:
            try:
                claimed = await self.claims.submit(email_id)
            except FlushTimeout:
                claiming.cancel()
        if claiming.cancel_called:  # the database is too slow; if it was claimed, the lease
            await delivery.nack(requeue=True)  # brings it back
            return
        if claimed is None:
            # Already sent, canceled, or being sent by someone else: this copy is redundant.
            await delivery.ack()
            return
        fresh_raw = None
        try:
            raw = claimed.raw
            if raw is None:
                raw = fresh_raw = self.render(claimed)
            reply = await self.smtp.send(envelope_from(claimed), claimed.envelope_to, raw)
        except anyio.get_cancelled_exc_class():
            # Cancelled mid-send: the broker connection was lost (the consumer cancels its
            # handlers) or a stop's grace ran out. The outcome is unknown either way; give the
            # claim back now so the redelivered message retries it, instead of after the lease.
            await self.release(claimed.id)
            raise
        except DeliveryError as err:
            await self.failed(delivery, claimed, err, fresh_raw)
            return
        except ValueError as exc:  # cannot be rendered: no attempt will ever succeed
            await self.failed(delivery, claimed, Permanent(f"cannot render: {exc}"), None)
            return
        await self.record_sent(claimed, reply, fresh_raw)
        await delivery.ack()

    async def record_sent(
        self, claimed: queries.Claimed, reply: SendResult, fresh_raw: bytes | None
    ) -> None:
        """Commit `sent` after the relay's 250: only this commit stands between the email and
        a second send once its lease runs out. So a cancellation (a lost broker connection)
        must not interrupt it, and a database error (a deadlock, a dropped connection) is
        retried until DB_SHIELD_S has passed. Concurrent handlers' commits share one
        statement (not those with refused recipients, which have more to record)."""
        refused = {addr: r.to_json() for addr, r in reply.refused.items()}
        with anyio.move_on_after(DB_SHIELD_S, shield=True):
            for retry in itertools.count():
                try:
                    if refused:
                        async with self.deps.db.connection() as conn:
                            await queries.mark_sent(
                                conn,
                                claimed.id,
                                reply=reply.to_json(),
                                raw=fresh_raw,
                                refused=refused,
                                suppress=refused_to_suppress(reply.refused),
                            )
                    else:
                        await self.marks.submit(
                            queries.Sent(claimed.id, reply.to_json(), fresh_raw)
                        )
                    return
                except FlushTimeout:
                    break
                except (psycopg.Error, PoolTimeout) as exc:
                    log.warning("could not record %s as sent (%s); retrying", claimed.id, exc)
                    await anyio.sleep(min(SENT_RETRY_PAUSE_S * 2**retry, 1.0))
        log.error(
            "could not record %s as sent within %g s: it stays `sending` until its lease "
            "runs out, and is then sent again",
            claimed.id,
            DB_SHIELD_S,
        )

    async def release(self, email_id: str) -> None:
        """Give a claim back (`sending` → `queued`), shielded and bounded; when the database
        cannot be reached the lease still brings the email back later."""
        with anyio.move_on_after(DB_SHIELD_S, shield=True):
            try:
                async with self.deps.db.connection() as conn:
                    await queries.release_claim(conn, email_id)
            except Exception as exc:
                log.warning("could not release %s (%s); its lease will", email_id, exc)

    async def failed(
        self,
        delivery: Delivery,
        claimed: queries.Claimed,
        err: DeliveryError,
        fresh_raw: bytes | None,
    ) -> None:
        """Record a failed attempt: bounce it, dead-letter it, or send it to the retry queue.

        The reply goes on the email and in the event whatever the outcome; 5.1.x refusals put
        their recipients on the suppression list in the same statement."""
        reply = SmtpReply.from_error(err).to_json()
        per_recipient: Mapping[str, SmtpReply] = (
            err.refused if isinstance(err, RecipientsRefused | RecipientsDeferred) else {}
        )
        refused = {addr: r.to_json() for addr, r in per_recipient.items()}
        suppress = recipients_to_suppress(err, claimed.envelope_to)
        if isinstance(err, Permanent):
            async with self.deps.db.connection() as conn:
                await queries.mark_bounced(
                    conn,
                    claimed.id,
                    reply=reply,
                    hard=bool(suppress) or is_hard_bounce(err),
                    raw=fresh_raw,
                    refused=refused,
                    suppress=suppress,
                )
            await delivery.ack()
            return
        if exhausted(claimed.attempts, self.policy.max_attempts):
            async with self.deps.db.connection() as conn:
                await queries.mark_failed(
                    conn,
                    claimed.id,
                    reason=exhausted_reason(claimed.attempts),
                    reply=reply,
                    raw=fresh_raw,
                    suppress=suppress,
                )
            await delivery.ack()
            return
        wait_s = next_wait_s(claimed.attempts, self.policy)
        async with self.deps.db.connection() as conn:
            await queries.mark_deferred(
                conn,
                claimed.id,
                reply=reply,
                attempt=claimed.attempts,
                wait_s=wait_s,
                raw=fresh_raw,
                refused=refused,
                drop=permanently_refused(per_recipient),
                suppress=suppress,
            )
        try:
            await self.publisher.publish(
                RETRY,
                encode_send(claimed.id),
                message_id=claimed.id,
                headers={ATTEMPT_HEADER: claimed.attempts, WAIT_HEADER: wait_s},
            )
        except PublishNotConfirmed as exc:
            # Not requeued: that would retry it at once, and a broker that takes no publishes
            # (a memory alarm) would burn every attempt in seconds. The row is `deferred` and
            # unpublished: the sweeper sends it to the send queue when it is due.
            log.warning(
                "retry queue did not confirm %s (%s); the sweeper will send it when due",
                claimed.id,
                exc,
            )
            await delivery.ack()
            return
        async with self.deps.db.connection() as conn:
            await queries.mark_published(conn, [claimed.id])
        await delivery.ack()


async def run_sender(
    deps: Deps, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """`sender.actors` consumers on the send queue, each with `sender.concurrency` in flight."""
    settings = deps.settings
    pool = SmtpPool.from_settings(
        settings.smtp, settings.sandbox, sandbox_port=deps.listening.get("sandbox")
    )
    async with pool, ConfirmedPublisher(settings.amqp.url, deps.topology) as publisher:
        sender = Sender(deps, pool, publisher)
        async with anyio.create_task_group() as tg:
            for _ in range(settings.sender.actors):
                await tg.start(
                    partial(
                        consume,
                        settings.amqp.url,
                        deps.topology,
                        deps.topology.send,
                        sender.handle,
                        concurrency=settings.sender.concurrency,
                        stop=deps.stop,
                        grace_s=settings.shutdown.grace_s,
                    )
                )
            task_status.started()
        for what, batcher in (("claims", sender.claims), ("sent commits", sender.marks)):
            if batcher.items:
                log.info(
                    "%s: %d in %d statements (%.1f a statement)",
                    what,
                    batcher.items,
                    batcher.batches,
                    batcher.items / max(batcher.batches, 1),
                )
