"""The catalogue in PostgreSQL (source of truth) and its copy in Redis.

Every change bumps the benefit's ``version`` in PostgreSQL first and then pushes the whole
configuration to Redis; ``push_config.lua`` refuses to go backwards, so concurrent pushes
converge on the newest version. ``warm`` rebuilds Redis from PostgreSQL after a data loss
without ever lowering a counter Redis still holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service.catalogue import Benefit, parse_benefit
from claim_service.errors import BackendUnavailable, NotFoundError
from claim_service.keyspace import CATALOGUE_KEY, PERIOD_KEY_TTL_S, BenefitKeys, Scripts

log = logging.getLogger(__name__)

RESTORE_CHUNK = 2_000


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
    return fields


async def push_benefit(redis: Redis, benefit: Benefit) -> bool:
    keys = BenefitKeys(benefit.benefit_id)
    argv: list[Any] = [benefit.version, benefit.benefit_id]
    for name, value in config_fields(benefit).items():
        argv += [name, value]
    try:
        written = await Scripts(redis).push_config(keys=[keys.config, CATALOGUE_KEY], args=argv)
    except RedisError as exc:
        raise BackendUnavailable("could not push the benefit to Redis") from exc
    return bool(written)


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
        version = await conn.fetchval(
            """INSERT INTO benefits (benefit_id, name, min_tier, quota, stock_per_period,
                                     release, paused, on_failure)
               VALUES ($1, $2, $3, $4::jsonb, $5, $6::jsonb, $7, $8)
               ON CONFLICT (benefit_id) DO UPDATE SET
                   name = EXCLUDED.name, min_tier = EXCLUDED.min_tier,
                   quota = EXCLUDED.quota, stock_per_period = EXCLUDED.stock_per_period,
                   release = EXCLUDED.release, paused = EXCLUDED.paused,
                   on_failure = EXCLUDED.on_failure,
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
        )
        await conn.execute("DELETE FROM benefit_options WHERE benefit_id = $1", benefit.benefit_id)
        await conn.executemany(
            """INSERT INTO benefit_options (benefit_id, option_id, position, name, kind,
                                            partner, sku, stock_cap)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            [
                (benefit.benefit_id, o.option_id, i, o.name, o.kind, o.partner, o.sku, o.stock_cap)
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
                      'partner', o.partner, 'sku', o.sku, 'stock_cap', o.stock_cap)
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
            "options": orjson.loads(row["options"]),
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
    """Record a top-up in PostgreSQL, then raise Redis's counter. Returns the period's total."""
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
    try:
        keys = BenefitKeys(benefit_id)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(keys.stock(period), "added", amount)
            pipe.expire(keys.stock(period), PERIOD_KEY_TTL_S)
            total, _ = await pipe.execute()
    except RedisError as exc:
        raise BackendUnavailable("stock recorded; Redis not updated, run `warm`") from exc
    return int(total)


@dataclass
class WarmReport:
    benefits_pushed: int = 0
    periods: tuple[str, ...] = ()
    tiers_loaded: int = 0
    counters_restored: int = 0


async def warm(
    pool: asyncpg.Pool, redis: Redis, tz: ZoneInfo, periods: Iterable[str]
) -> WarmReport:
    """Rebuild Redis from PostgreSQL: catalogue, tiers, stock, quotas and idempotency."""
    from claim_service.tiers import push_tiers_from_db

    report = WarmReport(periods=tuple(periods))
    scripts = Scripts(redis)
    for benefit in await load_benefits(pool, tz):
        await push_benefit(redis, benefit)
        report.benefits_pushed += 1
    for period in report.periods:
        report.tiers_loaded += await push_tiers_from_db(pool, redis, period)
        report.counters_restored += await _restore_counters(pool, scripts, period)
    report.counters_restored += await _restore_codes(pool, scripts)
    return report


async def _restore_counters(pool: asyncpg.Pool, scripts: Scripts, period: str) -> int:
    restored = 0
    added = await pool.fetch(
        "SELECT benefit_id, sum(amount) AS n FROM stock_additions WHERE period = $1 GROUP BY 1",
        period,
    )
    for row in added:
        keys = BenefitKeys(row["benefit_id"])
        restored += await _restore(scripts, keys.stock(period), "max", [("added", row["n"])])
    taken = await pool.fetch(
        """SELECT benefit_id, option_id, count(*) AS n FROM claims
           WHERE period = $1 AND status <> 'refunded'
           GROUP BY ROLLUP (benefit_id, option_id)""",
        period,
    )
    for row in taken:
        if row["benefit_id"] is None:
            continue
        field = "taken" if row["option_id"] is None else "taken:" + row["option_id"]
        keys = BenefitKeys(row["benefit_id"])
        restored += await _restore(scripts, keys.stock(period), "max", [(field, row["n"])])
    async with pool.acquire() as conn, conn.transaction():
        cursor = conn.cursor(
            """SELECT benefit_id, user_id, count(*) FILTER (WHERE status <> 'refunded') AS n,
                      array_agg(request_id) AS requests, array_agg(claim_id) AS claim_ids,
                      array_agg(option_id) AS options, array_agg(tier) AS tiers,
                      array_agg((extract(epoch FROM created_at) * 1000)::bigint) AS created
               FROM claims WHERE period = $1 GROUP BY benefit_id, user_id
               ORDER BY benefit_id""",
            period,
        )
        used: dict[str, list[tuple[str, Any]]] = {}
        idem: dict[str, list[tuple[str, Any]]] = {}
        async for row in cursor:
            bid = row["benefit_id"]
            user = row["user_id"]
            used.setdefault(bid, []).append((user, row["n"]))
            for req, cid, opt, tier, created in zip(
                row["requests"],
                row["claim_ids"],
                row["options"],
                row["tiers"],
                row["created"],
                strict=True,
            ):
                field = f"{len(user)}:{user}{req}"
                idem.setdefault(bid, []).append((field, f"{cid}|{opt}|{tier}|{created}"))
    for bid, pairs in used.items():
        restored += await _restore(scripts, BenefitKeys(bid).used(period), "max", pairs)
    for bid, pairs in idem.items():
        restored += await _restore(scripts, BenefitKeys(bid).idempotency(period), "setnx", pairs)
    refunded = await pool.fetch(
        "SELECT benefit_id, claim_id FROM claims WHERE period = $1 AND status = 'refunded'",
        period,
    )
    async with scripts.client.pipeline(transaction=False) as pipe:
        for row in refunded:
            pipe.sadd(BenefitKeys(row["benefit_id"]).refunded(period), row["claim_id"])
            pipe.expire(BenefitKeys(row["benefit_id"]).refunded(period), PERIOD_KEY_TTL_S)
        await pipe.execute()
    return restored


async def _restore_codes(pool: asyncpg.Pool, scripts: Scripts) -> int:
    """Free-code counters of card-key options, only where Redis lost them."""
    from claim_service.vouchers import pool_levels, reserved_without_code

    restored = 0
    for level in await pool_levels(pool):
        bid, oid = level["benefit_id"], level["option_id"]
        free = level["free"] - await reserved_without_code(pool, bid, oid)
        restored += await _restore(
            scripts, BenefitKeys(bid).codes, "setnx", [(oid, max(free, 0))], ttl_s=0
        )
    return restored


async def _restore(
    scripts: Scripts,
    key: str,
    mode: str,
    pairs: list[tuple[str, Any]],
    ttl_s: int = PERIOD_KEY_TTL_S,
) -> int:
    written = 0
    for start in range(0, len(pairs), RESTORE_CHUNK):
        argv: list[Any] = [mode, ttl_s]
        for field, value in pairs[start : start + RESTORE_CHUNK]:
            argv += [field, value]
        written += int(await scripts.restore(keys=[key], args=argv))
    return written
