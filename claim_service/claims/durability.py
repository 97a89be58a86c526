"""Durable acknowledgement (``CLAIM_DURABILITY``): a batch that accepted or replayed claims
is answered only once Redis holds it durably.

- ``none``: answered as soon as ``claim.lua`` decided. The server's own AOF policy applies; a
  crash may lose the last second, a failover whatever the replica had not received yet.
- ``local``: after ``WAITAOF 1 0``: the batch is fsynced to the server's AOF.
- ``replica``: after that and ``WAIT N``: ``CLAIM_DURABILITY_REPLICAS`` replicas hold it too.
  ``WAIT`` (received, not fsynced) rather than ``WAITAOF 1 N``, so replicas need no AOF of their
  own: what it guards against is losing the master (its machine or disk), with a replica
  promoted in its place.

The waits run on the connection that ran the batch's script: ``WAITAOF`` and ``WAIT`` wait for
that connection's last write, so one fsync (and one replica acknowledgement) covers the whole
batch. A batch that only replayed earlier claims wrote nothing on it, so it refreshes the
lifetime of the period's idempotency keys first; replication offsets are global, so the wait
then also covers the earlier write, whichever connection made it. A batch not confirmed in
time is answered ``503`` for its accepted and replayed claims: they may or may not stand, and
a retry with the same ``request_id`` says which (itself answered only once durable).

``check_server`` is what ``serve`` asks before it starts: a mode the server cannot honour is
refused (an AOF off or not fsynced on every write, a server without ``WAITAOF``, fewer
replicas online than required). Replicas lost later make claims answer ``503``, not hang.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from claim_service import metrics
from claim_service.config import Settings
from claim_service.errors import BackendUnavailable, ConfigError
from claim_service.store.connections import is_cluster
from claim_service.store.keyspace import PERIOD_KEY_TTL_S, REDIS_SOCKET_TIMEOUT_S, text

log = logging.getLogger(__name__)

WAITAOF_SINCE = (7, 2)  # Redis 7.2 and every Valkey


class HeldConnection:
    """One pooled connection, held for a batch: its script and the wait that must follow on
    the same connection. Plain commands and replies, without a client object per batch."""

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn

    async def call(self, *args: Any) -> Any:
        await self.conn.send_command(*args)
        return await self.conn.read_response()

    async def calls(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Several commands in one round trip; an error reply comes back in its place."""
        await self.conn.send_packed_command(self.conn.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await self.conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies

    async def script(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA, loading the script first when this server does not know it."""
        try:
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            script.sha = text(await self.call("SCRIPT", "LOAD", script.script))
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)


@asynccontextmanager
async def held_connection(redis: Redis, key: str = "") -> AsyncIterator[HeldConnection]:
    """A connection of ``redis``'s pool for the duration; dropped if it broke mid-command.
    On a cluster, a connection to the primary serving ``key``'s slot: if the slot moved or
    the node failed, the client's slot map is refreshed for the next call (this one fails,
    and nothing ran, or it ran where the slot was: a retry of the same request finds it)."""
    if is_cluster(redis):
        cluster = cast(RedisCluster, redis)
        node = cluster.get_node_from_key(key)
        if node is None:
            raise BackendUnavailable("no primary serves this benefit's slot now")
        conn = node.acquire_connection()
        try:
            yield HeldConnection(conn)
        except BaseException as exc:
            if not isinstance(exc, ResponseError):
                await conn.disconnect()
            if isinstance(exc, (AskError, ClusterDownError, TryAgainError, ConnectionError)):
                await _refresh_slots(cluster)
            raise
        finally:
            node.release(conn)
        return
    pool = redis.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        yield HeldConnection(conn)
    except BaseException as exc:
        if not isinstance(exc, ResponseError):  # a reply may still be on its way
            await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


async def _refresh_slots(cluster: RedisCluster) -> None:
    with contextlib.suppress(RedisError, OSError):
        await cluster.nodes_manager.initialize()


class DurableAck:
    """Waits, on the connection that ran a batch, until Redis holds it as the mode requires."""

    def __init__(self, settings: Settings) -> None:
        self.mode = settings.durability
        self.replicas = settings.durability_replicas
        self.timeout_ms = settings.durability_timeout_ms

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    async def confirm(
        self, conn: HeldConnection, *, wrote: bool, touch: Sequence[str] = ()
    ) -> bool:
        """True once ``conn``'s writes (and, when it did not ``write``, those before the
        first existing key of ``touch``) are durable; False when Redis did not confirm it
        within ``CLAIM_DURABILITY_TIMEOUT_MS`` or failed."""
        started = time.monotonic()
        # Sent together: the server answers WAITAOF (at once under appendfsync always), then
        # WAIT, each within the timeout.
        waits: list[tuple[Any, ...]] = [("WAITAOF", 1, 0, self.timeout_ms)]
        if self.mode == "replica":
            waits.append(("WAIT", self.replicas, self.timeout_ms))
        failure = ""
        try:
            if not wrote:
                for key in touch:
                    if await conn.call("EXPIRE", key, PERIOD_KEY_TTL_S):
                        break
            replies = await conn.calls(*waits)
            for reply in replies:
                if isinstance(reply, ResponseError):
                    raise reply
            durable = int(replies[0][0]) >= 1
            if self.mode == "replica":
                durable = durable and int(replies[1]) >= self.replicas
        except RedisError as exc:
            failure = f" ({type(exc).__name__}: {exc})"
            durable = False
        metrics.CLAIM_DURABLE_WAIT.inc(time.monotonic() - started)
        metrics.CLAIM_DURABLE_BATCHES.labels("yes" if durable else "no").inc()
        if not durable:
            log.warning(
                "a claim batch was not confirmed durable (%s) within %d ms%s",
                self.mode,
                self.timeout_ms,
                failure,
            )
        return durable


@dataclass(frozen=True)
class ServerFacts:
    """What decides whether a Redis server can honour a durability mode."""

    server: str  # "valkey" or "redis"
    version: tuple[int, ...]
    role: str
    aof_enabled: bool
    appendfsync: str | None  # None when CONFIG GET is not allowed
    online_replicas: int


def durability_problems(
    mode: str, replicas: int, facts: ServerFacts
) -> tuple[list[str], list[str]]:
    """Why ``facts``'s server cannot honour ``mode`` (refusals), and what could not be
    verified (warnings)."""
    refusals: list[str] = []
    warnings: list[str] = []
    if mode == "none":
        return refusals, warnings
    name = f"{facts.server} {'.'.join(map(str, facts.version))}"
    if facts.version < WAITAOF_SINCE:
        refusals.append(f"{name} has no WAITAOF (Redis 7.2 or later, or Valkey, is needed)")
    if facts.role != "master":
        refusals.append(f"CLAIM_REDIS_URL names a {facts.role}, not a master")
    if not facts.aof_enabled:
        refusals.append("the server's AOF is off (appendonly no)")
    elif facts.appendfsync is None:
        warnings.append(
            "could not read the server's appendfsync (CONFIG GET is not allowed); it must be "
            "'always' for claims to be answered promptly and only once on disk"
        )
    elif facts.appendfsync != "always":
        # With everysec the server fsyncs once a second, so a batch would wait up to a
        # second; and some servers answer WAITAOF before that fsync has happened.
        refusals.append(f"the server fsyncs its AOF with '{facts.appendfsync}', not 'always'")
    if mode == "replica" and facts.online_replicas < replicas:
        refusals.append(
            f"{facts.online_replicas} replica(s) online, CLAIM_DURABILITY_REPLICAS={replicas}"
        )
    return refusals, warnings


async def server_facts(redis: Redis) -> ServerFacts:
    """Read ``ServerFacts`` from ``INFO`` (and ``CONFIG GET`` where allowed)."""
    info = await redis.info("server")
    server = "valkey" if info.get("valkey_version") else "redis"
    version = _version(str(info.get("valkey_version") or info.get("redis_version", "0")))
    replication = await redis.info("replication")
    online = sum(
        1
        for key, value in replication.items()
        if re.fullmatch(r"slave\d+", str(key))
        and isinstance(value, Mapping)
        and value.get("state") == "online"
    )
    config = await _config(redis, "appendonly", "appendfsync")
    if "appendonly" in config:
        aof = config["appendonly"] == "yes"
    else:  # CONFIG is disabled: INFO still says whether the AOF is on
        aof = int((await redis.info("persistence")).get("aof_enabled", 0)) == 1
    return ServerFacts(
        server,
        version,
        str(replication.get("role", "master")),
        aof,
        config.get("appendfsync"),
        online,
    )


async def check_server(redis: Redis, settings: Settings) -> list[str]:
    """Refuse (``ConfigError``) a durability mode the server cannot honour; the warnings
    about what could not be verified."""
    if settings.durability == "none":
        return []
    if is_cluster(redis):  # every primary must honour it: each decides its slots' claims
        refusals, warnings = [], []
        for node in cast(RedisCluster, redis).get_primaries():
            one = Redis(host=node.host, port=int(node.port), socket_timeout=REDIS_SOCKET_TIMEOUT_S)
            try:
                facts = await server_facts(one)
            finally:
                await one.aclose()
            found = durability_problems(settings.durability, settings.durability_replicas, facts)
            refusals += [f"{node.host}:{node.port}: {r}" for r in found[0]]
            warnings += [f"{node.host}:{node.port}: {w}" for w in found[1]]
    else:
        facts = await server_facts(redis)
        refusals, warnings = durability_problems(
            settings.durability, settings.durability_replicas, facts
        )
    if refusals:
        raise ConfigError(
            f"CLAIM_DURABILITY={settings.durability} cannot be honoured by this Redis: "
            + "; ".join(refusals)
        )
    return warnings


async def _config(redis: Redis, *names: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in names:
        try:
            reply: Any = await redis.config_get(name)
        except ResponseError:  # renamed away, or not permitted to this user
            return found
        for key, value in reply.items():
            found[text(key)] = text(value)
    return found


def _version(raw: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", raw)[:3]) or (0,)
