"""The claims engine: coalesces concurrent claims per benefit into one ``claim.lua`` call.

Concurrent requests for the same benefit that arrive within one event-loop turn are decided
by a single EVALSHA (up to ``batch_max`` each), so the Redis round trip is shared. Redis's
clock decides: the engine proposes the period its own clock (corrected by what Redis last
said the time was) points at, and ``claim.lua`` sends it back when Redis disagrees. A benefit
Redis cannot vouch for (``unverified``) is recovered first. With ``CLAIM_DURABILITY`` on, a
batch's accepted and replayed claims are answered once Redis holds them durably (``durability``).
The engine knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from claim_service import metrics
from claim_service.claims.benefit_cache import BenefitCache
from claim_service.claims.choices import decision_of, requested_options
from claim_service.claims.claim_args import claim_argv
from claim_service.claims.decisions import ACCEPTED, ClaimDecision, ClaimRequest, Span
from claim_service.claims.durability import DurableAck, held_connection
from claim_service.claims.gate import Gate
from claim_service.claims.shards import Borrower
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import Benefit
from claim_service.domain.draws import draw_value
from claim_service.domain.shards import bucket_of
from claim_service.errors import BackendUnavailable, NotFoundError
from claim_service.store.catalogue_store import push_buckets
from claim_service.store.connections import is_cluster
from claim_service.store.draw_seeds import DrawSeeds
from claim_service.store.keyspace import (
    STALE_RETRIES,
    BenefitKeys,
    Scripts,
    bucket_keys,
    text,
)
from claim_service.store.recovery import Recovery

log = logging.getLogger(__name__)

RESULT_WIDTH = 7
MAX_REQUEST_ID = 64
MAX_ACCOUNT = 128


def new_claim_id() -> str:
    """Time-ordered, 32 hex characters: 48-bit milliseconds then 72 random bits, then "00"
    (the options of a bundle take the ids ending 01, 02, ...; see ``bundle_item_id``)."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(9)}00"


def bundle_item_id(claim_id: str, index: int) -> str:
    """The claim id of a bundle's ``index``-th option (the first is the bundle's own)."""
    return claim_id if index == 0 else f"{claim_id[:30]}{index:02x}"


@dataclass
class _Pending:
    request: ClaimRequest
    option_id: str
    claim_id: str
    future: asyncio.Future[ClaimDecision]
    value: int | None = None  # a draw's value (see ``draws.draw_value``)


class ClaimEngine:
    """Decides claims; one instance per process, shared by every request handler.

    With ``pool`` the engine recovers a benefit Redis cannot vouch for by itself; without
    it, such claims answer ``BackendUnavailable`` until something else (``warm``, another
    process's ``Recovery.watch``) has.
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        pool: asyncpg.Pool | None = None,
        calendar: periods.Calendar | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.tz = settings.tz
        self.calendar = calendar or periods.Calendar(settings.tz)
        self.scripts = Scripts(redis)
        self.cluster = is_cluster(redis)
        self.recovery = Recovery(pool, redis, settings, self.calendar) if pool else None
        self.seeds = DrawSeeds(pool, settings.codes_key) if pool else None
        self.catalogue = BenefitCache(redis, self.tz, self.recovery)
        self.durability = DurableAck(settings)
        self.gate = Gate(redis)
        self.borrower = Borrower(redis, self.scripts, self.durability, self._recover)
        self._queues: dict[tuple[str, int], list[_Pending]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Redis's clock minus ours, learned from every batch: the period proposed for a
        # claim is the one Redis's clock points at, not a drifting local one.
        self.clock_offset_ms = 0
        self.batches = 0
        self.batched_claims = 0
        self.local_answers = 0

    # -- catalogue -----------------------------------------------------------------------

    async def benefit(self, benefit_id: str, *, refresh: bool = False) -> Benefit | None:
        """The benefit as pushed to Redis (cached; ``refresh`` reads it again)."""
        return await self.catalogue.get(benefit_id, refresh=refresh)

    async def benefit_ids(self) -> list[str]:
        return await self.catalogue.benefit_ids()

    def window(self, benefit: Benefit, period: str) -> tuple[datetime, datetime | None]:
        return benefit.release.window(period, self.tz)

    def now(self) -> datetime:
        """Now on the release calendar, by Redis's clock as last seen."""
        return periods.from_ms(self._redis_ms() + self.calendar.shift_ms, self.tz)

    def _redis_ms(self) -> int:
        return int(time.time() * 1000) + self.clock_offset_ms

    def redis_ms(self) -> int:
        """Now by Redis's clock, as last seen (unix ms)."""
        return self._redis_ms()

    def current_period(self, benefit: Benefit) -> str:
        """The period a claim on ``benefit`` decided now counts against."""
        return benefit.release.period_at(self.now(), self.tz)

    def span(self, benefit: Benefit, redis_ms: int) -> Span:
        """What ``claim.lua`` needs to decide for ``benefit`` at ``redis_ms``."""
        month = self.calendar.period_at(redis_ms)
        if benefit.release.fixed_period:
            period = benefit.release.period_at(self.now(), self.tz)
            previous, start, end = None, 0, 0
        else:
            period = month
            previous = periods.previous_period(period)
            start, end = self.calendar.bounds_ms(period)
        opens, closes = self.window(benefit, period)
        return Span(
            period,
            previous,
            month,
            start,
            end,
            opens,
            self.calendar.real_ms(opens),
            self.calendar.real_ms(closes) if closes else 0,
        )

    def next_opening(self, benefit: Benefit, now: datetime | None = None) -> datetime | None:
        """The next time claims open, or ``None`` when the release is over for good."""
        now = now or self.now()
        period = benefit.release.period_at(now, self.tz)
        opens, closes = self.window(benefit, period)
        if now < opens:
            return opens
        if closes is None or now < closes:
            return opens  # open now
        if benefit.release.type == "monthly":
            return self.window(benefit, periods.next_period(period))[0]
        return None

    # -- claims --------------------------------------------------------------------------

    async def claim(self, request: ClaimRequest) -> ClaimDecision:
        """Decide one claim (coalesced with concurrent ones into a batch)."""
        benefit = await self.benefit(request.benefit_id)
        if benefit is None:
            raise NotFoundError("unknown_benefit", f"no benefit {request.benefit_id!r}")
        option_id = requested_options(benefit, request)
        local = None
        # The gate knows a benefit's stock, not a bucket's, nor members' events.
        if benefit.shards == 1 and benefit.eligibility is None:
            local = self.gate.answer(benefit, request.user_id, option_id, self._redis_ms())
        if local is not None:
            self.local_answers += 1
            metrics.CLAIM_LOCAL_ANSWERS.labels(local.code).inc()
            return local
        if self.cluster and benefit.priced:
            # The points mirror is one key for every benefit: on a cluster it is in another
            # slot than the benefit's, and one script cannot touch both.
            raise BackendUnavailable("benefits priced in points are not served on a cluster yet")
        # An option this copy of the benefit lacks still goes to claim.lua: a retry of an
        # accepted request must get its claim back, and the option may be newer than the copy.
        loop = asyncio.get_running_loop()
        pending = _Pending(request, option_id, new_claim_id(), loop.create_future())
        # A sharded benefit's claims are batched per bucket (the member's: ``shards``).
        where = (request.benefit_id, bucket_of(request.user_id, benefit.shards))
        queue = self._queues.get(where)
        if queue is None:
            queue = self._queues[where] = []
            # Flush on the next loop turn: every request parsed in this turn joins the batch.
            loop.call_soon(self._flush, where)
        queue.append(pending)
        return await pending.future

    def _flush(self, where: tuple[str, int]) -> None:
        queue = self._queues.pop(where, [])
        size = self.settings.batch_max
        for start in range(0, len(queue), size):
            task = asyncio.create_task(self._run_batch(*where, queue[start : start + size]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, benefit_id: str, bucket: int, batch: list[_Pending]) -> None:
        try:
            found, durable = await self._decide(benefit_id, batch, bucket)
            decisions: list[ClaimDecision | None] = list(found)
            benefit = self.catalogue.cached(benefit_id)
            if benefit is not None and benefit.shards > 1:
                decisions, durable = await self.borrower.settle(
                    benefit,
                    bucket,
                    batch,
                    found,
                    durable,
                    lambda items: self._decide(benefit_id, items, bucket),
                )
        except Exception as exc:  # every waiter must hear about a failed batch
            if not isinstance(exc, BackendUnavailable | NotFoundError):
                log.exception("claim batch for %s failed", benefit_id)
                exc = BackendUnavailable("claim could not be decided")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, decision in zip(batch, decisions, strict=True):
            if item.future.done():
                continue
            if decision is None:
                item.future.set_exception(BackendUnavailable("stock is being moved; retry"))
            elif decision.accepted and not durable:
                metrics.CLAIM_NOT_DURABLE.inc()
                item.future.set_exception(
                    BackendUnavailable(
                        "Redis did not confirm the claim durable in time; it may have been "
                        "taken: retry with the same request_id"
                    )
                )
            else:
                item.future.set_result(decision)

    async def _decide(
        self, benefit_id: str, batch: list[_Pending], bucket: int = 0
    ) -> tuple[list[ClaimDecision], bool]:
        """The batch's decisions, and whether what they accepted or replayed is durable
        (``bucket``: the stock bucket of a sharded benefit deciding them)."""
        redis_ms = self._redis_ms()
        recovered = points_recovered = False
        for _attempt in range(STALE_RETRIES + 4):
            benefit = await self.benefit(benefit_id)
            if benefit is None:
                raise NotFoundError("unknown_benefit", f"no benefit {benefit_id!r}")
            keys = BenefitKeys(benefit_id)
            if benefit.shards > 1:
                keys = bucket_keys(benefit_id, benefit.shards)[bucket]
            span = self.span(benefit, redis_ms)
            seed = b""
            if benefit.draw is not None:
                if self.seeds is None:
                    raise BackendUnavailable("draws need PostgreSQL (their seeds live there)")
                seed = await self.seeds.seed(benefit_id, span.period)
                if not benefit.release.fixed_period:  # committed to long before it opens
                    await self.seeds.commitment(benefit_id, periods.next_period(span.period))
            for item in batch:
                req = item.request
                item.value = draw_value(seed, req.user_id, req.request_id) if seed else None
            items = [(i.request, i.option_id, i.claim_id, i.value) for i in batch]
            sent_at = time.time()
            try:
                argv = await claim_argv(self.redis, benefit, span, items, cluster=self.cluster)
                raw, replied_at, durable = await self._run_script(keys, span, argv)
            except (RedisError, RedisClusterException) as exc:
                raise BackendUnavailable("Redis is unavailable") from exc
            self.batches += 1
            self.batched_claims += len(batch)
            head = text(raw[0])
            if head == "points_unverified":  # the points mirror is not verified on this server
                if self.recovery is None or points_recovered:
                    raise BackendUnavailable("the points mirror is being recovered; retry")
                points_recovered = True
                await self.recovery.ensure_points()
                continue
            if head == "unverified":
                if self.recovery is None or recovered:
                    raise BackendUnavailable("the benefit's counters are being recovered; retry")
                recovered = True
                if not await self.recovery.ensure_benefit(benefit_id):
                    self.catalogue.forget(benefit_id)
                    raise NotFoundError("unknown_benefit", f"no benefit {benefit_id!r}")
                await self.benefit(benefit_id, refresh=True)
                continue
            if head == "missing" and benefit.shards > 1:
                await push_buckets(self.redis, benefit)  # the bucket lost its configuration
                continue
            if head == "missing":
                self.catalogue.forget(benefit_id)
                raise NotFoundError("unknown_benefit", f"no benefit {benefit_id!r}")
            if head == "stale":
                if benefit.shards > 1 and int(raw[1]) < benefit.version:
                    await push_buckets(self.redis, benefit)  # a push that missed the bucket
                await self.benefit(benefit_id, refresh=True)
                continue
            redis_ms = int(raw[1])
            self.clock_offset_ms = redis_ms - int((sent_at + replied_at) * 500)
            if head == "period":  # our clock and Redis's disagree on the period: Redis wins
                continue
            width = RESULT_WIDTH
            decisions = [
                self._decision(benefit, span, item, raw[2 + i * width : 2 + (i + 1) * width])
                for i, item in enumerate(batch)
            ]
            if benefit.shards == 1 and benefit.eligibility is None:
                users = [item.request.user_id for item in batch]
                self.gate.learn(benefit, span, users, decisions)
            metrics.CLAIM_BATCH_SIZE.set(len(batch))
            for decision in decisions:
                metrics.CLAIM_DECISIONS.labels(decision.code).inc()
            return decisions, durable
        raise BackendUnavailable("benefit configuration kept changing; retry")

    async def _run_script(
        self, keys: BenefitKeys, span: Span, argv: list[Any]
    ) -> tuple[list[Any], float, bool]:
        """``claim.lua``'s reply, when it came, and whether what it accepted or replayed is
        durable. With ``CLAIM_DURABILITY`` on, the script runs on a connection of its own and
        the wait for durability follows on it (it waits for that connection's writes)."""
        claim_keys = keys.claim_keys(
            span.period, span.previous, span.tiers_period, cluster=self.cluster
        )
        if not self.durability.enabled:
            raw = await self.scripts.claim(keys=claim_keys, args=argv)
            return raw, time.time(), True
        async with held_connection(self.redis, keys.config) as conn:
            raw = await conn.script(self.scripts.claim, claim_keys, argv)
            replied_at = time.time()
            codes = {text(code) for code in raw[2::RESULT_WIDTH]}
            if text(raw[0]) != "decided" or not codes & set(ACCEPTED):
                return raw, replied_at, True  # nothing accepted: nothing to make durable
            touch = [keys.idempotency(p) for p in (span.period, span.previous) if p]
            durable = await self.durability.confirm(conn, wrote="ok" in codes, touch=touch)
            return raw, replied_at, durable

    def _decision(
        self, benefit: Benefit, span: Span, item: _Pending, row: list[Any]
    ) -> ClaimDecision:
        return decision_of(
            benefit, span, item.option_id, item.value, row, self.tz, self.next_opening
        )

    async def _recover(self, benefit_id: str) -> None:
        """Rebuild what recovery must (a bucket a borrower found unverified), or say retry."""
        if self.recovery is None:
            raise BackendUnavailable("the benefit's counters are being recovered; retry")
        await self.recovery.ensure_benefit(benefit_id)

    async def drain(self) -> None:
        """Wait for batches already sent to Redis (used on shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.gate.close()

    # -- member views --------------------------------------------------------------------
