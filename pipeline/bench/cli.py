"""`mailpipe bench`: the subcommand's arguments, and its entry point."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pipeline.cli import positive_int
from pipeline.errors import CliError
from pipeline.settings import Settings

DESCRIPTION = """\
Measure the pipeline against ceilings taken in the same run on the same machine:

  ingest    accepted emails/s (POST /v1/emails) at --concurrency keep-alive clients for
            --seconds, p50/p99 latency and errors, against GET /bench/hello served by the
            same Quart + hypercorn build (the ceiling);
  delivery  emails/s drained from a backlog of --emails to an SMTP sink, p50/p99 of
            accept-to-250, against raw aiosmtplib sends of a pre-rendered message to the same
            sink over as many connections as the senders' SMTP pools (the ceiling).

It creates a database, an AMQP/Redis prefix and a key of its own (never rate limited), starts
an aiosmtpd sink process (unless --sink) and the service as `mailpipe run` subprocesses:
--processes N API processes sharing one port (SO_REUSEPORT) and N sender processes. The load
generator is a separate process, and says so when it is the bottleneck. Everything it started
is stopped and dropped at the end (unless --keep)."""

EPILOG = """\
examples:
  mailpipe bench                                   # the goals' configuration
  mailpipe bench --processes 2 --json > bench.json
  mailpipe bench --url http://127.0.0.1:8000 --key sk_test_demo123456789   # ingest only"""


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host, int(port)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


async def bench(args: argparse.Namespace, settings: Settings) -> None:
    from pipeline.bench.report import Progress, table
    from pipeline.bench.run import BenchOptions, run_bench

    if args.key and not args.url:
        raise CliError("--key goes with --url (the bench makes its own key otherwise)")
    options = BenchOptions(
        url=args.url,
        key=args.key,
        sink=args.sink,
        concurrency=args.concurrency,
        seconds=args.seconds,
        warmup_s=args.warmup,
        emails=args.emails,
        processes=args.processes,
        config=args.config,
        keep=args.keep,
        log_level=args.service_log_level,
        rounds=args.rounds,
        client=args.client,
        profile_dir=args.profile,
    )
    report = await run_bench(options, settings, Progress())
    if args.json:
        json.dump(report.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(table(report))


def add_command(commands: Any) -> None:
    parser = commands.add_parser(
        "bench",
        help="measure ingest and delivery against same-run ceilings",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url", help="measure ingest on this running API instead (no delivery phase)"
    )
    parser.add_argument("--key", help="with --url: the API key to send with (default: demo key)")
    parser.add_argument(
        "--sink", type=_host_port, metavar="HOST:PORT", help="an SMTP sink to deliver to"
    )
    parser.add_argument(
        "--concurrency", type=positive_int, default=64, help="HTTP clients (default: 64)"
    )
    parser.add_argument(
        "--seconds",
        type=_positive_float,
        default=10.0,
        help="length of each ingest measurement (default: 10)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds of load before each ingest measurement starts (default: 1)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=2,
        help="ingest measurements of each kind, in ABBA order (default: 2)",
    )
    parser.add_argument(
        "--client",
        choices=("lean", "httpx"),
        default="lean",
        help="HTTP client of the load generator: lean (pre-encoded requests on asyncio "
        "streams, the default) or httpx (costs more CPU per request than a hello does)",
    )
    parser.add_argument(
        "--emails", type=positive_int, default=2000, help="delivery backlog (default: 2000)"
    )
    parser.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        help="API processes on one port, and sender processes (default: 1)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--keep", action="store_true", help="keep the database and the logs (printed)"
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=os.path.abspath,
        help="run the service processes under cProfile (CPU clock); DIR/<process>.pstats",
    )
    parser.add_argument(
        "--service-log-level",
        default="INFO",
        help="log level of the service processes (default: INFO)",
    )
    parser.set_defaults(handler=bench)
