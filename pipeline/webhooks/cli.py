"""`mailpipe webhooks verify`: check a received webhook request the way a receiver should."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import CliError
from pipeline.settings import Settings
from pipeline.webhooks import signing

VERIFY_HELP = """\
Check a webhook request against the endpoint's signing secret (Standard Webhooks):
the body must be byte for byte what was received, and the headers must include
webhook-id, webhook-timestamp and webhook-signature. When the signature is valid it
prints the webhook-id and the event type and exits 0; else it exits 1 with one line
saying why."""

VERIFY_EXAMPLES = """\
examples:
  mailpipe webhooks verify --secret whsec_… --payload body.json --headers headers.txt
  mailpipe webhooks verify --secret whsec_… --payload body.json \\
      --headers '{"webhook-id": "evt_…", "webhook-timestamp": "1795860000",
                  "webhook-signature": "v1,…"}' --tolerance 0

--headers takes a file or the text itself: `Name: value` lines (as an HTTP
request shows them) or a JSON object."""


def _read(source: str, what: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise CliError(f"{what}: cannot read {source}: {exc.strerror or exc}") from None


def parse_headers(text: str) -> dict[str, str]:
    """A JSON object, or `Name: value` lines (a request line and blank lines are skipped)."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except ValueError as exc:
            raise CliError(f"--headers: not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise CliError("--headers: expected a JSON object")
        return {str(k): str(v) for k, v in value.items()}
    headers: dict[str, str] = {}
    for line in stripped.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() and " " not in name.strip():
            headers[name.strip()] = value.strip()
    return headers


def _headers_arg(value: str) -> dict[str, str]:
    path = Path(value)
    if value == "-" or (len(value) < 4096 and "\n" not in value and path.is_file()):
        text = _read(value, "--headers").decode("utf-8", "replace")
    else:
        text = value
    return parse_headers(text)


async def webhooks_verify(args: argparse.Namespace, settings: Settings) -> None:
    if args.payload == "-" and args.headers == "-":
        raise CliError("--payload and --headers cannot both be read from stdin")
    body = _read(args.payload, "--payload")
    headers = _headers_arg(args.headers)
    tolerance = None if args.tolerance == 0 else args.tolerance
    try:
        signing.verify(args.secret, headers, body, tolerance_s=tolerance)
    except signing.SignatureError as exc:
        raise CliError(f"invalid: {exc}") from None
    lower = {k.lower(): v for k, v in headers.items()}
    event: Any = None
    try:
        event = json.loads(body)
    except ValueError:
        pass
    kind = event.get("type") if isinstance(event, dict) else None
    print(f"valid: webhook-id {lower['webhook-id']}" + (f", type {kind}" if kind else ""))


def add_webhook_commands(commands: Any) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    webhooks = commands.add_parser(
        "webhooks",
        help="webhook helpers",
        description="Helpers for webhook receivers. Endpoints are managed with the API: "
        "POST/GET /v1/webhooks, DELETE /v1/webhooks/{id}.",
    )
    wh = webhooks.add_subparsers(dest="webhooks_command", metavar="ACTION", required=True)
    verify = wh.add_parser(
        "verify",
        help="check the signature of a received webhook request",
        formatter_class=raw,
        description=VERIFY_HELP,
        epilog=VERIFY_EXAMPLES,
    )
    verify.add_argument("--secret", required=True, help="the endpoint's secret, whsec_…")
    verify.add_argument(
        "--payload", required=True, help="file holding the request body as received (- = stdin)"
    )
    verify.add_argument(
        "--headers",
        required=True,
        help="file or text: `Name: value` lines or a JSON object (- = stdin)",
    )
    verify.add_argument(
        "--tolerance",
        type=float,
        default=signing.TOLERANCE_S,
        help="seconds webhook-timestamp may be off from now "
        f"(default {signing.TOLERANCE_S}; 0 skips the check)",
    )
    verify.set_defaults(handler=webhooks_verify)
