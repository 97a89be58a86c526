"""The writer moves every accepted claim into PostgreSQL exactly once."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import asyncpg
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.claims.writer import ClaimWriter, ensure_group
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.store import catalogue_store
from claim_service.store.keyspace import WRITER_GROUP, BenefitKeys
from claim_service.store.tiers import save_tiers
from tests.helpers import benefit_body, drain, fast


async def make_claims(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, n: int, stock: int = 1000
) -> list[str]:
    benefit = parse_benefit("video", benefit_body(stock=stock), settings.tz)
    benefit = await catalogue_store.save_benefit(pool, benefit)
    await catalogue_store.push_benefit(redis, benefit)
    period = periods.current_period(settings.tz)
    await save_tiers(pool, redis, period, [(f"m{i}", 5) for i in range(n)])
    engine = ClaimEngine(redis, settings, pool=pool)
    decisions = await asyncio.gather(
        *(engine.claim(ClaimRequest("video", f"m{i}", "r", "iqiyi")) for i in range(n))
    )
    return [d.claim_id for d in decisions if d.accepted and d.claim_id]


async def test_writer_persists_each_claim_once(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    accepted = await make_claims(settings, redis, pool, 300, stock=250)
    assert len(accepted) == 250
    writer = ClaimWriter(redis, pool, fast(settings))
    await drain(writer)
    rows = await pool.fetch("SELECT claim_id, user_id, tier, status FROM claims")
    assert sorted(r["claim_id"] for r in rows) == sorted(accepted)
    assert {r["status"] for r in rows} == {"accepted"}
    assert {r["tier"] for r in rows} == {5}
    keys = BenefitKeys("video")
    assert await redis.xlen(keys.stream) == 0
    assert await redis.hlen(keys.pending) == 0


async def test_replayed_entries_make_no_second_row(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    accepted = await make_claims(settings, redis, pool, 20)
    keys = BenefitKeys("video")
    await ensure_group(redis, keys.stream)
    entries: list[Any] = list(await redis.xrange(keys.stream) or [])
    writer = ClaimWriter(redis, pool, fast(settings))
    # Write the same entries twice, as a writer that died after COMMIT but before XACK would.
    await writer.write(keys.stream, entries)
    await writer.write(keys.stream, entries)
    assert await pool.fetchval("SELECT count(*) FROM claims") == len(accepted) == 20
    assert writer.stats.inserted == 20 and writer.stats.duplicates == 20


async def test_pending_entries_of_a_dead_writer_are_taken_over(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    accepted = await make_claims(settings, redis, pool, 50)
    keys = BenefitKeys("video")
    await ensure_group(redis, keys.stream)
    # A writer reads a batch, then "dies" before writing it: the entries stay pending.
    delivered: Any = await redis.xreadgroup(
        WRITER_GROUP, "dead-writer", {keys.stream: ">"}, count=30
    )
    assert len(delivered[0][1]) == 30
    quick = replace(fast(settings), writer_claim_idle_ms=50)
    survivor = ClaimWriter(redis, pool, quick)
    await asyncio.sleep(0.1)
    await drain(survivor)
    await asyncio.sleep(1.1)  # the reclaim pass runs at most once a second
    await drain(survivor)
    assert await pool.fetchval("SELECT count(*) FROM claims") == len(accepted)
    assert survivor.stats.reclaimed == 30
    pending = await redis.xpending(keys.stream, WRITER_GROUP)
    assert pending["pending"] == 0


async def test_malformed_entries_are_dead_lettered(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await make_claims(settings, redis, pool, 3)
    keys = BenefitKeys("video")
    await ensure_group(redis, keys.stream)
    await redis.xadd(keys.stream, {"c": "broken"})
    writer = ClaimWriter(redis, pool, fast(settings))
    await drain(writer)
    assert await pool.fetchval("SELECT count(*) FROM claims") == 3
    assert writer.stats.dead_lettered == 1
    assert await redis.xlen("claim:deadletter") == 1


async def test_nothing_is_acknowledged_while_postgres_refuses_writes(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    accepted = await make_claims(settings, redis, pool, 40)
    keys = BenefitKeys("video")
    # PostgreSQL rejects every insert, as during an outage or a failing disk.
    await pool.execute(
        "ALTER TABLE claims ADD CONSTRAINT outage CHECK (claim_id IS NULL) NOT VALID"
    )
    try:
        stop = asyncio.Event()
        writer = ClaimWriter(redis, pool, fast(settings))
        task = asyncio.create_task(writer.run(stop))
        await asyncio.sleep(1.0)
        assert writer.stats.errors > 0 and writer.stats.inserted == 0
        assert await redis.xlen(keys.stream) == len(accepted)
        assert await redis.hlen(keys.pending) == len(accepted)
    finally:
        await pool.execute("ALTER TABLE claims DROP CONSTRAINT outage")
    # The outage ends: the same writer catches up on its own backlog.
    for _ in range(100):
        if await pool.fetchval("SELECT count(*) FROM claims") == len(accepted):
            break
        await asyncio.sleep(0.1)
    stop.set()
    await task
    assert await pool.fetchval("SELECT count(*) FROM claims") == len(accepted)
    assert await redis.xlen(keys.stream) == 0
    assert (await redis.xpending(keys.stream, WRITER_GROUP))["pending"] == 0
