"""Multi-choice bundles over HTTP: a claim of ``option_ids`` takes every chosen option's cap
unit (and code) with one unit of stock and one of quota, all or none; each option is its own
claim row, refunded on its own, exactly once; recovery rebuilds the same counters."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from typing import Any

import asyncpg
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.lifecycle import FAILED
from claim_service.fulfilment.compensation import refund
from claim_service.http.app import ENGINE
from claim_service.store.claim_states import transition
from claim_service.store.keyspace import BenefitKeys, text
from claim_service.store.recovery import Recovery
from tests.helpers import (
    Client,
    admin,
    auth,
    benefit_body,
    direct,
    drain,
    fast,
    stream_claim_ids,
)

BENEFIT = "combo"
KEYS = BenefitKeys(BENEFIT)
Answer = tuple[int, dict[str, Any]]


# -- helpers -------------------------------------------------------------------------------


def bundle_body(
    *, stock: int, choose: int, options: list[dict[str, Any]], quota: Any
) -> dict[str, Any]:
    body = benefit_body(stock=stock, quota=quota, options=options)
    body["choose"] = choose
    return body


def capped(option_id: str, cap: int | None) -> dict[str, Any]:
    return direct(option_id) if cap is None else direct(option_id, stock_cap=cap)


async def put_benefit(client: Client, settings: Settings, body: dict[str, Any]) -> None:
    resp = await client.put(f"/admin/v1/benefits/{BENEFIT}", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()


async def put_tiers(client: Client, settings: Settings, tiers: dict[str, int]) -> str:
    period = periods.current_period(settings.tz)
    snapshot = [{"user_id": u, "tier": t} for u, t in tiers.items()]
    resp = await client.put(f"/admin/v1/tiers/{period}", json=snapshot, headers=admin(settings))
    assert resp.status == 200, await resp.text()
    return period


async def load_codes(client: Client, settings: Settings, option_id: str, n: int) -> None:
    codes = [{"code": f"{option_id.upper()}-{i:04d}-CODE", "secret": f"pin-{i}"} for i in range(n)]
    resp = await client.post(
        f"/admin/v1/benefits/{BENEFIT}/options/{option_id}/codes",
        json=codes,
        headers=admin(settings),
    )
    assert resp.status == 200, await resp.text()


async def claim(
    client: Client,
    settings: Settings,
    user: str,
    request_id: str,
    options: list[str] | None = None,
    **extra: Any,
) -> Answer:
    body: dict[str, Any] = {"request_id": request_id, **extra}
    if options is not None:
        body["option_ids"] = options
    resp = await client.post(
        f"/v1/benefits/{BENEFIT}/claims", json=body, headers=auth(settings, user)
    )
    return resp.status, await resp.json()


async def accept(
    client: Client, settings: Settings, user: str, rid: str, options: list[str]
) -> Any:
    status, body = await claim(client, settings, user, rid, options)
    assert status == 202, body
    return body


def item_id(claim_id: str, index: int) -> str:
    return claim_id if index == 0 else f"{claim_id[:30]}{index:02x}"


def items_of(claim_id: str, options: list[str]) -> list[dict[str, str]]:
    return [{"option_id": o, "claim_id": item_id(claim_id, i)} for i, o in enumerate(options)]


def nonzero(raw: dict[Any, Any]) -> dict[str, int]:
    return {text(k): int(v) for k, v in raw.items() if int(v)}


async def stock_of(redis: Redis, period: str) -> dict[str, int]:
    """The period's stock hash (taken, taken:<option_id>, accepted, ...) without zeros."""
    return nonzero(await redis.hgetall(KEYS.stock(period)))


async def used_of(redis: Redis, period: str) -> dict[str, int]:
    return nonzero(await redis.hgetall(KEYS.used(period)))


async def codes_of(redis: Redis) -> dict[str, int]:
    return nonzero(await redis.hgetall(KEYS.codes))


async def fail(pool: asyncpg.Pool, claim_id: str) -> None:
    async with pool.acquire() as conn:
        assert await transition(conn, claim_id, FAILED, "test", expect=("accepted",))


async def spendable_points(client: Client, settings: Settings, user: str) -> int:
    resp = await client.get("/v1/me/points", headers=auth(settings, user))
    assert resp.status == 200, await resp.text()
    return int((await resp.json())["available"])


async def bundle_view(client: Client, settings: Settings, user: str, claim_id: str) -> Any:
    resp = await client.get(f"/v1/claims/{claim_id}", headers=auth(settings, user))
    assert resp.status == 200, await resp.text()
    return (await resp.json())["bundle"]


# -- 1. concurrency ------------------------------------------------------------------------

CAPS: dict[str, int | None] = {"a": 5, "b": 15, "c": 30, "d": None, "e": None}
QUOTA = {5: 1, 8: 3}


async def test_concurrent_bundles_never_exceed_option_caps_stock_or_quota(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    stock, members = 80, 300
    quota = [{"min_tier": 4, "per_period": QUOTA[5]}, {"min_tier": 8, "per_period": QUOTA[8]}]
    options = [capped(o, cap) for o, cap in CAPS.items()]
    await put_benefit(
        client, settings, bundle_body(stock=stock, choose=3, options=options, quota=quota)
    )
    tiers = {f"m{i}": 8 if i % 4 == 0 else 5 for i in range(members)}
    await put_tiers(client, settings, tiers)

    rng = random.Random(20250610)
    requests: dict[tuple[str, str], list[str]] = {}
    for user, tier in tiers.items():
        for r in range(QUOTA[tier] + 1):  # one request more than the quota allows
            choices = list(CAPS) if rng.random() < 0.6 else ["c", "d", "e"]
            requests[(user, f"r{r}")] = rng.sample(choices, rng.choice((2, 3)))
    sends = list(requests) + [key for key in requests if rng.random() < 0.25]  # retries
    rng.shuffle(sends)
    answers = await asyncio.gather(
        *(claim(client, settings, u, rid, requests[(u, rid)]) for u, rid in sends)
    )

    by_request: dict[tuple[str, str], list[Answer]] = defaultdict(list)
    for key, answer in zip(sends, answers, strict=True):
        by_request[key].append(answer)
    statuses = Counter(status for status, _ in answers)
    assert set(statuses) <= {200, 202, 409, 410}, statuses

    accepted: dict[tuple[str, str], dict[str, Any]] = {}
    named_sold_out: list[tuple[list[str], str]] = []
    stock_sold_out = 0
    for key, got in by_request.items():
        chosen = requests[key]
        taken = [(s, b) for s, b in got if s in (200, 202)]
        refused = [(s, b) for s, b in got if s not in (200, 202)]
        if not taken:
            for status, body in refused:
                expected = {409: "quota_exceeded", 410: "sold_out"}[status]
                assert body["error"] == expected, body
                if status == 410 and "option_id" in body:
                    named_sold_out.append((chosen, body["option_id"]))
                elif status == 410:
                    stock_sold_out += 1
            continue
        # A request taken once is taken for every copy of it: the others replay it.
        assert not refused, (key, got)
        assert sorted(s for s, _ in taken) == [200] * (len(taken) - 1) + [202], (key, got)
        first = next(b for s, b in taken if s == 202)
        for _, body in taken:
            assert body["replayed"] is (body is not first)
            for field in ("claim_id", "option_id", "options", "items", "period"):
                assert body[field] == first[field], (key, field, body, first)
        assert first["claim_id"].endswith("00")
        assert first["option_id"] == chosen[0]
        assert first["options"] == chosen
        assert first["items"] == items_of(first["claim_id"], chosen)
        accepted[key] = first

    period = next(iter(accepted.values()))["period"]
    per_option = Counter(o for body in accepted.values() for o in body["options"])
    per_member = Counter(user for user, _ in accepted)
    # The limits were really reached: the burst sold the benefit out and every capped option.
    assert len(accepted) == stock
    assert all(per_option[o] == cap for o, cap in CAPS.items() if cap is not None), per_option
    assert statuses[409] > 0 and stock_sold_out > 0 and named_sold_out
    for option_id, cap in CAPS.items():
        if cap is not None:
            assert per_option[option_id] <= cap, (option_id, per_option)
    for user, held in per_member.items():
        assert held <= QUOTA[tiers[user]], (user, held)
    for chosen, named in named_sold_out:  # only an option at its cap is ever called sold out
        assert named in chosen and per_option[named] == CAPS[named], (chosen, named)

    # Redis agrees with the answers.
    counters = await stock_of(redis, period)
    assert counters.get("taken") == counters.get("accepted") == len(accepted) <= stock
    for option_id in CAPS:
        assert counters.get(f"taken:{option_id}", 0) == per_option[option_id], option_id
    assert await used_of(redis, period) == dict(per_member)

    # A later retry of every accepted request gets the same claim back, and takes nothing.
    again = await asyncio.gather(
        *(claim(client, settings, u, rid, requests[(u, rid)]) for u, rid in accepted)
    )
    for (key, first), (status, body) in zip(accepted.items(), again, strict=True):
        assert status == 200 and body["replayed"] is True, (key, body)
        assert (body["claim_id"], body["options"], body["items"]) == (
            first["claim_id"],
            first["options"],
            first["items"],
        )
    assert await stock_of(redis, period) == counters

    # PostgreSQL: one row per chosen option, each bundle whole, no option above its cap.
    await drain(ClaimWriter(redis, pool, fast(settings), consumer="t"))
    assert await redis.hlen(KEYS.pending) == 0
    rows = await pool.fetch(
        """SELECT claim_id, user_id, request_id, option_id, bundle_id, bundle_item, bundle_size
           FROM claims WHERE benefit_id = $1""",
        BENEFIT,
    )
    expected_rows = {
        (item["claim_id"], user, rid, item["option_id"], body["claim_id"], i, len(body["items"]))
        for (user, rid), body in accepted.items()
        for i, item in enumerate(body["items"])
    }
    assert {tuple(r.values()) for r in rows} == expected_rows
    stored = Counter(r["option_id"] for r in rows)
    for option_id, cap in CAPS.items():
        assert stored[option_id] == per_option[option_id]
        assert cap is None or stored[option_id] <= cap
    assert len({r["bundle_id"] for r in rows}) <= stock

    (user, _), body = next(iter(accepted.items()))
    shown = await bundle_view(client, settings, user, body["items"][-1]["claim_id"])
    assert shown == {
        "claim_id": body["claim_id"],
        "size": len(body["items"]),
        "items": [{**item, "status": "accepted"} for item in body["items"]],
    }


# -- 2. all or nothing ---------------------------------------------------------------------


async def test_a_sold_out_option_refuses_the_whole_bundle_and_takes_nothing(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    options = [
        capped("a", 1),
        capped("c", 1),
        capped("b", None),
        capped("d", None),
        {"option_id": "k", "kind": "card_key"},
    ]
    quota = [{"min_tier": 4, "per_period": 1}]
    await put_benefit(
        client, settings, bundle_body(stock=10, choose=3, options=options, quota=quota)
    )
    await load_codes(client, settings, "k", 1)
    period = await put_tiers(client, settings, {f"m{i}": 5 for i in range(6)})
    await accept(client, settings, "m0", "r", ["a", "c"])  # a and c at their caps
    await accept(client, settings, "m1", "r", ["k", "b"])  # the last code of k
    stock, used, codes = (
        await stock_of(redis, period),
        await used_of(redis, period),
        await codes_of(redis),
    )
    assert stock == {
        "taken": 2,
        "accepted": 2,
        "taken:a": 1,
        "taken:c": 1,
        "taken:k": 1,
        "taken:b": 1,
    }
    assert used == {"m0": 1, "m1": 1} and codes == {}

    # Each member tries, in turn, bundles whose first sold-out option differs, each twice.
    # A member's first claim goes to Redis (claim.lua); once the worker's gate has learned
    # the member's tier and an option sold out, it may answer without Redis: either way the
    # answer names the first sold-out option in the order given.
    cases = [
        (["b", "a"], "a"),
        (["b", "c", "a"], "c"),
        (["d", "b", "k"], "k"),
        (["a", "k"], "a"),
        (["k", "d", "c"], "k"),
    ]
    engine = client.app[ENGINE]
    wrong: list[tuple[str, list[str], str, str]] = []
    for user in ("m2", "m3", "m4"):
        for n, (chosen, first_sold_out) in enumerate(cases):
            for attempt in range(2):
                local = engine.local_answers
                status, body = await claim(client, settings, user, f"r{n}-{attempt}", chosen)
                assert status == 410, (user, chosen, body)
                assert body["error"] == "sold_out", body
                assert body["option_id"] in chosen, body
                if body["option_id"] != first_sold_out:
                    path = "gate" if engine.local_answers > local else "claim.lua"
                    wrong.append((user, chosen, body["option_id"], path))
                await asyncio.sleep(0.05)  # let the gate take its snapshot
    # A member the gate has not seen goes to claim.lua, whatever the gate knows.
    for attempt in range(2):
        status, body = await claim(client, settings, "m5", f"fresh{attempt}", ["b", "c", "a"])
        assert status == 410 and body["option_id"] == "c", body

    assert await stock_of(redis, period) == stock
    assert await used_of(redis, period) == used
    assert await codes_of(redis) == codes
    for user in ("m2", "m3", "m4", "m5"):
        assert await stream_claim_ids(redis, user, BENEFIT) == []
    await drain(ClaimWriter(redis, pool, fast(settings), consumer="t"))
    held = await pool.fetchval(
        "SELECT count(*) FROM claims WHERE user_id = ANY($1::text[])", ["m2", "m3", "m4", "m5"]
    )
    assert held == 0
    # The refusals cost no quota: the member's next bundle of options in stock is taken.
    body = await accept(client, settings, "m2", "later", ["b", "d"])
    assert body["options"] == ["b", "d"]
    # (user, chosen, option named, who answered) for every answer that did not name the
    # first sold-out option of those chosen
    assert wrong == []


# -- 3. compensation -----------------------------------------------------------------------


async def test_each_option_of_a_bundle_is_refunded_once_and_the_unit_with_the_last(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    options = [
        {"option_id": "k", "kind": "card_key"},
        capped("b", 3) | {"price_points": 2},
        capped("a", 3),
    ]
    quota = [{"min_tier": 4, "per_period": 1}]
    await put_benefit(
        client, settings, bundle_body(stock=5, choose=3, options=options, quota=quota)
    )
    await load_codes(client, settings, "k", 2)
    period = await put_tiers(client, settings, {"m0": 5})
    resp = await client.post(
        "/admin/v1/points/m0/adjust",
        json={"amount": 5, "reason": "goodwill", "reference": "welcome"},
        headers=admin(settings),
    )
    assert resp.status == 201, await resp.text()

    body = await accept(client, settings, "m0", "r1", ["k", "b", "a"])
    bundle = body["claim_id"]
    ids = [item["claim_id"] for item in body["items"]]
    assert ids == [item_id(bundle, i) for i in range(3)]
    all_taken = {"taken": 1, "accepted": 1, "taken:k": 1, "taken:b": 1, "taken:a": 1}
    assert await stock_of(redis, period) == all_taken
    assert await used_of(redis, period) == {"m0": 1}
    assert await codes_of(redis) == {"k": 1}
    assert await spendable_points(client, settings, "m0") == 3
    await drain(ClaimWriter(redis, pool, fast(settings), consumer="t"))

    # The priced option first: its cap unit and points come back once; stock and quota stay.
    await fail(pool, ids[1])
    assert sorted(await asyncio.gather(*(refund(pool, redis, ids[1]) for _ in range(2)))) == [
        False,
        True,
    ]
    assert not await refund(pool, redis, ids[1])
    after_b = {**all_taken}
    del after_b["taken:b"]
    assert await stock_of(redis, period) == after_b
    assert await used_of(redis, period) == {"m0": 1}
    assert await spendable_points(client, settings, "m0") == 5
    assert await codes_of(redis) == {"k": 1}
    status, refused = await claim(client, settings, "m0", "r2", ["a"])
    assert status == 409 and refused["error"] == "quota_exceeded", refused

    # The card-key option: its unit and its code come back once.
    await fail(pool, ids[0])
    assert await refund(pool, redis, ids[0])
    assert not await refund(pool, redis, ids[0])
    assert not await refund(pool, redis, ids[1])
    assert await stock_of(redis, period) == {"taken": 1, "accepted": 1, "taken:a": 1}
    assert await used_of(redis, period) == {"m0": 1}
    assert await codes_of(redis) == {"k": 2}
    view = await bundle_view(client, settings, "m0", ids[2])
    assert view == {
        "claim_id": bundle,
        "size": 3,
        "items": [
            {"claim_id": ids[0], "option_id": "k", "status": "refunded"},
            {"claim_id": ids[1], "option_id": "b", "status": "refunded"},
            {"claim_id": ids[2], "option_id": "a", "status": "accepted"},
        ],
    }

    # The last option: the bundle's unit of stock and the member's quota come back with it.
    await fail(pool, ids[2])
    assert await refund(pool, redis, ids[2])
    for claim_id in ids:
        assert not await refund(pool, redis, claim_id)
    assert await stock_of(redis, period) == {"accepted": 1}
    assert await used_of(redis, period) == {}
    assert await codes_of(redis) == {"k": 2}
    assert await spendable_points(client, settings, "m0") == 5
    assert {text(m) for m in await redis.smembers(KEYS.refunded(period))} == set(ids)
    statuses = await pool.fetch(
        "SELECT claim_id, status FROM claims WHERE bundle_id = $1 ORDER BY bundle_item", bundle
    )
    assert [(r["claim_id"], r["status"]) for r in statuses] == [(c, "refunded") for c in ids]

    # The quota is back: the member may claim again.
    again = await accept(client, settings, "m0", "r3", ["a", "b"])
    assert again["claim_id"] != bundle
    assert await stock_of(redis, period) == {"taken": 1, "accepted": 2, "taken:a": 1, "taken:b": 1}


# -- 4. recovery ---------------------------------------------------------------------------


async def test_recovery_rebuilds_the_counters_of_bundles_persisted_pending_and_refunded(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    options = [
        capped("a", 5),
        capped("b", 5),
        capped("c", None),
        {"option_id": "k", "kind": "card_key"},
    ]
    quota = [{"min_tier": 4, "per_period": 3}]
    await put_benefit(
        client, settings, bundle_body(stock=20, choose=3, options=options, quota=quota)
    )
    await load_codes(client, settings, "k", 5)
    period = await put_tiers(client, settings, {f"m{i}": 5 for i in range(8)})

    held = {
        "m0": await accept(client, settings, "m0", "r", ["a", "b"]),
        "m1": await accept(client, settings, "m1", "r", ["b", "c", "k"]),
        "m2": await accept(client, settings, "m2", "r", ["k", "a"]),
        "m4": await accept(client, settings, "m4", "r", ["a", "c"]),
    }
    status, single = await claim(client, settings, "m3", "r", option_id="c")
    assert status == 202 and "items" not in single, single
    await drain(ClaimWriter(redis, pool, fast(settings), consumer="t"))
    # m1's bundle refunded in part (its card-key option), m4's in whole.
    for claim_id in (
        held["m1"]["items"][2]["claim_id"],
        *(item["claim_id"] for item in held["m4"]["items"]),
    ):
        await fail(pool, claim_id)
        assert await refund(pool, redis, claim_id)
    # Accepted but not persisted yet: only the stream has them.
    held["m5"] = await accept(client, settings, "m5", "r", ["b", "k", "c"])
    held["m6"] = await accept(client, settings, "m6", "r", ["a", "b"])
    assert await redis.hlen(KEYS.pending) == 5

    before = {
        "stock": await stock_of(redis, period),
        "used": await used_of(redis, period),
        "codes": await codes_of(redis),
        "refunded": {text(m) for m in await redis.smembers(KEYS.refunded(period))},
        "idem": await redis.hgetall(KEYS.idempotency(period)),
    }
    assert before["stock"] == {
        "taken": 6,  # m0, m1 (in part), m2, m3, m5, m6
        "accepted": 7,
        "taken:a": 3,  # m0, m2, m6
        "taken:b": 4,  # m0, m1, m5, m6
        "taken:c": 3,  # m1, m3, m5
        "taken:k": 2,  # m2, m5
    }
    assert before["used"] == {u: 1 for u in ("m0", "m1", "m2", "m3", "m5", "m6")}
    assert before["codes"] == {"k": 3}

    # Wreck the counters, then rebuild them from PostgreSQL and the stream.
    await redis.hset(KEYS.stock(period), mapping={"taken": 0, "taken:a": 99, "accepted": 1})
    await redis.delete(KEYS.used(period), KEYS.refunded(period))
    await redis.hset(KEYS.codes, "k", 0)
    assert await Recovery(pool, redis, settings).ensure_benefit(BENEFIT, force=True)
    after = {
        "stock": await stock_of(redis, period),
        "used": await used_of(redis, period),
        "codes": await codes_of(redis),
        "refunded": {text(m) for m in await redis.smembers(KEYS.refunded(period))},
        "idem": await redis.hgetall(KEYS.idempotency(period)),
    }
    assert after == before

    # Claims go on as before: a retry gets its bundle, the quota and caps still hold.
    status, replay = await claim(client, settings, "m5", "r", ["b", "k", "c"])
    assert status == 200 and replay["items"] == held["m5"]["items"], replay
    await accept(client, settings, "m7", "r", ["a", "c"])
    # Refunding the rest of m1's bundle after the rebuild returns its unit and quota once.
    await drain(ClaimWriter(redis, pool, fast(settings), consumer="t"))
    for item in held["m1"]["items"][:2]:
        await fail(pool, item["claim_id"])
        assert await refund(pool, redis, item["claim_id"])
    stock = await stock_of(redis, period)
    assert (stock["taken"], stock["accepted"], stock["taken:b"], stock["taken:c"]) == (6, 8, 3, 3)
    assert "m1" not in await used_of(redis, period)


# -- 5. validation -------------------------------------------------------------------------


async def test_bundle_requests_are_validated_and_take_nothing(
    client: Client, settings: Settings, redis: Redis
) -> None:
    options = [capped("a", None), capped("b", None), capped("c", None)]
    quota = [{"min_tier": 4, "per_period": 1}]
    too_many = bundle_body(stock=5, choose=4, options=options, quota=quota)
    resp = await client.put(f"/admin/v1/benefits/{BENEFIT}", json=too_many, headers=admin(settings))
    assert resp.status == 422, await resp.text()
    assert (await resp.json())["field"] == "choose"
    await put_benefit(
        client, settings, bundle_body(stock=5, choose=2, options=options, quota=quota)
    )
    period = await put_tiers(client, settings, {"m0": 5})

    bad: list[tuple[dict[str, Any], int]] = [
        ({"option_ids": ["a", "b", "c"]}, 409),  # more than choose: the benefit refuses it
        ({"option_ids": ["a", "a"]}, 400),  # not distinct
        ({"option_ids": ["a"], "option_id": "b"}, 400),  # both
        ({"option_ids": ["a", "b"], "option_id": "a"}, 400),
        ({"option_ids": []}, 400),
        ({"option_ids": "a"}, 400),
        ({"option_ids": ["a", 3]}, 400),
        ({"option_ids": ["a", "zz"]}, 404),  # no such option
    ]
    for n, (extra, expected) in enumerate(bad):
        resp = await client.post(
            f"/v1/benefits/{BENEFIT}/claims",
            json={"request_id": f"bad{n}", **extra},
            headers=auth(settings, "m0"),
        )
        body = await resp.json()
        assert resp.status == expected, (extra, body)
        if expected == 400:
            assert body["error"] == "invalid_request", body
        elif expected == 409:
            assert body["error"] == "too_many_options" and body["choose"] == 2, body
            assert body["field"] == "option_ids" and body["options"] == ["a", "b", "c"], body
        else:
            assert body["error"] == "unknown_option", body
    assert await stock_of(redis, period) == {}
    assert await used_of(redis, period) == {}
    assert await stream_claim_ids(redis, "m0", BENEFIT) == []

    # A benefit without choose takes one option per claim.
    single = benefit_body(stock=5, quota=quota, options=options)
    await put_benefit_again(client, settings, single)
    status, body = await claim(client, settings, "m0", "one", ["a", "b"])
    assert status == 409 and body["error"] == "too_many_options", body
    assert body["field"] == "option_ids" and body["choose"] == 1, body
    status, body = await claim(client, settings, "m0", "one", ["a"])
    assert status == 202 and body["option_id"] == "a", body


async def put_benefit_again(client: Client, settings: Settings, body: dict[str, Any]) -> None:
    resp = await client.put(f"/admin/v1/benefits/{BENEFIT}", json=body, headers=admin(settings))
    assert resp.status == 200, await resp.text()
