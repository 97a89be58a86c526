"""The points ledger against a plain model: random credits, adjustments, claims of priced
options, refunds, expiries and writer rounds, with every call retried.

The real engine, ``claim.lua``, writer, compensation and ledger run against the real
servers. Time moves in ticks of ``TICK_S`` seconds: lots expire on tick boundaries and every
time-sensitive call is made well inside a tick, so the model knows which lots were
spendable. After every step: no balance below zero, each balance the sum of the member's
entries and equal to the model's, each lot's remaining points as the model says, every
debit one claim's and every refund one debit's (same lots, opposite amounts), debits taken
first-expiring-first, and the Redis mirror equal to the model and to the ledger.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import asyncpg
from hypothesis import HealthCheck
from hypothesis import settings as run_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.claims.writer import ClaimWriter, backlog
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.domain.lifecycle import FAILED
from claim_service.domain.points import Adjustment, CreditRule, parse_lots
from claim_service.fulfilment.compensation import refund
from claim_service.store import catalogue_store, points_credit, points_ledger, points_mirror
from claim_service.store.claim_states import transition
from claim_service.store.connections import create_pg_pool, create_redis
from claim_service.store.keyspace import POINTS_KEY, text
from claim_service.store.tiers import save_tiers
from tests.helpers import TABLES, benefit_body, direct

T = TypeVar("T")

TICK_S = 0.4
MARGIN_S = 0.1  # no time-sensitive call closer than this to a tick boundary
FAR = 10**6  # a tick no run reaches: the monthly credit's lot (expires in a year)
USERS = ("ann", "bo", "cy")
PRICES = {"one": 1, "two": 2}
EXAMPLES = int(os.environ.get("CLAIM_POINTS_EXAMPLES", "20"))

RUN = run_settings(
    max_examples=EXAMPLES,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass
class MLot:
    key: str  # the reference of the entry that made it
    order: int  # creation order (the ledger's lot ids follow it)
    remaining: int
    expires: int  # tick at which it expires (FAR: not in this run; None: never)
    never: bool = False

    def spendable(self, tick: int) -> bool:
        return self.never or tick < self.expires

    def fefo(self) -> tuple[float, int]:
        return (float("inf") if self.never else self.expires, self.order)


@dataclass
class MClaim:
    claim_id: str
    user: str
    request_id: str
    option: str
    taken: list[tuple[str, int]]
    refunded: bool = False


@dataclass
class Model:
    tick: int = 0
    lots: dict[str, list[MLot]] = field(default_factory=lambda: {u: [] for u in USERS})
    adjustments: dict[str, tuple[str, int]] = field(default_factory=dict)  # ref -> (user, amt)
    credited: bool = False
    created: int = 0

    def spendable(self, user: str) -> int:
        return sum(lot.remaining for lot in self.lots[user] if lot.spendable(self.tick))

    def balance(self, user: str) -> int:
        return sum(lot.remaining for lot in self.lots[user])

    def lot(self, user: str, key: str) -> MLot:
        return next(lot for lot in self.lots[user] if lot.key == key)

    def add_lot(self, user: str, key: str, amount: int, expires: int | None) -> None:
        self.created += 1
        self.lots[user].append(
            MLot(key, self.created, amount, expires if expires is not None else 0, expires is None)
        )

    def take(self, user: str, amount: int) -> list[tuple[str, int]]:
        taken = []
        for lot in sorted(self.lots[user], key=MLot.fefo):
            if amount and lot.spendable(self.tick) and lot.remaining:
                part = min(amount, lot.remaining)
                lot.remaining -= part
                amount -= part
                taken.append((lot.key, part))
        return taken

    def write_off(self) -> None:
        for lots in self.lots.values():
            for lot in lots:
                if not lot.spendable(self.tick):
                    lot.remaining = 0


class PointsMachine(RuleBasedStateMachine):
    app_settings: ClassVar[Settings]
    claims = Bundle("claims")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis, self.pool = self.run(self._connect())
        self.engine = ClaimEngine(self.redis, self.app_settings, pool=self.pool)
        self.writer = ClaimWriter(
            self.redis, self.pool, replace(self.app_settings, writer_block_ms=2)
        )
        self.model = Model()
        self.base = time.time()
        self.claimed: dict[str, MClaim] = {}
        self.requests = 0

    def run(self, step: Awaitable[T]) -> T:
        return self.loop.run_until_complete(step)

    async def _connect(self) -> tuple[Redis, asyncpg.Pool]:
        settings = self.app_settings
        assert settings.redis_url and settings.database_url
        redis = await create_redis(settings.redis_url)
        pool = await create_pg_pool(settings.database_url, max_size=4)
        await redis.flushall()
        await pool.execute(f"TRUNCATE {TABLES} CASCADE")
        body = benefit_body(stock=10_000, min_tier=12, quota=[{"min_tier": 12, "per_period": 999}])
        body["options"] = [direct(name, price_points=price) for name, price in PRICES.items()]
        benefit = parse_benefit("lounge", body, settings.tz)
        benefit = await catalogue_store.save_benefit(pool, benefit)
        await catalogue_store.push_benefit(redis, benefit)
        period = periods.current_period(settings.tz)
        await save_tiers(pool, redis, period, [(u, 12) for u in USERS])
        await points_credit.save_rules(pool, (CreditRule(12, 1, 12),))
        await points_mirror.ensure_points(pool, redis)
        return redis, pool

    def teardown(self) -> None:
        async def close() -> None:
            await self.engine.drain()
            await self.redis.aclose()
            await self.pool.close()

        try:
            self.run(close())
        finally:
            self.loop.close()

    # -- time ----------------------------------------------------------------------------

    def _safe(self) -> None:
        """Stand well inside the model's tick (moving to the next one if it is too close)."""
        now = time.time() - self.base
        current = int(now // TICK_S)
        if now - current * TICK_S < MARGIN_S * 0.3:
            time.sleep(MARGIN_S * 0.3)
        if (current + 1) * TICK_S - now < MARGIN_S:
            time.sleep((current + 1) * TICK_S - now + MARGIN_S * 0.3)
            current += 1
        self.model.tick = current

    def _still(self) -> None:
        """The call just made stayed inside the tick its answer was modelled at."""
        assert int((time.time() - self.base) // TICK_S) == self.model.tick, "tick too short"

    def _expiry(self, ticks: int) -> datetime:
        return datetime.fromtimestamp(self.base + (self.model.tick + ticks) * TICK_S, UTC)

    async def _write_all(self) -> None:
        """Persist every accepted claim (stepping only while the streams hold some: an idle
        step blocks for the server's timer tick)."""
        for _ in range(100):
            if not await backlog(self.redis):
                return
            await self.writer.step()
        raise AssertionError("the writer did not drain")

    # -- rules ---------------------------------------------------------------------------

    @rule()
    def tick(self) -> None:
        self._safe()
        target = (self.model.tick + 1) * TICK_S + MARGIN_S * 0.3
        time.sleep(max(target - (time.time() - self.base), 0))
        self._safe()

    @rule(user=st.sampled_from(USERS), amount=st.integers(1, 3), ticks=st.sampled_from([1, 2, 0]))
    def give(self, user: str, amount: int, ticks: int) -> None:
        self._safe()
        ref = f"g{len(self.model.adjustments)}"
        expires = self._expiry(ticks) if ticks else None
        for attempt in range(2):  # the call, then its retry
            done = self.run(
                points_ledger.adjust(
                    self.pool, self.redis, user, Adjustment(amount, "gift", ref, expires)
                )
            )
            assert done.replayed == bool(attempt)
        self._still()
        self.model.adjustments[ref] = (user, amount)
        self.model.add_lot(
            user, f"adjust:{ref}", amount, self.model.tick + ticks if ticks else None
        )

    @rule(user=st.sampled_from(USERS), amount=st.integers(1, 4))
    def take_back(self, user: str, amount: int) -> None:
        self._safe()
        ref = f"t{len(self.model.adjustments)}"
        short = self.model.spendable(user) < amount
        for attempt in range(2):
            try:
                done = self.run(
                    points_ledger.adjust(
                        self.pool, self.redis, user, Adjustment(-amount, "correction", ref, None)
                    )
                )
            except points_mirror.InsufficientPoints as exc:
                assert short and exc.balance == self.model.spendable(user)
                continue
            assert not short and done.replayed == bool(attempt)
        self._still()
        self.model.adjustments[ref] = (user, -amount)
        if not short:
            self.model.take(user, amount)

    @rule()
    def credit_month(self) -> None:
        period = periods.current_period(self.app_settings.tz)
        for attempt in range(2):
            report = self.run(
                points_credit.credit_period(self.pool, self.redis, period, self.app_settings.tz)
            )
            fresh = not self.model.credited and not attempt
            assert report.credited == (len(USERS) if fresh else 0)
        if not self.model.credited:
            self.model.credited = True
            for user in USERS:
                self.model.add_lot(user, f"credit:{period}:{user}", 1, FAR)

    @rule(target=claims, user=st.sampled_from(USERS), option=st.sampled_from(sorted(PRICES)))
    def claim(self, user: str, option: str) -> Any:
        self._safe()
        self.requests += 1
        request = ClaimRequest("lounge", user, f"q{self.requests}", option)
        first = self.run(self.engine.claim(request))
        again = self.run(self.engine.claim(request))  # a retry
        self._still()
        price = PRICES[option]
        if self.model.spendable(user) < price:
            assert first.code == again.code == "points"
            assert (first.balance, first.price) == (self.model.spendable(user), price)
            return None
        assert (first.code, again.code, again.claim_id) == ("ok", "dup", first.claim_id)
        assert first.claim_id
        taken = self.model.take(user, price)
        record = MClaim(first.claim_id, user, request.request_id, option, taken)
        self.claimed[first.claim_id] = record
        return record

    @rule(record=consumes(claims), later=st.booleans())
    def refund_claim(self, record: MClaim | None, later: bool) -> None:
        if record is None:
            return
        self.run(self._write_all())
        if later:  # perhaps after the lots it took from expired
            self.tick()
        self._safe()

        async def fail_and_refund() -> list[bool]:
            async with self.pool.acquire() as conn:
                await transition(conn, record.claim_id, FAILED, "test", expect=("accepted",))
            return [await refund(self.pool, self.redis, record.claim_id) for _ in range(2)]

        assert self.run(fail_and_refund()) == [True, False]
        self._still()
        record.refunded = True
        for key, amount in record.taken:
            lot = self.model.lot(record.user, key)
            if lot.spendable(self.model.tick):
                lot.remaining += amount

    @rule()
    def write(self) -> None:
        self.run(self._write_all())

    @rule()
    def expire(self) -> None:
        self.run(self._write_all())
        self._safe()
        for _ in range(2):
            self.run(points_ledger.expire_due(self.pool, self.redis))
        self._still()
        self.model.write_off()

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def ledger_matches_the_model(self) -> None:
        self.run(self._write_all())
        self._safe()
        rows = self.run(self._ledger())
        self._still()
        balances, lots, debits, refunds, mirror, now_ms = rows
        for user in USERS:
            assert balances.get(user, 0) == self.model.balance(user) >= 0
            for lot in self.model.lots[user]:
                assert lots[lot.key] == lot.remaining, (user, lot)
            redis_lots = parse_lots(mirror.get(user))
            spendable = sum(x.remaining for x in redis_lots if x.spendable(now_ms))
            assert spendable == self.model.spendable(user), user
        claimed = {c for c, r in self.claimed.items()}
        assert set(debits) == claimed
        for claim_id, record in self.claimed.items():
            assert sorted(debits[claim_id]) == sorted(record.taken), "not first expiring first"
            if record.refunded:
                assert sorted(refunds[claim_id]) == sorted(
                    (key, amount) for key, amount in debits[claim_id]
                )
            else:
                assert claim_id not in refunds
        assert self.run(points_mirror.points_drift(self.pool, self.redis)) == []

    async def _ledger(self) -> tuple[Any, ...]:
        balances = {
            r["user_id"]: int(r["sum"])
            for r in await self.pool.fetch(
                "SELECT user_id, sum(amount) FROM points_entries GROUP BY user_id"
            )
        }
        lots = {
            r["reference"]: int(r["remaining"])
            for r in await self.pool.fetch(
                """SELECT e.reference, sum(a.amount) AS remaining
                   FROM points_lots l JOIN points_entries e ON e.entry_id = l.lot_id
                   JOIN points_allocations a ON a.lot_id = l.lot_id GROUP BY e.reference"""
            )
        }
        moves: dict[str, dict[str, list[tuple[str, int]]]] = {"debit": {}, "refund": {}}
        for r in await self.pool.fetch(
            """SELECT e.kind, e.claim_id, lot.reference, a.amount,
                      (SELECT count(*) FROM claims c WHERE c.claim_id = e.claim_id) AS claims
               FROM points_entries e JOIN points_allocations a USING (entry_id)
               JOIN points_entries lot ON lot.entry_id = a.lot_id
               WHERE e.kind IN ('debit', 'refund')"""
        ):
            assert r["claims"] == 1, "a debit or refund without exactly one claim"
            sign = -1 if r["kind"] == "debit" else 1
            moves[r["kind"]].setdefault(r["claim_id"], []).append(
                (r["reference"], sign * r["amount"])
            )
        mirror = {text(k): text(v) for k, v in (await self.redis.hgetall(POINTS_KEY)).items()}
        return (
            balances,
            lots,
            moves["debit"],
            moves["refund"],
            mirror,
            (await points_mirror.redis_ms(self.redis)),
        )


def test_the_points_ledger_follows_the_model(settings: Settings) -> None:
    class Machine(PointsMachine):
        app_settings = settings

    run_state_machine_as_test(Machine, settings=RUN)
