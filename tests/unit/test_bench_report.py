"""The bench's CPU cost per request and per email (shares of a core divided by the rate), and
its count of rate-limiter fallbacks in the API's log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.bench.report import Report, cost_lines, cpu_ms_per_item
from pipeline.bench.run import limiter_fallbacks
from pipeline.ratelimit import RateLimiter


def report() -> Report:
    setup = {
        "cpus": 2,
        "python": "3.11",
        "uvloop": True,
        "processes": [],
        "cpu_by_phase": {
            "hello": {"api": 0.96, "load": 0.12, "other": 0.05, "machine": 1.13},
            "ingest": {"api": 0.9, "postgres": 0.1, "redis": 0.001, "machine": 1.0},
            "backlog": {"api": 0.8},
            "delivery": {"sender": 0.75, "sink": 0.3},
        },
    }
    return Report(
        setup=setup,
        ingest={"hello": {"rate": 2000.0}, "accept": {"rate": 750.0}},
        delivery={"pipeline": {"rate": 1000.0}, "raw": None},
    )


def test_shares_divide_by_the_phase_rate() -> None:
    costs = cpu_ms_per_item(report())
    assert costs["hello"] == pytest.approx({"api": 0.48, "load": 0.06})
    assert costs["ingest"] == pytest.approx({"api": 1.2, "postgres": 0.1333333})
    assert costs["delivery"] == pytest.approx({"sender": 0.75, "sink": 0.3})
    # No rate for the backlog phase (it is not measured) nor for a ceiling that did not run.
    assert set(costs) == {"hello", "ingest", "delivery"}


def test_the_table_and_the_json_show_them() -> None:
    r = report()
    assert r.as_json()["cpu_ms_per_item"]["ingest"]["api"] == pytest.approx(1.2)
    assert "  ingest    api 1.20, postgres 0.13, all 1.33" in cost_lines(r)


def test_limiter_fallbacks_are_counted_from_the_api_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline.ratelimit")
    limiter = RateLimiter(None, prefix="x:", timeout_s=0.05)
    limiter._failed("no answer within 50 ms", 0)  # what an outage's start logs
    log = tmp_path / "api-1.log"
    log.write_text("\n".join([r.getMessage() for r in caplog.records] * 2) + "\n")
    assert limiter_fallbacks(log) == 2
    assert limiter_fallbacks(tmp_path / "missing.log") == 0
