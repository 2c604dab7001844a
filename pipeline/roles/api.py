"""The `api` role: Quart on hypercorn, with a confirmed publisher of its own."""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskStatus

from pipeline.amqp.publisher import ConfirmedPublisher
from pipeline.intake import GroupCommit
from pipeline.resources import Deps
from web.app import create_app
from web.server import bind_socket, serve_app
from web.state import AppState

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 2.0
"""How long a publish waits for the broker's confirm before giving the row to the sweeper."""


async def run_api(deps: Deps, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    settings = deps.settings
    sock = bind_socket(settings.api.host, settings.api.port, reuse_port=settings.api.reuse_port)
    port = sock.getsockname()[1]
    async with (
        ConfirmedPublisher(
            settings.amqp.url, deps.topology, timeout_s=PUBLISH_TIMEOUT_S
        ) as publisher,
        GroupCommit(deps.db, publisher) as group,
    ):
        app = create_app(AppState(deps=deps, publisher=publisher, group_commit=group))
        deps.listening["api"] = port
        log.info("API listening on http://%s:%d", settings.api.host, port)
        task_status.started()
        await serve_app(app, sock, graceful_s=settings.shutdown.grace_s, shutdown=deps.stop.wait)
    if group.batcher.items:
        log.info(
            "group commits: %d requests in %d (%.1f a commit); publishes: %d in %d groups",
            group.batcher.items,
            group.batcher.batches,
            group.batcher.items / max(group.batcher.batches, 1),
            group.published,
            group.publish_groups,
        )
