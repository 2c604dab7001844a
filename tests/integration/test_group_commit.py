"""Group commit on real services: concurrent requests share inserts, publishes and marks, and
still get their own outcome each (a bad row fails alone; suppression still applies)."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest

from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.intake import GroupCommit
from tests.integration.conftest import Service, email_body
from tests.procs import new_emails, poll

pytestmark = pytest.mark.anyio


async def rows(service: Service, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with service.deps.db.connection() as conn:
        cur = await conn.execute(sql, args)
        return await cur.fetchall()


async def test_concurrent_requests_share_commits_and_each_get_their_own_answer(
    service: Service,
) -> None:
    r = await service.http.post(
        "/v1/suppressions", json={"email": "gone@example.org"}, headers=service.auth()
    )
    assert r.status_code == 201, r.text
    answers: dict[int, dict[str, Any]] = {}

    async def post(n: int) -> None:
        to = "gone@example.org" if n == 7 else f"rcpt{n}@example.org"
        cc = ["gone@example.org"] if n == 11 else []
        r = await service.http.post(
            "/v1/emails",
            json=email_body(to=to, cc=cc, subject=f"n{n}"),
            headers=service.auth(),
        )
        assert r.status_code == 202, r.text
        answers[n] = r.json()

    async with anyio.create_task_group() as tg:
        for n in range(40):
            tg.start_soon(post, n)

    assert answers[7]["status"] == "suppressed"
    assert all(answers[n]["status"] == "queued" for n in answers if n != 7)
    ids = [a["id"] for a in answers.values()]
    assert len(set(ids)) == 40
    # Every queued email is confirmed by the broker and marked right after its 202 (not by
    # the sweeper's republish, which waits 10 s).
    queued = {a["id"] for a in answers.values() if a["status"] == "queued"}

    async def all_published() -> bool:
        found = await rows(service, "SELECT id FROM emails WHERE id = ANY(%s) AND published", ids)
        return {row[0] for row in found} == queued

    await poll(all_published, within=5, what="the publishes to be marked")
    # Their first events are there, in order, suppressed recipient included.
    events = await rows(
        service,
        "SELECT email_id, type, data FROM events WHERE email_id = %s ORDER BY seq",
        answers[11]["id"],
    )
    assert [e[1] for e in events][:2] == ["email.suppressed", "email.queued"]
    assert events[0][2]["recipient"] == "gone@example.org"
    [(envelope,)] = await rows(
        service, "SELECT envelope_to FROM emails WHERE id = %s", answers[11]["id"]
    )
    assert envelope == ["rcpt11@example.org"]

    sink = service.extra["sink"]
    await sink.wait_for(39)
    assert sorted(str(m.message["Subject"]) for m in sink.messages) == sorted(
        f"n{n}" for n in range(40) if n != 7
    )
    # Some requests really did share a commit: rows of one statement share its transaction.
    [(transactions,)] = await rows(
        service, "SELECT count(DISTINCT xmin::text) FROM emails WHERE id = ANY(%s)", ids
    )
    assert transactions < 40


async def test_a_bad_row_fails_alone(service: Service) -> None:
    """A row the database refuses (here a NUL in the content, which the API's validation
    would have stopped) fails its own request; the others in its group are committed,
    published and marked."""
    settings = service.settings
    good = new_emails(service.account_id, [f"good {n}" for n in range(9)])
    [bad] = new_emails(service.account_id, ["bad"])
    bad = type(bad)(**{**bad.__dict__, "content": {"body_text": "NUL \x00 here"}})
    async with (
        ConfirmedPublisher(settings.amqp.url, service.deps.topology) as publisher,
        GroupCommit(service.deps.db, publisher) as group,
    ):
        outcomes: dict[str, Any] = {}

        async def accept(email: Any) -> None:
            try:
                outcomes[email.id] = await group.accept([email])
            except Exception as exc:
                outcomes[email.id] = exc

        async with anyio.create_task_group() as tg:
            for email in [*good[:5], bad, *good[5:]]:
                tg.start_soon(accept, email)

    assert isinstance(outcomes.pop(bad.id), psycopg.DataError)
    assert all(o[0].status == "queued" for o in outcomes.values())
    stored = await rows(
        service,
        "SELECT id, published FROM emails WHERE id = ANY(%s)",
        [e.id for e in [*good, bad]],
    )
    assert sorted(stored) == sorted((e.id, True) for e in good)
    # The group was split to isolate the bad row: more flushes than batches.
    assert group.batcher.flushes > group.batcher.batches
    await service.extra["sink"].wait_for(9)


class HeldPublisher:
    """Confirms every publish, but only once `release` is set: a slow broker."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.published: list[str] = []

    async def publish_many(self, items: list[Any]) -> list[bool]:
        await self.release.wait()
        self.published += [item[2] for item in items]
        return [True] * len(items)


async def test_requests_wait_for_room_when_publishing_lags(service: Service) -> None:
    """With `max_unpublished` ids waiting for the broker, a further request is committed but
    not answered until a publish is done: the API accepts no faster than it publishes."""
    publisher = HeldPublisher()
    emails = new_emails(service.account_id, ["a", "b", "c"])
    answered: list[str] = []

    async def accept(group: GroupCommit, email: Any) -> None:
        await group.accept([email])
        answered.append(email.id)

    async with GroupCommit(service.deps.db, publisher, max_unpublished=2) as group:  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            for email in emails[:2]:
                tg.start_soon(accept, group, email)
        assert sorted(answered) == sorted(e.id for e in emails[:2])  # answered once committed
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept, group, emails[2])

            async def committed() -> bool:
                found = await rows(service, "SELECT id FROM emails WHERE id = %s", emails[2].id)
                return bool(found)

            await poll(committed, within=5, what="the third email's commit")
            await anyio.wait_all_tasks_blocked()
            assert emails[2].id not in answered  # no room: two ids wait for the broker
            publisher.release.set()
        assert emails[2].id in answered
    assert sorted(publisher.published) == sorted(e.id for e in emails)
    published = await rows(
        service, "SELECT id FROM emails WHERE id = ANY(%s) AND published", [e.id for e in emails]
    )
    assert len(published) == 3
