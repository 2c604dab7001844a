"""`mailpipe bench`: a tiny run of the real command, end to end (figures are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from tests.integration.conftest import PG_ADMIN, Service
from tests.procs import clean_env

pytestmark = pytest.mark.anyio

TINY = ["--seconds", "0.5", "--warmup", "0.2", "--rounds", "1", "--concurrency", "4"]


async def run_bench(args: list[str], cwd: Path) -> dict[str, Any]:
    """`mailpipe bench ... --json` in a subprocess; its JSON document."""
    env = clean_env({"DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0] + "/emailservice"})
    result = await anyio.run_process(
        [sys.executable, "-m", "pipeline", "bench", *args, "--json"],
        env=env,
        cwd=cwd,
        check=False,
    )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


async def bench_databases() -> set[str]:
    async with await psycopg.AsyncConnection.connect(PG_ADMIN, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'mailpipe_bench_%'"
        )
        return {row[0] for row in await cur.fetchall()}


async def test_a_tiny_bench_measures_everything_and_cleans_up(tmp_path: Path) -> None:
    before = await bench_databases()
    report = await run_bench([*TINY, "--emails", "20"], tmp_path)

    ingest, delivery = report["ingest"], report["delivery"]
    for name in ("hello", "accept"):
        run = ingest[name]
        assert run["ok"] > 0 and run["errors"] == 0, run
        assert run["p50_ms"] <= run["p99_ms"]
    assert ingest["ratio"] > 0

    pipeline, raw = delivery["pipeline"], delivery["raw"]
    assert pipeline["ok"] == 20 and pipeline["errors"] == 0
    assert pipeline["rate"] > 0 and pipeline["p50_ms"] is not None
    assert raw["ok"] == 2 * 20 and raw["errors"] == 0  # the ceiling, before and after
    assert delivery["ratio"] > 0
    # The sink got every message at least once (at-least-once: never fewer).
    assert delivery["sink_received"] >= 20 + 2 * 20

    setup = report["setup"]
    assert [p["what"] for p in setup["processes"]] == ["API", "sender"]
    assert setup["concurrency"] == 4 and setup["emails"] == 20
    # Its database is gone again, and nothing it started is left running.
    assert await bench_databases() == before


async def test_bench_against_a_running_api_measures_ingest_only(
    service: Service, tmp_path: Path
) -> None:
    url = str(service.http.base_url).rstrip("/")
    report = await run_bench([*TINY, "--url", url, "--key", service.key], tmp_path)
    accept = report["ingest"]["accept"]
    assert accept["ok"] > 0
    assert set(accept["error_kinds"]) <= {"429"}  # this key's limit is the test config's
    # This API was not started with MAILPIPE_BENCH_HELLO=1: no ceiling, and the report says so.
    assert report["ingest"]["hello"] is None and report["ingest"]["ratio"] is None
    assert report["delivery"] is None
    assert any("/bench/hello" in note for note in report["notes"])


def test_bench_help_names_every_option() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "bench", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in ("--url", "--sink", "--concurrency", "--seconds", "--emails", "--json"):
        assert option in out
    assert "--processes" in out
