"""Zones of the catalogue and the tier ladder against real servers: the admin routes, the
member's listing grouped by zone with what the next tier unlocks, and the Redis mirror."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import jsonschema_rs
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.http.member import openapi_document
from claim_service.store import catalogue_store
from claim_service.store.keyspace import ZONES_KEY, text
from claim_service.store.zones_store import load_zones
from tests.helpers import admin, auth, benefit_body, direct

Client = TestClient[Any, Any]
DOCUMENT: dict[str, Any] = orjson.loads(openapi_document())


def documented(schema: str, value: Any) -> bool:
    """Whether the OpenAPI document's ``components.schemas[schema]`` allows ``value``."""
    root = {"$ref": f"#/components/schemas/{schema}", "components": DOCUMENT["components"]}
    return bool(jsonschema_rs.Draft202012Validator(root, validate_formats=True).is_valid(value))


async def put_zone(
    client: Client, settings: Settings, zone_id: str, name: str, min_tier: int, position: int
) -> dict[str, Any]:
    body = {"name": name, "min_tier": min_tier, "position": position}
    resp = await client.put(f"/admin/v1/zones/{zone_id}", json=body, headers=admin(settings))
    assert resp.status in (200, 201), await resp.text()
    return dict(await resp.json())


async def put_benefit(
    client: Client, settings: Settings, benefit_id: str, **fields: Any
) -> dict[str, Any]:
    quota = fields.pop("quota", 1)
    min_tier = fields.pop("min_tier", 4)
    body = {**benefit_body(min_tier=min_tier, quota=quota), "name": benefit_id.title(), **fields}
    resp = await client.put(f"/admin/v1/benefits/{benefit_id}", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def load_tiers(client: Client, settings: Settings, tiers: dict[str, int]) -> None:
    period = periods.current_period(settings.tz)
    body = [{"user_id": u, "tier": t} for u, t in tiers.items()]
    resp = await client.put(f"/admin/v1/tiers/{period}", json=body, headers=admin(settings))
    assert resp.status == 200, await resp.text()


async def listing(client: Client, settings: Settings, user: str) -> dict[str, Any]:
    resp = await client.get("/v1/benefits", headers=auth(settings, user))
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


def summary(groups: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Each group as (zone_id, unlocked, benefit ids)."""
    return [(g["zone_id"], g["unlocked"], [b["benefit_id"] for b in g["benefits"]]) for g in groups]


async def ladder(client: Client, settings: Settings) -> None:
    """Zones everyday (V0), lounges (V8), vip (V12, listed first); benefits coffee in everyday,
    lounge in lounges (V8), video in no zone (V4: quota 1, V12: quota 3)."""
    await put_zone(client, settings, "everyday", "Everyday", 0, 10)
    await put_zone(client, settings, "lounges", "Airport lounges", 8, 20)
    await put_zone(client, settings, "vip", "VIP", 12, 5)
    await put_benefit(client, settings, "coffee", min_tier=0, zone="everyday")
    await put_benefit(client, settings, "lounge", min_tier=8, zone="lounges")
    await put_benefit(
        client,
        settings,
        "video",
        quota=[{"min_tier": 4, "per_period": 1}, {"min_tier": 12, "per_period": 3}],
    )
    await load_tiers(client, settings, {"v4": 4, "v8": 8, "v12": 12})


# -- the admin routes ----------------------------------------------------------------------


async def test_a_zone_is_created_then_replaced(client: Client, settings: Settings) -> None:
    body = {"name": "Airport lounges", "min_tier": 8, "position": 20}
    assert documented("ZoneInput", body)
    resp = await client.put("/admin/v1/zones/lounges", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    assert await resp.json() == {"zone_id": "lounges", **body}
    assert documented("Zone", await resp.json())
    replaced = {"name": "Lounges", "min_tier": 6.0, "position": 2, "ignored": True}
    assert documented("ZoneInput", replaced)
    resp = await client.put("/admin/v1/zones/lounges", json=replaced, headers=admin(settings))
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {
        "zone_id": "lounges",
        "name": "Lounges",
        "min_tier": 6,
        "position": 2,
    }
    await put_zone(client, settings, "basics", "Everyday", 0, 10)
    await put_zone(client, settings, "a-first-too", "Also second", 0, 2)
    resp = await client.get("/admin/v1/zones", headers=admin(settings))
    assert resp.status == 200
    assert documented("ZoneList", await resp.json())
    assert [z["zone_id"] for z in (await resp.json())["zones"]] == [
        "a-first-too",
        "lounges",
        "basics",
    ]


@pytest.mark.parametrize(
    ("zone_id", "body", "field"),
    [
        ("bad%20id", {"name": "Z", "min_tier": 0, "position": 0}, "zone_id"),
        ("z", {"min_tier": 0, "position": 0}, "name"),
        ("z", {"name": "", "min_tier": 0, "position": 0}, "name"),
        ("z", {"name": "a\u0085b", "min_tier": 0, "position": 0}, "name"),
        ("z", {"name": "Z", "min_tier": 100, "position": 0}, "min_tier"),
        ("z", {"name": "Z", "min_tier": "8", "position": 0}, "min_tier"),
        ("z", {"name": "Z", "min_tier": 0}, "position"),
        ("z", {"name": "Z", "min_tier": 0, "position": -1}, "position"),
        ("z", {"name": "Z", "min_tier": 0, "position": 2**31}, "position"),
    ],
    ids=repr,
)
async def test_an_invalid_zone_is_400_naming_the_field(
    client: Client, settings: Settings, zone_id: str, body: dict[str, Any], field: str
) -> None:
    if field != "zone_id":
        assert not documented("ZoneInput", body)  # the document and the server agree
    resp = await client.put(f"/admin/v1/zones/{zone_id}", json=body, headers=admin(settings))
    assert resp.status == 400, await resp.text()
    error = await resp.json()
    assert (error["error"], error["field"]) == ("invalid_request", field)
    resp = await client.get("/admin/v1/zones", headers=admin(settings))
    assert (await resp.json())["zones"] == []


async def test_a_zone_body_must_be_an_object(client: Client, settings: Settings) -> None:
    resp = await client.put("/admin/v1/zones/z", json=["Z"], headers=admin(settings))
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
    resp = await client.put("/admin/v1/zones/z", json={"name": "Z", "min_tier": 0, "position": 0})
    assert resp.status == 401


async def test_a_benefit_in_an_unknown_zone_is_422(client: Client, settings: Settings) -> None:
    body = {**benefit_body(), "zone": "lounges"}
    assert documented("BenefitInput", body)  # no schema can tell
    resp = await client.put("/admin/v1/benefits/video", json=body, headers=admin(settings))
    assert resp.status == 422, await resp.text()
    error = await resp.json()
    assert (error["error"], error["field"], error["zone"]) == ("unknown_zone", "zone", "lounges")
    resp = await client.get("/admin/v1/benefits/video", headers=admin(settings))
    assert resp.status == 404  # nothing was saved
    # A malformed zone id is the body's fault: 400, as any other field.
    resp = await client.put(
        "/admin/v1/benefits/video", json={**body, "zone": "no such"}, headers=admin(settings)
    )
    assert resp.status == 400 and (await resp.json())["field"] == "zone"
    assert not documented("BenefitInput", {**body, "zone": "no such"})
    await put_zone(client, settings, "lounges", "Airport lounges", 8, 20)
    resp = await client.put("/admin/v1/benefits/video", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["zone"] == "lounges"


async def test_concurrent_zone_changes_all_reach_the_mirror(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await asyncio.gather(
        *(put_zone(client, settings, f"z{i}", f"Zone {i}", i % 10, i) for i in range(20))
    )
    mirrored = {text(k): orjson.loads(v) for k, v in (await redis.hgetall(ZONES_KEY)).items()}
    assert mirrored.pop("_") == 1
    assert mirrored == {
        f"z{i}": {"zone_id": f"z{i}", "name": f"Zone {i}", "min_tier": i % 10, "position": i}
        for i in range(20)
    }
    assert [z.zone_id for z in await load_zones(redis, pool)] == [f"z{i}" for i in range(20)]


# -- the member's listing ------------------------------------------------------------------


async def test_benefits_are_grouped_by_zone(client: Client, settings: Settings) -> None:
    await ladder(client, settings)
    body = await listing(client, settings, "v4")
    assert documented("MemberCatalogue", body)
    assert body["tier"] == 4
    # The flat list is as it always was: every benefit by id.
    assert [b["benefit_id"] for b in body["benefits"]] == ["coffee", "lounge", "video"]
    assert summary(body["zones"]) == [
        ("vip", False, []),
        ("everyday", True, ["coffee"]),
        ("lounges", False, ["lounge"]),
        (None, True, ["video"]),
    ]
    vip, everyday, lounges, ungrouped = body["zones"]
    assert {k: v for k, v in vip.items() if k != "benefits"} == {
        "zone_id": "vip",
        "name": "VIP",
        "min_tier": 12,
        "position": 5,
        "unlocked": False,
    }
    assert {k: v for k, v in ungrouped.items() if k != "benefits"} == {
        "zone_id": None,
        "name": None,
        "min_tier": None,
        "position": None,
        "unlocked": True,
    }
    # The groups hold the very views of the flat list.
    assert everyday["benefits"][0] == body["benefits"][0]
    assert lounges["benefits"][0] == body["benefits"][1]
    assert lounges["benefits"][0]["reason"] == "tier_too_low"
    assert ungrouped["benefits"][0]["zone"] is None
    assert summary((await listing(client, settings, "v12"))["zones"]) == [
        ("vip", True, []),
        ("everyday", True, ["coffee"]),
        ("lounges", True, ["lounge"]),
        (None, True, ["video"]),
    ]


async def test_the_group_of_no_zone_is_left_out_when_empty(
    client: Client, settings: Settings
) -> None:
    await put_zone(client, settings, "everyday", "Everyday", 0, 1)
    await put_benefit(client, settings, "coffee", zone="everyday")
    body = await listing(client, settings, "nobody")
    assert body["tier"] == 0
    assert summary(body["zones"]) == [("everyday", True, ["coffee"])]


async def test_a_benefit_of_a_zone_not_defined_is_in_no_zone(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    # Only the store can save one (the API answers 422): say, a zone dropped by hand.
    benefit = parse_benefit("video", {**benefit_body(), "zone": "gone"}, settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    body = await listing(client, settings, "v4")
    assert summary(body["zones"]) == [(None, True, ["video"])]
    assert body["benefits"][0]["zone"] == "gone"


async def test_views_carry_zone_and_prices(client: Client, settings: Settings) -> None:
    await put_zone(client, settings, "streaming", "Streaming", 0, 1)
    options = [direct("iqiyi"), direct("tencent", price_points=40)]
    saved = await put_benefit(
        client, settings, "video", zone="streaming", price_points=100, options=options
    )
    assert (saved["zone"], saved["price_points"]) == ("streaming", 100)
    (view,) = (await listing(client, settings, "v4"))["benefits"]
    assert (view["zone"], view["price_points"]) == ("streaming", 100)
    assert [(o["option_id"], o["price_points"]) for o in view["options"]] == [
        ("iqiyi", 100),
        ("tencent", 40),
    ]


async def test_next_tier_says_what_the_nearest_higher_tier_unlocks(
    client: Client, settings: Settings
) -> None:
    await ladder(client, settings)
    for user in ("v4", "v8", "v12"):
        assert documented("MemberCatalogue", await listing(client, settings, user))
    assert (await listing(client, settings, "v4"))["next_tier"] == {
        "tier": 8,
        "zones": [{"zone_id": "lounges", "name": "Airport lounges"}],
        "benefits": [{"benefit_id": "lounge", "name": "Lounge", "zone": "lounges"}],
        "quotas": [],
    }
    assert (await listing(client, settings, "v8"))["next_tier"] == {
        "tier": 12,
        "zones": [{"zone_id": "vip", "name": "VIP"}],
        "benefits": [],
        "quotas": [{"benefit_id": "video", "name": "Video", "allowed_now": 1, "allowed": 3}],
    }
    assert (await listing(client, settings, "v12"))["next_tier"] is None


# -- the mirror ----------------------------------------------------------------------------


async def test_listings_read_the_mirror_not_postgresql(
    client: Client, settings: Settings, pool: asyncpg.Pool
) -> None:
    await put_zone(client, settings, "everyday", "Everyday", 0, 1)
    await pool.execute("UPDATE zones SET name = 'Changed behind its back'")
    groups = (await listing(client, settings, "v4"))["zones"]
    assert [g["name"] for g in groups] == ["Everyday"]
    # A PUT mirrors PostgreSQL as it is now, the change made by hand included.
    await put_zone(client, settings, "later", "Later", 9, 2)
    groups = (await listing(client, settings, "v4"))["zones"]
    assert [(g["name"], g["unlocked"]) for g in groups] == [
        ("Changed behind its back", True),
        ("Later", False),
    ]


async def test_zones_are_served_after_redis_lost_them(
    client: Client, settings: Settings, redis: Redis
) -> None:
    await ladder(client, settings)
    before = (await listing(client, settings, "v4"))["zones"]
    await redis.flushall()
    assert await redis.exists(ZONES_KEY) == 0
    body = await listing(client, settings, "v4")
    assert documented("MemberCatalogue", body)
    # Whether the catalogue and the tiers are back yet is recovery's business (it runs in
    # the background): the zones are all there, from PostgreSQL.
    zones = [g for g in body["zones"] if g["zone_id"] is not None]
    assert [{k: v for k, v in g.items() if k != "benefits"} for g in zones] == [
        {
            "zone_id": g["zone_id"],
            "name": g["name"],
            "min_tier": g["min_tier"],
            "position": g["position"],
            "unlocked": body["tier"] >= g["min_tier"],
        }
        for g in before
        if g["zone_id"] is not None
    ]
    assert [g["zone_id"] for g in zones] == ["vip", "everyday", "lounges"]
    # ... and mirrored again, so the next listing reads Redis.
    mirrored = {text(k) for k in await redis.hgetall(ZONES_KEY)}
    assert mirrored == {"_", "vip", "everyday", "lounges"}


async def test_no_zones_is_mirrored_too(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await put_benefit(client, settings, "video")
    body = await listing(client, settings, "v4")
    assert summary(body["zones"]) == [(None, True, ["video"])]
    # "No zones" is mirrored as such, not mistaken for a mirror Redis lost.
    assert {text(k): text(v) for k, v in (await redis.hgetall(ZONES_KEY)).items()} == {"_": "1"}
    assert await load_zones(redis, pool) == []
