"""The OpenAPI document: complete for the contract's endpoints, OpenAPI 3.1, and true of the
running API (schemathesis, a bounded number of examples per operation, over real HTTP)."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.integration.conftest import Service
from web.schemas import SEND_EXAMPLE

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

# Every endpoint of the contract that exists now: method → path.
CONTRACT = {
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("post", "/v1/emails"),
    ("get", "/v1/emails"),
    ("post", "/v1/emails/batch"),
    ("get", "/v1/emails/{email_id}"),
    ("get", "/v1/emails/{email_id}/events"),
    ("post", "/v1/emails/{email_id}/cancel"),
    ("get", "/v1/suppressions"),
    ("post", "/v1/suppressions"),
    ("delete", "/v1/suppressions/{email}"),
    ("get", "/v1/dead-letters"),
    ("post", "/v1/dead-letters/{letter_id}/replay"),
}
SCHEMAS = {
    "SendEmail",
    "AttachmentIn",
    "EmailAccepted",
    "BatchRequest",
    "BatchResult",
    "Email",
    "EmailList",
    "EventList",
    "Event",
    "ProblemDetails",
    "FieldError",
    "Suppression",
    "SuppressionList",
    "DeadLetter",
    "DeadLetterList",
    "Health",
    "Readiness",
}
SEND_FIELDS = {
    "from_email",
    "to",
    "cc",
    "bcc",
    "reply_to",
    "subject",
    "body_text",
    "body_html",
    "headers",
    "attachments",
    "tags",
    "metadata",
    "scheduled_at",
}


def titles(node: Any) -> Iterator[str]:
    """Every schema title in the document (models are inlined or referenced, either way)."""
    if isinstance(node, dict):
        if isinstance(node.get("title"), str):
            yield node["title"]
        for value in node.values():
            yield from titles(value)
    elif isinstance(node, list):
        for value in node:
            yield from titles(value)


async def test_the_document_covers_the_contract(service: Service) -> None:
    r = await service.http.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1.")
    operations = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert CONTRACT <= operations, CONTRACT - operations
    assert SCHEMAS <= set(titles(doc)), SCHEMAS - set(titles(doc))

    send = doc["components"]["schemas"]["SendEmail"]
    assert set(send["properties"]) == SEND_FIELDS
    assert "from_email" in send["required"] and "subject" in send["required"]
    bodies = [
        op["requestBody"]
        for item in doc["paths"].values()
        for op in item.values()
        if isinstance(op, dict) and "requestBody" in op
    ]
    assert len(bodies) >= 5 and all(b["required"] is True for b in bodies)
    # "string or list": both are documented, as both are accepted.
    for name in ("to", "cc", "bcc", "reply_to"):
        kinds = {alt.get("type") for alt in send["properties"][name]["anyOf"]}
        assert kinds == {"string", "array"}, name
    attachment = doc["components"]["schemas"]["AttachmentIn"]
    assert set(attachment["properties"]) == {"filename", "content", "content_type", "content_id"}

    post = doc["paths"]["/v1/emails"]["post"]
    assert {"202", "409", "413", "422"} <= set(post["responses"])
    for path in ("/v1/emails/{email_id}", "/v1/emails/{email_id}/events"):
        assert "404" in doc["paths"][path]["get"]["responses"]
    cancel = doc["paths"]["/v1/emails/{email_id}/cancel"]["post"]["responses"]
    assert {"200", "404", "409"} <= set(cancel)
    listing = doc["paths"]["/v1/emails"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {
        "limit",
        "after",
        "status",
        "to",
        "tag",
        "since",
        "until",
    }
    assert {"apiKey", "bearer"} <= set(doc["components"]["securitySchemes"])

    r = await service.http.get("/docs")
    assert r.status_code == 200 and "/openapi.json" in r.text


EXAMPLES_PER_OPERATION = 8
CHECKS = [not_a_server_error, response_schema_conformance]


def fuzz(
    doc: dict[str, Any], base_url: str, api_key: str, known: list[tuple[str, str, dict[str, Any]]]
) -> list[str]:
    """Run schemathesis over every operation (in a worker thread: its HTTP client blocks):
    first the `known` requests (method, path, Case fields) that succeed, so that the success
    answers are checked against the document too, then generated ones; the failures, as text."""
    schema = schemathesis.openapi.from_dict(doc)
    session = requests.Session()
    auth = {"X-API-Key": api_key}
    failures: list[str] = []
    for method, path, fields in known:
        case = schema[path][method].Case(**fields)
        try:
            response = case.call_and_validate(
                base_url=base_url, session=session, headers=auth, checks=CHECKS, timeout=10
            )
            assert response.status_code < 300, (method, path, response.status_code, response.text)
        except Exception as exc:
            failures.append(f"{method} {path} {fields}: {exc}")
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,  # the same examples every run: a gate, not a lottery
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            case.call_and_validate(
                base_url=base_url,
                session=session,
                headers=auth,
                checks=CHECKS,
                timeout=10,
            )

        try:
            run()
        except Exception as exc:
            detail = "".join(traceback.format_exception(exc))
            failures.append(f"{operation.method.upper()} {operation.path}: {detail}")
    session.close()
    return failures


# Hypothesis warns when the global `random` state moves while it generates a case; here the
# service in the main thread (retry jitter, ids, the broker client) moves it, not a strategy.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
async def test_schemathesis_finds_no_5xx_and_no_off_schema_answer(service: Service) -> None:
    doc = (await service.http.get("/openapi.json")).json()
    base_url = str(service.http.base_url).rstrip("/")
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    r = await service.http.post(
        "/v1/emails", json={**SEND_EXAMPLE, "scheduled_at": later}, headers=service.auth()
    )
    assert r.status_code == 202, r.text
    email = {"email_id": r.json()["id"]}
    known: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/emails", {"body": SEND_EXAMPLE}),
        ("POST", "/v1/emails/batch", {"body": {"emails": [SEND_EXAMPLE, {"to": "bad"}]}}),
        ("GET", "/v1/emails", {"query": {"limit": 1, "tag": "campaign:shipping"}}),
        ("GET", "/v1/emails/{email_id}", {"path_parameters": email}),
        ("GET", "/v1/emails/{email_id}/events", {"path_parameters": email}),
        ("POST", "/v1/emails/{email_id}/cancel", {"path_parameters": email}),
        ("POST", "/v1/suppressions", {"body": {"email": "Someone@Example.org"}}),
        ("GET", "/v1/suppressions", {}),
        ("GET", "/v1/dead-letters", {}),
        ("GET", "/health", {}),
        ("GET", "/ready", {}),
    ]
    failures = await anyio.to_thread.run_sync(fuzz, doc, base_url, service.key, known)
    assert not failures, "\n\n".join(failures)
