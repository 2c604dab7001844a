"""The bench's load generator, a process of its own so that it never shares a core's time
slices with the service it measures inside one event loop.

    python -m pipeline.bench.load < spec.json

The spec (one JSON object on stdin) is an `HttpLoad` or an `SmtpLoad`. While it runs it
prints `{"progress": {...}}` lines on stdout, then one `{"result": {...}}` line. Its own CPU
use is part of the result: near 100 % it may be the bottleneck, and the report says so.

- HTTP: `concurrency` client tasks, each with its own httpx client holding one HTTP/1.1
  keep-alive connection, for `seconds` after `warmup_s` (requests started in the warm-up or
  finished after the end are not counted), or until `count` requests are answered.
- SMTP: `connections` tasks, each with one aiosmtplib connection, send `count` pre-rendered
  messages between them (connecting is part of the time, as it is for the service's pool).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio

PROGRESS_EVERY_S = 0.25


@dataclass(frozen=True)
class HttpLoad:
    base_url: str
    path: str
    concurrency: int
    method: str = "GET"
    body: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    expect: int = 200
    seconds: float | None = None
    warmup_s: float = 0.0
    count: int | None = None
    client: str = "lean"
    """`lean`: pre-encoded requests on asyncio streams (~20 µs of CPU a request); `httpx`:
    httpx.AsyncClient (~0.5-0.8 ms a request here, more than the server's hello)."""
    kind: str = "http"


@dataclass(frozen=True)
class SmtpLoad:
    host: str
    port: int
    connections: int
    count: int
    sender: str
    recipients: list[str]
    message_b64: str
    kind: str = "smtp"


@dataclass
class LoadResult:
    ok: int
    errors: int
    elapsed_s: float
    rate: float
    p50_ms: float | None
    p99_ms: float | None
    cpu: float
    """This process's CPU time over the wall time (1.0 = one core busy all along)."""
    error_kinds: dict[str, int]
    latencies_ms: list[float]
    """Every counted latency, for merging several runs' percentiles."""


def spec_json(spec: HttpLoad | SmtpLoad) -> str:
    return json.dumps(asdict(spec))


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(q * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


class _Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.errors = 0
        self.kinds: Counter[str] = Counter()
        self.latencies: list[float] = []

    def result(self, elapsed_s: float, cpu_s: float) -> LoadResult:
        lat = sorted(self.latencies)
        p50, p99 = percentile(lat, 0.50), percentile(lat, 0.99)
        return LoadResult(
            ok=self.ok,
            errors=self.errors,
            elapsed_s=elapsed_s,
            rate=self.ok / elapsed_s if elapsed_s > 0 else 0.0,
            p50_ms=None if p50 is None else p50 * 1000,
            p99_ms=None if p99 is None else p99 * 1000,
            cpu=cpu_s / elapsed_s if elapsed_s > 0 else 0.0,
            error_kinds=dict(self.kinds),
            latencies_ms=[round(v * 1000, 3) for v in lat],
        )


def _emit(kind: str, payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({kind: payload}) + "\n")
    sys.stdout.flush()


async def _report_progress(tally: _Tally, started: float) -> None:
    while True:
        await anyio.sleep(PROGRESS_EVERY_S)
        _emit(
            "progress",
            {"elapsed_s": time.perf_counter() - started, "ok": tally.ok, "errors": tally.errors},
        )


class LeanHttp:
    """One HTTP/1.1 keep-alive connection sending one pre-encoded request again and again.

    It reads the status line, the headers it needs (Content-Length, Transfer-Encoding,
    Connection) and the body, nothing more: a load generator must cost far less than the
    server it measures, and httpx costs more than a Quart hello does.
    """

    def __init__(
        self,
        base_url: str,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        tls: ssl.SSLContext,
    ) -> None:
        url = urlsplit(base_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.tls = tls if url.scheme == "https" else None
        prefix = url.path.rstrip("/")
        lines = [f"{method} {prefix}{path} HTTP/1.1", f"Host: {url.netloc}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def roundtrip(self) -> int:
        """Send the request and read the whole answer; its status code."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.tls, limit=1 << 20
            )
        reader, writer = self.reader, self.writer
        assert reader is not None
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        length, chunked, close = 0, False, False
        for line in header_lines:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                close = "close" in value.lower()
        if chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await reader.readexactly(length)
        if close:
            await self.close()
        return status


async def run_http(spec: HttpLoad) -> LoadResult:
    import httpx

    if (spec.seconds is None) == (spec.count is None):
        raise ValueError("an HTTP load needs seconds or count, not both")
    tally = _Tally()
    body = spec.body.encode() if spec.body is not None else None
    headers = dict(spec.headers)
    left = [spec.count or 0]
    # One TLS context for every client: building one per client costs ~20 ms of CPU each.
    tls = ssl.create_default_context()
    send: list[Callable[[], Awaitable[int]]] = []
    closers: list[Callable[[], Awaitable[Any]]] = []
    for _ in range(spec.concurrency):
        if spec.client == "httpx":
            http = httpx.AsyncClient(
                base_url=spec.base_url,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                timeout=30.0,
                verify=tls,
                http1=True,
            )

            async def via_httpx(http: httpx.AsyncClient = http) -> int:
                response = await http.request(spec.method, spec.path, content=body, headers=headers)
                await response.aread()
                return response.status_code

            send.append(via_httpx)
            closers.append(http.aclose)
        else:
            lean = LeanHttp(spec.base_url, spec.method, spec.path, headers, body, tls)
            send.append(lean.roundtrip)
            closers.append(lean.close)
    began = time.perf_counter()
    measure_from = began + spec.warmup_s
    end = measure_from + (spec.seconds or 0.0)

    async def client(
        roundtrip: Callable[[], Awaitable[int]], close: Callable[[], Awaitable[Any]]
    ) -> None:
        try:
            while True:
                if spec.count is not None:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                start = time.perf_counter()
                if spec.seconds is not None and start >= end:
                    return
                try:
                    status = await roundtrip()
                    kind = None if status == spec.expect else str(status)
                except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    kind = type(exc).__name__
                    if not isinstance(exc, httpx.HTTPError):
                        await close()
                done = time.perf_counter()
                if spec.seconds is not None and (start < measure_from or done > end):
                    continue
                if kind is None:
                    tally.ok += 1
                    tally.latencies.append(done - start)
                else:
                    tally.errors += 1
                    tally.kinds[kind] += 1
        finally:
            with anyio.CancelScope(shield=True):
                await close()

    cpu0 = time.process_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_report_progress, tally, measure_from)
        async with anyio.create_task_group() as group:
            for roundtrip, close in zip(send, closers, strict=True):
                group.start_soon(client, roundtrip, close)
        tg.cancel_scope.cancel()
    finished = time.perf_counter()
    cpu = time.process_time() - cpu0
    if spec.seconds is not None:
        # The CPU share is taken over the whole run, warm-up included.
        result = tally.result(spec.seconds, cpu * spec.seconds / (finished - began))
    else:
        result = tally.result(finished - began, cpu)
    return result


async def run_smtp(spec: SmtpLoad) -> LoadResult:
    import aiosmtplib

    tally = _Tally()
    raw = base64.b64decode(spec.message_b64)
    left = [spec.count]

    async def connection() -> None:
        smtp = aiosmtplib.SMTP(
            hostname=spec.host, port=spec.port, local_hostname="bench.load", timeout=30
        )
        await smtp.connect()
        try:
            while left[0] > 0:
                left[0] -= 1
                start = time.perf_counter()
                try:
                    await smtp.sendmail(spec.sender, spec.recipients, raw)
                except aiosmtplib.SMTPException as exc:
                    tally.errors += 1
                    tally.kinds[type(exc).__name__] += 1
                    if not smtp.is_connected:
                        await smtp.connect()
                    continue
                tally.ok += 1
                tally.latencies.append(time.perf_counter() - start)
        finally:
            try:
                await smtp.quit()
            except aiosmtplib.SMTPException:
                smtp.close()

    began = time.perf_counter()
    cpu0 = time.process_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_report_progress, tally, began)
        async with anyio.create_task_group() as conns:
            for _ in range(spec.connections):
                conns.start_soon(connection)
        finished = time.perf_counter()
        tg.cancel_scope.cancel()
    return tally.result(finished - began, time.process_time() - cpu0)


async def run(spec: HttpLoad | SmtpLoad) -> LoadResult:
    if isinstance(spec, HttpLoad):
        return await run_http(spec)
    return await run_smtp(spec)


def parse_spec(text: str) -> HttpLoad | SmtpLoad:
    data = json.loads(text)
    kind = data.get("kind")
    if kind == "http":
        return HttpLoad(**data)
    if kind == "smtp":
        return SmtpLoad(**data)
    raise ValueError(f"unknown load kind {kind!r}")


def main() -> None:
    from pipeline.__main__ import _backend_options

    spec = parse_spec(sys.stdin.read())
    result = anyio.run(run, spec, backend="asyncio", backend_options=_backend_options())
    _emit("result", asdict(result))


if __name__ == "__main__":
    main()
