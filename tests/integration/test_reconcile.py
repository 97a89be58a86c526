"""Reconciliation: every kind of drift between Redis and the truth (PostgreSQL and the
stream) is reported exactly, ``fix`` repairs it, a healthy benefit under load shows none, and
the writer's periodic check exports it."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import Benefit, parse_benefit
from claim_service.errors import BackendUnavailable
from claim_service.fulfilment.compensation import refund
from claim_service.fulfilment.vouchers import CodeRow, load_codes
from claim_service.store import catalogue_store, reconcile
from claim_service.store.keyspace import BenefitKeys, code_bucket, idem_field, text
from claim_service.store.reconcile import Drift, Reconciler
from claim_service.store.recovery import Recovery
from claim_service.store.tiers import save_tiers
from claim_service.store.vault import Vault
from tests.helpers import benefit_body, direct, drain, fast, wait_for

OPTIONS = [direct("iqiyi"), {"option_id": "youku", "kind": "card_key"}]


async def _benefit(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, *, stock: int, members: int, codes: int
) -> tuple[Benefit, str, int]:
    """Benefit ``video``: options ``iqiyi`` (direct charge) and ``youku`` (card-key: half
    its codes never expire, half expire in a day); members u0.. at tier 5, quota 1. Returns
    the benefit, the period and the expiry (unix ms) of the expiring codes."""
    period = periods.current_period(settings.tz)
    body = benefit_body(stock=stock, quota=1, options=OPTIONS)
    benefit = await catalogue_store.save_benefit(pool, parse_benefit("video", body, settings.tz))
    await catalogue_store.push_benefit(redis, benefit)
    await save_tiers(pool, redis, period, [(f"u{i}", 5) for i in range(members)])
    await Recovery(pool, redis, settings).ensure_benefit("video")
    expires = datetime.now().astimezone().replace(microsecond=0) + timedelta(days=1)
    rows = [CodeRow(f"YK-{i}", None, expires if i % 2 else None) for i in range(codes)]
    await load_codes(pool, redis, Vault(settings.codes_key), "video", "youku", rows)
    return benefit, period, int(expires.timestamp() * 1000)


def gauge_is(labels: dict[str, str], value: float) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return REGISTRY.get_sample_value("claim_drift", labels) == value

    return check


def _exact(drift: list[Drift]) -> set[tuple[str, str, Any, Any]]:
    return {(d.kind, d.subject, d.redis, d.expected) for d in drift}


async def test_each_kind_of_drift_is_reported_exactly_and_fix_repairs_it(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    benefit, period, expiry = await _benefit(settings, redis, pool, stock=10, members=40, codes=8)
    await catalogue_store.add_stock(pool, redis, "video", period, 4, "top-up")
    engine = ClaimEngine(redis, settings, pool=pool)
    writer = ClaimWriter(redis, pool, fast(settings))
    claims = {}
    for i in range(8):  # u0..u3 direct charge, u4..u7 card-key; the last two stay in the stream
        option = "iqiyi" if i < 4 else "youku"
        decision = await engine.claim(ClaimRequest("video", f"u{i}", "r", option))
        assert decision.code == "ok", decision
        claims[f"u{i}"] = decision.claim_id
        if i == 5:
            await drain(writer)
    reconciler = Reconciler(pool, redis, settings)
    healthy = await reconciler.check(benefit)
    assert healthy.live and healthy.period == period and healthy.drift == []

    keys = BenefitKeys("video")
    await redis.hincrby(keys.stock(period), "taken", 1)
    await redis.hincrby(keys.stock(period), "taken:iqiyi", 2)
    await redis.hset(keys.stock(period), "added", 1)
    await redis.hincrby(keys.used(period), "u1", -1)
    await redis.hdel(keys.idempotency(period), idem_field("u2", "r"))
    await redis.hset(keys.idempotency(period), idem_field("u30", "ghost"), "c0ffee|iqiyi|5|1")
    original = text(await redis.hget(keys.idempotency(period), idem_field("u3", "r")))
    _, tail = original.split("|", 1)
    await redis.hset(keys.idempotency(period), idem_field("u3", "r"), f"other|{tail}")
    # Four card-key claims took the four expiring codes first: that bucket is empty.
    await redis.hincrby(keys.codes, code_bucket("youku", expiry), 3)

    found = await reconciler.check(benefit)
    assert _exact(found.drift) == {
        ("taken", "", 9, 8),
        ("option_taken", "iqiyi", 6, 4),
        ("added", "", 1, 4),
        ("quota", "u1", 0, 1),
        ("idem_missing", "member 'u2' request 'r'", None, claims["u2"]),
        ("idem_extra", "member 'u30' request 'ghost'", "c0ffee", None),
        ("idem_different", "member 'u3' request 'r'", "other", claims["u3"]),
        ("codes", "youku", 7, 4),
    }
    lines = [d.describe() for d in found.drift]
    assert f"video {period} taken: Redis 9, expected 8 (+1)" in lines
    assert "video codes youku: Redis 7, expected 4 (+3)" in lines

    fixed = await reconciler.fix(benefit)
    assert fixed.live and fixed.drift == []
    # The rules hold for the claims that follow: 14 units, 8 taken; u1 is at quota; u2's
    # retry finds its claim; youku has 4 codes left.
    assert (await engine.claim(ClaimRequest("video", "u1", "again", "iqiyi"))).code == "quota"
    retry = await engine.claim(ClaimRequest("video", "u2", "r", "iqiyi"))
    assert retry.code == "dup" and retry.claim_id == claims["u2"]
    youku = [await engine.claim(ClaimRequest("video", f"u{i}", "r", "youku")) for i in range(8, 14)]
    assert [d.code for d in youku] == ["ok"] * 4 + ["option_sold_out"] * 2
    rest = [await engine.claim(ClaimRequest("video", f"u{i}", "r", "iqiyi")) for i in range(14, 20)]
    assert Counter(d.code for d in rest) == {"ok": 2, "sold_out": 4}
    await drain(writer)
    assert await pool.fetchval("SELECT count(*) FROM claims") == 14
    assert (await reconciler.check(benefit)).drift == []


async def test_a_healthy_benefit_under_load_shows_no_drift(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims accepted, persisted and refunded while the comparison reads: no drift, even
    from a single pass (without the confirming second one)."""
    monkeypatch.setattr(reconcile, "PASSES", 1)
    benefit, _, _ = await _benefit(settings, redis, pool, stock=120, members=300, codes=60)
    engine = ClaimEngine(redis, settings, pool=pool)
    writer = ClaimWriter(redis, pool, fast(settings))
    members = itertools.cycle(range(300))
    rng = random.Random(7)
    done = asyncio.Event()
    stats: Counter[str] = Counter()

    async def claim() -> None:
        while not done.is_set():
            option = rng.choice(["iqiyi", "iqiyi", "youku"])
            request = ClaimRequest("video", f"u{next(members)}", f"r{rng.random()}", option)
            try:
                stats[(await engine.claim(request)).code] += 1
            except BackendUnavailable:
                stats["unavailable"] += 1
            await asyncio.sleep(0)

    async def persist() -> None:
        while not done.is_set():
            await writer.step()

    async def fail_and_refund() -> None:  # partners saying no: units and quota come back
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
    checks = raced = 0
    try:
        for _ in range(25):
            accepted, refunded = stats["ok"], stats["refunded"]
            check = await reconciler.check(benefit)
            assert check.live
            assert check.drift == [], [d.describe() for d in check.drift]
            checks += 1
            raced += stats["ok"] > accepted and stats["refunded"] > refunded
    finally:
        done.set()
        await asyncio.gather(*workers)
    # The comparisons really raced claims and refunds.
    assert checks == 25 and raced >= 5, (raced, stats)
    assert stats["sold_out"] + stats["option_sold_out"] > 0, stats
    await drain(writer)
    assert (await reconciler.check(benefit)).drift == []


async def test_the_writer_checks_periodically_and_exports_drift(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    benefit, period, _ = await _benefit(settings, redis, pool, stock=10, members=5, codes=0)
    engine = ClaimEngine(redis, settings, pool=pool)
    assert (await engine.claim(ClaimRequest("video", "u0", "r", "iqiyi"))).code == "ok"
    labels = {"benefit": "video", "kind": "taken"}
    stop = asyncio.Event()
    writer = ClaimWriter(redis, pool, replace(fast(settings), reconcile_every_s=0.1))
    task = asyncio.create_task(writer.run(stop))
    try:
        await wait_for(gauge_is(labels, 0))
        await redis.hincrby(BenefitKeys("video").stock(period), "taken", 2)
        with caplog.at_level(logging.WARNING, logger="claim_service.store.reconcile"):
            await wait_for(gauge_is(labels, 1))
        assert f"video {period} taken: Redis 3, expected 1 (+2)" in caplog.text
        quota = {"benefit": "video", "kind": "quota"}
        assert REGISTRY.get_sample_value("claim_drift", quota) == 0
        await Reconciler(pool, redis, settings).fix(benefit)
        await wait_for(gauge_is(labels, 0))
    finally:
        stop.set()
        await task
    assert await pool.fetchval("SELECT count(*) FROM claims") == 1  # it kept persisting


async def test_a_benefit_not_live_is_not_compared_and_fix_makes_it_live(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    benefit, period, _ = await _benefit(settings, redis, pool, stock=10, members=5, codes=0)
    engine = ClaimEngine(redis, settings, pool=pool)
    assert (await engine.claim(ClaimRequest("video", "u0", "r", "iqiyi"))).code == "ok"
    keys = BenefitKeys("video")
    await redis.delete(keys.live, keys.stock(period))  # a server that lost its counters
    reconciler = Reconciler(pool, redis, settings)
    check = await reconciler.check(benefit)
    assert not check.live and check.drift == []
    fixed = await reconciler.fix(benefit)
    assert fixed.live and fixed.drift == []
    assert int(await redis.hget(keys.stock(period), "taken") or 0) == 1
