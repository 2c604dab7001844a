"""The `sender` role: actors that claim queued emails, send them over SMTP and record the outcome.

Per message: claim (`queued`/`deferred` → `sending`, conditional, with a lease), render once
(the bytes are stored with the outcome and reused on every later attempt), send, commit the
outcome, and only then ack. A temporary failure goes to the retry queue (acked once that
publish is confirmed); an email whose attempts are exhausted becomes a dead letter.
"""

from __future__ import annotations

import base64
import logging
from datetime import UTC
from functools import partial

import anyio
from anyio.abc import TaskStatus

from pipeline.amqp.consumer import Delivery, consume
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.amqp.topology import RETRY
from pipeline.errors import DeliveryError, Permanent, PublishNotConfirmed
from pipeline.mail.classify import SmtpReply, is_hard_bounce
from pipeline.mail.render import Attachment, OutgoingEmail, envelope_sender, render
from pipeline.mail.smtp_pool import SmtpPool
from pipeline.messages import UndecodableMessage, decode_send, encode_send
from pipeline.resources import Deps
from pipeline.retry import RetryPolicy, exhausted, next_wait_s
from pipeline.store import queries

log = logging.getLogger(__name__)

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


def envelope_from(claimed: queries.Claimed) -> str:
    return envelope_sender(outgoing(claimed))


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

    async def handle(self, delivery: Delivery) -> None:
        try:
            email_id = decode_send(delivery.body)
        except UndecodableMessage as exc:
            log.error("dead-lettering a message that is not ours: %s", exc)
            await delivery.reject(requeue=False)  # the send queue dead-letters it
            return
        async with self.deps.db.connection() as conn:
            claimed = await queries.claim_for_send(conn, email_id, lease_s=self.lease_s)
        if claimed is None:
            # Already sent, canceled, or being sent by someone else: this copy is redundant.
            await delivery.ack()
            return
        fresh_raw = None
        try:
            raw = claimed.raw
            if raw is None:
                raw = fresh_raw = render(outgoing(claimed))
            reply = await self.smtp.send(envelope_from(claimed), claimed.envelope_to, raw)
        except DeliveryError as err:
            await self.failed(delivery, claimed, err, fresh_raw)
            return
        except ValueError as exc:  # cannot be rendered: no attempt will ever succeed
            await self.failed(delivery, claimed, Permanent(f"cannot render: {exc}"), None)
            return
        async with self.deps.db.connection() as conn:
            await queries.mark_sent(conn, claimed.id, reply=reply.to_json(), raw=fresh_raw)
        await delivery.ack()

    async def failed(
        self,
        delivery: Delivery,
        claimed: queries.Claimed,
        err: DeliveryError,
        fresh_raw: bytes | None,
    ) -> None:
        reply = SmtpReply(err.code, err.enhanced, err.message).to_json()
        if isinstance(err, Permanent):
            async with self.deps.db.connection() as conn:
                await queries.mark_bounced(
                    conn, claimed.id, reply=reply, hard=is_hard_bounce(err), raw=fresh_raw
                )
            await delivery.ack()
            return
        if exhausted(claimed.attempts, self.policy.max_attempts):
            async with self.deps.db.connection() as conn:
                await queries.mark_failed(
                    conn,
                    claimed.id,
                    reason=f"retries exhausted after {claimed.attempts} attempts",
                    reply=reply,
                    raw=fresh_raw,
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
            )
        try:
            await self.publisher.publish(
                RETRY,
                encode_send(claimed.id),
                message_id=claimed.id,
                headers={ATTEMPT_HEADER: claimed.attempts, WAIT_HEADER: wait_s},
            )
        except PublishNotConfirmed as exc:
            # The email is `deferred` in the table: the redelivered message retries it early
            # rather than never.
            log.warning("retry queue did not confirm %s (%s); requeueing", claimed.id, exc)
            await delivery.nack(requeue=True)
            return
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
