"""`scheduled_at` and `POST /v1/emails/{id}/cancel` on real services (seconds-scale)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import anyio
import pytest

from tests.integration.conftest import Service, email_body, run_service, settings_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def at(seconds: float, tz: timezone = UTC) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).astimezone(tz).isoformat()


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def post(service: Service, **fields: Any) -> dict[str, Any]:
    r = await service.http.post("/v1/emails", json=email_body(**fields), headers=service.auth())
    assert r.status_code == 202, r.text
    accepted: dict[str, Any] = r.json()
    return accepted


async def timeline(service: Service, email_id: str) -> list[dict[str, Any]]:
    r = await service.http.get(f"/v1/emails/{email_id}/events", headers=service.auth())
    assert r.status_code == 200, r.text
    events: list[dict[str, Any]] = r.json()["data"]
    return events


async def test_a_scheduled_email_waits_and_then_goes(service: Service) -> None:
    sink = service.extra["sink"]
    when = at(2, timezone(timedelta(hours=5, minutes=30)))  # any offset; answered in UTC
    accepted = await post(service, subject="later", scheduled_at=when)
    assert accepted["status"] == "scheduled"

    r = await service.http.get(f"/v1/emails/{accepted['id']}", headers=service.auth())
    email = r.json()
    assert email["status"] == "scheduled"
    assert email["scheduled_at"].endswith("Z")
    assert parse_time(email["scheduled_at"]) == datetime.fromisoformat(when)
    assert [e["type"] for e in await timeline(service, accepted["id"])] == ["email.scheduled"]

    sent = await service.wait_status(accepted["id"], "sent", within=30)
    [got] = await sink.wait_for(1)
    assert got.message["Subject"] == "later"
    # Not before its time: released, claimed and sent only once scheduled_at had passed
    # (the database's clock decides, and stamps every one of these).
    scheduled_at = parse_time(sent["scheduled_at"])
    assert parse_time(sent["sent_at"]) >= scheduled_at
    events = await timeline(service, accepted["id"])
    assert [e["type"] for e in events] == [
        "email.scheduled",
        "email.queued",
        "email.sending",
        "email.sent",
    ]
    assert all(parse_time(e["created_at"]) >= scheduled_at for e in events[1:])


async def test_cancel_before_it_goes(service: Service) -> None:
    sink = service.extra["sink"]
    doomed = await post(service, subject="canceled", scheduled_at=at(1.5))
    r = await service.http.post(f"/v1/emails/{doomed['id']}/cancel", headers=service.auth())
    assert r.status_code == 200, r.text
    assert r.json()["id"] == doomed["id"] and r.json()["status"] == "canceled"
    # Canceling again changes nothing and is not an error: it is canceled, as asked.
    again = await service.http.post(f"/v1/emails/{doomed['id']}/cancel", headers=service.auth())
    assert again.status_code == 200 and again.json()["status"] == "canceled"

    # A later one, due after the canceled one: once it is at the sink, the canceled one's time
    # has long come (the scheduler releases in due order), and it did not go.
    later = await post(service, subject="kept", scheduled_at=at(1.6))
    await service.wait_status(later["id"], "sent", within=30)
    await sink.wait_for(1)
    assert [m.message["Subject"] for m in sink.messages] == ["kept"]
    r = await service.http.get(f"/v1/emails/{doomed['id']}", headers=service.auth())
    assert r.json()["status"] == "canceled" and r.json()["attempts"] == 0
    assert [e["type"] for e in await timeline(service, doomed["id"])] == [
        "email.scheduled",
        "email.canceled",
    ]


async def test_cancel_once_sent_is_409_and_others_ids_are_404(service: Service) -> None:
    accepted = await post(service, subject="now")
    await service.wait_status(accepted["id"], "sent")
    r = await service.http.post(f"/v1/emails/{accepted['id']}/cancel", headers=service.auth())
    assert r.status_code == 409, r.text
    assert r.json()["status"] == 409 and "sent" in r.json()["detail"]
    r = await service.http.get(f"/v1/emails/{accepted['id']}", headers=service.auth())
    assert r.json()["status"] == "sent"

    r = await service.http.post("/v1/emails/msg_nope/cancel", headers=service.auth())
    assert r.status_code == 404
    waiting = await post(service, scheduled_at=at(3600))
    other, _ = await service.new_key("another-account")
    r = await service.http.post(f"/v1/emails/{waiting['id']}/cancel", headers=service.auth(other))
    assert r.status_code == 404
    read_only, _ = await service.new_key("test", scopes=("read",))
    r = await service.http.post(
        f"/v1/emails/{waiting['id']}/cancel", headers=service.auth(read_only)
    )
    assert r.status_code == 403
    r = await service.http.get(f"/v1/emails/{waiting['id']}", headers=service.auth())
    assert r.json()["status"] == "scheduled"


async def test_scheduled_at_rules(service: Service) -> None:
    for bad in (at(-60), at(31 * 86400), "2030-01-01T10:00:00", "tomorrow"):
        r = await service.http.post(
            "/v1/emails", json=email_body(scheduled_at=bad), headers=service.auth()
        )
        assert r.status_code == 422, (bad, r.text)
        assert [e["field"] for e in r.json()["errors"]] == ["scheduled_at"]
    assert (await post(service, scheduled_at=at(29 * 86400)))["status"] == "scheduled"


async def test_a_time_that_passed_while_no_scheduler_ran_is_released_at_start(
    test_db: str, prefix: str, sink: Any
) -> None:
    settings = settings_for(test_db, prefix, SMTP_HOST="127.0.0.1", SMTP_PORT=str(sink.port))
    async with run_service(settings, roles=("api",)) as api:
        accepted = await post(api, subject="overdue", scheduled_at=at(1))
        email_id = accepted["id"]
        # Wait until its time has passed by the database's clock, with only the API running.
        with anyio.fail_after(10):
            while True:
                async with api.deps.db.connection() as conn:
                    cur = await conn.execute(
                        "SELECT clock_timestamp() > scheduled_at, status FROM emails WHERE id = %s",
                        (email_id,),
                    )
                    row = await cur.fetchone()
                assert row is not None
                assert row[1] == "scheduled"
                if row[0]:
                    break
                await anyio.sleep(0.05)

    async with run_service(settings, roles=("sender", "retry", "sweeper")) as workers:
        [got] = await sink.wait_for(1, timeout=20)
        assert got.message["Subject"] == "overdue"
        with anyio.fail_after(10):
            while True:
                async with workers.deps.db.connection() as conn:
                    cur = await conn.execute("SELECT status FROM emails WHERE id = %s", (email_id,))
                    row = await cur.fetchone()
                if row is not None and row[0] == "sent":
                    break
                await anyio.sleep(0.05)
