"""A TCP proxy on 127.0.0.1 that a test owns, to simulate outages of a shared service.

    async with tcp_proxy("127.0.0.1", 6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        ...
        proxy.cut()      # reset every connection; new ones are reset at once (a dead server)
        proxy.hang()     # nothing flows any more, new connections are accepted and left
                         # waiting (a hung or very slow server)
        proxy.restore()  # forward again; what hang() held back flows on

The machine's services are never touched: only the connections through the proxy suffer.
"""

from __future__ import annotations

import enum
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup


class Mode(enum.Enum):
    FORWARD = "forward"
    CUT = "cut"
    HANG = "hang"


def _reset(stream: SocketStream | None) -> None:
    """Make the coming close send RST (not FIN): the peer sees 'connection reset'."""
    if stream is None:
        return
    sock = stream.extra(SocketAttribute.raw_socket, None)
    if sock is not None and sock.fileno() >= 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


@dataclass(eq=False)
class _Connection:
    scope: anyio.CancelScope
    client: SocketStream
    upstream: SocketStream | None = None


@dataclass(eq=False)
class TcpProxy:
    """Forwards 127.0.0.1:`port` to the target; `cut`, `hang` and `restore` switch modes."""

    target_host: str
    target_port: int
    host: str = "127.0.0.1"
    port: int = 0
    mode: Mode = Mode.FORWARD
    accepted: int = 0
    """Connections accepted so far (in any mode)."""
    _flowing: anyio.Event = field(default_factory=anyio.Event)
    _connections: set[_Connection] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._flowing.set()

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def cut(self) -> None:
        """Reset every open connection; from now on new ones are reset as soon as accepted."""
        self.mode = Mode.CUT
        self._flowing.set()  # release held pumps so they see the cut and stop
        for conn in list(self._connections):
            _reset(conn.client)
            _reset(conn.upstream)
            conn.scope.cancel()

    def hang(self) -> None:
        """Stop forwarding in both directions; keep connections open; accept new ones and let
        them wait. Nothing is lost: `restore()` lets it all through (late)."""
        self.mode = Mode.HANG
        if self._flowing.is_set():
            self._flowing = anyio.Event()

    def restore(self) -> None:
        """Forward normally again."""
        self.mode = Mode.FORWARD
        self._flowing.set()

    async def _until_flowing(self) -> None:
        while not self._flowing.is_set():
            await self._flowing.wait()

    async def handle(self, client: SocketStream) -> None:
        self.accepted += 1
        with anyio.CancelScope() as scope:
            conn = _Connection(scope=scope, client=client)
            self._connections.add(conn)
            try:
                async with client:
                    if self.mode is Mode.CUT:
                        _reset(client)
                        return
                    await self._until_flowing()
                    if self.mode is Mode.CUT:
                        _reset(client)
                        return
                    try:
                        upstream = await anyio.connect_tcp(self.target_host, self.target_port)
                    except OSError:
                        _reset(client)
                        return
                    conn.upstream = upstream
                    async with upstream, anyio.create_task_group() as tg:
                        tg.start_soon(self._pump, client, upstream, tg)
                        tg.start_soon(self._pump, upstream, client, tg)
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            finally:
                self._connections.discard(conn)

    async def _pump(self, source: SocketStream, sink: SocketStream, tg: TaskGroup) -> None:
        try:
            while True:
                data = await source.receive()
                await self._until_flowing()
                if self.mode is Mode.CUT:
                    break
                await sink.send(data)
        except (
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            OSError,
        ):
            pass
        tg.cancel_scope.cancel()  # one side closed: close both


@asynccontextmanager
async def tcp_proxy(
    target_host: str, target_port: int, *, host: str = "127.0.0.1"
) -> AsyncIterator[TcpProxy]:
    """A proxy listening on a free port of `host`, forwarding to the target until exit."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=0)
    async with listener, anyio.create_task_group() as tg:
        proxy = TcpProxy(
            target_host, target_port, host=host, port=listener.extra(SocketAttribute.local_port)
        )
        tg.start_soon(listener.serve, proxy.handle, tg)
        try:
            yield proxy
        finally:
            proxy.cut()
            tg.cancel_scope.cancel()
