"""`mailpipe run --processes 2` as a real subprocess: two children share the API port and send,
a killed child comes back, SIGTERM stops everything with exit 0, a killed parent leaves no child.

Each test has its own database, queue prefix and SMTP sink; every wait polls with a deadline.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from pipeline.keys import DEMO_KEY
from pipeline.resources import topology_for
from tests.integration.conftest import email_body, settings_for
from tests.procs import (
    MailpipeProcess,
    alive,
    child_processes,
    delete_topology,
    mailpipe_env,
    mailpipe_process,
    poll,
    wait_all_sent,
)
from tests.smtp_sink import SmtpSink

pytestmark = pytest.mark.anyio

ROLES = "api,sender,retry,sweeper"


@asynccontextmanager
async def two_processes(
    test_db: str, prefix: str, sink: SmtpSink, log_path: Path, roles: str = ROLES
) -> AsyncIterator[MailpipeProcess]:
    """`mailpipe run --processes 2 --roles roles`, both children ready; the topology removed
    on the way out."""
    env = mailpipe_env(
        test_db,
        prefix,
        sink.port,
        MAILPIPE_RATE_LIMIT_RATE="1000",
        MAILPIPE_RATE_LIMIT_BURST="1000",
    )
    settings = settings_for(test_db, prefix)
    try:
        async with mailpipe_process(
            env, roles=roles, log_path=log_path, args=["--processes", "2"]
        ) as proc:
            await wait_ready(proc, 2)
            yield proc
    finally:
        await delete_topology(settings.amqp.url, topology_for(settings))


async def wait_ready(proc: MailpipeProcess, count: int) -> None:
    """Until `count` children have logged their readiness (the parent logs no such line)."""

    def ready() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"mailpipe exited ({proc.returncode}):\n{proc.log_tail()}")
        return len(re.findall(r"^\[p\d\] .*mailpipe ready: ", proc.log(), re.M)) >= count

    try:
        await poll(ready, within=60, what=f"{count} children ready")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{proc.log_tail()}") from None


def api_children(proc: MailpipeProcess) -> dict[int, str]:
    return {pid: cmd for pid, cmd in child_processes(proc.pid).items() if f"--roles {ROLES}" in cmd}


async def two_api_children(proc: MailpipeProcess, *, without: int | None = None) -> dict[int, str]:
    def found() -> dict[int, str] | None:
        children = api_children(proc)
        return children if len(children) == 2 and without not in children else None

    children: dict[int, str] = await poll(found, within=30, what="two API child processes")
    return children


async def post_emails(port: int, count: int, tag: str) -> list[str]:
    """`count` emails, each on a connection of its own (the kernel picks a child for each)."""
    ids = []
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=10, limits=limits
    ) as http:
        for n in range(count):
            r = await http.post(
                "/v1/emails",
                json=email_body(subject=f"{tag} {n}"),
                headers={"X-API-Key": DEMO_KEY},
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
    return ids


async def stop_cleanly(proc: MailpipeProcess, children: dict[int, str]) -> None:
    proc.signal(signal.SIGTERM)
    assert await proc.wait(30) == 0, proc.log_tail()
    assert "every process exited cleanly" in proc.log()
    assert not [pid for pid in children if alive(pid)], "a child outlived the parent"


async def test_two_processes_share_the_api_port_deliver_and_stop_with_exit_0(
    test_db: str, prefix: str, sink: SmtpSink, tmp_path: Path
) -> None:
    async with two_processes(test_db, prefix, sink, tmp_path / "run.log") as proc:
        children = await two_api_children(proc)
        listening = re.findall(
            r"^\[p(\d)\] .*API listening on http://127\.0\.0\.1:(\d+)$", proc.log(), re.M
        )
        assert sorted(p for p, _ in listening) == ["1", "2"], listening
        assert len({port for _, port in listening}) == 1, "the children listen on one port"
        port = int(listening[0][1])

        ids = await post_emails(port, 10, "shared port")
        await wait_all_sent(test_db, ids, within=30, proc=proc)
        await sink.wait_for(len(ids), timeout=10)

        await stop_cleanly(proc, children)


async def test_a_killed_child_is_restarted_and_the_service_keeps_answering(
    test_db: str, prefix: str, sink: SmtpSink, tmp_path: Path
) -> None:
    async with two_processes(test_db, prefix, sink, tmp_path / "run.log") as proc:
        port = await proc.api_port()
        before = await two_api_children(proc)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)

        after = await two_api_children(proc, without=victim)
        assert len(set(after) - set(before)) == 1, (before, after)
        await proc.wait_log(
            rf"process \d \(pid {victim}\) killed by SIGKILL after [\d.]+ s; restarting"
        )
        await wait_ready(proc, 3)

        ids = await post_emails(port, 5, "after the kill")
        await wait_all_sent(test_db, ids, within=30, proc=proc)

        await stop_cleanly(proc, after)


async def test_a_killed_parent_leaves_no_child_behind(
    test_db: str, prefix: str, sink: SmtpSink, tmp_path: Path
) -> None:
    async with two_processes(test_db, prefix, sink, tmp_path / "run.log", roles="sender") as proc:
        children = await poll(
            lambda: c if len(c := child_processes(proc.pid)) == 2 else None,
            within=30,
            what="two children",
        )
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL
        await poll(
            lambda: not [pid for pid in children if alive(pid)],
            within=30,
            what="the children exit after their parent was killed",
        )
