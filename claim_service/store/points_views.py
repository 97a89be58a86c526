"""What members and ops see of the points ledger (read-only)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service.domain import periods
from claim_service.domain.points import spendable_points
from claim_service.store import points_mirror

RECENT_ENTRIES = 20


def _time(value: datetime | None, tz: ZoneInfo) -> str | None:
    return value.astimezone(tz).isoformat() if value is not None else None


async def member_points(
    pool: asyncpg.Pool, redis: Redis, user_id: str, tz: ZoneInfo, *, recent: int = RECENT_ENTRIES
) -> dict[str, Any]:
    """A member's balance (the sum of their entries), what they can spend now, their lots
    with what is left and when it expires, what expires next, and their latest entries."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        balance = await conn.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM points_entries WHERE user_id = $1", user_id
        )
        lots = await conn.fetch(
            """SELECT l.lot_id, l.expires_at, e.kind, e.period, e.amount AS granted,
                      e.created_at, sum(a.amount) AS remaining
               FROM points_lots l JOIN points_entries e ON e.entry_id = l.lot_id
                    JOIN points_allocations a ON a.lot_id = l.lot_id
               WHERE l.user_id = $1
               GROUP BY l.lot_id, e.entry_id
               HAVING sum(a.amount) > 0
               ORDER BY l.expires_at NULLS LAST, l.lot_id""",
            user_id,
        )
        entries = await conn.fetch(
            """SELECT entry_id, kind, amount, reason, reference, claim_id, period, created_at
               FROM points_entries WHERE user_id = $1 ORDER BY entry_id DESC LIMIT $2""",
            user_id,
            recent,
        )
    now = datetime.now(tz)
    live_lots = [lot for lot in lots if lot["expires_at"] is None or lot["expires_at"] > now]
    available: int | None
    try:
        now_ms = await points_mirror.redis_ms(redis)
        if await points_mirror.is_live(redis):
            available = spendable_points(await points_mirror.member_lots(redis, user_id), now_ms)
        else:
            available = None
    except RedisError:
        available = None
    if available is None:  # the mirror cannot say: the ledger's unexpired lots
        available = sum(int(lot["remaining"]) for lot in live_lots)
    expiring = [lot for lot in live_lots if lot["expires_at"] is not None]
    next_expiry = None
    if expiring:
        first = expiring[0]["expires_at"]
        next_expiry = {
            "expires_at": _time(first, tz),
            "points": sum(int(lot["remaining"]) for lot in expiring if lot["expires_at"] == first),
        }
    return {
        "user_id": user_id,
        "balance": int(balance),
        "available": available,
        "next_expiry": next_expiry,
        "lots": [
            {
                "lot_id": lot["lot_id"],
                "kind": lot["kind"],
                "period": lot["period"],
                "granted": lot["granted"],
                "remaining": int(lot["remaining"]),
                "granted_at": _time(lot["created_at"], tz),
                "expires_at": _time(lot["expires_at"], tz),
            }
            for lot in live_lots
        ],
        "entries": [
            {
                "entry_id": e["entry_id"],
                "kind": e["kind"],
                "amount": e["amount"],
                "reason": e["reason"],
                "claim_id": e["claim_id"],
                "period": e["period"],
                "created_at": _time(e["created_at"], tz),
            }
            for e in entries
        ],
    }


def _bounds(period: str, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The period's instants, held within the years the ledger can have entries in."""
    year, _month = periods.parse_period(period)
    if year < 1971:
        return EARLIEST, EARLIEST
    if year > 9000:
        return LATEST, LATEST
    start = periods.period_start(period, tz)
    return start, periods.period_start(periods.next_period(period), tz)


EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9001, 1, 1, tzinfo=UTC)


async def period_totals(pool: asyncpg.Pool, period: str, tz: ZoneInfo) -> dict[str, Any]:
    """Points moved during ``period`` (by when each entry was written, in the service's time
    zone) and the liability outstanding at its end (every entry until then)."""
    start, end = _bounds(period, tz)
    row = await pool.fetchrow(
        """SELECT
             coalesce(sum(amount) FILTER (WHERE kind = 'credit' AND created_at >= $1), 0)
                 AS credited,
             coalesce(-sum(amount) FILTER (WHERE kind = 'debit' AND created_at >= $1), 0)
                 AS spent,
             coalesce(sum(amount) FILTER (WHERE kind = 'refund' AND created_at >= $1), 0)
                 AS refunded,
             coalesce(-sum(amount) FILTER (WHERE kind = 'expire' AND created_at >= $1), 0)
                 AS expired,
             coalesce(sum(amount) FILTER (WHERE kind = 'adjust' AND created_at >= $1), 0)
                 AS adjusted,
             coalesce(sum(amount), 0) AS outstanding,
             count(DISTINCT user_id) FILTER (WHERE created_at >= $1) AS members
           FROM points_entries WHERE created_at < $2""",
        start,
        end,
    )
    assert row is not None
    return {"period": period, **{k: int(v) for k, v in dict(row).items()}}
