"""The whole happy path on real services: API → PostgreSQL → RabbitMQ → sender → SMTP sink."""

from __future__ import annotations

import anyio
import pytest

from tests.integration.conftest import Service, email_body

pytestmark = pytest.mark.anyio


async def test_posted_email_reaches_the_sink_as_posted(service: Service) -> None:
    sink = service.extra["sink"]
    body = email_body(
        to=["Ann Example <ann@example.org>", "bob@example.org"],
        cc="carol@example.org",
        bcc=["dave@example.org"],
        subject="Quarterly report",
        body_text="plain text body",
        body_html="<p>html body</p>",
    )
    r = await service.http.post("/v1/emails", json=body, headers=service.auth())
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["id"].startswith("msg_")
    assert accepted["status"] == "queued"
    assert accepted["created_at"].endswith("Z")

    email = await service.wait_status(accepted["id"], "sent")
    await sink.wait_for(1)
    [got] = sink.messages
    assert got.mail_from == "sender@example.com"
    assert sorted(got.rcpt_tos) == sorted(
        ["ann@example.org", "bob@example.org", "carol@example.org", "dave@example.org"]
    )
    msg = got.message
    assert msg["Subject"] == "Quarterly report"
    assert msg["From"] == "Sender <sender@example.com>"
    assert "Ann Example <ann@example.org>" in msg["To"] and "bob@example.org" in msg["To"]
    assert msg["Cc"] == "carol@example.org"
    assert msg["Bcc"] is None
    assert msg["Message-ID"]
    assert msg.get_body(("plain",)).get_content().strip() == "plain text body"
    assert msg.get_body(("html",)).get_content().strip() == "<p>html body</p>"

    assert email["attempts"] == 1
    assert email["last_response"]["code"] == 250
    assert email["sent_at"] is not None
    r = await service.http.get(f"/v1/emails/{accepted['id']}/events", headers=service.auth())
    assert [e["type"] for e in r.json()["data"]] == ["email.queued", "email.sending", "email.sent"]
    assert r.json()["data"][1]["data"]["attempt"] == 1


async def test_fifty_concurrent_emails_arrive_exactly_once(service: Service) -> None:
    sink = service.extra["sink"]
    ids: list[str] = []

    async def post(n: int) -> None:
        r = await service.http.post(
            "/v1/emails", json=email_body(subject=f"n={n}"), headers=service.auth()
        )
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])

    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(post, n)
    await sink.wait_for(50)
    for email_id in ids:
        await service.wait_status(email_id, "sent")
    subjects = sorted(m.message["Subject"] for m in sink.messages)
    assert subjects == sorted(f"n={n}" for n in range(50))
    message_ids = [m.message["Message-ID"] for m in sink.messages]
    assert len(set(message_ids)) == 50


async def test_list_is_newest_first_with_a_cursor(service: Service) -> None:
    ids = []
    for n in range(5):
        r = await service.http.post(
            "/v1/emails", json=email_body(subject=f"n={n}"), headers=service.auth()
        )
        ids.append(r.json()["id"])
    seen: list[str] = []
    after = None
    while True:
        params = {"limit": 2} | ({"after": after} if after else {})
        r = await service.http.get("/v1/emails", params=params, headers=service.auth())
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [e["id"] for e in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        after = page["next_cursor"]
    assert seen == list(reversed(ids))


async def test_health_ready_and_docs(service: Service) -> None:
    r = await service.http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await service.http.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"postgres": "ok", "rabbitmq": "ok", "redis": "ok"}
    r = await service.http.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    assert "/v1/emails" in doc["paths"] and "/v1/emails/{email_id}" in doc["paths"]
    r = await service.http.get("/docs")
    assert r.status_code == 200 and "html" in r.headers["content-type"]
    r = await service.http.get("/metrics")
    assert r.status_code == 200 and "mailpipe_http_requests" in r.text
