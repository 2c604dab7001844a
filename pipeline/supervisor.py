"""Runs the chosen roles under one anyio task group, restarts a role that crashes, drains on signal.

A stop (SIGTERM/SIGINT, or `stop` set by a caller) sets `Deps.stop`: every role stops taking new
work and finishes what it holds. Whatever is still running after `shutdown.grace_s` is cancelled;
a second signal cancels at once. Nothing accepted is lost either way: unacked messages return to
their queue and the sweeper reclaims emails whose sender vanished mid-send.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
from anyio.abc import TaskStatus

from pipeline.errors import ConfigError
from pipeline.resources import Deps, open_resources
from pipeline.settings import Settings

log = logging.getLogger(__name__)

Role = Callable[..., Coroutine[Any, Any, None]]

BACKGROUND_ROLES = frozenset({"sandbox"})
"""Roles that serve the others: started first, stopped only after every other role has drained."""

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
HEALTHY_RUN_S = 60.0
"""A run that lasted this long resets the restart backoff."""
START_ATTEMPTS = 5
"""Failed starts in a row that fail the whole start (bad config, port in use)."""


def role_table() -> dict[str, Role]:
    """Every role by name, in start order: the sandbox listens before senders need it."""
    from pipeline.roles.api import run_api
    from pipeline.roles.retry import run_retry
    from pipeline.roles.sandbox import run_sandbox
    from pipeline.roles.sender import run_sender
    from pipeline.roles.sweeper import run_sweeper
    from pipeline.roles.webhooks import run_webhooks

    return {
        "sandbox": run_sandbox,
        "api": run_api,
        "sender": run_sender,
        "retry": run_retry,
        "sweeper": run_sweeper,
        "webhooks": run_webhooks,
    }


def parse_roles(text: str | None, settings: Settings) -> list[str]:
    """The roles to run, in start order; the sandbox only when no SMTP host is configured."""
    table = role_table()
    if not text:
        names = [n for n in table if n != "sandbox" or not settings.smtp.host]
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in table]
        if unknown:
            raise ConfigError(f"--roles: unknown role {unknown[0]!r} (known: {', '.join(table)})")
    return [n for n in table if n in names]


async def supervise(
    name: str, role: Role, deps: Deps, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run `role` until the stop; restart it with backoff whenever it crashes."""
    started = False
    delay = RESTART_MIN_S
    failed_starts = 0
    while not deps.stop.is_set():
        began = anyio.current_time()
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(role, deps)
                if not started:
                    started = True
                    task_status.started()
                    log.info("role %s ready", name)
            if deps.stop.is_set():
                return
            log.error("role %s returned without a stop; restarting", name)
        except Exception as exc:
            if not started:
                failed_starts += 1
                if failed_starts >= START_ATTEMPTS:
                    raise
                log.warning("role %s failed to start (%s); again in %.1f s", name, exc, delay)
            else:
                log.exception("role %s crashed; restarting in %.1f s", name, delay)
        if anyio.current_time() - began > HEALTHY_RUN_S:
            delay = RESTART_MIN_S
        with anyio.move_on_after(delay):
            await deps.stop.wait()
        delay = min(delay * 2, RESTART_MAX_S)


async def _watch_signals(deps: Deps, roles_scope: anyio.CancelScope, grace_s: float) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if deps.stop.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                roles_scope.cancel()
                return
            log.info("%s: draining (grace %.0f s)", signal.Signals(signum).name, grace_s)
            deps.stop.set()
            break
    await anyio.sleep(grace_s)
    log.warning("grace period over: cancelling what is still running")
    roles_scope.cancel()


async def run_roles(
    deps: Deps,
    names: Sequence[str],
    *,
    handle_signals: bool = True,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Start each role (waiting for its readiness), then run until every role has stopped."""
    table = role_table()
    async with anyio.create_task_group() as outer:
        with anyio.CancelScope() as roles_scope:
            if handle_signals:
                outer.start_soon(_watch_signals, deps, roles_scope, deps.settings.shutdown.grace_s)
            else:
                outer.start_soon(_cancel_after_grace, deps, roles_scope)
            async with anyio.create_task_group() as background:
                for name in names:
                    if name in BACKGROUND_ROLES:
                        await background.start(supervise, name, table[name], deps)
                async with anyio.create_task_group() as tg:
                    for name in names:
                        if name not in BACKGROUND_ROLES:
                            await tg.start(supervise, name, table[name], deps)
                    log.info("mailpipe ready: %s", ", ".join(names))
                    task_status.started()
                    if all(name in BACKGROUND_ROLES for name in names):
                        await deps.stop.wait()
                background.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    log.info("mailpipe stopped")


async def _cancel_after_grace(deps: Deps, roles_scope: anyio.CancelScope) -> None:
    await deps.stop.wait()
    await anyio.sleep(deps.settings.shutdown.grace_s)
    roles_scope.cancel()


async def run_service(settings: Settings, names: Sequence[str], **kwargs: Any) -> None:
    """Open the shared resources, then run the roles on them."""
    async with open_resources(settings, with_redis="api" in names) as deps:
        await run_roles(deps, names, **kwargs)
