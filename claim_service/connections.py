"""Redis and PostgreSQL pool factories that ping, retry and log, and schema migrations."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from claim_service.errors import BackendUnavailable, MigrationError
from claim_service.keyspace import REDIS_CONNECT_RETRIES, REDIS_SOCKET_TIMEOUT_S, migrations_dir

log = logging.getLogger(__name__)

MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
MIGRATION_LOCK = 0x636C61696D  # advisory lock id: one migrator at a time


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


def list_migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every ``migrations/NNNN_name.sql``, in order."""
    found = []
    for path in sorted(migrations_dir().glob("*.sql")):
        match = MIGRATION_RE.match(path.name)
        if not match:
            raise MigrationError(f"migration file name {path.name!r} is not NNNN_name.sql")
        found.append((int(match.group(1)), match.group(2), path.read_text()))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migrations share a number")
    return found


async def migrate(conn: Any) -> list[str]:
    """Apply pending migrations, each once and in its own transaction. Returns names applied."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in list_migrations():
            if version in done:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {version:04d}_{name} failed: {exc}") from exc
            log.info("applied migration %04d_%s", version, name)
            applied.append(f"{version:04d}_{name}")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied
