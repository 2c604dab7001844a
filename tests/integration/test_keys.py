"""API keys: format and entropy, authentication, scopes, tenancy, revocation, and the CLI
(`mailpipe accounts create`, `mailpipe keys create/list/revoke`) run as real subprocesses."""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any

import anyio
import httpx
import pytest

from pipeline import ids, keys
from pipeline.store import queries
from tests.integration.conftest import Service, email_body
from web.auth import KEY_CACHE_TTL_S, KeyCache

_SEED_VARS = {"DATABASE_URL", "RABBITMQ_URL", "REDIS_URL", "SMTP_HOST", "SMTP_PORT", "PORT"}
_SEED_VARS |= {"SMTP_USER", "SMTP_PASS"}


# ---------------------------------------------------------------- format (pure)


def test_key_format_and_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[int] = []
    token_bytes = ids.secrets.token_bytes

    def counting(n: int) -> bytes:
        drawn.append(n)
        return token_bytes(n)

    monkeypatch.setattr(ids.secrets, "token_bytes", counting)
    made = [keys.generate_key(test=i % 2 == 0) for i in range(200)]
    for new in made:
        prefix = "sk_test_" if new.key.startswith("sk_test_") else "sk_live_"
        assert new.key.startswith(prefix)
        assert new.lookup == new.key[len(prefix) : len(prefix) + keys.LOOKUP_LEN]
        assert keys.lookup_of(new.key) == new.lookup
        secret = new.key[len(prefix) + keys.LOOKUP_LEN :]
        assert re.fullmatch(r"[0-9A-Za-z]+", secret)
        assert len(secret) * math.log2(62) >= 128  # room for 128 bits...
        assert keys.matches(new.key, new.hash) and not keys.matches(new.key + "x", new.hash)
    assert max(drawn) * 8 >= 128  # ...and at least 128 random bits drawn for it
    assert len({n.key for n in made}) == len({n.lookup for n in made}) == 200
    assert {n.key[:8] for n in made} == {"sk_test_", "sk_live_"}


def test_key_rows_are_trusted_for_less_than_a_second() -> None:
    assert KEY_CACHE_TTL_S < 1
    now = [100.0]
    cache = KeyCache(0.5, max_entries=2, clock=lambda: now[0])
    row: Any = object()
    cache.put("aaaaaaaa", row)
    assert cache.get("aaaaaaaa") is row
    now[0] += 0.5
    assert cache.get("aaaaaaaa") is None  # expired: the next request reads the row again
    other: Any = object()
    for lookup in ("a", "b", "c"):  # bounded: full of live rows, it starts over
        cache.put(lookup, other)
    assert cache.get("c") is other and cache.get("a") is None


@pytest.mark.anyio
async def test_concurrent_misses_share_one_read() -> None:
    """An expired entry under load: the requests in flight with that key read it once."""
    cache = KeyCache(0.5)
    reads = 0
    release = anyio.Event()
    row: Any = object()

    async def read() -> Any:
        nonlocal reads
        reads += 1
        await release.wait()
        return row

    got: list[Any] = []

    async def ask() -> None:
        got.append(await cache.fetch("aaaaaaaa", read))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(ask)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert reads == 1 and got == [row] * 20
    assert cache.get("aaaaaaaa") is row


@pytest.mark.anyio
async def test_a_failed_shared_read_lets_each_caller_read_on_its_own() -> None:
    cache = KeyCache(0.5)
    calls = 0
    release = anyio.Event()

    async def read() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()
            raise OSError("database gone")
        return None  # unknown key: nothing is cached

    outcomes: list[Any] = []

    async def ask() -> None:
        try:
            outcomes.append(await cache.fetch("bbbbbbbb", read))
        except OSError as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(ask)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert calls == 3
    assert sum(isinstance(o, OSError) for o in outcomes) == 1 and outcomes.count(None) == 2
    assert cache.get("bbbbbbbb") is None


# ---------------------------------------------------------------- authentication and scopes


def _is_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert "X-RateLimit-Limit" not in r.headers


@pytest.mark.anyio
async def test_missing_unknown_and_wrong_keys_are_401(service: Service) -> None:
    async def send(headers: dict[str, str]) -> httpx.Response:
        return await service.http.post("/v1/emails", json=email_body(), headers=headers)

    _is_401(await send({}))
    _is_401(await send({"X-API-Key": "nonsense"}))
    _is_401(await send({"Authorization": "Basic dXNlcjpwYXNz"}))
    _is_401(await send({"X-API-Key": "sk_test_" + "A" * 40}))
    wrong_secret = service.key[:-4] + ("AAAA" if not service.key.endswith("AAAA") else "BBBB")
    _is_401(await send({"X-API-Key": wrong_secret}))  # right lookup id, wrong secret
    r = await send({"Authorization": f"Bearer {service.key}"})
    assert r.status_code == 202, r.text


@pytest.mark.anyio
async def test_scopes(service: Service) -> None:
    sender, _ = await service.new_key("test", ("send",))
    reader, _ = await service.new_key("test", ("read",))
    admin, _ = await service.new_key("test", ("admin",))
    r = await service.http.post("/v1/emails", json=email_body(), headers=service.auth(sender))
    assert r.status_code == 202, r.text
    email_id = r.json()["id"]

    def expect(status: int, r: httpx.Response) -> None:
        assert r.status_code == status, (r.request.method, r.request.url, r.text)
        if status == 403:
            assert r.headers["content-type"].startswith("application/problem+json")
            assert "scope" in r.json()["detail"]
            assert "X-RateLimit-Remaining" in r.headers

    get = service.http.get
    # read cannot send; admin alone cannot either
    for key in (reader, admin):
        expect(
            403,
            await service.http.post("/v1/emails", json=email_body(), headers={"X-API-Key": key}),
        )
    # send cannot read, even its own emails
    for path in ("/v1/emails", f"/v1/emails/{email_id}", f"/v1/emails/{email_id}/events"):
        expect(403, await get(path, headers={"X-API-Key": sender}))
        expect(403, await get(path, headers={"X-API-Key": admin}))
        expect(200, await get(path, headers={"X-API-Key": reader}))
    # admin-only endpoints refuse send and read keys
    for path in ("/v1/suppressions", "/v1/dead-letters"):
        expect(403, await get(path, headers={"X-API-Key": sender}))
        expect(403, await get(path, headers={"X-API-Key": reader}))
        expect(200, await get(path, headers={"X-API-Key": admin}))
        expect(200, await get(path, headers=service.auth()))  # full access


@pytest.mark.anyio
async def test_another_accounts_ids_answer_404(service: Service) -> None:
    r = await service.http.post("/v1/emails", json=email_body(), headers=service.auth())
    email_id = r.json()["id"]
    stranger, _ = await service.new_key("stranger")
    for path in (f"/v1/emails/{email_id}", f"/v1/emails/{email_id}/events"):
        theirs = await service.http.get(path, headers=service.auth(stranger))
        missing = await service.http.get(
            path.replace(email_id, "msg_nope"), headers=service.auth(stranger)
        )
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["title"] == missing.json()["title"]
    listed = await service.http.get("/v1/emails", headers=service.auth(stranger))
    assert listed.status_code == 200 and listed.json()["data"] == []


async def refused_soon(service: Service, key: str, within: float = 5) -> httpx.Response:
    """Poll until `key` is refused (revocation is seen within KEY_CACHE_TTL_S)."""
    with anyio.fail_after(within):
        while True:
            r = await service.http.get("/v1/emails", headers=service.auth(key))
            if r.status_code == 401:
                return r
            assert r.status_code == 200, r.text
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_revoked_key_is_refused(service: Service) -> None:
    key, _ = await service.new_key("test")
    assert (await service.http.get("/v1/emails", headers=service.auth(key))).status_code == 200
    lookup = keys.lookup_of(key)
    assert lookup is not None
    async with service.deps.db.connection() as conn:
        row = await queries.key_by_lookup(conn, lookup)
        assert row is not None
        assert await queries.revoke_key(conn, row.id)
    _is_401(await refused_soon(service, key))
    r = await service.http.post("/v1/emails", json=email_body(), headers=service.auth(key))
    _is_401(r)  # and it stays refused
    # Other keys of the account are untouched.
    assert (await service.http.get("/v1/emails", headers=service.auth())).status_code == 200


# ---------------------------------------------------------------- the CLI, as subprocesses


async def mailpipe(db_url: str, *args: str, **env: str) -> tuple[int, str, str]:
    """Run `python -m pipeline ARGS` against the test database: (exit code, stdout, stderr)."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("MAILPIPE_") and k not in _SEED_VARS
    }
    clean.update(DATABASE_URL=db_url, **env)
    done = await anyio.run_process(
        [sys.executable, "-m", "pipeline", *args], env=clean, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailpipe: "), err
    for needle in needles:
        assert needle in lines[0], err


@pytest.mark.anyio
async def test_cli_accounts_and_keys(service: Service, test_db: str) -> None:
    code, out, err = await mailpipe(test_db, "accounts", "create", "acme")
    assert code == 0, err
    account_id, name = out.strip().split("\t")
    assert account_id.startswith("acc_"), out
    assert name == "acme"

    code, out, err = await mailpipe(
        test_db,
        "keys",
        "create",
        "--account",
        "acme",
        "--scopes",
        "send",
        "--rate",
        "2",
        "--burst",
        "3",
    )
    assert code == 0, err
    fields = dict(re.findall(r"^(\w+):\s+(\S+)$", out, flags=re.M))
    key, key_id = fields["key"], fields["id"]
    assert key.startswith("sk_test_") and key_id.startswith("key_")  # the sandbox config
    assert fields["scopes"] == "send"
    assert "only this once" in out

    r = await service.http.post("/v1/emails", json=email_body(), headers=service.auth(key))
    assert r.status_code == 202, r.text
    assert r.headers["X-RateLimit-Limit"] == "3"  # the key's own burst
    assert r.headers["RateLimit-Policy"] == '"default";q=3;w=2'
    r = await service.http.get("/v1/emails", headers=service.auth(key))
    assert r.status_code == 403  # send only

    code, out, err = await mailpipe(test_db, "keys", "list", "--account", "acme")
    assert code == 0, err
    [header, line] = out.strip().splitlines()
    assert header.split("\t")[:3] == ["id", "prefix", "scopes"]
    assert line.startswith(key_id + "\t") and "\tsend\t2.0\t3\t" in line
    secret = key[len("sk_test_") + keys.LOOKUP_LEN :]
    assert secret not in out and key not in out
    assert line.split("\t")[-1] == "-"  # not revoked

    code, out, err = await mailpipe(test_db, "keys", "revoke", key_id)
    assert code == 0 and key_id in out, err
    r = await refused_soon_post(service, key)
    assert r.status_code == 401
    code, out, _ = await mailpipe(test_db, "keys", "list", "--account", "acme")
    assert out.strip().splitlines()[1].split("\t")[-1] != "-"

    # Mistakes: one line on stderr, exit 1, nothing done.
    results: dict[str, tuple[int, str, str]] = {}
    cases = {
        "again": ("keys", "revoke", key_id),
        "dup": ("accounts", "create", "acme"),
        "nobody": ("keys", "create", "--account", "nobody"),
        "scope": ("keys", "create", "--account", "acme", "--scopes", "send,bogus"),
        "alone": ("keys", "create", "--account", "acme", "--rate", "5"),
        "nan": ("keys", "create", "--account", "acme", "--rate", "nan", "--burst", "2"),
    }

    async def run(name: str, args: tuple[str, ...]) -> None:
        results[name] = await mailpipe(test_db, *args)

    async with anyio.create_task_group() as tg:
        for name, args in cases.items():
            tg.start_soon(run, name, args)
    expected = {
        "again": [key_id],
        "dup": ["already exists"],
        "nobody": ["no account 'nobody'"],
        "scope": ["--scopes", "bogus"],
        "alone": ["--rate and --burst"],
        "nan": ["--rate"],
    }
    for name, needles in expected.items():
        code, _, err = results[name]
        _one_error_line(code, err, *needles)
    code, out, _ = await mailpipe(test_db, "keys", "list", "--account", "acme")
    assert len(out.strip().splitlines()) == 2  # no key was made by the failed commands


async def refused_soon_post(service: Service, key: str, within: float = 5) -> httpx.Response:
    with anyio.fail_after(within):
        while True:
            r = await service.http.post("/v1/emails", json=email_body(), headers=service.auth(key))
            if r.status_code == 401:
                return r
            assert r.status_code in (202, 429), r.text
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_cli_keys_help_explains_itself(test_db: str) -> None:
    code, out, err = await mailpipe(test_db, "keys", "--help")
    assert code == 0, err
    for needle in (
        "create",
        "list",
        "revoke",
        "send",
        "read",
        "admin",
        "X-API-Key",
        "printed once",
        "--rate",
        "--burst",
        "examples:",
        "mailpipe keys create --account",
    ):
        assert needle in out, needle
    code, out, err = await mailpipe(test_db, "keys", "create", "--help")
    assert code == 0 and "--scopes" in out and "emails per second" in out, err
