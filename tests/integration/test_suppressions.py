"""`/v1/suppressions` and what a suppression does at acceptance, on real services."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Service
from tests.integration.scripted import (
    db_rows,
    email_published,
    events,
    get_email,
    post_email,
    scripted_service,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def suppress(service: Service, address: str, key: str | None = None) -> Any:
    return await service.http.post(
        "/v1/suppressions", json={"email": address}, headers=service.auth(key)
    )


async def listed(service: Service, key: str | None = None) -> list[str]:
    r = await service.http.get("/v1/suppressions", headers=service.auth(key))
    assert r.status_code == 200, r.text
    return [item["email"] for item in r.json()["data"]]


async def test_add_list_and_remove(service: Service) -> None:
    r = await suppress(service, "Someone@Example.COM")
    assert r.status_code == 201, r.text
    item = r.json()
    assert item["email"] == "someone@example.com"  # stored lower-cased
    assert item["reason"] == "manual"
    assert item["source_email_id"] is None
    assert item["created_at"].endswith("Z")
    assert set(item) == {"email", "reason", "created_at", "source_email_id"}

    # Adding it again is idempotent: the same entry, unchanged.
    again = await suppress(service, "someone@example.com")
    assert again.status_code == 201, again.text
    assert again.json() == item
    assert await listed(service) == ["someone@example.com"]

    # Any spelling of the address finds it.
    r = await service.http.delete("/v1/suppressions/SomeOne@example.com", headers=service.auth())
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert await listed(service) == []
    r = await service.http.delete("/v1/suppressions/someone@example.com", headers=service.auth())
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"


async def test_list_is_newest_first_with_a_cursor(service: Service) -> None:
    added = [f"user{n}@example.org" for n in range(5)]
    for address in added:
        assert (await suppress(service, address)).status_code == 201
    seen: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"after": after} if after else {})
        r = await service.http.get("/v1/suppressions", params=params, headers=service.auth())
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["data"]) <= 2
        seen += [item["email"] for item in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        after = page["next_cursor"]
    assert seen == list(reversed(added))


async def test_accounts_do_not_see_each_others_lists(service: Service) -> None:
    other_key, _ = await service.new_key("other")
    assert (await suppress(service, "mine@example.org")).status_code == 201
    assert await listed(service, other_key) == []
    r = await service.http.delete(
        "/v1/suppressions/mine@example.org", headers=service.auth(other_key)
    )
    assert r.status_code == 404  # exactly as an address on nobody's list
    assert await listed(service) == ["mine@example.org"]

    # The other account keeps its own entry for the same address.
    assert (await suppress(service, "mine@example.org", other_key)).status_code == 201
    r = await service.http.delete("/v1/suppressions/mine@example.org", headers=service.auth())
    assert r.status_code == 204
    assert await listed(service, other_key) == ["mine@example.org"]


async def test_admin_scope_is_required(service: Service) -> None:
    key, _ = await service.new_key("test", scopes=("send", "read"))
    headers = service.auth(key)
    r = await service.http.get("/v1/suppressions", headers=headers)
    assert r.status_code == 403
    r = await service.http.post("/v1/suppressions", json={"email": "a@b.org"}, headers=headers)
    assert r.status_code == 403
    r = await service.http.delete("/v1/suppressions/a@b.org", headers=headers)
    assert r.status_code == 403
    r = await service.http.get("/v1/suppressions")
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, ["email"]),
        ({"email": "not an address"}, ["email"]),
        ({"email": "a@b.org\r\nBcc: x@y.org"}, ["email"]),
        ({"email": 42}, ["email"]),
        ({"email": "bad", "reason": "manual"}, ["email", "reason"]),
    ],
)
async def test_validation_names_every_bad_field(
    service: Service, body: dict[str, Any], fields: list[str]
) -> None:
    r = await service.http.post("/v1/suppressions", json=body, headers=service.auth())
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert sorted({e["field"] for e in r.json()["errors"]}) == fields
    assert await listed(service) == []


async def test_bad_list_parameters_are_422(service: Service) -> None:
    for params in ({"limit": "0"}, {"limit": "101"}, {"after": "not-a-cursor"}):
        r = await service.http.get("/v1/suppressions", params=params, headers=service.auth())
        assert r.status_code == 422, (params, r.text)
        assert [e["field"] for e in r.json()["errors"]] == list(params)


async def test_suppressed_recipients_are_left_out_of_the_envelope(service: Service) -> None:
    sink = service.extra["sink"]
    assert (await suppress(service, "gone@example.org")).status_code == 201
    accepted = await post_email(
        service, to=["ok@example.org", "Gone@Example.org"], cc="carol@example.org"
    )
    assert accepted["status"] == "queued"
    await service.wait_status(accepted["id"], "sent")
    [got] = sink.messages
    assert sorted(got.rcpt_tos) == ["carol@example.org", "ok@example.org"]
    timeline = await events(service, accepted["id"])
    assert [e["type"] for e in timeline] == [
        "email.suppressed",
        "email.queued",
        "email.sending",
        "email.sent",
    ]
    assert timeline[0]["data"] == {"recipient": "Gone@example.org", "reason": "manual"}


async def test_an_email_with_only_suppressed_recipients_is_never_sent(service: Service) -> None:
    sink = service.extra["sink"]
    for address in ("a@example.org", "b@example.org"):
        assert (await suppress(service, address)).status_code == 201
    r = await service.http.post(
        "/v1/emails",
        json={
            "from": "Sender <sender@example.com>",
            "to": "a@example.org",
            "bcc": ["B@example.org"],
            "subject": "nobody left",
            "body_text": "x",
        },
        headers=service.auth(),
    )
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "suppressed"
    email = await get_email(service, accepted["id"])
    assert email["status"] == "suppressed" and email["attempts"] == 0
    timeline = await events(service, accepted["id"])
    assert [(e["type"], e["data"]["recipient"]) for e in timeline] == [
        ("email.suppressed", "a@example.org"),
        ("email.suppressed", "B@example.org"),
    ]
    assert not await email_published(service, accepted["id"])

    # Taken off the list, the address gets mail again; the suppressed email stays unsent.
    r = await service.http.delete("/v1/suppressions/a@example.org", headers=service.auth())
    assert r.status_code == 204
    again = await post_email(service, to="a@example.org", subject="welcome back")
    await service.wait_status(again["id"], "sent")
    assert [m.message["Subject"] for m in sink.messages] == ["welcome back"]
    assert (await get_email(service, accepted["id"]))["status"] == "suppressed"


async def test_an_idn_address_matches_in_either_form(service: Service) -> None:
    r = await suppress(service, "User@Bücher.example")
    assert r.json()["email"] == "user@bücher.example"
    accepted = await post_email(service, to="user@xn--bcher-kva.example")
    assert accepted["status"] == "suppressed"


async def test_one_hard_bounced_recipient_is_suppressed_the_email_still_sent(
    test_db: str, prefix: str
) -> None:
    def rcpt(address: str) -> str | None:
        return "550 5.1.1 no such mailbox" if address.startswith("gone@") else None

    async with scripted_service(test_db, prefix, rcpt_script=rcpt) as (svc, sink):
        accepted = await post_email(svc, to=["ok@example.org", "gone@example.org"])
        await svc.wait_status(accepted["id"], "sent")
        [got] = sink.messages
        assert got.rcpt_tos == ("ok@example.org",)
        sent = (await events(svc, accepted["id"]))[-1]
        assert sent["type"] == "email.sent"
        assert sent["data"]["refused"] == {
            "gone@example.org": {
                "code": 550,
                "enhanced": "5.1.1",
                "message": "5.1.1 no such mailbox",
            }
        }
        r = await svc.http.get("/v1/suppressions", headers=svc.auth())
        [entry] = r.json()["data"]
        assert entry["email"] == "gone@example.org"
        assert entry["reason"] == "hard_bounce"
        assert entry["source_email_id"] == accepted["id"]


async def test_every_recipient_refused_at_rcpt_bounces_and_suppresses_the_5_1_x_ones(
    test_db: str, prefix: str
) -> None:
    replies = {
        "gone@example.org": "550 5.1.1 no such mailbox",
        "nodomain@example.org": "550 5.1.2 bad destination system",
        "policy@example.org": "550 5.7.1 not allowed",
    }
    async with scripted_service(test_db, prefix, rcpt_script=replies.get) as (svc, sink):
        accepted = await post_email(svc, to=list(replies))
        bounced = await svc.wait_status(accepted["id"], "bounced")
        assert bounced["attempts"] == 1
        final = (await events(svc, accepted["id"]))[-1]["data"]
        assert final["bounce_type"] == "hard"
        assert sorted(final["refused"]) == sorted(replies)
        assert sorted(final["suppressed"]) == ["gone@example.org", "nodomain@example.org"]
        rows = await db_rows(svc, "SELECT email FROM suppressions ORDER BY email")
        assert [r["email"] for r in rows] == ["gone@example.org", "nodomain@example.org"]
        assert sink.messages == []


async def test_openapi_documents_the_suppression_endpoints(service: Service) -> None:
    doc = (await service.http.get("/openapi.json")).json()
    assert {"get", "post"} <= set(doc["paths"]["/v1/suppressions"])
    assert "delete" in doc["paths"]["/v1/suppressions/{email}"]
    assert "get" in doc["paths"]["/v1/dead-letters"]
    assert "post" in doc["paths"]["/v1/dead-letters/{letter_id}/replay"]
