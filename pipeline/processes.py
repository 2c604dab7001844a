"""`mailpipe run --processes N`: N copies of the service on one host, under a small parent.

One Python process uses one core, so a host with several cores runs several. Each child is
plain `python -m pipeline [--config F] --log-level L run --roles R`, the same code a Procfile
line runs, sharing nothing in memory; the parent runs no role of its own except the sandbox.
It only starts the children, restarts them, stops them, and labels their logs.

- One API port. The parent binds `api.host:api.port` once with SO_REUSEPORT and never listens
  on it: that turns `api.port = 0` into a real port and holds it, so nothing else can take it
  while a child restarts. The children bind and listen on that port with SO_REUSEPORT
  (`MAILPIPE_API_PORT`, `MAILPIPE_API_REUSE_PORT=true`) and the kernel spreads new connections
  evenly between them (Linux). Chosen over handing one listening socket down: the API role
  stays as it is, and processes sharing one accept queue wake together and balance unevenly.
- Roles that must exist once run in the parent: the sandbox binds a fixed port, so the parent
  serves it and gives the children its real port (`MAILPIPE_SANDBOX_PORT`). Every other role is
  safe N times: `sender`, `retry` and the webhook deliveries consume queues; the scheduler and
  the sweeper claim rows with `FOR UPDATE SKIP LOCKED`; the webhook fan-out locks its cursor row.
- The database is created and migrated here once, before the children start (they would race
  to create it); a failure stops the start with one line, as in one process.
- Signals: each SIGTERM/SIGINT is passed on to every child as SIGTERM. The first makes them
  drain within `shutdown.grace_s`, a second stops them at once, as in one process; children
  still running `KILL_AFTER_GRACE_S` past the grace are killed. The children run in a session
  of their own, so a terminal's Ctrl-C reaches them only through here (twice would skip the
  drain); a child whose parent dies gets SIGTERM (Linux `PR_SET_PDEATHSIG`), so a killed parent
  leaves no orphans. Exit 0 once every child stopped cleanly.
- Restarts: a child that exits unasked is restarted with the supervisor's backoff. A child that
  exits `START_ATTEMPTS` times in a row, each time within `HEALTHY_RUN_S` of its start, cannot
  run: the others are stopped and the parent exits 1, quoting that child's last line.
- Logs: every line a child writes to stderr comes through the parent, prefixed `[pN] `.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence

import anyio
import anyio.abc

from pipeline.errors import ConfigError, ProcessError
from pipeline.settings import Settings
from pipeline.supervisor import HEALTHY_RUN_S, RESTART_MAX_S, RESTART_MIN_S, START_ATTEMPTS

log = logging.getLogger(__name__)

PARENT_ROLES = frozenset({"sandbox"})
"""Roles that listen on a fixed port of their own: they run once, in the parent."""
SUPERVISOR_PID_VAR = "MAILPIPE_SUPERVISOR_PID"
"""Set in each child's environment: the parent's pid (the child dies with it)."""
KILL_AFTER_GRACE_S = 10.0
"""After a stop, children still running `shutdown.grace_s` plus this long are killed."""
_CLEAN_EXITS = (0, -signal.SIGTERM)  # -SIGTERM: stopped before its handlers were set, or twice
_MAX_LINE = 64 * 1024
_PR_SET_PDEATHSIG = 1


def child_roles(names: Sequence[str]) -> list[str]:
    """The roles each child runs: all asked but the parent's own."""
    roles = [n for n in names if n not in PARENT_ROLES]
    if not roles:
        raise ConfigError("--processes: the sandbox runs once; name roles to run N times")
    return roles


def child_command(roles: Sequence[str], *, config: str | None, log_level: str) -> list[str]:
    command = [sys.executable, "-m", "pipeline"]
    if config:
        command += ["--config", config]
    return [*command, "--log-level", log_level, "run", "--roles", ",".join(roles)]


def reserve_port(host: str, port: int) -> socket.socket:
    """`host:port` bound with SO_REUSEPORT, never listening: it holds the port (resolving 0) for
    listeners that set SO_REUSEPORT too, and receives no connection itself."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("--processes: this system has no SO_REUSEPORT to share api.port")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"api.port: cannot bind {host}:{port}: {why}") from exc
    return sock


def die_with_supervisor() -> None:
    """In a child of `--processes` (Linux): ask for SIGTERM when the parent dies."""
    parent = os.environ.get(SUPERVISOR_PID_VAR)
    if not parent or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


async def run_processes(
    settings: Settings,
    names: Sequence[str],
    count: int,
    *,
    config: str | None,
    log_level: str,
) -> None:
    """Run `names` in `count` child processes until SIGTERM/SIGINT (the sandbox here, once)."""
    from pipeline.mail.sandbox import serve_sandbox
    from pipeline.store.migrate import migrate

    roles = child_roles(names)
    env = {**os.environ, SUPERVISOR_PID_VAR: str(os.getpid())}
    await migrate(settings.database.url)
    with contextlib.ExitStack() as stack:
        if "api" in roles:
            sock = stack.enter_context(reserve_port(settings.api.host, settings.api.port))
            env["MAILPIPE_API_PORT"] = str(sock.getsockname()[1])
            env["MAILPIPE_API_REUSE_PORT"] = "true"
        try:
            async with anyio.create_task_group() as tg:
                if "sandbox" in names:
                    box = settings.sandbox
                    try:
                        env["MAILPIPE_SANDBOX_PORT"] = str(await tg.start(serve_sandbox, box))
                    except OSError as exc:
                        why = os.strerror(exc.errno) if exc.errno else str(exc)
                        where = f"{box.host}:{box.port}"
                        raise ConfigError(f"sandbox: cannot listen on {where}: {why}") from exc
                command = child_command(roles, config=config, log_level=log_level)
                log.info(
                    "starting %d processes of: %s%s",
                    count,
                    " ".join(["python", *command[1:]]),
                    f" (API port {env['MAILPIPE_API_PORT']}, shared)" if "api" in roles else "",
                )
                children = Children(count, command, env, grace_s=settings.shutdown.grace_s)
                await children.run()
                tg.cancel_scope.cancel()
        except* ConfigError as group:
            raise group.exceptions[0] from None
    if children.failure:
        raise ProcessError(children.failure)
    if children.unclean:
        raise ProcessError("; ".join(children.unclean))
    log.info("mailpipe stopped: every process exited cleanly")


class Children:
    """`count` children of `command`, each restarted when it exits unasked, until the stop."""

    def __init__(
        self,
        count: int,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        grace_s: float,
        restart_min_s: float = RESTART_MIN_S,
    ) -> None:
        self.count = count
        self.command = list(command)
        self.env = dict(env)
        self.grace_s = grace_s
        self.restart_min_s = restart_min_s
        self.stop = anyio.Event()
        self.running: dict[int, anyio.abc.Process] = {}
        self.failure: str | None = None
        """Why the children were given up on, if they were."""
        self.unclean: list[str] = []
        """Children that did not exit cleanly after the stop."""

    async def run(self) -> None:
        """Until the stop (a signal, or a child that cannot run) and every child has exited."""
        async with anyio.create_task_group() as tg:
            await tg.start(self._watch_signals)
            tg.start_soon(self._kill_after_grace)
            async with anyio.create_task_group() as children:
                for index in range(1, self.count + 1):
                    children.start_soon(self._keep_running, index)
            tg.cancel_scope.cancel()

    def request_stop(self) -> None:
        """SIGTERM to every child (a second call: they stop at once); no more restarts."""
        self.stop.set()
        for process in list(self.running.values()):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    async def _watch_signals(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stop.is_set():
                    log.warning("second %s: stopping the processes now", name)
                else:
                    log.info(
                        "%s: draining %d processes (grace %.0f s)", name, self.count, self.grace_s
                    )
                self.request_stop()

    async def _kill_after_grace(self) -> None:
        await self.stop.wait()
        await anyio.sleep(self.grace_s + KILL_AFTER_GRACE_S)
        for index, process in list(self.running.items()):
            log.error("process %d (pid %d) is still running: killing it", index, process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    async def _keep_running(self, index: int) -> None:
        delay = self.restart_min_s
        failures = 0
        while not self.stop.is_set():
            began = anyio.current_time()
            pid, code, last = await self._run_once(index)
            ran_s = anyio.current_time() - began
            outcome = describe_exit(code)
            if self.stop.is_set():
                log.info("process %d (pid %d) %s", index, pid, outcome)
                if code not in _CLEAN_EXITS:
                    self.unclean.append(f"process {index} {outcome} while stopping")
                return
            if ran_s >= HEALTHY_RUN_S:
                failures, delay = 0, self.restart_min_s
            failures += 1
            if failures >= START_ATTEMPTS:
                last = last.removeprefix("mailpipe: ")
                self.failure = (
                    f"process {index} exited {failures} times in a row, each within "
                    f"{HEALTHY_RUN_S:g} s of its start ({outcome}{': ' + last if last else ''})"
                )
                log.error("%s; stopping the others", self.failure)
                self.request_stop()
                return
            log.error(
                "process %d (pid %d) %s after %.1f s; restarting it in %.1f s",
                *(index, pid, outcome, ran_s, delay),
            )
            with anyio.move_on_after(delay):
                await self.stop.wait()
            delay = min(delay * 2, RESTART_MAX_S)

    async def _run_once(self, index: int) -> tuple[int, int, str]:
        """Start the child, pass its stderr on, wait for it; its pid, exit code and last line."""
        process = await anyio.open_process(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=subprocess.PIPE,
            env=self.env,
            start_new_session=True,
        )
        self.running[index] = process
        log.info("process %d started (pid %d)", index, process.pid)
        try:
            if self.stop.is_set():  # the stop came while it was starting
                process.send_signal(signal.SIGTERM)
            assert process.stderr is not None
            last = await forward_lines(process.stderr, f"[p{index}] ")
            code = await process.wait()
        finally:
            del self.running[index]
            with anyio.CancelScope(shield=True):
                if process.returncode is None:  # cancelled: only on a bug here; stop it anyway
                    process.terminate()
                    with anyio.move_on_after(self.grace_s + KILL_AFTER_GRACE_S):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                await process.aclose()
        return process.pid, code, last


async def forward_lines(stream: anyio.abc.ByteReceiveStream, prefix: str) -> str:
    """Copy `stream` to stderr line by line, each line after `prefix`, until its end; the last
    line that was not blank."""
    last = ""
    pending = b""

    def emit(raw: bytes) -> None:
        nonlocal last
        text = raw.decode(errors="replace").rstrip("\r")
        sys.stderr.write(f"{prefix}{text}\n")
        sys.stderr.flush()
        last = text.strip() or last

    async for chunk in stream:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            emit(line)
        if len(pending) > _MAX_LINE:
            emit(pending)
            pending = b""
    if pending:
        emit(pending)
    return last
