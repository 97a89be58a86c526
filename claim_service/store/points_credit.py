"""Crediting points by tier: the rules, and one credit per member and period.

``credit_period`` walks the period's tier snapshot in PostgreSQL in chunks. Each member's
credit has the reference ``credit:<period>:<user_id>``, so running it again (after a crash,
or twice by mistake) writes nothing more; each chunk's lots are then added to the Redis
mirror, which is a no-op for lots it already has, so a re-run also repairs a mirror a crash
left behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
from redis.asyncio import Redis

from claim_service.domain import periods
from claim_service.domain.points import CreditRule, lot_expiry, rule_for
from claim_service.store import points_mirror

log = logging.getLogger(__name__)

CHUNK = 5_000


async def save_rules(pool: asyncpg.Pool, rules: tuple[CreditRule, ...]) -> None:
    """Replace the crediting rules as a whole."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM points_rules")
        await conn.executemany(
            """INSERT INTO points_rules (min_tier, points, expires_after_periods)
               VALUES ($1, $2, $3)""",
            [(r.min_tier, r.points, r.expires_after_periods) for r in rules],
        )


async def load_rules(pool: asyncpg.Pool) -> tuple[CreditRule, ...]:
    rows = await pool.fetch(
        "SELECT min_tier, points, expires_after_periods FROM points_rules ORDER BY min_tier"
    )
    return tuple(CreditRule(r["min_tier"], r["points"], r["expires_after_periods"]) for r in rows)


CREDIT_SQL = """
WITH c AS (
    SELECT * FROM unnest($1::text[], $2::int[], $3::timestamptz[]) AS c(user_id, points, expires_at)
), entries AS (
    INSERT INTO points_entries (user_id, amount, kind, reference, reason, period)
    SELECT user_id, points, 'credit', 'credit:' || $4 || ':' || user_id, $5, $4 FROM c
    ON CONFLICT (reference) DO NOTHING
    RETURNING entry_id, user_id
), lots AS (
    INSERT INTO points_lots (lot_id, user_id, expires_at)
    SELECT e.entry_id, e.user_id, c.expires_at FROM entries e JOIN c USING (user_id)
    RETURNING lot_id
), allocations AS (
    INSERT INTO points_allocations (entry_id, lot_id, amount)
    SELECT e.entry_id, e.entry_id, c.points FROM entries e JOIN c USING (user_id)
    RETURNING 1
)
SELECT (SELECT count(*) FROM entries) AS credited,
       (SELECT coalesce(sum(c.points), 0) FROM entries e JOIN c USING (user_id)) AS points,
       (SELECT count(*) FROM lots) + (SELECT count(*) FROM allocations) AS written
"""

# The period's credit lots of these members, with what is left of them, for the mirror.
LOTS_SQL = """
SELECT e.user_id, e.entry_id,
       coalesce(floor(extract(epoch FROM l.expires_at) * 1000)::bigint, 0) AS exp_ms,
       (SELECT sum(amount) FROM points_allocations a WHERE a.lot_id = e.entry_id) AS remaining
FROM points_entries e JOIN points_lots l ON l.lot_id = e.entry_id
WHERE e.reference = ANY($1::text[])
"""


@dataclass
class CreditReport:
    period: str
    members: int = 0  # in the period's tier snapshot
    walked: int = 0  # of them, looked at so far
    eligible: int = 0  # a rule gives them points
    credited: int = 0  # credited by this run
    already: int = 0  # credited by an earlier run
    points: int = 0  # credited by this run
    mirrored: int = 0  # lots the Redis mirror lacked and got


async def credit_period(
    pool: asyncpg.Pool,
    redis: Redis,
    period: str,
    tz: ZoneInfo,
    progress: Callable[[CreditReport], None] | None = None,
) -> CreditReport:
    """Credit every eligible member of ``period``'s tier snapshot, exactly once."""
    periods.parse_period(period)
    rules = await load_rules(pool)
    report = CreditReport(period)
    report.members = await pool.fetchval("SELECT count(*) FROM tiers WHERE period = $1", period)
    await points_mirror.ensure_points(pool, redis)
    last = ""
    while True:
        rows = await pool.fetch(
            """SELECT user_id, tier FROM tiers WHERE period = $1 AND user_id > $2
               ORDER BY user_id LIMIT $3""",
            period,
            last,
            CHUNK,
        )
        if not rows:
            break
        last = rows[-1]["user_id"]
        report.walked += len(rows)
        chunk: list[tuple[str, int, datetime | None]] = []
        for row in rows:
            rule = rule_for(rules, row["tier"])
            if rule is not None:
                chunk.append((row["user_id"], rule.points, lot_expiry(period, rule, tz)))
        if chunk:
            await _credit_chunk(pool, redis, period, chunk, report)
        if progress is not None:
            progress(report)
    log.info(
        "points credited for %s: %d member(s), %d point(s); %d credited before",
        period,
        report.credited,
        report.points,
        report.already,
    )
    return report


async def _credit_chunk(
    pool: asyncpg.Pool,
    redis: Redis,
    period: str,
    chunk: list[tuple[str, int, datetime | None]],
    report: CreditReport,
) -> None:
    users = [c[0] for c in chunk]
    row = await pool.fetchrow(
        CREDIT_SQL,
        users,
        [c[1] for c in chunk],
        [c[2] for c in chunk],
        period,
        f"monthly points for {period}",
    )
    assert row is not None
    credited = int(row["credited"])
    report.eligible += len(chunk)
    report.credited += credited
    report.already += len(chunk) - credited
    report.points += int(row["points"])
    lots = await pool.fetch(LOTS_SQL, [f"credit:{period}:{u}" for u in users])
    report.mirrored += await points_mirror.push_lots_live(
        pool,
        redis,
        [(r["user_id"], r["entry_id"], int(r["remaining"]), int(r["exp_ms"])) for r in lots],
    )


def report_json(report: CreditReport) -> dict[str, Any]:
    return {
        "period": report.period,
        "members": report.members,
        "eligible": report.eligible,
        "credited": report.credited,
        "already_credited": report.already,
        "points": report.points,
        "mirrored": report.mirrored,
    }
