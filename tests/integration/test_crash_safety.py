"""Crash safety with real processes: `mailpipe run` as a subprocess, killed or stopped mid-stream.

- SIGKILL while hundreds of emails are in flight, then a restart: nothing is lost; the only
  duplicates are sends whose relay 250 came before the `sent` commit, so they are bounded by
  the sends in flight at the kill (sender.actors x sender.concurrency). The dead process's
  claims come back when their lease (`sweeper.lease_s`, short here) runs out.
- SIGTERM while emails are in flight: the process drains what it holds and exits 0; nothing is
  left in `sending`, and nothing is sent twice.

The relay is an aiosmtpd sink in the test's loop that takes a little time over each DATA (a
slow relay), so that many sends are in flight when the process dies.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from pipeline.resources import topology_for
from tests.integration.conftest import email_body, settings_for
from tests.procs import (
    accept_directly,
    delete_topology,
    ensure_account,
    mailpipe_env,
    mailpipe_process,
    new_emails,
    statuses,
    wait_all_sent,
)
from tests.smtp_sink import SmtpSink, smtp_sink

pytestmark = pytest.mark.anyio

ACTORS = 2
CONCURRENCY = 20
IN_FLIGHT_BOUND = ACTORS * CONCURRENCY
LEASE_S = 3
"""Short, so that the dead sender's claims come back within the test."""


def worker_env(db_url: str, prefix: str, sink: SmtpSink, **extra: str) -> dict[str, str]:
    """A subprocess's environment: this test's database, queues and sink; a short lease."""
    return mailpipe_env(
        db_url,
        prefix,
        sink.port,
        MAILPIPE_SENDER_ACTORS=str(ACTORS),
        MAILPIPE_SENDER_CONCURRENCY=str(CONCURRENCY),
        MAILPIPE_SWEEPER_LEASE_S=str(LEASE_S),
        **extra,
    )


def slow_relay(data_s: float) -> Any:
    """A sink script: every DATA takes `data_s` before its 250 (a relay that is not instant)."""

    async def script(envelope: Any, attempt: int) -> None:
        await anyio.sleep(data_s)

    return script


def received(sink: SmtpSink) -> Counter[str]:
    """How many times the sink accepted each Message-ID."""
    return Counter(str(m.message["Message-ID"]) for m in sink.messages)


def duplicates(counts: Mapping[str, int]) -> int:
    return sum(n - 1 for n in counts.values())


async def test_kill_9_mid_stream_loses_nothing_and_bounds_duplicates(
    test_db: str, prefix: str, tmp_path: Path, record_property: Any
) -> None:
    emails_total = 500
    settings = settings_for(test_db, prefix)
    topology = topology_for(settings)
    async with smtp_sink(slow_relay(0.02)) as sink:
        try:
            account_id = await ensure_account(test_db, "crash-safety")
            emails = new_emails(account_id, (f"crash {n}" for n in range(emails_total)))
            await accept_directly(test_db, settings.amqp.url, topology, emails)
            ids = [e.id for e in emails]
            env = worker_env(
                test_db,
                prefix,
                sink,
                # as many relay connections as sends in flight: the widest duplicate window
                MAILPIPE_SMTP_POOL_SIZE=str(IN_FLIGHT_BOUND),
            )

            async with mailpipe_process(
                env, roles="sender,retry,sweeper", log_path=tmp_path / "first.log"
            ) as first:
                await first.wait_ready()
                await sink.wait_for(emails_total // 5, timeout=60)
                first.kill()
                killed_at = anyio.current_time()
                assert await first.wait() == -signal.SIGKILL

            at_kill = await statuses(test_db, ids)
            sink_at_kill = len(sink.messages)
            in_flight = at_kill["sending"]
            assert at_kill["sent"] < emails_total, "everything was sent before the kill"
            assert in_flight > 0, f"nothing was in flight at the kill: {at_kill}"

            async with mailpipe_process(
                env, roles="sender,retry,sweeper", log_path=tmp_path / "second.log"
            ) as second:
                await second.wait_ready()
                await wait_all_sent(test_db, ids, within=60, proc=second)
                recovery_s = anyio.current_time() - killed_at
                second.signal(signal.SIGTERM)
                assert await second.wait() == 0, second.log_tail()
            reclaimed = second.log().count("reclaimed ")
        finally:
            await delete_topology(settings.amqp.url, topology)

    counts = received(sink)
    assert set(counts) == {e.message_id for e in emails}, "an email never reached the relay"
    dup = duplicates(counts)
    figures = {
        "emails": emails_total,
        "sent_before_kill": at_kill["sent"],
        "sink_received_at_kill": sink_at_kill,
        "in_flight_at_kill": in_flight,
        "duplicates": dup,
        "recovery_s": round(recovery_s, 2),
        "reclaim_sweeps": reclaimed,
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"kill -9 mid-stream: {figures}")
    assert dup <= in_flight <= IN_FLIGHT_BOUND, figures
    # Each message the relay had without its `sent` commit went out again: the count is real.
    assert dup >= sink_at_kill - at_kill["sent"], figures


async def test_sigterm_drains_in_flight_and_exits_zero(
    test_db: str, prefix: str, tmp_path: Path, record_property: Any
) -> None:
    """`mailpipe run` with every role, SIGTERM while sends are in flight: the sends in hand
    finish (nothing is left `sending`), the process exits 0, and after a restart every email
    is `sent`, none of them twice."""
    emails_total = 100
    settings = settings_for(test_db, prefix)
    topology = topology_for(settings)
    # 4 relay connections at 0.2 s a message: the 100 take 5 s, so many are in flight.
    async with smtp_sink(slow_relay(0.2)) as sink:
        env = worker_env(
            test_db,
            prefix,
            sink,
            MAILPIPE_SMTP_POOL_SIZE="4",
            MAILPIPE_RATE_LIMIT_RATE="10000",
            MAILPIPE_RATE_LIMIT_BURST="10000",
        )
        try:
            async with mailpipe_process(env, roles=None, log_path=tmp_path / "all.log") as proc:
                port = await proc.api_port()
                await proc.wait_ready()
                ids: list[str] = []
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}",
                    headers={"X-API-Key": "sk_test_demo123456789"},
                    timeout=10,
                ) as http:
                    r = await http.get("/health")
                    assert r.status_code == 200, r.text

                    async def post(n: int) -> None:
                        r = await http.post("/v1/emails", json=email_body(subject=f"term {n}"))
                        assert r.status_code == 202, r.text
                        ids.append(r.json()["id"])

                    async with anyio.create_task_group() as tg:
                        for n in range(emails_total):
                            tg.start_soon(post, n)
                await sink.wait_for(5, timeout=30)
                before = await statuses(test_db, ids)
                assert before["sending"] > 0, f"nothing in flight at the SIGTERM: {before}"
                proc.signal(signal.SIGTERM)
                code = await proc.wait(30)
                assert code == 0, proc.log_tail()
            after = await statuses(test_db, ids)
            assert after["sending"] == 0, f"a send was abandoned mid-way: {after}"
            assert set(after) <= {"queued", "sent"}, after
            assert after["sent"] == len(sink.messages)

            # What the stopped process had not started waits in the queue for the next one.
            async with mailpipe_process(
                env, roles="sender,retry,sweeper", log_path=tmp_path / "again.log"
            ) as again:
                await again.wait_ready()
                await wait_all_sent(test_db, ids, within=60, proc=again)
                again.signal(signal.SIGTERM)
                assert await again.wait(30) == 0, again.log_tail()
        finally:
            await delete_topology(settings.amqp.url, topology)

    counts = received(sink)
    figures = {
        "sending_at_sigterm": before["sending"],
        "sent_at_sigterm": before["sent"],
        "sent_by_the_stopping_process": after["sent"],
        "duplicates": duplicates(counts),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"SIGTERM mid-stream: {figures}")
    assert len(ids) == emails_total
    assert sorted(counts.values()) == [1] * emails_total, figures
    subjects = sorted(m.message["Subject"] for m in sink.messages)
    assert subjects == sorted(f"term {n}" for n in range(emails_total))
