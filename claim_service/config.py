"""Settings, parsed from ``CLAIM_*`` environment variables in one place."""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import secrets
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from claim_service.errors import ConfigError

# A fixed key for local development only; `serve` and `fulfil` refuse it off this machine.
DEV_CODES_KEY = base64.b64encode(hashlib.sha256(b"claim-service development key").digest()).decode()


def parse_key(text: str) -> bytes:
    """``CLAIM_CODES_KEY``: 32 bytes written as hex or base64."""
    raw: bytes | None = None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise ConfigError("CLAIM_CODES_KEY must be 32 bytes, written as base64 or hex")
    return raw


def instance_name() -> str:
    """A name for this process among its peers (stream consumers, claim leases):
    host, pid and a random suffix, unless ``--name`` gives a stable one."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


DURABILITY_MODES = ("none", "local", "replica")
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"

DEV_JWT_SECRET = "dev-only-secret-change-me-0123456789abcdef"
DEV_ADMIN_TOKEN = "dev-admin-token"


@dataclass(frozen=True)
class Settings:
    """Runtime configuration. Secrets are kept out of ``repr``."""

    redis_url: str | None = None
    database_url: str | None = None
    redis_timeout_ms: int = 1000
    pg_timeout_ms: int = 5000  # each PostgreSQL statement of ``serve``
    durability: str = "none"
    durability_replicas: int = 1
    durability_timeout_ms: int = 500
    timezone: str = "Asia/Shanghai"
    jwt_secret: str = field(default=DEV_JWT_SECRET, repr=False)
    jwt_public_key: str | None = field(default=None, repr=False)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    admin_token: str = field(default=DEV_ADMIN_TOKEN, repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    workers: int = 1
    body_timeout_s: float = 10.0
    max_connections: int = 20_000
    max_event_streams: int = 10_000  # member event streams per worker (they are connections)
    max_body_bytes: int = 16 * 1024
    admin_max_body_bytes: int = 16 * 1024 * 1024
    batch_max: int = 256
    max_in_flight: int = 1024  # claims awaiting a decision per worker; past it 503 at once
    shed_lag_ms: int = 500  # event-loop lag past which new claims get 503 at once (0: never)
    rate_member_per_s: float = 10.0  # claims a member may send per second (0: no limit)
    rate_member_burst: float = 20.0
    rate_ip_per_s: float = 0.0  # per client address (0: no limit; NATs share addresses)
    rate_ip_burst: float = 200.0
    writer_batch: int = 500
    writer_block_ms: int = 1000
    writer_claim_idle_ms: int = 15_000
    data_dir: Path = Path(".claim-data")
    codes_key: str = field(default=DEV_CODES_KEY, repr=False)
    # HMAC key of the bank's event intake (POST /v1/events); unset: the intake is off
    events_secret: str | None = field(default=None, repr=False)
    codes_low_watermark: int = 100
    fulfil_batch: int = 100
    fulfil_concurrency: int = 64
    fulfil_poll_ms: int = 200
    fulfil_lease_s: int = 60
    fulfil_processing_recheck_s: int = 60
    retry_base_ms: int = 500
    retry_max_ms: int = 30_000
    breaker_threshold: int = 5
    breaker_cooldown_ms: int = 2_000
    log_format: str = "text"
    log_level: str = "INFO"
    reconcile_every_s: float = 60.0  # writers compare Redis with the truth; 0: never
    points_expire_every_s: float = 60.0  # writers write off expired points lots; 0: never
    # writers release campaign rewards whose cool-off is over (points credited); 0: never
    rewards_release_every_s: float = 10.0
    # the link a referral code is shared with ({campaign} and {code} filled in)
    referral_link: str = "claimapp://referral?campaign={campaign}&code={code}"

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``CLAIM_<FIELD>`` variables; ``overrides`` win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get("CLAIM_" + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def with_urls(self, redis_url: str, database_url: str) -> Settings:
        return replace(self, redis_url=redis_url, database_url=database_url)

    def validate(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"CLAIM_TIMEZONE: unknown time zone {self.timezone!r}") from exc
        if self.workers < 1:
            raise ConfigError("CLAIM_WORKERS must be at least 1")
        if self.port and self.port == self.admin_port:
            raise ConfigError("CLAIM_ADMIN_PORT must differ from CLAIM_PORT")
        if not 0 < self.body_timeout_s <= 3600:
            raise ConfigError("CLAIM_BODY_TIMEOUT_S must be a number of seconds in (0, 3600]")
        if self.max_connections < 16:
            raise ConfigError("CLAIM_MAX_CONNECTIONS must be at least 16")
        if self.batch_max < 1 or self.writer_batch < 1:
            raise ConfigError("batch sizes must be at least 1")
        if self.max_in_flight < 1:
            raise ConfigError("CLAIM_MAX_IN_FLIGHT must be at least 1")
        if not 0 <= self.shed_lag_ms <= 60_000:
            raise ConfigError("CLAIM_SHED_LAG_MS must be in [0, 60000] (0: never shed)")
        for name in ("rate_member_per_s", "rate_member_burst", "rate_ip_per_s", "rate_ip_burst"):
            if not 0 <= getattr(self, name) <= 1_000_000:
                raise ConfigError(f"CLAIM_{name.upper()} must be in [0, 1000000]")
        parse_key(self.codes_key)
        if self.events_secret is not None and len(self.events_secret) < 16:
            raise ConfigError("CLAIM_EVENTS_SECRET must be at least 16 characters")
        if self.log_format not in ("text", "json"):
            raise ConfigError("CLAIM_LOG_FORMAT must be 'text' or 'json'")
        if not 0 <= self.reconcile_every_s <= 86_400:
            raise ConfigError("CLAIM_RECONCILE_EVERY_S must be 0 (never) or seconds up to 86400")
        if not 0 <= self.points_expire_every_s <= 86_400:
            raise ConfigError(
                "CLAIM_POINTS_EXPIRE_EVERY_S must be 0 (never) or seconds up to 86400"
            )
        if not 0 <= self.rewards_release_every_s <= 86_400:
            raise ConfigError(
                "CLAIM_REWARDS_RELEASE_EVERY_S must be 0 (never) or seconds up to 86400"
            )
        try:
            self.referral_link.format(campaign="c", code="C")
            usable = "{code}" in self.referral_link and len(self.referral_link) <= 512
        except (KeyError, IndexError, ValueError):
            usable = False
        if not usable:
            raise ConfigError(
                "CLAIM_REFERRAL_LINK must contain {code}, may use {campaign} and no other {…}"
            )
        self._validate_redis()

    def _validate_redis(self) -> None:
        if not 100 <= self.pg_timeout_ms <= 600_000:
            raise ConfigError("CLAIM_PG_TIMEOUT_MS must be in [100, 600000]")
        if not 10 <= self.redis_timeout_ms <= 60_000:
            raise ConfigError("CLAIM_REDIS_TIMEOUT_MS must be in [10, 60000]")
        if self.durability not in DURABILITY_MODES:
            raise ConfigError(f"CLAIM_DURABILITY must be one of {', '.join(DURABILITY_MODES)}")
        if self.durability_replicas < 1:
            raise ConfigError("CLAIM_DURABILITY_REPLICAS must be at least 1")
        if not 1 <= self.durability_timeout_ms <= 60_000:
            raise ConfigError("CLAIM_DURABILITY_TIMEOUT_MS must be in [1, 60000]")
        # The wait for durability runs on a Redis connection: its socket must outlast it.
        if self.durability != "none" and self.redis_timeout_ms <= self.durability_timeout_ms:
            raise ConfigError(
                "CLAIM_REDIS_TIMEOUT_MS must exceed CLAIM_DURABILITY_TIMEOUT_MS "
                f"({self.redis_timeout_ms} <= {self.durability_timeout_ms})"
            )

    def dev_defaults(self) -> list[str]:
        """Secrets still at their well-known development values (fine locally only)."""
        found = []
        if self.jwt_secret == DEV_JWT_SECRET and self.jwt_public_key is None:
            found.append("CLAIM_JWT_SECRET")
        if self.admin_token == DEV_ADMIN_TOKEN:
            found.append("CLAIM_ADMIN_TOKEN")
        if self.codes_key == DEV_CODES_KEY:
            found.append("CLAIM_CODES_KEY")
        return found

    def exposure(self, listeners: Iterable[str]) -> list[str]:
        """Why a process with these listeners is not purely local (empty when it is): a
        listener off loopback, or Redis/PostgreSQL on another machine (shared data is
        sealed with ``CLAIM_CODES_KEY``)."""
        reasons = [
            f"listening on {host or 'every interface'}"
            for host in listeners
            if not is_loopback(host)
        ]
        servers = (("CLAIM_REDIS_URL", self.redis_url), ("CLAIM_DATABASE_URL", self.database_url))
        for name, url in servers:
            if url and not url_is_local(url):
                reasons.append(f"{name} points at another machine")
        return reasons

    def require_urls(self) -> tuple[str, str]:
        if not self.redis_url or not self.database_url:
            raise ConfigError(
                "CLAIM_REDIS_URL and CLAIM_DATABASE_URL must be set "
                "(`claim-service dev` starts local servers and prints them)"
            )
        return self.redis_url, self.database_url


def is_loopback(host: str | None) -> bool:
    """True for a host that only this machine can reach (``""`` means every interface)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_is_local(url: str) -> bool:
    """True when a Redis or PostgreSQL URL names this machine (loopback or a Unix socket)."""
    if url.startswith((SENTINEL_SCHEME + "://", CLUSTER_SCHEME + "://")):
        # The sentinels (the cluster's seed nodes) can be checked here; the master is
        # wherever they say it is.
        hosts = urlsplit(url).netloc.rpartition("@")[2].split(",")
        return all(url_is_local(f"redis://{host}") for host in hosts)
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme == "unix" or host is None:
        return True  # a Unix socket (or the driver's local default)
    return is_loopback(host)


def _coerce(name: str, type_: Any, raw: str) -> Any:
    type_name = type_ if isinstance(type_, str) else getattr(type_, "__name__", str(type_))
    try:
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "Path":
            return Path(raw)
    except ValueError as exc:
        raise ConfigError(f"CLAIM_{name.upper()}: expected a number, got {raw!r}") from exc
    if name == "jwt_public_key" and not raw.lstrip().startswith("-----"):
        # Allow pointing at a PEM file instead of inlining it.
        path = Path(raw)
        if path.is_file():
            return path.read_text()
    return raw
