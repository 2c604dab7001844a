"""Typed settings: config/default.toml, then an optional override file, then the environment.

default.toml is the single place of defaults, so the dataclasses have none: a key missing there is
caught at start instead of silently falling back. Coercion and checks are derived from the field
types plus a small table, so a new key needs only a field and a line in default.toml.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pipeline.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ApiSettings:
    host: str
    port: int
    max_request_bytes: int
    reuse_port: bool


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    url: str
    pool_min: int
    pool_max: int


@dataclass(frozen=True, slots=True)
class AmqpSettings:
    url: str
    prefix: str


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str
    prefix: str


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    host: str
    port: int
    username: str
    password: str = field(repr=False)  # kept out of logged reprs
    starttls: bool
    timeout_s: float
    pool_size: int


@dataclass(frozen=True, slots=True)
class SenderSettings:
    actors: int
    concurrency: int


@dataclass(frozen=True, slots=True)
class RetrySettings:
    base_delay_s: float
    max_delay_s: float
    max_attempts: int
    tiers_s: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SweeperSettings:
    interval_s: float
    lease_s: float


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    rate: float
    burst: int
    redis_timeout_ms: int


@dataclass(frozen=True, slots=True)
class SandboxSettings:
    host: str
    port: int
    dir: str


@dataclass(frozen=True, slots=True)
class WebhooksSettings:
    allow_private: bool
    timeout_s: float
    retry_tiers_s: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ShutdownSettings:
    grace_s: float


@dataclass(frozen=True, slots=True)
class DevSettings:
    demo_key: bool


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing domain's key, from `[dkim."example.com"]`."""

    selector: str
    private_key_file: str


def _no_dkim() -> Mapping[str, DkimKey]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable; one field per TOML section."""

    api: ApiSettings
    database: DatabaseSettings
    amqp: AmqpSettings
    redis: RedisSettings
    smtp: SmtpSettings
    sender: SenderSettings
    retry: RetrySettings
    sweeper: SweeperSettings
    rate_limit: RateLimitSettings
    sandbox: SandboxSettings
    webhooks: WebhooksSettings
    shutdown: ShutdownSettings
    dev: DevSettings
    # Keyed by lower-cased domain. Excluded from the hash (a mapping is not hashable).
    dkim: Mapping[str, DkimKey] = field(default_factory=_no_dkim, hash=False)


_SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(Settings)[f.name] for f in fields(Settings) if f.name != "dkim"
}
_FIELDS: dict[str, dict[str, Any]] = {s: typing.get_type_hints(c) for s, c in _SECTIONS.items()}
_DKIM_FIELDS = tuple(typing.get_type_hints(DkimKey))
_BY_LENGTH = sorted(_SECTIONS, key=len, reverse=True)  # RATE_LIMIT_... before a shorter RATE_...

_Check = tuple[Callable[[Any], bool], str]
_INTS = tuple[int, ...]  # compare with ==: each spelling of the alias is a new object
_TIERS: _Check = (
    lambda v: bool(v) and v[0] > 0 and all(a < b for a, b in itertools.pairwise(v)),
    "a non-empty, strictly increasing list of positive integers",
)
# By type: every count must be >= 1 and every duration/rate > 0 unless listed in _CHECKS.
_TYPE_CHECKS: dict[Any, _Check] = {
    int: (lambda v: v >= 1, "a positive integer"),
    float: (lambda v: v > 0, "a positive number"),
    _INTS: _TIERS,
}
_TYPE_WORDS: dict[Any, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean (true/false)",
    _INTS: "a list of integers",
}


def _port(lowest: int) -> _Check:
    return (lambda v: lowest <= v <= 65535, f"an integer from {lowest} to 65535")


def _url(*schemes: str) -> _Check:
    return (lambda v: v.startswith(schemes), "a URL starting with " + " or ".join(schemes))


_CHECKS: dict[str, _Check] = {
    "api.port": _port(0),  # 0 = pick a free port (tests)
    "api.max_request_bytes": (lambda v: v >= 1024, "an integer >= 1024"),
    "database.url": _url("postgresql://", "postgres://"),
    "amqp.url": _url("amqp://", "amqps://"),
    "redis.url": _url("redis://", "rediss://", "unix://"),
    "smtp.port": _port(1),
    "sandbox.port": _port(0),
    "shutdown.grace_s": (lambda v: v >= 0, "a number >= 0"),
}
_SEED_VARS = {
    "DATABASE_URL": "database.url",
    "RABBITMQ_URL": "amqp.url",
    "REDIS_URL": "redis.url",
    "SMTP_HOST": "smtp.host",
    "SMTP_PORT": "smtp.port",
    "SMTP_USER": "smtp.username",
    "SMTP_PASS": "smtp.password",
    "PORT": "api.port",
}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_SECRETS = {"smtp.password"}
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]*@")


def default_config_path() -> Path:
    """The dev config next to the package, so it is found whatever the working directory."""
    return Path(__file__).resolve().parents[1] / "config" / "default.toml"


def _show(key: str, raw: object) -> str:
    """The offending value for an error line, without leaking a password."""
    if key in _SECRETS:
        return "<hidden>"
    text = _URL_PASSWORD.sub(r"\1***@", repr(raw))
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(kind: Any, raw: object, from_text: bool) -> Any:
    """`raw` as `kind`, else ValueError/KeyError. Text is from the environment, the rest TOML."""
    if from_text:
        assert isinstance(raw, str)
        text = raw.strip()
        if kind is str:
            return raw
        if kind is bool:
            return _BOOLS[text.lower()]
        if kind == _INTS:
            return tuple(int(part) for part in text.split(",")) if text else ()
        value = kind(text)
    elif kind == _INTS:
        if not (isinstance(raw, list) and all(type(v) is int for v in raw)):
            raise ValueError
        return tuple(raw)
    elif kind is float and type(raw) is int:
        value = float(raw)
    elif type(raw) is kind:  # exact: a TOML bool is not an int
        value = raw
    else:
        raise ValueError
    if kind is float and not math.isfinite(value):
        raise ValueError
    return value


class _Loader:
    """Collects values layer by layer, remembering where each one came from."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        self.sources: dict[str, str] = {}
        self.dkim: dict[str, DkimKey] = {}

    def set(self, key: str, raw: object, source: str, from_text: bool) -> None:
        section, name = key.split(".", 1)
        kind = _FIELDS[section][name]
        check, expected = _CHECKS.get(key) or _TYPE_CHECKS.get(kind) or (None, _TYPE_WORDS[kind])
        try:
            value = _coerce(kind, raw, from_text)
            ok = check is None or check(value)
        except (ValueError, KeyError):
            ok = False
        if not ok:
            raise ConfigError(f"{key}: expected {expected}, got {_show(key, raw)} (from {source})")
        self.values[section][name] = value
        self.sources[key] = source

    def file(self, path: Path, complete: bool) -> None:
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            detail = " ".join(str(e).split())
            raise ConfigError(f"invalid TOML in config file {path}: {detail}") from e
        for section, table in data.items():
            if section == "dkim":
                self.dkim_table(table, path)
                continue
            if section not in _SECTIONS:
                raise ConfigError(f"unknown section '{section}' in {path}")
            if not isinstance(table, dict):
                raise ConfigError(f"{section}: expected a table, got {table!r:.80} (from {path})")
            for name, raw in table.items():
                if name not in _FIELDS[section]:
                    raise ConfigError(f"unknown key '{section}.{name}' in {path}")
                self.set(f"{section}.{name}", raw, str(path), from_text=False)
        missing = [f"{s}.{k}" for s in _SECTIONS for k in _FIELDS[s] if k not in self.values[s]]
        if complete and missing:
            raise ConfigError(f"missing key '{missing[0]}' in {path}")

    def dkim_table(self, table: object, path: Path) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"dkim: expected a table of domains, got {table!r:.80} (from {path})")
        for domain, entry in table.items():
            where = f'dkim."{domain}"'
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: expected a table, got {entry!r:.80} (from {path})")
            unknown = sorted(entry.keys() - _DKIM_FIELDS)
            if unknown:
                raise ConfigError(f"unknown key '{where}.{unknown[0]}' in {path}")
            for name in _DKIM_FIELDS:
                value = entry.get(name)
                if not isinstance(value, str) or not value:
                    got = "nothing" if value is None else repr(value)
                    raise ConfigError(
                        f"{where}.{name}: expected a non-empty string, got {got} (from {path})"
                    )
            self.dkim[domain.lower()] = DkimKey(**entry)

    def environment(self, env: Mapping[str, str]) -> None:
        for var, key in _SEED_VARS.items():
            if var in env:
                self.set(key, env[var], var, from_text=True)
        for var, text in sorted(env.items()):  # after the seed's variables, so these win
            if not var.startswith("MAILPIPE_") or var == "MAILPIPE_CONFIG":
                continue
            rest = var.removeprefix("MAILPIPE_")
            section = next((s for s in _BY_LENGTH if rest.startswith(s.upper() + "_")), None)
            if section is None:
                continue
            name = rest[len(section) + 1 :].lower()
            if name not in _FIELDS[section]:
                raise ConfigError(f"unknown key '{section}.{name}' (from {var})")
            self.set(f"{section}.{name}", text, var, from_text=True)

    def settings(self) -> Settings:
        db = self.values["database"]
        if db["pool_max"] < db["pool_min"]:
            raise ConfigError(
                f"database.pool_max: expected an integer >= database.pool_min ({db['pool_min']}),"
                f" got {db['pool_max']} (from {self.sources['database.pool_max']})"
            )
        sections = {s: cls(**self.values[s]) for s, cls in _SECTIONS.items()}
        return Settings(**sections, dkim=MappingProxyType(dict(self.dkim)))


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read default.toml, then `path` (or $MAILPIPE_CONFIG), then the environment; check it all.

    Raises ConfigError with one line naming the key and where its value came from.
    """
    env = os.environ if env is None else env
    loader = _Loader()
    loader.file(default_config_path(), complete=True)
    override = path if path is not None else env.get("MAILPIPE_CONFIG") or None
    if override is not None:
        loader.file(Path(override), complete=False)
    loader.environment(env)
    return loader.settings()
