"""A pool of reused SMTP client connections to one relay.

Opening a connection costs a TCP handshake, a greeting, EHLO and often STARTTLS and AUTH:
several round trips, more than the transaction itself. The pool keeps connections open
between sends and bounds how many exist, so a relay that limits concurrent sessions per client
is never flooded.

- At most `size` connections exist; a send waits for a slot (an anyio semaphore).
- Idle connections are reused last-in first-out, so the warmest one goes first and the rest
  may age out on the relay's side; one idle for more than `idle_check_s` gets a NOOP first.
- A connection that hit a connection-level error (disconnect, timeout, TLS, malformed reply,
  421, cancellation) is closed. One that got a clean 4xx/5xx refusal of *this* message is kept:
  aiosmtplib sent RSET, so the session is back in a known state.
- A reused connection can turn out to be dead only when used (the relay dropped it while it
  sat idle). A connection-level failure on a reused connection *before DATA began* is retried
  once on a fresh connection: nothing of the message reached the relay, so it cannot be a
  duplicate. Once DATA began it is never retried here; the email goes back to the queue.
- Failures are raised as `Temporary` / `Permanent` (see classify.py), never as aiosmtplib's own
  exceptions.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Literal, Self

import aiosmtplib
import anyio
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import Default

from pipeline.errors import DeliveryError
from pipeline.mail.classify import SmtpReply, classify_exception, parse_enhanced

if TYPE_CHECKING:
    from pipeline.settings import SandboxSettings, SmtpSettings

__all__ = ["SendResult", "SmtpPool"]

log = logging.getLogger(__name__)

_EMPTY: Mapping[str, SmtpReply] = MappingProxyType({})
_WILDCARD_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True, slots=True)
class SendResult(SmtpReply):
    """The relay's reply to the end of DATA (always 2xx), plus the recipients it refused.

    It *is* an SmtpReply (code, enhanced, message, to_json() of the reply alone), so callers
    that only record the reply need nothing else. `refused` holds the recipients the relay
    refused at RCPT while it accepted others, each with its own reply; they did not get the
    email (a 5.1.x there is a hard bounce for that recipient alone). When every recipient is
    refused nothing is sent and send() raises instead.
    """

    refused: Mapping[str, SmtpReply] = field(default_factory=lambda: _EMPTY)


class _Connection(aiosmtplib.SMTP):
    """aiosmtplib.SMTP that notes when DATA began: the line after which a retry could send a
    duplicate."""

    data_started = False
    idle_since = 0.0

    async def data(
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109
    ) -> SMTPResponse:
        self.data_started = True
        return await super().data(message, timeout=timeout)


class SmtpPool:
    """Reused SMTP connections to one relay; enter with `async with` before sending."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        use_tls: bool = False,
        timeout_s: float = 30.0,
        size: int = 10,
        idle_check_s: float = 10.0,
        local_hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """`starttls` upgrades every connection (and fails it when the relay cannot);
        `use_tls` is TLS from the first byte (port 465). `timeout_s` bounds each network
        step (connect, each command, the DATA transfer). `local_hostname` is the EHLO name
        (the machine's FQDN by default, looked up once)."""
        if size < 1:
            raise ValueError("pool size must be at least 1")
        if starttls and use_tls:
            raise ValueError("starttls and use_tls exclude each other")
        self.host = host
        self.port = port
        self._username = username or None
        self._password = password if username else None
        self._starttls = starttls
        self._use_tls = use_tls
        self._timeout_s = timeout_s
        self._size = size
        self._idle_check_s = idle_check_s
        self._local_hostname = local_hostname
        self._tls_context = tls_context
        self._idle: list[_Connection] = []  # LIFO: append and pop at the end
        self._open: set[_Connection] = set()
        self._slots: anyio.Semaphore | None = None
        self._closed = False

    @classmethod
    def from_settings(
        cls, smtp: SmtpSettings, sandbox: SandboxSettings, *, sandbox_port: int | None = None
    ) -> SmtpPool:
        """The configured relay, or the built-in sandbox (no TLS, no AUTH) when `smtp.host`
        is empty; `sandbox_port` overrides the configured port (the one it really listens on
        when configured as 0). A wildcard sandbox host (0.0.0.0, ::) is reached on loopback.
        Port 465 without `starttls` means TLS from the first byte."""
        if not smtp.host:
            host = _WILDCARD_HOSTS.get(sandbox.host, sandbox.host)
            port = sandbox.port if sandbox_port is None else sandbox_port
            return cls(host, port, timeout_s=smtp.timeout_s, size=smtp.pool_size)
        return cls(
            smtp.host,
            smtp.port,
            username=smtp.username or None,
            password=smtp.password or None,
            starttls=smtp.starttls,
            use_tls=smtp.port == 465 and not smtp.starttls,
            timeout_s=smtp.timeout_s,
            size=smtp.pool_size,
        )

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or in use (never more than `size`)."""
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def __aenter__(self) -> Self:
        self._slots = anyio.Semaphore(self._size)
        if self._local_hostname is None:
            # aiosmtplib would look the FQDN up on every connect; once is enough.
            fqdn = await anyio.to_thread.run_sync(socket.getfqdn)
            self._local_hostname = fqdn if fqdn and fqdn.isascii() else "localhost"
            if any(c.isspace() for c in self._local_hostname):
                self._local_hostname = "localhost"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """QUIT idle connections (briefly, shielded from cancellation) and close them all."""
        self._closed = True
        idle, self._idle = self._idle, []
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            async with anyio.create_task_group() as tg:
                for conn in idle:
                    tg.start_soon(self._quit, conn)
        for conn in list(self._open):
            self._discard(conn)

    async def send(self, sender: str, recipients: Sequence[str], raw: bytes) -> SendResult:
        """Send one message (already rendered bytes) to `recipients` from `sender`.

        Returns the relay's reply once it accepted the message for at least one recipient;
        raises `Temporary` or `Permanent` otherwise.
        """
        if self._slots is None or self._closed:
            raise RuntimeError("SmtpPool is not open; use `async with SmtpPool(...)`")
        recipients = list(recipients)
        async with self._slots:
            conn, reused = await self._checkout()
            while True:
                conn.data_started = False
                try:
                    errors, message = await conn.sendmail(sender, recipients, raw)
                except Exception as exc:
                    retry = reused and not conn.data_started and _is_connection_failure(exc)
                    self._after_failure(conn, exc)
                    if not retry:
                        raise classify_exception(exc) from exc
                    log.info("reused SMTP connection failed before DATA (%r); retrying once", exc)
                    conn, reused = await self._connect(), False
                    continue
                except BaseException:
                    self._discard(conn)  # cancelled mid-transaction: state unknown
                    raise
                self._checkin(conn)
                # sendmail() only returns after a 250 to DATA; it keeps just the text.
                refused = {addr: SmtpReply.parse(r.code, r.message) for addr, r in errors.items()}
                return SendResult(
                    250,
                    parse_enhanced(250, message),
                    message,
                    MappingProxyType(refused) if refused else _EMPTY,
                )

    async def _checkout(self) -> tuple[_Connection, bool]:
        """The most recently used live idle connection, else a new one; True when reused."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_connected:
                self._discard(conn)
                continue
            if anyio.current_time() - conn.idle_since > self._idle_check_s:
                try:
                    await conn.noop(timeout=min(self._timeout_s, 5.0))
                except Exception as exc:
                    log.debug("idle SMTP connection failed NOOP: %r", exc)
                    self._discard(conn)
                    continue
                except BaseException:
                    self._discard(conn)
                    raise
            return conn, True
        return await self._connect(), False

    async def _connect(self) -> _Connection:
        """A new connection, greeted, upgraded to TLS and logged in as configured."""
        conn = _Connection(
            hostname=self.host,
            port=self.port,
            username=self._username,
            password=self._password,
            local_hostname=self._local_hostname,
            timeout=self._timeout_s,
            use_tls=self._use_tls,
            start_tls=self._starttls,
            tls_context=self._tls_context,
        )
        self._open.add(conn)
        try:
            await conn.connect()
        except Exception as exc:
            self._discard(conn)
            raise classify_exception(exc) from exc
        except BaseException:
            self._discard(conn)
            raise
        log.debug("SMTP connection opened to %s:%s", self.host, self.port)
        return conn

    def _checkin(self, conn: _Connection) -> None:
        if self._closed or not conn.is_connected:
            self._discard(conn)
            return
        conn.idle_since = anyio.current_time()
        self._idle.append(conn)

    def _after_failure(self, conn: _Connection, exc: Exception) -> None:
        """Keep a connection whose session is intact after a clean refusal; close the rest."""
        if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) or (
            isinstance(exc, aiosmtplib.SMTPResponseException)
            and 400 <= exc.code <= 599
            and exc.code != 421
        ):
            self._checkin(conn)
        else:
            self._discard(conn)

    def _discard(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.close()

    async def _quit(self, conn: _Connection) -> None:
        with contextlib.suppress(Exception):
            await conn.quit(timeout=1.0)
        self._discard(conn)


def _is_connection_failure(exc: Exception) -> bool:
    """A failure of the connection rather than a verdict on the message: safe to retry on a
    fresh connection if no DATA was sent."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code == 421  # "closing channel", e.g. the relay's idle timeout
    if isinstance(exc, DeliveryError):
        return False
    return isinstance(exc, OSError | TimeoutError | aiosmtplib.SMTPServerDisconnected)
