"""The `sandbox` role: the built-in SMTP server that keeps every message as an .eml file.

It serves the senders, so it outlives them: the supervisor stops it after the other roles.
"""

from __future__ import annotations

import anyio
from anyio.abc import TaskStatus

from pipeline.mail.sandbox import serve_sandbox
from pipeline.resources import Deps


async def run_sandbox(
    deps: Deps, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_sandbox, deps.settings.sandbox)
        deps.listening["sandbox"] = port
        task_status.started()
