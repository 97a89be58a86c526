"""Settings parsing: one place, typed, secrets hidden."""

from __future__ import annotations

import pytest

from claim_service.config import Settings
from claim_service.errors import ConfigError


def test_env_is_parsed_and_secrets_are_hidden() -> None:
    settings = Settings.from_env(
        {
            "CLAIM_PORT": "9000",
            "CLAIM_JWT_SECRET": "s3cret-value-for-tests",
            "CLAIM_ADMIN_TOKEN": "admin-value-for-tests",
            "CLAIM_TIMEZONE": "UTC",
        }
    )
    assert settings.port == 9000 and settings.timezone == "UTC"
    text = repr(settings)
    assert "s3cret-value-for-tests" not in text and "admin-value-for-tests" not in text
    assert settings.dev_defaults() == ["CLAIM_CODES_KEY"]


@pytest.mark.parametrize(
    "env",
    [
        {"CLAIM_PORT": "eighty"},
        {"CLAIM_TIMEZONE": "Mars/Olympus"},
        {"CLAIM_WORKERS": "0"},
        {"CLAIM_CODES_KEY": "too-short"},
        {"CLAIM_LOG_FORMAT": "xml"},
        {"CLAIM_ADMIN_PORT": "8080"},
        {"CLAIM_BODY_TIMEOUT_S": "0"},
        {"CLAIM_BODY_TIMEOUT_S": "soon"},
        {"CLAIM_BODY_TIMEOUT_S": "nan"},
        {"CLAIM_MAX_CONNECTIONS": "1"},
        {"CLAIM_REFERRAL_LINK": "https://bank.example/r/"},
        {"CLAIM_REFERRAL_LINK": "https://bank.example/r/{code}?utm={source}"},
        {"CLAIM_REFERRAL_LINK": "https://bank.example/r/{code}{"},
        {"CLAIM_REWARDS_RELEASE_EVERY_S": "-1"},
    ],
)
def test_bad_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)


def test_urls_are_required_to_run() -> None:
    with pytest.raises(ConfigError, match="CLAIM_REDIS_URL"):
        Settings.from_env({}).require_urls()


def test_listener_and_connection_settings() -> None:
    default = Settings.from_env({})
    assert (default.admin_host, default.admin_port) == ("127.0.0.1", 8081)
    assert default.body_timeout_s == 10 and default.max_connections == 20_000
    settings = Settings.from_env(
        {
            "CLAIM_ADMIN_HOST": "10.0.0.7",
            "CLAIM_ADMIN_PORT": "9100",
            "CLAIM_BODY_TIMEOUT_S": "2.5",
            "CLAIM_MAX_CONNECTIONS": "500",
        }
    )
    assert (settings.admin_host, settings.admin_port) == ("10.0.0.7", 9100)
    assert settings.body_timeout_s == 2.5 and settings.max_connections == 500


@pytest.mark.parametrize(
    ("listeners", "urls", "exposed"),
    [
        (["127.0.0.1", "127.0.0.1"], {}, []),
        (["localhost", "::1", "127.0.0.2"], {}, []),
        (["0.0.0.0"], {}, ["listening on 0.0.0.0"]),
        ([""], {}, ["listening on every interface"]),
        (["10.0.0.7"], {}, ["listening on 10.0.0.7"]),
        (["127.0.0.1"], {"CLAIM_REDIS_URL": "redis://127.0.0.1:6379/0"}, []),
        (["127.0.0.1"], {"CLAIM_REDIS_URL": "unix:///run/redis.sock"}, []),
        (["127.0.0.1"], {"CLAIM_DATABASE_URL": "postgresql:///claims?host=/run/pg"}, []),
        (
            ["127.0.0.1"],
            {"CLAIM_DATABASE_URL": "postgresql://claims@db.internal/claims"},
            ["CLAIM_DATABASE_URL points at another machine"],
        ),
        (
            ["127.0.0.1"],
            {"CLAIM_REDIS_URL": "rediss://[2001:db8::1]:6380/0"},
            ["CLAIM_REDIS_URL points at another machine"],
        ),
    ],
)
def test_what_is_not_local(listeners: list[str], urls: dict[str, str], exposed: list[str]) -> None:
    assert Settings.from_env(urls).exposure(listeners) == exposed
