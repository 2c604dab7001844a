"""The `mailpipe` command line: parse, load settings, dispatch. Errors are one line and exit 1."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from pipeline.errors import MailpipeError
from pipeline.settings import Settings, load_settings

log = logging.getLogger("mailpipe")


def _run(args: argparse.Namespace, settings: Settings) -> Awaitable[None]:
    from pipeline.processes import die_with_supervisor
    from pipeline.supervisor import parse_roles, run_service

    die_with_supervisor()  # only in a child of `run --processes N`
    names = parse_roles(args.roles, settings)
    if args.processes == 1:
        return run_service(settings, names)
    from pipeline.processes import run_processes

    return run_processes(
        settings, names, args.processes, config=args.config, log_level=args.log_level
    )


async def _migrate(args: argparse.Namespace, settings: Settings) -> None:
    from pipeline.store.migrate import migrate

    applied = await migrate(settings.database.url)
    print("applied: " + ", ".join(applied) if applied else "database is up to date")


def build_parser() -> argparse.ArgumentParser:
    from pipeline import cli
    from pipeline.bench import cli as bench_cli
    from pipeline.cli import positive_int
    from pipeline.webhooks.cli import add_webhook_commands

    parser = argparse.ArgumentParser(
        prog="mailpipe",
        description="Self-hosted transactional email: REST API, queue, SMTP senders.",
    )
    parser.add_argument(
        "--config", help="a TOML file layered on config/default.toml (or MAILPIPE_CONFIG)"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run the service (every role by default)",
        description="Run the chosen roles in one process (or N, with --processes) until "
        "SIGTERM/SIGINT, then drain.",
    )
    run.add_argument(
        "--roles",
        help="comma-separated subset of: sandbox, api, sender, retry, sweeper, webhooks "
        "(default: all; the sandbox only when smtp.host is empty)",
    )
    run.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        metavar="N",
        help="run the roles in N child processes under a parent that restarts them (default: 1, "
        "no child): the API shares api.port (SO_REUSEPORT), the sandbox runs once, in the parent",
    )
    run.set_defaults(handler=_run)

    migrate = commands.add_parser(
        "migrate", help="create the database if missing and apply migrations"
    )
    migrate.set_defaults(handler=_migrate)
    cli.add_commands(commands)
    bench_cli.add_command(commands)
    add_webhook_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiosmtpd logs every SMTP command at INFO: too chatty next to the service's own lines.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, logging.root.level))
    handler: Callable[[argparse.Namespace, Settings], Awaitable[Any]] = args.handler
    try:
        settings = load_settings(args.config)

        async def go() -> None:
            await handler(args, settings)

        anyio.run(go, backend="asyncio", backend_options=_backend_options())
    except MailpipeError as exc:
        print(f"mailpipe: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _backend_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


if __name__ == "__main__":
    main()
