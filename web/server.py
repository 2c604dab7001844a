"""Serve the app with hypercorn inside the supervisor's task group, on a socket bound up front.

Binding before serving lets the role report readiness only once the port is really open (and
report the real port when 0 asked for a free one).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def hypercorn_config(sock: socket.socket, *, graceful_s: float) -> Config:
    config = Config()
    # hypercorn adopts the descriptor; the caller's socket object must not close it.
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = graceful_s
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    return config


async def serve_app(
    app: Quart, sock: socket.socket, *, graceful_s: float, shutdown: Callable[[], Awaitable[None]]
) -> None:
    """Serve until `shutdown` returns, then give in-flight requests `graceful_s` to finish."""
    await serve(app, hypercorn_config(sock, graceful_s=graceful_s), shutdown_trigger=shutdown)
