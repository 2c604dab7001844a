"""Authentication, tenancy and validation errors: problem+json that names what is wrong."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Service, email_body

pytestmark = pytest.mark.anyio

PROBLEM = "application/problem+json"


async def test_missing_and_unknown_keys_are_401(service: Service) -> None:
    r = await service.http.post("/v1/emails", json=email_body())
    assert r.status_code == 401
    assert r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["type"] == "https://mailpipe.dev/problems/unauthorized"
    for headers in (
        {"X-API-Key": "sk_test_nope"},
        {"X-API-Key": service.key[:-1] + ("A" if service.key[-1] != "A" else "B")},
        {"Authorization": "Bearer sk_live_00000000000000000000000000"},
    ):
        r = await service.http.post("/v1/emails", json=email_body(), headers=headers)
        assert r.status_code == 401, headers


async def test_bearer_works_and_request_id_is_echoed(service: Service) -> None:
    r = await service.http.post(
        "/v1/emails",
        json=email_body(),
        headers={"Authorization": f"Bearer {service.key}", "X-Request-Id": "req-123"},
    )
    assert r.status_code == 202
    assert r.headers["X-Request-Id"] == "req-123"
    r = await service.http.get("/health")
    assert r.headers["X-Request-Id"]


async def test_another_accounts_email_is_404_like_a_missing_one(service: Service) -> None:
    r = await service.http.post("/v1/emails", json=email_body(), headers=service.auth())
    email_id = r.json()["id"]
    other_key, _ = await service.new_key("other")
    r = await service.http.get(f"/v1/emails/{email_id}", headers=service.auth(other_key))
    assert r.status_code == 404
    missing = await service.http.get("/v1/emails/msg_doesnotexist", headers=service.auth(other_key))
    assert missing.status_code == 404
    assert r.json()["detail"].replace(email_id, "X") == missing.json()["detail"].replace(
        "msg_doesnotexist", "X"
    )
    r = await service.http.get(f"/v1/emails/{email_id}/events", headers=service.auth(other_key))
    assert r.status_code == 404
    r = await service.http.get("/v1/emails", headers=service.auth(other_key))
    assert r.json()["data"] == []


async def test_scopes_are_enforced(service: Service) -> None:
    read_only, _ = await service.new_key("test", scopes=("read",))
    r = await service.http.post("/v1/emails", json=email_body(), headers=service.auth(read_only))
    assert r.status_code == 403
    send_only, _ = await service.new_key("test", scopes=("send",))
    r = await service.http.get("/v1/emails", headers=service.auth(send_only))
    assert r.status_code == 403


async def test_validation_names_every_bad_field(service: Service) -> None:
    r = await service.http.post(
        "/v1/emails",
        json={"from_email": "not-an-address", "to": ["ok@example.org", "bad@"], "subject": ""},
        headers=service.auth(),
    )
    assert r.status_code == 422
    assert r.headers["content-type"].startswith(PROBLEM)
    problem = r.json()
    assert problem["status"] == 422
    fields = {e["field"] for e in problem["errors"]}
    assert {"from_email", "to[1]", "subject", "body_text"} <= fields


async def test_header_injection_is_refused(service: Service) -> None:
    r = await service.http.post(
        "/v1/emails",
        json=email_body(subject="hi\r\nBcc: victim@example.org", to="a@example.org\nX: y"),
        headers=service.auth(),
    )
    assert r.status_code == 422
    fields = {e["field"] for e in r.json()["errors"]}
    assert {"subject", "to[0]"} <= fields


async def test_bad_json_and_unknown_routes(service: Service) -> None:
    r = await service.http.post(
        "/v1/emails",
        content=b"{not json",
        headers=service.auth() | {"Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["type"].endswith("/invalid-json")
    r = await service.http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.headers["content-type"].startswith(PROBLEM)
    r = await service.http.get("/v1/emails", params={"limit": 0}, headers=service.auth())
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "limit"
    r = await service.http.get("/v1/emails", params={"after": "garbage"}, headers=service.auth())
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "after"
