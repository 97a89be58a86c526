"""Borrowing between the stock buckets of a sharded benefit (see ``domain.shards``).

A member's claims are decided in their bucket. When ``claim.lua`` answers ``sold_out`` there,
the bucket borrows before anyone is told so: every other bucket is asked, at once, to lend
it a bounded step (``buckets.lua``: at least what the refused claims need, at most ``STEP``
more from a well-stocked bucket), the loans are credited to the bucket, and the refused
claims are decided again. ``sold_out`` is answered only when one such round found every
bucket empty and no units in flight: lent by one bucket and not yet credited to another
(a borrower that stopped half-way; the round credits them and looks again). So the last unit
of the benefit is always reachable from every bucket, and no member hears ``sold_out`` while
a bucket still holds stock. Once a round found the benefit empty, this process answers so
for ``DRAINED_S`` without asking again (less if a change is announced).

With ``CLAIM_DURABILITY`` on, a loan is credited only once the donor's server has made it
durable: a donor that restarts from its AOF or fails over to a replica never forgets a loan
another bucket already counted.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimDecision
from claim_service.claims.durability import DurableAck, held_connection
from claim_service.domain.catalogue import Benefit
from claim_service.domain.shards import share
from claim_service.errors import BackendUnavailable
from claim_service.store.buckets import HOLD_MS, BucketState, BucketUnverified, credit, lend
from claim_service.store.keyspace import BenefitKeys, Scripts, bucket_keys
from claim_service.store.stock_events import EVERY_BENEFIT, listen_here

STEP = 64  # units a bucket lends beyond the wanted ones, at most (and 1/K of what it has)
CONCURRENT = 4  # borrowings in flight per process (each asks every other bucket at once)
# How long a round that found the whole benefit empty answers for this process: the sold-out
# tail then costs one borrowing round per benefit per DRAINED_S instead of one per refused
# claim. Announced changes (refund, top-up, pushed configuration, rebuilt counters: see
# ``stock_events``) made in this process end it at once.
DRAINED_S = 0.1
ROUNDS = 32  # borrowing rounds for one batch before answering "retry" instead of guessing

Item = TypeVar("Item")
Decide = Callable[[list[Item]], Awaitable[tuple[list[ClaimDecision], bool]]]


class Borrower:
    """One per engine: moves units to a bucket whose members were refused ``sold_out``."""

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        durability: DurableAck,
        recover: Callable[[str], Awaitable[object]],
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.durability = durability
        self.recover = recover
        self.loans = 0  # lend calls that moved units
        self.rounds = 0
        # A cluster client's connection pools refuse (rather than queue) beyond their size.
        self._slots = asyncio.Semaphore(CONCURRENT)
        self._drained: dict[tuple[str, str], float] = {}  # (benefit, period) -> until
        # (benefit, period) -> bucket -> units left, as last seen (see ``_whole``)
        self._left: dict[tuple[str, str], dict[int, int]] = {}
        listen_here(self.forget)

    def forget(self, benefit_id: str) -> None:
        """Stock may have come back (``stock_events.announce``): look again."""
        if benefit_id == EVERY_BENEFIT:
            self._drained.clear()
        else:
            for key in [k for k in self._drained if k[0] == benefit_id]:
                self._drained.pop(key, None)

    async def settle(
        self,
        benefit: Benefit,
        receiver: int,
        batch: Sequence[Item],
        decisions: list[ClaimDecision],
        durable: bool,
        decide: Decide[Item],
    ) -> tuple[list[ClaimDecision | None], bool]:
        """The batch's final decisions: its ``sold_out`` ones decided again after borrowing
        until they are taken or the whole benefit is sold out. ``None`` for a claim still
        undecided after ``ROUNDS`` (the caller answers "retry"). Each decision's
        ``stock_left`` is the benefit's (see ``_whole``), not the bucket's."""
        final, durable = await self._settle(benefit, receiver, batch, decisions, durable, decide)
        return self._whole(benefit, receiver, final), durable

    async def _settle(
        self,
        benefit: Benefit,
        receiver: int,
        batch: Sequence[Item],
        decisions: list[ClaimDecision],
        durable: bool,
        decide: Decide[Item],
    ) -> tuple[list[ClaimDecision | None], bool]:
        final: list[ClaimDecision | None] = list(decisions)
        for _round in range(ROUNDS):
            refused = [i for i, d in enumerate(final) if d is not None and d.code == "sold_out"]
            if not refused:
                return final, durable
            period = decisions[refused[0]].period
            if await self.borrow(benefit, period, receiver, len(refused)) <= 0:
                return final, durable  # every bucket is empty: sold out for real
            again, again_durable = await decide([batch[i] for i in refused])
            durable = durable and again_durable
            for i, decided in zip(refused, again, strict=True):
                final[i] = decided
        for i, left in enumerate(final):
            if left is not None and left.code == "sold_out":
                final[i] = None
        return final, durable

    def _whole(
        self, benefit: Benefit, bucket: int, decisions: list[ClaimDecision | None]
    ) -> list[ClaimDecision | None]:
        """The decisions with the benefit's units left: the bucket's count after each claim
        plus every other bucket's as this process last saw it (a bucket it has not seen yet:
        its share of the stock), an estimate as fresh as this worker's traffic."""
        decided = [d for d in decisions if d is not None]
        if not decided:
            return decisions
        period = decided[0].period
        seen = self._left.setdefault((benefit.benefit_id, period), {})
        seen[bucket] = min(d.stock_left for d in decided)
        others = sum(
            seen.get(j, share(benefit.stock_per_period, benefit.shards, j))
            for j in range(benefit.shards)
            if j != bucket
        )
        return [
            None if d is None else replace(d, stock_left=max(d.stock_left + others, 0))
            for d in decisions
        ]

    def _saw(self, benefit_id: str, period: str, states: dict[int, BucketState]) -> None:
        seen = self._left.setdefault((benefit_id, period), {})
        for number, state in states.items():
            seen[number] = max(state.left, 0)

    async def borrow(self, benefit: Benefit, period: str, receiver: int, wanted: int) -> int:
        """Units bucket ``receiver`` holds after borrowing for ``wanted`` claims; 0 only when
        every bucket was found empty with nothing in flight."""
        drained = (benefit.benefit_id, period)
        if self._drained.get(drained, 0.0) > time.monotonic():
            return 0
        self._drained.pop(drained, None)
        buckets = bucket_keys(benefit.benefit_id, benefit.shards)
        for _round in range(ROUNDS):
            self.rounds += 1
            try:
                async with self._slots:
                    left = await self._round(benefit, buckets, period, receiver, wanted)
            except BucketUnverified:
                await self.recover(benefit.benefit_id)
                continue
            if left == 0:
                self._drained[drained] = time.monotonic() + DRAINED_S
            if left is not None:
                return left
        raise BackendUnavailable("stock is being moved between buckets; retry")

    async def _round(
        self,
        benefit: Benefit,
        buckets: tuple[BenefitKeys, ...],
        period: str,
        receiver: int,
        wanted: int,
    ) -> int | None:
        """One round: the receiver's units after it, 0 when sold out, None to go again."""
        shards = len(buckets)
        donors = [j for j in range(shards) if j != receiver]
        each = max(1, math.ceil(wanted / len(donors)))
        replies = await asyncio.gather(
            *(self._lend(buckets[j], period, shards, receiver, each) for j in donors),
            return_exceptions=True,
        )
        seen = {j: r for j, r in zip(donors, replies, strict=True) if isinstance(r, BucketState)}
        lent = list(seen.values())
        loans = {j: s.out[receiver] for j, s in seen.items() if s.out[receiver] > 0}
        seen[receiver] = here = await credit(self.scripts, buckets[receiver], period, shards, loans)
        self.loans += sum(1 for s in lent if s.lent > 0)
        self._saw(benefit.benefit_id, period, seen)
        if here.left > 0:
            return here.left  # what the buckets that answered lent is enough
        if any(s.lent > 0 for s in lent):
            return None  # what came was not enough (the bucket was below zero)
        for failed in replies:
            if isinstance(failed, BaseException):
                raise failed  # a bucket unverified or out of reach: it may hold stock
        if any(s.held for s in lent):  # units kept for the claims that just borrowed them
            await asyncio.sleep(HOLD_MS / 4000)
            return None
        flights = _in_flight(seen, shards)
        if not flights:
            return 0
        await asyncio.gather(
            *(credit(self.scripts, buckets[b], period, shards, owed) for b, owed in flights.items())
        )
        return None

    async def _lend(
        self, keys: BenefitKeys, period: str, shards: int, receiver: int, wanted: int
    ) -> BucketState:
        if not self.durability.enabled:
            return await lend(self.scripts, keys, period, shards, receiver, wanted, STEP)
        async with held_connection(self.redis, keys.config) as conn:
            state = await lend(
                self.scripts, keys, period, shards, receiver, wanted, STEP, client=conn
            )
            # buckets.lua always writes (the hash's TTL), so the wait covers every loan the
            # reply shows, the ones other borrowers made too.
            if not await self.durability.confirm(conn, wrote=True):
                raise BackendUnavailable("Redis did not confirm a stock loan durable; retry")
            return state


def _in_flight(seen: dict[int, BucketState], shards: int) -> dict[int, dict[int, int]]:
    """Loans some bucket made that the receiving bucket had not counted when it was read:
    receiver -> {donor: the donor's cumulative loans to it}."""
    owed: dict[int, dict[int, int]] = {}
    for donor, state in seen.items():
        for to in range(shards):
            if to != donor and to in seen and state.out[to] > seen[to].received[donor]:
                owed.setdefault(to, {})[donor] = state.out[to]
    return owed
