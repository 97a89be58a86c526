"""Draws over HTTP: prizes drawn in the same atomic step as window, tier, quota and stock;
a sold-out prize is never drawn; the proof on the claim recomputes; the pity prize comes on
the N-th draw; results and the published draw."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from typing import Any

import asyncpg
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.draws import draw_value, pick
from claim_service.domain.lifecycle import FAILED
from claim_service.fulfilment.compensation import refund
from claim_service.http.app import ENGINE
from claim_service.store.claim_states import transition
from claim_service.store.draw_records import period_draws
from claim_service.store.draw_seeds import DrawSeeds
from claim_service.store.keyspace import BenefitKeys, text
from claim_service.store.reconcile import Reconciler
from claim_service.store.recovery import Recovery
from tests.helpers import Client, admin, auth, benefit_body, direct, drain, fast

PRIZES: list[dict[str, Any]] = [
    {"prize_id": "gold", "name": "Gold", "weight": 5, "stock": 1, "option_id": "gold"},
    {"prize_id": "silver", "name": "Silver", "weight": 20, "stock": 10, "option_id": "silver"},
    {"prize_id": "bronze", "name": "Bronze", "weight": 75, "stock": 100, "option_id": "bronze"},
    {"prize_id": "thanks", "name": "Thanks", "weight": 900, "option_id": "thanks"},
]


def draw_body(
    *, stock: int = 100_000, per_period: int = 1, draw_type: str = "blind_box", **draw: Any
) -> dict[str, Any]:
    body = benefit_body(
        stock=stock,
        min_tier=1,
        quota=[{"min_tier": 1, "per_period": per_period}],
        closes_in_s=3600,
        options=[direct(p["option_id"]) for p in draw.get("prizes", PRIZES)],
    )
    body["draw"] = {"type": draw_type, "prizes": PRIZES, **draw}
    return body


async def put_draw(client: Client, settings: Settings, members: int, **kwargs: Any) -> None:
    answer = await client.put(
        "/admin/v1/benefits/box", json=draw_body(**kwargs), headers=admin(settings)
    )
    assert answer.status == 201, await answer.text()
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": f"m{i}", "tier": 5} for i in range(members)]
    answer = await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))
    assert answer.status == 200, await answer.text()


async def test_draw_gives_a_prize_with_a_proof_that_recomputes(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await put_draw(client, settings, 3)
    published = await client.get("/v1/benefits/box/draw", headers=auth(settings, "m0"))
    assert published.status == 200, await published.text()
    draw = await published.json()
    assert draw["seed"] is None and len(draw["commitment"]) == 64
    assert [p["probability"] for p in draw["prizes"]] == [0.005, 0.02, 0.075, 0.9]
    answer = await client.post(
        "/v1/benefits/box/claims", json={"request_id": "r1"}, headers=auth(settings, "m0")
    )
    assert answer.status == 202, await answer.text()
    body = await answer.json()
    got = body["draw"]
    assert got["value"] == draw_value(await seed_of(pool, settings), "m0", "r1", 0)
    weights = [(w["prize_id"], w["weight"]) for w in got["weights"]]
    assert weights == [(p["prize_id"], p["weight"]) for p in PRIZES]
    assert got["prize_id"] == pick(got["value"], weights)
    assert body["option_id"] == got["prize_id"]
    again = await client.post(
        "/v1/benefits/box/claims", json={"request_id": "r1"}, headers=auth(settings, "m0")
    )
    assert again.status == 200
    assert (await again.json())["draw"]["prize_id"] == got["prize_id"]
    for reader in ("pending", "persisted"):
        if reader == "persisted":
            await drain(ClaimWriter(redis, pool, fast(settings), consumer="t"))
        shown = await client.get(f"/v1/claims/{body['claim_id']}", headers=auth(settings, "m0"))
        assert shown.status == 200, await shown.text()
        proof = (await shown.json())["draw"]["proof"]
        assert proof["value"] == got["value"] and proof["prize_id"] == got["prize_id"], reader
        assert proof["commitment"] == draw["commitment"] and proof["seed"] is None
        assert proof["message"] == "m0:r1:0"


async def seed_of(pool: asyncpg.Pool, settings: Settings, period: str | None = None) -> bytes:
    return await DrawSeeds(pool, settings.codes_key).seed(
        "box", period or periods.current_period(settings.tz)
    )


async def test_commitment_is_sha256_of_the_seed(
    client: Client, settings: Settings, pool: asyncpg.Pool
) -> None:
    await put_draw(client, settings, 1)
    draw = await (await client.get("/v1/benefits/box/draw", headers=auth(settings, "m0"))).json()
    assert hashlib.sha256(await seed_of(pool, settings)).hexdigest() == draw["commitment"]


STOCKS: dict[str, int | None] = {p["prize_id"]: p.get("stock") for p in PRIZES}


async def test_thousands_of_concurrent_draws_never_exceed_a_prize_or_draw_a_sold_out_one(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    """1,000 members with a quota of 2 fire 3 draws each at once (3,000 draws, one of them a
    retry of another): every prize within its stock, every member within quota, the retry
    answered with the same prize, and, replayed in order from the records, no draw ever had a
    sold-out prize among its candidates nor left out one still in stock."""
    members, quota = 1000, 2
    await put_draw(client, settings, members, per_period=quota)

    async def one(i: int, n: int) -> tuple[str, str, int, dict[str, Any]]:
        request_id = f"r{min(n, 1)}"  # the third repeats the second
        answer = await client.post(
            "/v1/benefits/box/claims",
            json={"request_id": request_id},
            headers=auth(settings, f"m{i}"),
        )
        return f"m{i}", request_id, answer.status, await answer.json()

    answers = await asyncio.gather(*(one(i, n) for n in range(3) for i in range(members)))
    assert Counter(status for _, _, status, _ in answers) == {202: 2 * members, 200: members}
    by_request: dict[tuple[str, str], set[str]] = {}
    for user, request_id, _, body in answers:
        by_request.setdefault((user, request_id), set()).add(body["draw"]["prize_id"])
    assert all(len(prizes) == 1 for prizes in by_request.values())  # a retry: the same prize
    won = Counter(next(iter(p)) for p in by_request.values())
    for prize_id, stock in STOCKS.items():
        assert stock is None or won[prize_id] <= stock, (prize_id, won)
    assert won["gold"] == 1 and won["silver"] == 10  # 2,000 draws empty the small stocks
    period = periods.current_period(settings.tz)
    keys = BenefitKeys("box")
    counters = {text(k): int(v) for k, v in (await redis.hgetall(keys.stock(period))).items()}
    assert {p: counters.get(f"prize:{p}", 0) for p in STOCKS} == {p: won[p] for p in STOCKS}
    used = {text(k): int(v) for k, v in (await redis.hgetall(keys.used(period))).items()}
    assert set(used.values()) == {quota}

    await drain(ClaimWriter(redis, pool, fast(settings), consumer="t"))
    records = await period_draws(pool, "box", period)
    assert len(records) == 2 * members
    taken: Counter[str] = Counter()
    for record in records:  # in the order claim.lua drew them
        in_force = {prize_id for prize_id, _ in record.record.weights}
        for prize_id, stock in STOCKS.items():
            in_stock = stock is None or taken[prize_id] < stock
            assert (prize_id in in_force) == in_stock, (record.seq, prize_id, taken)
        assert record.record.prize_id == pick(record.value, record.record.weights)
        taken[record.record.prize_id or ""] += 1
    results = await client.get(
        f"/v1/benefits/box/draw/results?period={period}", headers=auth(settings, "m0")
    )
    body = await results.json()
    assert {p["prize_id"]: p["drawn"] for p in body["prizes"]} == {p: won[p] for p in STOCKS}
    assert body["draws"] == 2 * members and not body["final"]
    assert "user_id" not in str(body)


async def test_pity_gives_a_listed_prize_on_the_nth_draw_without_one(
    client: Client, settings: Settings
) -> None:
    """Pity after 3 on silver: whatever the first two draws gave, a member never goes three
    draws in a row without silver (nor bronze: both are listed)."""
    await put_draw(
        client,
        settings,
        20,
        per_period=12,
        pity={"after": 3, "prize_ids": ["silver", "bronze"]},
    )
    owed_seen = 0
    for member in range(20):
        streak = 0
        for n in range(12):
            answer = await client.post(
                "/v1/benefits/box/claims",
                json={"request_id": f"r{n}"},
                headers=auth(settings, f"m{member}"),
            )
            assert answer.status == 202, await answer.text()
            draw = (await answer.json())["draw"]
            if streak + 1 >= 3 and draw["owed_pity"]:
                owed_seen += 1
                assert {w["prize_id"] for w in draw["weights"]} <= {"silver", "bronze"}
            if draw["prize_id"] in ("silver", "bronze"):
                streak = 0
            else:
                streak += 1
            assert streak < 3, (member, n)
    assert owed_seen > 0  # thanks (90%) keeps the pity rule busy


async def test_recovery_rebuilds_prize_counters_and_pity_streaks(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await put_draw(client, settings, 30, per_period=5, pity={"after": 4, "prize_ids": ["silver"]})
    for n in range(5):
        await asyncio.gather(
            *(
                client.post(
                    "/v1/benefits/box/claims",
                    json={"request_id": f"r{n}"},
                    headers=auth(settings, f"m{i}"),
                )
                for i in range(30)
            )
        )
    period = periods.current_period(settings.tz)
    keys = BenefitKeys("box")
    # Half persisted, half still in the stream.
    writer = ClaimWriter(redis, pool, fast(settings), consumer="t")
    await writer.step()
    before = await redis.hgetall(keys.stock(period)), await redis.hgetall(keys.pity(period))
    assert before[1]
    await Recovery(pool, redis, settings).ensure_benefit("box", force=True)
    after = await redis.hgetall(keys.stock(period)), await redis.hgetall(keys.pity(period))
    assert after == before


async def test_draw_records_are_immutable(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await put_draw(client, settings, 1)
    answer = await client.post(
        "/v1/benefits/box/claims", json={"request_id": "r"}, headers=auth(settings, "m0")
    )
    assert answer.status == 202
    await drain(ClaimWriter(redis, pool, fast(settings), consumer="t"))
    for statement in (
        "UPDATE draws SET prize_id = 'gold'",
        "DELETE FROM draws",
        "UPDATE draw_seeds SET commitment = 'x'",
        "DELETE FROM draw_seeds",
    ):
        try:
            await pool.execute(statement)
        except asyncpg.RaiseError as exc:
            assert "draw records" in str(exc) or "draw seeds" in str(exc)
        else:
            raise AssertionError(f"{statement} was allowed")
    assert await pool.fetchval("SELECT count(*) FROM draws") == 1
    assert await pool.fetchval("SELECT count(*) FROM draw_seeds") == 2  # this period, next


async def test_a_priced_draw_takes_points_and_a_card_key_prize_runs_out_with_its_codes(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    """A draw costing 2 points: a member with 5 points draws twice, then 402. A card-key
    prize with 2 codes (and no stock of its own) is drawn at most twice, then never again."""
    prizes = [
        {"prize_id": "code", "name": "Card", "weight": 1_000_000, "option_id": "card"},
        {"prize_id": "thanks", "name": "Thanks", "weight": 1, "option_id": "thanks"},
    ]
    body = draw_body(per_period=5, prizes=prizes)
    body["options"] = [{"option_id": "card", "kind": "card_key"}, direct("thanks")]
    body["price_points"] = 2
    answer = await client.put("/admin/v1/benefits/box", json=body, headers=admin(settings))
    assert answer.status == 201, await answer.text()
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": f"m{i}", "tier": 5} for i in range(4)]
    await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))
    codes = [{"code": f"CODE-{i}"} for i in range(2)]
    answer = await client.post(
        "/admin/v1/benefits/box/options/card/codes", json=codes, headers=admin(settings)
    )
    assert answer.status == 200, await answer.text()
    for i in range(4):
        answer = await client.post(
            f"/admin/v1/points/m{i}/adjust",
            json={"amount": 5, "reason": "test", "reference": f"give-m{i}"},
            headers=admin(settings),
        )
        assert answer.status == 201, await answer.text()
    won = []
    for i in range(4):
        for n in range(3):
            answer = await client.post(
                "/v1/benefits/box/claims",
                json={"request_id": f"r{n}"},
                headers=auth(settings, f"m{i}"),
            )
            body = await answer.json()
            if n < 2:
                assert answer.status == 202, body
                won.append(body["draw"]["prize_id"])
            else:
                assert answer.status == 402 and body["price"] == 2 and body["balance"] == 1
                # Nothing tells which prize this request would have drawn.
                assert body.get("option_id") in (None, "") and "draw" not in body
    assert won[:2] == ["code", "code"] and set(won[2:]) == {"thanks"}
    draw = await (await client.get("/v1/benefits/box/draw", headers=auth(settings, "m0"))).json()
    card = next(p for p in draw["prizes"] if p["prize_id"] == "code")
    assert not card["in_stock"] and card["probability"] == 0.0 and card["taken"] == 2


async def test_a_refunded_draw_gives_its_prize_back_once(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    prizes = [{"prize_id": "only", "name": "Only", "weight": 1, "stock": 1, "option_id": "o"}]
    body = draw_body(prizes=prizes)
    body["options"] = [direct("o")]
    answer = await client.put("/admin/v1/benefits/box", json=body, headers=admin(settings))
    assert answer.status == 201, await answer.text()
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": f"m{i}", "tier": 5} for i in range(3)]
    await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))

    async def draw(user: str) -> tuple[int, Any]:
        answer = await client.post(
            "/v1/benefits/box/claims", json={"request_id": "r"}, headers=auth(settings, user)
        )
        return answer.status, await answer.json()

    status, first = await draw("m0")
    assert status == 202 and first["draw"]["prize_id"] == "only"
    status, body = await draw("m1")
    assert status == 410 and body["error"] == "sold_out"  # its only prize is gone
    await drain(ClaimWriter(redis, pool, fast(settings), consumer="t"))
    async with pool.acquire() as conn, conn.transaction():
        await transition(conn, first["claim_id"], FAILED, "test", expect=("accepted",))
    assert await refund(pool, redis, first["claim_id"])
    assert not await refund(pool, redis, first["claim_id"])
    keys = BenefitKeys("box")
    assert (await redis.hget(keys.stock(period), "prize:only")) == b"0"
    status, body = await draw("m2")
    assert status == 202 and body["draw"]["prize_id"] == "only"
    await drain(ClaimWriter(redis, pool, fast(settings), consumer="t"))
    benefit = await client.app[ENGINE].benefit("box")
    check = await Reconciler(pool, redis, settings).check(benefit)
    assert check.drift == []
    results = await (
        await client.get(
            f"/v1/benefits/box/draw/results?period={period}", headers=auth(settings, "m0")
        )
    ).json()
    assert results["prizes"] == [{"prize_id": "only", "name": "Only", "drawn": 2, "refunded": 1}]
