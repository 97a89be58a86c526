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
    ],
)
def test_bad_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)


def test_urls_are_required_to_run() -> None:
    with pytest.raises(ConfigError, match="CLAIM_REDIS_URL"):
        Settings.from_env({}).require_urls()
