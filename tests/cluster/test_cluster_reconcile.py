"""Reconciliation on a Redis Cluster, one benefit at a time on the primary serving its slot:
drift in benefits on every primary reported exactly and repaired, no drift while claims,
persistence and refunds race the comparison, a benefit not live left to recovery, and the
``reconcile`` command as an operator runs it against a cluster. Then recovery (what
``--fix`` and a claim on a benefit not live run) while the benefit's slot migrates."""

from __future__ import annotations

import asyncio
import itertools
import random
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, cast

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import Benefit, parse_benefit
from claim_service.errors import BackendUnavailable
from claim_service.fulfilment.compensation import refund
from claim_service.fulfilment.vouchers import CodeRow, load_codes
from claim_service.local.embedded_cluster import EmbeddedCluster
from claim_service.local.embedded_cluster_ops import NodeView, cluster_nodes, owner_of
from claim_service.local.embedded_cluster_ops import client as ops_client
from claim_service.store import catalogue_store, reconcile
from claim_service.store.connections import close_redis, create_redis
from claim_service.store.drift import Observed, compare
from claim_service.store.keyspace import BenefitKeys, idem_field
from claim_service.store.reconcile import Reconciler
from claim_service.store.recovery import Recovery
from claim_service.store.snapshot import ClaimRecord, Snapshot, idem_pairs
from claim_service.store.tiers import save_tiers
from claim_service.store.vault import Vault
from tests.helpers import benefit_body, direct, drain, fast, service_env

OPTIONS = [direct("iqiyi"), {"option_id": "youku", "kind": "card_key"}]
SPREAD = [f"b{i}" for i in range(6)]  # over the three primaries


def primaries_of(redis: Redis, benefit_ids: list[str]) -> set[str]:
    cluster = cast(RedisCluster, redis)
    return {str(cluster.get_node_from_key(BenefitKeys(b).config)) for b in benefit_ids}


async def benefits(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, ids: list[str], *, stock: int, codes: int
) -> dict[str, Benefit]:
    """Benefits ``ids`` with options ``iqiyi`` (direct charge) and ``youku`` (card-key:
    ``codes`` codes, every other one expiring in a day), quota 1; members m0..m299 at tier 5."""
    period = periods.current_period(settings.tz)
    await save_tiers(pool, redis, period, [(f"m{i}", 5) for i in range(300)])
    expires = datetime.now().astimezone().replace(microsecond=0) + timedelta(days=1)
    made = {}
    for benefit_id in ids:
        body = benefit_body(stock=stock, quota=1, options=OPTIONS)
        benefit = parse_benefit(benefit_id, body, settings.tz)
        made[benefit_id] = saved = await catalogue_store.save_benefit(pool, benefit)
        await catalogue_store.push_benefit(redis, saved)
        await Recovery(pool, redis, settings).ensure_benefit(benefit_id)
        rows = [CodeRow(f"{benefit_id}-{i}", None, [None, expires][i % 2]) for i in range(codes)]
        await load_codes(pool, redis, Vault(settings.codes_key), benefit_id, "youku", rows)
    return made


def exact(check: reconcile.BenefitCheck) -> set[tuple[str, str, Any, Any]]:
    return {(d.kind, d.subject, d.redis, d.expected) for d in check.drift}


def test_a_claim_dated_between_the_two_clock_readings_may_go_either_way() -> None:
    """On a cluster the instant Redis was read is known only between two readings of the
    primary's clock (``now_ms``, ``read_ms``): a claim dated between them is explained
    whether the counters hold it or not. On one server both are the same instant."""
    claim = ClaimRecord("c1", "m0", "r", "iqiyi", "2026-11", 5, 1_005, "accepted", None)
    truth = Snapshot([claim], 0, Counter(), 0, "2026-11")
    ((field, entry),) = idem_pairs([claim])

    def seen(held: bool, read_ms: int) -> Observed:
        return Observed(
            now_ms=1_000,
            read_ms=read_ms,
            stock={"taken": 1, "taken:iqiyi": 1} if held else {},
            refunded=set(),
            codes={},
            used={"m0": 1} if held else {},
            idem={field: entry} if held else {},
            scanned_ms=read_ms,
            refunded_by_then=set(),
        )

    empty = Snapshot([], 0, Counter(), 0, "2026-11")
    for held in (False, True):
        assert compare("video", empty, seen(held, read_ms=1_010), truth) == []
    one_instant = compare("video", empty, seen(True, read_ms=1_000), truth)
    assert {d.kind for d in one_instant} == {"taken", "option_taken", "quota"}


async def test_drift_on_every_primary_is_reported_exactly_and_repaired(
    cluster_settings: Settings, cluster_redis: Redis, pool: asyncpg.Pool
) -> None:
    settings, redis = cluster_settings, cluster_redis
    assert len(primaries_of(redis, SPREAD)) == 3
    made = await benefits(settings, redis, pool, SPREAD, stock=10, codes=4)
    period = periods.current_period(settings.tz)
    engine = ClaimEngine(redis, settings, pool=pool)
    writer = ClaimWriter(redis, pool, fast(settings))
    first: dict[str, str] = {}
    for member, option in (("m0", "iqiyi"), ("m1", "youku"), ("m2", "iqiyi"), ("m3", "youku")):
        if member == "m3":
            await drain(writer)  # m3's claims stay in the streams
        for benefit_id in SPREAD:
            decision = await engine.claim(ClaimRequest(benefit_id, member, "r", option))
            assert decision.code == "ok", decision
            if member == "m0":
                first[benefit_id] = str(decision.claim_id)
    reconciler = Reconciler(pool, redis, settings)
    healthy = await reconciler.check_all()
    assert [(c.benefit_id, c.period, c.live, c.drift) for c in healthy] == [
        (b, period, True, []) for b in SPREAD
    ]

    for i, benefit_id in enumerate(SPREAD):  # a different drift on each, on its own primary
        keys = BenefitKeys(benefit_id)
        await redis.hincrby(keys.stock(period), "taken", i + 1)
        await redis.hdel(keys.idempotency(period), idem_field("m0", "r"))
    for i, check in enumerate(await reconciler.check_all()):
        assert exact(check) == {
            ("taken", "", 4 + i + 1, 4),
            ("idem_missing", "member 'm0' request 'r'", None, first[check.benefit_id]),
        }, check.benefit_id

    for benefit_id in SPREAD:
        fixed = await reconciler.fix(made[benefit_id])
        assert fixed.live and fixed.drift == []
        retry = await engine.claim(ClaimRequest(benefit_id, "m0", "r", "iqiyi"))
        assert retry.code == "dup" and retry.claim_id == first[benefit_id]
        youku = await engine.claim(ClaimRequest(benefit_id, "m4", "r", "youku"))
        assert youku.code == "ok"  # 2 of the 4 codes taken before: 1 left after this one
    await drain(writer)
    assert all(c.drift == [] for c in await reconciler.check_all())


async def test_a_healthy_benefit_under_load_shows_no_drift_on_a_cluster(
    cluster_settings: Settings,
    cluster_redis: Redis,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Claims accepted, persisted and refunded while the comparison reads the benefit's
    primary (its clock read around the transaction, not in it): no drift, in a single pass."""
    settings, redis = cluster_settings, cluster_redis
    monkeypatch.setattr(reconcile, "PASSES", 1)
    benefit = (await benefits(settings, redis, pool, ["video"], stock=120, codes=60))["video"]
    engine = ClaimEngine(redis, settings, pool=pool)
    writer = ClaimWriter(redis, pool, fast(settings))
    members = itertools.cycle(range(300))
    rng = random.Random(11)
    done = asyncio.Event()
    stats: Counter[str] = Counter()

    async def claim() -> None:
        while not done.is_set():
            option = rng.choice(["iqiyi", "iqiyi", "youku"])
            request = ClaimRequest("video", f"m{next(members)}", f"r{rng.random()}", option)
            try:
                stats[(await engine.claim(request)).code] += 1
            except BackendUnavailable:
                stats["unavailable"] += 1
            await asyncio.sleep(0)

    async def persist() -> None:
        while not done.is_set():
            await writer.step()

    async def fail_and_refund() -> None:
        while not done.is_set():
            claim_id = await pool.fetchval(
                """UPDATE claims SET status = 'failed', failure_reason = 'partner_failed'
                   WHERE claim_id = (SELECT claim_id FROM claims WHERE status = 'accepted'
                                     AND option_id = 'iqiyi' ORDER BY random() LIMIT 1)
                   RETURNING claim_id"""
            )
            if claim_id is not None and await refund(pool, redis, claim_id):
                stats["refunded"] += 1
            await asyncio.sleep(0.005)

    reconciler = Reconciler(pool, redis, settings)
    workers = [asyncio.create_task(claim()) for _ in range(6)]
    workers += [asyncio.create_task(persist()), asyncio.create_task(fail_and_refund())]
    raced = 0
    try:
        for _ in range(25):
            accepted, refunded = stats["ok"], stats["refunded"]
            check = await reconciler.check(benefit)
            assert check.live
            assert check.drift == [], [d.describe() for d in check.drift]
            raced += stats["ok"] > accepted and stats["refunded"] > refunded
    finally:
        done.set()
        await asyncio.gather(*workers)
    assert raced >= 5, (raced, stats)
    assert stats["sold_out"] + stats["option_sold_out"] > 0, stats
    await drain(writer)
    assert (await reconciler.check(benefit)).drift == []


async def test_a_benefit_not_live_on_its_primary_is_left_to_recovery(
    cluster_settings: Settings, cluster_redis: Redis, pool: asyncpg.Pool
) -> None:
    settings, redis = cluster_settings, cluster_redis
    benefit = (await benefits(settings, redis, pool, ["video"], stock=10, codes=0))["video"]
    engine = ClaimEngine(redis, settings, pool=pool)
    assert (await engine.claim(ClaimRequest("video", "m0", "r", "iqiyi"))).code == "ok"
    keys = BenefitKeys("video")
    period = periods.current_period(settings.tz)
    await redis.delete(keys.live, keys.stock(period))  # a primary that lost its counters
    reconciler = Reconciler(pool, redis, settings)
    check = await reconciler.check(benefit)
    assert not check.live and check.drift == []
    fixed = await reconciler.fix(benefit)
    assert fixed.live and fixed.drift == []
    assert int(await redis.hget(keys.stock(period), "taken") or 0) == 1


def reconcile_command(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "claim_service", "reconcile", *args],
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_reconcile_command_on_a_cluster(
    cluster_settings: Settings, cluster_redis: Redis, pool: asyncpg.Pool
) -> None:
    settings, redis = cluster_settings, cluster_redis
    ids = ["b0", "b1", "b2"]
    assert len(primaries_of(redis, ids)) > 1
    await benefits(settings, redis, pool, ids, stock=10, codes=0)
    engine = ClaimEngine(redis, settings, pool=pool)
    for benefit_id in ids:
        for i in range(3):
            request = ClaimRequest(benefit_id, f"m{i}", "r", "iqiyi")
            assert (await engine.claim(request)).accepted
    await drain(ClaimWriter(redis, pool, fast(settings)))

    healthy = await asyncio.to_thread(reconcile_command, settings)
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout == "3 benefit(s) and the points mirror compared: no drift\n"

    period = periods.current_period(settings.tz)
    await redis.hincrby(BenefitKeys("b1").stock(period), "taken", 1)
    drifted = await asyncio.to_thread(reconcile_command, settings)
    assert drifted.returncode == 1, drifted.stderr
    assert drifted.stdout.splitlines() == [
        f"b1 {period} taken: Redis 4, expected 3 (+1)",
        "3 benefit(s) and the points mirror compared: 1 drift(s) in 1 benefit(s); "
        "--fix repairs them",
    ]
    fixed = await asyncio.to_thread(reconcile_command, settings, "--fix")
    assert fixed.returncode == 0, fixed.stderr
    assert "b1: rebuilt from PostgreSQL and the stream; 0 drift(s) left" in fixed.stdout
    assert int(await redis.hget(BenefitKeys("b1").stock(period), "taken") or 0) == 3


# -- recovery while the benefit's slot migrates ------------------------------------------------


def begin_migration(own: EmbeddedCluster, slot: int) -> tuple[NodeView, NodeView]:
    """The slot IMPORTING on another primary and MIGRATING on its own (the first steps of
    ``migrate_slot_steps``), no key moved yet; returns (source, target)."""
    views = cluster_nodes(own.servers[0].port)
    source = owner_of(views, slot)
    target = next(v for v in views if v.is_primary and v.node_id != source.node_id)
    with ops_client(target.port) as dst, ops_client(source.port) as src:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
    return source, target


def move_keys(source: NodeView, target: NodeView, slot: int, keep: int) -> None:
    """Move the slot's keys still on ``source`` to ``target``, all but ``keep`` of them."""
    with ops_client(source.port) as src:
        keys = sorted(src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10_000))
        if keys[keep:]:
            moving = keys[keep:]
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *moving)


def end_migration(own: EmbeddedCluster, source: NodeView, target: NodeView, slot: int) -> None:
    move_keys(source, target, slot, 0)
    others = [n.port for n in own.nodes if n.port not in (source.port, target.port)]
    for port in (target.port, source.port, *others):  # the order of ``migrate_slot_steps``
        with ops_client(port) as node:
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    own.wait_healthy()


async def test_a_benefit_recovered_while_its_slot_migrates_takes_no_claim_until_done(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    """Recovery of a benefit whose slot is being migrated, with its keys on the source, split
    between both primaries, then all but one on the target: each attempt fails (503, claims
    wait) and leaves the benefit not live, so no claim is decided on half-written counters.
    What fails: the rewrite of a counter hash still on the source (``restore.lua``: DEL,
    then HSET, which the source refuses once the key is gone: a missing key of a migrating
    slot is the target's), and once those are on the target, the MULTI rewriting the
    refunded set (on neither side: ASK, which redis-py's cluster transaction does not
    follow). Once the slot has moved, recovery rebuilds the counters exactly (from
    PostgreSQL and the stream), and the claims that follow keep the stock and the quotas."""
    with EmbeddedCluster(primaries=3, replicas_per_primary=0) as own:
        on_cluster = replace(settings, redis_url=own.url)
        redis = await create_redis(own.url)
        try:
            await recovered_while_migrating(own, on_cluster, redis, pool)
        finally:
            await close_redis(redis)


async def recovered_while_migrating(
    own: EmbeddedCluster, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    benefit = (await benefits(settings, redis, pool, ["video"], stock=6, codes=4))["video"]
    engine = ClaimEngine(redis, settings, pool=pool)
    writer = ClaimWriter(redis, pool, fast(settings))
    accepted: dict[str, str] = {}
    for member, option in (("m0", "iqiyi"), ("m1", "youku"), ("m2", "iqiyi"), ("m3", "iqiyi")):
        if member == "m3":
            await drain(writer)  # m3's claim stays in the stream
        decision = await engine.claim(ClaimRequest("video", member, "r", option))
        assert decision.code == "ok", decision
        accepted[member] = str(decision.claim_id)
    keys = BenefitKeys("video")
    slot = cast(RedisCluster, redis).keyslot(keys.config)
    source, target = begin_migration(own, slot)
    recovery = Recovery(pool, redis, settings)
    for phase, keep in enumerate((10_000, 4, 1)):  # none moved, half, all but one
        move_keys(source, target, slot, keep)
        with pytest.raises(BackendUnavailable):
            await recovery.ensure_benefit("video", force=True)
        with pytest.raises(BackendUnavailable):
            await engine.claim(ClaimRequest("video", f"n{phase}", "r", "iqiyi"))
    end_migration(own, source, target, slot)
    assert own.primary_for_slot(slot).port == target.port

    assert await recovery.ensure_benefit("video")
    reconciler = Reconciler(pool, redis, settings)
    check = await reconciler.check(benefit)
    assert check.live and check.drift == [], [d.describe() for d in check.drift]
    period = periods.current_period(settings.tz)
    stock = await redis.hgetall(keys.stock(period))
    assert (int(stock[b"taken"]), int(stock[b"taken:youku"])) == (4, 1)
    retry = await engine.claim(ClaimRequest("video", "m0", "r", "iqiyi"))
    assert retry.code == "dup" and retry.claim_id == accepted["m0"]
    later = [await engine.claim(ClaimRequest("video", f"m{i}", "r", "iqiyi")) for i in range(4, 8)]
    assert [d.code for d in later] == ["ok", "ok", "sold_out", "sold_out"]
    await drain(writer)
    assert await pool.fetchval("SELECT count(*) FROM claims WHERE benefit_id = 'video'") == 6
    assert (await reconciler.check(benefit)).drift == []
