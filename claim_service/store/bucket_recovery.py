"""Recovery of a sharded benefit's stock buckets (see ``recovery`` and ``buckets``).

Each bucket has its own live marker: a bucket whose server restarted, failed over or lost its
data is rebuilt on its own, while the other buckets keep deciding. A bucket's claims are the
benefit's claims of the members routed to it (``shards.bucket_of``), from its stream and
PostgreSQL; its share of the top-ups is ``shards.share``. Its moves are rebuilt from both
sides: what it received from bucket j is at least what j says it lent it (a loan not yet
credited is credited now), and what it lent j at least what j says it received. A loan that
neither a durable copy of this bucket nor the receiver kept is lost with the data that held
it: with ``CLAIM_DURABILITY`` on, borrowers count a loan only once it is durable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis

from claim_service.domain.catalogue import Benefit
from claim_service.domain.shards import bucket_of, share
from claim_service.store.keyspace import BenefitKeys, Scripts, bucket_keys, text
from claim_service.store.snapshot import Snapshot

Reader = Callable[[BenefitKeys], Awaitable[Snapshot]]
Writer = Callable[[BenefitKeys, Snapshot, dict[str, int]], Awaitable[None]]


async def all_live(redis: Redis, benefit_id: str, shards: int) -> bool:
    """Whether the benefit's marker and every bucket's name this server."""
    markers = [BenefitKeys(benefit_id).live]
    if shards > 1:
        markers += [keys.live for keys in bucket_keys(benefit_id, shards)]
    scripts = Scripts(redis)
    for marker in markers:
        if not await scripts.live(keys=[marker], args=["check"]):
            return False
    return True


def bucket_snapshot(snapshot: Snapshot, benefit: Benefit, number: int) -> Snapshot:
    """The part of the benefit's snapshot that bucket ``number`` holds."""
    shards = benefit.shards
    mine = [c for c in snapshot.claims if bucket_of(c.user_id, shards) == number]
    return replace(snapshot, claims=mine, added=share(snapshot.added, shards, number))


async def moves_of(redis: Redis, benefit: Benefit, period: str, number: int) -> dict[str, int]:
    """Bucket ``number``'s move counters (``in:<j>``, ``out:<j>``, ``moved``), each the
    larger of what it holds and what bucket j holds about it."""
    buckets = bucket_keys(benefit.benefit_id, benefit.shards)
    own = {text(k): int(v) for k, v in (await redis.hgetall(buckets[number].stock(period))).items()}
    moves: dict[str, int] = {}
    for j, keys in enumerate(buckets):
        if j == number:
            continue
        lent_here, received_from_here = await redis.hmget(
            keys.stock(period), [f"out:{number}", f"in:{number}"]
        )
        moves[f"in:{j}"] = max(own.get(f"in:{j}", 0), int(lent_here or 0))
        moves[f"out:{j}"] = max(own.get(f"out:{j}", 0), int(received_from_here or 0))
    received = sum(v for k, v in moves.items() if k.startswith("in:"))
    lent = sum(v for k, v in moves.items() if k.startswith("out:"))
    return {**moves, "moved": received - lent}


async def rebuild_buckets(
    redis: Redis,
    benefit: Benefit,
    period: str,
    read: Reader,
    write: Writer,
    *,
    force: bool,
) -> int:
    """Rebuild the buckets not live on their server (all with ``force``), one at a time:
    each refuses claims and loans until it is marked live again. Returns how many."""
    scripts = Scripts(redis)
    rebuilt = 0
    for number, keys in enumerate(bucket_keys(benefit.benefit_id, benefit.shards)):
        if not force and await scripts.live(keys=[keys.live], args=["check"]):
            continue
        await scripts.live(keys=[keys.live], args=["clear"])
        snapshot = bucket_snapshot(await read(keys), benefit, number)
        await write(keys, snapshot, await moves_of(redis, benefit, period, number))
        await scripts.live(keys=[keys.live], args=["mark"])
        rebuilt += 1
    return rebuilt


async def accepted_in_buckets(redis: Redis, benefit: Benefit, period: str) -> int | None:
    """The claims the buckets accepted in the period; None while one is not live."""
    total = 0
    scripts = Scripts(redis)
    for keys in bucket_keys(benefit.benefit_id, benefit.shards):
        if not await scripts.live(keys=[keys.live], args=["check"]):
            return None
        raw: Any = await redis.hget(keys.stock(period), "accepted")
        total += int(raw or 0)
    return total
