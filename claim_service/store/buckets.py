"""The stock buckets of sharded benefits in Redis (see ``domain.shards`` and ``buckets.lua``).

A bucket's keys are a benefit's keys under the owner ``<benefit_id>#<suffix>``
(``keyspace.bucket_keys``): its own configuration (the benefit's, with the bucket's share of
the stock), period counters, idempotency keys, stream, pending claims and live marker. The
benefit's own keys keep the configuration the catalogue cache reads and the period's
top-ups; the claims are all in the buckets.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from claim_service.domain.shards import bucket_of
from claim_service.store.keyspace import (
    BUCKETS_KEY,
    CATALOGUE_KEY,
    PERIOD_KEY_TTL_S,
    BenefitKeys,
    Scripts,
    bucket_keys,
    text,
)

# A bucket keeps units it was just credited this long before it lends any again: the claims
# that borrowed them are decided again within it (without it the last units of a release
# could bounce between buckets while each one's claims come back for them).
HOLD_MS = 50
# Counters that add up over the buckets (the rest are per bucket: moves, or the benefit's).
SUMMED = ("taken", "accepted")


@dataclass(frozen=True)
class BucketState:
    """A bucket as ``buckets.lua`` left it: what it lent now, what it has left, and its
    cumulative moves to (``out``) and from (``received``) each bucket."""

    lent: int
    left: int
    held: bool  # it kept units it was just credited (see ``HOLD_MS``)
    out: tuple[int, ...]
    received: tuple[int, ...]


class BucketUnverified(Exception):
    """The bucket's counters are not verified on this server (recovery rebuilds them)."""


def member_bucket(benefit_id: str, shards: int, user_id: str) -> BenefitKeys:
    """The keys deciding ``user_id``'s claims on the benefit (its own when not sharded)."""
    if shards <= 1:
        return BenefitKeys(benefit_id)
    return bucket_keys(benefit_id, shards)[bucket_of(user_id, shards)]


async def shards_of(redis: Redis, benefit_id: str) -> int:
    """The benefit's bucket count as pushed to Redis (1: not sharded, or not pushed)."""
    raw = await redis.hget(BenefitKeys(benefit_id).config, "shards")
    return int(text(raw)) if raw is not None else 1


async def keys_of_member(redis: Redis, benefit_id: str, user_id: str) -> BenefitKeys:
    """``member_bucket`` with the bucket count read from Redis (refunds, corrections)."""
    return member_bucket(benefit_id, await shards_of(redis, benefit_id), user_id)


async def stream_owners(redis: Redis) -> list[str]:
    """Every owner of a claim stream: each benefit, and each bucket of a sharded one."""
    owners = {text(m) for m in await redis.smembers(CATALOGUE_KEY)}
    owners |= {text(m) for m in await redis.smembers(BUCKETS_KEY)}
    return sorted(owners)


async def stock_counters(redis: Redis, benefit_id: str, shards: int, period: str) -> dict[str, int]:
    """The period's stock counters of the whole benefit: its own hash, plus the buckets'
    taken and accepted counts (a sharded benefit takes its claims there)."""
    raw = await redis.hgetall(BenefitKeys(benefit_id).stock(period))
    counters: Counter[str] = Counter({text(k): int(v) for k, v in raw.items()})
    if shards > 1:
        for keys in bucket_keys(benefit_id, shards):
            for field, value in (await redis.hgetall(keys.stock(period))).items():
                name = text(field)
                if name in SUMMED or name.startswith("taken:"):
                    counters[name] += int(value)
    return dict(counters)


def _state(raw: list[Any], shards: int) -> BucketState:
    head = text(raw[0])
    if head == "unverified":
        raise BucketUnverified
    if head != "ok":
        raise BucketUnverified  # no configuration yet: recovery pushes it
    numbers = [int(x) for x in raw[1:]]
    return BucketState(
        lent=numbers[0],
        left=numbers[1],
        held=bool(numbers[2]),
        out=tuple(numbers[3 : 3 + shards]),
        received=tuple(numbers[3 + shards : 3 + 2 * shards]),
    )


def _keys(keys: BenefitKeys, period: str) -> list[str]:
    return [keys.config, keys.stock(period), keys.live]


async def lend(
    scripts: Scripts,
    keys: BenefitKeys,
    period: str,
    shards: int,
    receiver: int,
    wanted: int,
    step: int,
    client: Any = None,
) -> BucketState:
    """Lend up to ``wanted`` units (more, up to ``step``, from a well-stocked bucket) to
    bucket ``receiver``. ``client``: a held connection's ``script`` runner, for durability."""
    argv: list[str | int] = ["lend", shards, PERIOD_KEY_TTL_S, HOLD_MS, receiver, wanted, step]
    if client is not None:
        raw = await client.script(scripts.buckets, _keys(keys, period), argv)
    else:
        raw = await scripts.buckets(keys=_keys(keys, period), args=argv)
    return _state(raw, shards)


async def credit(
    scripts: Scripts, keys: BenefitKeys, period: str, shards: int, lent: dict[int, int]
) -> BucketState:
    """Count what each donor (bucket -> cumulative units it lent here) has lent this bucket;
    ``{}`` only reads the bucket."""
    argv: list[str | int] = ["credit", shards, PERIOD_KEY_TTL_S, HOLD_MS]
    for donor, total in sorted(lent.items()):
        argv += [donor, total]
    return _state(await scripts.buckets(keys=_keys(keys, period), args=argv), shards)
