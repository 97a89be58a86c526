"""Bank events in PostgreSQL (the record) and their mirror in Redis (for eligibility).

``record`` stores an event once per ``event_id``: a replay of the same event changes nothing
and says so; the same id with other content is a conflict. The mirror keeps, per event type,
each member's latest occurrence (unix ms) in one hash (``keyspace.events_key``), raised and
never lowered, so events arriving out of order or twice leave it right. A server that lost it
gets it back from PostgreSQL (``push_events_from_db``, under the type's live marker, as tier
snapshots are).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from claim_service.domain.bank_events import BankEvent
from claim_service.errors import ConflictError
from claim_service.store.keyspace import Scripts, events_key

CHUNK = 5_000


async def record(pool: asyncpg.Pool, event: BankEvent) -> bool:
    """Store ``event``; True when new, False when this very event was stored before.
    Raises ``ConflictError`` when its id was used by an event with other content."""
    attrs = orjson.dumps(event.attrs).decode()
    async with pool.acquire() as conn:
        inserted = await conn.fetchval(
            """INSERT INTO bank_events (event_id, type, user_id, occurred_at, attrs)
               VALUES ($1, $2, $3, $4, $5::jsonb)
               ON CONFLICT (event_id) DO NOTHING RETURNING true""",
            event.event_id,
            event.type,
            event.user_id,
            event.occurred_at,
            attrs,
        )
        if inserted:
            return True
        row = await conn.fetchrow(
            "SELECT type, user_id, occurred_at, attrs FROM bank_events WHERE event_id = $1",
            event.event_id,
        )
    same = (
        row is not None
        and row["type"] == event.type
        and row["user_id"] == event.user_id
        and row["occurred_at"] == event.occurred_at
        and orjson.loads(row["attrs"]) == event.attrs
    )
    if not same:
        raise ConflictError(
            "event_id_reused", f"event {event.event_id!r} was received with other content"
        )
    return False


async def mirror(redis: Redis, events: list[tuple[str, str, int]]) -> None:
    """Raise each (type, member, occurred ms) in the mirror (never lowering it). The claim
    gates need no word: they do not answer for benefits that need an event."""
    by_type: dict[str, list[Any]] = {}
    for event_type, user_id, occurred_ms in events:
        by_type.setdefault(event_type, []).extend([user_id, occurred_ms])
    scripts = Scripts(redis)
    for event_type, pairs in by_type.items():
        for start in range(0, len(pairs), 2 * CHUNK):
            await scripts.restore(
                keys=[events_key(event_type)],
                args=["max", 0, "0", "", *pairs[start : start + 2 * CHUNK]],
            )


async def push_events_from_db(pool: asyncpg.Pool, redis: Redis, event_type: str) -> int:
    """Mirror every member's latest event of ``event_type`` from PostgreSQL."""
    total = 0
    async with pool.acquire() as conn, conn.transaction():
        chunk: list[tuple[str, str, int]] = []
        async for row in conn.cursor(
            """SELECT user_id, floor(extract(epoch FROM max(occurred_at)) * 1000)::bigint AS ms
               FROM bank_events WHERE type = $1 GROUP BY user_id""",
            event_type,
            prefetch=CHUNK,
        ):
            chunk.append((event_type, row["user_id"], int(row["ms"])))
            if len(chunk) >= CHUNK:
                await mirror(redis, chunk)
                total, chunk = total + len(chunk), []
        if chunk:
            await mirror(redis, chunk)
            total += len(chunk)
    return total


async def latest(pool: asyncpg.Pool, user_id: str, event_type: str) -> BankEvent | None:
    """The member's latest event of ``event_type`` (None: none)."""
    row = await pool.fetchrow(
        """SELECT event_id, type, user_id, occurred_at, attrs FROM bank_events
           WHERE user_id = $1 AND type = $2 ORDER BY occurred_at DESC LIMIT 1""",
        user_id,
        event_type,
    )
    if row is None:
        return None
    return BankEvent(
        row["event_id"], row["type"], row["user_id"], row["occurred_at"], orjson.loads(row["attrs"])
    )


async def occurred(redis: Redis, event_type: str, users: list[str]) -> list[int | None]:
    """When each member's latest event of ``event_type`` occurred (unix ms), from the
    mirror; None for a member with none."""
    found = await redis.hmget(events_key(event_type), users)
    return [None if value is None else int(value) for value in found]
