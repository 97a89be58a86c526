"""Announcements that what a benefit can accept may have grown: units refunded, stock topped
up, codes loaded, configuration pushed, counters rebuilt, tiers loaded.

Each ``serve`` worker's claim gate listens (pub/sub) and stops answering that benefit
locally; gates in the announcing process hear it before ``announce`` returns. A lost
announcement is not a lost promise: the gates also re-check on their own, within
``claims.gate.RECHECK_S``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service.store.keyspace import STOCK_CHANNEL

log = logging.getLogger(__name__)

EVERY_BENEFIT = "*"
_local: list[weakref.WeakMethod[Callable[[str], None]]] = []


def listen_here(callback: Callable[[str], None]) -> None:
    """Call ``callback(benefit_id)`` (a bound method, held weakly) on each announcement made
    by this process, before the announcement leaves it."""
    _local.append(weakref.WeakMethod(callback))


async def announce(redis: Redis, benefit_id: str = EVERY_BENEFIT) -> None:
    for ref in list(_local):
        callback = ref()
        if callback is None:
            _local.remove(ref)
        else:
            callback(benefit_id)
    try:
        await redis.publish(STOCK_CHANNEL, benefit_id)
    except RedisError as exc:
        log.warning("could not announce a stock change of %s: %s", benefit_id, exc)
