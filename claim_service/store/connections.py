"""Redis and PostgreSQL pool factories that ping, retry and log."""

from __future__ import annotations

import asyncio
import logging
import re

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from claim_service.errors import BackendUnavailable
from claim_service.store.keyspace import (
    REDIS_CONNECT_RETRIES,
    REDIS_SOCKET_TIMEOUT_S,
)

log = logging.getLogger(__name__)


async def create_redis(url: str, *, max_connections: int = 64) -> aioredis.Redis:
    """A pooled Redis client; waits (with retries) until the server answers PING."""
    # A blocking pool makes a burst wait briefly for a free connection instead of failing
    # with "Too many connections".
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
        health_check_interval=30,
    )
    client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
    for attempt in range(1, REDIS_CONNECT_RETRIES + 1):
        try:
            await client.ping()
            return client
        except (RedisError, OSError) as exc:
            if attempt == REDIS_CONNECT_RETRIES:
                await client.aclose()
                raise BackendUnavailable(f"Redis at {_redact(url)} is unreachable") from exc
            log.warning("Redis not reachable yet (%s), retry %d", exc, attempt)
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


async def create_pg_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """An asyncpg pool; waits (with retries) until the server accepts connections."""
    for attempt in range(1, REDIS_CONNECT_RETRIES + 1):
        try:
            pool = await asyncpg.create_pool(
                url, min_size=min_size, max_size=max_size, command_timeout=60
            )
            assert pool is not None
            return pool
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            if attempt == REDIS_CONNECT_RETRIES:
                raise BackendUnavailable(f"PostgreSQL at {_redact(url)} is unreachable") from exc
            log.warning("PostgreSQL not reachable yet (%s), retry %d", exc, attempt)
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)
