"""Operator commands: accounts, API keys, dead letters. Each prints a result or one error line."""

from __future__ import annotations

import argparse
import math
from typing import Any

from pipeline import deadletters, keys
from pipeline.errors import CliError, DeadLetterError
from pipeline.resources import open_pool, topology_for
from pipeline.settings import Settings
from pipeline.store import queries
from pipeline.store.migrate import migrate

KEYS_HELP = """\
API keys authenticate calls to the HTTP API: send one as `X-API-Key: <key>` or
`Authorization: Bearer <key>`. A key belongs to one account and sees only that
account's data. It is printed once, at creation, and stored only as a SHA-256 hash
(found by its non-secret lookup part, the 8 characters after sk_live_/sk_test_).
Keys are sk_live_… when an SMTP relay is configured, sk_test_… with the sandbox.

scopes:
  send    POST /v1/emails (and batch, cancel)
  read    GET /v1/emails, /v1/emails/{id}, /v1/emails/{id}/events
  admin   suppressions, webhooks, dead letters

rate limits:
  Each key may send --rate emails per second on average and --burst at once (GCRA,
  shared by every API process through Redis); without them rate_limit.rate and
  rate_limit.burst from the config apply. Over the limit the API answers 429 with
  Retry-After.

A revoked key is refused (401) by every API process within a second."""

KEYS_EXAMPLES = """\
examples:
  mailpipe accounts create acme
  mailpipe keys create --account acme                  # all scopes, config limits
  mailpipe keys create --account acme --scopes send --rate 50 --burst 100
  mailpipe keys create --account acme --scopes read
  mailpipe keys list --account acme
  mailpipe keys revoke key_4fJ2vQm9XcT1bN7pLs3dRk"""


async def _connect(settings: Settings) -> Any:
    import psycopg

    await migrate(settings.database.url)
    return await psycopg.AsyncConnection.connect(
        settings.database.url, autocommit=True, options="-c TimeZone=UTC"
    )


async def accounts_create(args: argparse.Namespace, settings: Settings) -> None:
    async with await _connect(settings) as conn:
        if await queries.account_by_name(conn, args.name):
            raise CliError(f"account {args.name!r} already exists")
        account = await queries.create_account(conn, args.name)
    print(f"{account.id}\t{account.name}")


async def _account_id(conn: Any, name: str) -> str:
    account = await queries.account_by_name(conn, name)
    if account is None:
        raise CliError(f"no account {name!r} (create it with: mailpipe accounts create {name})")
    return account.id


async def keys_create(args: argparse.Namespace, settings: Settings) -> None:
    try:
        scopes = keys.parse_scopes(args.scopes)
    except ValueError as exc:
        raise CliError(f"--scopes: {exc}") from None
    if (args.rate is None) != (args.burst is None):
        raise CliError("--rate and --burst go together")
    if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0):
        raise CliError(f"--rate: expected a number of emails per second > 0, got {args.rate}")
    if args.burst is not None and args.burst < 1:
        raise CliError(f"--burst: expected an integer >= 1, got {args.burst}")
    new = keys.generate_key(test=not settings.smtp.host)
    async with await _connect(settings) as conn:
        account_id = await _account_id(conn, args.account)
        row = await queries.insert_key(
            conn,
            account_id=account_id,
            lookup=new.lookup,
            hash=new.hash,
            scopes=scopes,
            rate=args.rate,
            burst=args.burst,
        )
    print(f"id:     {row.id}\nscopes: {','.join(row.scopes)}\nkey:    {new.key}")
    print("Store the key now: it is shown only this once.")


async def keys_list(args: argparse.Namespace, settings: Settings) -> None:
    async with await _connect(settings) as conn:
        rows = await queries.list_keys(conn, await _account_id(conn, args.account))
    print("id\tprefix\tscopes\trate\tburst\tcreated_at\trevoked_at")
    for k in rows:
        print(
            f"{k.id}\tsk_…{k.lookup}\t{','.join(k.scopes)}\t{k.rate or '-'}\t{k.burst or '-'}"
            f"\t{k.created_at.isoformat()}\t{k.revoked_at.isoformat() if k.revoked_at else '-'}"
        )


async def keys_revoke(args: argparse.Namespace, settings: Settings) -> None:
    async with await _connect(settings) as conn:
        if not await queries.revoke_key(conn, args.id):
            raise CliError(f"no live key {args.id!r}")
    print(f"revoked {args.id}")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1, else a usage error naming what was given."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _response_text(reply: Any) -> str:
    if not reply:
        return "-"
    code = reply.get("code")
    return f"{code if code is not None else '-'} {reply.get('message', '')}".strip()


async def dlq_list(args: argparse.Namespace, settings: Settings) -> None:
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    async with await _connect(settings) as conn:
        account_id = await _account_id(conn, args.account) if args.account else None
        letters = await queries.list_dead_letters(
            conn, account_id=account_id, limit=args.limit, pending_only=args.pending
        )
    print("id\temail_id\tattempts\tcreated_at\treplayed_at\treason\tlast_response")
    for d in letters:
        replayed = d.replayed_at.isoformat() if d.replayed_at else "-"
        print(
            f"{d.id}\t{d.email_id}\t{d.attempts}\t{d.created_at.isoformat()}\t{replayed}"
            f"\t{d.reason}\t{_response_text(d.last_response)}"
        )


async def dlq_replay(args: argparse.Namespace, settings: Settings) -> None:
    if (args.id is None) == (not args.all):
        raise CliError("give one dead letter ID, or --all")
    async with await _connect(settings) as conn:
        account_id = await _account_id(conn, args.account) if args.account else None
    from pipeline.amqp.publisher import ConfirmedPublisher

    async with (
        open_pool(settings) as db,
        ConfirmedPublisher(settings.amqp.url, topology_for(settings)) as publisher,
    ):
        try:
            if args.all:
                done = await deadletters.replay_all(db, publisher, account_id=account_id)
            else:
                done = [await deadletters.replay(db, publisher, args.id, account_id=account_id)]
        except DeadLetterError as exc:
            raise CliError(str(exc)) from None
    for r in done:
        note = "" if r.published else " (broker did not confirm; the sweeper will republish it)"
        print(f"replayed {r.letter.id}: {r.letter.email_id} queued{note}")
    if args.all:
        print(f"{len(done)} dead letter(s) replayed")


def add_commands(commands: Any) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    accounts = commands.add_parser(
        "accounts",
        help="manage accounts",
        formatter_class=raw,
        description="An account owns API keys, emails, suppressions and webhooks; every API "
        "call sees only\nthe data of its key's account.",
        epilog="example:\n  mailpipe accounts create acme",
    )
    acc = accounts.add_subparsers(dest="accounts_command", metavar="ACTION", required=True)
    create = acc.add_parser(
        "create", help="create an account", description="Create an account; prints its id."
    )
    create.add_argument("name", help="a unique name, used by --account in `mailpipe keys`")
    create.set_defaults(handler=accounts_create)

    keys_parser = commands.add_parser(
        "keys",
        help="manage API keys",
        formatter_class=raw,
        description=KEYS_HELP,
        epilog=KEYS_EXAMPLES,
    )
    ks = keys_parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    kc = ks.add_parser(
        "create",
        help="create a key and print it once",
        formatter_class=raw,
        description="Create an API key for an account and print it. It is shown only this "
        "once (only its\nhash is stored): copy it now.",
        epilog=KEYS_EXAMPLES,
    )
    kc.add_argument("--account", required=True, help="the account's name")
    kc.add_argument(
        "--scopes",
        default="send,read,admin",
        help="comma-separated, from send, read, admin (default: all three)",
    )
    kc.add_argument(
        "--rate",
        type=float,
        help="this key's sustained limit in emails per second (with --burst; "
        "default: rate_limit.rate from config)",
    )
    kc.add_argument(
        "--burst",
        type=int,
        help="how many emails this key may send at once (with --rate; "
        "default: rate_limit.burst from config)",
    )
    kc.set_defaults(handler=keys_create)
    kl = ks.add_parser(
        "list",
        help="list an account's keys (no secrets)",
        description="List an account's keys: id, the non-secret lookup part, scopes, limits, "
        "created and revoked times. Secrets are never shown (they are not stored).",
    )
    kl.add_argument("--account", required=True, help="the account's name")
    kl.set_defaults(handler=keys_list)
    kr = ks.add_parser(
        "revoke",
        help="revoke a key by id (key_…)",
        description="Revoke a key for good. Every API process refuses it (401) within a second.",
    )
    kr.add_argument("id", help="the key's id, key_… (see `mailpipe keys list`)")
    kr.set_defaults(handler=keys_revoke)

    dlq = commands.add_parser(
        "dlq",
        help="list and replay dead letters",
        description="Dead letters are emails that exhausted their retries (or that the broker "
        "gave up on). Replaying one resets its attempts to 0 and puts it back into the send "
        "queue; the same as POST /v1/dead-letters/{id}/replay.",
    )
    dq = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    dl = dq.add_parser("list", help="list dead letters, newest first")
    dl.add_argument("--account", help="only this account's (default: every account)")
    dl.add_argument("--limit", type=int, default=50, help="at most this many (default: 50)")
    dl.add_argument("--pending", action="store_true", help="leave out replayed ones")
    dl.set_defaults(handler=dlq_list)
    dr = dq.add_parser("replay", help="replay one dead letter (dlq_…), or --all pending ones")
    dr.add_argument("id", nargs="?", help="the dead letter's id")
    dr.add_argument("--all", action="store_true", help="every dead letter not replayed yet")
    dr.add_argument("--account", help="with --all: only this account's; with ID: check owner")
    dr.set_defaults(handler=dlq_replay)
