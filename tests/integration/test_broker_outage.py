"""RabbitMQ outages, made with a TCP proxy the test owns (the machine's broker is never touched).

- Unreachable at acceptance: the API still answers 202 for every committed email, at once
  (the publish fails fast, the row stays unpublished: the table is the outbox); once the
  broker is back the sweeper republishes them and each is delivered exactly once.
- Lost while the sender consumes: the sender role crashes on the lost connection, the
  supervisor restarts it with backoff, and once the broker is back every email is delivered.
"""

from __future__ import annotations

import logging
import re
import signal
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from pipeline.resources import topology_for
from tests.integration.conftest import email_body, run_service, settings_for
from tests.procs import (
    accept_directly,
    ensure_account,
    mailpipe_env,
    mailpipe_process,
    new_emails,
    poll,
    statuses,
    wait_all_sent,
)
from tests.smtp_sink import SmtpSink, smtp_sink
from tests.tcp_proxy import tcp_proxy

pytestmark = pytest.mark.anyio

RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
TIMED_OUT = re.compile(r"first: publish (msg_\w+) to '\w+' not confirmed within")
"""The publisher's warning for a publish that waited for its whole timeout."""


def amqp_via(port: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}/"


def sink_env(sink: SmtpSink) -> dict[str, str]:
    return {"SMTP_HOST": sink.host, "SMTP_PORT": str(sink.port)}


async def published(db_url: str, ids: Sequence[str]) -> Counter[bool]:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT published, count(*) FROM emails WHERE id = ANY(%s) GROUP BY published",
            (list(ids),),
        )
        return Counter({flag: n for flag, n in await cur.fetchall()})


def received(sink: SmtpSink) -> Counter[str]:
    return Counter(str(m.message["Message-ID"]) for m in sink.messages)


@pytest.mark.parametrize("outage", ["cut", "hang"])
async def test_api_accepts_while_the_broker_is_down_and_delivers_each_once_after(
    test_db: str,
    prefix: str,
    outage: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    record_property: Any,
) -> None:
    """`cut`: the broker is dead (connections reset, new ones too). `hang`: it is hung or the
    network drops everything (connections stay open, nothing answers), the case where each
    request would wait for the publish timeout; what the proxy held back flows on at the
    restore, so late publishes land as well as the sweeper's republishes.

    The API runs in-process; the senders and the sweeper are another process, started once
    the broker is back, both through the proxy."""
    during_outage = 20
    async with smtp_sink() as sink, tcp_proxy(RABBIT_HOST, RABBIT_PORT) as proxy:
        settings = settings_for(
            test_db,
            prefix,
            RABBITMQ_URL=amqp_via(proxy.port),
            MAILPIPE_RATE_LIMIT_RATE="10000",
            MAILPIPE_RATE_LIMIT_BURST="10000",
            **sink_env(sink),
        )
        async with run_service(settings, roles=("api",)) as api:
            try:

                async def post(subject: str) -> str:
                    r = await api.http.post(
                        "/v1/emails", json=email_body(subject=subject), headers=api.auth()
                    )
                    assert r.status_code == 202, r.text
                    assert r.json()["status"] == "queued"
                    email_id: str = r.json()["id"]
                    return email_id

                # While the broker is there the publish is confirmed right after the answer.
                ids = [await post("before")]

                async def confirmed(email_ids: list[str]) -> bool:
                    return await published(test_db, email_ids) == Counter({True: 1})

                await poll(partial(confirmed, ids), within=5, interval=0.05, what="the publish")

                getattr(proxy, outage)()
                connects_before = proxy.accepted
                latencies: list[float] = []
                outage_ids: list[str] = []
                for n in range(during_outage):
                    began = anyio.current_time()
                    outage_ids.append(await post(f"outage {n}"))
                    latencies.append(anyio.current_time() - began)
                connects = proxy.accepted - connects_before
                waited = len({m for r in caplog.records if (m := TIMED_OUT.search(r.getMessage()))})
                # Committed, not confirmed: the outbox holds them.
                assert await statuses(test_db, outage_ids) == Counter({"queued": during_outage})
                assert await published(test_db, outage_ids) == Counter({False: during_outage})
                # Failing fast: requests do not each try the broker again, nor each wait for
                # its timeout (in the hang, the first one has to, to find out).
                assert connects <= 5, f"{connects} connects for {during_outage} requests"
                assert waited <= 2, f"{waited} of {during_outage} requests waited for the timeout"
                ids += outage_ids
                proxy.restore()

                env = mailpipe_env(test_db, prefix, sink.port, RABBITMQ_URL=amqp_via(proxy.port))
                async with mailpipe_process(
                    env, roles="sender,retry,sweeper", log_path=tmp_path / "workers.log"
                ) as workers:
                    await workers.wait_ready()
                    began = anyio.current_time()
                    await wait_all_sent(test_db, ids, within=45, proc=workers)
                    delivered_s = anyio.current_time() - began

                    # The API's own publisher is back too (its fail-fast window has closed):
                    # an email is marked published within a second of its answer (the
                    # sweeper's republish would take 10 s).
                    async def confirmed_again() -> bool:
                        probe = [await post("after")]
                        try:
                            await poll(partial(confirmed, probe), within=1, what="its publish")
                        except TimeoutError:
                            return False
                        return True

                    await poll(confirmed_again, within=15, interval=0.5, what="API publishes again")
                    workers.signal(signal.SIGTERM)
                    assert await workers.wait() == 0, workers.log_tail()
            finally:
                proxy.restore()  # the teardown needs the broker

    # Exactly once each (the "after" probes may or may not have gone out before the end).
    subjects = Counter(str(m.message["Subject"]) for m in sink.messages)
    expected = ["before", *(f"outage {n}" for n in range(during_outage))]
    assert {s: subjects[s] for s in expected} == dict.fromkeys(expected, 1)
    assert received(sink).most_common(1)[0][1] == 1, "a message was sent twice"
    figures = {
        "outage": outage,
        "accepted_during_outage": during_outage,
        "broker_connects_during_outage": connects,
        "requests_that_waited_for_the_publish_timeout": waited,
        "request_s_max": round(max(latencies), 3),
        "request_s_median": round(sorted(latencies)[len(latencies) // 2], 3),
        "delivered_after_restore_s": round(delivered_s, 2),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"accepting through a broker outage: {figures}")


async def test_sender_recovers_from_a_broker_outage_mid_stream(
    test_db: str, prefix: str, caplog: pytest.LogCaptureFixture, record_property: Any
) -> None:
    """The connection drops while sends are in flight: the sender role crashes, the supervisor
    restarts it, and every email is delivered once the broker is back, without waiting for the
    lease (the production default here): sends cut short give their claim back at once.
    Duplicates are possible (a send cut after the relay had the message) but bounded by the
    sends in flight."""
    caplog.set_level(logging.INFO)
    total = 200
    within_s = 45

    async def slow(envelope: Any, attempt: int) -> None:
        await anyio.sleep(0.02)

    async with smtp_sink(slow) as sink, tcp_proxy(RABBIT_HOST, RABBIT_PORT) as proxy:
        settings = settings_for(
            test_db,
            prefix,
            RABBITMQ_URL=amqp_via(proxy.port),
            **sink_env(sink),
        )
        assert settings.sweeper.lease_s > within_s, "recovery must not rest on the lease"
        account_id = await ensure_account(test_db, "outage")
        emails = new_emails(account_id, (f"outage {n}" for n in range(total)))
        ids = [e.id for e in emails]
        async with run_service(settings, roles=("sender", "retry", "sweeper")):
            try:
                await accept_directly(
                    test_db, amqp_via(RABBIT_PORT), topology_for(settings), emails
                )
                await sink.wait_for(total // 5, timeout=30)
                proxy.cut()

                def crashed() -> int:
                    return sum("role sender crashed" in r.getMessage() for r in caplog.records)

                await poll(crashed, within=30, what="the sender noticing the lost broker")
                at_cut = await statuses(test_db, ids)
                proxy.restore()
                began = anyio.current_time()
                await wait_all_sent(test_db, ids, within=within_s)
                recovery_s = anyio.current_time() - began
            finally:
                proxy.restore()  # the teardown needs the broker

    counts = received(sink)
    assert len(counts) == total, "an email never reached the relay"
    consumers_started = sum(
        r.getMessage().startswith("consuming ") and r.getMessage().split()[1].endswith(".send")
        for r in caplog.records
    )
    figures = {
        "sent_at_cut": at_cut["sent"],
        "sending_at_cut": at_cut["sending"],
        "sender_crashes": crashed(),
        "send_consumers_started": consumers_started,
        "duplicates": sum(n - 1 for n in counts.values()),
        "recovery_s": round(recovery_s, 2),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"broker outage mid-stream: {figures}")
    actors = settings.sender.actors
    assert consumers_started > actors, "the sender never reconnected"
    assert figures["duplicates"] <= actors * settings.sender.concurrency
