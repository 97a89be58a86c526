"""Random interleavings of claims, retries, batches, top-ups, pauses, windows and tier loads.

The real ``ClaimEngine`` and ``claim.lua`` run against the real Valkey server; every decision
is checked against a plain-Python model of the rules below, and after every step the Redis
state is checked against the invariants that matter: never more claims than stock, never
more than a member's quota, one stream entry per accepted claim.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar

import asyncpg
from hypothesis import HealthCheck
from hypothesis import settings as run_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimDecision, ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import Benefit, parse_benefit
from claim_service.store import catalogue_store, tiers
from claim_service.store.connections import create_pg_pool, create_redis
from claim_service.store.keyspace import BenefitKeys, text
from claim_service.store.recovery import Recovery, is_live
from tests.helpers import TABLES

T = TypeVar("T")

BENEFIT_ID = "video"
KEYS = BenefitKeys(BENEFIT_ID)
# Ids that are prefixes of one another: "ann" + "ax" and "anna" + "x", "7" + "71" and "77" + "1",
# "7" + "7x" and "77" + "x" would collide if the idempotency field were a bare concatenation.
USERS = ("ann", "anna", "bo", "7", "77")
REQUEST_IDS = ("x", "ax", "1", "71", "7x")
CAPPED, UNCAPPED = "capped", "open"
OPTIONS = (CAPPED, UNCAPPED)
# Release windows as (opens, closes) in seconds from now.
WINDOWS: dict[str, tuple[int, int | None]] = {
    "open": (-60, None),
    "open_until": (-60, 3600),
    "not_open": (3600, None),
    "closed": (-120, -60),
}
MAX_TIER = 9

users = st.sampled_from(USERS)
request_ids = st.sampled_from(REQUEST_IDS)
options = st.sampled_from(OPTIONS)
member_tiers = st.integers(0, MAX_TIER)
# {min_tier: per_period}; steps may start below the benefit's min_tier and may allow 0.
quota_steps = st.dictionaries(st.integers(0, MAX_TIER), st.integers(0, 3), min_size=1, max_size=3)

RUN = run_settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CLUSTER_EXAMPLES = int(os.environ.get("CLAIM_CLUSTER_EXAMPLES", "15"))


@dataclass(frozen=True)
class Accepted:
    """A claim the model knows was accepted, as first reported by the engine."""

    claim_id: str
    option_id: str
    tier: int
    created_at: datetime | None


@dataclass
class Model:
    """The claim rules in plain Python, applied one request at a time."""

    min_tier: int
    quota: dict[int, int]
    stock: int
    cap: int
    paused: bool = False
    window: str = "open"
    added: int = 0
    tiers: dict[str, int] = field(default_factory=dict)
    claims: dict[tuple[str, str], Accepted] = field(default_factory=dict)
    used: Counter[str] = field(default_factory=Counter)
    taken: Counter[str] = field(default_factory=Counter)

    @property
    def left(self) -> int:
        return self.stock + self.added - len(self.claims)

    def allowed(self, tier: int) -> int:
        if tier < self.min_tier:
            return 0
        steps = [per for low, per in sorted(self.quota.items()) if tier >= low]
        return steps[-1] if steps else 0

    def option_cap(self, option_id: str) -> int | None:
        return self.cap if option_id == CAPPED else None

    def rule(self, user_id: str, option_id: str) -> tuple[str, int, int]:
        """(code, tier, used) for a request that is not a replay."""
        if self.paused:
            return "paused", 0, 0
        if self.window == "not_open":
            return "not_open", 0, 0
        if self.window == "closed":
            return "closed", 0, 0
        tier = self.tiers.get(user_id, 0)
        if option_id not in OPTIONS:
            return "unknown_option", tier, 0
        if tier < self.min_tier:
            return "tier", tier, 0
        used = self.used[user_id]
        if used >= self.allowed(tier):
            return "quota", tier, used
        if self.left <= 0:
            return "sold_out", tier, 0
        cap = self.option_cap(option_id)
        if cap is not None and self.taken[option_id] >= cap:
            return "option_sold_out", tier, 0
        return "ok", tier, 0

    def check(self, request: ClaimRequest, got: ClaimDecision) -> None:
        """Compare one decision with the rules, then record it if it took a unit."""
        assert request.option_id is not None
        key = (request.user_id, request.request_id)
        prior = self.claims.get(key)
        seen = {
            "code": got.code,
            "claim_id": got.claim_id,
            "option_id": got.option_id,
            "tier": got.tier,
            "used": got.used,
            "created_at": got.created_at,
        }
        if prior is not None:
            # A replay returns the original claim, whatever option the retry asked for.
            expected: dict[str, Any] = {
                "code": "dup",
                "claim_id": prior.claim_id,
                "option_id": prior.option_id,
                "tier": prior.tier,
                "used": 0,
                "created_at": prior.created_at,
            }
            assert seen == expected, request
        else:
            code, tier, used = self.rule(request.user_id, request.option_id)
            expected = {"code": code, "option_id": request.option_id, "tier": tier, "used": used}
            assert {k: seen[k] for k in expected} == expected, request
            if code == "ok":
                assert got.claim_id is not None and len(got.claim_id) == 32, got
                assert got.created_at is not None, got
                known = {c.claim_id for c in self.claims.values()}
                assert got.claim_id not in known, f"claim id {got.claim_id} handed out twice"
                self.claims[key] = Accepted(got.claim_id, got.option_id, tier, got.created_at)
                self.used[request.user_id] += 1
                self.taken[request.option_id] += 1
            else:
                assert got.claim_id is None and got.created_at is None, got
        assert got.stock_left == max(self.left, 0), (request, got)
        assert got.quota == self.allowed(got.tier), (request, got)
        assert got.benefit_id == BENEFIT_ID


class ClaimMachine(RuleBasedStateMachine):
    """Drives one benefit with two options, one of them capped, through random operations."""

    app_settings: ClassVar[Settings]
    accepted = Bundle("accepted")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis, self.pool = self.run(self._connect())
        self.engine = ClaimEngine(self.redis, self.app_settings, pool=self.pool)
        # The gate answers some claims without Redis once it has learned it may: it must
        # agree with the model as claim.lua does.
        self.stop_gate = asyncio.Event()
        self.gate = self.loop.create_task(self.engine.gate.run(self.stop_gate))
        self.tz = self.app_settings.tz
        self.period = periods.current_period(self.tz)
        self.model = Model(min_tier=0, quota={0: 1}, stock=0, cap=0)

    def run(self, step: Awaitable[T]) -> T:
        return self.loop.run_until_complete(step)

    async def _connect(self) -> tuple[Redis, asyncpg.Pool]:
        assert self.app_settings.redis_url and self.app_settings.database_url
        redis = await create_redis(self.app_settings.redis_url)
        pool = await create_pg_pool(self.app_settings.database_url, max_size=2)
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

    async def _save_benefit(self) -> Benefit:
        """Save the model's benefit to PostgreSQL and push it, as the admin API does."""
        m = self.model
        opens_in, closes_in = WINDOWS[m.window]
        now = datetime.now(self.tz)
        release: dict[str, Any] = {
            "type": "once",
            "opens_at": (now + timedelta(seconds=opens_in)).isoformat(),
        }
        if closes_in is not None:
            release["closes_at"] = (now + timedelta(seconds=closes_in)).isoformat()
        body = {
            "min_tier": m.min_tier,
            "quota": [{"min_tier": t, "per_period": q} for t, q in sorted(m.quota.items())],
            "stock_per_period": m.stock,
            "release": release,
            "paused": m.paused,
            # Direct-charge options: card-key options also need codes, a rule not modelled here.
            "options": [
                {
                    "option_id": CAPPED,
                    "kind": "direct_charge",
                    "partner": "p",
                    "sku": "s",
                    "stock_cap": m.cap,
                },
                {"option_id": UNCAPPED, "kind": "direct_charge", "partner": "p", "sku": "s"},
            ],
        }
        saved = await catalogue_store.save_benefit(
            self.pool, parse_benefit(BENEFIT_ID, body, self.tz)
        )
        assert await catalogue_store.push_benefit(self.redis, saved)
        return saved

    # -- set-up ---------------------------------------------------------------------------

    @initialize(
        stock=st.integers(0, 6),
        min_tier=st.integers(0, 3),
        quota=quota_steps,
        cap=st.integers(0, 3),
        first_tiers=st.lists(member_tiers, min_size=len(USERS), max_size=len(USERS)),
    )
    def create_benefit(
        self,
        stock: int,
        min_tier: int,
        quota: dict[int, int],
        cap: int,
        first_tiers: list[int],
    ) -> None:
        self.model = Model(min_tier=min_tier, quota=quota, stock=stock, cap=cap)
        self.run(self._save_benefit())
        # Warm the engine's cache so no claim awaits Redis before joining its batch; later
        # config changes leave it stale on purpose (the engine must retry on "stale").
        assert self.run(self.engine.benefit(BENEFIT_ID)) is not None
        self.load_tiers(dict(zip(USERS, first_tiers, strict=True)))

    # -- claims ---------------------------------------------------------------------------

    def _claim(self, user_id: str, request_id: str, option_id: str) -> MultipleResults[Any]:
        request = ClaimRequest(BENEFIT_ID, user_id, request_id, option_id)
        decision = self.run(self.engine.claim(request))
        self.model.check(request, decision)
        return multiple((user_id, request_id)) if decision.code == "ok" else multiple()

    @rule(target=accepted, user_id=users, request_id=request_ids, option_id=options)
    def claim(self, user_id: str, request_id: str, option_id: str) -> MultipleResults[Any]:
        return self._claim(user_id, request_id, option_id)

    @rule(earlier=accepted, option_id=options)
    def retry_accepted(self, earlier: tuple[str, str], option_id: str) -> None:
        """A replay, in whatever state the benefit and the member are in now."""
        self._claim(*earlier, option_id)

    @rule(
        target=accepted,
        items=st.lists(
            # Mostly the capped option, so that a cap is often reached inside one batch.
            st.tuples(users, request_ids, st.sampled_from([CAPPED, CAPPED, UNCAPPED])),
            min_size=2,
            max_size=8,
        ),
    )
    def claim_batch(self, items: list[tuple[str, str, str]]) -> MultipleResults[Any]:
        """Concurrent claims, which the engine decides in one Lua call, in submission order."""
        batch = [ClaimRequest(BENEFIT_ID, u, r, o) for u, r, o in items]

        async def submit() -> list[ClaimDecision]:
            return await asyncio.gather(*(self.engine.claim(req) for req in batch))

        calls, decided = self.engine.batches, self.engine.batched_claims
        local = self.engine.local_answers
        decisions = self.run(submit())
        calls = self.engine.batches - calls
        sent = len(batch) - (self.engine.local_answers - local)
        # One Lua call per attempt (a "stale" reply makes the engine retry the whole batch)
        # for the claims the gate did not answer.
        assert (calls >= 1 or sent == 0) and self.engine.batched_claims - decided == calls * sent
        # The gate answers when a claim is submitted, before the batch is decided: those
        # answers come first, then the batch's in submission order.
        pairs = list(zip(batch, decisions, strict=True))
        for request, decision in sorted(pairs, key=lambda pair: not pair[1].local):
            self.model.check(request, decision)
        return multiple(
            *(
                (r.user_id, r.request_id)
                for r, d in zip(batch, decisions, strict=True)
                if d.code == "ok"
            )
        )

    @rule(user_id=users, request_id=request_ids)
    def claim_unknown_option(self, user_id: str, request_id: str) -> None:
        """Refused with unknown_option, unless it retries an accepted request."""
        request = ClaimRequest(BENEFIT_ID, user_id, request_id, "no-such-option")
        self.model.check(request, self.run(self.engine.claim(request)))

    # -- operations -----------------------------------------------------------------------

    @rule(amount=st.integers(1, 3))
    def top_up(self, amount: int) -> None:
        total = self.run(
            catalogue_store.add_stock(self.pool, self.redis, BENEFIT_ID, self.period, amount, None)
        )
        self.model.added += amount
        assert total == self.model.added

    # Weighted towards resuming and open windows, so that most steps can take units.
    @rule(paused=st.sampled_from([False, False, True]))
    def pause_or_resume(self, paused: bool) -> None:
        benefit = self.run(
            catalogue_store.set_paused(self.pool, self.redis, self.tz, BENEFIT_ID, paused)
        )
        assert benefit.paused is paused
        self.model.paused = paused

    @rule(window=st.sampled_from(["open", "open_until", "open", "not_open", "closed"]))
    def move_window(self, window: str) -> None:
        self.model.window = window
        self.run(self._save_benefit())

    @rule()
    def recover(self) -> None:
        """An operator's ``warm``: the counters are rebuilt from the stream and PostgreSQL."""
        recovery = Recovery(self.pool, self.redis, self.app_settings)
        assert self.run(recovery.ensure_benefit(BENEFIT_ID, force=True))

    @rule()
    def redis_forgets_the_counters(self) -> None:
        """Redis went back in time (a stale copy): counters and marker gone, the stream kept.
        The next claim must find the benefit unverified and rebuild it before deciding."""
        keys = [
            KEYS.stock(self.period),
            KEYS.used(self.period),
            KEYS.idempotency(self.period),
            KEYS.live,
        ]
        self.run(self.redis.delete(*keys))

    @rule(rows=st.dictionaries(users, member_tiers, min_size=1, max_size=3))
    def load_tiers(self, rows: dict[str, int]) -> None:
        self.run(tiers.save_tiers(self.pool, self.redis, self.period, sorted(rows.items())))
        self.model.tiers.update(rows)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def redis_holds_exactly_the_accepted_claims(self) -> None:
        m = self.model
        entries = self.run(self.redis.xrange(KEYS.stream)) or []
        stream = [{text(k): text(v) for k, v in (fields or {}).items()} for _, fields in entries]
        # Exactly-once hand-off: one stream entry (and one pending marker) per claim.
        assert len(stream) == len(m.claims)
        assert len({e["c"] for e in stream}) == len(stream), "claim id appended twice"
        assert self.run(self.redis.hlen(KEYS.pending)) == len(m.claims)
        by_request = {(e["u"], e["r"]): (e["c"], e["o"], int(e["t"])) for e in stream}
        assert by_request == {k: (c.claim_id, c.option_id, c.tier) for k, c in m.claims.items()}

        # Never more than stock, never more than an option's cap.
        per_option = Counter(e["o"] for e in stream)
        assert len(stream) <= m.stock + m.added
        assert per_option[CAPPED] <= m.cap
        # Never more than the quota of the tier the member had at each acceptance.
        count: Counter[str] = Counter()
        for entry in stream:
            count[entry["u"]] += 1
            tier = int(entry["t"])
            assert tier >= m.min_tier, entry
            assert count[entry["u"]] <= m.allowed(tier), (entry, count)

        if not self.run(is_live(self.redis, KEYS.live)):
            return  # forgotten: no claim is decided until recovery rebuilt the counters
        counters = self.run(self.redis.hgetall(KEYS.stock(self.period)))
        stock = {text(k): int(v) for k, v in counters.items() if int(v)}
        expected = {f"taken:{o}": n for o, n in per_option.items()}
        if stream:
            expected["taken"] = expected["accepted"] = len(stream)
        if m.added:
            expected["added"] = m.added
        assert stock == expected
        used = self.run(self.redis.hgetall(KEYS.used(self.period)))
        assert {text(k): int(v) for k, v in used.items() if int(v)} == {
            u: n for u, n in m.used.items() if n
        }


def test_claims_follow_the_rules(backend: str, backend_settings: Settings) -> None:
    """On a cluster with fewer examples (``CLAIM_CLUSTER_EXAMPLES``, default 15): the rules are
    the same, what the cluster adds is where the keys live."""

    class Machine(ClaimMachine):
        app_settings = backend_settings

    examples = CLUSTER_EXAMPLES if backend == "cluster" else RUN.max_examples
    run_state_machine_as_test(Machine, settings=run_settings(RUN, max_examples=examples))
