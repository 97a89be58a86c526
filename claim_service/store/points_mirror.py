"""The points mirror: each member's lots in Redis, where ``claim.lua`` spends them.

The ledger in PostgreSQL is the truth; the mirror may be *behind* it but never ahead, so a
claim can never spend a point the ledger does not hold:

- points come in (credits, positive adjustments) in PostgreSQL first, then in the mirror
  (``push_lots``; adding a lot the mirror has is a no-op, so a repeat is harmless);
- points go out in the mirror first (a claim in ``claim.lua``, a negative adjustment's hold
  in ``points.lua``), then in PostgreSQL (the writer's debit entry, the adjustment entry);
- a refund goes back in the same ``refund.lua`` step as the unit and quota.

Expiry needs no write to the mirror: a lot past its expiry (by Redis's clock) is spent no
more. Like the counters, the mirror is trusted only while its ``live`` marker names the
answering server; ``ensure_points`` rebuilds it from the ledger and the claims still in the
streams (spent in Redis, not yet recorded) and the holds not yet recorded.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import LockError, RedisError

from claim_service.domain.points import Lot, encode_lots, parse_lots, parse_taken
from claim_service.errors import BackendUnavailable
from claim_service.store.keyspace import (
    CATALOGUE_KEY,
    POINTS_HOLDS_KEY,
    POINTS_KEY,
    POINTS_LIVE_KEY,
    RECOVERY_LOCK_S,
    RECOVERY_WAIT_S,
    BenefitKeys,
    Scripts,
    text,
)

log = logging.getLogger(__name__)

PUSH_CHUNK = 500  # lots per points.lua call
WRITE_CHUNK = 2_000
STREAM_CHUNK = 1_000
POINTS_KEYS = [POINTS_KEY, POINTS_LIVE_KEY, POINTS_HOLDS_KEY]


class MirrorNotLive(BackendUnavailable):
    """The points mirror is being rebuilt: try again once it is live."""


class InsufficientPoints(Exception):
    def __init__(self, balance: int) -> None:
        super().__init__(f"only {balance} point(s) to spend")
        self.balance = balance


async def redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def is_live(redis: Redis) -> bool:
    return bool(await Scripts(redis).live(keys=[POINTS_LIVE_KEY], args=["check"]))


async def member_lots(redis: Redis, user_id: str) -> list[Lot]:
    return parse_lots(await redis.hget(POINTS_KEY, user_id))


async def push_lots(redis: Redis, lots: list[tuple[str, int, int, int]]) -> int:
    """Add (user, lot, amount, expiry_ms) lots the mirror lacks; returns how many it lacked.
    Raises ``MirrorNotLive`` while the mirror is being rebuilt (the rebuild reads the ledger,
    which already holds them)."""
    added = 0
    for start in range(0, len(lots), PUSH_CHUNK):
        argv: list[Any] = ["add"]
        for user_id, lot_id, amount, expires_ms in lots[start : start + PUSH_CHUNK]:
            argv += [user_id, lot_id, amount, expires_ms]
        try:
            done = int(await Scripts(redis).points(keys=POINTS_KEYS, args=argv))
        except RedisError as exc:
            raise BackendUnavailable("Redis is unavailable") from exc
        if done < 0:
            raise MirrorNotLive("the points mirror is being rebuilt")
        added += done
    return added


async def take(redis: Redis, user_id: str, reference: str, amount: int) -> str:
    """Hold ``amount`` points for a negative adjustment (first expiring first); returns the
    lots taken. Repeating a reference returns what it took the first time."""
    try:
        reply = await Scripts(redis).points(
            keys=POINTS_KEYS, args=["take", user_id, reference, amount]
        )
    except RedisError as exc:
        raise BackendUnavailable("Redis is unavailable") from exc
    if reply == -1:
        raise MirrorNotLive("the points mirror is being rebuilt")
    status, value = text(reply[0]), reply[1]
    if status == "short":
        raise InsufficientPoints(int(value))
    return text(value)


async def push_lots_live(
    pool: asyncpg.Pool, redis: Redis, lots: list[tuple[str, int, int, int]]
) -> int:
    """``push_lots``, making the mirror live first when it is not (a rebuild that read the
    ledger before these lots were written would lack them: they are pushed after it)."""
    try:
        return await push_lots(redis, lots)
    except MirrorNotLive:
        await ensure_points(pool, redis)
        return await push_lots(redis, lots)


async def take_live(
    pool: asyncpg.Pool, redis: Redis, user_id: str, reference: str, amount: int
) -> str:
    """``take``, making the mirror live first when it is not."""
    try:
        return await take(redis, user_id, reference, amount)
    except MirrorNotLive:
        await ensure_points(pool, redis)
        return await take(redis, user_id, reference, amount)


async def release(redis: Redis, user_id: str, reference: str) -> bool:
    reply = await Scripts(redis).points(keys=POINTS_KEYS, args=["release", user_id, reference])
    return int(reply) == 1


# -- rebuilding and comparing --------------------------------------------------------------


@dataclass
class Unrecorded:
    """Points spent in Redis that the ledger does not hold yet."""

    claims: dict[str, tuple[str, list[tuple[int, int, int]]]] = field(default_factory=dict)
    holds: dict[str, tuple[str, list[tuple[int, int, int]]]] = field(default_factory=dict)


async def unrecorded_spending(redis: Redis, *, streams: bool = True) -> Unrecorded:
    """Every priced claim still in a stream (unless not ``streams``) and every hold, as
    (user, lots taken)."""
    found = Unrecorded()
    for member in await redis.smembers(CATALOGUE_KEY) if streams else ():
        stream = BenefitKeys(text(member)).stream
        start = "-"
        while True:
            entries = await redis.xrange(stream, min=start, max="+", count=STREAM_CHUNK) or []
            for _entry_id, fields in entries:
                paid = fields.get(b"pl") if fields else None
                if paid and fields:
                    claim_id, user_id = text(fields[b"c"]), text(fields[b"u"])
                    found.claims[claim_id] = (user_id, parse_taken(paid))
            if len(entries) < STREAM_CHUNK:
                break
            start = "(" + text(entries[-1][0])
    for reference, value in (await redis.hgetall(POINTS_HOLDS_KEY)).items():
        user_id, _, spec = text(value).partition("|")
        found.holds[text(reference)] = (user_id, parse_taken(spec))
    return found


async def expected_mirror(
    pool: asyncpg.Pool, unrecorded: Unrecorded, now_ms: int
) -> dict[str, list[Lot]]:
    """What the mirror should hold: the ledger's unexpired lots (spent-out ones kept, so a
    repeated push cannot revive them) less what ``unrecorded`` spent."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        rows = await conn.fetch(
            """SELECT l.user_id, l.lot_id,
                      coalesce(floor(extract(epoch FROM l.expires_at) * 1000)::bigint, 0) AS exp_ms,
                      sum(a.amount) AS remaining
               FROM points_lots l JOIN points_allocations a USING (lot_id)
               WHERE l.expires_at IS NULL OR l.expires_at > to_timestamp($1 / 1000.0)
               GROUP BY l.user_id, l.lot_id""",
            now_ms,
        )
        recorded = {
            r["reference"]
            for r in await conn.fetch(
                "SELECT reference FROM points_entries WHERE reference = ANY($1::text[])",
                list(unrecorded.claims) + [f"adjust:{ref}" for ref in unrecorded.holds],
            )
        }
    lots: dict[str, dict[int, Lot]] = defaultdict(dict)
    for row in rows:
        lots[row["user_id"]][row["lot_id"]] = Lot(
            row["lot_id"], int(row["remaining"]), int(row["exp_ms"])
        )
    spent = [(u, t) for ref, (u, t) in unrecorded.claims.items() if ref not in recorded]
    spent += [(u, t) for ref, (u, t) in unrecorded.holds.items() if f"adjust:{ref}" not in recorded]
    for user_id, taken in spent:
        for lot_id, amount, _expires in taken:
            lot = lots.get(user_id, {}).get(lot_id)
            if lot is not None:
                lot.remaining -= amount
    return {
        user_id: [lot for lot in by_id.values() if lot.spendable(now_ms)]
        for user_id, by_id in lots.items()
    }


async def ensure_points(pool: asyncpg.Pool, redis: Redis, *, force: bool = False) -> bool:
    """Make the mirror live, rebuilding it when Redis cannot vouch for it (or ``force``).
    True when it was rebuilt."""
    scripts = Scripts(redis)
    try:
        if not force and await is_live(redis):
            return False
        # Claims waiting on the rebuild get 503 after RECOVERY_WAIT_S, as for a benefit's.
        lock = redis.lock(
            POINTS_LIVE_KEY + ":loading", timeout=RECOVERY_LOCK_S, blocking_timeout=RECOVERY_WAIT_S
        )
        async with lock:
            if force:
                await scripts.live(keys=[POINTS_LIVE_KEY], args=["clear"])
            elif await is_live(redis):
                return False
            # The streams first, then PostgreSQL: a claim recorded in between is seen in both
            # and subtracted once, never missed.
            unrecorded = await unrecorded_spending(redis)
            now_ms = await redis_ms(redis)
            expected = await expected_mirror(pool, unrecorded, now_ms)
            pairs = [(user_id, encode_lots(lots)) for user_id, lots in expected.items()]
            async with redis.pipeline(transaction=True) as pipe:
                pipe.delete(POINTS_KEY)
                for start in range(0, len(pairs), WRITE_CHUNK):
                    chunk = pairs[start : start + WRITE_CHUNK]
                    pipe.hset(POINTS_KEY, mapping=dict(chunk))
                await pipe.execute()
            await scripts.live(keys=[POINTS_LIVE_KEY], args=["mark"])
    except LockError as exc:
        raise MirrorNotLive("the points mirror is being rebuilt") from exc
    except RedisError as exc:
        raise BackendUnavailable("Redis is unavailable") from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise BackendUnavailable("PostgreSQL is unavailable") from exc
    log.info(
        "points mirror rebuilt: %d member(s), %d claim(s) not yet recorded",
        len(expected),
        len(unrecorded.claims),
    )
    return True


@dataclass(frozen=True)
class PointsDrift:
    user_id: str
    redis: str  # the member's lots in Redis (spendable ones)
    expected: str  # what the ledger and the unrecorded spending say

    def describe(self) -> str:
        return f"points of {self.user_id}: Redis has [{self.redis}], expected [{self.expected}]"


async def points_drift(pool: asyncpg.Pool, redis: Redis) -> list[PointsDrift]:
    """Members whose mirror differs from the ledger (read before and after Redis, and only
    drift seen against both readings counts: a claim or credit in between is not drift)."""
    if not await is_live(redis):
        return []
    before_now = await redis_ms(redis)
    before = await expected_mirror(pool, await unrecorded_spending(redis), before_now)
    seen_now = await redis_ms(redis)
    seen: dict[str, list[Lot]] = {}
    async for user_id, raw in redis.hscan_iter(POINTS_KEY, count=1_000):
        lots = [lot for lot in parse_lots(raw) if lot.spendable(seen_now)]
        seen[text(user_id)] = lots
    after_now = await redis_ms(redis)
    after = await expected_mirror(pool, await unrecorded_spending(redis), after_now)
    drift = []
    for user_id in sorted(set(seen) | set(before) | set(after)):
        has = _canonical(seen.get(user_id, []), seen_now)
        if has in (
            _canonical(before.get(user_id, []), seen_now),
            _canonical(after.get(user_id, []), seen_now),
        ):
            continue
        drift.append(PointsDrift(user_id, has, _canonical(after.get(user_id, []), seen_now)))
    return drift


def _canonical(lots: list[Lot], now_ms: int) -> str:
    return encode_lots([lot for lot in lots if lot.spendable(now_ms) and lot.remaining])
