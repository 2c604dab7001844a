"""`/v1/dead-letters` and `mailpipe dlq`: listing, tenancy, replay and its conflicts.

Every email fails at its first attempt here (`retry.max_attempts` = 1 and a relay that answers
451 until the test says it recovered), so dead letters are made in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from aiosmtpd.smtp import Envelope

from tests.integration.conftest import Service
from tests.integration.scripted import (
    dead_letters,
    events,
    eventually,
    mailpipe_cli,
    post_email,
    scripted_service,
    service_env,
)
from tests.smtp_sink import SmtpSink

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@dataclass
class Relay:
    """A relay that refuses everything until `up` is set."""

    up: bool = False

    def __call__(self, envelope: Envelope, attempt: int) -> str | None:
        return None if self.up else "451 4.4.1 relay unavailable"


@dataclass
class Setup:
    svc: Service
    sink: SmtpSink
    relay: Relay
    env: dict[str, str]

    async def failed_email(self, key: str | None = None, **fields: Any) -> str:
        accepted = await post_email(self.svc, key, **fields)
        email_id: str = accepted["id"]
        headers = self.svc.auth(key)
        with anyio.fail_after(20):
            while True:
                r = await self.svc.http.get(f"/v1/emails/{email_id}", headers=headers)
                if r.json()["status"] == "failed":
                    return email_id
                await anyio.sleep(0.05)

    async def cli(self, *args: str) -> Any:
        return await mailpipe_cli(self.env, *args)


@pytest.fixture
async def setup(test_db: str, prefix: str) -> AsyncIterator[Setup]:
    relay = Relay()
    async with scripted_service(test_db, prefix, script=relay, MAILPIPE_RETRY_MAX_ATTEMPTS="1") as (
        svc,
        sink,
    ):
        env = service_env(test_db, prefix, sink, MAILPIPE_RETRY_MAX_ATTEMPTS="1")
        yield Setup(svc, sink, relay, env)


async def test_listed_newest_first_with_a_cursor(setup: Setup) -> None:
    ids = [await setup.failed_email(subject=f"n={n}") for n in range(3)]
    first = await dead_letters(setup.svc, limit=2)
    assert [d["email_id"] for d in first["data"]] == [ids[2], ids[1]]
    assert first["has_more"] is True
    second = await dead_letters(setup.svc, limit=2, after=first["next_cursor"])
    assert [d["email_id"] for d in second["data"]] == [ids[0]]
    assert second["has_more"] is False and second["next_cursor"] is None
    item = second["data"][0]
    assert set(item) == {
        "id",
        "email_id",
        "reason",
        "attempts",
        "last_response",
        "created_at",
        "replayed_at",
    }
    assert item["reason"] == "retries exhausted after 1 attempt"
    assert item["attempts"] == 1
    assert item["last_response"]["code"] == 451


async def test_another_accounts_dead_letters_are_invisible(setup: Setup) -> None:
    await setup.failed_email()
    [letter] = (await dead_letters(setup.svc))["data"]
    other_key, _ = await setup.svc.new_key("other")
    assert (await dead_letters(setup.svc, other_key))["data"] == []
    r = await setup.svc.http.post(
        f"/v1/dead-letters/{letter['id']}/replay", headers=setup.svc.auth(other_key)
    )
    assert r.status_code == 404, r.text  # exactly as an id that does not exist
    r = await setup.svc.http.post(
        "/v1/dead-letters/dlq_doesnotexist/replay", headers=setup.svc.auth()
    )
    assert r.status_code == 404, r.text
    assert r.headers["content-type"] == "application/problem+json"


async def test_admin_scope_is_required(setup: Setup) -> None:
    key, _ = await setup.svc.new_key("test", scopes=("send", "read"))
    r = await setup.svc.http.get("/v1/dead-letters", headers=setup.svc.auth(key))
    assert r.status_code == 403
    r = await setup.svc.http.post("/v1/dead-letters/dlq_x/replay", headers=setup.svc.auth(key))
    assert r.status_code == 403
    r = await setup.svc.http.get("/v1/dead-letters", params={"limit": "500"})
    assert r.status_code == 401


async def test_concurrent_replays_send_once(setup: Setup) -> None:
    email_id = await setup.failed_email(subject="twice?")
    [letter] = (await dead_letters(setup.svc))["data"]
    setup.relay.up = True
    codes: list[int] = []

    async def replay() -> None:
        r = await setup.svc.http.post(
            f"/v1/dead-letters/{letter['id']}/replay", headers=setup.svc.auth()
        )
        codes.append(r.status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(replay)
    assert sorted(codes) == [202, 409, 409, 409]
    await setup.svc.wait_status(email_id, "sent")
    assert [m.message["Subject"] for m in setup.sink.messages] == ["twice?"]
    replayed = [e for e in await events(setup.svc, email_id) if e["type"] == "email.replayed"]
    assert len(replayed) == 1


async def test_a_letter_that_failed_again_can_be_replayed_again(setup: Setup) -> None:
    email_id = await setup.failed_email()
    [letter] = (await dead_letters(setup.svc))["data"]
    r = await setup.svc.http.post(
        f"/v1/dead-letters/{letter['id']}/replay", headers=setup.svc.auth()
    )
    assert r.status_code == 202

    # The relay is still down: the replayed email fails again, a second dead letter.
    async def two_letters() -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = (await dead_letters(setup.svc))["data"]
        return data if len(data) == 2 else []

    newest, oldest = await eventually(two_letters, "a second dead letter")
    assert newest["email_id"] == oldest["email_id"] == email_id
    assert newest["replayed_at"] is None and oldest["replayed_at"] is not None
    setup.relay.up = True
    r = await setup.svc.http.post(
        f"/v1/dead-letters/{newest['id']}/replay", headers=setup.svc.auth()
    )
    assert r.status_code == 202
    await setup.svc.wait_status(email_id, "sent")
    assert len(setup.sink.messages) == 1


async def test_cli_lists_and_replays_all(setup: Setup) -> None:
    ids = [await setup.failed_email(subject=f"cli {n}") for n in range(3)]
    other_key, _ = await setup.svc.new_key("other")
    other_id = await setup.failed_email(other_key, subject="other account")

    everyone = await setup.cli("dlq", "list")
    assert everyone.returncode == 0, everyone.stderr
    rows = everyone.stdout.splitlines()[1:]
    assert [row.split("\t")[1] for row in rows] == [other_id, *reversed(ids)]

    ours = await setup.cli("dlq", "list", "--account", "test", "--limit", "2")
    assert ours.returncode == 0, ours.stderr
    assert [row.split("\t")[1] for row in ours.stdout.splitlines()[1:]] == [ids[2], ids[1]]

    missing = await setup.cli("dlq", "list", "--account", "nobody")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "mailpipe: no account 'nobody' (create it with: mailpipe accounts create nobody)"
    ]

    setup.relay.up = True
    replayed = await setup.cli("dlq", "replay", "--all", "--account", "test")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.splitlines()[-1] == "3 dead letter(s) replayed"
    for email_id in ids:
        await setup.svc.wait_status(email_id, "sent")
    assert sorted(m.message["Subject"] for m in setup.sink.messages) == [
        "cli 0",
        "cli 1",
        "cli 2",
    ]
    r = await setup.svc.http.get(f"/v1/emails/{other_id}", headers=setup.svc.auth(other_key))
    assert r.json()["status"] == "failed"  # another account's: left alone

    pending = await setup.cli("dlq", "list", "--pending")
    assert [row.split("\t")[1] for row in pending.stdout.splitlines()[1:]] == [other_id]

    [letter] = [d for d in (await dead_letters(setup.svc))["data"] if d["email_id"] == ids[0]]
    again = await setup.cli("dlq", "replay", letter["id"])
    assert again.returncode == 1
    assert "cannot be replayed" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    unknown = await setup.cli("dlq", "replay", "dlq_nope")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "mailpipe: no dead letter 'dlq_nope'"

    neither = await setup.cli("dlq", "replay")
    assert neither.returncode == 1 and "--all" in neither.stderr

    # Without --account, the operator replays any account's letter by its id.
    [other_letter] = (await dead_letters(setup.svc, other_key))["data"]
    one = await setup.cli("dlq", "replay", other_letter["id"])
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip() == f"replayed {other_letter['id']}: {other_id} queued"
    with anyio.fail_after(20):
        while True:
            r = await setup.svc.http.get(
                f"/v1/emails/{other_id}", headers=setup.svc.auth(other_key)
            )
            if r.json()["status"] == "sent":
                break
            await anyio.sleep(0.05)
    assert len(setup.sink.messages) == 4
