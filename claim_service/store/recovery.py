"""Recovery: a benefit takes claims only while Redis holds its complete counters.

Redis decides every claim, so its counters (stock taken, each member's quota use,
idempotency keys, free codes) must never be behind what was accepted. They can be after a
restart from an old file, a failover to a replica that had not caught up, or a restored copy.
``claim.lua`` therefore answers ``unverified`` unless the benefit's ``live`` marker names the
very server process answering (its run id); ``refund.lua`` and code loading wait the same way.

Recovering a benefit, under a per-benefit lock: push its configuration and the period's
tiers, read the stream (accepted claims the writer has not persisted yet), then in one
PostgreSQL snapshot the persisted claims, top-ups and free codes; the union of claims by
``claim_id`` gives the exact counters (``Snapshot.expected_counters``, which ``reconcile``
also compares a live Redis with), which replace whatever Redis held; then the marker is set.
No claim can interleave (they are refused meanwhile), so none is swallowed.

``watch`` runs in every API worker and fulfil worker: it recovers every benefit when Redis
is new to us, and every few seconds compares each benefit's ``accepted`` counter with the
claims PostgreSQL holds, so a Redis that is *behind* (not only empty) is repaired by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import LockError, RedisError

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.bank_events import EVENT_TYPES
from claim_service.domain.catalogue import Benefit
from claim_service.errors import BackendUnavailable, NotFoundError
from claim_service.store.bank_events import push_events_from_db
from claim_service.store.bucket_recovery import accepted_in_buckets, all_live, rebuild_buckets
from claim_service.store.buckets import shards_of
from claim_service.store.campaign_rewards import push_rewards_from_db
from claim_service.store.catalogue_store import load_benefit, load_benefits, push_benefit
from claim_service.store.keyspace import (
    CATALOGUE_LIVE_KEY,
    LAG_CHECK_KEY,
    PERIOD_KEY_TTL_S,
    RECOVERY_LOCK_S,
    RECOVERY_WAIT_S,
    BenefitKeys,
    Scripts,
    code_bucket,
    events_live_key,
    rewards_live_key,
    tiers_live_key,
)
from claim_service.store.points_mirror import ensure_points
from claim_service.store.snapshot import Snapshot, read_snapshot, stream_claims
from claim_service.store.stock_events import announce
from claim_service.store.tiers import push_tiers_from_db

log = logging.getLogger(__name__)

RESTORE_CHUNK = 2_000
WATCH_EVERY_S = 1.0
LAG_CHECK_EVERY_S = 5.0


@dataclass
class RecoveryReport:
    benefits: int = 0
    claims: int = 0
    tiers: int = 0


def benefit_lock(redis: Redis, benefit_id: str) -> Any:
    """The lock recovery holds while it rebuilds a benefit; code loading takes it too."""
    return redis.lock(
        BenefitKeys(benefit_id).recovery_lock,
        timeout=RECOVERY_LOCK_S,
        blocking_timeout=RECOVERY_WAIT_S,
    )


async def is_live(redis: Redis, marker: str) -> bool:
    return bool(await Scripts(redis).live(keys=[marker], args=["check"]))


async def redis_now_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def claim_period(benefit: Benefit, calendar: periods.Calendar, now_ms: int) -> str:
    """The period a claim decided at ``now_ms`` (Redis's clock) counts against."""
    if benefit.release.fixed_period:
        return benefit.release.period_at(calendar.now(), calendar.tz)
    return calendar.period_at(now_ms)


class Recovery:
    """Brings benefits (back) to live in one Redis, from PostgreSQL and the stream."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        settings: Settings,
        calendar: periods.Calendar | None = None,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.settings = settings
        self.calendar = calendar or periods.Calendar(settings.tz)
        self.scripts = Scripts(redis)
        self._running: dict[str, asyncio.Future[bool]] = {}

    # -- one benefit -----------------------------------------------------------------------

    async def ensure_benefit(self, benefit_id: str, *, force: bool = False) -> bool:
        """Make ``benefit_id`` live (rebuild it when ``force``). False when PostgreSQL does
        not know it. Raises ``BackendUnavailable`` when it cannot be done now. Concurrent
        calls in this process share one attempt (after a failover every claim waiting on the
        benefit asks at once: one lock poller, not hundreds)."""
        if force:
            return await self._ensure(benefit_id, force=True)
        running = self._running.get(benefit_id)
        if running is None:
            running = asyncio.ensure_future(self._ensure(benefit_id, force=False))
            self._running[benefit_id] = running

            def done(task: asyncio.Future[bool]) -> None:
                if self._running.get(benefit_id) is task:
                    del self._running[benefit_id]
                if not task.cancelled():
                    task.exception()  # retrieved: every waiter gets it through the shield

            running.add_done_callback(done)
        return await asyncio.shield(running)

    async def _ensure(self, benefit_id: str, *, force: bool) -> bool:
        keys = BenefitKeys(benefit_id)
        try:
            shards = await shards_of(self.redis, benefit_id)
            if not force and await all_live(self.redis, benefit_id, shards):
                return True
            async with benefit_lock(self.redis, benefit_id):
                if force:
                    await self.scripts.live(keys=[keys.live], args=["clear"])
                elif await all_live(self.redis, benefit_id, shards):
                    return True  # another process finished it while we waited
                return await self._rebuild(benefit_id, force=force)
        except LockError as exc:
            raise BackendUnavailable(f"benefit {benefit_id!r} is being recovered") from exc
        except RedisError as exc:
            raise BackendUnavailable("Redis is unavailable") from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise BackendUnavailable("PostgreSQL is unavailable") from exc

    async def _rebuild(self, benefit_id: str, *, force: bool = False) -> bool:
        try:
            benefit = await load_benefit(self.pool, self.settings.tz, benefit_id)
        except NotFoundError:
            return False
        keys = BenefitKeys(benefit_id)
        await push_benefit(self.redis, benefit)
        now_ms = await redis_now_ms(self.redis)
        period = claim_period(benefit, self.calendar, now_ms)
        previous = None if benefit.release.fixed_period else periods.previous_period(period)
        await self.ensure_tiers(self.calendar.period_at(now_ms))
        if benefit.eligibility is not None and benefit.eligibility.held:
            await self.ensure_rewards(benefit_id)
        elif benefit.eligibility is not None:
            await self.ensure_events(benefit.eligibility.event)
        # The stream first, then PostgreSQL: an entry persisted in between is seen twice
        # (and counted once), never missed.
        in_stream = await stream_claims(self.redis, keys.stream)
        snapshot = await read_snapshot(self.pool, benefit_id, period, previous, in_stream)
        if benefit.shards > 1:  # the claims are counted in the buckets
            await self._write(keys, replace(snapshot, claims=[]))
            await self.scripts.live(keys=[keys.live], args=["mark"])

            async def read(bucket: BenefitKeys) -> Snapshot:
                claims = await stream_claims(self.redis, bucket.stream)
                return await read_snapshot(self.pool, benefit_id, period, previous, claims)

            await rebuild_buckets(self.redis, benefit, period, read, self._write, force=force)
        else:
            await self._write(keys, snapshot)
            await self.scripts.live(keys=[keys.live], args=["mark"])
        await announce(self.redis, benefit_id)
        log.info(
            "benefit %s recovered for %s: %d claim(s), %d not yet persisted",
            benefit_id,
            period,
            snapshot.claims_in_period,
            snapshot.unpersisted,
        )
        return True

    async def _write(
        self, keys: BenefitKeys, snapshot: Snapshot, moves: dict[str, int] | None = None
    ) -> None:
        """Replace the counters under ``keys`` (a benefit's or a bucket's, with its
        ``moves``) with what ``snapshot`` says they must be."""
        period, expected = snapshot.period, snapshot.expected_counters()
        stock_pairs: list[tuple[str, Any]] = [*expected.stock.items(), *(moves or {}).items()]
        await self._restore(keys.stock(period), "replace", stock_pairs, keep_max="added")
        await self._restore(keys.used(period), "replace", list(expected.used.items()))
        await self._restore(keys.idempotency(period), "replace", list(expected.idem))
        await self._restore(keys.pity(period), "replace", list(expected.pity.items()))
        refunded = expected.refunded
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.refunded(period))
            for start in range(0, len(refunded), RESTORE_CHUNK):
                pipe.sadd(keys.refunded(period), *refunded[start : start + RESTORE_CHUNK])
            pipe.expire(keys.refunded(period), PERIOD_KEY_TTL_S)
            await pipe.execute()
        if snapshot.previous is not None:  # a retry across the period boundary finds its claim
            previous_pairs = list(expected.previous_idem)
            await self._restore(keys.idempotency(snapshot.previous), "setnx", previous_pairs)
        argv: list[Any] = ["replace"]
        for (option_id, expiry), count in expected.codes.items():
            argv += [code_bucket(option_id, expiry), count, expiry]
        await self.scripts.codes(keys=[keys.codes, keys.code_expiries, keys.live], args=argv)

    async def _restore(
        self, key: str, mode: str, pairs: list[tuple[str, Any]], keep_max: str = ""
    ) -> None:
        first = True
        for start in range(0, max(len(pairs), 1), RESTORE_CHUNK):
            argv: list[Any] = [mode, PERIOD_KEY_TTL_S, "1" if first else "0", keep_max]
            for field, value in pairs[start : start + RESTORE_CHUNK]:
                argv += [field, value]
            await self.scripts.restore(keys=[key], args=argv)
            first = False

    # -- tiers, points and the whole catalogue ---------------------------------------------

    async def ensure_points(self, *, force: bool = False) -> bool:
        """Make the points mirror live (rebuilt from the ledger unless this server has it)."""
        return await ensure_points(self.pool, self.redis, force=force)

    async def ensure_tiers(self, period: str, *, force: bool = False) -> int:
        """Mirror ``period``'s tier snapshot from PostgreSQL unless this server has it."""
        loaded = await self._mirror(
            tiers_live_key(period), push_tiers_from_db(self.pool, self.redis, period), force
        )
        if loaded:
            log.info("tiers of %s mirrored from PostgreSQL: %d member(s)", period, loaded)
        return loaded

    async def ensure_events(self, event_type: str, *, force: bool = False) -> int:
        """Mirror the members' latest ``event_type`` events unless this server has them."""
        loaded = await self._mirror(
            events_live_key(event_type),
            push_events_from_db(self.pool, self.redis, event_type),
            force,
        )
        if loaded:
            log.info("%s events mirrored from PostgreSQL: %d member(s)", event_type, loaded)
        return loaded

    async def ensure_rewards(self, benefit_id: str, *, force: bool = False) -> int:
        """Mirror the campaign rewards of ``benefit_id`` unless this server has them."""
        loaded = await self._mirror(
            rewards_live_key(benefit_id),
            push_rewards_from_db(self.pool, self.redis, benefit_id),
            force,
        )
        if loaded:
            log.info("rewards of %s mirrored from PostgreSQL: %d member(s)", benefit_id, loaded)
        return loaded

    async def _mirror(self, marker: str, load: Coroutine[Any, Any, int], force: bool) -> int:
        """Run ``load`` and mark ``marker`` unless this server has it (under a lock)."""
        try:
            if not force and await is_live(self.redis, marker):
                return 0
            lock = self.redis.lock(
                marker + ":loading", timeout=RECOVERY_LOCK_S, blocking_timeout=60
            )
            async with lock:
                if not force and await is_live(self.redis, marker):
                    return 0
                loaded = await load
                await self.scripts.live(keys=[marker], args=["mark"])
                return loaded
        except LockError as exc:
            raise BackendUnavailable(f"{marker} is being loaded") from exc
        finally:
            load.close()  # not awaited when the mirror was there: no warning

    async def ensure_all(
        self, *, force: bool = False, tier_periods: Iterable[str] = ()
    ) -> RecoveryReport:
        """Every benefit PostgreSQL knows, live in Redis; then the catalogue is marked live
        (a benefit id Redis lacks is then unknown, not lost)."""
        report = RecoveryReport()
        for period in tier_periods:
            report.tiers += await self.ensure_tiers(period, force=force)
        for benefit in await load_benefits(self.pool, self.settings.tz):
            await self.ensure_benefit(benefit.benefit_id, force=force)
            report.benefits += 1
        await self.ensure_points(force=force)
        await self.scripts.live(keys=[CATALOGUE_LIVE_KEY], args=["mark"])
        return report

    async def behind(self) -> list[str]:
        """Benefits whose Redis has accepted fewer claims this period than PostgreSQL holds:
        Redis went back in time (restored from a copy, say) without changing process."""
        stale = []
        now_ms = await redis_now_ms(self.redis)
        for benefit in await load_benefits(self.pool, self.settings.tz):
            keys = BenefitKeys(benefit.benefit_id)
            if not await is_live(self.redis, keys.live):
                continue  # recovered on its first claim anyway
            period = claim_period(benefit, self.calendar, now_ms)
            if benefit.shards > 1 and not await all_live(
                self.redis, benefit.benefit_id, benefit.shards
            ):
                continue
            # PostgreSQL first: a row persisted after Redis was read would look like a claim
            # Redis lacks (at release time, every check would rebuild the benefit). A claim
            # reaches PostgreSQL only after Redis accepted it, so read in this order a Redis
            # that did not go back in time always has at least as many.
            persisted = await self.pool.fetchval(
                """SELECT count(*) FROM claims
                   WHERE benefit_id = $1 AND period = $2 AND bundle_item = 0""",
                benefit.benefit_id,
                period,
            )
            if benefit.shards > 1:
                accepted = await accepted_in_buckets(self.redis, benefit, period) or 0
            else:
                accepted = int(await self.redis.hget(keys.stock(period), "accepted") or 0)
            if persisted > accepted:
                log.warning(
                    "Redis is behind PostgreSQL for %s/%s (%d accepted in Redis, %d "
                    "persisted); rebuilding its counters",
                    benefit.benefit_id,
                    period,
                    accepted,
                    persisted,
                )
                stale.append(benefit.benefit_id)
        return stale

    async def watch(
        self, stop: asyncio.Event, *, lag_check_every_s: float = LAG_CHECK_EVERY_S
    ) -> None:
        """Keep Redis trustworthy while running: recover what a new server lacks, and
        repair a Redis found behind PostgreSQL. Returns when ``stop`` is set."""
        checked_lag_at = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                if not await is_live(self.redis, CATALOGUE_LIVE_KEY):
                    log.info("Redis is new to this catalogue; recovering every benefit")
                    report = await self.ensure_all()
                    if report.benefits:
                        log.warning("Redis was new: recovered %d benefit(s)", report.benefits)
                await self.ensure_tiers(self.calendar.period_at(await redis_now_ms(self.redis)))
                await self.ensure_points()
                for event_type in EVENT_TYPES:
                    await self.ensure_events(event_type)
                if loop.time() - checked_lag_at >= lag_check_every_s:
                    checked_lag_at = loop.time()
                    # One process per interval compares with PostgreSQL, however many run.
                    lease_ms = max(int(lag_check_every_s * 1000) - 50, 1)
                    turn = await self.redis.set(LAG_CHECK_KEY, "1", nx=True, px=lease_ms)
                    for benefit_id in await self.behind() if turn else []:
                        await self.ensure_benefit(benefit_id, force=True)
            except (BackendUnavailable, RedisError, OSError, asyncpg.PostgresError) as exc:
                log.warning("recovery check failed (%s: %s); retrying", type(exc).__name__, exc)
            except asyncpg.InterfaceError as exc:
                log.warning("recovery check failed (%s); retrying", exc)
            try:
                await asyncio.wait_for(stop.wait(), min(WATCH_EVERY_S, lag_check_every_s))
            except TimeoutError:
                pass
