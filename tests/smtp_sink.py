"""A real SMTP server for tests, on 127.0.0.1 and a free port, inside the test's event loop.

    async with smtp_sink() as sink:
        ... send to 127.0.0.1:sink.port ...
        [msg] = await sink.wait_for(1)
        assert msg.message["Subject"] == "hi"

Failure paths are scripted rather than mocked: `script(envelope, attempt_index)` answers DATA
(None accepts with 250, a string such as "451 4.7.1 try later" is the reply; it may also be
async), `rcpt_script(address)` answers RCPT the same way, `hang_up_on_next_mail()` closes the
connection when the next MAIL arrives (a relay that dropped an idle connection, seen by the
client only when it speaks), and `drop_connections()` closes every session at once.
"""

from __future__ import annotations

import email
import email.policy
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, cast

import anyio
from aiosmtpd.smtp import SMTP, Envelope, Session

from pipeline.mail.sandbox import SmtpServer, smtp_server

Script = Callable[[Envelope, int], "str | Awaitable[str | None] | None"]
RcptScript = Callable[[str], "str | None"]


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted message: the envelope, the bytes as received and their parse."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    message: EmailMessage


class SmtpSink:
    """What the sink saw; created by `smtp_sink()`."""

    def __init__(self, script: Script | None, rcpt_script: RcptScript | None) -> None:
        self.messages: list[ReceivedMessage] = []
        self.attempts = 0
        """DATA commands received, accepted or not."""
        self._script = script
        self._rcpt_script = rcpt_script
        self._hangups = 0
        self._changed = anyio.Event()
        self._server: SmtpServer | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    @property
    def connections_total(self) -> int:
        """Connections ever accepted."""
        assert self._server is not None
        return self._server.sessions_total

    @property
    def connections_open(self) -> int:
        assert self._server is not None
        return len(self._server.sessions)

    @property
    def connections_peak(self) -> int:
        """Most connections open at the same time."""
        assert self._server is not None
        return self._server.sessions_peak

    def hang_up_on_next_mail(self, times: int = 1) -> None:
        """Close the connection, without a reply, at the next `times` MAIL commands."""
        self._hangups += times

    def drop_connections(self) -> None:
        """Close every open connection from the server's side."""
        assert self._server is not None
        self._server.close_sessions()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:  # noqa: ASYNC109
        """Wait until at least `count` messages were accepted; they are returned in order."""
        try:
            with anyio.fail_after(timeout):
                while len(self.messages) < count:
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"smtp_sink: expected {count} messages within {timeout}s, got {len(self.messages)}"
            ) from None
        return self.messages[:count]

    # aiosmtpd handler hooks

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self._hangups > 0:
            self._hangups -= 1
            assert server.transport is not None
            server.transport.close()
            return "421 4.4.2 closing connection"  # never reaches the closed socket
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._rcpt_script(address) if self._rcpt_script else None
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        attempt = self.attempts
        self.attempts += 1
        reply: str | None = None
        if self._script is not None:
            result = self._script(envelope, attempt)
            reply = await result if inspect.isawaitable(result) else cast("str | None", result)
        if reply is None:
            raw = envelope.original_content or b""
            parsed = email.message_from_bytes(raw, policy=email.policy.default)
            self.messages.append(
                ReceivedMessage(
                    mail_from=envelope.mail_from or "",
                    rcpt_tos=tuple(envelope.rcpt_tos),
                    raw=raw,
                    message=cast(EmailMessage, parsed),
                )
            )
            reply = "250 2.0.0 OK"
        self._changed.set()
        self._changed = anyio.Event()
        return reply


@asynccontextmanager
async def smtp_sink(
    script: Script | None = None,
    *,
    rcpt_script: RcptScript | None = None,
    **server_kwargs: Any,
) -> AsyncIterator[SmtpSink]:
    """Run a sink for the duration of the block; every connection is closed on exit."""
    sink = SmtpSink(script, rcpt_script)
    async with smtp_server(sink, "127.0.0.1", 0, hostname="sink.test", **server_kwargs) as srv:
        sink._server = srv
        yield sink
