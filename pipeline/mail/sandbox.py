"""The built-in sandbox relay: an SMTP server that stores every message as an .eml file.

It is the default relay when no SMTP host is configured, so a fresh checkout sends real SMTP
end to end without delivering anything. aiosmtpd's protocol runs on the running asyncio loop
(`loop.create_server`), inside the supervisor's task group, rather than in aiosmtpd's threaded
`Controller`: one loop, structured shutdown, no thread to leak.

`smtp_server()` is the reusable part (the test suite's SMTP sink runs on it too): it tracks
the open sessions so that shutdown closes them instead of leaving tasks and sockets behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from aiosmtpd.smtp import SMTP, Envelope, Session

if TYPE_CHECKING:
    from pipeline.settings import SandboxSettings

__all__ = [
    "SANDBOX_MAX_MESSAGE_BYTES",
    "SandboxHandler",
    "SmtpServer",
    "serve_sandbox",
    "smtp_server",
]

log = logging.getLogger(__name__)

SANDBOX_MAX_MESSAGE_BYTES = 50 * 1024 * 1024
"""Above the API's 10 MiB request limit even after base64 (x4/3) and MIME overhead."""


@dataclass(eq=False)
class SmtpServer:
    """A listening aiosmtpd server and its sessions (for shutdown, and for tests to count)."""

    port: int
    sessions: set[SMTP] = field(default_factory=set)
    """Sessions open now."""
    sessions_total: int = 0
    """Sessions ever opened."""
    sessions_peak: int = 0
    """Most sessions open at the same time."""
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def close_sessions(self) -> None:
        """Drop every open session from the server's side, as a relay's idle timeout does."""
        for proto in list(self.sessions):
            if proto.transport is not None:
                proto.transport.close()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Fetch a finished session task's exception, so a client that vanished mid-command
    (ConnectionResetError) is not logged later as 'exception was never retrieved'."""
    if not task.cancelled():
        task.exception()


class _TrackedSMTP(SMTP):
    """aiosmtpd's protocol, registering itself with its SmtpServer while connected."""

    def __init__(self, handler: Any, server: SmtpServer, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._mailpipe_server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # STARTTLS calls this again for the same session
        super().connection_made(transport)
        if first:
            srv = self._mailpipe_server
            srv.sessions.add(self)
            srv.sessions_total += 1
            srv.sessions_peak = max(srv.sessions_peak, len(srv.sessions))
            # aiosmtpd 1.4 keeps the session's task here; awaited at shutdown.
            task = self._handler_coroutine
            if task is not None:
                srv._tasks.add(task)
                task.add_done_callback(srv._tasks.discard)
                task.add_done_callback(_retrieve)

    def connection_lost(self, error: Exception | None) -> None:
        self._mailpipe_server.sessions.discard(self)
        super().connection_lost(error)


@contextlib.asynccontextmanager
async def smtp_server(
    handler: Any,
    host: str | None,
    port: int,
    *,
    data_size_limit: int = SANDBOX_MAX_MESSAGE_BYTES,
    hostname: str = "mailpipe.sandbox",
    **smtp_kwargs: Any,
) -> AsyncIterator[SmtpServer]:
    """Listen with aiosmtpd on the running asyncio loop until the block exits.

    `port=0` picks a free port (read it from `.port`). `hostname` is the greeting's name,
    given so aiosmtpd does not look up the FQDN for every connection. On exit (even when
    cancelled) the listener and every open session are closed.
    """
    loop = asyncio.get_running_loop()
    server = SmtpServer(port=0)

    def factory() -> SMTP:
        return _TrackedSMTP(
            handler,
            server,
            data_size_limit=data_size_limit,
            hostname=hostname,
            loop=loop,
            **smtp_kwargs,
        )

    listener = await loop.create_server(factory, host=host or None, port=port)
    try:
        server.port = listener.sockets[0].getsockname()[1]
        yield server
    finally:
        with anyio.CancelScope(shield=True):
            listener.close()
            server.close_sessions()
            await listener.wait_closed()
            if server._tasks:
                await asyncio.wait(set(server._tasks), timeout=5)


class SandboxHandler:
    """aiosmtpd handler writing each message to `<directory>/<utc time>-<random>.eml`,
    with the envelope prepended as X-Mailpipe-Envelope-From / X-Mailpipe-Envelope-To."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        sender = envelope.mail_from or "<>"
        # One recipient per line: 50 of them would not fit the 998-octet line limit.
        recipients = ",\r\n ".join(envelope.rcpt_tos)
        header = (
            f"X-Mailpipe-Envelope-From: {sender}\r\nX-Mailpipe-Envelope-To: {recipients}\r\n"
        ).encode("utf-8", "surrogateescape")
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(4)}.eml"
        try:
            await anyio.to_thread.run_sync(
                _write_atomically, self.directory, name, header + content
            )
        except OSError:
            log.exception("sandbox could not store a message in %s", self.directory)
            return "451 4.3.0 sandbox could not store the message"
        return f"250 2.0.0 OK stored as {name}"


def _write_atomically(directory: Path, name: str, data: bytes) -> None:
    """Write under a hidden temporary name, then rename: readers never see half a file."""
    tmp = directory / f".{name}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


async def serve_sandbox(
    settings: SandboxSettings,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the sandbox relay until cancelled; `task_status.started(port)` once it listens
    (the real port, useful with `port = 0`)."""
    directory = await anyio.Path(settings.dir).expanduser()
    await directory.mkdir(parents=True, exist_ok=True)
    handler = SandboxHandler(Path(directory))
    async with smtp_server(handler, settings.host, settings.port) as server:
        log.info(
            "sandbox SMTP relay listening on %s:%d, storing mail in %s",
            settings.host or "*",
            server.port,
            directory,
        )
        task_status.started(server.port)
        await anyio.sleep_forever()
