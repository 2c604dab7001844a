"""Helpers for tests that run `mailpipe run` as a real subprocess and break it for real.

    async with mailpipe_process(env, roles="sender,sweeper", log_path=tmp_path / "a.log") as p:
        await p.wait_ready()
        p.kill()                      # SIGKILL: no cleanup of any kind
        assert await p.wait(30) == -9

The process gets a clean environment (the caller's MAILPIPE_* and seed variables are dropped,
so only what the test passes counts), its stderr goes to a file (a pipe nobody reads could fill
and stall it), and it is killed on the way out whatever happened. Waits poll with a deadline.

Also here: direct access to the test's database (statuses, inserting and publishing emails
without the API) and cleanup of the AMQP topology a subprocess declared.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psycopg

from pipeline.amqp.connection import connect
from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.amqp.topology import SEND, Topology, delete_all
from pipeline.ids import new_id
from pipeline.mail.render import new_message_id
from pipeline.messages import encode_send
from pipeline.store import queries

POLL_S = 0.05
"""Interval between two looks at a condition that has no event to wait on."""

_SEED_VARS = {
    "DATABASE_URL",
    "RABBITMQ_URL",
    "REDIS_URL",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_USER",
    "SMTP_PASS",
    "PORT",
}
_LISTENING = re.compile(r"API listening on http://([^:\s]+):(\d+)")


def mailpipe_env(db_url: str, prefix: str, smtp_port: int, **extra: str) -> dict[str, str]:
    """Settings for a `mailpipe run` subprocess: this test's database, queue prefix and relay,
    any free API port (read it back with `api_port()`), the test suite's short retry tiers."""
    return {
        "DATABASE_URL": db_url,
        "MAILPIPE_AMQP_PREFIX": prefix,
        "MAILPIPE_REDIS_PREFIX": prefix,
        "MAILPIPE_API_PORT": "0",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "MAILPIPE_SWEEPER_INTERVAL_S": "0.5",
        "MAILPIPE_SHUTDOWN_GRACE_S": "10",
        "MAILPIPE_RETRY_TIERS_S": "1,2,4",
        "MAILPIPE_RETRY_BASE_DELAY_S": "1",
        "MAILPIPE_RETRY_MAX_DELAY_S": "4",
        **extra,
    }


def clean_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """The current environment minus every mailpipe setting, plus `overrides`."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_") and k not in _SEED_VARS
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


async def poll(condition: Any, *, within: float, what: str, interval: float = POLL_S) -> Any:
    """Await `condition()` (sync or async) until it returns something truthy; return that.
    TimeoutError after `within` seconds."""
    last: Any = None
    with anyio.move_on_after(within):
        while True:
            last = condition()
            if hasattr(last, "__await__"):
                last = await last
            if last:
                return last
            await anyio.sleep(interval)
    raise TimeoutError(f"{what}: not within {within:g} s (last seen: {last!r})")


@dataclass
class MailpipeProcess:
    """A running `mailpipe run` and its log."""

    process: anyio.abc.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    async def wait_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:  # noqa: ASYNC109
        """Poll the log until `pattern` (a regex) appears; fail early if the process exits."""
        regex = re.compile(pattern)

        def seen() -> re.Match[str] | None:
            found = regex.search(self.log())
            if found is None and self.process.returncode is not None:
                raise AssertionError(
                    f"mailpipe exited ({self.process.returncode}) before logging {pattern!r}:\n"
                    + self.log_tail()
                )
            return found

        try:
            match: re.Match[str] = await poll(seen, within=timeout, what=f"log {pattern!r}")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.log_tail()}") from None
        return match

    async def wait_ready(self, timeout: float = 30) -> None:  # noqa: ASYNC109
        await self.wait_log(r"mailpipe ready: ", timeout)

    async def api_port(self, timeout: float = 30) -> int:  # noqa: ASYNC109
        """The port the API role bound (start it with MAILPIPE_API_PORT=0: no port races)."""
        return int((await self.wait_log(_LISTENING.pattern, timeout)).group(2))

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up anything."""
        self.process.send_signal(signal.SIGKILL)

    async def wait(self, timeout: float = 30) -> int:  # noqa: ASYNC109
        """The exit code, once the process has exited (negative: killed by that signal)."""
        try:
            with anyio.fail_after(timeout):
                return await self.process.wait()
        except TimeoutError:
            raise AssertionError(
                f"mailpipe still running after {timeout:g} s:\n{self.log_tail()}"
            ) from None


@asynccontextmanager
async def mailpipe_process(
    env: Mapping[str, str], *, roles: str | None, log_path: Path, args: Sequence[str] = ()
) -> AsyncIterator[MailpipeProcess]:
    """`python -m pipeline run [--roles roles] [args]` with `env` on top of a clean environment.

    The working directory is the log's folder, so nothing lands in the checkout.
    """
    command = [sys.executable, "-m", "pipeline", "run"]
    if roles:
        command += ["--roles", roles]
    command += args
    with log_path.open("ab") as log_file:
        process = await anyio.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            cwd=log_path.parent,
            env=clean_env(env),
        )
    proc = MailpipeProcess(process, log_path)
    try:
        yield proc
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.aclose()


def child_processes(pid: int) -> dict[int, str]:
    """The live (not zombie) children of `pid`, by pid, with their command lines (Linux /proc)."""
    found: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after it
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) != pid or state == "Z":
                continue
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        found[int(stat.parent.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def alive(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ---------------------------------------------------------------- the database, directly


async def statuses(db_url: str, ids: Iterable[str] | None = None) -> Counter[str]:
    """How many emails (of `ids`, or all) are in each status."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        if ids is None:
            cur = await conn.execute("SELECT status, count(*) FROM emails GROUP BY status")
        else:
            cur = await conn.execute(
                "SELECT status, count(*) FROM emails WHERE id = ANY(%s) GROUP BY status",
                (list(ids),),
            )
        return Counter({status: n for status, n in await cur.fetchall()})


async def all_sent(db_url: str, ids: Sequence[str]) -> bool:
    return (await statuses(db_url, ids)).get("sent", 0) == len(ids)


async def wait_all_sent(
    db_url: str, ids: Sequence[str], *, within: float, proc: MailpipeProcess | None = None
) -> None:
    """Poll until every one of `ids` is `sent`; else fail with their statuses (and the log)."""
    try:
        await poll(lambda: all_sent(db_url, ids), within=within, what="every email sent")
    except TimeoutError as e:
        detail = f"{e}; statuses: {dict(await statuses(db_url, ids))}"
        if proc is not None:
            detail += "\n" + proc.log_tail()
        raise AssertionError(detail) from None


def new_emails(account_id: str, subjects: Iterable[str]) -> list[queries.NewEmail]:
    """Queued emails as the API would build them, one per subject."""
    return [
        queries.NewEmail(
            id=new_id("msg"),
            account_id=account_id,
            status="queued",
            from_email="Crash Test <sender@example.com>",
            to=["rcpt@example.org"],
            cc=[],
            bcc=[],
            reply_to=[],
            envelope_to=["rcpt@example.org"],
            subject=subject,
            content={"body_text": f"body of {subject}", "body_html": None},
            message_id=new_message_id("example.com"),
            tags={},
            metadata=None,
            scheduled_at=None,
        )
        for subject in subjects
    ]


async def accept_directly(
    db_url: str, amqp_url: str, topology: Topology, emails: Sequence[queries.NewEmail]
) -> None:
    """What the API does for each email, in bulk: commit the rows (and their `email.queued`
    events), then publish them with confirms and mark the confirmed ones published."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        async with conn.transaction():
            for email in emails:
                await queries.insert_email(conn, email, event_type="email.queued")
        async with ConfirmedPublisher(amqp_url, topology) as publisher:
            confirmed = await publisher.publish_many(
                [(SEND, encode_send(e.id), e.id, None) for e in emails]
            )
        assert all(confirmed), "the broker did not confirm every publish"
        await queries.mark_published(conn, [e.id for e in emails])


async def ensure_account(db_url: str, name: str) -> str:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        return (await queries.ensure_account(conn, name)).id


async def delete_topology(amqp_url: str, topology: Topology) -> None:
    """Remove the queues and exchange of a test's prefix (whoever declared them)."""
    with anyio.CancelScope(shield=True):
        connection = await connect(amqp_url)
        try:
            channel = await connection.channel()
            await delete_all(channel, topology)
        finally:
            await connection.close()
