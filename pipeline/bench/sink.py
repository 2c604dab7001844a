"""The bench's SMTP sink: aiosmtpd in a process of its own, accepting and dropping every message.

    python -m pipeline.bench.sink [--host 127.0.0.1] [--port 0]

Prints `listening <port>` once it listens, then serves until SIGTERM/SIGINT, and prints
`received <n>` on the way out.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import anyio

from pipeline.mail.sandbox import smtp_server

SINK_HOSTNAME = "bench.sink"


class CountingHandler:
    """Accepts every message and keeps nothing but the count."""

    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received += 1
        return "250 2.0.0 OK"


async def serve(host: str, port: int) -> None:
    handler = CountingHandler()
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with smtp_server(handler, host, port, hostname=SINK_HOSTNAME) as server:
            print(f"listening {server.port}", flush=True)
            async for _ in signals:
                break
    print(f"received {handler.received}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.sink")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    from pipeline.__main__ import _backend_options

    try:
        anyio.run(
            serve, args.host, args.port, backend="asyncio", backend_options=_backend_options()
        )
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
