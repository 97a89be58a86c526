"""Reading claims back: PostgreSQL first, then the Redis hand-off not yet persisted."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
from redis.asyncio import Redis

from claim_service.store.buckets import stream_owners
from claim_service.store.keyspace import BenefitKeys, text

CLAIM_ID_RE = re.compile(r"^[0-9a-f]{32}$")

COLUMNS = (
    "claim_id, request_id, user_id, benefit_id, option_id, period, tier, status, created_at, "
    "updated_at"
)


def format_time(value: datetime, tz: ZoneInfo) -> str:
    """The one way claim times are written: ISO 8601 in the service time zone
    (``CLAIM_TIMEZONE``), to the millisecond, whether the claim is still in Redis or already
    in PostgreSQL."""
    return value.astimezone(tz).isoformat(timespec="milliseconds")


def claim_json(row: dict[str, Any] | asyncpg.Record, tz: ZoneInfo) -> dict[str, Any]:
    created = row["created_at"]
    updated = row.get("updated_at")
    return {
        "claim_id": row["claim_id"],
        "request_id": row["request_id"],
        "benefit_id": row["benefit_id"],
        "option_id": row["option_id"],
        "period": row["period"],
        "tier": row["tier"],
        "status": row["status"],
        "created_at": format_time(created, tz) if isinstance(created, datetime) else created,
        "updated_at": format_time(updated, tz) if updated else None,
    }


async def find_claim(
    pool: asyncpg.Pool, redis: Redis, claim_id: str, tz: ZoneInfo
) -> dict[str, Any] | None:
    """The claim with its owner's ``user_id``, or ``None``."""
    if not CLAIM_ID_RE.match(claim_id):
        return None
    row = await pool.fetchrow(f"SELECT {COLUMNS} FROM claims WHERE claim_id = $1", claim_id)
    if row is not None:
        return {**claim_json(row, tz), "user_id": row["user_id"]}
    pending = await _find_pending(redis, claim_id, tz)
    if pending is not None:
        return pending
    # The writer may have persisted it between the two look-ups.
    row = await pool.fetchrow(f"SELECT {COLUMNS} FROM claims WHERE claim_id = $1", claim_id)
    return None if row is None else {**claim_json(row, tz), "user_id": row["user_id"]}


async def _find_pending(redis: Redis, claim_id: str, tz: ZoneInfo) -> dict[str, Any] | None:
    """Accepted in Redis a moment ago and not yet written: read it from the stream."""
    for owner in await stream_owners(redis):
        keys = BenefitKeys(owner)
        entry_id = await redis.hget(keys.pending, claim_id)
        if entry_id is None:
            continue
        entries = await redis.xrange(keys.stream, min=entry_id, max=entry_id)
        if not entries:
            continue  # written meanwhile; PostgreSQL has it now
        fields = {text(k): text(v) for k, v in (entries[0][1] or {}).items()}
        return {
            "claim_id": fields["c"],
            "request_id": fields["r"],
            "benefit_id": fields["b"],
            "option_id": fields["o"],
            "period": fields["p"],
            "tier": int(fields["t"]),
            "status": "accepted",
            "created_at": format_time(datetime.fromtimestamp(int(fields["ts"]) / 1000, tz), tz),
            "user_id": fields["u"],
        }
    return None


async def member_claims(
    pool: asyncpg.Pool, user_id: str, period: str, tz: ZoneInfo
) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {COLUMNS} FROM claims WHERE user_id = $1 AND period = $2 ORDER BY created_at",
        user_id,
        period,
    )
    return [claim_json(r, tz) for r in rows]
