"""The claim gate: answers, without Redis, the claims whose answer Redis could not change.

Before a benefit opens, and once it is sold out, every member who has not claimed it gets the
same answer. A worker that has heard ``claim.lua`` say so (``not_open``, ``sold_out``,
``option_sold_out``) takes a snapshot of who *has* claimed it in the period and the one
before (the members of its idempotency hashes: their request may be a retry that must get its
claim back) and of the counters that could change the answer (stock, codes, configuration,
the ``live`` marker). Then, for a member outside that snapshot, it answers what ``claim.lua``
would:

- ``not_open`` (425) before the opening (the last ``OPENING_GUARD_MS`` go to Redis, whose
  clock decides the opening);
- ``sold_out`` / ``option_sold_out`` (410) once sold out, but only for a member whose tier
  for the period this worker has seen ``claim.lua`` report and who is entitled to claim
  (``claim.lua`` checks tier and quota before stock): everyone else still goes to Redis
  once, which tells the gate their tier.

Members in the snapshot, paused benefits, unknown options, closed windows and another
period all go to Redis. The gate forgets a benefit when a batch accepts a claim or reports
stock left, when an announcement (``store.stock_events``: refund, top-up, codes, pushed
configuration, rebuilt counters) arrives, or when its periodic re-check (``RECHECK_S``)
finds the counters changed, so it reopens within milliseconds of an announcement and at
worst within ``RECHECK_S`` if one was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service.claims.decisions import ClaimDecision, Span
from claim_service.domain.catalogue import Benefit
from claim_service.store.connections import is_cluster
from claim_service.store.keyspace import STOCK_CHANNEL, BenefitKeys, text
from claim_service.store.stock_events import EVERY_BENEFIT, listen_here

log = logging.getLogger(__name__)

RECHECK_S = 0.25
OPENING_GUARD_MS = 100
SCAN_COUNT = 2_000
MAX_TIERS = 500_000  # members' tiers remembered per worker (all forgotten beyond)
RESUBSCRIBE_S = 1.0
# Refusals that read the member's tier from the period's snapshot (``dup`` reports the tier of
# the original claim; the window and pause codes read none). An accepted member's tier is not
# kept: holding a claim, they always go to Redis, so remembering it would only cost the
# selling phase a dictionary write per claim.
TIER_READ = frozenset({"tier", "quota", "sold_out", "option_sold_out", "unknown_option", "points"})


@dataclass
class _Known:
    where: Span
    version: int
    left: int = 0  # stock left, as the batch that taught the gate reported it
    before_open: bool = False
    sold_out: bool = False
    options_sold_out: frozenset[str] = frozenset()
    holders: frozenset[str] | None = None  # None: snapshot not taken yet
    stamp: tuple[Any, ...] | None = None
    loading: bool = False


class Gate:
    """One per engine. ``answer`` is called for each claim before it is queued for Redis,
    ``learn`` with each batch's decisions, ``run`` in the background while serving."""

    def __init__(self, redis: Redis, *, recheck_s: float = RECHECK_S) -> None:
        self.redis = redis
        self.cluster = is_cluster(redis)
        self.recheck_s = recheck_s
        self._known: dict[str, _Known] = {}
        self._tiers: dict[str, int] = {}
        self._tiers_period = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False  # only a gate that hears announcements and re-checks answers
        # Called with each benefit id announced or found sold out (the live feeds): the
        # worker's one subscription serves them too.
        self.listeners: list[Callable[[str], None]] = []
        listen_here(self.forget)

    # -- the hot path ----------------------------------------------------------------------

    def answer(
        self, benefit: Benefit, user_id: str, option_id: str, now_ms: int
    ) -> ClaimDecision | None:
        """What ``claim.lua`` would decide, when this worker can be sure of it."""
        code = self._code(benefit, user_id, option_id, now_ms)
        if code is None:
            return None
        known = self._known[benefit.benefit_id]
        option_id = option_id.split(",")[0]  # a bundle's first, as claim.lua names it
        tier = self._tiers.get(user_id, 0) if code != "not_open" else 0
        return ClaimDecision(
            code=code,
            benefit_id=benefit.benefit_id,
            option_id=option_id,
            period=known.where.period,
            stock_left=known.left,
            tier=tier,
            quota=benefit.quota_for(tier),
            opens_at=known.where.opens if code == "not_open" else None,
            local=True,
        )

    def _code(self, benefit: Benefit, user_id: str, option_id: str, now_ms: int) -> str | None:
        known = self._known.get(benefit.benefit_id)
        if (
            known is None
            or known.holders is None
            or known.version != benefit.version
            or not self._running
        ):
            return None
        where = known.where
        if benefit.paused or (where.end_ms and not where.start_ms <= now_ms < where.end_ms):
            return None
        if user_id in known.holders:
            return None  # perhaps a retry of an accepted request: only Redis knows
        if known.before_open:
            return "not_open" if now_ms < where.opens_ms - OPENING_GUARD_MS else None
        if where.closes_ms and now_ms >= where.closes_ms:
            return None
        # option_id: one option, a bundle's joined by ",", or "" for a draw (the prize decides)
        chosen = option_id.split(",") if option_id else []
        if benefit.draw is None and (not chosen or any(benefit.option(o) is None for o in chosen)):
            return None
        if where.tiers_period != self._tiers_period:
            return None
        tier = self._tiers.get(user_id)
        if tier is None or tier < benefit.min_tier or benefit.quota_for(tier) < 1:
            return None
        if known.sold_out:
            return "sold_out"
        # claim.lua names the first chosen option it finds sold out: only when that is the
        # first one chosen is this worker sure which it is.
        if chosen and chosen[0] in known.options_sold_out:
            return "option_sold_out"
        return None

    def learn(
        self,
        benefit: Benefit,
        where: Span,
        users: Sequence[str],
        decisions: Sequence[ClaimDecision],
    ) -> None:
        """What a batch's decisions (for ``users``, in order) say about the answers to come."""
        benefit_id = benefit.benefit_id
        if where.tiers_period != self._tiers_period:
            self._tiers.clear()
            self._tiers_period = where.tiers_period
        codes: set[str] = set()
        for user_id, decision in zip(users, decisions, strict=True):
            codes.add(decision.code)
            if decision.code in TIER_READ:
                self._tiers[user_id] = decision.tier
        if len(self._tiers) > MAX_TIERS:
            self._tiers.clear()
        known = self._known.get(benefit_id)
        if "ok" in codes or (known is not None and known.sold_out and _stock_left(decisions)):
            self.forget(benefit_id)  # it accepts claims: whatever was known is outdated
            return
        if not codes & {"not_open", "sold_out", "option_sold_out"}:
            return
        if "sold_out" in codes and (known is None or not known.sold_out):
            self._tell(benefit_id)
        if known is not None and (known.where != where or known.version != benefit.version):
            self.forget(benefit_id)
            known = None
        if known is None:
            known = self._known[benefit_id] = _Known(where, benefit.version)
        known.left = max(d.stock_left for d in decisions)
        if "sold_out" in codes:
            known.sold_out, known.before_open = True, False
        elif "not_open" in codes and not known.sold_out:
            known.before_open = True
        sold = {d.option_id for d in decisions if d.code == "option_sold_out"}
        if sold:
            known.options_sold_out = known.options_sold_out | sold
        if known.holders is None and not known.loading:
            known.loading = True
            self._spawn(self._snapshot(benefit_id, known))

    def _tell(self, benefit_id: str) -> None:
        for listener in self.listeners:
            listener(benefit_id)

    def forget(self, benefit_id: str) -> None:
        if benefit_id == EVERY_BENEFIT:
            self._known.clear()
            self._tiers.clear()
        else:
            self._known.pop(benefit_id, None)

    @property
    def answering(self) -> int:
        """Benefits this worker currently answers some claims of by itself."""
        return sum(1 for known in self._known.values() if known.holders is not None)

    # -- snapshots and re-checks -----------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stamp(self, benefit_id: str, where: Span) -> tuple[Any, ...]:
        """The counters that could change the gate's answers. On a cluster they are read in
        a plain pipeline (one round trip to the benefit's primary): redis-py queues each
        command of a cluster transaction in a thread of its own, the event loop waiting.
        Nothing is lost: each key is read before a snapshot's scan and again after it, so
        equal stamps still mean no key changed in between."""
        keys = BenefitKeys(benefit_id)
        async with self.redis.pipeline(transaction=not self.cluster) as pipe:
            pipe.hgetall(keys.stock(where.period))
            pipe.hmget(keys.config, "version", "paused")
            pipe.hgetall(keys.codes)
            pipe.get(keys.live)
            stock, config, codes, live = await pipe.execute()
        return (sorted(stock.items()), tuple(config), sorted(codes.items()), live)

    async def _snapshot(self, benefit_id: str, known: _Known) -> None:
        """Who holds a claim (by the idempotency hashes), between two equal stamps."""
        where = known.where
        keys = BenefitKeys(benefit_id)
        try:
            before = await self._stamp(benefit_id, where)
            holders: set[str] = set()
            for period in (where.period, where.previous):
                if period is None:
                    continue
                async for field, _ in self.redis.hscan_iter(
                    keys.idempotency(period), count=SCAN_COUNT
                ):
                    holders.add(_member_of(field))
            after = await self._stamp(benefit_id, where)
        except RedisError as exc:
            log.debug("gate snapshot of %s failed: %s", benefit_id, exc)
            after, before = None, ()
        if self._known.get(benefit_id) is not known:
            return  # forgotten meanwhile
        if after is None or before != after:
            self.forget(benefit_id)  # it changed under us: learn again from the next batch
            return
        known.holders, known.stamp, known.loading = frozenset(holders), after, False

    async def _recheck(self) -> None:
        for benefit_id, known in list(self._known.items()):
            if known.stamp is None:
                continue
            try:
                stamp = await self._stamp(benefit_id, known.where)
            except RedisError:
                stamp = None
            if stamp != known.stamp and self._known.get(benefit_id) is known:
                self.forget(benefit_id)

    async def run(self, stop: asyncio.Event) -> None:
        """Listen for announcements and re-check what is known, until ``stop``."""
        listener = asyncio.create_task(self._listen(stop))
        self._running = True
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.recheck_s)
                await self._recheck()
        finally:
            self._running = False
            self._known.clear()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await self.close()

    async def close(self) -> None:
        """Cancel snapshots under way."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _listen(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(STOCK_CHANNEL)
                # Whatever happened while not subscribed was not heard: start again.
                self.forget(EVERY_BENEFIT)
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self.forget(text(message["data"]))
                        self._tell(text(message["data"]))
            except (RedisError, OSError) as exc:
                self.forget(EVERY_BENEFIT)
                log.debug("gate announcements interrupted: %s", exc)
                await asyncio.sleep(RESUBSCRIBE_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]


def _stock_left(decisions: Sequence[ClaimDecision]) -> bool:
    return any(
        d.stock_left > 0 for d in decisions if d.code not in ("not_open", "closed", "paused")
    )


def _member_of(field: bytes | str) -> str:
    """The member of an idempotency field ``<utf-8 length>:<member><request id>``."""
    raw = field if isinstance(field, bytes) else field.encode()
    length, _, rest = raw.partition(b":")
    return rest[: int(length)].decode()
