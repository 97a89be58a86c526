"""Faults on a Redis Cluster during a burst: the benefit's slot migrated live to another
primary, and the benefit's primary killed (its replica takes over); each for a plain
benefit and for a sharded one (``[sharded]``: 8 buckets, the fault hitting a bucket's slot
while the buckets borrow from each other). A client retries each
unanswered claim with the same request id, as an app does. Afterwards every acknowledged
claim is in PostgreSQL once, exactly the stock is taken, and no member has two."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimDecision, ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.errors import BackendUnavailable
from claim_service.local.embedded_cluster import EmbeddedCluster, NodeInfo
from claim_service.store import catalogue_store
from claim_service.store.connections import close_redis, create_redis
from claim_service.store.keyspace import BenefitKeys, bucket_keys
from claim_service.store.tiers import save_tiers
from tests.helpers import benefit_body, drain, fast

STOCK = 200
MEMBERS = 500
RETRY_FOR_S = 30.0


def durable_cluster(data_dir: Path, replicas: int) -> EmbeddedCluster:
    """Primaries that fsync every write, with ``replicas`` replicas each, as
    ``CLAIM_DURABILITY=replica`` needs (after a failover the promoted replica's slots still
    need one replica online to confirm claims: two each keep one)."""
    return EmbeddedCluster(
        primaries=3, replicas_per_primary=replicas, ephemeral=False, data_dir=data_dir,
        appendfsync="always",
    )  # fmt: skip


SHARDS = [pytest.param(1, id="plain"), pytest.param(8, id="sharded")]


def fault_slot(redis: Redis, shards: int) -> int:
    """The slot the fault hits: the benefit's, or its first bucket's."""
    keys = BenefitKeys("video") if shards == 1 else bucket_keys("video", shards)[0]
    return int(redis.keyslot(keys.config))  # type: ignore[attr-defined]


async def burst(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    fault: Callable[[], None],
    shards: int = 1,
) -> tuple[dict[str, ClaimDecision], int]:
    """MEMBERS members claim once each (quota 1) while ``fault`` runs in a thread; returns
    each member's final answer and how many attempts were refused for a while."""
    body = {**benefit_body(stock=STOCK, quota=1), "shards": shards}
    benefit = parse_benefit("video", body, settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    period = periods.current_period(settings.tz)
    await save_tiers(pool, redis, period, [(f"m{i}", 5) for i in range(MEMBERS)])
    engines = [ClaimEngine(redis, settings, pool=pool) for _ in range(2)]
    refused = 0

    async def member(i: int) -> tuple[str, ClaimDecision]:
        nonlocal refused
        request = ClaimRequest("video", f"m{i}", "r", "iqiyi")
        deadline = time.monotonic() + RETRY_FOR_S
        await asyncio.sleep(i * 0.004)  # the burst spans the fault
        while True:
            try:
                return request.user_id, await engines[i % 2].claim(request)
            except BackendUnavailable:
                refused += 1
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    faulted = asyncio.create_task(asyncio.to_thread(fault))
    answers = dict(await asyncio.gather(*(member(i) for i in range(MEMBERS))))
    await faulted
    for engine in engines:
        await engine.drain()
    return answers, refused


async def assert_nothing_lost_or_doubled(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, answers: dict[str, ClaimDecision]
) -> None:
    accepted = {u: d.claim_id for u, d in answers.items() if d.accepted}
    codes = Counter(d.code for d in answers.values())
    assert len(accepted) == STOCK, codes
    assert codes["sold_out"] == MEMBERS - STOCK, codes
    await drain(ClaimWriter(redis, pool, fast(settings)))
    rows = await pool.fetch("SELECT claim_id, user_id FROM claims WHERE benefit_id = 'video'")
    assert sorted(r["claim_id"] for r in rows) == sorted(str(c) for c in accepted.values())
    assert len({r["user_id"] for r in rows}) == len(rows) == STOCK
    period = periods.current_period(settings.tz)
    shards = int(await redis.hget(BenefitKeys("video").config, "shards") or 1)
    owners = [BenefitKeys("video")] if shards == 1 else bucket_keys("video", shards)
    taken = [await redis.hget(keys.stock(period), "taken") for keys in owners]
    assert sum(int(t or 0) for t in taken) == STOCK


async def connect(settings: Settings, cluster: EmbeddedCluster) -> tuple[Settings, Redis]:
    """The service's settings for ``cluster``: each batch answered once its primary has it
    on disk and a replica has it too (a failover must not lose what was answered)."""
    on_cluster = replace(
        settings, redis_url=cluster.url, durability="replica", durability_replicas=1
    )
    return on_cluster, await create_redis(cluster.url)


@pytest.mark.parametrize("shards", SHARDS)
async def test_a_slot_migrated_during_a_burst_loses_and_duplicates_nothing(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path, shards: int
) -> None:
    with durable_cluster(tmp_path, 1) as own_cluster:
        await _migrated_during_a_burst(settings, pool, own_cluster, shards)


async def _migrated_during_a_burst(
    settings: Settings, pool: asyncpg.Pool, own_cluster: EmbeddedCluster, shards: int = 1
) -> None:
    on_cluster, redis = await connect(settings, own_cluster)
    try:
        slot = fault_slot(redis, shards)
        source = own_cluster.primary_for_slot(slot)
        target = next(n for n in own_cluster.nodes if n.role == "primary" and n != source)

        def migrate() -> None:
            time.sleep(0.5)  # mid-burst
            own_cluster.migrate_slot(slot, target, batch=5, pause_s=0.01)

        answers, _refused = await burst(on_cluster, redis, pool, migrate, shards)
        assert own_cluster.primary_for_slot(slot).port == target.port
        await assert_nothing_lost_or_doubled(on_cluster, redis, pool, answers)
    finally:
        await close_redis(redis)


@pytest.mark.parametrize("shards", SHARDS)
async def test_the_benefits_primary_killed_during_a_burst_loses_nothing_acknowledged(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path, shards: int
) -> None:
    with durable_cluster(tmp_path, 2) as own_cluster:
        await _killed_during_a_burst(settings, pool, own_cluster, shards)


async def _killed_during_a_burst(
    settings: Settings, pool: asyncpg.Pool, own_cluster: EmbeddedCluster, shards: int = 1
) -> None:
    on_cluster, redis = await connect(settings, own_cluster)
    try:
        slot = fault_slot(redis, shards)
        primary: NodeInfo = own_cluster.primary_for_slot(slot)

        def kill() -> None:
            time.sleep(0.5)
            own_cluster.kill(primary)
            own_cluster.wait_healthy(30)

        answers, refused = await burst(on_cluster, redis, pool, kill, shards)
        assert own_cluster.primary_for_slot(slot).port != primary.port
        assert refused > 0, "claims were refused (503) while the slot had no primary"
        await assert_nothing_lost_or_doubled(on_cluster, redis, pool, answers)
    finally:
        await close_redis(redis)
