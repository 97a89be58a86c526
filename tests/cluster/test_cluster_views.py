"""What a member sees, and the claim gate, on a Redis Cluster: the catalogue read over
benefits whose keys sit on different primaries, and the gate answering sold-out claims by
itself, then reopening on a top-up or a refund, through the announcement and, with every
announcement lost, through its own re-check of the counters on the benefit's primary."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from typing import Any, cast

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from claim_service.claims.engine import ClaimEngine
from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.http.app import ENGINE
from claim_service.http.server import Guard
from claim_service.http.service import create_apps
from claim_service.local.embedded_cluster import EmbeddedCluster
from claim_service.store import stock_events
from claim_service.store.connections import close_redis, create_redis
from claim_service.store.keyspace import BenefitKeys
from tests.helpers import ServiceClient, admin, auth, benefit_body, drain, fast, wait_for
from tests.integration import test_short_circuits as sc
from tests.integration.test_zones import listing, load_tiers, put_benefit, put_zone

Client = TestClient[Any, Any]


def primaries_of(redis: Redis, benefit_ids: list[str]) -> set[str]:
    cluster = cast(RedisCluster, redis)
    return {str(cluster.get_node_from_key(BenefitKeys(b).config)) for b in benefit_ids}


async def evalsha_calls(redis: Redis) -> int:
    """Scripts run on every primary of the cluster (``INFO commandstats`` is per node)."""
    cluster = cast(RedisCluster, redis)
    calls = Counter[str]()
    for node in cluster.get_primaries():
        stats = await cluster.info("commandstats", target_nodes=node)
        calls["evalsha"] += int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return calls["evalsha"]


async def claim_of(client: Client, settings: Settings, benefit_id: str, user: str) -> int:
    resp = await client.post(
        f"/v1/benefits/{benefit_id}/claims",
        json={"request_id": "r", "option_id": "iqiyi"},
        headers=auth(settings, user),
    )
    return resp.status


# -- the member catalogue --------------------------------------------------------------------


async def test_the_catalogue_reads_benefits_on_every_primary(
    cluster_client: Client, cluster_settings: Settings, cluster_redis: Redis
) -> None:
    """Six benefits over the three primaries, each in another state for the member: the
    listing shows each one's own counters (read from its own primary), the member's tier
    (from the snapshot's slot), zones and what the next tier unlocks."""
    client, settings = cluster_client, cluster_settings
    ids = ["open", "claimed", "sold", "later", "paused", "high"]
    assert len(primaries_of(cluster_redis, ids)) == 3, "spread over the three primaries"
    await put_zone(client, settings, "everyday", "Everyday", 0, 10)
    await put_zone(client, settings, "vip", "VIP", 12, 20)
    await put_benefit(client, settings, "open", stock_per_period=5, zone="everyday")
    await put_benefit(client, settings, "claimed", stock_per_period=5, zone="everyday")
    await put_benefit(client, settings, "sold", stock_per_period=1)
    await put_benefit(client, settings, "later", release=benefit_body(opens_in_s=3600)["release"])
    await put_benefit(client, settings, "paused", paused=True)
    await put_benefit(client, settings, "high", min_tier=12, zone="vip")
    await load_tiers(client, settings, {"v5": 5, "other": 5, "v12": 12})
    assert await claim_of(client, settings, "claimed", "v5") == 202
    assert await claim_of(client, settings, "sold", "other") == 202
    resp = await client.post(
        "/admin/v1/benefits/open/stock", json={"amount": 3}, headers=admin(settings)
    )
    assert resp.status == 200, await resp.text()

    found = await listing(client, settings, "v5")
    assert found["tier"] == 5
    views = {v["benefit_id"]: v for v in found["benefits"]}
    assert {b: (v["can_claim"], v["reason"]) for b, v in views.items()} == {
        "open": (True, None),
        "claimed": (False, "quota_exceeded"),
        "sold": (False, "sold_out"),
        "later": (False, "not_open"),
        "paused": (False, "paused"),
        "high": (False, "tier_too_low"),
    }
    assert {b: v["stock_left"] for b, v in views.items()} == {
        "open": 8,
        "claimed": 4,
        "sold": 0,
        "later": 10,
        "paused": 10,
        "high": 10,
    }
    assert views["claimed"]["quota"] == {"used": 1, "allowed": 1}
    assert views["open"]["quota"] == {"used": 0, "allowed": 1}
    groups = [(g["zone_id"], [b["benefit_id"] for b in g["benefits"]]) for g in found["zones"]]
    assert groups == [
        ("everyday", ["claimed", "open"]),
        ("vip", ["high"]),
        (None, ["later", "paused", "sold"]),
    ]
    unlocks = found["next_tier"]
    assert unlocks["tier"] == 12 and [z["zone_id"] for z in unlocks["zones"]] == ["vip"]

    top = await listing(client, settings, "v12")
    views = {v["benefit_id"]: v for v in top["benefits"]}
    assert top["tier"] == 12 and views["high"]["can_claim"] is True
    assert views["claimed"]["quota"] == {"used": 0, "allowed": 1}
    assert (await listing(client, settings, "stranger"))["tier"] == 0


# -- the gate ----------------------------------------------------------------------------------


async def sold_out_and_answered_locally(client: Client, settings: Settings, redis: Redis) -> str:
    """``video`` (one unit) taken by u1, u2 refused by Redis; then the gate answers u2 by
    itself (no script runs on any primary). Returns u1's claim id."""
    await sc.setup(client, settings, stock=1, tiers={"u1": 5, "u2": 5, "u3": 5})
    status, body = await sc.claim(client, settings, "u1", "a")
    assert status == 202, body
    assert (await sc.claim(client, settings, "u2", "a"))[0] == 410
    await sc.gate_answering(client)
    before = await evalsha_calls(redis)
    for i in range(3):
        status, local = await sc.claim(client, settings, "u2", f"again-{i}")
        assert (status, local["error"], local["stock_left"]) == (410, "sold_out", 0), local
    assert await evalsha_calls(redis) == before, "answered without Redis"
    # A retry of the accepted claim still goes to Redis and gets it back.
    status, replay = await sc.claim(client, settings, "u1", "a")
    assert status == 200 and replay["replayed"] is True, replay
    return str(body["claim_id"])


async def refund(client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool) -> None:
    """u1's claim persisted, failed for good, and refunded by ops."""
    await drain(ClaimWriter(redis, pool, fast(settings)))
    claim_id = await pool.fetchval("SELECT claim_id FROM claims WHERE user_id = 'u1'")
    await pool.execute(
        "UPDATE claims SET status = 'failed', failure_reason = 'rejected' WHERE claim_id = $1",
        claim_id,
    )
    resp = await client.post(
        f"/admin/v1/claims/{claim_id}/refund", json={}, headers=admin(settings)
    )
    assert resp.status == 200, await resp.text()


async def top_up(client: Client, settings: Settings) -> None:
    resp = await client.post(
        "/admin/v1/benefits/video/stock", json={"amount": 1}, headers=admin(settings)
    )
    assert resp.status == 200, await resp.text()


async def test_sold_out_is_answered_locally_and_reopens_on_an_announced_top_up(
    cluster_client: Client, cluster_settings: Settings, cluster_redis: Redis
) -> None:
    await sold_out_and_answered_locally(cluster_client, cluster_settings, cluster_redis)
    await top_up(cluster_client, cluster_settings)
    assert (await sc.claim(cluster_client, cluster_settings, "u2", "after"))[0] == 202


async def test_sold_out_reopens_on_an_announced_refund(
    cluster_client: Client, cluster_settings: Settings, cluster_redis: Redis, pool: asyncpg.Pool
) -> None:
    await sold_out_and_answered_locally(cluster_client, cluster_settings, cluster_redis)
    await refund(cluster_client, cluster_settings, cluster_redis, pool)
    assert (await sc.claim(cluster_client, cluster_settings, "u2", "after"))[0] == 202


async def lose_announcements(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on no announcement reaches any gate: neither this process's own gates nor
    the subscribers of the channel (it is published where nobody listens)."""
    monkeypatch.setattr(stock_events, "_local", [])
    monkeypatch.setattr(stock_events, "STOCK_CHANNEL", "announcements-lost")


async def reopened_by_the_recheck(client: Client) -> None:
    engine: ClaimEngine = client.app[ENGINE]

    async def forgotten() -> bool:
        return bool(engine.gate.answering == 0)

    await wait_for(forgotten, within=5)


@pytest.mark.parametrize("change", ["top_up", "refund"])
async def test_a_change_whose_announcement_is_lost_reopens_within_the_recheck(
    cluster_client: Client,
    cluster_settings: Settings,
    cluster_redis: Redis,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    client, settings = cluster_client, cluster_settings
    await sold_out_and_answered_locally(client, settings, cluster_redis)
    await lose_announcements(monkeypatch)
    if change == "top_up":
        await top_up(client, settings)
    else:
        await refund(client, settings, cluster_redis, pool)
    engine: ClaimEngine = client.app[ENGINE]
    assert engine.gate.answering == 1, "nothing was heard: the gate still answers"
    await reopened_by_the_recheck(client)
    assert (await sc.claim(client, settings, "u2", "after"))[0] == 202
    assert (await sc.claim(client, settings, "u3", "after"))[0] == 410


async def test_before_opening_is_answered_locally_on_a_cluster(
    cluster_client: Client, cluster_settings: Settings, cluster_redis: Redis
) -> None:
    client, settings = cluster_client, cluster_settings
    await sc.setup(client, settings, stock=5, tiers={"u1": 5, "u2": 5}, opens_in_s=3600)
    status, body = await sc.claim(client, settings, "u1", "a")
    assert status == 425 and body["error"] == "not_open", body
    await sc.gate_answering(client)
    before = await evalsha_calls(cluster_redis)
    for user in ("u1", "u2", "nobody"):
        assert (await sc.claim(client, settings, user, "b"))[0] == 425
    assert await evalsha_calls(cluster_redis) == before
    # Stock pushed behind everyone's back on the benefit's primary: the re-check sees it.
    stock = BenefitKeys("video").stock(periods.current_period(settings.tz))
    await cluster_redis.hincrby(stock, "added", 1)
    await reopened_by_the_recheck(client)


async def test_the_gate_keeps_watching_through_a_failover_of_a_primary(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    """The gate answers for two sold-out benefits on two primaries when one of them is
    killed: while its slots have no primary the gate's re-checks fail (the client finds the
    slot map incomplete), and it stops answering for both; once the replica took over, it
    hears announcements and answers by itself again."""
    with EmbeddedCluster(primaries=3, replicas_per_primary=1) as own:
        on_cluster = replace(settings, redis_url=own.url)
        redis = await create_redis(own.url)
        try:
            member, admin_app = create_apps(on_cluster, pools=(redis, pool))
            async with ServiceClient(member, admin_app, Guard.for_process(on_cluster)) as client:
                await failover_drill(own, client, on_cluster, redis)
        finally:
            await close_redis(redis)


async def failover_drill(
    own: EmbeddedCluster, client: Client, settings: Settings, redis: Redis
) -> None:
    cluster = cast(RedisCluster, redis)
    video = cluster.get_node_from_key(BenefitKeys("video").config)
    other = next(
        b
        for b in (f"b{i}" for i in range(9))
        if cluster.get_node_from_key(BenefitKeys(b).config) != video
    )
    await sold_out_and_answered_locally(client, settings, redis)
    resp = await client.put(
        f"/admin/v1/benefits/{other}", json=benefit_body(stock=1, quota=1), headers=admin(settings)
    )
    assert resp.status == 201, await resp.text()
    assert await claim_of(client, settings, other, "u1") == 202
    assert await claim_of(client, settings, other, "u2") == 410
    engine: ClaimEngine = client.app[ENGINE]

    async def answering(count: int) -> bool:
        return bool(engine.gate.answering == count)

    await wait_for(lambda: answering(2), within=5)
    slot = cluster.keyslot(BenefitKeys("video").config)
    await asyncio.to_thread(own.kill, own.primary_for_slot(slot))
    await wait_for(lambda: answering(0), within=10)
    await asyncio.sleep(1.0)  # the slots of the killed primary uncovered meanwhile
    await asyncio.to_thread(own.wait_healthy, 30)
    await top_up(client, settings)
    assert (await sc.claim(client, settings, "u2", "after"))[0] == 202
    assert (await sc.claim(client, settings, "u3", "after"))[0] == 410
    assert await claim_of(client, settings, other, "u3") == 410
    await wait_for(lambda: answering(2), within=5)
    before = await evalsha_calls(redis)
    assert (await sc.claim(client, settings, "u3", "again"))[0] == 410
    assert await evalsha_calls(redis) == before, "answered without Redis again"
