"""Redis and PostgreSQL pool factories that ping, retry and log.

``CLAIM_REDIS_URL`` is a plain ``redis://`` (or ``rediss://``, ``unix://``) URL, or
``redis+sentinel://[[user]:password@]HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB]``: the client
then asks the sentinels where the master is on every new connection, and drops connections
to a master that was demoted (``READONLY``) or went away, so it follows a failover by itself.
The password, if any, is the master's; the sentinels are asked without one.

``redis+cluster://[[user]:password@]HOST:PORT[,HOST:PORT…]`` connects to a Redis or Valkey
Cluster through any of the nodes named (redis-py's cluster client, which learns the slot map
and follows MOVED/ASK). It never tears down every connection on a burst of MOVED replies
(``reinitialize_steps=0``): doing so under load made commands in flight fail after they had
run, and their retries ran them twice; the slot map is refreshed on each MOVED instead.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import RedisError

from claim_service.config import CLUSTER_SCHEME, SENTINEL_SCHEME
from claim_service.errors import BackendUnavailable, ConfigError
from claim_service.store.keyspace import (
    REDIS_CONNECT_RETRIES,
    REDIS_SOCKET_TIMEOUT_S,
)

log = logging.getLogger(__name__)

SENTINEL_DEFAULT_PORT = 26379
HEALTH_CHECK_INTERVAL_S = 30


@dataclass(frozen=True)
class SentinelAddress:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelAddress:
    """``redis+sentinel://[[user]:password@]HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB]``."""
    prefix = SENTINEL_SCHEME + "://"
    if not url.startswith(prefix):
        raise ConfigError(f"CLAIM_REDIS_URL: not a {SENTINEL_SCHEME}:// URL")
    rest = url.removeprefix(prefix)
    if "?" in rest or "#" in rest:
        raise ConfigError("CLAIM_REDIS_URL: a sentinel URL takes no query or fragment")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = tuple(_host_port(item) for item in hosts.split(",") if item)
    parts = [p for p in path.split("/") if p]
    if not sentinels or not 1 <= len(parts) <= 2:
        raise ConfigError(
            "CLAIM_REDIS_URL: expected redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]"
        )
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ConfigError(f"CLAIM_REDIS_URL: database {parts[1]!r} is not a number")
        db = int(parts[1])
    return SentinelAddress(sentinels, unquote(parts[0]), db, username, password)


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """``redis+cluster://[[user]:password@]HOST:PORT[,HOST:PORT…]``: the seed nodes, the
    username and the password."""
    match = re.match(
        re.escape(CLUSTER_SCHEME) + r"://(?:([^:@/]*)(?::([^@/]*))?@)?([^/?#]*)/?\Z", url
    )
    if match is None:
        raise ConfigError("CLAIM_REDIS_URL: expected redis+cluster://HOST:PORT[,HOST:PORT...]")
    user, password, hosts = match.groups()
    nodes = [_host_port(item, 6379) for item in hosts.split(",") if item]
    if not nodes:
        raise ConfigError("CLAIM_REDIS_URL: a cluster URL names at least one node")
    return nodes, unquote(user) if user else None, unquote(password) if password else None


def _host_port(item: str, default_port: int = SENTINEL_DEFAULT_PORT) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, port = item[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host or (port and not port.isdigit()):
        raise ConfigError(f"CLAIM_REDIS_URL: bad node address {item!r}")
    return host, int(port) if port else default_port


class SentinelBlockingConnectionPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel-managed connections with the blocking pool's wait for a free connection."""


class SentinelRedis(aioredis.Redis):
    """The master's client; closing it also closes the clients of the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        owns_pool = close_connection_pool or (
            close_connection_pool is None and self.auto_close_connection_pool
        )
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        if owns_pool and isinstance(manager, Sentinel):
            await manager.aclose()


async def create_redis(
    url: str, *, max_connections: int = 64, timeout_s: float = REDIS_SOCKET_TIMEOUT_S
) -> aioredis.Redis:
    """A pooled Redis client; waits (with retries) until the server answers PING.

    ``timeout_s`` bounds every call: connecting, each reply, and the wait for a free
    connection, so an unreachable Redis is an error within it rather than a hang."""
    # A blocking pool makes a burst wait briefly for a free connection instead of failing
    # with "Too many connections".
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": timeout_s,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }
    client: aioredis.Redis
    if url.startswith(SENTINEL_SCHEME + "://"):
        address = parse_sentinel_url(url)
        timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(address.sentinels), sentinel_kwargs=timeouts
        )
        client = sentinel.master_for(
            address.master_name,
            redis_class=SentinelRedis,
            connection_pool_class=SentinelBlockingConnectionPool,
            db=address.db,
            username=address.username,
            password=address.password,
            **options,
        )
    elif url.startswith(CLUSTER_SCHEME + "://"):
        nodes, username, password = parse_cluster_url(url)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            reinitialize_steps=0,
            max_connections=max_connections,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
            username=username,
            password=password,
        )
        # The commands the service uses are the same on both clients; where they differ
        # (pipelines of scripts, node-local commands), ``is_cluster`` tells.
        client = cast(aioredis.Redis, cluster)
    else:
        pool = aioredis.BlockingConnectionPool.from_url(url, **options)
        client = aioredis.Redis(connection_pool=pool)
    for attempt in range(1, REDIS_CONNECT_RETRIES + 1):
        try:
            await client.ping()
            return client
        except (RedisError, OSError) as exc:
            if attempt == REDIS_CONNECT_RETRIES:
                await close_redis(client)
                raise BackendUnavailable(f"Redis at {redact(url)} is unreachable") from exc
            log.warning("Redis not reachable yet (%s), retry %d", exc, attempt)
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


def is_cluster(client: object) -> bool:
    """Whether ``client`` talks to a Redis Cluster."""
    return isinstance(client, RedisCluster)


async def close_redis(client: aioredis.Redis) -> None:
    if isinstance(client, RedisCluster):
        await client.aclose()
    else:
        await client.aclose(close_connection_pool=True)


async def create_pg_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, command_timeout_s: float = 60.0
) -> asyncpg.Pool:
    """An asyncpg pool; waits (with retries) until the server accepts connections. Each
    statement fails (``TimeoutError``) after ``command_timeout_s``."""
    for attempt in range(1, REDIS_CONNECT_RETRIES + 1):
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                command_timeout=command_timeout_s,
                timeout=command_timeout_s,  # opening a connection, too
            )
            assert pool is not None
            return pool
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            if attempt == REDIS_CONNECT_RETRIES:
                raise BackendUnavailable(f"PostgreSQL at {redact(url)} is unreachable") from exc
            log.warning("PostgreSQL not reachable yet (%s), retry %d", exc, attempt)
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


def redact(url: str) -> str:
    """``url`` without its password (``redis://:secret@host`` included)."""
    return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)
