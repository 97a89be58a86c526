"""Sharded stock (``"shards": K``): a benefit's stock split over K buckets on K hash slots,
members routed to a bucket by their id, dry buckets borrowing from the others. Each test runs
against one Valkey and, as ``[cluster]``, against a local Valkey Cluster (where the buckets
land on every primary)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import datetime
from typing import Any, cast

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.shards import bucket_of, share
from claim_service.store import catalogue_store
from claim_service.store.connections import is_cluster
from claim_service.store.keyspace import BenefitKeys, bucket_keys, text
from claim_service.store.reconcile import Reconciler
from tests.helpers import admin, auth, benefit_body, direct, drain, fast
from tests.integration import test_draws

Client = TestClient[Any, Any]
SHARDS = 8


async def open_sharded(
    client: Client, settings: Settings, benefit_id: str, stock: int, members: dict[str, int]
) -> str:
    body = {
        **benefit_body(stock=stock, options=[direct("iqiyi")]),
        "shards": SHARDS,
    }
    resp = await client.put(f"/admin/v1/benefits/{benefit_id}", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["shards"] == SHARDS
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": u, "tier": t} for u, t in members.items()]
    resp = await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))
    assert resp.status == 200
    return period


async def bucket_counters(redis: Redis, benefit_id: str, period: str) -> list[dict[str, int]]:
    return [
        {text(k): int(v) for k, v in (await redis.hgetall(keys.stock(period))).items()}
        for keys in bucket_keys(benefit_id, SHARDS)
    ]


def left_of(counters: dict[str, int], base: int) -> int:
    return base + counters.get("added", 0) + counters.get("moved", 0) - counters.get("taken", 0)


async def test_a_burst_of_ten_times_the_stock_takes_it_exactly_without_false_sold_out(
    backend_client: Client, backend_settings: Settings, backend_redis: Redis, pool: asyncpg.Pool
) -> None:
    """K = 8 buckets, stock 400, 4,000 claims from up to 3,000 members (quota 1 or 2): accepted is
    exactly the stock, no member over quota, and every ``sold_out`` came after the last
    acceptance (by the servers' clock: stock only shrinks here, so a ``sold_out`` answered
    while any bucket held a unit would precede some acceptance). The buckets' counters
    account for every unit: each bucket empty, every loan credited to its receiver."""
    client, settings, redis = backend_client, backend_settings, backend_redis
    stock = 400
    members = {f"m{i}": 8 if i % 4 == 0 else 4 for i in range(3000)}
    period = await open_sharded(client, settings, "hot", stock, members)
    buckets = bucket_keys("hot", SHARDS)
    if is_cluster(redis):
        cluster = cast(RedisCluster, redis)
        nodes = {str(cluster.get_node_from_key(k.stream)) for k in buckets}
        assert len(nodes) == 3, "the buckets are spread over the three primaries"
    # Skew on purpose: most demand lands on two buckets, which must borrow the rest.
    hot = [u for u in members if bucket_of(u, SHARDS) in (0, 1)]
    cold = [u for u in members if bucket_of(u, SHARDS) not in (0, 1)]
    plan = [(u, a) for u in hot for a in range(2)] + [(u, 0) for u in hot]
    plan += [(u, 0) for u in cold[: 4000 - len(plan)]]
    answers: list[tuple[str, int, dict[str, Any], float]] = []
    gate = asyncio.Semaphore(200)

    async def claim(user: str, attempt: int) -> None:
        async with gate:
            resp = await client.post(
                "/v1/benefits/hot/claims",
                headers=auth(settings, user),
                json={"request_id": f"{user}-{attempt}", "option_id": "iqiyi"},
            )
            body = await resp.json()
            answers.append((user, resp.status, body, time.time() * 1000))

    await asyncio.gather(*(claim(u, a) for u, a in plan))
    assert len(answers) == len(plan) >= 10 * stock
    statuses = Counter(status for _, status, _, _ in answers)
    assert set(statuses) <= {200, 202, 409, 410}, statuses
    accepted = {body["claim_id"]: user for user, status, body, _ in answers if status == 202}
    assert len(accepted) == stock, statuses
    per_member = Counter(accepted.values())
    for user, count in per_member.items():
        assert count <= (2 if members[user] >= 8 else 1)
    created = [
        datetime.fromisoformat(body["created_at"]).timestamp() * 1000
        for _, status, body, _ in answers
        if status == 202
    ]
    sold_out = [at for _, status, body, at in answers if status == 410]
    assert sold_out, "demand was ten times the stock"
    assert all(body["error"] == "sold_out" for _, s, body, _ in answers if s == 410)
    # created_at is the deciding server's clock in ms (truncated); the answers' times ours
    assert max(created) <= min(sold_out) + 1, "a sold_out was answered before a unit went"

    counters = await bucket_counters(redis, "hot", period)
    for number, mine in enumerate(counters):
        assert left_of(mine, share(stock, SHARDS, number)) == 0, (number, mine)
        for other, theirs in enumerate(counters):
            if other != number:
                assert mine.get(f"in:{other}", 0) == theirs.get(f"out:{number}", 0)
    assert sum(c.get("taken", 0) for c in counters) == stock
    assert any(c.get("moved", 0) > 0 for c in counters), "the hot buckets borrowed"
    # Each bucket took exactly its own members' claims; PostgreSQL gets each once.
    writer = ClaimWriter(redis, pool, fast(settings), consumer="w1")
    await drain(writer)
    rows = await pool.fetch("SELECT claim_id, user_id FROM claims WHERE benefit_id = 'hot'")
    assert {r["claim_id"]: r["user_id"] for r in rows} == accepted
    by_bucket = Counter(bucket_of(r["user_id"], SHARDS) for r in rows)
    assert [by_bucket[n] for n in range(SHARDS)] == [c.get("taken", 0) for c in counters]
    resp = await client.get("/admin/v1/benefits/hot", headers=admin(settings))
    assert (await resp.json())["stock"]["taken"] == stock


async def test_the_last_unit_is_reachable_from_every_bucket(
    backend_client: Client, backend_settings: Settings, backend_redis: Redis
) -> None:
    """Stock 3 over 8 buckets (five start empty): members of empty buckets still get the
    three units, one by one, and only then does anyone hear sold_out."""
    client, settings = backend_client, backend_settings
    members = {f"n{i}": 4 for i in range(64)}
    await open_sharded(client, settings, "rare", 3, members)
    by_bucket: dict[int, list[str]] = {}
    for user in members:
        by_bucket.setdefault(bucket_of(user, SHARDS), []).append(user)
    empty = [by_bucket[n][0] for n in range(3, SHARDS) if n in by_bucket]
    assert len(empty) >= 3
    for user in empty[:3]:
        resp = await client.post(
            "/v1/benefits/rare/claims",
            headers=auth(settings, user),
            json={"request_id": "r1", "option_id": "iqiyi"},
        )
        assert resp.status == 202, await resp.text()
    for user in members:
        if user in empty[:3]:
            continue
        resp = await client.post(
            "/v1/benefits/rare/claims",
            headers=auth(settings, user),
            json={"request_id": "r1", "option_id": "iqiyi"},
        )
        assert resp.status == 410
        assert (await resp.json())["error"] == "sold_out"


async def test_a_bucket_lost_with_its_server_is_rebuilt_from_postgres_and_its_peers(
    backend_client: Client, backend_settings: Settings, backend_redis: Redis, pool: asyncpg.Pool
) -> None:
    """One bucket's keys vanish (its server restarted empty, say): its members' next claims
    rebuild it from PostgreSQL and the other buckets (loans included), their quota holds, and
    the benefit still sells exactly its stock."""
    client, settings, redis = backend_client, backend_settings, backend_redis
    stock = 40
    members = {f"k{i}": 4 for i in range(200)}
    period = await open_sharded(client, settings, "lost", stock, members)
    users = list(members)

    async def claim(user: str) -> int:
        resp = await client.post(
            "/v1/benefits/lost/claims",
            headers=auth(settings, user),
            json={"request_id": f"{user}-x", "option_id": "iqiyi"},
        )
        return resp.status

    first = [await claim(u) for u in users[:30]]
    assert first.count(202) == 30
    writer = ClaimWriter(redis, pool, fast(settings), consumer="w1")
    await drain(writer)
    victim = bucket_of(users[0], SHARDS)
    keys = bucket_keys("lost", SHARDS)[victim]
    await redis.delete(keys.live, keys.stock(period), keys.used(period), keys.idempotency(period))
    # Its members already served are still refused a second unit (quota 1) ...
    again = await client.post(
        "/v1/benefits/lost/claims",
        headers=auth(settings, users[0]),
        json={"request_id": "another", "option_id": "iqiyi"},
    )
    assert again.status == 409, await again.text()
    # ... a retry gets its claim back, and the rest of the stock goes, exactly.
    assert await claim(users[0]) == 200
    rest = await asyncio.gather(*(claim(u) for u in users[30:]))
    assert rest.count(202) == stock - 30
    await drain(writer)
    assert await pool.fetchval("SELECT count(*) FROM claims WHERE benefit_id = 'lost'") == stock
    counters = await bucket_counters(redis, "lost", period)
    assert sum(left_of(c, share(stock, SHARDS, n)) for n, c in enumerate(counters)) == 0


@pytest.mark.parametrize(
    "extra",
    [
        "draw",
        {"price_points": 10},
        {"waiting_room": {"prequeue_minutes": 10, "admit_per_s": 100}},
        {"options": [direct("iqiyi", stock_cap=5)]},
        {"options": [{"option_id": "c", "kind": "card_key"}]},
    ],
    ids=["draw", "points", "room", "cap", "card_key"],
)
async def test_what_a_sharded_benefit_cannot_have_is_refused(
    client: Client, settings: Settings, extra: dict[str, Any] | str
) -> None:
    if extra == "draw":
        body = {**test_draws.draw_body(closes_in_s=3600), "shards": 4}
    else:
        assert isinstance(extra, dict)
        body = {**benefit_body(stock=10, options=[direct("iqiyi")]), "shards": 4, **extra}
    resp = await client.put("/admin/v1/benefits/bad", json=body, headers=admin(settings))
    assert resp.status == 422, await resp.text()
    assert (await resp.json())["field"] == "shards"


async def test_shards_cannot_change_once_the_benefit_exists(
    client: Client, settings: Settings
) -> None:
    body = {**benefit_body(stock=10, options=[direct("iqiyi")]), "shards": 4}
    assert (
        await client.put("/admin/v1/benefits/s", json=body, headers=admin(settings))
    ).status == 201
    for shards in (2, 1):
        resp = await client.put(
            "/admin/v1/benefits/s", json={**body, "shards": shards}, headers=admin(settings)
        )
        assert resp.status == 409, await resp.text()
        assert (await resp.json())["error"] == "shards_fixed"
    body["name"] = "renamed"
    assert (
        await client.put("/admin/v1/benefits/s", json=body, headers=admin(settings))
    ).status == 200


def test_buckets_sit_on_distinct_slots_and_shares_add_up() -> None:
    for benefit_id in ("video", "hot", "a", "x" * 64):
        for shards in (2, 8, 64):
            keys = bucket_keys(benefit_id, shards)
            tags = [BenefitKeys(benefit_id).tag, *(k.tag for k in keys)]
            assert len({key_slot(tag.encode()) for tag in tags}) == shards + 1
            assert [k.benefit_id.split("#")[0] for k in keys] == [benefit_id] * shards
            for total in (0, 1, 7, 400, 80_000):
                parts = [share(total, shards, n) for n in range(shards)]
                assert sum(parts) == total and max(parts) - min(parts) <= 1


async def test_views_and_reconcile_add_up_the_buckets(
    backend_client: Client, backend_settings: Settings, backend_redis: Redis, pool: asyncpg.Pool
) -> None:
    """A claim's answer and the member's catalogue show the benefit's stock left, the
    catalogue their own quota use (kept in their bucket); reconcile compares each bucket with
    its members' claims: none drift after a release with borrowing, a bucket's counter
    changed behind its back does."""
    client, settings, redis = backend_client, backend_settings, backend_redis
    stock = 20
    members = {f"v{i}": 4 for i in range(60)}
    period = await open_sharded(client, settings, "seen", stock, members)
    users = list(members)
    lefts = []
    for user in users[:12]:
        resp = await client.post(
            "/v1/benefits/seen/claims",
            headers=auth(settings, user),
            json={"request_id": "r", "option_id": "iqiyi"},
        )
        assert resp.status == 202
        lefts.append((await resp.json())["stock_left"])
    # An answer's stock_left is the benefit's, not the bucket's (one worker saw every claim)
    assert lefts == list(range(stock - 1, stock - 13, -1))
    resp = await client.post(
        "/admin/v1/benefits/seen/stock", json={"amount": 5}, headers=admin(settings)
    )
    assert resp.status in (200, 201), await resp.text()
    listing = await (await client.get("/v1/benefits", headers=auth(settings, users[0]))).json()
    (view,) = [b for b in listing["benefits"] if b["benefit_id"] == "seen"]
    assert view["stock_left"] == stock + 5 - 12
    assert view["quota"] == {"used": 1, "allowed": 1}
    assert view["reason"] == "quota_exceeded"
    other = await (await client.get("/v1/benefits", headers=auth(settings, users[-1]))).json()
    assert [b["quota"]["used"] for b in other["benefits"] if b["benefit_id"] == "seen"] == [0]

    benefit = await catalogue_store.load_benefit(pool, settings.tz, "seen")
    reconciler = Reconciler(pool, redis, settings)
    check = await reconciler.check(benefit)
    assert check.live and check.drift == []
    for user in users[12:]:  # the rest, with borrowing between buckets
        await client.post(
            "/v1/benefits/seen/claims",
            headers=auth(settings, user),
            json={"request_id": "r", "option_id": "iqiyi"},
        )
    check = await reconciler.check(benefit)
    assert check.live and check.drift == []
    assert sum(c.get("taken", 0) for c in await bucket_counters(redis, "seen", period)) == 25
    victim = bucket_keys("seen", SHARDS)[bucket_of(users[0], SHARDS)]
    await redis.hincrby(victim.stock(period), "taken", -1)
    check = await reconciler.check(benefit)
    assert [d.kind for d in check.drift] == ["taken"]
    fixed = await reconciler.fix(benefit)
    assert fixed.drift == []
