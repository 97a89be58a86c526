"""Zones in PostgreSQL (source of truth) and their mirror in one Redis hash.

The mirror (``ZONES_KEY``: zone_id -> zone JSON) is always written whole, in one MULTI, with
the ``MIRRORED`` field that tells "no zones" from "not mirrored" (a Redis that restarted
empty). Every writer WATCHes the hash before reading PostgreSQL and writes only if nobody
wrote it meanwhile, so an older copy never overwrites a newer one. Writers after a change
hold an advisory lock while they do, so that concurrent changes do not keep failing each
other's WATCH.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy
from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from claim_service.domain.zones import Zone, parse_zone, zone_order
from claim_service.errors import BackendUnavailable, ValidationError
from claim_service.store.keyspace import ZONES_KEY, text

log = logging.getLogger(__name__)

# A zone id starts with a letter or a digit, so this field can never be a zone's.
MIRRORED = "_"
MIRROR_ATTEMPTS = 5
ZONES_LOCK = 0x7A6F6E6573  # advisory lock id: one process mirrors a change at a time


async def save_zone(pool: asyncpg.Pool, zone: Zone) -> bool:
    """Create or replace ``zone`` in PostgreSQL; whether it was created."""
    async with pool.acquire() as conn, conn.transaction():
        created = await conn.fetchval(
            """INSERT INTO zones (zone_id, name, min_tier, position) VALUES ($1, $2, $3, $4)
               ON CONFLICT (zone_id) DO NOTHING RETURNING true""",
            zone.zone_id,
            zone.name,
            zone.min_tier,
            zone.position,
        )
        if created:
            return True
        await conn.execute(
            """UPDATE zones SET name = $2, min_tier = $3, position = $4, updated_at = now()
               WHERE zone_id = $1""",
            zone.zone_id,
            zone.name,
            zone.min_tier,
            zone.position,
        )
    return False


async def list_zones(db: asyncpg.Pool | PoolConnectionProxy[asyncpg.Record]) -> list[Zone]:
    """Every zone in PostgreSQL, by position then zone_id."""
    rows = await db.fetch(
        "SELECT zone_id, name, min_tier, position FROM zones ORDER BY position, zone_id"
    )
    return [Zone(r["zone_id"], r["name"], r["min_tier"], r["position"]) for r in rows]


async def zone_exists(pool: asyncpg.Pool, zone_id: str) -> bool:
    return bool(await pool.fetchval("SELECT true FROM zones WHERE zone_id = $1", zone_id))


def zones_from_mirror(raw: dict[Any, Any]) -> list[Zone] | None:
    """The zones in an ``HGETALL`` of the mirror, by position then zone_id; ``None`` when it
    is not mirrored (or holds something unreadable: it is then mirrored again)."""
    fields = {text(k): v for k, v in raw.items()}
    if fields.pop(MIRRORED, None) is None:
        return None
    try:
        zones = [parse_zone(zone_id, orjson.loads(value)) for zone_id, value in fields.items()]
    except (orjson.JSONDecodeError, ValidationError) as exc:
        log.warning("the zones mirror in Redis is unreadable (%s); mirroring it again", exc)
        return None
    return sorted(zones, key=zone_order)


async def mirror_zones(redis: Redis, pool: asyncpg.Pool) -> list[Zone]:
    """Write PostgreSQL's zones to the Redis mirror, replacing it; returns them. Call it
    after every change: the last one to write read PostgreSQL after every change before."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ZONES_LOCK)
        return await _mirror(redis, conn, keep_mirrored=False)


async def load_zones(redis: Redis, pool: asyncpg.Pool) -> list[Zone]:
    """The zones from the Redis mirror; when it is absent, from PostgreSQL, mirrored again."""
    try:
        zones = zones_from_mirror(await redis.hgetall(ZONES_KEY))
    except RedisError as exc:
        raise BackendUnavailable("Redis is unavailable") from exc
    if zones is not None:
        return zones
    return await _mirror(redis, pool, keep_mirrored=True)


async def _mirror(
    redis: Redis, db: asyncpg.Pool | PoolConnectionProxy[asyncpg.Record], *, keep_mirrored: bool
) -> list[Zone]:
    """Mirror PostgreSQL's zones; with ``keep_mirrored``, only when no other process has
    meanwhile (many requests may find the mirror missing at once after a restart)."""
    try:
        async with redis.pipeline(transaction=True) as pipe:
            for _ in range(MIRROR_ATTEMPTS):
                await pipe.watch(ZONES_KEY)
                if keep_mirrored:
                    mirrored = zones_from_mirror(await pipe.hgetall(ZONES_KEY))
                    if mirrored is not None:
                        return mirrored
                zones = await list_zones(db)
                pipe.multi()  # type: ignore[no-untyped-call]  # (untyped in redis-py)
                pipe.delete(ZONES_KEY)
                pipe.hset(
                    ZONES_KEY,
                    mapping={
                        MIRRORED: "1",
                        **{z.zone_id: orjson.dumps(z.to_json()).decode() for z in zones},
                    },
                )
                try:
                    await pipe.execute()
                except WatchError:
                    continue  # another process wrote the mirror meanwhile: read again
                return zones
    except RedisError as exc:
        raise BackendUnavailable("Redis is unavailable: the zones were not mirrored") from exc
    raise BackendUnavailable("the zones kept changing while being mirrored; retry")
