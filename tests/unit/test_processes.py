"""`mailpipe run --processes N`: argument checks, the shared port, and the parent's restart and
stop rules, with small stand-in child processes (the real service: tests/integration)."""

from __future__ import annotations

import os
import socket
import sys

import anyio
import pytest

from pipeline import processes
from pipeline.__main__ import build_parser
from pipeline.errors import ConfigError
from pipeline.processes import Children, child_command, child_roles, reserve_port
from pipeline.supervisor import START_ATTEMPTS
from tests.procs import poll


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", ""])
def test_processes_below_one_is_an_argument_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["run", "--processes", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --processes: expected an integer >= 1, got {value!r}" in err


def test_processes_defaults_to_one() -> None:
    assert build_parser().parse_args(["run"]).processes == 1
    assert build_parser().parse_args(["run", "--processes", "3"]).processes == 3


def test_the_sandbox_runs_once_in_the_parent() -> None:
    assert child_roles(["sandbox", "api", "sender"]) == ["api", "sender"]
    with pytest.raises(ConfigError, match="the sandbox runs once"):
        child_roles(["sandbox"])


def test_children_run_the_same_command_with_explicit_roles() -> None:
    assert child_command(["api", "sender"], config=None, log_level="INFO") == [
        sys.executable,
        *("-m", "pipeline", "--log-level", "INFO", "run", "--roles", "api,sender"),
    ]
    command = child_command(["sender"], config="prod.toml", log_level="debug")
    assert " ".join(command[1:]) == (
        "-m pipeline --config prod.toml --log-level debug run --roles sender"
    )


def _listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_port_zero_is_reserved_once_and_shared_by_reuse_port_listeners() -> None:
    """`api.port = 0` works with --processes: the parent resolves it to one port and holds it;
    children listen on it with SO_REUSEPORT; nothing else can bind it."""
    with reserve_port("127.0.0.1", 0) as reserved:
        port = reserved.getsockname()[1]
        assert port != 0
        with _listener(port) as first, _listener(port) as second:
            assert first.getsockname()[1] == second.getsockname()[1] == port
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # answered by one of the listeners, never by the reservation
        with socket.socket() as intruder, pytest.raises(OSError):
            intruder.bind(("127.0.0.1", port))


def test_a_port_taken_by_another_program_is_one_line() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ConfigError) as error:
            reserve_port("127.0.0.1", port)
    assert str(error.value) == f"api.port: cannot bind 127.0.0.1:{port}: Address already in use"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.anyio
async def test_a_child_that_keeps_failing_at_start_is_given_up_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    command = python("import sys; print('mailpipe: no database here', file=sys.stderr); exit(3)")
    children = Children(2, command, os.environ, grace_s=1, restart_min_s=0.01)
    with anyio.fail_after(30):
        await children.run()
    assert children.failure is not None
    assert children.failure.endswith(
        f"exited {START_ATTEMPTS} times in a row, each within 60 s of its start "
        "(exit status 3: no database here)"
    )
    err = capsys.readouterr().err
    assert "[p1] mailpipe: no database here" in err and "[p2] mailpipe: no database here" in err


SLEEPER = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("up", flush=True, file=sys.stderr)
time.sleep(60)
"""


@pytest.mark.anyio
async def test_a_dead_child_is_restarted_and_a_stop_ends_every_child_cleanly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    children = Children(2, python(SLEEPER), os.environ, grace_s=5, restart_min_s=0.01)
    seen = ""

    def started(count: int) -> bool:
        nonlocal seen
        seen += capsys.readouterr().err
        return seen.count("] up") >= count

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(children.run)
            await poll(lambda: started(2) and len(children.running) == 2, within=20, what="up")
            victim = children.running[1]
            victim.kill()
            await poll(lambda: started(3), within=20, what="the restarted child")
            assert children.running[1].pid != victim.pid
            children.request_stop()
    assert children.failure is None
    assert children.unclean == []
    assert not children.running


STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("up", flush=True, file=sys.stderr)
time.sleep(60)
"""


@pytest.mark.anyio
async def test_a_child_still_running_after_the_grace_is_killed_and_reported(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processes, "KILL_AFTER_GRACE_S", 0.2)
    children = Children(1, python(STUBBORN), os.environ, grace_s=0.2)
    seen = ""

    def up() -> bool:
        nonlocal seen
        seen += capsys.readouterr().err
        return "[p1] up" in seen

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(children.run)
            await poll(up, within=20, what="up")
            children.request_stop()
    assert children.unclean == ["process 1 killed by SIGKILL while stopping"]
