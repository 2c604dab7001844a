"""Settings: layering of default.toml, an override file and the environment; one-line errors."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import DkimKey, Settings, default_config_path, load_settings

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "override.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load_from_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(env={})
    assert default_config_path() == REPO / "config" / "default.toml"
    assert (s.api.host, s.api.port, s.api.max_request_bytes) == ("127.0.0.1", 8000, 10485760)
    assert s.database.url == "postgresql://postgres@127.0.0.1:5432/emailservice"
    assert (s.database.pool_min, s.database.pool_max) == (2, 20)
    assert s.amqp.prefix == "mailpipe." and s.redis.prefix == "mailpipe:"
    assert s.smtp.host == "" and s.smtp.port == 1025 and s.smtp.starttls is False
    assert s.smtp.timeout_s == 30.0 and isinstance(s.smtp.timeout_s, float)
    assert s.retry.tiers_s == (1, 5, 30, 120, 600, 3600)
    assert s.webhooks.retry_tiers_s == (5, 300, 1800, 7200, 18000, 36000, 43200)
    assert sum(s.webhooks.retry_tiers_s) >= 24 * 3600  # retried for at least 24 h
    assert s.rate_limit.redis_timeout_ms == 250
    assert s.sandbox.dir == "var/sandbox"
    assert s.dev.demo_key is True
    assert dict(s.dkim) == {}
    hash(s)  # frozen all the way down
    assert (
        dataclasses.replace(s, dev=dataclasses.replace(s.dev, demo_key=False)).dev.demo_key is False
    )


def test_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILPIPE_SENDER_ACTORS", "7")
    assert load_settings().sender.actors == 7


def test_config_file_is_layered_on_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "[sender]\nactors = 5\n[retry]\ntiers_s = [2, 4]\n")
    s = load_settings(path, env={})
    assert s.sender.actors == 5 and s.sender.concurrency == 20
    assert s.retry.tiers_s == (2, 4) and s.retry.max_attempts == 8


def test_mailpipe_config_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "[sweeper]\nlease_s = 60.5\n")
    assert load_settings(env={"MAILPIPE_CONFIG": str(path)}).sweeper.lease_s == 60.5


def test_explicit_path_beats_mailpipe_config(tmp_path: Path) -> None:
    a = write(tmp_path, "[sender]\nactors = 3\n", "a.toml")
    b = write(tmp_path, "[sender]\nactors = 4\n", "b.toml")
    assert load_settings(b, env={"MAILPIPE_CONFIG": str(a)}).sender.actors == 4


def test_production_overrides() -> None:
    s = load_settings(REPO / "config" / "production.toml", env={})
    assert s.dev.demo_key is False and s.webhooks.allow_private is False
    assert s.api.host == "0.0.0.0" and s.smtp.port == 587 and s.smtp.starttls is True
    assert s.retry.tiers_s == (1, 5, 30, 120, 600, 3600)  # untouched keys keep their defaults


@pytest.mark.parametrize(
    ("var", "value", "section", "key", "expected"),
    [
        ("DATABASE_URL", "postgres://u:p@db/x", "database", "url", "postgres://u:p@db/x"),
        ("RABBITMQ_URL", "amqps://mq:5671/", "amqp", "url", "amqps://mq:5671/"),
        ("REDIS_URL", "unix:///run/redis.sock", "redis", "url", "unix:///run/redis.sock"),
        ("SMTP_HOST", "relay.example.com", "smtp", "host", "relay.example.com"),
        ("SMTP_PORT", "2525", "smtp", "port", 2525),
        ("SMTP_USER", "alice", "smtp", "username", "alice"),
        ("SMTP_PASS", "s3cret", "smtp", "password", "s3cret"),
        ("PORT", "9000", "api", "port", 9000),
    ],
)
def test_seed_variables(var: str, value: str, section: str, key: str, expected: object) -> None:
    s = load_settings(env={var: value})
    assert getattr(getattr(s, section), key) == expected


def test_mailpipe_overrides() -> None:
    s = load_settings(
        env={
            "MAILPIPE_RETRY_TIERS_S": "1, 5,30",
            "MAILPIPE_SMTP_STARTTLS": "TRUE",
            "MAILPIPE_WEBHOOKS_ALLOW_PRIVATE": "no",
            "MAILPIPE_SMTP_TIMEOUT_S": "2.5",
            "MAILPIPE_RATE_LIMIT_RATE": "50",
            "MAILPIPE_RATE_LIMIT_REDIS_TIMEOUT_MS": "120",
            "MAILPIPE_API_PORT": "0",
            "MAILPIPE_AMQP_PREFIX": "t1234.",
            "MAILPIPE_CONFIG": "",  # empty: no override file, and never taken for a key
            "MAILPIPE_NOT_A_SECTION": "ignored",
            "OTHER": "ignored",
        }
    )
    assert s.retry.tiers_s == (1, 5, 30)
    assert s.smtp.starttls is True and s.webhooks.allow_private is False
    assert s.smtp.timeout_s == 2.5
    assert s.rate_limit.rate == 50.0 and isinstance(s.rate_limit.rate, float)
    assert s.rate_limit.redis_timeout_ms == 120 and s.rate_limit.burst == 20
    assert s.api.port == 0 and s.amqp.prefix == "t1234."


def test_mailpipe_variable_beats_seed_variable_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[smtp]\nport = 26\n")
    env = {"SMTP_PORT": "2525", "MAILPIPE_SMTP_PORT": "587", "PORT": "1", "MAILPIPE_API_PORT": "2"}
    s = load_settings(path, env=env)
    assert s.smtp.port == 587 and s.api.port == 2
    assert load_settings(path, env={"SMTP_PORT": "2525"}).smtp.port == 2525


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"MAILPIPE_SMTP_PORT": "abc"},
            "smtp.port: expected an integer from 1 to 65535, got 'abc' (from MAILPIPE_SMTP_PORT)",
        ),
        ({"SMTP_PORT": "0"}, "smtp.port: expected an integer from 1 to 65535, got '0'"),
        ({"PORT": "70000"}, "api.port: expected an integer from 0 to 65535, got '70000'"),
        ({"MAILPIPE_SENDER_ACTORS": "0"}, "sender.actors: expected a positive integer"),
        ({"MAILPIPE_SENDER_CONCURRENCY": "1.5"}, "sender.concurrency: expected a positive"),
        ({"MAILPIPE_RATE_LIMIT_RATE": "-1"}, "rate_limit.rate: expected a positive number"),
        ({"MAILPIPE_RATE_LIMIT_BURST": "0"}, "rate_limit.burst: expected a positive integer"),
        ({"MAILPIPE_SWEEPER_LEASE_S": "nan"}, "sweeper.lease_s: expected a positive number"),
        ({"MAILPIPE_SHUTDOWN_GRACE_S": "-0.1"}, "shutdown.grace_s: expected a number >= 0"),
        ({"MAILPIPE_DEV_DEMO_KEY": "maybe"}, "dev.demo_key: expected a boolean"),
        ({"MAILPIPE_RETRY_TIERS_S": "5,1"}, "retry.tiers_s: expected a non-empty, strictly"),
        ({"MAILPIPE_RETRY_TIERS_S": ""}, "retry.tiers_s: expected a non-empty"),
        ({"MAILPIPE_WEBHOOKS_RETRY_TIERS_S": "0,5"}, "webhooks.retry_tiers_s: expected"),
        ({"MAILPIPE_API_MAX_REQUEST_BYTES": "1023"}, "api.max_request_bytes: expected"),
        ({"DATABASE_URL": "mysql://db/x"}, "database.url: expected a URL starting with postgr"),
        ({"RABBITMQ_URL": "http://mq"}, "amqp.url: expected a URL starting with amqp://"),
        ({"REDIS_URL": "localhost:6379"}, "redis.url: expected a URL starting with redis://"),
        ({"MAILPIPE_DATABASE_POOL_MAX": "1"}, "database.pool_max: expected an integer >= data"),
    ],
)
def test_bad_environment_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text
    assert text.endswith(f"(from {next(iter(env))})")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[api]\nport = true\n", "api.port: expected an integer from 0 to 65535, got True"),
        ("[api]\nport = 80.0\n", "api.port: expected an integer from 0 to 65535, got 80.0"),
        ("[smtp]\nhost = 5\n", "smtp.host: expected a string, got 5"),
        ("[smtp]\nstarttls = 1\n", "smtp.starttls: expected a boolean (true/false), got 1"),
        ("[retry]\ntiers_s = [1, 2.5]\n", "retry.tiers_s: expected a non-empty"),
        ("[retry]\ntiers_s = []\n", "retry.tiers_s: expected a non-empty"),
        ("[sweeper]\ninterval_s = 0\n", "sweeper.interval_s: expected a positive number, got 0"),
        ("[database]\npool_min = 5\npool_max = 3\n", "database.pool_max: expected an integer >="),
    ],
)
def test_bad_file_values(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    text = str(info.value)
    assert text.startswith(message) and text.endswith(f"(from {path})") and "\n" not in text


def test_secrets_stay_out_of_errors_and_reprs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"DATABASE_URL": "mysql://user:hunter2@db/x"})
    assert "hunter2" not in str(info.value) and "mysql://user:***@db/x" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "[smtp]\npassword = 12345\n"), env={})
    assert "12345" not in str(info.value)
    assert "hunter2" not in repr(load_settings(env={"SMTP_PASS": "hunter2"}))


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[sender]\nactorz = 3\n", "unknown key 'sender.actorz' in {path}"),
        ("[senders]\nactors = 3\n", "unknown section 'senders' in {path}"),
        ("port = 3\n", "unknown section 'port' in {path}"),
        ("sender = 3\n", "sender: expected a table, got 3 (from {path})"),
        ("[api\n", "invalid TOML in config file {path}: "),
    ],
)
def test_bad_file_structure(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert str(info.value).startswith(message.format(path=path))
    assert "\n" not in str(info.value)


def test_unknown_key_in_environment() -> None:
    with pytest.raises(ConfigError, match=r"^unknown key 'sender\.actorz' \(from MAILPIPE_SENDER"):
        load_settings(env={"MAILPIPE_SENDER_ACTORZ": "3"})


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(env={"MAILPIPE_CONFIG": str(path)})
    assert str(info.value).startswith(f"cannot read config file {path}")


def test_dkim_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[dkim."Example.com"]\nselector = "s1"\nprivate_key_file = "/keys/example.pem"\n'
        '[dkim."other.org"]\nselector = "mail"\nprivate_key_file = "other.pem"\n',
    )
    s = load_settings(path, env={})
    assert dict(s.dkim) == {
        "example.com": DkimKey(selector="s1", private_key_file="/keys/example.pem"),
        "other.org": DkimKey(selector="mail", private_key_file="other.pem"),
    }
    with pytest.raises(TypeError):
        s.dkim["x.org"] = DkimKey("a", "b")  # type: ignore[index]
    assert isinstance(hash(s), int)
    assert s == load_settings(path, env={})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[dkim."a.org"]\nselector = "s"\n', 'dkim."a.org".private_key_file: expected a non-empty'),
        ('[dkim."a.org"]\nselector = "s"\nprivate_key_file = "k"\nx = 1\n', "unknown key"),
        ('[dkim]\n"a.org" = 5\n', 'dkim."a.org": expected a table, got 5'),
    ],
)
def test_bad_dkim(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_settings(write(tmp_path, toml), env={})


def test_settings_fields_match_sections() -> None:
    """default.toml's sections and the Settings fields are the same names (plus dkim)."""
    data = tomllib.loads(default_config_path().read_text())
    assert [f.name for f in dataclasses.fields(Settings)] == [*data, "dkim"]
