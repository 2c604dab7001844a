"""The SMTP pool and the sandbox relay against real SMTP servers (the test sink), in-process.

These need no PostgreSQL, RabbitMQ or Redis: only sockets on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email
import email.policy
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from aiosmtpd.smtp import Envelope

from pipeline.errors import Permanent, Temporary
from pipeline.mail.classify import RecipientsRefused, SmtpReply, is_hard_bounce
from pipeline.mail.render import OutgoingEmail, envelope_recipients, envelope_sender, render
from pipeline.mail.sandbox import serve_sandbox
from pipeline.mail.smtp_pool import SendResult, SmtpPool
from pipeline.settings import SandboxSettings, SmtpSettings
from tests.smtp_sink import smtp_sink

pytestmark = pytest.mark.anyio

SENDER = "sender@example.com"


def message(subject: str = "Hello", to: tuple[str, ...] = ("rcpt@example.org",)) -> bytes:
    return render(
        OutgoingEmail(
            from_email=f"Sender <{SENDER}>",
            to=to,
            subject=subject,
            body_text=f"body of {subject}",
            message_id=f"<{subject.replace(' ', '-')}@example.com>",
            date=datetime(2026, 11, 28, 10, 0, tzinfo=UTC),
        )
    )


def pool_for(port: int, **kwargs: object) -> SmtpPool:
    kwargs.setdefault("timeout_s", 5.0)
    return SmtpPool("127.0.0.1", port, local_hostname="client.test", **kwargs)  # type: ignore[arg-type]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Poll a condition with a deadline, for effects with no event to wait on (a server-side
    socket closing happens in a protocol callback)."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_sends_and_reuses_one_connection() -> None:
    async with smtp_sink() as sink, pool_for(sink.port) as pool:
        for i in range(10):
            result = await pool.send(SENDER, ["rcpt@example.org"], message(f"n{i}"))
            assert isinstance(result, SendResult)
            assert (result.code, result.enhanced) == (250, "2.0.0")
            assert result.refused == {}
            assert result.to_json() == {"code": 250, "enhanced": "2.0.0", "message": "2.0.0 OK"}
        received = await sink.wait_for(10)
        assert sink.connections_total == 1
        assert pool.open_connections == 1
    assert [m.message["Subject"] for m in received] == [f"n{i}" for i in range(10)]
    first = received[0]
    assert first.mail_from == SENDER
    assert first.rcpt_tos == ("rcpt@example.org",)
    assert first.raw == message("n0")
    assert first.message.get_content().strip() == "body of n0"


async def test_pool_size_bounds_concurrent_connections() -> None:
    # DATA is held until three transactions are inside it at once: proves the pool does run
    # `size` sessions in parallel, and that it never opens a fourth.
    inside = 0
    three_inside = anyio.Event()

    async def hold(envelope: Envelope, attempt: int) -> str | None:
        nonlocal inside
        inside += 1
        if inside >= 3:
            three_inside.set()
        await three_inside.wait()
        return None

    async with smtp_sink(hold) as sink, pool_for(sink.port, size=3) as pool:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(pool.send, SENDER, ["rcpt@example.org"], message(f"c{i}"))
        await sink.wait_for(20)
        assert sink.connections_total == 3
        assert sink.connections_peak == 3
        assert pool.open_connections == 3
        assert pool.idle_connections == 3
    await until(lambda: sink.connections_open == 0)


async def test_451_is_temporary_and_the_connection_is_kept() -> None:
    def greylist(envelope: Envelope, attempt: int) -> str | None:
        return "451 4.7.1 greylisted, try later" if attempt == 0 else None

    async with smtp_sink(greylist) as sink, pool_for(sink.port) as pool:
        with pytest.raises(Temporary) as caught:
            await pool.send(SENDER, ["rcpt@example.org"], message())
        assert (caught.value.code, caught.value.enhanced) == (451, "4.7.1")
        assert caught.value.message == "4.7.1 greylisted, try later"
        await pool.send(SENDER, ["rcpt@example.org"], message())
        assert len(await sink.wait_for(1)) == 1
        assert sink.attempts == 2
        assert sink.connections_total == 1  # a clean refusal leaves the session usable


async def test_550_511_is_a_permanent_hard_bounce() -> None:
    async with (
        smtp_sink(lambda envelope, attempt: "550 5.1.1 <rcpt@example.org>: no such user") as sink,
        pool_for(sink.port) as pool,
    ):
        with pytest.raises(Permanent) as caught:
            await pool.send(SENDER, ["rcpt@example.org"], message())
    err = caught.value
    assert (err.code, err.enhanced) == (550, "5.1.1")
    assert is_hard_bounce(err)
    assert SmtpReply.from_error(err).to_json() == {
        "code": 550,
        "enhanced": "5.1.1",
        "message": "5.1.1 <rcpt@example.org>: no such user",
    }


async def test_some_recipients_refused() -> None:
    def rcpt(address: str) -> str | None:
        return "550 5.1.1 unknown user" if address.startswith("gone") else None

    async with smtp_sink(rcpt_script=rcpt) as sink, pool_for(sink.port) as pool:
        result = await pool.send(SENDER, ["ok@example.org", "gone@example.org"], message())
        assert result.refused == {"gone@example.org": SmtpReply(550, "5.1.1", "5.1.1 unknown user")}
        assert is_hard_bounce(result.refused["gone@example.org"])
        [received] = await sink.wait_for(1)
        assert received.rcpt_tos == ("ok@example.org",)

        with pytest.raises(RecipientsRefused) as caught:
            await pool.send(SENDER, ["gone@example.org", "gone2@example.org"], message())
        assert set(caught.value.refused) == {"gone@example.org", "gone2@example.org"}
        assert is_hard_bounce(caught.value)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


async def test_closed_port_is_temporary(closed_port: int) -> None:
    async with pool_for(closed_port) as pool:
        with pytest.raises(Temporary) as caught:
            await pool.send(SENDER, ["rcpt@example.org"], message())
        assert caught.value.code is None
        assert pool.open_connections == 0


async def test_dead_idle_connection_is_retried_once_on_a_fresh_one() -> None:
    async with smtp_sink() as sink, pool_for(sink.port) as pool:
        await pool.send(SENDER, ["rcpt@example.org"], message("first"))
        # The relay dropped the idle connection; the client finds out only at MAIL FROM.
        sink.hang_up_on_next_mail()
        await pool.send(SENDER, ["rcpt@example.org"], message("second"))
        received = await sink.wait_for(2)
        assert [m.message["Subject"] for m in received] == ["first", "second"]
        assert sink.connections_total == 2


async def test_retry_happens_only_once() -> None:
    async with smtp_sink() as sink, pool_for(sink.port) as pool:
        await pool.send(SENDER, ["rcpt@example.org"], message("first"))
        sink.hang_up_on_next_mail(times=2)
        with pytest.raises(Temporary):
            await pool.send(SENDER, ["rcpt@example.org"], message("second"))
        assert sink.connections_total == 2
        assert len(sink.messages) == 1


async def test_fresh_connection_failing_is_not_retried() -> None:
    async with smtp_sink() as sink, pool_for(sink.port) as pool:
        sink.hang_up_on_next_mail()
        with pytest.raises(Temporary):
            await pool.send(SENDER, ["rcpt@example.org"], message())
        assert sink.connections_total == 1


async def test_connections_dropped_by_the_relay_are_replaced() -> None:
    async with smtp_sink() as sink, pool_for(sink.port, idle_check_s=0.0) as pool:
        await pool.send(SENDER, ["rcpt@example.org"], message("first"))
        sink.drop_connections()
        await pool.send(SENDER, ["rcpt@example.org"], message("second"))
        assert len(await sink.wait_for(2)) == 2
        assert sink.connections_total == 2


async def test_idle_check_keeps_a_live_connection() -> None:
    async with smtp_sink() as sink, pool_for(sink.port, idle_check_s=0.0) as pool:
        for i in range(3):
            await pool.send(SENDER, ["rcpt@example.org"], message(f"n{i}"))
        assert sink.connections_total == 1


async def test_never_retried_once_data_began() -> None:
    sink_ref: list[object] = []

    def drop_during_data(envelope: Envelope, attempt: int) -> str | None:
        if attempt == 1:
            sink_ref[0].drop_connections()  # type: ignore[attr-defined]
        return None

    async with smtp_sink(drop_during_data) as sink, pool_for(sink.port) as pool:
        sink_ref.append(sink)
        await pool.send(SENDER, ["rcpt@example.org"], message("first"))
        with pytest.raises(Temporary):
            await pool.send(SENDER, ["rcpt@example.org"], message("second"))
        # A retry here could deliver twice: the relay may have queued the message already.
        assert sink.attempts == 2
        assert sink.connections_total == 1


async def test_cancelled_send_discards_its_connection() -> None:
    started = anyio.Event()

    async def stall(envelope: Envelope, attempt: int) -> str | None:
        if attempt == 0:
            started.set()
            await anyio.sleep_forever()
        return None

    async with smtp_sink(stall) as sink, pool_for(sink.port) as pool:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.send, SENDER, ["rcpt@example.org"], message("stalled"))
            await started.wait()
            tg.cancel_scope.cancel()
        assert pool.open_connections == 0
        await pool.send(SENDER, ["rcpt@example.org"], message("next"))
        [received] = await sink.wait_for(1)
        assert received.message["Subject"] == "next"
        assert sink.connections_total == 2


async def test_pool_closes_its_connections_on_exit() -> None:
    async with smtp_sink() as sink:
        async with pool_for(sink.port, size=2) as pool:
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(pool.send, SENDER, ["rcpt@example.org"], message(f"x{i}"))
        await until(lambda: sink.connections_open == 0)
        with pytest.raises(RuntimeError):
            await pool.send(SENDER, ["rcpt@example.org"], message())


def test_from_settings_uses_the_sandbox_without_a_host() -> None:
    smtp = SmtpSettings(
        host="",
        port=587,
        username="u",
        password="p",
        starttls=True,
        timeout_s=7.0,
        pool_size=4,
    )
    pool = SmtpPool.from_settings(smtp, SandboxSettings(host="0.0.0.0", port=2525, dir="x"))
    assert (pool.host, pool.port) == ("127.0.0.1", 2525)
    pool = SmtpPool.from_settings(
        smtp, SandboxSettings(host="127.0.0.1", port=0, dir="x"), sandbox_port=4242
    )
    assert (pool.host, pool.port) == ("127.0.0.1", 4242)
    relay = dataclasses.replace(smtp, host="smtp.example.com")
    pool = SmtpPool.from_settings(relay, SandboxSettings(host="127.0.0.1", port=2525, dir="x"))
    assert (pool.host, pool.port) == ("smtp.example.com", 587)


async def test_sandbox_writes_parseable_eml_files(tmp_path: Path) -> None:
    directory = tmp_path / "outbox" / "nested"
    settings = SandboxSettings(host="127.0.0.1", port=0, dir=str(directory))
    raw = render(
        OutgoingEmail(
            from_email="Sänder <sender@example.com>",
            to=("a@example.org",),
            cc=("b@example.org",),
            bcc=("hidden@example.net",),
            subject="Sandbox ✓",
            body_text="captured",
            message_id="<sandbox-1@example.com>",
            date=datetime(2026, 11, 28, 10, 0, tzinfo=UTC),
        )
    )
    e = OutgoingEmail(
        from_email="sender@example.com",
        to=("a@example.org",),
        cc=("b@example.org",),
        bcc=("hidden@example.net",),
        subject="x",
        body_text="x",
        message_id="<x@example.com>",
        date=datetime(2026, 11, 28, tzinfo=UTC),
    )
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_sandbox, settings)
        assert isinstance(port, int) and port > 0
        async with pool_for(port) as pool:
            result = await pool.send(envelope_sender(e), envelope_recipients(e), raw)
        tg.cancel_scope.cancel()

    files = sorted([f async for f in anyio.Path(directory).iterdir()])
    assert [f.suffix for f in files] == [".eml"]  # no temporary file left behind
    assert f"stored as {files[0].name}" in result.message
    stored = await files[0].read_bytes()
    assert stored.endswith(raw)
    parsed = email.message_from_bytes(stored, policy=email.policy.default)
    assert parsed["X-Mailpipe-Envelope-From"] == "sender@example.com"
    envelope_to = str(parsed["X-Mailpipe-Envelope-To"])
    assert [a.strip() for a in envelope_to.split(",")] == [
        "a@example.org",
        "b@example.org",
        "hidden@example.net",
    ]
    assert parsed["Bcc"] is None
    assert str(parsed["Subject"]) == "Sandbox ✓"
    assert parsed["Message-ID"] == "<sandbox-1@example.com>"


async def test_sandbox_stops_cleanly_with_open_connections(tmp_path: Path) -> None:
    settings = SandboxSettings(host="127.0.0.1", port=0, dir=str(tmp_path))
    async with contextlib.AsyncExitStack() as stack:
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_sandbox, settings)
            pool = await stack.enter_async_context(pool_for(port))
            await pool.send(SENDER, ["rcpt@example.org"], message())
            # Cancelled while the pool's idle connection is still open.
            tg.cancel_scope.cancel()
        # The pool exits after the sandbox: its QUIT fails quietly on the closed connection.
    assert len([f async for f in anyio.Path(tmp_path).glob("*.eml")]) == 1
