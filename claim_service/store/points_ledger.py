"""The points ledger in PostgreSQL: append-only entries, each with a unique reference, and the
allocations saying which lots each entry moved points in or out of.

References make every entry idempotent: a claim's debit is the claim id, its refund
``refund:<claim_id>``, a credit ``credit:<period>:<user_id>``, an ops adjustment
``adjust:<reference>`` and an expiry ``expire:<lot_id>:<n>``. A balance is the sum of a
member's entries, a lot's remaining points the sum of its allocations; nothing is stored as
the only truth. How points move between this ledger and the Redis mirror is told in
``points_mirror``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from claim_service.domain.points import Adjustment, encode_taken, parse_taken
from claim_service.errors import BackendUnavailable, ConflictError
from claim_service.store import points_mirror
from claim_service.store.keyspace import CATALOGUE_KEY, BenefitKeys, text

log = logging.getLogger(__name__)

EXPIRE_BATCH = 1_000


@dataclass(frozen=True)
class Debit:
    """A claim's points, as ``claim.lua`` took them (from the stream entry)."""

    claim_id: str
    user_id: str
    price: int
    taken: str  # lot:amount:expiry_ms,...
    created_ms: int
    reason: str


DEBIT_SQL = """
WITH d AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::bigint[])
        AS d(claim_id, user_id, price, reason, created_ms)
), entries AS (
    INSERT INTO points_entries (user_id, amount, kind, reference, reason, claim_id, created_at)
    SELECT user_id, -price, 'debit', claim_id, reason, claim_id, to_timestamp(created_ms / 1000.0)
    FROM d
    ON CONFLICT (reference) DO NOTHING
    RETURNING entry_id, claim_id
)
INSERT INTO points_allocations (entry_id, lot_id, amount)
SELECT e.entry_id, a.lot_id, -a.amount
FROM entries e JOIN unnest($6::text[], $7::bigint[], $8::int[]) AS a(claim_id, lot_id, amount)
     USING (claim_id)
"""


async def record_debits(conn: Any, debits: list[Debit]) -> None:
    """The debit entries of claims being persisted (in the writer's transaction)."""
    if not debits:
        return
    lots: tuple[list[str], list[int], list[int]] = ([], [], [])
    for debit in debits:
        for lot_id, amount, _expires in parse_taken(debit.taken):
            lots[0].append(debit.claim_id)
            lots[1].append(lot_id)
            lots[2].append(amount)
    await conn.execute(
        DEBIT_SQL,
        [d.claim_id for d in debits],
        [d.user_id for d in debits],
        [d.price for d in debits],
        [d.reason for d in debits],
        [d.created_ms for d in debits],
        *lots,
    )


async def claim_taken(conn: Any, claim_id: str) -> str:
    """What a claim's debit took, ``lot:amount:expiry_ms,...`` ("" for a free claim)."""
    rows = await conn.fetch(
        """SELECT a.lot_id, -a.amount AS amount,
                  coalesce(floor(extract(epoch FROM l.expires_at) * 1000)::bigint, 0) AS exp_ms
           FROM points_entries e JOIN points_allocations a USING (entry_id)
                JOIN points_lots l USING (lot_id)
           WHERE e.claim_id = $1 AND e.kind = 'debit' ORDER BY a.lot_id""",
        claim_id,
    )
    return encode_taken([(r["lot_id"], r["amount"], r["exp_ms"]) for r in rows])


async def record_refund(conn: Any, claim_id: str, dropped: str) -> bool:
    """A refunded claim's points back into the lots they came from (in the refund's
    transaction); ``dropped`` (``lot:amount,...``) are those ``refund.lua`` could not give
    back because their lot had expired: they are written off at once. True when written now."""
    debit = await conn.fetchrow(
        """SELECT entry_id, user_id, amount FROM points_entries
           WHERE claim_id = $1 AND kind = 'debit'""",
        claim_id,
    )
    if debit is None:
        return False
    entry_id = await conn.fetchval(
        """INSERT INTO points_entries (user_id, amount, kind, reference, reason, claim_id)
           VALUES ($1, $2, 'refund', $3, 'claim refunded', $4)
           ON CONFLICT (reference) DO NOTHING RETURNING entry_id""",
        debit["user_id"],
        -debit["amount"],
        f"refund:{claim_id}",
        claim_id,
    )
    if entry_id is None:
        return False
    await conn.execute(
        """INSERT INTO points_allocations (entry_id, lot_id, amount)
           SELECT $1, lot_id, -amount FROM points_allocations WHERE entry_id = $2""",
        entry_id,
        debit["entry_id"],
    )
    for part in dropped.split(","):
        if part:
            lot_id, amount = (int(x) for x in part.split(":"))
            await _expire(conn, debit["user_id"], lot_id, amount, f"refund:{claim_id}")
    return True


async def _expire(conn: Any, user_id: str, lot_id: int, amount: int, tag: str) -> None:
    entry_id = await conn.fetchval(
        """INSERT INTO points_entries (user_id, amount, kind, reference, reason)
           VALUES ($1, $2, 'expire', $3, 'lot expired') RETURNING entry_id""",
        user_id,
        -amount,
        f"expire:{lot_id}:{tag}",
    )
    await conn.execute(
        "INSERT INTO points_allocations (entry_id, lot_id, amount) VALUES ($1, $2, $3)",
        entry_id,
        lot_id,
        -amount,
    )


# -- ops adjustments --------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    entry: dict[str, Any]
    replayed: bool


async def _entry(conn: Any, reference: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        """SELECT entry_id, user_id, amount, kind, reason, created_at
           FROM points_entries WHERE reference = $1""",
        reference,
    )
    return dict(row) if row is not None else None


def _replay(found: dict[str, Any], user_id: str, adjustment: Adjustment) -> Recorded:
    if found["user_id"] != user_id or found["amount"] != adjustment.amount:
        raise ConflictError(
            "reference_conflict",
            f"reference {adjustment.reference!r} was used for another adjustment",
        )
    return Recorded(found, True)


async def adjust(
    pool: asyncpg.Pool, redis: Redis, user_id: str, adjustment: Adjustment
) -> Recorded:
    """An ops adjustment, once per reference. A positive one is a new lot (ledger first, then
    the mirror); a negative one takes points first expiring first (the mirror's hold first,
    then the ledger), never more than the member can spend (``InsufficientPoints``)."""
    reference = f"adjust:{adjustment.reference}"
    found = await _entry(pool, reference)
    if found is not None:
        recorded = _replay(found, user_id, adjustment)
        if adjustment.amount > 0:
            await _push_lot(pool, redis, user_id, found["entry_id"], adjustment)
        return recorded
    if adjustment.amount > 0:
        async with pool.acquire() as conn, conn.transaction():
            entry_id = await conn.fetchval(
                """INSERT INTO points_entries (user_id, amount, kind, reference, reason)
                   VALUES ($1, $2, 'adjust', $3, $4)
                   ON CONFLICT (reference) DO NOTHING RETURNING entry_id""",
                user_id,
                adjustment.amount,
                reference,
                adjustment.reason,
            )
            if entry_id is not None:
                await conn.execute(
                    "INSERT INTO points_lots (lot_id, user_id, expires_at) VALUES ($1, $2, $3)",
                    entry_id,
                    user_id,
                    adjustment.expires_at,
                )
                await conn.execute(
                    "INSERT INTO points_allocations (entry_id, lot_id, amount) VALUES ($1,$1,$2)",
                    entry_id,
                    adjustment.amount,
                )
        found = await _entry(pool, reference)
        assert found is not None
        await _push_lot(pool, redis, user_id, found["entry_id"], adjustment)
        return _replay(found, user_id, adjustment) if entry_id is None else Recorded(found, False)
    taken = await points_mirror.take_live(
        pool, redis, user_id, adjustment.reference, -adjustment.amount
    )
    try:
        async with pool.acquire() as conn, conn.transaction():
            entry_id = await conn.fetchval(
                """INSERT INTO points_entries (user_id, amount, kind, reference, reason)
                   VALUES ($1, $2, 'adjust', $3, $4)
                   ON CONFLICT (reference) DO NOTHING RETURNING entry_id""",
                user_id,
                adjustment.amount,
                reference,
                adjustment.reason,
            )
            if entry_id is not None:
                await conn.executemany(
                    "INSERT INTO points_allocations (entry_id, lot_id, amount) VALUES ($1,$2,$3)",
                    [(entry_id, lot, -amount) for lot, amount, _exp in parse_taken(taken)],
                )
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        # Not recorded: the points go back (a repeat of the call takes them again).
        await points_mirror.release(redis, user_id, adjustment.reference)
        raise BackendUnavailable("PostgreSQL is unavailable") from exc
    found = await _entry(pool, reference)
    assert found is not None
    return _replay(found, user_id, adjustment) if entry_id is None else Recorded(found, False)


async def _push_lot(
    pool: asyncpg.Pool, redis: Redis, user_id: str, lot_id: int, adjustment: Adjustment
) -> None:
    expires_ms = 0
    if adjustment.expires_at is not None:
        expires_ms = int(adjustment.expires_at.timestamp()) * 1000
        expires_ms += adjustment.expires_at.microsecond // 1000
    lot = (user_id, lot_id, adjustment.amount, expires_ms)
    await points_mirror.push_lots_live(pool, redis, [lot])


# -- expiry -------------------------------------------------------------------------------------


async def spending_horizon_ms(redis: Redis, now_ms: int) -> int:
    """The instant before which every claim Redis accepted is recorded: the oldest entry
    still in any benefit's stream (entry ids are Redis's clock), or now."""
    horizon = now_ms
    for member in await redis.smembers(CATALOGUE_KEY):
        oldest = await redis.xrange(BenefitKeys(text(member)).stream, count=1)
        if oldest:
            horizon = min(horizon, int(text(oldest[0][0]).split("-")[0]))
    return horizon


async def _holding(pool: asyncpg.Pool, redis: Redis) -> list[str]:
    """Members with a hold whose adjustment entry is not written yet."""
    holds = (await points_mirror.unrecorded_spending(redis, streams=False)).holds
    if not holds:
        return []
    written = {
        r["reference"]
        for r in await pool.fetch(
            "SELECT reference FROM points_entries WHERE reference = ANY($1::text[])",
            [f"adjust:{ref}" for ref in holds],
        )
    }
    return sorted({user for ref, (user, _) in holds.items() if f"adjust:{ref}" not in written})


async def expire_due(pool: asyncpg.Pool, redis: Redis) -> int:
    """Write off what is left of every lot past its expiry: one ``expire`` entry per lot (and
    another if a refund later returns points to it). A lot is written off only once every
    claim accepted before its expiry is recorded (those may still take from it). Returns the
    points expired."""
    now_ms = await points_mirror.redis_ms(redis)
    cutoff = datetime.fromtimestamp(await spending_horizon_ms(redis, now_ms) / 1000, UTC)
    # A negative adjustment holds points in Redis before its entry is written: its member's
    # lots wait for the next round.
    holding = await _holding(pool, redis)
    total = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """SELECT l.lot_id, l.user_id, sum(a.amount) AS remaining
                   FROM points_lots l JOIN points_allocations a USING (lot_id)
                   WHERE l.expires_at <= $1 AND NOT l.user_id = ANY($3::text[])
                   GROUP BY l.lot_id HAVING sum(a.amount) > 0
                   ORDER BY l.lot_id LIMIT $2""",
                cutoff,
                EXPIRE_BATCH,
                holding,
            )
            for row in rows:
                # One writer per lot at a time; read again under the lock.
                await conn.execute(
                    "SELECT 1 FROM points_lots WHERE lot_id = $1 FOR UPDATE", row["lot_id"]
                )
                counts = await conn.fetchrow(
                    """SELECT (SELECT sum(amount) FROM points_allocations WHERE lot_id = $1),
                              (SELECT count(*) FROM points_entries e JOIN points_allocations a
                                   USING (entry_id)
                               WHERE a.lot_id = $1 AND e.kind = 'expire')""",
                    row["lot_id"],
                )
                assert counts is not None
                remaining, done = counts[0], counts[1]
                if remaining > 0:
                    await _expire(conn, row["user_id"], row["lot_id"], remaining, str(done + 1))
                    total += remaining
        if len(rows) < EXPIRE_BATCH:
            break
    if total:
        log.info("points expired: %d", total)
    return total
