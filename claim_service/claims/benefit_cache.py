"""The benefits as pushed to Redis, parsed once per version and shared by every request.

``claim.lua`` rejects a batch built from a stale copy, so the cache needs no invalidation
beyond a refresh on ``stale``. Unknown ids are remembered briefly and boundedly (hostile ids
must not grow memory); an id Redis lacks while the catalogue is not live is recovered from
PostgreSQL rather than reported unknown.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from zoneinfo import ZoneInfo

from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service.domain.catalogue import Benefit
from claim_service.errors import BackendUnavailable
from claim_service.store.catalogue_store import benefit_from_config
from claim_service.store.keyspace import (
    CATALOGUE_KEY,
    CATALOGUE_LIVE_KEY,
    CATALOGUE_NEGATIVE_MAX,
    CATALOGUE_NEGATIVE_TTL_S,
    BenefitKeys,
    text,
)
from claim_service.store.recovery import Recovery, is_live


class BenefitCache:
    def __init__(self, redis: Redis, tz: ZoneInfo, recovery: Recovery | None) -> None:
        self.redis = redis
        self.tz = tz
        self.recovery = recovery
        self._cache: dict[str, Benefit] = {}
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Benefit | None]] = {}

    def cached(self, benefit_id: str) -> Benefit | None:
        return self._cache.get(benefit_id)

    def forget(self, benefit_id: str) -> None:
        self._cache.pop(benefit_id, None)

    @property
    def unknown_remembered(self) -> int:
        return len(self._unknown)

    async def get(self, benefit_id: str, *, refresh: bool = False) -> Benefit | None:
        """The benefit as pushed to Redis, cached; ``claim.lua`` rejects stale copies."""
        if not refresh:
            cached = self._cache.get(benefit_id)
            if cached is not None:
                return cached
            seen = self._unknown.get(benefit_id)
            if seen is not None and time.monotonic() - seen < CATALOGUE_NEGATIVE_TTL_S:
                return None
        # Concurrent misses share one load instead of stampeding Redis.
        loading = self._loading.get(benefit_id)
        if loading is None:
            loading = asyncio.ensure_future(self._load(benefit_id))
            self._loading[benefit_id] = loading
            loading.add_done_callback(lambda _: self._loading.pop(benefit_id, None))
        return await asyncio.shield(loading)

    async def _load(self, benefit_id: str) -> Benefit | None:
        benefit = await self._read_config(benefit_id)
        if benefit is None and not await self._catalogue_live():
            # Redis may have lost the catalogue rather than never had this benefit.
            if self.recovery is None:
                raise BackendUnavailable("the catalogue is being recovered; retry")
            if await self.recovery.ensure_benefit(benefit_id):
                benefit = await self._read_config(benefit_id)
        if benefit is None:
            self._cache.pop(benefit_id, None)
            self._unknown[benefit_id] = time.monotonic()
            self._unknown.move_to_end(benefit_id)
            while len(self._unknown) > CATALOGUE_NEGATIVE_MAX:
                self._unknown.popitem(last=False)
            return None
        self._unknown.pop(benefit_id, None)
        self._cache[benefit_id] = benefit
        return benefit

    async def _read_config(self, benefit_id: str) -> Benefit | None:
        try:
            raw, version = await self.redis.hmget(
                BenefitKeys(benefit_id).config, ["json", "version"]
            )
        except RedisError as exc:
            raise BackendUnavailable("Redis is unavailable") from exc
        if raw is None or version is None:
            return None
        return benefit_from_config(raw, int(version), self.tz)

    async def _catalogue_live(self) -> bool:
        try:
            return await is_live(self.redis, CATALOGUE_LIVE_KEY)
        except RedisError as exc:
            raise BackendUnavailable("Redis is unavailable") from exc

    async def benefit_ids(self) -> list[str]:
        try:
            members = await self.redis.smembers(CATALOGUE_KEY)
        except RedisError as exc:
            raise BackendUnavailable("Redis is unavailable") from exc
        return sorted(text(m) for m in members)
