"""`POST /v1/emails/batch` on real services: per-item validation and results in order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.integration.conftest import Service, email_body

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def batch(service: Service, body: Any) -> Any:
    return await service.http.post("/v1/emails/batch", json=body, headers=service.auth())


async def test_valid_items_are_sent_and_invalid_ones_name_their_fields(service: Service) -> None:
    sink = service.extra["sink"]
    r = await service.http.post(
        "/v1/suppressions", json={"email": "gone@example.org"}, headers=service.auth()
    )
    assert r.status_code == 201
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    items = [
        email_body(subject="first"),
        {"from_email": "a@example.com", "to": ["bad@", "ok@example.org"], "body_text": "x"},
        email_body(subject="third", to=["c@example.org"], cc="d@example.org"),
        email_body(headers={"From": "spoof@example.com"}, subject="a\r\nb"),
        email_body(subject="scheduled", scheduled_at=later),
        email_body(subject="suppressed", to="Gone <GONE@example.org>"),
        "not an object",
    ]
    r = await batch(service, {"emails": items})
    assert r.status_code == 202, r.text
    data = r.json()["data"]
    assert len(data) == len(items)

    ok = {0: "queued", 2: "queued", 4: "scheduled", 5: "suppressed"}
    for index, status in ok.items():
        assert set(data[index]) == {"id", "status"}, data[index]
        assert data[index]["id"].startswith("msg_") and data[index]["status"] == status
    assert len({data[i]["id"] for i in ok}) == len(ok)

    def fields(index: int) -> set[str]:
        problem = data[index]["error"]
        assert problem["status"] == 422
        assert problem["type"] == "https://mailpipe.dev/problems/validation-error"
        assert set(data[index]) == {"error"}
        return {e["field"] for e in problem["errors"]}

    assert fields(1) == {"emails[1].to[0]", "emails[1].subject"}
    assert fields(3) == {"emails[3].headers", "emails[3].subject"}
    assert fields(6) == {"emails[6]"}

    # The valid ones go out; the others left nothing behind.
    await service.wait_status(data[0]["id"], "sent")
    await service.wait_status(data[2]["id"], "sent")
    await sink.wait_for(2)
    assert sorted(m.message["Subject"] for m in sink.messages) == ["first", "third"]
    third = next(m for m in sink.messages if m.message["Subject"] == "third")
    assert sorted(third.rcpt_tos) == ["c@example.org", "d@example.org"]
    r = await service.http.get("/v1/emails", params={"limit": 100}, headers=service.auth())
    assert {e["id"] for e in r.json()["data"]} == {data[i]["id"] for i in ok}
    r = await service.http.get(f"/v1/emails/{data[5]['id']}/events", headers=service.auth())
    assert [e["type"] for e in r.json()["data"]] == ["email.suppressed"]


async def test_a_full_batch_of_one_hundred(service: Service) -> None:
    sink = service.extra["sink"]
    items = [email_body(subject=f"n={n}") for n in range(100)]
    r = await batch(service, {"emails": items})
    assert r.status_code == 202, r.text
    # The batch costs 100 against the key's (generous, in tests) limit, and says so.
    assert int(r.headers["X-RateLimit-Limit"]) >= 100
    assert int(r.headers["X-RateLimit-Remaining"]) < int(r.headers["X-RateLimit-Limit"])
    ids = [item["id"] for item in r.json()["data"]]
    assert len(set(ids)) == 100
    await sink.wait_for(100, timeout=30)
    assert sorted(m.message["Subject"] for m in sink.messages) == sorted(
        f"n={n}" for n in range(100)
    )
    for email_id in (ids[0], ids[-1]):
        await service.wait_status(email_id, "sent")


@pytest.mark.parametrize(
    "body",
    [
        {"emails": []},
        {"emails": [email_body()] * 101},
        {"emails": email_body()},
        {"mails": [email_body()]},
        [email_body()],
    ],
    ids=["empty", "too-many", "not-a-list", "no-emails", "bare-list"],
)
async def test_the_batch_itself_must_be_1_to_100_emails(service: Service, body: Any) -> None:
    r = await batch(service, body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert [e["field"] for e in r.json()["errors"]] == ["emails"]


async def test_only_invalid_items_create_nothing(service: Service) -> None:
    r = await batch(service, {"emails": [{"to": "x@example.org"}, email_body(to=[])]})
    assert r.status_code == 202, r.text
    data = r.json()["data"]
    assert {e["field"] for e in data[0]["error"]["errors"]} >= {
        "emails[0].from_email",
        "emails[0].subject",
        "emails[0].body_text",
    }
    assert [e["field"] for e in data[1]["error"]["errors"]] == ["emails[1].to"]
    r = await service.http.get("/v1/emails", headers=service.auth())
    assert r.json()["data"] == []
