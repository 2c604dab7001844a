"""Operator commands: accounts and API keys. Each prints its result or one line of error."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline import keys
from pipeline.errors import CliError
from pipeline.settings import Settings
from pipeline.store import queries
from pipeline.store.migrate import migrate


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
    if args.rate is not None and (args.rate <= 0 or args.burst < 1):
        raise CliError("--rate must be > 0 and --burst at least 1")
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


def add_commands(commands: Any) -> None:
    accounts = commands.add_parser("accounts", help="manage accounts")
    acc = accounts.add_subparsers(dest="accounts_command", metavar="ACTION", required=True)
    create = acc.add_parser("create", help="create an account")
    create.add_argument("name")
    create.set_defaults(handler=accounts_create)

    keys_parser = commands.add_parser(
        "keys",
        help="manage API keys",
        description="API keys belong to one account. The key is printed once at creation and "
        "stored only as a hash; scopes are send (POST emails), read (GET emails and events) "
        "and admin (keys, webhooks, suppressions, dead letters).",
    )
    ks = keys_parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    kc = ks.add_parser("create", help="create a key and print it once")
    kc.add_argument("--account", required=True, help="the account's name")
    kc.add_argument("--scopes", default="send,read,admin", help="comma-separated (default: all)")
    kc.add_argument("--rate", type=float, help="emails per second (default: rate_limit.rate)")
    kc.add_argument("--burst", type=int, help="burst size (default: rate_limit.burst)")
    kc.set_defaults(handler=keys_create)
    kl = ks.add_parser("list", help="list an account's keys (no secrets)")
    kl.add_argument("--account", required=True)
    kl.set_defaults(handler=keys_list)
    kr = ks.add_parser("revoke", help="revoke a key by id (key_…)")
    kr.add_argument("id")
    kr.set_defaults(handler=keys_revoke)
