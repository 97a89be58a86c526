"""The catalogue in PostgreSQL (source of truth) and its copy in Redis.

Every change bumps the benefit's ``version`` in PostgreSQL first and then pushes the whole
configuration to Redis; ``push_config.lua`` refuses to go backwards, so concurrent pushes
converge on the newest version. Rebuilding Redis's counters is ``recovery``'s job.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service.domain.catalogue import Benefit, parse_benefit
from claim_service.domain.shards import share
from claim_service.errors import BackendUnavailable, ConflictError, NotFoundError
from claim_service.store.keyspace import (
    BUCKETS_KEY,
    CATALOGUE_KEY,
    PERIOD_KEY_TTL_S,
    BenefitKeys,
    Scripts,
    bucket_keys,
)
from claim_service.store.stock_events import announce

log = logging.getLogger(__name__)


def config_fields(benefit: Benefit) -> dict[str, str | int]:
    """The cfg hash read by ``claim.lua`` and by the engine's catalogue cache."""
    fields: dict[str, str | int] = {
        "version": benefit.version,
        "paused": "1" if benefit.paused else "0",
        "min_tier": benefit.min_tier,
        "stock": benefit.stock_per_period,
        "quota": ",".join(f"{s.min_tier}:{s.per_period}" for s in benefit.quota),
        "benefit_id": benefit.benefit_id,
        "json": orjson.dumps(benefit.to_json()).decode(),
    }
    for option in benefit.options:
        fields["opt:" + option.option_id] = -1 if option.stock_cap is None else option.stock_cap
        if option.kind == "card_key":
            fields["card:" + option.option_id] = 1
        price = benefit.price_of(option.option_id)
        if price > 0:
            fields["pts:" + option.option_id] = price
    if benefit.shards > 1:
        fields["shards"] = benefit.shards
    if benefit.eligibility is not None:  # claim.lua: the member's event must be this recent
        fields["elig_ms"] = benefit.eligibility.within_ms
        if benefit.eligibility.held:  # a campaign's reward: not before its cool-off ends
            fields["elig_hold"] = 1
    if benefit.priced:
        fields["priced"] = 1
    if benefit.draw is not None:
        # "prize_id:weight:stock:option_id,..." in published order (stock -1: unlimited)
        fields["prizes"] = ",".join(
            f"{p.prize_id}:{p.weight}:{-1 if p.stock is None else p.stock}:{p.option_id}"
            for p in benefit.draw.prizes
        )
        pity = benefit.draw.pity
        if pity is not None:
            fields["pity"] = f"{pity.after}:" + ",".join(pity.prize_ids)
        fields["dprice"] = benefit.price_points
    return fields


async def push_benefit(redis: Redis, benefit: Benefit) -> bool:
    """Push the configuration to the benefit's keys, then to each of its stock buckets
    (each with its share of the stock: ``shards.share``)."""
    scripts = Scripts(redis)
    fields = config_fields(benefit)
    try:
        written = await _push(scripts, BenefitKeys(benefit.benefit_id), benefit, fields)
        await redis.sadd(CATALOGUE_KEY, benefit.benefit_id)  # listed once its cfg exists
        if benefit.shards > 1:
            await push_buckets(redis, benefit, fields)
    except RedisError as exc:
        raise BackendUnavailable("could not push the benefit to Redis") from exc
    await announce(redis, benefit.benefit_id)
    return bool(written)


async def push_buckets(
    redis: Redis, benefit: Benefit, fields: dict[str, str | int] | None = None
) -> None:
    """Push a sharded benefit's configuration to its buckets (``fields``: its own)."""
    scripts = Scripts(redis)
    fields = {k: v for k, v in (fields or config_fields(benefit)).items() if k != "json"}
    buckets = bucket_keys(benefit.benefit_id, benefit.shards)
    for number, keys in enumerate(buckets):
        fields["stock"] = share(benefit.stock_per_period, benefit.shards, number)
        await _push(scripts, keys, benefit, fields)
    await redis.sadd(BUCKETS_KEY, *(keys.benefit_id for keys in buckets))


async def _push(
    scripts: Scripts, keys: BenefitKeys, benefit: Benefit, fields: dict[str, str | int]
) -> int:
    argv: list[Any] = [benefit.version, benefit.benefit_id]
    for name, value in fields.items():
        argv += [name, value]
    return int(await scripts.push_config(keys=[keys.config], args=argv))


def benefit_from_config(raw_json: bytes | str, version: int, tz: ZoneInfo) -> Benefit:
    data = orjson.loads(raw_json)
    return parse_benefit(data["benefit_id"], data, tz, version=version)


async def save_benefit(pool: asyncpg.Pool, benefit: Benefit) -> Benefit:
    """Create or replace a benefit and its options; returns it with its new version."""
    quota = orjson.dumps(
        [{"min_tier": s.min_tier, "per_period": s.per_period} for s in benefit.quota]
    ).decode()
    release = orjson.dumps(benefit.release.to_json()).decode()
    async with pool.acquire() as conn, conn.transaction():
        shards = await conn.fetchval(
            "SELECT shards FROM benefits WHERE benefit_id = $1 FOR UPDATE", benefit.benefit_id
        )
        if shards is not None and shards != benefit.shards:
            raise ConflictError(
                "shards_fixed",
                f"shards cannot change once the benefit exists (it has {shards}): members "
                "would move to other buckets and lose their quota",
            )
        version = await conn.fetchval(
            """INSERT INTO benefits (benefit_id, name, min_tier, quota, stock_per_period,
                                     release, paused, on_failure, zone, price_points,
                                     choose, draw, waiting_room, shards, eligibility)
               VALUES ($1, $2, $3, $4::jsonb, $5, $6::jsonb, $7, $8, $9, $10, $11, $12::jsonb,
                       $13::jsonb, $14, $15::jsonb)
               ON CONFLICT (benefit_id) DO UPDATE SET
                   name = EXCLUDED.name, min_tier = EXCLUDED.min_tier,
                   quota = EXCLUDED.quota, stock_per_period = EXCLUDED.stock_per_period,
                   release = EXCLUDED.release, paused = EXCLUDED.paused,
                   on_failure = EXCLUDED.on_failure, zone = EXCLUDED.zone,
                   price_points = EXCLUDED.price_points, choose = EXCLUDED.choose,
                   draw = EXCLUDED.draw, waiting_room = EXCLUDED.waiting_room,
                   eligibility = EXCLUDED.eligibility,
                   version = benefits.version + 1, updated_at = now()
               RETURNING version""",
            benefit.benefit_id,
            benefit.name,
            benefit.min_tier,
            quota,
            benefit.stock_per_period,
            release,
            benefit.paused,
            benefit.on_failure,
            benefit.zone,
            benefit.price_points,
            benefit.choose,
            orjson.dumps(benefit.draw.to_json()).decode() if benefit.draw else None,
            orjson.dumps(benefit.waiting_room.to_json()).decode() if benefit.waiting_room else None,
            benefit.shards,
            orjson.dumps(benefit.eligibility.to_json()).decode() if benefit.eligibility else None,
        )
        await conn.execute("DELETE FROM benefit_options WHERE benefit_id = $1", benefit.benefit_id)
        await conn.executemany(
            """INSERT INTO benefit_options (benefit_id, option_id, position, name, kind,
                                            partner, sku, stock_cap, price_points)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            [
                (
                    benefit.benefit_id,
                    o.option_id,
                    i,
                    o.name,
                    o.kind,
                    o.partner,
                    o.sku,
                    o.stock_cap,
                    o.price_points,
                )
                for i, o in enumerate(benefit.options)
            ],
        )
    return replace(benefit, version=int(version))


async def load_benefits(
    pool: asyncpg.Pool, tz: ZoneInfo, benefit_id: str | None = None
) -> list[Benefit]:
    rows = await pool.fetch(
        """SELECT b.*, coalesce(json_agg(json_build_object(
                      'option_id', o.option_id, 'name', o.name, 'kind', o.kind,
                      'partner', o.partner, 'sku', o.sku, 'stock_cap', o.stock_cap,
                      'price_points', o.price_points)
                      ORDER BY o.position) FILTER (WHERE o.option_id IS NOT NULL), '[]') AS options
           FROM benefits b LEFT JOIN benefit_options o USING (benefit_id)
           WHERE $1::text IS NULL OR b.benefit_id = $1
           GROUP BY b.benefit_id ORDER BY b.benefit_id""",
        benefit_id,
    )
    benefits = []
    for row in rows:
        data = {
            "name": row["name"],
            "min_tier": row["min_tier"],
            "quota": orjson.loads(row["quota"]),
            "stock_per_period": row["stock_per_period"],
            "release": orjson.loads(row["release"]),
            "paused": row["paused"],
            "on_failure": row["on_failure"],
            "zone": row["zone"],
            "price_points": row["price_points"],
            "choose": row["choose"],
            "draw": orjson.loads(row["draw"]) if row["draw"] else None,
            "waiting_room": orjson.loads(row["waiting_room"]) if row["waiting_room"] else None,
            "options": orjson.loads(row["options"]),
            "shards": row["shards"],
            "eligibility": orjson.loads(row["eligibility"]) if row["eligibility"] else None,
        }
        benefits.append(parse_benefit(row["benefit_id"], data, tz, version=row["version"]))
    return benefits


async def load_benefit(pool: asyncpg.Pool, tz: ZoneInfo, benefit_id: str) -> Benefit:
    found = await load_benefits(pool, tz, benefit_id)
    if not found:
        raise NotFoundError("unknown_benefit", f"no benefit {benefit_id!r}")
    return found[0]


async def set_paused(
    pool: asyncpg.Pool, redis: Redis, tz: ZoneInfo, benefit_id: str, paused: bool
) -> Benefit:
    updated = await pool.fetchval(
        """UPDATE benefits SET paused = $2, version = version + 1, updated_at = now()
           WHERE benefit_id = $1 RETURNING version""",
        benefit_id,
        paused,
    )
    if updated is None:
        raise NotFoundError("unknown_benefit", f"no benefit {benefit_id!r}")
    benefit = await load_benefit(pool, tz, benefit_id)
    await push_benefit(redis, benefit)
    return benefit


async def add_stock(
    pool: asyncpg.Pool, redis: Redis, benefit_id: str, period: str, amount: int, note: str | None
) -> int:
    """Record a top-up in PostgreSQL, then raise Redis's ``added`` to the period's sum in
    PostgreSQL (never lowering it), so a repeat or a race with recovery cannot count a top-up
    twice or lose it. Returns the period's total."""
    async with pool.acquire() as conn, conn.transaction():
        exists = await conn.fetchval(
            "SELECT 1 FROM benefits WHERE benefit_id = $1 FOR SHARE", benefit_id
        )
        if not exists:
            raise NotFoundError("unknown_benefit", f"no benefit {benefit_id!r}")
        await conn.execute(
            "INSERT INTO stock_additions (benefit_id, period, amount, note) VALUES ($1,$2,$3,$4)",
            benefit_id,
            period,
            amount,
            note,
        )
    total = await pool.fetchval(
        "SELECT sum(amount) FROM stock_additions WHERE benefit_id = $1 AND period = $2",
        benefit_id,
        period,
    )
    shards = await pool.fetchval("SELECT shards FROM benefits WHERE benefit_id = $1", benefit_id)
    try:
        await raise_added(redis, benefit_id, shards or 1, period, int(total))
    except RedisError as exc:
        raise BackendUnavailable("stock recorded; Redis not updated, run `warm`") from exc
    await announce(redis, benefit_id)
    return int(total)


async def raise_added(redis: Redis, benefit_id: str, shards: int, period: str, total: int) -> None:
    """Raise the period's ``added`` to ``total`` (never lowering it): on the benefit, and on
    each bucket of a sharded one to its share of ``total``."""
    scripts = Scripts(redis)
    targets = [(BenefitKeys(benefit_id), total)]
    if shards > 1:
        buckets = bucket_keys(benefit_id, shards)
        targets += [(keys, share(total, shards, i)) for i, keys in enumerate(buckets)]
    for keys, amount in targets:
        await scripts.restore(
            keys=[keys.stock(period)], args=["max", PERIOD_KEY_TTL_S, "0", "", "added", amount]
        )
