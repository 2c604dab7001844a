"""`POST /v1/emails` with every field, through the real pipeline into an SMTP sink, parsed back
with the standard library; hostile input through the real API; 413; reading and listing."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import anyio
import pytest

from tests.integration.conftest import Service, email_body, run_service, settings_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PROBLEM = "application/problem+json"
PDF = b"%PDF-1.4\n" + os.urandom(40_000) + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3_000)
NOTES = "naïve café notes\r\nline two\n".encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def every_field() -> dict[str, Any]:
    return {
        "from": "Zoë Ünïcode <sender@example.com>",
        "to": ["Åsa Öberg <asa@example.org>", "bob@example.org"],
        "cc": '"Carol, from Accounts" <carol@example.org>',
        "bcc": ["secret@example.org"],
        "reply_to": "Support Team <help@example.com>",
        "subject": "Grüße aus Köln — 日本語 ✉ and a long tail that makes it fold past 78 columns",
        "body_text": "Hello Åsa,\nyour order is on its way.\n",
        "body_html": '<p>Hello Åsa,</p><p><img src="cid:logo@mailpipe.test" alt="logo"></p>',
        "headers": {
            "X-Entity-Ref-ID": "order-42",
            "List-Unsubscribe": "<https://example.com/unsubscribe/42>",
        },
        "attachments": [
            {"filename": "invoice.pdf", "content": b64(PDF)},  # type guessed from the name
            {"filename": "naïve notes.txt", "content": b64(NOTES), "content_type": "text/plain"},
            {
                "filename": "logo.png",
                "content": b64(PNG),
                "content_type": "image/png",
                "content_id": "logo@mailpipe.test",
            },
        ],
        "tags": {"campaign": "welcome", "tier": "gold"},
        "metadata": {"order": 42, "nested": {"items": [1, "ü", None, True]}, "note": "as given"},
    }


async def post(service: Service, body: Any, **headers: str) -> Any:
    return await service.http.post("/v1/emails", json=body, headers=service.auth() | headers)


async def test_every_field_round_trips_through_the_pipeline(service: Service) -> None:
    sink = service.extra["sink"]
    body = every_field()
    r = await post(service, body)
    assert r.status_code == 202, r.text
    email_id = r.json()["id"]
    await service.wait_status(email_id, "sent")
    [got] = await sink.wait_for(1)

    # The envelope: every recipient once, Bcc only here.
    assert got.mail_from == "sender@example.com"
    assert sorted(got.rcpt_tos) == [
        "asa@example.org",
        "bob@example.org",
        "carol@example.org",
        "secret@example.org",
    ]
    assert b"secret" not in got.raw
    msg: EmailMessage = got.message
    assert msg["Bcc"] is None

    # Headers, decoded by the standard library.
    [sender] = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Zoë Ünïcode", "sender@example.com")
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == [
        ("Åsa Öberg", "asa@example.org"),
        ("", "bob@example.org"),
    ]
    assert [(a.display_name, a.addr_spec) for a in msg["Cc"].addresses] == [
        ("Carol, from Accounts", "carol@example.org")
    ]
    assert [(a.display_name, a.addr_spec) for a in msg["Reply-To"].addresses] == [
        ("Support Team", "help@example.com")
    ]
    assert str(msg["Subject"]) == body["subject"]
    assert msg["X-Entity-Ref-ID"] == "order-42"
    assert msg["List-Unsubscribe"] == "<https://example.com/unsubscribe/42>"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@example.com>")
    assert msg["Date"].datetime.tzinfo is not None
    assert msg["MIME-Version"] == "1.0"
    assert all(len(line) <= 998 for line in got.raw.split(b"\r\n"))
    assert got.raw.isascii()

    # Structure: mixed(alternative(text, related(html, inline png)), pdf, txt).
    assert msg.get_content_type() == "multipart/mixed"
    content, *files = msg.iter_parts()
    assert content.get_content_type() == "multipart/alternative"
    text, related = content.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert text.get_content().replace("\r\n", "\n") == body["body_text"]
    assert related.get_content_type() == "multipart/related"
    html, inline = related.iter_parts()
    assert html.get_content_type() == "text/html"
    assert html.get_content().strip() == body["body_html"]
    assert msg.get_body(("plain",)) is not None and msg.get_body(("html",)) is not None

    # The inline image: referenced by cid from the HTML beside it.
    assert inline.get_content_type() == "image/png"
    assert inline["Content-ID"] == "<logo@mailpipe.test>"
    assert inline.get_content_disposition() == "inline"
    assert inline.get_content() == PNG
    assert "cid:" + inline["Content-ID"].strip("<>") in html.get_content()

    # The files: byte-identical, names decoded, types as given or guessed.
    described = [
        (f.get_filename(), f.get_content_type(), f.get_content_disposition()) for f in files
    ]
    assert described == [
        ("invoice.pdf", "application/pdf", "attachment"),
        ("naïve notes.txt", "text/plain", "attachment"),
    ]
    assert files[0].get_payload(decode=True) == PDF
    assert files[1].get_payload(decode=True) == NOTES

    # Reading it back: tags and metadata as given; bodies and attachments not echoed.
    r = await service.http.get(f"/v1/emails/{email_id}", headers=service.auth())
    assert r.status_code == 200, r.text
    stored = r.json()
    assert stored["tags"] == body["tags"]
    assert stored["metadata"] == body["metadata"]
    assert stored["subject"] == body["subject"]
    assert stored["from_email"] == "Zoë Ünïcode <sender@example.com>"
    assert [s.rpartition("<")[2].rstrip(">") for s in stored["to"]] == [
        "asa@example.org",
        "bob@example.org",
    ]
    assert stored["bcc"] == ["secret@example.org"]
    assert stored["scheduled_at"] is None
    assert stored["attempts"] == 1 and stored["sent_at"] is not None
    assert not {"body_text", "body_html", "attachments", "content", "raw"} & set(stored)

    r = await service.http.get(f"/v1/emails/{email_id}/events", headers=service.auth())
    timeline = r.json()["data"]
    assert [e["type"] for e in timeline] == ["email.queued", "email.sending", "email.sent"]
    assert all(e["id"].startswith("evt_") and e["created_at"].endswith("Z") for e in timeline)
    assert timeline[2]["data"]["response"]["code"] == 250


async def test_header_lines_are_exactly_the_expected_ones(service: Service) -> None:
    """Hostile strings that validation lets through (Unicode line separators, other controls,
    encoded-word look-alikes, SMTP-smuggling bodies) arrive as one message whose header block
    holds only the lines mailpipe writes."""
    sink = service.extra["sink"]
    sent = [
        email_body(subject="a\u2028Bcc: victim@evil.test\u2029X-Injected: 1"),
        email_body(
            from_email="\x85X-Injected: 1\x0b <sender@example.com>",
            headers={"X-Note": "a\x0bX-Injected: 1\x0cb\x1b", "X-Enc": "=?utf-8?q?X-Injected:?="},
        ),
        email_body(
            body_text="line\r\n.\r\nMAIL FROM:<evil@evil.test>\r\nRCPT TO:<v@evil.test>\r\n"
            "DATA\r\nX-Injected: 1\r\n\r\nhi\r\n.\r\n\n.\n\r.\r",
            subject="smuggle",
        ),
        email_body(
            body_html="<p>x</p>",
            attachments=[
                {
                    "filename": "x\u2028Content-Type: text/html.txt",
                    "content": b64(b"hi"),
                    "content_id": "id!#$%&'*+/=?^_`{|}~@x",
                }
            ],
        ),
    ]
    ids = []
    for body in sent:
        r = await post(service, body)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    for email_id in ids:
        await service.wait_status(email_id, "sent")
    received = await sink.wait_for(len(sent))
    assert len(sink.messages) == len(sent)  # nothing split into two messages
    expected = {
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "x-note",
        "x-enc",
    }
    for got in received:
        assert got.rcpt_tos == ("rcpt@example.org",)
        assert got.mail_from == "sender@example.com"
        names = [k.lower() for k in got.message.keys()]
        assert set(names) <= expected, names
        assert len(names) == len(set(names))
        block = b"\r\n" + got.raw.split(b"\r\n\r\n", 1)[0].lower()
        assert b"\r\nx-injected" not in block and b"\r\nbcc" not in block
        for part in got.message.walk():
            if part is not got.message:
                assert {k.lower() for k in part.keys()} <= {
                    "content-type",
                    "content-transfer-encoding",
                    "content-disposition",
                    "content-id",
                }
    smuggled = next(m for m in received if m.message["Subject"] == "smuggle")
    assert "MAIL FROM:<evil@evil.test>" in smuggled.message.get_content()


async def test_hostile_input_is_a_4xx_never_a_5xx(service: Service) -> None:
    """Each of these once reached PostgreSQL and came back as a 500."""
    cases: list[tuple[str, int, str | None]] = [
        (json.dumps(email_body(subject="a\r\nBcc: v@evil.test")), 422, "subject"),
        (json.dumps(email_body(body_text="nul \x00 byte")), 422, "body_text"),
        (json.dumps(email_body(body_html="lone \ud800 surrogate")), 422, "body_html"),
        (json.dumps(email_body(to="Lone \udc00 <a@example.org>")), 422, "to[0]"),
        (json.dumps(email_body(tags={"t": "\ud800"})), 422, "tags"),
        (json.dumps(email_body(metadata={"k\x00": "v"})), 422, "metadata"),
        (json.dumps(email_body(headers={"X-A\n": "v"})), 422, "headers"),
        (json.dumps(email_body(headers={"X-A": "v\r\nBcc: x@evil.test"})), 422, "headers.X-A"),
        ('{"from_email": "a@example.com", "metadata": {"x": NaN}}', 400, None),
        ('{"metadata": ' + "[" * 5000 + "]" * 5000 + "}", 400, None),
    ]
    for raw, status, field in cases:
        r = await service.http.post(
            "/v1/emails",
            content=raw.encode(),
            headers=service.auth() | {"Content-Type": "application/json"},
        )
        assert r.status_code == status, (raw[:80], r.text)
        assert r.headers["content-type"].startswith(PROBLEM)
        if field is not None:
            assert field in {e["field"] for e in r.json()["errors"]}, r.json()

    for path in ("/v1/emails/%00", "/v1/emails/a%00b/events", "/v1/emails/%ED%A0%80"):
        r = await service.http.get(path, headers=service.auth())
        assert r.status_code == 404, (path, r.text)
    r = await service.http.post("/v1/emails/msg_%00/cancel", headers=service.auth())
    assert r.status_code == 404
    for params in ({"tag": "a:\x00"}, {"to": "\x00"}, {"tag": "a"}, {"status": "lost"}):
        r = await service.http.get("/v1/emails", params=params, headers=service.auth())
        assert r.status_code == 422, (params, r.text)
    cursors = [
        base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00+00:00", bad]).encode())
        for bad in ("a\x00", "\ud800")
    ] + [base64.urlsafe_b64encode(b"[" * 3000)]
    for cursor in cursors:
        r = await service.http.get(
            "/v1/emails", params={"after": cursor.decode()}, headers=service.auth()
        )
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == "after"


@pytest.fixture
async def small_service(test_db: str, prefix: str, sink: Any) -> AsyncIterator[Service]:
    settings = settings_for(
        test_db,
        prefix,
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(sink.port),
        MAILPIPE_API_MAX_REQUEST_BYTES="4096",
    )
    async with run_service(settings, roles=("api",)) as svc:
        yield svc


async def test_a_body_over_max_request_bytes_is_413(small_service: Service) -> None:
    service = small_service
    assert service.settings.api.max_request_bytes == 4096
    small = email_body(body_text="x" * 1000)
    r = await post(service, small)
    assert r.status_code == 202, r.text

    big = email_body(body_text="x" * 5000)
    r = await post(service, big)
    assert r.status_code == 413, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["status"] == 413

    # Without a Content-Length (chunked): refused once the limit is passed. (Kept small, so
    # the server has it all before it answers: a client still sending would see a reset.)
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"from_email": "a@example.com", "body_text": "'
        for _ in range(5):
            yield b"x" * 1000
        yield b'"}'

    r = await service.http.post(
        "/v1/emails",
        content=chunks(),
        headers=service.auth() | {"Content-Type": "application/json"},
    )
    assert r.status_code == 413, r.text

    r = await service.http.post("/v1/emails/batch", json={"emails": [big]}, headers=service.auth())
    assert r.status_code == 413, r.text


async def test_string_or_list_and_the_from_alias(service: Service) -> None:
    r = await post(
        service,
        {
            "from": "a@example.com",
            "to": "One <one@example.org>",
            "cc": ["two@example.org"],
            "bcc": "three@example.org",
            "reply_to": ["r1@example.org", "R2 <r2@example.org>"],
            "subject": "forms",
            "body_html": "<b>html only</b>",
        },
    )
    assert r.status_code == 202, r.text
    email = await service.wait_status(r.json()["id"], "sent")
    assert email["to"] == ["One <one@example.org>"]
    assert email["cc"] == ["two@example.org"] and email["bcc"] == ["three@example.org"]
    [got] = await service.extra["sink"].wait_for(1)
    assert got.message.get_content_type() == "text/html"
    assert [a.addr_spec for a in got.message["Reply-To"].addresses] == [
        "r1@example.org",
        "r2@example.org",
    ]


async def list_ids(service: Service, **params: Any) -> list[str]:
    r = await service.http.get("/v1/emails", params=params, headers=service.auth())
    assert r.status_code == 200, r.text
    return [e["id"] for e in r.json()["data"]]


async def test_list_filters(service: Service) -> None:
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()

    async def send(**fields: Any) -> str:
        r = await post(service, email_body(**fields))
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    a = await send(to="Ann <Ann@Example.org>", tags={"campaign": "spring", "tier": "gold"})
    b = await send(to="bob@example.org", cc="ann@example.org", tags={"campaign": "autumn"})
    c = await send(
        to="carol@example.org",
        bcc="ANN@example.org",
        tags={"campaign": "spring"},
        scheduled_at=later,
    )
    d = await send(to="dave@bücher.example", scheduled_at=later)
    r = await service.http.post(f"/v1/emails/{d}/cancel", headers=service.auth())
    assert r.status_code == 200, r.text
    await service.wait_status(a, "sent")
    await service.wait_status(b, "sent")

    assert await list_ids(service) == [d, c, b, a]
    assert await list_ids(service, status="sent") == [b, a]
    assert await list_ids(service, status="scheduled") == [c]
    assert await list_ids(service, status="canceled") == [d]
    assert await list_ids(service, status="bounced") == []
    # `to` finds an address in to, cc or bcc, whatever its case or display name.
    assert await list_ids(service, to="ann@example.org") == [c, b, a]
    assert await list_ids(service, to="Someone <ANN@EXAMPLE.ORG>") == [c, b, a]
    assert await list_ids(service, to="dave@xn--bcher-kva.example") == [d]
    assert await list_ids(service, to="nobody@example.org") == []
    assert await list_ids(service, tag="campaign:spring") == [c, a]
    assert await list_ids(service, tag="tier:gold") == [a]
    assert await list_ids(service, tag="campaign:spr") == []
    both = {"tag": "campaign:spring", "status": "sent", "to": "ann@example.org"}
    assert await list_ids(service, **both) == [a]

    emails = {
        e["id"]: e
        for e in (await service.http.get("/v1/emails", headers=service.auth())).json()["data"]
    }
    b_created = emails[b]["created_at"]
    assert await list_ids(service, since=b_created) == [d, c, b]
    assert await list_ids(service, until=b_created) == [a]
    assert await list_ids(service, since=b_created, until=emails[d]["created_at"]) == [c, b]
    assert await list_ids(service, since=later) == []

    # Filters and a cursor together: pages of one.
    seen, after = [], None
    while True:
        params: dict[str, Any] = {"to": "ann@example.org", "limit": 1}
        if after:
            params["after"] = after
        r = await service.http.get("/v1/emails", params=params, headers=service.auth())
        page = r.json()
        seen += [e["id"] for e in page["data"]]
        after = page["next_cursor"]
        if not page["has_more"]:
            break
    assert seen == [c, b, a]


async def test_pagination_stays_exact_while_emails_arrive(service: Service) -> None:
    async def send(n: int) -> str:
        r = await post(service, email_body(subject=f"n={n}"))
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    before = [await send(n) for n in range(11)]
    seen: list[str] = []
    after: str | None = None
    arrived: list[str] = []
    for round_ in range(10):
        params: dict[str, Any] = {"limit": 3} | ({"after": after} if after else {})
        r = await service.http.get("/v1/emails", params=params, headers=service.auth())
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [e["id"] for e in page["data"]]

        # New emails between pages, concurrently: they are newer than every page's rows.
        async def one(n: int) -> None:
            arrived.append(await send(n))

        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(one, 100 * round_ + n)
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        after = page["next_cursor"]
    assert seen == list(reversed(before))  # nothing skipped, nothing repeated
    assert not set(arrived) & set(seen)
    everything = await list_ids(service, limit=100)
    assert everything[-len(before) :] == list(reversed(before))
    assert set(everything) == set(before) | set(arrived)


async def test_events_timeline_of_a_scheduled_then_canceled_email(service: Service) -> None:
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    r = await post(service, email_body(scheduled_at=later))
    assert r.status_code == 202 and r.json()["status"] == "scheduled"
    email_id = r.json()["id"]
    r = await service.http.post(f"/v1/emails/{email_id}/cancel", headers=service.auth())
    assert r.status_code == 200
    r = await service.http.get(f"/v1/emails/{email_id}/events", headers=service.auth())
    assert r.status_code == 200
    events = r.json()["data"]
    assert [e["type"] for e in events] == ["email.scheduled", "email.canceled"]
    assert events[0]["created_at"] <= events[1]["created_at"]
    other, _ = await service.new_key("someone-else")
    r = await service.http.get(f"/v1/emails/{email_id}/events", headers=service.auth(other))
    assert r.status_code == 404
