"""The service on a local Valkey Cluster (three primaries, started by ``EmbeddedCluster``),
with the same PostgreSQL as the other tests. Set ``CLAIM_TEST_CLUSTER_URL`` to run against a
cluster you manage (it is flushed!)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.http.server import Guard
from claim_service.http.service import create_apps
from claim_service.local.embedded_cluster import EmbeddedCluster
from claim_service.store.connections import close_redis, create_redis
from tests.helpers import ServiceClient


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    configured = os.environ.get("CLAIM_TEST_CLUSTER_URL")
    if configured:
        yield configured
        return
    with EmbeddedCluster(primaries=3, replicas_per_primary=0) as cluster:
        yield cluster.url


@pytest.fixture
def cluster_settings(settings: Settings, cluster_url: str) -> Settings:
    return replace(settings, redis_url=cluster_url)


@pytest.fixture
async def cluster_redis(cluster_settings: Settings) -> AsyncIterator[Redis]:
    assert cluster_settings.redis_url
    client = await create_redis(cluster_settings.redis_url)
    await client.flushall()
    yield client
    await close_redis(client)


@pytest.fixture
async def cluster_client(
    cluster_settings: Settings, cluster_redis: Redis, pool: asyncpg.Pool
) -> AsyncIterator[TestClient[Any, Any]]:
    member, admin = create_apps(cluster_settings, pools=(cluster_redis, pool))
    async with ServiceClient(member, admin, Guard.for_process(cluster_settings)) as test_client:
        yield test_client
