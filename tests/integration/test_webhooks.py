"""Event webhooks end to end: a receiver run by the test on 127.0.0.1, the real pipeline, real
services. Signatures are checked with the spec's recipe written out here, not the project's code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import SocketAttribute, SocketStream

from pipeline.amqp.publisher import ConfirmedPublisher, PublishItem
from pipeline.amqp.topology import WEBHOOKS
from pipeline.store import queries
from pipeline.webhooks import EVENT_TYPES
from pipeline.webhooks.fanout import WebhookMessage, fan_out_once
from tests.integration.conftest import Service, email_body, run_service, settings_for
from tests.integration.scripted import (
    db_rows,
    events,
    eventually,
    post_email,
    queue_depth,
    scripted_service,
    timestamp,
)
from tests.procs import poll

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

T = TypeVar("T")
ROLES = ("api", "sender", "retry", "sweeper", "webhooks")
TIERS = "1,2"
"""Webhook retry tiers in seconds: retries come within seconds."""


# ---------------------------------------------------------------- the receiver


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def type(self) -> str:
        kind: str = self.json["type"]
        return kind


Answer = Callable[[str, int], int]
"""(path, how many requests that path got before this one) → the status to answer."""
HANG = 0
"""An answer that never comes."""


@dataclass
class Receiver:
    answer: Answer
    port: int = 0
    requests: list[Received] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str, email_id: str | None = None) -> list[Received]:
        return [
            r
            for r in self.requests
            if r.path == path and (email_id is None or r.json["data"]["email_id"] == email_id)
        ]

    async def serve(self, stream: SocketStream) -> None:
        """One request per connection (answered with Connection: close)."""
        async with stream:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
                head, _, body = data.partition(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                _method, path, _version = request_line.split(" ", 2)
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                while len(body) < length:
                    body += await stream.receive()
                status = self.answer(path, len([r for r in self.requests if r.path == path]))
                self.requests.append(Received(path, headers, body[:length], status))
                if status == HANG:
                    await anyio.sleep_forever()  # a hung endpoint: the client must give up
                await stream.send(
                    f"HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
            except (anyio.EndOfStream, anyio.BrokenResourceError, ValueError):
                pass


def always_ok(path: str, seen: int) -> int:
    return 200


@asynccontextmanager
async def receiver(answer: Answer = always_ok) -> AsyncIterator[Receiver]:
    rx = Receiver(answer)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        rx.port = listener.extra(SocketAttribute.local_port)
        tg.start_soon(listener.serve, rx.serve)
        yield rx
        tg.cancel_scope.cancel()


def check_signature(secret: str, request: Received) -> None:
    """Standard Webhooks, from the spec: HMAC-SHA256 keyed by the secret's base64 payload over
    "{webhook-id}.{webhook-timestamp}.{body}", sent as `v1,<base64>`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = (
        request.headers["webhook-id"].encode()
        + b"."
        + request.headers["webhook-timestamp"].encode()
        + b"."
        + request.body
    )
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert expected in request.headers["webhook-signature"].split(" ")


# ---------------------------------------------------------------- helpers


async def create_webhook(svc: Service, url: str, key: str | None = None, **fields: Any) -> Any:
    r = await svc.http.post("/v1/webhooks", json={"url": url, **fields}, headers=svc.auth(key))
    assert r.status_code == 201, r.text
    return r.json()


async def webhooks(svc: Service, key: str | None = None, **params: Any) -> Any:
    r = await svc.http.get("/v1/webhooks", params=params, headers=svc.auth(key))
    assert r.status_code == 200, r.text
    return r.json()


async def deliveries(svc: Service, webhook_id: str, **params: Any) -> list[dict[str, Any]]:
    r = await svc.http.get(
        f"/v1/webhooks/{webhook_id}/deliveries", params=params, headers=svc.auth()
    )
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def sync(check: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    """A plain predicate as the async check `eventually` polls."""

    async def run() -> T:
        return check()

    return run


def bounce_everything(envelope: Any, attempt: int) -> str:
    return "550 5.1.1 no such user"


# ---------------------------------------------------------------- end to end


async def test_a_sent_email_reaches_the_endpoint_signed(test_db: str, prefix: str) -> None:
    async with (
        receiver() as rx,
        scripted_service(test_db, prefix, roles=ROLES, MAILPIPE_WEBHOOKS_RETRY_TIERS_S=TIERS) as (
            svc,
            _sink,
        ),
    ):
        hook = await create_webhook(svc, rx.url("/hooks"))
        assert set(hook) == {"id", "url", "events", "enabled", "created_at", "secret"}
        assert hook["id"].startswith("wh_")
        assert hook["url"] == rx.url("/hooks")
        assert hook["events"] == list(EVENT_TYPES)  # default: every type
        assert hook["enabled"] is True
        assert hook["secret"].startswith("whsec_")
        assert len(base64.b64decode(hook["secret"][6:], validate=True)) >= 24

        email = await post_email(svc)
        await svc.wait_status(email["id"], "sent")
        wanted = ["email.queued", "email.sending", "email.sent"]
        await eventually(
            sync(lambda: {r.type for r in rx.at("/hooks")} >= set(wanted)),
            "email.queued, email.sending and email.sent at the receiver",
        )
        timeline = {e["type"]: e for e in await events(svc, email["id"])}
        got = {r.type: r for r in rx.at("/hooks")}
        assert sorted(got) == sorted(wanted)
        for kind in wanted:
            request, event = got[kind], timeline[kind]
            check_signature(hook["secret"], request)
            assert request.headers["webhook-id"] == event["id"]
            assert request.headers["webhook-timestamp"].isdigit()
            assert request.headers["content-type"] == "application/json"
            body = request.json
            assert set(body) == {"type", "timestamp", "data"}
            assert body["type"] == kind
            assert timestamp(body["timestamp"]) == timestamp(event["created_at"])
            assert body["data"] == {"email_id": email["id"], **event["data"]}
        assert got["email.sending"].json["data"]["attempt"] == 1
        assert got["email.sent"].json["data"]["response"]["code"] == 250

        # Listed without the secret; three successful deliveries recorded.
        listed = await webhooks(svc)
        assert listed["data"] == [{k: v for k, v in hook.items() if k != "secret"}]
        assert listed["has_more"] is False and listed["next_cursor"] is None
        recorded = await eventually(
            lambda: _count(deliveries(svc, hook["id"]), 3), "three recorded deliveries"
        )
        assert {d["event_type"] for d in recorded} == set(wanted)
        for d in recorded:
            assert set(d) == {
                "id", "event_id", "event_type", "attempt", "status_code", "error", "created_at"
            }  # fmt: skip
            assert (d["attempt"], d["status_code"], d["error"]) == (1, 200, None)
            assert d["event_id"] == timeline[d["event_type"]]["id"]


async def test_a_rotated_secret_signs_alongside_the_old_one(test_db: str, prefix: str) -> None:
    async with (
        receiver() as rx,
        scripted_service(test_db, prefix, roles=ROLES, MAILPIPE_WEBHOOKS_RETRY_TIERS_S=TIERS) as (
            svc,
            _sink,
        ),
    ):
        hook = await create_webhook(svc, rx.url("/hooks"), events=["email.sent"])
        r = await svc.http.post(f"/v1/webhooks/{hook['id']}/rotate-secret", headers=svc.auth())
        assert r.status_code == 200, r.text
        rotated = r.json()
        assert set(rotated) == {"id", "secret", "previous_secret_expires_at"}
        assert rotated["secret"].startswith("whsec_") and rotated["secret"] != hook["secret"]
        expires = timestamp(rotated["previous_secret_expires_at"])
        assert timedelta(hours=23) < expires - datetime.now(UTC) <= timedelta(hours=24)

        email = await post_email(svc)
        [request] = await eventually(sync(lambda: rx.at("/hooks", email["id"])), "the event")
        assert len(request.headers["webhook-signature"].split(" ")) == 2
        check_signature(rotated["secret"], request)  # the new secret first...
        check_signature(hook["secret"], request)  # ...and the old one, for 24 h

        # Once the old one's time is over, only the new one signs.
        async with svc.deps.db.connection() as conn:
            await conn.execute(
                "UPDATE webhooks SET previous_secret_until = now() WHERE id = %s", (hook["id"],)
            )
        second = await post_email(svc)
        [later] = await eventually(sync(lambda: rx.at("/hooks", second["id"])), "the event")
        assert len(later.headers["webhook-signature"].split(" ")) == 1
        check_signature(rotated["secret"], later)

        r = await svc.http.post("/v1/webhooks/wh_nope/rotate-secret", headers=svc.auth())
        assert r.status_code == 404


async def _count(pending: Any, n: int) -> list[dict[str, Any]] | None:
    items: list[dict[str, Any]] = await pending
    return items if len(items) >= n else None


async def test_failures_are_retried_with_the_same_webhook_id(test_db: str, prefix: str) -> None:
    def twice_down(path: str, seen: int) -> int:
        return [500, 503][seen] if seen < 2 else 204

    async with (
        receiver(twice_down) as rx,
        scripted_service(test_db, prefix, roles=ROLES, MAILPIPE_WEBHOOKS_RETRY_TIERS_S=TIERS) as (
            svc,
            _sink,
        ),
    ):
        hook = await create_webhook(svc, rx.url("/flaky"), events=["email.sent"])
        assert hook["events"] == ["email.sent"]
        email = await post_email(svc)
        await eventually(
            sync(lambda: len(rx.at("/flaky")) >= 3),
            "three attempts at the receiver",
        )
        attempts = rx.at("/flaky")
        assert [r.status for r in attempts] == [500, 503, 204]
        assert {r.type for r in attempts} == {"email.sent"}
        sent_event = next(e for e in await events(svc, email["id"]) if e["type"] == "email.sent")
        assert {r.headers["webhook-id"] for r in attempts} == {sent_event["id"]}
        assert len({r.body for r in attempts}) == 1  # the same payload every time
        for r in attempts:
            check_signature(hook["secret"], r)

        recorded = await eventually(
            lambda: _count(deliveries(svc, hook["id"]), 3), "three recorded deliveries"
        )
        assert len(recorded) == 3
        by_attempt = sorted(recorded, key=lambda d: d["attempt"])
        assert [(d["attempt"], d["status_code"], d["error"]) for d in by_attempt] == [
            (1, 500, "HTTP 500"),
            (2, 503, "HTTP 503"),
            (3, 204, None),
        ]
        assert {d["event_id"] for d in recorded} == {sent_event["id"]}
        assert recorded == by_attempt[::-1]  # newest first
        # The streak is over: the endpoint stays enabled.
        assert (await webhooks(svc))["data"][0]["enabled"] is True


async def test_410_gone_disables_the_endpoint(test_db: str, prefix: str) -> None:
    def gone_or_ok(path: str, seen: int) -> int:
        return 410 if path == "/gone" else 200

    async with (
        receiver(gone_or_ok) as rx,
        scripted_service(test_db, prefix, roles=ROLES, MAILPIPE_WEBHOOKS_RETRY_TIERS_S=TIERS) as (
            svc,
            _sink,
        ),
    ):
        gone = await create_webhook(svc, rx.url("/gone"), events=["email.sent"])
        witness = await create_webhook(svc, rx.url("/ok"), events=["email.sent"])
        first = await post_email(svc)

        async def gone_disabled() -> bool:
            items = {w["id"]: w for w in (await webhooks(svc))["data"]}
            return items[gone["id"]]["enabled"] is False

        await eventually(gone_disabled, "the 410 endpoint disabled")
        [recorded] = await deliveries(svc, gone["id"])
        assert (recorded["attempt"], recorded["status_code"]) == (1, 410)
        assert recorded["error"] == "HTTP 410"
        assert [r.status for r in rx.at("/gone")] == [410]  # not retried

        # Disabled before the next email existed: its events go to the witness only.
        second = await post_email(svc)
        await eventually(
            sync(lambda: rx.at("/ok", second["id"])),
            "the second email's event at the witness",
        )
        assert len(rx.at("/gone")) == 1
        assert [r.json["data"]["email_id"] for r in rx.at("/gone")] == [first["id"]]
        assert len(await deliveries(svc, gone["id"])) == 1
        states = {w["id"]: w["enabled"] for w in (await webhooks(svc))["data"]}
        assert states == {gone["id"]: False, witness["id"]: True}

        # Fixed and enabled again through the API: events flow to its new URL.
        r = await svc.http.patch(
            f"/v1/webhooks/{gone['id']}",
            json={"url": rx.url("/fixed"), "enabled": True},
            headers=svc.auth(),
        )
        assert r.status_code == 200, r.text
        assert (r.json()["enabled"], r.json()["url"]) == (True, rx.url("/fixed"))
        [row] = await db_rows(
            svc, "SELECT failing_since, disabled_reason FROM webhooks WHERE id = %s", gone["id"]
        )
        assert row == {"failing_since": None, "disabled_reason": None}
        third = await post_email(svc)
        await eventually(
            sync(lambda: rx.at("/fixed", third["id"])), "the third email's event at the new URL"
        )


async def test_a_bounce_reaches_only_a_bounce_subscription(test_db: str, prefix: str) -> None:
    async with (
        receiver() as rx,
        scripted_service(
            test_db,
            prefix,
            script=bounce_everything,
            roles=ROLES,
            MAILPIPE_WEBHOOKS_RETRY_TIERS_S=TIERS,
        ) as (
            svc,
            _sink,
        ),
    ):
        bounced_only = await create_webhook(svc, rx.url("/bounced"), events=["email.bounced"])
        sent_only = await create_webhook(svc, rx.url("/sent"), events=["email.sent"])
        await create_webhook(svc, rx.url("/all"))
        email = await post_email(svc)
        await svc.wait_status(email["id"], "bounced")
        await eventually(
            sync(lambda: len(rx.at("/all")) >= 3 and rx.at("/bounced")),
            "every event at the catch-all endpoint, and the bounce at its subscription",
        )
        # Every event of the email reached the catch-all endpoint, so every message of the
        # fan-out was published and taken (a stray one for /bounced would have come with them;
        # test_fan_out_matches_account_type_and_enabled checks the matching exactly). In any
        # order: deliveries run concurrently, and `timestamp` is what tells the order.
        assert sorted(r.type for r in rx.at("/all")) == [
            "email.bounced",
            "email.queued",
            "email.sending",
        ]
        [request] = rx.at("/bounced")
        assert request.type == "email.bounced"
        data = request.json["data"]
        assert data["email_id"] == email["id"]
        assert data["bounce_type"] == "hard"
        assert data["response"]["code"] == 550
        check_signature(bounced_only["secret"], request)
        assert rx.at("/sent") == []
        assert await deliveries(svc, sent_only["id"]) == []
        recorded = await eventually(
            lambda: _count(deliveries(svc, bounced_only["id"]), 1), "the bounce delivery"
        )
        assert [d["event_type"] for d in recorded] == ["email.bounced"]


async def test_a_timeout_is_retried(test_db: str, prefix: str) -> None:
    def hang_once(path: str, seen: int) -> int:
        return HANG if seen == 0 else 200

    async with (
        receiver(hang_once) as rx,
        scripted_service(
            test_db,
            prefix,
            roles=ROLES,
            MAILPIPE_WEBHOOKS_TIMEOUT_S="0.5",
            MAILPIPE_WEBHOOKS_RETRY_TIERS_S=TIERS,
        ) as (svc, _sink),
    ):
        hook = await create_webhook(svc, rx.url("/slow"), events=["email.queued"])
        await post_email(svc)
        recorded = await eventually(
            lambda: _count(deliveries(svc, hook["id"]), 2), "a timeout, then a success"
        )
        assert [(d["attempt"], d["status_code"], d["error"]) for d in recorded[::-1]] == [
            (1, None, "no answer within 0.5 s"),
            (2, 200, None),
        ]
        assert len({r.headers["webhook-id"] for r in rx.at("/slow")}) == 1


async def test_refused_again_at_delivery(test_db: str, prefix: str) -> None:
    """An endpoint saved while private addresses were allowed (or whose name now resolves to
    one) gets nothing once they are not: each attempt is refused and recorded."""
    async with (
        receiver() as rx,
        scripted_service(
            test_db,
            prefix,
            roles=ROLES,
            MAILPIPE_WEBHOOKS_ALLOW_PRIVATE="false",
            MAILPIPE_WEBHOOKS_RETRY_TIERS_S=TIERS,
        ) as (svc, _sink),
    ):
        urls = [f"https://localhost:{rx.port}/a", f"https://127.0.0.1:{rx.port}/b"]
        async with svc.deps.db.connection() as conn:
            hooks = [
                await queries.create_webhook(
                    conn, svc.account_id, url=url, events=["email.queued"], enabled=True,
                    secret="whsec_AAAA",
                )
                for url in urls
            ]  # fmt: skip
        await post_email(svc)
        for hook, why in zip(
            hooks, ["localhost resolves to", "127.0.0.1 is a loopback"], strict=True
        ):

            async def refused(webhook_id: str = hook.id) -> list[dict[str, Any]] | None:
                return await _count(deliveries(svc, webhook_id), 1)

            first = (await eventually(refused, "a refusal"))[-1]
            assert first["status_code"] is None
            assert first["error"].startswith("refused: " + why), first
        assert rx.requests == []


# ---------------------------------------------------------------- the API


async def test_one_endpoint_can_be_read_and_changed(test_db: str, prefix: str) -> None:
    settings = settings_for(test_db, prefix, MAILPIPE_WEBHOOKS_ALLOW_PRIVATE="false")
    async with run_service(settings, ("api",)) as svc:
        auth = svc.auth()
        created = await svc.http.post(
            "/v1/webhooks", json={"url": "https://93.184.216.34/hook"}, headers=auth
        )
        assert created.status_code == 201, created.text
        hook_id = created.json()["id"]
        r = await svc.http.get(f"/v1/webhooks/{hook_id}", headers=auth)
        assert r.status_code == 200
        assert set(r.json()) == {"id", "url", "events", "enabled", "created_at"}  # no secret

        r = await svc.http.patch(
            f"/v1/webhooks/{hook_id}",
            json={"events": ["email.sent", "email.sent", "email.bounced"], "enabled": False},
            headers=auth,
        )
        assert r.status_code == 200, r.text
        assert r.json()["events"] == ["email.sent", "email.bounced"]
        assert r.json()["enabled"] is False and r.json()["url"] == "https://93.184.216.34/hook"
        [row] = await db_rows(svc, "SELECT disabled_reason FROM webhooks WHERE id = %s", hook_id)
        assert row["disabled_reason"] == "disabled through the API"

        for body, field in (
            ({"url": "https://127.0.0.1/hook"}, "url"),  # the address rules, as at creation
            ({"events": []}, "events"),
            ({"events": ["email.nope"]}, "events[0]"),
            ({"secret": "whsec_x"}, "secret"),
        ):
            r = await svc.http.patch(f"/v1/webhooks/{hook_id}", json=body, headers=auth)
            assert r.status_code == 422, (body, r.text)
            assert [e["field"] for e in r.json()["errors"]] == [field], r.json()
        r = await svc.http.get(f"/v1/webhooks/{hook_id}", headers=auth)
        assert r.json()["events"] == ["email.sent", "email.bounced"]  # nothing half-applied

        for method in ("GET", "PATCH"):
            r = await svc.http.request(
                method, "/v1/webhooks/wh_nope", json={"enabled": True}, headers=auth
            )
            assert r.status_code == 404, r.text


async def test_ssrf_targets_are_refused_under_the_production_config(
    test_db: str, prefix: str
) -> None:
    settings = settings_for(test_db, prefix, MAILPIPE_WEBHOOKS_ALLOW_PRIVATE="false")
    assert settings.webhooks.allow_private is False
    own_name = socket.gethostname()
    async with run_service(settings, ("api",)) as svc:
        refused = {
            "https://127.0.0.1/hook": "loopback",
            "https://10.0.0.1/hook": "private",
            "https://169.254.169.254/latest/meta-data/": "cloud metadata",
            "https://[::1]/hook": "loopback",
            "https://[::ffff:127.0.0.1]/hook": "loopback",
            "https://100.64.0.7/hook": "CGNAT",
            "https://localhost/hook": "localhost resolves to",
            "http://93.184.216.34/hook": "https",
        }
        if await _resolves_privately(own_name):
            refused[f"https://{own_name}/hook"] = f"{own_name} resolves to"
        for url, why in refused.items():
            r = await svc.http.post("/v1/webhooks", json={"url": url}, headers=svc.auth())
            assert r.status_code == 422, (url, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            problem = r.json()
            assert [e["field"] for e in problem["errors"]] == ["url"], url
            assert why in problem["errors"][0]["message"], (url, problem)
        assert (await webhooks(svc))["data"] == []

        # A public address is accepted (an IP literal: no DNS needed).
        hook = await create_webhook(svc, "https://93.184.216.34/hook")
        assert hook["url"] == "https://93.184.216.34/hook"


async def _resolves_privately(name: str) -> bool:
    from pipeline.webhooks import ssrf

    try:
        await ssrf.resolve(name, 443, allow_private=False)
    except ssrf.UnsafeUrl as exc:
        return "resolves to" in str(exc)
    return False


async def test_validation_names_every_bad_field(service: Service) -> None:
    r = await service.http.post(
        "/v1/webhooks",
        json={"url": "ftp://example.com/x", "events": ["email.sent", "email.opened"], "x": 1},
        headers=service.auth(),
    )
    assert r.status_code == 422, r.text
    fields = sorted(e["field"] for e in r.json()["errors"])
    assert fields == ["events[1]", "url", "x"]
    for body in ({"url": "http://127.0.0.1/x", "events": []}, {"events": ["email.sent"]}):
        r = await service.http.post("/v1/webhooks", json=body, headers=service.auth())
        assert r.status_code == 422, r.text
    # Duplicates are dropped, the order kept.
    hook = await create_webhook(
        service, "http://127.0.0.1:9/x", events=["email.sent", "email.bounced", "email.sent"]
    )
    assert hook["events"] == ["email.sent", "email.bounced"]
    hook = await create_webhook(service, "http://127.0.0.1:9/y", enabled=False)
    assert hook["enabled"] is False


async def test_scopes_tenancy_delete_and_pagination(service: Service) -> None:
    created = [
        await create_webhook(service, f"http://127.0.0.1:9/{n}", events=["email.sent"])
        for n in range(3)
    ]
    seen, after = [], None
    while True:
        page = await webhooks(service, limit=2, **({"after": after} if after else {}))
        assert len(page["data"]) <= 2
        seen += [w["id"] for w in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_cursor"]
    assert seen == [w["id"] for w in reversed(created)]
    assert all("secret" not in w for w in (await webhooks(service))["data"])

    # Another account: its own empty list, and our ids answer 404 as unknown ones do.
    other_key, _ = await service.new_key("other")
    assert (await webhooks(service, other_key))["data"] == []
    target = created[0]["id"]
    for key in (other_key, None):
        r = await service.http.get(
            "/v1/webhooks/wh_doesnotexist/deliveries", headers=service.auth(key)
        )
        assert r.status_code == 404
    for odd in ("wh_%00x", "wh_%ED%A0%80", "x" * 65):  # NUL, a lone surrogate, too long
        r = await service.http.delete(f"/v1/webhooks/{odd}", headers=service.auth())
        assert r.status_code == 404, r.text
        r = await service.http.get(f"/v1/webhooks/{odd}/deliveries", headers=service.auth())
        assert r.status_code == 404, r.text
    r = await service.http.get(f"/v1/webhooks/{target}/deliveries", headers=service.auth(other_key))
    assert r.status_code == 404
    r = await service.http.delete(f"/v1/webhooks/{target}", headers=service.auth(other_key))
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"

    # The admin scope is required.
    send_only, _ = await service.new_key("test", scopes=("send", "read"))
    r = await service.http.get("/v1/webhooks", headers=service.auth(send_only))
    assert r.status_code == 403
    r = await service.http.post(
        "/v1/webhooks", json={"url": "http://127.0.0.1:9/"}, headers=service.auth(send_only)
    )
    assert r.status_code == 403

    r = await service.http.delete(f"/v1/webhooks/{target}", headers=service.auth())
    assert r.status_code == 204
    assert r.content == b""
    r = await service.http.delete(f"/v1/webhooks/{target}", headers=service.auth())
    assert r.status_code == 404
    assert target not in [w["id"] for w in (await webhooks(service))["data"]]


async def test_the_openapi_document_shows_the_webhook_endpoints(service: Service) -> None:
    r = await service.http.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert {"get", "post"} <= set(paths["/v1/webhooks"])
    assert "requestBody" in paths["/v1/webhooks"]["post"]
    assert "delete" in paths["/v1/webhooks/{webhook_id}"]
    assert "get" in paths["/v1/webhooks/{webhook_id}/deliveries"]


# ---------------------------------------------------------------- the fan-out, directly


@pytest.fixture
async def api_only(test_db: str, prefix: str) -> AsyncIterator[Service]:
    """The API alone: accepted emails stay `queued` with one `email.queued` event each, and
    nothing fans out but the test."""
    async with run_service(settings_for(test_db, prefix), ("api",)) as svc:
        yield svc


class RecordingPublisher:
    """Confirms everything (or what `refuse` does not name) and remembers what it was given."""

    def __init__(self, refuse: Callable[[str], bool] = lambda message_id: False) -> None:
        self.items: list[PublishItem] = []
        self.refuse = refuse

    async def publish_many(self, items: Any) -> list[bool]:
        await anyio.lowlevel.checkpoint()
        self.items += list(items)
        return [not self.refuse(item[2]) for item in items]


async def _setup_fanout(svc: Service) -> dict[str, str]:
    """Two accounts' endpoints with different subscriptions, then events of both accounts."""
    other_key, other_account = await svc.new_key("other")
    async with svc.deps.db.connection() as conn:
        hooks = {
            "bounced": await queries.create_webhook(
                conn, svc.account_id, url="https://93.184.216.34/b", events=["email.bounced"],
                enabled=True, secret="whsec_AAAA",
            ),
            "all": await queries.create_webhook(
                conn, svc.account_id, url="https://93.184.216.34/a", events=EVENT_TYPES,
                enabled=True, secret="whsec_AAAA",
            ),
            "disabled": await queries.create_webhook(
                conn, svc.account_id, url="https://93.184.216.34/d", events=EVENT_TYPES,
                enabled=False, secret="whsec_AAAA",
            ),
            "other": await queries.create_webhook(
                conn, other_account, url="https://93.184.216.34/o", events=["email.queued"],
                enabled=True, secret="whsec_AAAA",
            ),
        }  # fmt: skip
    for key in (svc.key, other_key):
        r = await svc.http.post("/v1/emails", json=email_body(), headers=svc.auth(key))
        assert r.status_code == 202, r.text
    return {name: w.id for name, w in hooks.items()}


async def test_fan_out_matches_account_type_and_enabled(api_only: Service) -> None:
    service = api_only
    hooks = await _setup_fanout(service)
    publisher = RecordingPublisher()
    done = await fan_out_once(service.deps.db, publisher)
    assert done.complete and done.events == 2 and done.published == 2
    sent = sorted(WebhookMessage.decode(item[1]).webhook_id for item in publisher.items)
    assert sent == sorted([hooks["all"], hooks["other"]])
    assert {item[0] for item in publisher.items} == {"webhooks"}
    # Nothing is published twice: the cursor moved past both events.
    again = await fan_out_once(service.deps.db, publisher)
    assert again.events == 0 and len(publisher.items) == 2


async def test_concurrent_fan_outs_publish_each_message_once(api_only: Service) -> None:
    service = api_only
    await _setup_fanout(service)
    for _ in range(5):
        r = await service.http.post("/v1/emails", json=email_body(), headers=service.auth())
        assert r.status_code == 202
    publisher = RecordingPublisher()
    while True:  # several passes at once, as several webhooks processes would run them
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(partial(fan_out_once, service.deps.db, publisher, batch=2))
        async with service.deps.db.connection() as conn:
            if not await queries.webhook_events_pending(conn):
                break
    ids = [item[2] for item in publisher.items]
    assert len(ids) == len(set(ids)) == 7  # 6 queued events to "all", 1 to "other"


async def test_an_unconfirmed_publish_holds_the_cursor(api_only: Service) -> None:
    service = api_only
    hooks = await _setup_fanout(service)
    failing = RecordingPublisher(refuse=lambda message_id: message_id.endswith(hooks["other"]))
    done = await fan_out_once(service.deps.db, failing)
    assert not done.complete
    # The cursor stopped before the refused event, so the next pass publishes it again.
    retry = RecordingPublisher()
    again = await fan_out_once(service.deps.db, retry)
    assert again.complete
    assert [WebhookMessage.decode(i[1]).webhook_id for i in retry.items] == [hooks["other"]]


async def test_events_committed_late_are_not_skipped(api_only: Service) -> None:
    service = api_only
    """A transaction that took its seq first but commits last is fanned out all the same."""
    hooks = await _setup_fanout(service)
    publisher = RecordingPublisher()
    await fan_out_once(service.deps.db, publisher)
    before = len(publisher.items)
    email_id = (await db_rows(service, "SELECT id FROM emails WHERE account_id = %s LIMIT 1",
                              service.account_id))[0]["id"]  # fmt: skip
    async with service.deps.db.connection() as slow, slow.transaction():
        await slow.execute(
            "INSERT INTO events (email_id, account_id, type) VALUES (%s, %s, 'email.sent')",
            (email_id, service.account_id),
        )
        # A later event, committed while the first is still open.
        async with service.deps.db.connection() as fast:
            await fast.execute(
                "INSERT INTO events (email_id, account_id, type) VALUES (%s, %s, 'email.sent')",
                (email_id, service.account_id),
            )
        held = await fan_out_once(service.deps.db, publisher)
        assert held.events == 0  # the later event waits for the open transaction
    while (await fan_out_once(service.deps.db, publisher)).events:
        pass
    late = [WebhookMessage.decode(i[1]) for i in publisher.items[before:]]
    assert [m.webhook_id for m in late] == [hooks["all"], hooks["all"]]
    assert len({m.event_id for m in late}) == 2


async def test_an_endpoint_failing_for_24_hours_is_disabled(api_only: Service) -> None:
    svc = api_only
    async with svc.deps.db.connection() as conn:
        hook = await queries.create_webhook(
            conn, svc.account_id, url="https://93.184.216.34/h", events=EVENT_TYPES,
            enabled=True, secret="whsec_AAAA",
        )  # fmt: skip

        async def attempt(ok: bool, status: int | None) -> queries.AttemptRecorded | None:
            return await queries.record_webhook_attempt(
                conn, webhook_id=hook.id, event_id="evt_x", event_type="email.sent", attempt=1,
                status_code=status, error=None if ok else "HTTP 500", ok=ok, gone=False,
                disable_after_s=24 * 3600,
            )  # fmt: skip

        async def failing_for(hours: float) -> None:
            await conn.execute(
                "UPDATE webhooks SET failing_since = now() - make_interval(secs => %s)"
                " WHERE id = %s",
                (hours * 3600, hook.id),
            )

        first = await attempt(False, 500)
        assert first == queries.AttemptRecorded(True, False, None)
        await failing_for(23)
        assert await attempt(False, 500) == queries.AttemptRecorded(True, False, None)
        assert await attempt(True, 200) == queries.AttemptRecorded(True, False, None)
        [row] = await db_rows(svc, "SELECT failing_since FROM webhooks")
        assert row["failing_since"] is None  # a success ends the streak

        await attempt(False, None)
        await failing_for(24.1)
        disabled = await attempt(False, 502)
        assert disabled == queries.AttemptRecorded(False, True, "every attempt failed for 24 h")
        again = await attempt(False, 502)  # only the attempt that disabled it says so
        assert again == queries.AttemptRecorded(False, False, "every attempt failed for 24 h")
    assert len(await deliveries(svc, hook.id)) == 6


async def test_dead_lettered_webhook_messages_are_kept_and_the_queue_emptied(
    test_db: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A message on the webhooks queue that is not ours is rejected to `webhooks.dead`; the
    role keeps it in `dead_messages`, logs it, and acks it."""
    async with run_service(settings_for(test_db, prefix), ("webhooks",)) as svc:
        async with ConfirmedPublisher(svc.settings.amqp.url, svc.deps.topology) as publisher:
            await publisher.publish(WEBHOOKS, b"not a webhook message", message_id="junk-1")

        async def kept() -> list[dict[str, Any]]:
            return await db_rows(svc, "SELECT queue, reason, body FROM dead_messages")

        [row] = await poll(kept, within=15, what="the message kept in dead_messages")
        assert row["queue"] == svc.deps.topology.webhooks
        assert bytes(row["body"]) == b"not a webhook message"
        assert "rejected" in row["reason"]
        await poll(
            lambda: queue_depth_is(svc, svc.deps.topology.webhook_dead, 0),
            within=15,
            what="webhooks.dead emptied",
        )
    assert any("not a webhook delivery" in r.getMessage() for r in caplog.records)


async def queue_depth_is(svc: Service, queue: str, depth: int) -> bool:
    return await queue_depth(svc, queue) == depth
