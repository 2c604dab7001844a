"""The failure path on real services: a scripted SMTP sink answers 4xx and 5xx for real, the
retry role moves emails through delay-tier queues, the sweeper records what the broker
dead-lettered. Tiers are second-scale ("1,2,4" unless a test says otherwise)."""

from __future__ import annotations

import email
import email.policy
from collections import Counter
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope

from pipeline.amqp.connection import connect
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.amqp.topology import DELIVERY_LIMIT, RETRY, SEND
from pipeline.errors import PublishNotConfirmed
from pipeline.messages import encode_send
from pipeline.roles import sweeper
from tests.integration.conftest import Service
from tests.integration.scripted import (
    db_rows,
    dead_letters,
    email_published,
    events,
    eventually,
    get_email,
    mailpipe_cli,
    post_email,
    queue_depth,
    scripted_service,
    service_env,
    timestamp,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def subject_of(envelope: Envelope) -> str:
    parsed = email.message_from_bytes(envelope.original_content or b"", policy=email.policy.default)
    return str(parsed["Subject"])


def wait_of(event: dict[str, Any]) -> float:
    """Seconds between a deferral and the attempt it schedules."""
    due = timestamp(event["data"]["next_attempt_at"]) - timestamp(event["created_at"])
    return due.total_seconds()


async def test_451_twice_then_250_is_sent_on_the_third_attempt(test_db: str, prefix: str) -> None:
    def script(envelope: Envelope, attempt: int) -> str | None:
        return "451 4.7.1 greylisted, try later" if attempt < 2 else None

    async with scripted_service(test_db, prefix, script=script) as (svc, sink):
        tiers = svc.settings.retry.tiers_s
        accepted = await post_email(svc, subject="greylisted")
        sent = await svc.wait_status(accepted["id"], "sent")

        assert sent["attempts"] == 3
        assert sink.attempts == 3 and len(sink.messages) == 1
        assert sent["last_response"]["code"] == 250
        timeline = await events(svc, accepted["id"])
        assert [e["type"] for e in timeline] == [
            "email.queued",
            *["email.sending", "email.deferred"] * 2,
            "email.sending",
            "email.sent",
        ]
        assert [e["data"]["attempt"] for e in timeline if e["type"] == "email.sending"] == [1, 2, 3]
        deferred = [e for e in timeline if e["type"] == "email.deferred"]
        assert [e["data"]["attempt"] for e in deferred] == [1, 2]
        for e in deferred:  # every reply is recorded, enhanced code included
            assert e["data"]["response"] == {
                "code": 451,
                "enhanced": "4.7.1",
                "message": "4.7.1 greylisted, try later",
            }
        waits = [wait_of(e) for e in deferred]
        # Each wait is one of the configured tiers (to the millisecond the timestamps keep)...
        assert all(min(abs(w - t) for t in tiers) < 0.01 for w in waits), (waits, tiers)
        # ... and they grow: exponential backoff, rounded up to a tier.
        assert waits[0] < waits[1], waits
        assert timeline[-1]["data"]["response"]["code"] == 250


async def test_hard_bounce_suppresses_the_recipient_for_the_next_email(
    test_db: str, prefix: str
) -> None:
    def script(envelope: Envelope, attempt: int) -> str | None:
        gone = any(r.lower() == "gone@example.org" for r in envelope.rcpt_tos)
        return "550 5.1.1 <gone@example.org>: no such user" if gone else None

    async with scripted_service(test_db, prefix, script=script) as (svc, sink):
        first = await post_email(svc, to="Gone@Example.org", subject="first")
        bounced = await svc.wait_status(first["id"], "bounced")
        assert bounced["attempts"] == 1
        assert bounced["last_response"] == {
            "code": 550,
            "enhanced": "5.1.1",
            "message": "5.1.1 <gone@example.org>: no such user",
        }
        timeline = await events(svc, first["id"])
        assert [e["type"] for e in timeline] == ["email.queued", "email.sending", "email.bounced"]
        assert timeline[-1]["data"]["bounce_type"] == "hard"
        assert timeline[-1]["data"]["response"]["enhanced"] == "5.1.1"
        assert timeline[-1]["data"]["suppressed"] == ["gone@example.org"]

        r = await svc.http.get("/v1/suppressions", headers=svc.auth())
        [entry] = r.json()["data"]
        assert entry["email"] == "gone@example.org"
        assert entry["reason"] == "hard_bounce"
        assert entry["source_email_id"] == first["id"]

        second = await post_email(svc, to="gone@example.org", subject="second")
        assert second["status"] == "suppressed"
        assert (await get_email(svc, second["id"]))["status"] == "suppressed"
        timeline = await events(svc, second["id"])
        assert [e["type"] for e in timeline] == ["email.suppressed"]
        assert timeline[0]["data"] == {"recipient": "gone@example.org", "reason": "hard_bounce"}
        assert not await email_published(svc, second["id"])

        # The sink still serves others, and has seen nothing of the suppressed email.
        third = await post_email(svc, to="ok@example.org", subject="third")
        await svc.wait_status(third["id"], "sent")
        assert [m.message["Subject"] for m in sink.messages] == ["third"]
        assert sink.attempts == 2  # the bounce, and the third email


async def test_soft_bounce_does_not_suppress(test_db: str, prefix: str) -> None:
    async with scripted_service(
        test_db, prefix, script=lambda envelope, attempt: "554 5.7.1 message refused as spam"
    ) as (svc, _sink):
        accepted = await post_email(svc, to="picky@example.org")
        bounced = await svc.wait_status(accepted["id"], "bounced")
        assert bounced["last_response"]["enhanced"] == "5.7.1"
        timeline = await events(svc, accepted["id"])
        assert timeline[-1]["data"]["bounce_type"] == "soft"
        r = await svc.http.get("/v1/suppressions", headers=svc.auth())
        assert r.json()["data"] == []


async def test_exhausted_retries_become_a_dead_letter_that_replays_once(
    test_db: str, prefix: str
) -> None:
    relay_up = False

    def script(envelope: Envelope, attempt: int) -> str | None:
        return None if relay_up else "451 4.3.0 mailbox busy"

    async with scripted_service(
        test_db, prefix, script=script, MAILPIPE_RETRY_MAX_ATTEMPTS="3"
    ) as (svc, sink):
        accepted = await post_email(svc, subject="unlucky")
        failed = await svc.wait_status(accepted["id"], "failed")
        assert failed["attempts"] == 3
        assert failed["last_response"]["code"] == 451
        assert sink.attempts == 3 and sink.messages == []
        timeline = await events(svc, accepted["id"])
        assert [e["type"] for e in timeline] == [
            "email.queued",
            *["email.sending", "email.deferred"] * 2,
            "email.sending",
            "email.failed",
        ]
        final = timeline[-1]["data"]
        assert final["attempts"] == 3
        assert final["response"]["message"] == "4.3.0 mailbox busy"  # the last reply, recorded

        [letter] = (await dead_letters(svc))["data"]
        assert letter["id"].startswith("dlq_") and letter["id"] == final["dead_letter_id"]
        assert letter["email_id"] == accepted["id"]
        assert letter["reason"] == "retries exhausted after 3 attempts"
        assert letter["attempts"] == 3
        assert letter["last_response"] == {
            "code": 451,
            "enhanced": "4.3.0",
            "message": "4.3.0 mailbox busy",
        }
        assert letter["replayed_at"] is None

        # The operator's view, through the real command line.
        listed = await mailpipe_cli(
            service_env(svc.settings.database.url, prefix, sink), "dlq", "list", "--account", "test"
        )
        assert listed.returncode == 0, listed.stderr
        [header, row] = listed.stdout.splitlines()
        assert header.startswith("id\temail_id\tattempts")
        assert row.startswith(f"{letter['id']}\t{accepted['id']}\t3\t")
        assert "retries exhausted after 3 attempts" in row and "451 4.3.0 mailbox busy" in row

        relay_up = True
        r = await svc.http.post(f"/v1/dead-letters/{letter['id']}/replay", headers=svc.auth())
        assert r.status_code == 202, r.text
        assert r.json()["id"] == letter["id"] and r.json()["replayed_at"] is not None

        sent = await svc.wait_status(accepted["id"], "sent")
        assert sent["attempts"] == 1  # counting starts again from 0
        assert [m.message["Subject"] for m in sink.messages] == ["unlucky"]
        timeline = await events(svc, accepted["id"])
        assert [e["type"] for e in timeline[-4:]] == [
            "email.failed",
            "email.replayed",
            "email.sending",
            "email.sent",
        ]
        assert timeline[-3]["data"] == {"dead_letter_id": letter["id"]}

        # Its email is no longer failed: replaying again is a conflict, and sends nothing.
        r = await svc.http.post(f"/v1/dead-letters/{letter['id']}/replay", headers=svc.auth())
        assert r.status_code == 409, r.text
        assert r.headers["content-type"] == "application/problem+json"
        [letter] = (await dead_letters(svc))["data"]
        assert letter["replayed_at"] is not None
        assert await queue_depth(svc, svc.deps.topology.send) == 0
        assert len(sink.messages) == 1


async def test_delay_tiers_do_not_block_each_other(test_db: str, prefix: str) -> None:
    """A is deferred into the 30 s tier first; B, deferred into the 1 s tier after it, is sent
    while A still waits: each tier is its own queue, so a long wait never holds a short one."""
    answered: Counter[str] = Counter()

    def script(envelope: Envelope, attempt: int) -> str | None:
        subject = subject_of(envelope)
        answered[subject] += 1
        failures = {"A": 2, "B": 1}[subject]
        return "451 4.7.1 try later" if answered[subject] <= failures else None

    # Backoff 1 s after the first attempt (tier 1), 1.5-2 s after the second (tier 30).
    async with scripted_service(
        test_db,
        prefix,
        script=script,
        MAILPIPE_RETRY_TIERS_S="1,30",
        MAILPIPE_RETRY_BASE_DELAY_S="1",
        MAILPIPE_RETRY_MAX_DELAY_S="30",
    ) as (svc, sink):
        a = await post_email(svc, subject="A", to="a@example.org")

        async def a_in_long_tier() -> list[dict[str, Any]]:
            deferred = [e for e in await events(svc, a["id"]) if e["type"] == "email.deferred"]
            return deferred if len(deferred) == 2 else []

        a_deferred = await eventually(a_in_long_tier, "A's second deferral")
        assert [round(wait_of(e)) for e in a_deferred] == [1, 30]

        b = await post_email(svc, subject="B", to="b@example.org")
        b_sent = await svc.wait_status(b["id"], "sent")
        b_deferred = [e for e in await events(svc, b["id"]) if e["type"] == "email.deferred"]
        assert [round(wait_of(e)) for e in b_deferred] == [1]

        a_now = await get_email(svc, a["id"])
        assert a_now["status"] == "deferred" and a_now["attempts"] == 2
        assert timestamp(b_sent["sent_at"]) < timestamp(a_deferred[1]["data"]["next_attempt_at"])
        assert [m.message["Subject"] for m in sink.messages] == ["B"]
        # A's message sits in the 30 s tier; the 1 s tier B went through is empty again.
        assert await queue_depth(svc, svc.deps.topology.delay(30)) == 1
        assert await queue_depth(svc, svc.deps.topology.delay(1)) == 0


async def test_garbage_on_the_send_queue_is_recorded_and_sending_goes_on(
    service: Service,
) -> None:
    sink = service.extra["sink"]
    topology = service.deps.topology
    garbage = [b"\x00\xffnot json at all", b'{"id": 42}', b'{"hello": "world"}']
    async with ConfirmedPublisher(service.settings.amqp.url, topology) as publisher:
        for n, body in enumerate(garbage):
            await publisher.publish(SEND, body, message_id=f"garbage-{n}")

    async def recorded() -> list[dict[str, Any]]:
        rows = await db_rows(service, "SELECT * FROM dead_messages ORDER BY id")
        return rows if len(rows) == len(garbage) else []

    rows = await eventually(recorded, "the garbage in dead_messages")
    assert sorted(bytes(r["body"]) for r in rows) == sorted(garbage)
    for row in rows:
        assert row["queue"] == topology.send
        assert row["reason"] == f"rejected by a consumer of {topology.send}"
        assert row["headers"]["x-death"][0]["reason"] == "rejected"

    async def dead_queue_drained() -> bool:
        return await queue_depth(service, topology.dead) == 0

    await eventually(dead_queue_drained, "the dead letter queue to be acked empty")
    assert (await dead_letters(service))["data"] == []  # no email of ours failed

    accepted = await post_email(service, subject="after the garbage")
    await service.wait_status(accepted["id"], "sent")
    assert [m.message["Subject"] for m in sink.messages] == ["after the garbage"]


async def test_delivery_limit_dead_letters_the_email(test_db: str, prefix: str) -> None:
    """A message redelivered past the quorum queue's delivery limit (a crash loop) is
    dead-lettered by the broker; the sweeper marks its email failed, replayable."""
    async with scripted_service(test_db, prefix, roles=("api", "retry", "sweeper")) as (svc, _):
        accepted = await post_email(svc, subject="crash loop")

        async def published() -> bool:
            return await email_published(svc, accepted["id"])

        await eventually(published, "the publish to be confirmed")

        # Play a consumer that dies on this message every time: take it, hand it back.
        connection = await connect(svc.settings.amqp.url)
        try:
            channel = await connection.channel()
            returned = 0

            async def crash_once_more() -> bool:
                nonlocal returned
                if (await get_email(svc, accepted["id"]))["status"] == "failed":
                    return True
                message = await channel.basic_get(svc.deps.topology.send)
                if message.delivery_tag is not None:
                    await channel.basic_nack(message.delivery_tag, requeue=True)
                    returned += 1
                return False

            await eventually(crash_once_more, "the delivery limit", within=30)
        finally:
            await connection.close()
        assert returned > DELIVERY_LIMIT

        [letter] = (await dead_letters(svc))["data"]
        assert letter["email_id"] == accepted["id"]
        assert letter["reason"].startswith(f"delivery limit reached in {svc.deps.topology.send}")
        assert letter["attempts"] == 0  # no sender ever claimed it
        timeline = await events(svc, accepted["id"])
        assert timeline[-1]["type"] == "email.failed"
        assert timeline[-1]["data"]["reason"] == letter["reason"]


async def test_a_dead_lettered_copy_of_a_finished_email_changes_nothing(service: Service) -> None:
    accepted = await post_email(service, subject="done")
    await service.wait_status(accepted["id"], "sent")
    topology = service.deps.topology
    async with ConfirmedPublisher(service.settings.amqp.url, topology) as publisher:
        # Straight into the dead letter queue, as the broker would after a crash loop.
        await publisher.publish(
            "dead",
            encode_send(accepted["id"]),
            message_id=accepted["id"],
            headers={"x-first-death-reason": "delivery_limit", "x-first-death-queue": "q"},
        )

    async def drained() -> bool:
        return await queue_depth(service, topology.dead) == 0

    await eventually(drained, "the dead letter queue to be acked empty")
    assert (await get_email(service, accepted["id"]))["status"] == "sent"
    assert (await dead_letters(service))["data"] == []
    assert await db_rows(service, "SELECT id FROM dead_messages") == []


async def test_an_unconfirmed_retry_publish_waits_for_its_time_instead_of_retrying_at_once(
    test_db: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker takes no publish to the retry queue (a memory alarm, say): the deferred email
    is not retried at once (that would burn its attempts in seconds) but sent to the send queue
    by the sweeper once its wait is over, and then sent."""
    real_publish = ConfirmedPublisher.publish
    refused: list[str] = []

    async def publish(self: ConfirmedPublisher, routing_key: str, *args: Any, **kw: Any) -> None:
        if routing_key == RETRY:
            refused.append(kw["message_id"])
            raise PublishNotConfirmed("no confirm (test)")
        await real_publish(self, routing_key, *args, **kw)

    monkeypatch.setattr(ConfirmedPublisher, "publish", publish)
    monkeypatch.setattr(sweeper, "UNCONFIRMED_AFTER_S", 0.5)

    def script(envelope: Envelope, attempt: int) -> str | None:
        return "451 4.7.1 greylisted, try later" if attempt < 1 else None

    async with scripted_service(
        test_db, prefix, script=script, MAILPIPE_SWEEPER_INTERVAL_S="0.2"
    ) as (svc, _sink):
        accepted = await post_email(svc, subject="retry publish refused")
        sent = await svc.wait_status(accepted["id"], "sent")
        assert sent["attempts"] == 2  # one deferral, then the attempt it scheduled
        assert refused == [accepted["id"]]
        timeline = await events(svc, accepted["id"])
        assert [e["type"] for e in timeline] == [
            "email.queued",
            "email.sending",
            "email.deferred",
            "email.sending",
            "email.sent",
        ]
        due = timestamp(timeline[2]["data"]["next_attempt_at"])
        assert timestamp(timeline[3]["created_at"]) >= due  # not before its time
