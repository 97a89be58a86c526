"""Real Valkey and PostgreSQL servers for the whole run, flushed before every test, and the
fixtures more than one test module uses. Plain helpers are in ``tests/helpers.py``.

The servers are started by the project's own ``EmbeddedServers``. To run against servers
you manage, set ``CLAIM_TEST_REDIS_URL`` and ``CLAIM_TEST_DATABASE_URL`` (they are flushed!).

A test that must hold on both Redis deployments takes ``backend_settings``, ``backend_redis``
or ``backend_client`` instead of ``settings``, ``redis`` or ``client``: it then runs twice,
against the one Valkey (under its plain id, ``test_x``) and against a local Valkey Cluster
(``test_x[cluster]``; three primaries started by ``EmbeddedCluster`` once per run, only if a
cluster test runs, or the cluster at ``CLAIM_TEST_CLUSTER_URL``, flushed too). ``-k cluster``
or ``-k "not cluster"`` picks one side. ``cluster_settings``, ``cluster_redis`` and
``cluster_client`` are the cluster's alone (``tests/cluster``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.http.server import Guard
from claim_service.http.service import create_apps
from claim_service.local.embedded import EmbeddedServers
from claim_service.local.embedded_cluster import EmbeddedCluster
from claim_service.local.partner_sim import PartnerSimulator
from claim_service.local.partner_sim_config import SimConfig
from claim_service.store.connections import create_pg_pool, create_redis
from claim_service.store.migrations import migrate
from tests.helpers import SECRET, TABLES, ServiceClient


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
    # In-process tests run client and server on one event loop: its lag measures the test,
    # not a worker's backlog, so loop-lag shedding is off there (its own tests turn it on).
    return Settings.from_env({}, redis_url=redis_url, database_url=database_url, shed_lag_ms=0)


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A Valkey Cluster of three primaries (no replicas) for the whole run, with the same
    PostgreSQL as the other tests; or the one at ``CLAIM_TEST_CLUSTER_URL``."""
    configured = os.environ.get("CLAIM_TEST_CLUSTER_URL")
    if configured:
        yield configured
        return
    with EmbeddedCluster(primaries=3, replicas_per_primary=0) as cluster:
        yield cluster.url


REDIS, CLUSTER = "redis", "cluster"


@pytest.fixture(params=[pytest.param(REDIS, id=pytest.HIDDEN_PARAM), CLUSTER])
def backend(request: pytest.FixtureRequest) -> str:
    """Which Redis the ``backend_*`` fixtures use: ``redis`` (one Valkey, the id of the test
    unchanged) or ``cluster``."""
    return str(request.param)


@pytest.fixture
def cluster_settings(settings: Settings, cluster_url: str) -> Settings:
    return replace(settings, redis_url=cluster_url)


@pytest.fixture
def backend_settings(request: pytest.FixtureRequest, backend: str, settings: Settings) -> Settings:
    """``settings``, or ``cluster_settings`` for the ``cluster`` variant (the cluster is
    started on first use, so that a run of single-Redis tests never starts one)."""
    if backend == CLUSTER:
        cluster: Settings = request.getfixturevalue("cluster_settings")
        return cluster
    return settings


@asynccontextmanager
async def flushed_redis(settings: Settings) -> AsyncIterator[Redis]:
    """A client of ``settings``' Redis (one server or a cluster), flushed first."""
    assert settings.redis_url
    client = await create_redis(settings.redis_url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def service_client(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> AsyncIterator[TestClient[Any, Any]]:
    """The in-process service (both listeners) on ``redis`` and ``pool``."""
    member, admin = create_apps(settings, pools=(redis, pool))
    async with ServiceClient(member, admin, Guard.for_process(settings)) as test_client:
        yield test_client


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    async with flushed_redis(settings) as client:
        yield client


@pytest.fixture
async def backend_redis(backend_settings: Settings) -> AsyncIterator[Redis]:
    async with flushed_redis(backend_settings) as client:
        yield client


@pytest.fixture
async def cluster_redis(cluster_settings: Settings) -> AsyncIterator[Redis]:
    async with flushed_redis(cluster_settings) as client:
        yield client


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    assert settings.database_url
    pg = await create_pg_pool(settings.database_url, max_size=10)
    await pg.execute(f"TRUNCATE {TABLES} CASCADE")
    yield pg
    await pg.close()


@pytest.fixture
async def client(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> AsyncIterator[TestClient[Any, Any]]:
    async with service_client(settings, redis, pool) as test_client:
        yield test_client


@pytest.fixture
async def backend_client(
    backend_settings: Settings, backend_redis: Redis, pool: asyncpg.Pool
) -> AsyncIterator[TestClient[Any, Any]]:
    async with service_client(backend_settings, backend_redis, pool) as test_client:
        yield test_client


@pytest.fixture
async def cluster_client(
    cluster_settings: Settings, cluster_redis: Redis, pool: asyncpg.Pool
) -> AsyncIterator[TestClient[Any, Any]]:
    async with service_client(cluster_settings, cluster_redis, pool) as test_client:
        yield test_client


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()  # a graceful stop cleans up after itself
    for proc in started:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
async def sim() -> AsyncIterator[PartnerSimulator]:
    simulator = PartnerSimulator(SimConfig(secret=SECRET, latency_ms=1, seed=3))
    await simulator.start("127.0.0.1", 0)
    yield simulator
    await simulator.stop()
