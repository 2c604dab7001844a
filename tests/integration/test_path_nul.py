"""A NUL in a path id is a 404 everywhere, never a database error."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Service

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/v1/suppressions/a%00b@example.com"),
        ("POST", "/v1/dead-letters/dlq_%00/replay"),
        ("GET", "/v1/emails/msg_%00"),
        ("DELETE", "/v1/webhooks/wh_%00"),
    ],
)
async def test_nul_in_a_path_is_404(service: Service, method: str, path: str) -> None:
    r = await service.http.request(method, path, headers=service.auth())
    assert r.status_code == 404, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
