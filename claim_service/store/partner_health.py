"""Partners' circuit breakers, as the fulfil workers report them, for whoever watches.

A breaker lives in the fulfil worker that calls the partner; the dashboard runs in ``serve``.
So each worker writes its breaker's state to one Redis hash (field ``<partner>|<worker>``,
value ``<state>|<unix ms>``) when it changes and at least every ``REPORT_EVERY_S`` while the
worker calls that partner; a reader takes, per partner, the worst state among the reports
younger than ``FRESH_MS`` (a worker that stopped reporting is no longer counted).
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from claim_service.store.keyspace import BREAKERS_KEY, text

REPORT_EVERY_S = 5.0
FRESH_MS = 30_000
KEY_TTL_S = 24 * 3600
SEVERITY = {"closed": 0, "half_open": 1, "open": 2}


async def report_breaker(redis: Redis, partner_id: str, worker: str, state: str) -> None:
    now_ms = int(time.time() * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hset(BREAKERS_KEY, f"{partner_id}|{worker}", f"{state}|{now_ms}")
        pipe.expire(BREAKERS_KEY, KEY_TTL_S)
        await pipe.execute()


async def read_breakers(redis: Redis) -> dict[bytes | str, bytes | str]:
    return dict(await redis.hgetall(BREAKERS_KEY))


def breaker_states(raw: dict[bytes | str, bytes | str], now_ms: int) -> dict[str, str]:
    """Each partner's worst fresh state (``open`` > ``half_open`` > ``closed``)."""
    found: dict[str, str] = {}
    for field, value in raw.items():
        partner_id, _, _worker = text(field).partition("|")
        state, _, at = text(value).partition("|")
        if state not in SEVERITY or not at.isdigit() or now_ms - int(at) > FRESH_MS:
            continue
        if SEVERITY[state] >= SEVERITY.get(found.get(partner_id, "closed"), 0):
            found[partner_id] = state
    return found
