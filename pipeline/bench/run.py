"""The orchestration of `mailpipe bench`: what it starts, the phases, and what it measures.

Unless `--url` points it at a running API, the bench owns everything it measures: a fresh
database and AMQP/Redis prefix, an account with a key whose limit never throttles, an SMTP sink
process (unless `--sink`), and the service as `mailpipe run` subprocesses (`--processes` N API
processes sharing one port through SO_REUSEPORT, and N sender processes). Phases:

1. ingest ceiling: GET /bench/hello on the same server build, `--seconds` at `--concurrency`;
2. ingest: POST /v1/emails, the same way;
3. the ingest phase's emails are canceled and their messages purged, then `--emails` emails
   are accepted through the API with no sender running: the backlog;
4. delivery: the sender processes start and drain the backlog to the sink; rate and
   accept-to-250 come from the database's timestamps;
5. delivery ceiling: raw aiosmtplib sends of a pre-rendered message to the same sink over as
   many connections as the senders' SMTP pools hold.

The load generator is always a process of its own; every process's CPU is sampled per phase.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
import httpx
import psycopg
from psycopg import sql

from pipeline import keys
from pipeline.amqp.connection import connect
from pipeline.amqp.topology import Topology, delete_all
from pipeline.bench.hello import HELLO_ENV, HELLO_PATH
from pipeline.bench.load import HttpLoad, SmtpLoad, percentile, spec_json
from pipeline.bench.report import BUSY_CPU, Progress, Report
from pipeline.errors import CliError
from pipeline.mail.render import OutgoingEmail, new_message_id, render
from pipeline.resources import topology_for
from pipeline.settings import Settings
from pipeline.store import queries
from pipeline.store.migrate import migrate

BENCH_ACCOUNT = "bench"
BENCH_RATE = 1e9
BENCH_BURST = 2_000_000_000
"""The bench key's limit: never reached, so rate limiting is charged but never throttles."""
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
DRAIN_TIMEOUT_S = 600.0
POLL_S = 0.2

SENDER = "Bench <bench@example.com>"
RECIPIENT = "rcpt@example.org"


def email_request() -> dict[str, Any]:
    """The bench's email: a typical transactional message, text and HTML."""
    return {
        "from_email": SENDER,
        "to": RECIPIENT,
        "subject": "Your receipt #8421 from Example",
        "body_text": "Hello,\n\nThanks for your order #8421. Total: 42.00 EUR.\n\n— Example\n",
        "body_html": "<p>Hello,</p><p>Thanks for your order <b>#8421</b>. Total: 42.00 EUR.</p>"
        "<p>— Example</p>",
        "tags": {"kind": "receipt"},
    }


def prerendered() -> bytes:
    """The bench email rendered once, as the raw SMTP ceiling sends it."""
    body = email_request()
    return render(
        OutgoingEmail(
            from_email=body["from_email"],
            to=(body["to"],),
            subject=body["subject"],
            body_text=body["body_text"],
            body_html=body["body_html"],
            message_id=new_message_id("example.com"),
            date=datetime.now(UTC),
        )
    )


@dataclass(frozen=True)
class BenchOptions:
    url: str | None = None
    key: str | None = None
    sink: tuple[str, int] | None = None
    concurrency: int = 64
    seconds: float = 10.0
    warmup_s: float = 1.0
    emails: int = 2000
    processes: int = 1
    config: str | None = None
    keep: bool = False
    log_level: str = "INFO"
    rounds: int = 2
    client: str = "lean"
    profile_dir: str | None = None


# ---------------------------------------------------------------- processes and CPU


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc), None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot (Linux), None elsewhere."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / _TICKS, total / _TICKS


SERVICES = {"postgres": "postgres", "rabbitmq": "beam.smp", "redis": "redis-server"}
"""The shared services' process names (/proc/<pid>/comm), for their CPU use per phase: the
machine's, not only this bench's (other users of the services count too)."""


def pids_named(comm: str) -> set[int]:
    """Live processes whose command name is `comm` (Linux /proc), empty elsewhere."""
    found: set[int] = set()
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return found
    for entry in entries:
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    found.add(int(entry.name))
    return found


class CpuMeter:
    """CPU use over one phase, in cores (1.0 = one core busy all along): of groups of
    processes, of the shared services, of the whole machine (`machine`), and of whatever else
    runs on it (`other`: the machine minus everything named)."""

    def __init__(self, groups: Mapping[str, Sequence[int]]) -> None:
        self._groups = {k: list(v) for k, v in groups.items() if v}
        self._start: dict[str, dict[int, float]] = {}
        self._machine: tuple[float, float] | None = None
        self._began = 0.0

    def _sample(self) -> dict[str, dict[int, float]]:
        pids = {name: set(p) for name, p in self._groups.items()}
        pids.update({name: pids_named(comm) for name, comm in SERVICES.items()})
        out: dict[str, dict[int, float]] = {}
        for name, group in pids.items():
            values = {p: process_cpu_s(p) for p in group}
            out[name] = {p: v for p, v in values.items() if v is not None}
        return out

    def start(self) -> None:
        self._start = self._sample()
        self._machine = machine_cpu()
        self._began = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._began
        end = self._sample()
        shares: dict[str, float] = {}
        if wall <= 0:
            return shares
        for name, values in end.items():
            # A process started during the phase (a new database backend) counts whole;
            # one that ended during it is missed.
            first = self._start.get(name, {})
            if values:
                shares[name] = sum(v - first.get(p, 0.0) for p, v in values.items()) / wall
        machine = machine_cpu()
        if machine is not None and self._machine is not None:
            busy, total = machine[0] - self._machine[0], machine[1] - self._machine[1]
            if total > 0:
                cores = (busy / total) * (os.cpu_count() or 1)
                shares["other"] = max(0.0, cores - sum(shares.values()))
                shares["machine"] = cores
        return shares


@dataclass(eq=False)
class Child:
    """A `mailpipe run` subprocess of the bench, its roles and its log."""

    name: str
    roles: str
    process: anyio.abc.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise CliError(
                f"{self.name} exited with {self.process.returncode}; its log "
                f"({self.log_path}) ends with:\n{self.log_tail()}"
            )


async def _stop(process: anyio.abc.Process, grace_s: float) -> None:
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(grace_s):
                await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        await process.aclose()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------- the bench's own resources


def database_url(base: str, name: str) -> str:
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path="/" + name))


async def drop_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    admin = database_url(url, "postgres")
    with anyio.CancelScope(shield=True):
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def create_bench_key(db_url: str) -> str:
    """A fresh account and a full-access key whose limit is never reached."""
    new = keys.generate_key(test=True)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        account = await queries.ensure_account(conn, BENCH_ACCOUNT)
        await queries.insert_key(
            conn,
            account_id=account.id,
            lookup=new.lookup,
            hash=new.hash,
            scopes=keys.SCOPES,
            rate=BENCH_RATE,
            burst=BENCH_BURST,
        )
    return new.key


async def delete_topology(amqp_url: str, topology: Topology) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        connection = await connect(amqp_url)
        try:
            channel = await connection.channel()
            await delete_all(channel, topology)
        finally:
            await connection.close()


async def purge_send_queue(amqp_url: str, topology: Topology) -> None:
    connection = await connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.queue_purge(topology.send)
    finally:
        await connection.close()


# ---------------------------------------------------------------- the bench


@dataclass
class Bench:
    options: BenchOptions
    settings: Settings
    progress: Progress
    workdir: Path
    stack: AsyncExitStack
    children: list[Child] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cpu_by_phase: dict[str, dict[str, float]] = field(default_factory=dict)
    db_url: str = ""
    prefix: str = ""
    sink_pid: int | None = None
    sink_received: int | None = None
    loads: int = 0

    # ------------------------------------------------------------ children

    def child_env(self, overrides: Mapping[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(overrides)
        return env

    async def start_child(self, name: str, roles: str, env: Mapping[str, str]) -> Child:
        command = [sys.executable, "-m", "pipeline"]
        if self.options.profile_dir is not None:
            out = f"{self.options.profile_dir}/{name}.pstats"
            command = [sys.executable, "-m", "pipeline.bench.profile", out, "--"]
        command += ["--log-level", self.options.log_level]
        if self.options.config:
            command += ["--config", self.options.config]
        command += ["run", "--roles", roles]
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log_file:
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                cwd=self.workdir,
                env=self.child_env(env),
            )
        child = Child(name, roles, process, log_path)
        self.children.append(child)
        self.stack.push_async_callback(_stop, process, STOP_GRACE_S)
        return child

    async def wait_log(self, child: Child, needle: str) -> None:
        with anyio.fail_after(READY_TIMEOUT_S):
            while True:
                child.check_alive()
                with contextlib.suppress(OSError):
                    if needle in child.log_path.read_text(errors="replace"):
                        return
                await anyio.sleep(POLL_S)

    async def start_sink(self) -> tuple[str, int]:
        log_path = self.workdir / "sink.log"
        with log_path.open("ab") as log_file:
            process = await anyio.open_process(
                [sys.executable, "-m", "pipeline.bench.sink", "--port", "0"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                cwd=self.workdir,
                env=self.child_env({}),
            )

        assert process.stdout is not None
        lines = _lines(process.stdout)

        async def stop_sink() -> None:
            # The sink prints how many messages it received when it stops.
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(STOP_GRACE_S):
                    async for line in lines:
                        if line.startswith("received "):
                            self.sink_received = int(line.split()[1])
                await _stop(process, 1)

        self.stack.push_async_callback(stop_sink)
        with anyio.fail_after(READY_TIMEOUT_S):
            first = await anext(lines, "")
        if not first.startswith("listening "):
            raise CliError(f"the SMTP sink did not start: {first or log_path.read_text()}")
        self.sink_pid = process.pid
        return "127.0.0.1", int(first.split()[1])

    # ------------------------------------------------------------ load

    async def load(
        self,
        label: str,
        spec: HttpLoad | SmtpLoad,
        *,
        watch: Mapping[str, Sequence[int]],
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Run one load generator process to its end: its result, and the CPU shares of it
        and of the `watch`ed processes meanwhile."""
        self.loads += 1
        log_path = self.workdir / f"load-{self.loads}-{label.replace(' ', '-')}.log"
        with log_path.open("ab") as log_file:
            process = await anyio.open_process(
                [sys.executable, "-m", "pipeline.bench.load"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                cwd=self.workdir,
                env=self.child_env({}),
            )
        try:
            assert process.stdin is not None and process.stdout is not None
            await process.stdin.send(spec_json(spec).encode())
            await process.stdin.aclose()
            meter = CpuMeter({**watch, "load": [process.pid]})
            meter.start()
            result: dict[str, Any] | None = None
            shares: dict[str, float] = {}
            async for line in _lines(process.stdout):
                message = json.loads(line)
                if "progress" in message:
                    self._draw(label, spec, message["progress"])
                elif "result" in message:
                    shares = meter.stop()  # before the load generator exits
                    result = message["result"]
            await process.wait()
        finally:
            await _stop(process, 1)
        self.progress.done()
        if result is None or process.returncode != 0:
            raise CliError(
                f"the load generator failed ({process.returncode}):\n"
                + log_path.read_text(errors="replace")[-2000:]
            )
        return result, shares

    def _draw(self, label: str, spec: HttpLoad | SmtpLoad, p: Mapping[str, Any]) -> None:
        detail = f"{p['ok']} ok, {p['errors']} errors"
        if isinstance(spec, HttpLoad) and spec.seconds is not None:
            if p["elapsed_s"] < 0:
                self.progress.bar(label, 0, "warming up")
            else:
                self.progress.bar(label, p["elapsed_s"] / spec.seconds, detail)
        else:
            total = spec.count or 1
            self.progress.bar(label, (p["ok"] + p["errors"]) / total, detail)

    def flag_busy(self, phase: str, who: str, share: float | None, what: str) -> None:
        if share is not None and share >= BUSY_CPU:
            self.notes.append(f"{phase}: {who} used {share:.0%} of a core: {what}")

    # ------------------------------------------------------------ phases

    async def ingest(
        self, base_url: str, key: str, api_pids: Sequence[int], *, hello: bool
    ) -> dict[str, Any]:
        """`--rounds` of the ceiling and the measured load, in ABBA order (hello, ingest,
        ingest, hello, ...), so that a machine whose background load drifts during the run
        weighs on both alike."""
        o = self.options
        watch = {"api": api_pids}
        common: dict[str, Any] = {
            "base_url": base_url,
            "concurrency": o.concurrency,
            "seconds": o.seconds,
            "warmup_s": o.warmup_s,
            "client": o.client,
        }
        specs = {
            "hello": HttpLoad(path=HELLO_PATH, **common),
            "ingest": HttpLoad(
                path="/v1/emails",
                method="POST",
                body=json.dumps(email_request()),
                headers={"X-API-Key": key, "Content-Type": "application/json"},
                expect=202,
                **common,
            ),
        }
        titles = {"hello": f"ingest ceiling: GET {HELLO_PATH}", "ingest": "ingest: POST /v1/emails"}
        runs: dict[str, list[dict[str, Any]]] = {"hello": [], "ingest": []}
        shares: dict[str, list[dict[str, float]]] = {"hello": [], "ingest": []}
        for r in range(o.rounds):
            order = ["hello", "ingest"] if r % 2 == 0 else ["ingest", "hello"]
            for phase in order:
                if phase == "hello" and not hello:
                    continue
                self.progress.step(
                    f"{titles[phase]} for {o.seconds:g} s (round {r + 1} of {o.rounds})"
                )
                result, cpu = await self.load(phase, specs[phase], watch=watch)
                runs[phase].append(result)
                shares[phase].append(cpu)
        out: dict[str, Any] = {}
        for phase, name in (("hello", "hello"), ("ingest", "accept")):
            if not runs[phase]:
                out[name] = None
                continue
            merged = merge_runs(runs[phase])
            self.cpu_by_phase[phase] = mean_shares(shares[phase])
            merged["server_cpu"] = self.cpu_by_phase[phase].get("api")
            api = merged["server_cpu"]
            self.flag_busy(
                phase,
                "the API" if o.processes == 1 else "each API process",
                None if api is None else api / o.processes,
                "it is the bottleneck",
            )
            merged["rounds"] = [round(x["rate"], 1) for x in runs[phase]]
            out[name] = merged
            self.flag_busy(
                phase,
                "the load generator",
                merged["cpu"],
                "it may be the bottleneck",
            )
        if out["hello"] is not None and out["hello"]["rate"] > 0:
            out["ratio"] = out["accept"]["rate"] / out["hello"]["rate"]
        else:
            out["ratio"] = None
        return out

    async def delivery(
        self, base_url: str, key: str, smtp: tuple[str, int], api_pids: Sequence[int]
    ) -> dict[str, Any]:
        """The raw ceiling, then the pipeline draining a backlog, then the ceiling again (the
        ceiling is the mean of the two, for the same reason as ingest's ABBA order)."""
        o = self.options
        sink = {"sink": [self.sink_pid] if self.sink_pid else []}
        connections = self.settings.smtp.pool_size * o.processes
        raw_spec = SmtpLoad(
            host=smtp[0],
            port=smtp[1],
            connections=connections,
            count=o.emails,
            sender="bench@example.com",
            recipients=[RECIPIENT],
            message_b64=base64.b64encode(prerendered()).decode(),
        )
        raws: list[dict[str, Any]] = []
        raw_shares: list[dict[str, float]] = []

        async def ceiling(which: str) -> None:
            self.progress.step(
                f"delivery ceiling ({which}): {o.emails} raw aiosmtplib sends over "
                f"{connections} connections"
            )
            result, shares = await self.load("raw smtp", raw_spec, watch=sink)
            raws.append(result)
            raw_shares.append(shares)

        await ceiling("before")
        await self.fill_backlog(base_url, key, api_pids)
        pipeline = await self.drain(smtp)
        await ceiling("after")

        raw = merge_runs(raws)
        raw["rounds"] = [round(x["rate"], 1) for x in raws]
        self.cpu_by_phase["raw smtp"] = mean_shares(raw_shares)
        self.flag_busy("raw smtp", "the load generator", raw["cpu"], "it may be the bottleneck")
        self.flag_busy(
            "raw smtp", "the SMTP sink", self.cpu_by_phase["raw smtp"].get("sink"), "the ceiling"
        )
        ratio = pipeline["rate"] / raw["rate"] if raw["rate"] > 0 else None
        return {"pipeline": pipeline, "raw": raw, "ratio": ratio, "smtp_connections": connections}

    async def fill_backlog(self, base_url: str, key: str, api_pids: Sequence[int]) -> None:
        """Cancel and purge what the ingest phase left, then accept `--emails` through the API
        with no sender running."""
        o = self.options
        topology = replace(topology_for(self.settings), prefix=self.prefix)
        self.progress.step("clearing the ingest phase's emails")
        await purge_send_queue(self.settings.amqp.url, topology)
        async with await psycopg.AsyncConnection.connect(self.db_url, autocommit=True) as conn:
            await conn.execute(
                "UPDATE emails SET status = 'canceled' WHERE status IN ('queued', 'scheduled')"
            )
        self.progress.step(f"backlog: accepting {o.emails} emails (no sender running)")
        prefill = HttpLoad(
            base_url=base_url,
            path="/v1/emails",
            method="POST",
            body=json.dumps(email_request()),
            headers={"X-API-Key": key, "Content-Type": "application/json"},
            expect=202,
            concurrency=o.concurrency,
            count=o.emails,
            client=o.client,
        )
        filled, shares = await self.load("backlog", prefill, watch={"api": api_pids})
        self.cpu_by_phase["backlog"] = shares
        if filled["errors"]:
            raise CliError(f"the backlog was not accepted whole: {filled['error_kinds']}")

    async def drain(self, smtp: tuple[str, int]) -> dict[str, Any]:
        """Start the sender processes and wait until the backlog is sent; its figures."""
        o = self.options
        self.progress.step(f"delivery: {o.processes} sender process(es) drain the backlog")
        env = self.service_env(smtp)
        senders = []
        for i in range(o.processes):
            roles = "sender,retry,sweeper" if i == 0 else "sender"
            senders.append(await self.start_child(f"sender-{i + 1}", roles, env))
        meter = CpuMeter(
            {"sender": [c.pid for c in senders], "sink": [self.sink_pid] if self.sink_pid else []}
        )
        meter.start()
        peak_rss = 0
        async with await psycopg.AsyncConnection.connect(self.db_url, autocommit=True) as conn:
            with anyio.fail_after(DRAIN_TIMEOUT_S):
                while True:
                    for c in senders:
                        c.check_alive()
                    peak_rss = max(peak_rss, max(process_rss(c.pid) or 0 for c in senders))
                    cur = await conn.execute(
                        "SELECT count(*) FILTER (WHERE status = 'sent'),"
                        " count(*) FILTER (WHERE status NOT IN"
                        " ('sent', 'queued', 'sending', 'deferred'))"
                        " FROM emails WHERE status <> 'canceled'"
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    sent, failed = row
                    self.progress.bar("delivery", sent / o.emails, f"{sent} sent, {failed} failed")
                    if sent + failed >= o.emails:
                        break
                    await anyio.sleep(POLL_S)
            shares = meter.stop()
            self.progress.done()
            pipeline = await delivery_stats(conn)
        self.cpu_by_phase["delivery"] = shares
        pipeline["server_cpu"] = shares.get("sender")
        pipeline["sender_peak_rss_mb"] = round(peak_rss / 2**20, 1) if peak_rss else None
        sender = shares.get("sender")
        self.flag_busy(
            "delivery",
            "the sender" if o.processes == 1 else "each sender",
            None if sender is None else sender / o.processes,
            "it is the bottleneck",
        )
        self.flag_busy("delivery", "the SMTP sink", shares.get("sink"), "it may be the bottleneck")
        return pipeline

    def service_env(self, smtp: tuple[str, int]) -> dict[str, str]:
        return {
            "MAILPIPE_DATABASE_URL": self.db_url,
            "MAILPIPE_AMQP_PREFIX": self.prefix,
            "MAILPIPE_REDIS_PREFIX": self.prefix,
            "MAILPIPE_SMTP_HOST": smtp[0],
            "MAILPIPE_SMTP_PORT": str(smtp[1]),
            "MAILPIPE_SMTP_USERNAME": "",
            "MAILPIPE_SMTP_PASSWORD": "",
            "MAILPIPE_SMTP_STARTTLS": "false",
            "MAILPIPE_DEV_DEMO_KEY": "false",
            "MAILPIPE_SHUTDOWN_GRACE_S": "5",
            HELLO_ENV: "1",
        }


def merge_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several load results as one: rates over the summed time, percentiles over every
    latency, CPU weighted by time. The latencies themselves are left out."""
    elapsed = sum(r["elapsed_s"] for r in runs)
    ok = sum(r["ok"] for r in runs)
    latencies = sorted(v for r in runs for v in r["latencies_ms"])
    kinds: dict[str, int] = {}
    for r in runs:
        for k, n in r["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + n
    return {
        "ok": ok,
        "errors": sum(r["errors"] for r in runs),
        "elapsed_s": elapsed,
        "rate": ok / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "cpu": sum(r["cpu"] * r["elapsed_s"] for r in runs) / elapsed if elapsed > 0 else 0.0,
        "error_kinds": kinds,
    }


def mean_shares(samples: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys_seen = dict.fromkeys(k for s in samples for k in s)
    return {
        k: sum(s[k] for s in samples if k in s) / sum(1 for s in samples if k in s)
        for k in keys_seen
    }


def process_rss(pid: int) -> int | None:
    """Resident set size in bytes of a live process (Linux /proc), None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


async def delivery_stats(conn: Any) -> dict[str, Any]:
    """Rate and latencies of the drained backlog, from the database's own clock: the rate from
    the first claim to the last `sent`; p50/p99 of accept → 250 and of claim → 250."""
    cur = await conn.execute(
        "WITH b AS (SELECT e.id, e.status, e.created_at, e.sent_at,"
        " (SELECT max(v.created_at) FROM events v WHERE v.email_id = e.id"
        " AND v.type = 'email.sending') AS claimed_at"
        " FROM emails e WHERE e.status <> 'canceled')"
        " SELECT count(*) FILTER (WHERE status = 'sent'),"
        " count(*) FILTER (WHERE status <> 'sent'),"
        " extract(epoch FROM max(sent_at) - min(claimed_at)),"
        " percentile_disc(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at)),"
        " percentile_disc(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - created_at)),"
        " percentile_disc(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - claimed_at)),"
        " percentile_disc(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - claimed_at))"
        " FROM b"
    )
    row = await cur.fetchone()
    sent, errors, span, p50, p99, s50, s99 = row

    def ms(v: Any) -> float | None:
        return None if v is None else float(v) * 1000

    span_s = float(span or 0)
    return {
        "ok": sent,
        "errors": errors,
        "elapsed_s": span_s,
        "rate": sent / span_s if span_s > 0 else 0.0,
        "p50_ms": ms(p50),
        "p99_ms": ms(p99),
        "send_p50_ms": ms(s50),
        "send_p99_ms": ms(s99),
    }


async def _lines(stream: anyio.abc.ByteReceiveStream) -> AsyncIterator[str]:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            if line.strip():
                yield line.decode()
    if buffer.strip():
        yield buffer.decode()


def _uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


@asynccontextmanager
async def _workdir(keep: bool) -> AsyncIterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mailpipe-bench-"))
    try:
        yield path
    finally:
        if not keep:
            import shutil

            shutil.rmtree(path, ignore_errors=True)


async def run_bench(options: BenchOptions, settings: Settings, progress: Progress) -> Report:
    o = options
    setup: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "uvloop": _uvloop(),
        "concurrency": o.concurrency,
        "seconds": o.seconds,
        "warmup_s": o.warmup_s,
        "emails": o.emails,
        "rounds": o.rounds,
        "client": o.client,
        "processes": [],
    }
    report = Report(setup=setup)
    async with _workdir(o.keep) as workdir, AsyncExitStack() as stack:
        bench = Bench(o, settings, progress, workdir, stack)
        report.notes = bench.notes
        if o.keep:
            progress.step(f"logs in {workdir}")
        if o.url is not None:
            await _external(bench, report)
        else:
            await _owned(bench, report)
        setup["cpu_by_phase"] = bench.cpu_by_phase
    if bench.sink_received is not None and report.delivery is not None:
        report.delivery["sink_received"] = bench.sink_received
    return report


async def _external(bench: Bench, report: Report) -> None:
    o = bench.options
    assert o.url is not None
    key = o.key or keys.DEMO_KEY
    async with httpx.AsyncClient(base_url=o.url, timeout=10) as http:
        try:
            hello = (await http.get(HELLO_PATH)).status_code == 200
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach {o.url}: {exc}") from None
    if not hello:
        bench.notes.append(
            f"{o.url} does not serve {HELLO_PATH} (start it with {HELLO_ENV}=1): no ceiling"
        )
    report.setup["processes"].append({"count": 1, "what": "API", "command": f"external, {o.url}"})
    report.ingest = await bench.ingest(o.url.rstrip("/"), key, [], hello=hello)
    bench.notes.append("delivery is measured only on a service the bench starts (no --url)")


LIMITER_FALLBACK_LOG = "Redis rate limiter unavailable"


def limiter_fallbacks(log_path: Path) -> int:
    """How often an API process's log says its rate limiter stopped asking Redis."""
    try:
        return log_path.read_text(errors="replace").count(LIMITER_FALLBACK_LOG)
    except OSError:
        return 0


async def _owned(bench: Bench, report: Report) -> None:
    o, settings, progress = bench.options, bench.settings, bench.progress
    run = secrets.token_hex(4)
    bench.prefix = f"bench{run}."
    bench.db_url = database_url(settings.database.url, f"mailpipe_bench_{run}")
    topology = replace(topology_for(settings), prefix=bench.prefix)
    progress.step(f"database {urlsplit(bench.db_url).path.lstrip('/')}, prefix {bench.prefix}")
    await migrate(bench.db_url)
    if not o.keep:
        bench.stack.push_async_callback(drop_database, bench.db_url)
    bench.stack.push_async_callback(delete_topology, settings.amqp.url, topology)
    key = await create_bench_key(bench.db_url)

    if o.sink is not None:
        smtp = o.sink
    else:
        progress.step("starting the SMTP sink")
        smtp = await bench.start_sink()
    report.setup["sink"] = f"{smtp[0]}:{smtp[1]}" + (" (external)" if o.sink else " (aiosmtpd)")
    port = free_port()
    env = bench.service_env(smtp)
    env["MAILPIPE_API_HOST"] = "127.0.0.1"
    env["MAILPIPE_API_PORT"] = str(port)
    if o.processes > 1:
        env["MAILPIPE_API_REUSE_PORT"] = "true"
    progress.step(f"starting {o.processes} API process(es) on port {port}")
    apis = [await bench.start_child(f"api-{i + 1}", "api", env) for i in range(o.processes)]
    for child in apis:
        await bench.wait_log(child, "mailpipe ready")
    report.setup["processes"] = [
        {"count": o.processes, "what": "API", "command": "mailpipe run --roles api"},
        {
            "count": 1,
            "what": "sender",
            "command": "mailpipe run --roles sender,retry,sweeper",
        },
    ]
    if o.processes > 1:
        report.setup["processes"].append(
            {"count": o.processes - 1, "what": "sender", "command": "mailpipe run --roles sender"}
        )
    report.setup["smtp_connections"] = settings.smtp.pool_size * o.processes
    base_url = f"http://127.0.0.1:{port}"
    api_pids = [c.pid for c in apis]
    report.ingest = await bench.ingest(base_url, key, api_pids, hello=True)
    fallbacks = sum(limiter_fallbacks(c.log_path) for c in apis)
    if fallbacks:
        bench.notes.append(
            f"ingest: the rate limiter fell back to per-process decisions {fallbacks} time(s) "
            "(Redis answered later than rate_limit.redis_timeout_ms)"
        )
    report.delivery = await bench.delivery(base_url, key, smtp, api_pids)
    progress.step("stopping")
