"""Reconciliation: where a benefit's counters in Redis differ from the truth, without
touching a live benefit.

The truth is what recovery would write: PostgreSQL united with the stream's not yet
persisted claims (``Snapshot.expected_counters``). Compared, per benefit and period: stock
taken (in all, per option and per prize of a draw), top-ups (``added``), each member's quota
use, the idempotency keys (missing, extra, or naming another claim) and each card-key option's free
codes (summed over its unexpired buckets). The points mirror is compared member by member
with the ledger less the points spent in Redis and not yet recorded (``points_drift``).

Claims keep being decided, persisted and refunded meanwhile, so Redis is read between two
readings of the truth (each: the stream, then PostgreSQL) and compared with what the truth
says it held at that instant: the claims accepted before it by Redis's clock (on a
cluster, that of the benefit's primary, read just before and just after a transaction
there, which takes no TIME: a claim between the two may go either way), refunded as
Redis's refunded set says where PostgreSQL agrees the claim failed (a refund reaches Redis
first). Quota use and idempotency keys are scanned rather than read in one command that
would stall claims, so their bounds also allow for what happened during the scan. A benefit
showing drift is compared once more after a short pause, and only drift seen both times is
reported (a top-up or a code load caught between PostgreSQL and Redis is not).

The comparison itself is in ``drift``. Nothing here writes to Redis: ``fix`` leaves the
repair to ``Recovery.ensure_benefit(force=True)``, which refuses claims while it rebuilds, so
no count a pending claim depends on is lowered. ``watch`` runs in every writer: it compares
each benefit's current period every ``CLAIM_RECONCILE_EVERY_S``, logs each drift and exports
the ``claim_drift`` gauge.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Any, cast

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import Benefit
from claim_service.errors import BackendUnavailable
from claim_service.metrics import DRIFT
from claim_service.store.bucket_recovery import bucket_snapshot
from claim_service.store.catalogue_store import load_benefits
from claim_service.store.connections import is_cluster
from claim_service.store.drift import Drift as Drift  # (importers of these predate ``drift``)
from claim_service.store.drift import Observed, compare
from claim_service.store.drift import free_codes as free_codes
from claim_service.store.keyspace import BenefitKeys, Scripts, bucket_keys, text
from claim_service.store.points_mirror import points_drift
from claim_service.store.recovery import Recovery, claim_period, redis_now_ms
from claim_service.store.snapshot import Snapshot, read_snapshot, stream_claims

log = logging.getLogger(__name__)

# The kinds of drift (the ``kind`` label of ``claim_drift``).
KINDS = (
    "taken",
    "option_taken",
    "added",
    "quota",
    "idem_missing",
    "idem_extra",
    "idem_different",
    "codes",
    "prize_taken",
)
PASSES = 2  # a drift is reported only when every pass sees it
PASS_PAUSE_S = 0.05  # lets a refund or a code load caught half-way finish
SCAN_COUNT = 1_000  # large hashes are scanned, never read in one blocking command
LOG_AT_MOST = 50  # drift lines logged per benefit and check


@dataclass
class BenefitCheck:
    benefit_id: str
    period: str
    live: bool  # False: not live on this server, so not compared (rebuilt before a claim)
    drift: list[Drift] = field(default_factory=list)


class Reconciler:
    """Compares benefits' counters in one Redis with the truth; repairs through recovery."""

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
        self.cluster = is_cluster(redis)

    async def benefits(self) -> list[Benefit]:
        return await load_benefits(self.pool, self.settings.tz)

    async def check(self, benefit: Benefit, period: str | None = None) -> BenefitCheck:
        """Drift of ``benefit`` in ``period`` (default: the period claims count against
        now). Raises ``BackendUnavailable`` when Redis or PostgreSQL fails."""
        try:
            return await self._check(benefit, period)
        except (RedisError, RedisClusterException) as exc:  # (a slot no primary serves)
            raise BackendUnavailable("Redis is unavailable") from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise BackendUnavailable("PostgreSQL is unavailable") from exc

    async def _check(self, benefit: Benefit, period: str | None) -> BenefitCheck:
        """A sharded benefit is compared part by part: its own keys (top-ups, no claims)
        and each bucket (its members' claims, its share of the top-ups)."""
        benefit_id = benefit.benefit_id
        if period is None:
            now_ms = await self._clock(BenefitKeys(benefit_id))
            period = claim_period(benefit, self.calendar, now_ms)
        parts: list[tuple[BenefitKeys, int | None]] = [(BenefitKeys(benefit_id), None)]
        if benefit.shards > 1:
            buckets = bucket_keys(benefit_id, benefit.shards)
            parts += [(keys, number) for number, keys in enumerate(buckets)]
        drift: list[Drift] = []
        for keys, number in parts:
            found = await self._check_part(benefit, keys, number, period)
            if found is None:
                return BenefitCheck(benefit_id, period, live=False)
            drift += found
        return BenefitCheck(benefit_id, period, live=True, drift=drift)

    async def _check_part(
        self, benefit: Benefit, keys: BenefitKeys, number: int | None, period: str
    ) -> list[Drift] | None:
        before = await self._truth(benefit, keys, number, period)
        confirmed: dict[tuple[str, str, str, str], Drift] = {}
        for attempt in range(PASSES):
            if attempt:
                await asyncio.sleep(PASS_PAUSE_S)
            seen = await self._observe(keys, period)
            if seen is None:
                return None
            after = await self._truth(benefit, keys, number, period)
            found = {d.key: d for d in compare(benefit.benefit_id, before, seen, after)}
            confirmed = found if not attempt else {k: found[k] for k in confirmed if k in found}
            if not confirmed:
                break
            before = after
        return list(confirmed.values())

    async def _truth(
        self, benefit: Benefit, keys: BenefitKeys, number: int | None, period: str
    ) -> Snapshot:
        """What ``keys`` must hold: the benefit's claims, or bucket ``number``'s part of
        them (a sharded benefit's own keys hold none)."""
        # The stream first, then PostgreSQL: an entry persisted in between is seen twice
        # (and counted once), never missed.
        in_stream = await stream_claims(self.redis, keys.stream)
        truth = await read_snapshot(self.pool, benefit.benefit_id, period, None, in_stream)
        if number is not None:
            return bucket_snapshot(truth, benefit, number)
        return replace(truth, claims=[]) if benefit.shards > 1 else truth

    async def _clock(self, keys: BenefitKeys) -> int:
        """Redis's clock (ms); on a cluster that of the primary serving the benefit, by which
        ``claim.lua`` dates its claims."""
        if not self.cluster:
            return await redis_now_ms(self.redis)
        node = cast(RedisCluster, self.redis).get_node_from_key(keys.live)
        seconds, micros = await self.redis.time(target_nodes=node)
        return int(seconds) * 1000 + int(micros) // 1000

    async def _instant(
        self, keys: BenefitKeys, period: str, hashes: list[str]
    ) -> tuple[int, int, set[str], list[Any]] | None:
        """Redis's clock at or before and at or after one atomic step reading the period's
        refunded ids and ``hashes``, and what it read; None when the benefit is not live
        here. One server's clock is read in the step itself (both times are the same)."""
        if self.cluster:
            return await self._instant_on_shard(keys, period, hashes)
        async with self.redis.pipeline(transaction=True) as pipe:
            await self.scripts.live(keys=[keys.live], args=["check"], client=pipe)
            pipe.time()
            pipe.smembers(keys.refunded(period))
            for name in hashes:
                pipe.hgetall(name)
            live, clock, refunded, *values = await pipe.execute()
        if not live:
            return None
        now_ms = int(clock[0]) * 1000 + int(clock[1]) // 1000
        return now_ms, now_ms, {text(m) for m in refunded}, values

    async def _instant_on_shard(
        self, keys: BenefitKeys, period: str, hashes: list[str]
    ) -> tuple[int, int, set[str], list[Any]] | None:
        """``_instant`` on a cluster: a transaction on the benefit's primary, whose clock is
        read just before and just after it (a cluster transaction takes no TIME)."""
        if not await self.scripts.live(keys=[keys.live], args=["check"]):  # (loads it there)
            return None
        now_ms = await self._clock(keys)
        async with self.redis.pipeline(transaction=True) as pipe:
            # Raw: the cluster pipeline refuses ``evalsha`` and would hand ``smembers``'s
            # routing arguments to its reply callback.
            pipe.execute_command("EVALSHA", self.scripts.live.sha, 1, keys.live, "check")
            pipe.execute_command("SMEMBERS", keys.refunded(period))
            for name in hashes:
                pipe.hgetall(name)
            live, refunded, *values = await pipe.execute()
        read_ms = await self._clock(keys)
        return (now_ms, read_ms, {text(m) for m in refunded}, values) if live else None

    async def _observe(self, keys: BenefitKeys, period: str) -> Observed | None:
        """What Redis holds under ``keys``, or None when they are not live here (or stopped
        being live meanwhile: a rebuild started)."""
        first = await self._instant(keys, period, [keys.stock(period), keys.codes])
        if first is None:
            return None
        now_ms, read_ms, refunded, (stock, codes) = first
        used = {
            text(k): int(v)
            async for k, v in self.redis.hscan_iter(keys.used(period), count=SCAN_COUNT)
        }
        idem = {
            text(k): text(v)
            async for k, v in self.redis.hscan_iter(keys.idempotency(period), count=SCAN_COUNT)
        }
        then = await self._instant(keys, period, [])
        if then is None:
            return None
        buckets = []
        for name, value in codes.items():
            option_id, _, expiry = text(name).partition("|")
            buckets.append((option_id, int(expiry or 0), int(value)))
        return Observed(
            now_ms=now_ms,
            read_ms=read_ms,
            stock={text(k): int(v) for k, v in stock.items()},
            refunded=refunded,
            codes=free_codes(buckets, now_ms),
            used=used,
            idem=idem,
            scanned_ms=then[1],
            refunded_by_then=then[2],
        )

    async def check_all(self, period: str | None = None) -> list[BenefitCheck]:
        return [await self.check(benefit, period) for benefit in await self.benefits()]

    async def fix(self, benefit: Benefit, period: str | None = None) -> BenefitCheck:
        """Rebuild ``benefit`` from the truth (claims wait meanwhile, as in any recovery:
        none can slip in between, so no pending claim loses its unit), then compare again.
        Recovery rebuilds the current period; drift in another one is left and reported."""
        recovery = Recovery(self.pool, self.redis, self.settings, self.calendar)
        await recovery.ensure_benefit(benefit.benefit_id, force=True)
        return await self.check(benefit, period)

    async def report_all(self) -> list[BenefitCheck]:
        """Check every benefit's current period; log each drift and set ``claim_drift``."""
        checks = await self.check_all()
        for check in checks:
            for kind in KINDS:
                count = sum(1 for d in check.drift if d.kind == kind)
                DRIFT.labels(check.benefit_id, kind).set(count)
            for drift in check.drift[:LOG_AT_MOST]:
                log.warning("drift between Redis and PostgreSQL: %s", drift.describe())
            if len(check.drift) > LOG_AT_MOST:
                log.warning(
                    "… and %d more drift(s) for %s (`claim-service reconcile` lists them all)",
                    len(check.drift) - LOG_AT_MOST,
                    check.benefit_id,
                )
        points = await points_drift(self.pool, self.redis)
        DRIFT.labels("*points*", "points").set(len(points))
        for found in points[:LOG_AT_MOST]:
            log.warning("drift between Redis and the points ledger: %s", found.describe())
        return checks

    async def watch(self, stop: asyncio.Event, every_s: float) -> None:
        """``report_all`` every ``every_s`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), every_s)
                return
            except TimeoutError:
                pass
            try:
                await self.report_all()
            except BackendUnavailable as exc:
                log.warning("drift check failed (%s); trying again in %.0fs", exc, every_s)
            except Exception:  # a check that breaks must not end the checks for good
                log.exception("drift check failed; trying again in %.0fs", every_s)
