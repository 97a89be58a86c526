"""Random interleavings of draws and of bundles against plain-Python models.

The real ``ClaimEngine``, ``claim.lua``, writer, compensation (``refund.lua``) and recovery
run against the real Valkey and PostgreSQL servers; the engine's gate runs too, and the
refusals it answers without Redis must agree with the models as ``claim.lua``'s do.

**Draws.** A draw benefit with small prize stocks (1, 2, 5, one prize that never runs out,
one at weight 0 that is never drawn) and a pity rule. Members draw, retry earlier requests,
draw in concurrent batches (one Lua call, decided in the order submitted), the writer
persists some claims, a persisted claim fails and is refunded, Redis's counters are rebuilt
(forced recovery, sometimes after wrecking them). The model predicts exactly the prize of
every draw from the revealed-later seed (``draws.draw_value``), the candidates in stock in
published order, the pity rule (``draws.PityCounter``) and ``draws.pick``; after every step
Redis's prize counters, quota use and pity streaks equal the model's.

**Bundles.** A ``choose: 3`` benefit whose options have caps 1, 2, 4 and none. Members claim
1..3 distinct options (all or none: refused naming the first chosen option at its cap),
retry, claim in batches, the writer persists some, one option of a bundle fails and is
refunded (its option's unit back once; the bundle's unit of stock and the member's quota
with the last of its options), Redis's counters are rebuilt. After every step ``taken``,
``taken:<option>``, ``accepted`` and ``used`` equal the model's.

``CLAIM_DRAW_EXAMPLES`` and ``CLAIM_DRAW_STEPS`` set the budget of each machine.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, ClassVar, TypeVar

import asyncpg
from hypothesis import HealthCheck, event
from hypothesis import settings as run_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimDecision, ClaimRequest, DrawResult
from claim_service.claims.engine import ClaimEngine, bundle_item_id
from claim_service.claims.writer import ClaimWriter, backlog
from claim_service.config import Settings
from claim_service.domain.catalogue import Benefit, parse_benefit
from claim_service.domain.draws import Draw, PityCounter, candidates, draw_value, pick
from claim_service.domain.lifecycle import FAILED
from claim_service.fulfilment.compensation import refund
from claim_service.store import catalogue_store
from claim_service.store.claim_states import transition
from claim_service.store.connections import create_pg_pool, create_redis
from claim_service.store.draw_seeds import DrawSeeds
from claim_service.store.keyspace import BenefitKeys, text
from claim_service.store.recovery import Recovery
from tests.helpers import TABLES, benefit_body, direct

T = TypeVar("T")

EXAMPLES = int(os.environ.get("CLAIM_DRAW_EXAMPLES", "30"))
STEPS = int(os.environ.get("CLAIM_DRAW_STEPS", "40"))

RUN = run_settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

USERS = ("ann", "bo", "cy", "dee", "eve")
users = st.sampled_from(USERS)
picks = st.integers(0, 255)  # an index into a list that grows (taken modulo its length)


def nonzero(raw: dict[Any, Any]) -> dict[str, int]:
    return {text(k): int(v) for k, v in raw.items() if int(v)}


# -- the servers, shared by both machines ----------------------------------------------------


class ServersMachine(RuleBasedStateMachine):
    """Connections, the engine, a writer persisting a few entries at a time, and the steps
    both machines take the same way: persist, fail and refund a claim, rebuild Redis."""

    app_settings: ClassVar[Settings]
    BENEFIT_ID: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis, self.pool = self.run(self._connect())
        self.engine = ClaimEngine(self.redis, self.app_settings, pool=self.pool)
        # The gate answers some claims without Redis once it has learned it may (sold out,
        # an option of a bundle at its cap): it must agree with the model as claim.lua does.
        self.stop_gate = asyncio.Event()
        self.gate = self.loop.create_task(self.engine.gate.run(self.stop_gate))
        # Two entries per round, so that "persist some" leaves the rest in the stream.
        self.writer = ClaimWriter(
            self.redis,
            self.pool,
            replace(self.app_settings, writer_block_ms=2, writer_batch=2),
            consumer="properties",
        )
        self.keys = BenefitKeys(self.BENEFIT_ID)
        self.period = ""
        self.benefit: Benefit | None = None

    def run(self, step: Awaitable[T]) -> T:
        return self.loop.run_until_complete(step)

    async def _connect(self) -> tuple[Redis, asyncpg.Pool]:
        settings = self.app_settings
        assert settings.redis_url and settings.database_url
        redis = await create_redis(settings.redis_url)
        pool = await create_pg_pool(settings.database_url, max_size=4)
        await redis.flushall()
        await pool.execute(f"TRUNCATE {TABLES} CASCADE")
        return redis, pool

    def teardown(self) -> None:
        async def close() -> None:
            self.stop_gate.set()
            await self.gate
            await self.engine.drain()
            await self.redis.aclose()
            await self.pool.close()

        try:
            self.run(close())
        finally:
            self.loop.close()

    async def _save(self, body: dict[str, Any]) -> Benefit:
        benefit = parse_benefit(self.BENEFIT_ID, body, self.app_settings.tz)
        saved = await catalogue_store.save_benefit(self.pool, benefit)
        assert await catalogue_store.push_benefit(self.redis, saved)
        # Warm the engine's cache: no claim of a batch awaits Redis before joining it.
        cached = await self.engine.benefit(self.BENEFIT_ID)
        assert cached is not None and cached.version == saved.version
        self.benefit = saved
        self.period = self.engine.current_period(saved)
        return saved

    def _decide(self, requests: Sequence[ClaimRequest]) -> list[tuple[ClaimRequest, ClaimDecision]]:
        """Submit ``requests`` concurrently: the engine decides them in one Lua call, in the
        order submitted. Returns (request, decision) in the order they were decided: the
        gate's answers (given when a claim is submitted) first, then the batch's."""

        async def submit() -> list[ClaimDecision]:
            return list(await asyncio.gather(*(self.engine.claim(r) for r in requests)))

        calls, decided = self.engine.batches, self.engine.batched_claims
        local = self.engine.local_answers
        decisions = self.run(submit())
        calls = self.engine.batches - calls
        sent = len(requests) - (self.engine.local_answers - local)
        # One Lua call per attempt (an "unverified" or "stale" reply retries the whole batch)
        # for the claims the gate did not answer.
        assert (calls >= 1 or sent == 0) and self.engine.batched_claims - decided == calls * sent
        pairs = list(zip(requests, decisions, strict=True))
        for _, decision in pairs:
            event(f"{decision.code} from {'the gate' if decision.local else 'claim.lua'}")
        return sorted(pairs, key=lambda pair: not pair[1].local)

    # -- the writer ------------------------------------------------------------------------

    async def _write_some(self) -> int:
        # Only while the streams hold some: an idle round blocks for the server's timer tick.
        # (The writer's first round re-reads its own backlog, which is empty.)
        for _ in range(3):
            if not await backlog(self.redis):
                return 0
            handled = await self.writer.step()
            if handled:
                return handled
        return 0

    async def _write_all(self) -> None:
        for _ in range(200):
            if not await backlog(self.redis):
                return
            await self.writer.step()
        raise AssertionError("the writer did not drain")

    @rule(everything=st.booleans())
    def persist(self, everything: bool) -> None:
        """The writer persists a round of entries (two at most), or all of them."""
        self.run(self._write_all() if everything else self._write_some())

    # -- compensation and recovery ---------------------------------------------------------

    def _fail_and_refund(self, claim_id: str) -> None:
        """Fail one claim (persisting it first if it is still in the stream) and refund it
        twice: the first call returns its units, the second nothing."""

        async def go() -> list[bool]:
            if not await self.pool.fetchval(
                "SELECT count(*) FROM claims WHERE claim_id = $1", claim_id
            ):
                await self._write_all()
            async with self.pool.acquire() as conn, conn.transaction():
                was = await transition(conn, claim_id, FAILED, "test", expect=("accepted",))
            assert was == "accepted", (claim_id, was)
            return [await refund(self.pool, self.redis, claim_id) for _ in range(2)]

        assert self.run(go()) == [True, False], claim_id

    @rule(wreck=st.booleans())
    def rebuild_redis(self, wreck: bool) -> None:
        """Recovery rebuilds the counters from PostgreSQL and the stream (after wrecking
        them, or as they are)."""

        async def go() -> None:
            if wreck:
                k, p = self.keys, self.period
                await self.redis.delete(k.used(p), k.idempotency(p), k.pity(p), k.refunded(p))
                await self.redis.hset(
                    k.stock(p), mapping={"taken": 99, "accepted": 1, "prize:gold": 7, "taken:a": 5}
                )
            recovery = Recovery(self.pool, self.redis, self.app_settings)
            assert await recovery.ensure_benefit(self.BENEFIT_ID, force=True)

        self.run(go())

    # -- shared invariant ------------------------------------------------------------------

    def _stored_claims(self) -> tuple[dict[str, str], set[str]]:
        """(claim_id -> status) of the persisted rows, and the claim ids still in the
        stream."""

        async def read() -> tuple[dict[str, str], set[str]]:
            rows = await self.pool.fetch(
                "SELECT claim_id, status FROM claims WHERE benefit_id = $1", self.BENEFIT_ID
            )
            entries = await self.redis.xrange(self.keys.stream) or []
            return (
                {r["claim_id"]: r["status"] for r in rows},
                {text((f or {})[b"c"]) for _, f in entries},
            )

        return self.run(read())

    def _counters(self) -> tuple[dict[str, int], dict[str, int], dict[str, int], set[str]]:
        """The period's stock hash, quota use, pity streaks (without zeros) and refunded ids."""

        async def read() -> tuple[dict[str, int], dict[str, int], dict[str, int], set[str]]:
            k, p = self.keys, self.period
            return (
                nonzero(await self.redis.hgetall(k.stock(p))),
                nonzero(await self.redis.hgetall(k.used(p))),
                nonzero(await self.redis.hgetall(k.pity(p))),
                {text(m) for m in await self.redis.smembers(k.refunded(p))},
            )

        return self.run(read())


# -- 1. draws --------------------------------------------------------------------------------

DRAW_ID = "box"
DRAW_QUOTA = 4
# Published order; "ghost" has weight 0: never a candidate, never drawn, whatever its stock.
PRIZE_STOCKS: dict[str, int | None] = {
    "gold": 1,
    "ghost": 3,
    "silver": 2,
    "bronze": 5,
    "thanks": None,
}
PITY_SETS = (("gold",), ("silver", "bronze"), ("gold", "silver"), ("bronze",), ("ghost", "gold"))


@dataclass
class Drawn:
    claim_id: str
    prize_id: str
    option_id: str
    created_at: datetime | None
    refunded: bool = False


@dataclass
class DrawModel:
    draw: Draw
    stock: int
    seed: bytes
    claims: dict[tuple[str, str], Drawn] = field(default_factory=dict)
    live: Counter[str] = field(default_factory=Counter)  # prize -> units held
    used: Counter[str] = field(default_factory=Counter)
    pity: dict[str, PityCounter] = field(default_factory=dict)
    accepted: int = 0

    @property
    def taken(self) -> int:
        return sum(1 for c in self.claims.values() if not c.refunded)

    @property
    def left(self) -> int:
        return self.stock - self.taken

    def prize_left(self) -> dict[str, int | None]:
        return {
            p.prize_id: None if p.stock is None else p.stock - self.live[p.prize_id]
            for p in self.draw.prizes
        }

    def counter(self, user: str) -> PityCounter:
        return self.pity.setdefault(user, PityCounter(self.draw.pity))

    def check(self, request: ClaimRequest, got: ClaimDecision) -> None:
        """Compare one decision with the rules, then record what it took."""
        user, key = request.user_id, (request.user_id, request.request_id)
        assert got.benefit_id == DRAW_ID and got.quota == DRAW_QUOTA and got.tier == 0, got
        prior = self.claims.get(key)
        if prior is not None:  # a replay: the same claim and prize, nothing taken
            seen = (got.code, got.claim_id, got.option_id, got.options, got.created_at)
            assert seen == (
                "dup",
                prior.claim_id,
                prior.option_id,
                (prior.option_id,),
                prior.created_at,
            ), (request, got)
            assert got.draw == DrawResult(prior.prize_id), (request, got)
            assert got.stock_left == max(self.left, 0), (request, got)
            return
        used = self.used[user]
        code, prize, expected_draw = "ok", None, None
        if used >= DRAW_QUOTA:
            code = "quota"
        elif self.left <= 0:
            code = "sold_out"
        else:
            left = self.prize_left()
            counter = self.counter(user)
            in_stock = candidates(self.draw, left)
            weighted = candidates(self.draw, left, owed_pity=counter.owed)
            if not weighted:
                code = "sold_out"
            else:
                value = draw_value(self.seed, user, request.request_id, 0)
                prize = pick(value, weighted)
                assert prize is not None
                pity_ids = self.draw.pity.prize_ids if self.draw.pity else ()
                owed = counter.owed and any(p in pity_ids for p, _ in in_stock)
                counter.record(prize)
                expected_draw = DrawResult(
                    prize, 0, value, tuple(weighted), owed, counter.streak, self.accepted + 1
                )
        event(f"draw: {code}" + (" (owed pity)" if expected_draw and expected_draw.owed else ""))
        if code != "ok":
            assert (got.code, got.claim_id, got.created_at, got.draw) == (code, None, None, None), (
                request,
                got,
            )
            assert got.used == (used if code == "quota" else 0), (request, got)
            assert got.stock_left == max(self.left, 0), (request, got)
            return
        assert prize is not None
        option_id = self.option_of(prize)
        assert got.code == "ok", (request, got, expected_draw)
        assert got.draw == expected_draw, (request, got)
        assert (got.option_id, got.options) == (option_id, (option_id,)), (request, got)
        assert got.claim_id is not None and len(got.claim_id) == 32, got
        assert got.created_at is not None, got
        assert got.claim_id not in {c.claim_id for c in self.claims.values()}, "id given twice"
        assert got.stock_left == self.left - 1, (request, got)
        self.claims[key] = Drawn(got.claim_id, prize, option_id, got.created_at)
        self.live[prize] += 1
        self.used[user] += 1
        self.accepted += 1

    def option_of(self, prize_id: str) -> str:
        found = self.draw.prize(prize_id)
        assert found is not None
        return found.option_id

    def refund(self, key: tuple[str, str]) -> None:
        drawn = self.claims[key]
        assert not drawn.refunded
        drawn.refunded = True
        self.live[drawn.prize_id] -= 1
        self.used[key[0]] -= 1  # the pity streak is left as it is


class DrawMachine(ServersMachine):
    BENEFIT_ID = DRAW_ID

    def __init__(self) -> None:
        super().__init__()
        self.model: DrawModel | None = None
        self.requests: list[tuple[str, str]] = []
        self.counter = 0

    @property
    def m(self) -> DrawModel:
        assert self.model is not None
        return self.model

    def _new_request(self, user: str) -> ClaimRequest:
        self.counter += 1
        return ClaimRequest(DRAW_ID, user, f"q{self.counter}")

    def _run_draws(self, requests: list[ClaimRequest]) -> None:
        for request, decision in self._decide(requests):
            self.m.check(request, decision)
            if (request.user_id, request.request_id) not in self.requests:
                self.requests.append((request.user_id, request.request_id))

    @initialize(
        stock=st.integers(4, 14),
        gold=st.integers(1, 10),
        silver=st.integers(1, 20),
        bronze=st.integers(1, 30),
        thanks=st.sampled_from([0, 10, 60]),
        after=st.sampled_from([3, 3, 2]),
        pity_ids=st.sampled_from(PITY_SETS),
    )
    def create_draw(
        self,
        stock: int,
        gold: int,
        silver: int,
        bronze: int,
        thanks: int,
        after: int,
        pity_ids: tuple[str, ...],
    ) -> None:
        weights = {"gold": gold, "ghost": 0, "silver": silver, "bronze": bronze, "thanks": thanks}
        body = benefit_body(
            stock=stock,
            min_tier=0,
            quota=[{"min_tier": 0, "per_period": DRAW_QUOTA}],
            closes_in_s=3600,
            options=[direct(f"o-{p}") for p in PRIZE_STOCKS],
        )
        body["draw"] = {
            "type": "blind_box",
            "prizes": [
                {"prize_id": p, "weight": weights[p], "stock": s, "option_id": f"o-{p}"}
                for p, s in PRIZE_STOCKS.items()
            ],
            "pity": {"after": after, "prize_ids": list(pity_ids)},
        }
        saved = self.run(self._save(body))
        assert saved.draw is not None
        seed = self.run(
            DrawSeeds(self.pool, self.app_settings.codes_key).seed(DRAW_ID, self.period)
        )
        self.model = DrawModel(saved.draw, stock, seed)

    # -- draws -----------------------------------------------------------------------------

    @rule(user=users)
    def draw(self, user: str) -> None:
        self._run_draws([self._new_request(user)])

    @precondition(lambda self: self.requests)
    @rule(index=picks)
    def retry(self, index: int) -> None:
        """A retry of an earlier request: the same claim and prize when it was taken."""
        user, request_id = self.requests[index % len(self.requests)]
        self._run_draws([ClaimRequest(DRAW_ID, user, request_id)])

    @rule(
        items=st.lists(st.tuples(users, st.booleans(), picks), min_size=2, max_size=6),
    )
    def draw_batch(self, items: list[tuple[str, bool, int]]) -> None:
        """Concurrent draws (some retrying earlier requests, or one earlier in the batch),
        decided in one Lua call in the order submitted."""
        batch: list[ClaimRequest] = []
        for user, again, index in items:
            earlier = self.requests + [(r.user_id, r.request_id) for r in batch]
            if again and earlier:
                u, r = earlier[index % len(earlier)]
                batch.append(ClaimRequest(DRAW_ID, u, r))
            else:
                batch.append(self._new_request(user))
        self._run_draws(batch)

    def _held(self) -> list[tuple[str, str]]:
        return [k for k, c in self.m.claims.items() if not c.refunded]

    @precondition(lambda self: self.model is not None and self._held())
    @rule(index=picks)
    def fail_and_refund(self, index: int) -> None:
        held = self._held()
        key = held[index % len(held)]
        self._fail_and_refund(self.m.claims[key].claim_id)
        self.m.refund(key)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def redis_counters_match_the_model(self) -> None:
        if self.model is None:
            return
        m = self.m
        stock, used, pity, refunded = self._counters()
        expected: dict[str, int] = {"taken": m.taken, "accepted": m.accepted}
        for prize_id, n in m.live.items():
            expected[f"prize:{prize_id}"] = n
            expected[f"taken:{m.option_of(prize_id)}"] = n
        assert stock == {k: v for k, v in expected.items() if v}, (stock, expected)
        prizes = {k.removeprefix("prize:"): v for k, v in stock.items() if k.startswith("prize:")}
        assert sum(prizes.values()) == stock.get("taken", 0)
        for prize_id, n in prizes.items():
            limit = PRIZE_STOCKS[prize_id]
            assert limit is None or n <= limit, (prize_id, n)
        assert "ghost" not in prizes
        assert all(n <= DRAW_QUOTA for n in used.values()), used
        assert used == {u: n for u, n in m.used.items() if n}
        assert pity == {u: c.streak for u, c in m.pity.items() if c.streak}
        assert refunded == {c.claim_id for c in m.claims.values() if c.refunded}

    @invariant()
    def every_draw_is_persisted_or_in_the_stream(self) -> None:
        if self.model is None:
            return
        rows, streamed = self._stored_claims()
        claims = {c.claim_id: c for c in self.m.claims.values()}
        assert set(rows) | streamed == set(claims)
        for claim_id, status in rows.items():
            assert status == ("refunded" if claims[claim_id].refunded else "accepted")


def test_draws_follow_the_model(settings: Settings) -> None:
    class Machine(DrawMachine):
        app_settings = settings

    run_state_machine_as_test(Machine, settings=RUN)


# -- 2. bundles ------------------------------------------------------------------------------

BUNDLE_ID = "combo"
BUNDLE_QUOTA = 2
CAPS: dict[str, int | None] = {"a": 1, "b": 2, "c": 4, "d": None}
choices = st.lists(st.sampled_from(sorted(CAPS)), min_size=1, max_size=3, unique=True)


@dataclass
class Combo:
    claim_id: str
    options: tuple[str, ...]
    created_at: datetime | None
    refunded: set[int] = field(default_factory=set)  # indexes of the options refunded

    @property
    def held(self) -> bool:
        return len(self.refunded) < len(self.options)


@dataclass
class BundleModel:
    stock: int
    claims: dict[tuple[str, str], Combo] = field(default_factory=dict)
    used: Counter[str] = field(default_factory=Counter)
    options: Counter[str] = field(default_factory=Counter)  # option -> units held
    accepted: int = 0

    @property
    def taken(self) -> int:
        return sum(1 for c in self.claims.values() if c.held)

    @property
    def left(self) -> int:
        return self.stock - self.taken

    def check(self, request: ClaimRequest, got: ClaimDecision) -> None:
        user, key = request.user_id, (request.user_id, request.request_id)
        chosen = request.option_ids
        assert got.benefit_id == BUNDLE_ID and got.quota == BUNDLE_QUOTA and got.tier == 0, got
        assert got.draw is None
        prior = self.claims.get(key)
        if prior is not None:  # a replay: the original bundle, whatever this one chose
            seen = (got.code, got.claim_id, got.option_id, got.options, got.created_at)
            assert seen == (
                "dup",
                prior.claim_id,
                prior.options[0],
                prior.options,
                prior.created_at,
            ), (request, got)
            assert got.stock_left == max(self.left, 0), (request, got)
            return
        used = self.used[user]
        code, named = "ok", chosen[0]
        if used >= BUNDLE_QUOTA:
            code = "quota"
        elif self.left <= 0:
            code = "sold_out"
        else:
            for option_id in chosen:
                cap = CAPS[option_id]
                if cap is not None and self.options[option_id] >= cap:
                    code, named = "option_sold_out", option_id
                    break
        event(f"bundle: {code}")
        assert got.code == code, (request, got)
        if code in ("ok", "option_sold_out"):
            # The option taken first, or the first chosen option at its cap. (For quota and
            # sold_out no option is named to the member: claim.lua's path says the first
            # chosen, the gate's all of them joined.)
            assert got.option_id == named, (request, got)
        if code != "ok":
            assert (got.claim_id, got.created_at, got.options) == (None, None, ()), got
            assert got.used == (used if code == "quota" else 0), (request, got)
            assert got.stock_left == max(self.left, 0), (request, got)
            return
        assert got.options == chosen, (request, got)
        assert got.claim_id is not None and len(got.claim_id) == 32, got
        assert got.claim_id.endswith("00") and got.created_at is not None, got
        assert got.claim_id not in {c.claim_id for c in self.claims.values()}, "id given twice"
        assert got.stock_left == self.left - 1, (request, got)
        self.claims[key] = Combo(got.claim_id, chosen, got.created_at)
        self.used[user] += 1
        self.accepted += 1
        for option_id in chosen:
            self.options[option_id] += 1

    def refund(self, key: tuple[str, str], index: int) -> None:
        combo = self.claims[key]
        assert combo.held and index not in combo.refunded
        combo.refunded.add(index)
        self.options[combo.options[index]] -= 1
        if not combo.held:  # the last of its options: the unit and the quota come back
            self.used[key[0]] -= 1


class BundleMachine(ServersMachine):
    BENEFIT_ID = BUNDLE_ID

    def __init__(self) -> None:
        super().__init__()
        self.model: BundleModel | None = None
        self.requests: list[tuple[str, str]] = []
        self.counter = 0

    @property
    def m(self) -> BundleModel:
        assert self.model is not None
        return self.model

    def _new_request(self, user: str, chosen: list[str]) -> ClaimRequest:
        self.counter += 1
        return ClaimRequest(BUNDLE_ID, user, f"q{self.counter}", option_ids=tuple(chosen))

    def _run_claims(self, requests: list[ClaimRequest]) -> None:
        for request, decision in self._decide(requests):
            self.m.check(request, decision)
            if (request.user_id, request.request_id) not in self.requests:
                self.requests.append((request.user_id, request.request_id))

    @initialize(stock=st.integers(3, 8))
    def create_bundle(self, stock: int) -> None:
        options = [
            direct(o) if cap is None else direct(o, stock_cap=cap) for o, cap in CAPS.items()
        ]
        body = benefit_body(
            stock=stock,
            min_tier=0,
            quota=[{"min_tier": 0, "per_period": BUNDLE_QUOTA}],
            options=options,
        )
        body["choose"] = 3
        self.run(self._save(body))
        self.model = BundleModel(stock)

    @rule(user=users, chosen=choices)
    def claim(self, user: str, chosen: list[str]) -> None:
        self._run_claims([self._new_request(user, chosen)])

    @precondition(lambda self: self.requests)
    @rule(index=picks, chosen=choices)
    def retry(self, index: int, chosen: list[str]) -> None:
        """A retry of an earlier request (choosing anything: a replay returns the original)."""
        user, request_id = self.requests[index % len(self.requests)]
        self._run_claims([ClaimRequest(BUNDLE_ID, user, request_id, option_ids=tuple(chosen))])

    @rule(items=st.lists(st.tuples(users, choices, st.booleans(), picks), min_size=2, max_size=6))
    def claim_batch(self, items: list[tuple[str, list[str], bool, int]]) -> None:
        batch: list[ClaimRequest] = []
        for user, chosen, again, index in items:
            earlier = self.requests + [(r.user_id, r.request_id) for r in batch]
            if again and earlier:
                u, r = earlier[index % len(earlier)]
                batch.append(ClaimRequest(BUNDLE_ID, u, r, option_ids=tuple(chosen)))
            else:
                batch.append(self._new_request(user, chosen))
        self._run_claims(batch)

    def _refundable(self) -> list[tuple[tuple[str, str], int]]:
        return [
            (key, i)
            for key, combo in self.m.claims.items()
            for i in range(len(combo.options))
            if i not in combo.refunded
        ]

    @precondition(lambda self: self.model is not None and self._refundable())
    @rule(index=picks)
    def fail_and_refund_one_option(self, index: int) -> None:
        items = self._refundable()
        key, item = items[index % len(items)]
        self._fail_and_refund(bundle_item_id(self.m.claims[key].claim_id, item))
        self.m.refund(key, item)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def redis_counters_match_the_model(self) -> None:
        if self.model is None:
            return
        m = self.m
        stock, used, _pity, refunded = self._counters()
        expected = {"taken": m.taken, "accepted": m.accepted}
        expected |= {f"taken:{o}": n for o, n in m.options.items()}
        assert stock == {k: v for k, v in expected.items() if v}, (stock, expected)
        assert stock.get("taken", 0) <= m.stock
        for option_id, cap in CAPS.items():
            assert cap is None or stock.get(f"taken:{option_id}", 0) <= cap
        assert all(n <= BUNDLE_QUOTA for n in used.values()), used
        assert used == {u: n for u, n in m.used.items() if n}
        assert refunded == {
            bundle_item_id(c.claim_id, i) for c in m.claims.values() for i in c.refunded
        }

    @invariant()
    def every_option_is_persisted_or_in_the_stream(self) -> None:
        if self.model is None:
            return
        rows, streamed = self._stored_claims()
        items = {
            bundle_item_id(c.claim_id, i): i in c.refunded
            for c in self.m.claims.values()
            for i in range(len(c.options))
        }
        assert set(rows) | streamed == set(items)
        for claim_id, status in rows.items():
            assert status == ("refunded" if items[claim_id] else "accepted")


def test_bundles_follow_the_model(settings: Settings) -> None:
    class Machine(BundleMachine):
        app_settings = settings

    run_state_machine_as_test(Machine, settings=RUN)
