"""Fixtures shared by every test: the anyio backend and a per-run unique name."""

from __future__ import annotations

import secrets

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def run_id() -> str:
    """A short random name for this test run: database names and queue prefixes derive from it."""
    return "t" + secrets.token_hex(4)
