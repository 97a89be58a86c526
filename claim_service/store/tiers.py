"""Monthly tier snapshots: stored in PostgreSQL, mirrored into one Redis hash per period."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service.domain.catalogue import MAX_TIER
from claim_service.errors import BackendUnavailable, ValidationError
from claim_service.store.keyspace import PERIOD_KEY_TTL_S, tiers_key
from claim_service.store.stock_events import announce

log = logging.getLogger(__name__)

CHUNK = 20_000
MAX_USER_ID = 128


def check_user_id(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_USER_ID or not value.isprintable():
        raise ValidationError(
            f"user_id must be 1..{MAX_USER_ID} printable characters", field="user_id"
        )
    return value


def check_tier(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIER:
        raise ValidationError(f"tier must be an integer in 0..{MAX_TIER}", field="tier")
    return value


async def save_tiers(
    pool: asyncpg.Pool, redis: Redis, period: str, rows: Sequence[tuple[str, int]]
) -> int:
    """Upsert ``(user_id, tier)`` rows for ``period``: PostgreSQL first, then Redis."""
    if not rows:
        return 0
    users = [r[0] for r in rows]
    tiers = [r[1] for r in rows]
    await pool.execute(
        """INSERT INTO tiers (period, user_id, tier)
           SELECT $1, u, t FROM unnest($2::text[], $3::int[]) AS x(u, t)
           ON CONFLICT (period, user_id) DO UPDATE SET tier = EXCLUDED.tier""",
        period,
        users,
        tiers,
    )
    await _push(redis, period, rows)
    await announce(redis)  # a member's tier may have changed: every gate forgets tiers
    return len(rows)


async def _push(redis: Redis, period: str, rows: Sequence[tuple[str, int]]) -> None:
    key = tiers_key(period)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(rows), CHUNK):
                pipe.hset(key, mapping=dict(rows[start : start + CHUNK]))
            pipe.expire(key, PERIOD_KEY_TTL_S)
            await pipe.execute()
    except RedisError as exc:
        raise BackendUnavailable("tiers saved; Redis not updated, run `warm`") from exc


def read_tier_csv(path: Path) -> Iterator[tuple[str, int]]:
    """Rows of ``user_id,tier`` (a header line is skipped); raises on the first bad line."""
    with path.open(newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if lineno == 1 and not row[-1].strip().lstrip("-").isdigit():
                continue  # header
            if len(row) != 2:
                raise ValidationError(f"{path}:{lineno}: expected user_id,tier")
            try:
                tier = int(row[1])
                yield check_user_id(row[0].strip()), check_tier(tier)
            except (ValueError, ValidationError) as exc:
                raise ValidationError(f"{path}:{lineno}: {exc}") from exc


async def load_tier_csv(
    pool: asyncpg.Pool,
    redis: Redis,
    path: Path,
    period: str,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Stream a CSV of millions of rows into PostgreSQL (COPY) and Redis, in chunks."""
    total = 0
    chunk: list[tuple[str, int]] = []
    async with pool.acquire() as conn:
        for row in read_tier_csv(path):
            chunk.append(row)
            if len(chunk) >= CHUNK:
                total += await _copy_chunk(conn, redis, period, chunk)
                chunk = []
                if progress:
                    progress(total)
        if chunk:
            total += await _copy_chunk(conn, redis, period, chunk)
            if progress:
                progress(total)
    return total


async def _copy_chunk(
    conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
    redis: Redis,
    period: str,
    chunk: list[tuple[str, int]],
) -> int:
    async with conn.transaction():
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS tier_load (user_id text, tier int) ON COMMIT DROP"
        )
        await conn.copy_records_to_table("tier_load", records=chunk)
        await conn.execute(
            """INSERT INTO tiers (period, user_id, tier)
               SELECT DISTINCT ON (user_id) $1, user_id, tier FROM tier_load
               ON CONFLICT (period, user_id) DO UPDATE SET tier = EXCLUDED.tier""",
            period,
        )
    await _push(redis, period, chunk)
    return len(chunk)


async def push_tiers_from_db(pool: asyncpg.Pool, redis: Redis, period: str) -> int:
    """Mirror a period's snapshot from PostgreSQL into Redis (used by ``warm``)."""
    total = 0
    async with pool.acquire() as conn, conn.transaction():
        chunk: list[tuple[str, int]] = []
        async for row in conn.cursor(
            "SELECT user_id, tier FROM tiers WHERE period = $1", period, prefetch=CHUNK
        ):
            chunk.append((row["user_id"], row["tier"]))
            if len(chunk) >= CHUNK:
                await _push(redis, period, chunk)
                total += len(chunk)
                chunk = []
        if chunk:
            await _push(redis, period, chunk)
            total += len(chunk)
    return total
