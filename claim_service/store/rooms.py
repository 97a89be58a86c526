"""Waiting rooms in Redis (``room.lua``): tickets, the queue's order, the admission frontier.

A period's room is three keys in the benefit's hash slot: its state (the admission frontier
and the count of late arrivals), its queue (ticket ids in a sorted set, a pre-queue ticket
scored by its shuffle key, a late one after all of them in arrival order) and its tickets
(member -> ticket id). Everything is decided on the Redis server's clock, in one script call.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service.domain.waiting_room import LATE
from claim_service.errors import BackendUnavailable
from claim_service.store.keyspace import PERIOD_KEY_TTL_S, BenefitKeys, Scripts, text

# The room's phases, as room.lua names them.
EARLY, PREQUEUE, OPEN, PAUSED = "early", "prequeue", "open", "paused"
SOLD_OUT, CLOSED = "sold_out", "closed"


@dataclass(frozen=True)
class RoomView:
    """A room as one call saw it (and one member's ticket in it, if asked)."""

    phase: str
    ticket_id: str | None
    rank: int | None  # 0-based place in the queue (the pre-queue's is the shuffled one)
    size: int
    admitted: int  # places admitted so far
    stock_left: int
    now_ms: int
    new: bool = False

    @property
    def position(self) -> int | None:
        """1-based place, once the order is fixed (from the opening on)."""
        if self.rank is None or self.phase in (EARLY, PREQUEUE):
            return None
        return self.rank + 1

    @property
    def is_admitted(self) -> bool:
        return self.phase == OPEN and self.rank is not None and self.rank < self.admitted


@dataclass(frozen=True)
class RoomTimes:
    """One period's room: when its pre-queue opens, when claims open and close (unix ms on
    the Redis clock; ``closes_ms`` 0 for never) and how fast it admits."""

    period: str
    prequeue_ms: int
    opens_ms: int
    closes_ms: int
    admit_per_s: int


async def visit(
    redis: Redis,
    benefit_id: str,
    times: RoomTimes,
    user_id: str = "",
    *,
    join: bool = False,
    ticket_id: str = "",
    shuffle_key: int = 0,
) -> RoomView:
    """The room now, advancing its frontier; with ``join`` the member's ticket, made from
    ``ticket_id`` and ``shuffle_key`` when they hold none (only while tickets are given)."""
    if not 0 <= shuffle_key < LATE:
        raise ValueError("a shuffle key is below 2**48")
    keys = BenefitKeys(benefit_id).room_keys(times.period)
    try:
        raw = await Scripts(redis).room(
            keys=keys,
            args=[
                "join" if join else "look",
                user_id,
                ticket_id,
                shuffle_key,
                times.opens_ms,
                times.prequeue_ms,
                times.closes_ms,
                times.admit_per_s,
                PERIOD_KEY_TTL_S,
            ],
        )
    except RedisError as exc:
        raise BackendUnavailable("Redis is unavailable") from exc
    phase, ticket, rank, size, admitted, left, now_ms, made = raw
    found = text(ticket)
    return RoomView(
        phase=text(phase),
        ticket_id=found or None,
        rank=int(rank) if int(rank) >= 0 else None,
        size=int(size),
        admitted=int(admitted),
        stock_left=int(left),
        now_ms=int(now_ms),
        new=bool(int(made)),
    )


async def tickets_of(
    redis: Redis, benefit_id: str, period: str, users: list[str]
) -> dict[str, str]:
    """The ticket ids ``users`` hold in the period's room (those without one left out)."""
    if not users:
        return {}
    key = BenefitKeys(benefit_id).room_keys(period)[4]
    values = await redis.hmget(key, users)
    return {user: text(v) for user, v in zip(users, values, strict=True) if v is not None}


async def ranks_of(
    redis: Redis, benefit_id: str, period: str, ticket_ids: list[str]
) -> dict[str, int]:
    """The 0-based places of ``ticket_ids`` in the period's queue (one pipelined read)."""
    if not ticket_ids:
        return {}
    key = BenefitKeys(benefit_id).room_keys(period)[3]
    async with redis.pipeline(transaction=False) as pipe:
        for ticket in ticket_ids:
            pipe.zrank(key, ticket)
        found = await pipe.execute()
    return {t: int(r) for t, r in zip(ticket_ids, found, strict=True) if r is not None}


async def queue_order(redis: Redis, benefit_id: str, period: str) -> tuple[list[str], list[str]]:
    """The period's queue in order: the pre-queue's ticket ids, then the late arrivals'."""
    key = BenefitKeys(benefit_id).room_keys(period)[3]
    prequeue = await redis.zrangebyscore(key, 0, f"({LATE}")
    late = await redis.zrangebyscore(key, LATE, "+inf")
    return [text(t) for t in prequeue], [text(t) for t in late]
