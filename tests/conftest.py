"""Real Valkey and PostgreSQL servers for the whole run, flushed before every test.

The servers are started by the project's own ``EmbeddedServers``. To run against servers
you manage, set ``CLAIM_TEST_REDIS_URL`` and ``CLAIM_TEST_DATABASE_URL`` (they are flushed!).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from redis.asyncio import Redis
from yarl import URL

from claim_service.auth import mint_token
from claim_service.config import Settings
from claim_service.connections import create_pg_pool, create_redis, migrate
from claim_service.embedded import EmbeddedServers
from claim_service.http_server import Guard, ServiceRunner
from claim_service.web import create_apps

TABLES = (
    "anomalies, claims, claim_events, voucher_codes, partners, tiers, stock_additions, "
    "benefit_options, benefits"
)


@pytest.fixture(scope="session")
def server_urls() -> Iterator[tuple[str, str]]:
    redis_url = os.environ.get("CLAIM_TEST_REDIS_URL")
    database_url = os.environ.get("CLAIM_TEST_DATABASE_URL")
    if redis_url and database_url:
        yield redis_url, database_url
        return
    with EmbeddedServers(ephemeral=True) as servers:
        yield servers.redis_url, servers.database_url


@pytest.fixture(scope="session")
def settings(server_urls: tuple[str, str]) -> Settings:
    redis_url, database_url = server_urls

    async def apply() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(apply())
    return Settings.from_env({}, redis_url=redis_url, database_url=database_url)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    assert settings.redis_url
    client = await create_redis(settings.redis_url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    assert settings.database_url
    pg = await create_pg_pool(settings.database_url, max_size=10)
    await pg.execute(f"TRUNCATE {TABLES} CASCADE")
    yield pg
    await pg.close()


class ServiceTestServer(TestServer):
    """A test server run as ``serve`` runs its listeners (guarded connections, handlers not
    cancelled when their client goes away)."""

    def __init__(self, app: web.Application, guard: Guard) -> None:
        super().__init__(app)
        self.guard = guard

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs["handler_cancellation"] = False
        return ServiceRunner(self.app, self.guard, **kwargs)


def is_admin_path(path: str) -> bool:
    return path == "/metrics" or path == "/admin" or path.startswith(("/admin/", "/admin?"))


class ServiceClient(TestClient[Any, Any]):
    """The member and admin listeners behind one client: each request goes to the listener
    that serves its path under ``serve`` (``/admin…`` and ``/metrics`` to the admin one)."""

    def __init__(self, member: web.Application, admin: web.Application, guard: Guard) -> None:
        super().__init__(ServiceTestServer(member, guard))
        self.admin = TestClient(ServiceTestServer(admin, guard))

    @property
    def admin_app(self) -> web.Application:
        return self.admin.app

    def server_for(self, path: str) -> TestServer:
        """The test server of the listener that serves ``path``."""
        chosen = self.admin.server if is_admin_path(path) else self.server
        assert isinstance(chosen, TestServer)
        return chosen

    def make_url(self, path: Any) -> URL:
        url = URL(path)
        if url.is_absolute():
            return url
        return self.server_for(url.path).make_url(path)

    async def start_server(self) -> None:
        await super().start_server()  # the member listener owns the pools: first up
        await self.admin.start_server()

    async def close(self) -> None:
        await self.admin.close()
        await super().close()


@pytest.fixture
async def client(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> AsyncIterator[TestClient[Any, Any]]:
    member, admin = create_apps(settings, pools=(redis, pool))
    async with ServiceClient(member, admin, Guard.for_process(settings)) as test_client:
        yield test_client


def member_token(settings: Settings, user_id: str, ttl: int = 3600) -> str:
    return mint_token(settings, user_id, ttl)


def auth(settings: Settings, user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {member_token(settings, user_id)}"}


def admin(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.admin_token}"}


def direct(option_id: str, **extra: Any) -> dict[str, Any]:
    """A direct-charge option (card-key options need codes loaded before they can be claimed)."""
    return {"option_id": option_id, "kind": "direct_charge", "partner": "p", "sku": "s", **extra}


def benefit_body(
    *,
    stock: int = 10,
    min_tier: int = 4,
    quota: Any = None,
    opens_in_s: float = -60,
    closes_in_s: float | None = None,
    options: list[dict[str, Any]] | None = None,
    paused: bool = False,
) -> dict[str, Any]:
    now = datetime.now().astimezone()
    release: dict[str, Any] = {
        "type": "once",
        "opens_at": (now + timedelta(seconds=opens_in_s)).isoformat(),
    }
    if closes_in_s is not None:
        release["closes_at"] = (now + timedelta(seconds=closes_in_s)).isoformat()
    return {
        "name": "Video membership, monthly card",
        "min_tier": min_tier,
        "quota": quota
        if quota is not None
        else [
            {"min_tier": 4, "per_period": 1},
            {"min_tier": 8, "per_period": 2},
        ],
        "stock_per_period": stock,
        "release": release,
        "paused": paused,
        "options": options
        or [
            {
                "option_id": "iqiyi",
                "name": "iQiyi",
                "kind": "direct_charge",
                "partner": "iqiyi",
                "sku": "IQY-M1",
            },
            {
                "option_id": "tencent",
                "name": "Tencent Video",
                "kind": "direct_charge",
                "partner": "tencent",
                "sku": "TX-M1",
            },
        ],
    }
