"""`Idempotency-Key` on real services: replay, conflict, concurrency, expiry."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

from tests.integration.conftest import Service, email_body

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def post(
    service: Service, body: Any, key: str | None, path: str = "/v1/emails", api_key: str = ""
) -> httpx.Response:
    headers = service.auth(api_key or None) | ({"Idempotency-Key": key} if key else {})
    return await service.http.post(path, json=body, headers=headers)


async def count_emails(service: Service) -> int:
    async with service.deps.db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM emails")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def barrier(service: Service) -> None:
    """Send one more email and wait until it is at the sink: whatever was published before it
    has been delivered by now, so a count of the sink's messages is final."""
    r = await post(service, email_body(subject="barrier"), None)
    assert r.status_code == 202
    await service.wait_status(r.json()["id"], "sent")


async def test_a_repeat_returns_the_first_answer_and_sends_nothing(service: Service) -> None:
    sink = service.extra["sink"]
    body = email_body(subject="once", tags={"a": "1"})
    first = await post(service, body, "order-42")
    assert first.status_code == 202, first.text
    assert "Idempotent-Replayed" not in first.headers
    await service.wait_status(first.json()["id"], "sent")

    # Same body (key order and spacing do not matter), same key: the first answer again.
    same = json.dumps(dict(reversed(list(body.items()))), indent=2)
    again = await service.http.post(
        "/v1/emails",
        content=same,
        headers=service.auth()
        | {"Idempotency-Key": "order-42", "Content-Type": "application/json"},
    )
    assert again.status_code == first.status_code
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["content-type"].startswith("application/json")

    await barrier(service)
    assert [m.message["Subject"] for m in sink.messages] == ["once", "barrier"]
    assert await count_emails(service) == 2


async def test_another_body_or_endpoint_with_the_same_key_is_409(service: Service) -> None:
    first = await post(service, email_body(subject="one"), "k-1")
    assert first.status_code == 202
    for body, path in (
        (email_body(subject="two"), "/v1/emails"),
        ({"emails": [email_body(subject="one")]}, "/v1/emails/batch"),
    ):
        r = await post(service, body, "k-1", path)
        assert r.status_code == 409, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["type"] == "https://mailpipe.dev/problems/idempotency-conflict"
        assert "Idempotent-Replayed" not in r.headers
    assert await count_emails(service) == 1


async def test_keys_belong_to_one_account(service: Service) -> None:
    other, _ = await service.new_key("other-account")
    mine = await post(service, email_body(), "shared-key")
    theirs = await post(service, email_body(subject="theirs"), "shared-key", api_key=other)
    assert mine.status_code == theirs.status_code == 202
    assert mine.json()["id"] != theirs.json()["id"]
    assert "Idempotent-Replayed" not in theirs.headers


async def test_a_refused_request_does_not_use_up_its_key(service: Service) -> None:
    bad = await post(service, email_body(to="not an address"), "retry-me")
    assert bad.status_code == 422
    good = await post(service, email_body(), "retry-me")
    assert good.status_code == 202 and "Idempotent-Replayed" not in good.headers
    for key in ("", "x" * 257, "tab\there"):
        r = await service.http.post(
            "/v1/emails", json=email_body(), headers=service.auth() | {"Idempotency-Key": key}
        )
        if key == "":  # an empty header is a 422 as well
            assert r.status_code == 422, r.text
        else:
            assert r.status_code == 422, (key, r.text)
            assert r.json()["errors"][0]["field"] == "Idempotency-Key"
    r = await post(service, email_body(), "k" * 256)
    assert r.status_code == 202, r.text


async def test_twenty_concurrent_requests_with_one_key_make_one_email(service: Service) -> None:
    sink = service.extra["sink"]
    body = email_body(subject="exactly once")
    answers: list[httpx.Response] = []

    async def one() -> None:
        answers.append(await post(service, body, "concurrent-key"))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)

    codes = sorted(r.status_code for r in answers)
    assert set(codes) <= {202, 409}, codes
    accepted = [r for r in answers if r.status_code == 202]
    assert accepted, codes
    firsts = [r for r in accepted if "Idempotent-Replayed" not in r.headers]
    assert len(firsts) == 1, [dict(r.headers) for r in accepted]
    assert {r.json()["id"] for r in accepted} == {firsts[0].json()["id"]}
    for r in answers:
        if r.status_code == 409:
            assert r.json()["type"] == "https://mailpipe.dev/problems/idempotency-conflict"

    # After the dust settles a repeat is a replay, and exactly one email went out.
    r = await post(service, body, "concurrent-key")
    assert r.status_code == 202 and r.headers["Idempotent-Replayed"] == "true"
    assert r.json()["id"] == firsts[0].json()["id"]
    await service.wait_status(firsts[0].json()["id"], "sent")
    await barrier(service)
    assert [m.message["Subject"] for m in sink.messages] == ["exactly once", "barrier"]
    assert await count_emails(service) == 2


async def test_batch_replays_and_expired_keys_are_new(service: Service) -> None:
    batch = {"emails": [email_body(subject="b1"), email_body(to="bad")]}
    first = await post(service, batch, "batch-key", "/v1/emails/batch")
    assert first.status_code == 202, first.text
    again = await post(service, batch, "batch-key", "/v1/emails/batch")
    assert again.status_code == 202
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert await count_emails(service) == 1

    # Past the 24 h window the key is free again: a new request with it is processed anew
    # (even with another body), and the sweeper prunes the expired entries.
    async with service.deps.db.connection() as conn:
        await conn.execute(
            "UPDATE idempotency_keys SET created_at = created_at - interval '25 hours'"
        )
    r = await post(service, email_body(subject="new"), "batch-key")
    assert r.status_code == 202, r.text
    assert "Idempotent-Replayed" not in r.headers
    async with service.deps.db.connection() as conn:
        await conn.execute(
            "INSERT INTO idempotency_keys (account_id, key, request_hash, response_code,"
            " response_body, created_at) VALUES (%s, 'old', '\\x00', 202, '{}',"
            " now() - interval '25 hours')",
            (service.account_id,),
        )
    with anyio.fail_after(10):
        while True:
            async with service.deps.db.connection() as conn:
                cur = await conn.execute("SELECT key FROM idempotency_keys ORDER BY key")
                keys = [row[0] for row in await cur.fetchall()]
            if keys == ["batch-key"]:
                break
            await anyio.sleep(0.05)
