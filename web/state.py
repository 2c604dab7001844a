"""What the app's handlers reach: the process's resources and the API's publisher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quart import current_app

if TYPE_CHECKING:
    from pipeline.amqp.publisher import ConfirmedPublisher
    from pipeline.intake import GroupCommit
    from pipeline.resources import Deps


@dataclass
class AppState:
    deps: Deps
    publisher: ConfirmedPublisher
    group_commit: GroupCommit | None = None
    """Shares commits, publishes and marks between concurrent requests (None: one by one)."""


def state() -> AppState:
    value: AppState = current_app.extensions["mailpipe"]
    return value
