"""The claim endpoint against real servers: every rule, one at a time."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.http.app import PG, REDIS
from claim_service.store import catalogue_store
from tests.helpers import admin, auth, benefit_body, direct

Client = TestClient[Any, Any]


async def setup_benefit(
    client: Client, settings: Settings, benefit_id: str = "video", **kwargs: Any
) -> dict[str, Any]:
    resp = await client.put(
        f"/admin/v1/benefits/{benefit_id}", json=benefit_body(**kwargs), headers=admin(settings)
    )
    assert resp.status in (200, 201), await resp.text()
    return dict(await resp.json())


async def load_tiers(client: Client, settings: Settings, tiers: dict[str, int]) -> None:
    period = periods.current_period(settings.tz)
    body = [{"user_id": u, "tier": t} for u, t in tiers.items()]
    resp = await client.put(f"/admin/v1/tiers/{period}", json=body, headers=admin(settings))
    assert resp.status == 200, await resp.text()


async def claim(
    client: Client,
    settings: Settings,
    user: str,
    request_id: str,
    benefit_id: str = "video",
    **body: Any,
) -> tuple[int, dict[str, Any]]:
    resp = await client.post(
        f"/v1/benefits/{benefit_id}/claims",
        json={"request_id": request_id, **body},
        headers=auth(settings, user),
    )
    return resp.status, dict(await resp.json())


async def test_accepted_claim_shape(client: Client, settings: Settings) -> None:
    await setup_benefit(client, settings, stock=5)
    await load_tiers(client, settings, {"alice": 5})
    status, body = await claim(client, settings, "alice", "r1", option_id="iqiyi")
    assert status == 202, body
    assert body["status"] == "accepted"
    assert body["benefit_id"] == "video" and body["option_id"] == "iqiyi"
    assert body["period"] == periods.current_period(settings.tz)
    assert body["stock_left"] == 4
    assert len(body["claim_id"]) == 32


async def test_retry_returns_same_claim_and_takes_no_unit(
    client: Client, settings: Settings
) -> None:
    await setup_benefit(client, settings, stock=5)
    await load_tiers(client, settings, {"bob": 9})
    first_status, first = await claim(client, settings, "bob", "same", option_id="iqiyi")
    again_status, again = await claim(client, settings, "bob", "same", option_id="iqiyi")
    assert first_status == 202 and again_status == 200
    assert again["claim_id"] == first["claim_id"]
    assert again["replayed"] is True
    assert again["stock_left"] == 4


async def test_tier_too_low(client: Client, settings: Settings) -> None:
    await setup_benefit(client, settings)
    await load_tiers(client, settings, {"carol": 3})
    status, body = await claim(client, settings, "carol", "r", option_id="iqiyi")
    assert status == 403 and body["error"] == "tier_too_low"
    status, body = await claim(client, settings, "nobody", "r", option_id="iqiyi")
    assert status == 403 and body["tier"] == 0


async def test_quota_per_tier(client: Client, settings: Settings) -> None:
    await setup_benefit(client, settings, stock=100)
    await load_tiers(client, settings, {"v4": 4, "v8": 8})
    assert (await claim(client, settings, "v4", "a", option_id="iqiyi"))[0] == 202
    status, body = await claim(client, settings, "v4", "b", option_id="iqiyi")
    assert status == 409 and body["error"] == "quota_exceeded"
    assert body["quota"] == {"used": 1, "allowed": 1}
    assert (await claim(client, settings, "v8", "a", option_id="iqiyi"))[0] == 202
    assert (await claim(client, settings, "v8", "b", option_id="tencent"))[0] == 202
    assert (await claim(client, settings, "v8", "c", option_id="iqiyi"))[0] == 409


async def test_not_open_then_paused(client: Client, settings: Settings) -> None:
    await setup_benefit(client, settings, opens_in_s=3600)
    await load_tiers(client, settings, {"dan": 6})
    status, body = await claim(client, settings, "dan", "r", option_id="iqiyi")
    assert status == 425 and body["error"] == "not_open" and body["opens_at"]
    await setup_benefit(client, settings)
    resp = await client.post("/admin/v1/benefits/video/pause", headers=admin(settings))
    assert resp.status == 200
    status, body = await claim(client, settings, "dan", "r", option_id="iqiyi")
    assert status == 423 and body["error"] == "paused"
    resp = await client.post("/admin/v1/benefits/video/resume", headers=admin(settings))
    assert resp.status == 200
    assert (await claim(client, settings, "dan", "r", option_id="iqiyi"))[0] == 202


async def test_closed(client: Client, settings: Settings) -> None:
    await setup_benefit(client, settings, opens_in_s=-120, closes_in_s=-60)
    await load_tiers(client, settings, {"erin": 6})
    status, body = await claim(client, settings, "erin", "r", option_id="iqiyi")
    assert status == 410 and body["error"] == "closed"


async def test_sold_out_and_stock_top_up(client: Client, settings: Settings) -> None:
    await setup_benefit(client, settings, stock=1)
    await load_tiers(client, settings, {"u1": 5, "u2": 5})
    assert (await claim(client, settings, "u1", "r", option_id="iqiyi"))[0] == 202
    status, body = await claim(client, settings, "u2", "r", option_id="iqiyi")
    assert status == 410 and body["error"] == "sold_out" and body["stock_left"] == 0
    resp = await client.post(
        "/admin/v1/benefits/video/stock", json={"amount": 1}, headers=admin(settings)
    )
    assert resp.status == 200
    assert (await resp.json())["left"] == 1
    assert (await claim(client, settings, "u2", "r", option_id="iqiyi"))[0] == 202


async def test_option_cap(client: Client, settings: Settings) -> None:
    options = [
        direct("a", stock_cap=1),
        direct("b"),
    ]
    await setup_benefit(client, settings, stock=10, options=options)
    await load_tiers(client, settings, {"u1": 5, "u2": 5})
    assert (await claim(client, settings, "u1", "r", option_id="a"))[0] == 202
    status, body = await claim(client, settings, "u2", "r", option_id="a")
    assert status == 410 and body["option_id"] == "a"
    assert (await claim(client, settings, "u2", "r", option_id="b"))[0] == 202


async def test_option_rules(client: Client, settings: Settings) -> None:
    await setup_benefit(client, settings)
    await load_tiers(client, settings, {"u": 5})
    status, body = await claim(client, settings, "u", "r")  # which of several options?
    assert status == 409 and body["error"] == "option_required" and body["field"] == "option_id"
    status, body = await claim(client, settings, "u", "r", option_id="nope")
    assert status == 404 and body["error"] == "unknown_option"
    status, body = await claim(client, settings, "u", "r", benefit_id="nope", option_id="x")
    assert status == 404 and body["error"] == "unknown_benefit"
    await setup_benefit(client, settings, "single", options=[direct("only")])
    status, body = await claim(client, settings, "u", "r", benefit_id="single")
    assert status == 202 and body["option_id"] == "only"


async def test_claim_lookup_is_owner_only(client: Client, settings: Settings) -> None:
    await setup_benefit(client, settings)
    await load_tiers(client, settings, {"owner": 5})
    _, body = await claim(client, settings, "owner", "r", option_id="iqiyi")
    claim_id = body["claim_id"]
    resp = await client.get(f"/v1/claims/{claim_id}", headers=auth(settings, "owner"))
    assert resp.status == 200
    found = await resp.json()
    assert found["claim_id"] == claim_id and found["status"] == "accepted"
    resp = await client.get(f"/v1/claims/{claim_id}", headers=auth(settings, "intruder"))
    assert resp.status == 404
    resp = await client.get("/v1/claims/not-a-claim", headers=auth(settings, "owner"))
    assert resp.status == 404


async def test_member_catalogue(client: Client, settings: Settings) -> None:
    await setup_benefit(client, settings, stock=3)
    await load_tiers(client, settings, {"v5": 5, "v2": 2})
    resp = await client.get("/v1/benefits", headers=auth(settings, "v5"))
    assert resp.status == 200
    (view,) = (await resp.json())["benefits"]
    assert view["can_claim"] is True and view["quota"] == {"used": 0, "allowed": 1}
    assert view["stock_left"] == 3
    await claim(client, settings, "v5", "r", option_id="iqiyi")
    view = (await (await client.get("/v1/benefits", headers=auth(settings, "v5"))).json())[
        "benefits"
    ][0]
    assert view["can_claim"] is False and view["reason"] == "quota_exceeded"
    assert view["stock_left"] == 2
    view = (await (await client.get("/v1/benefits", headers=auth(settings, "v2"))).json())[
        "benefits"
    ][0]
    assert view["reason"] == "tier_too_low"


async def test_metrics_count_decisions(client: Client, settings: Settings) -> None:
    await setup_benefit(client, settings, stock=1)
    await load_tiers(client, settings, {"a": 5, "b": 5})

    def count(text: str, outcome: str) -> float:
        for line in text.splitlines():
            if line.startswith(f'claim_decisions_total{{outcome="{outcome}"}}'):
                return float(line.split()[-1])
        return 0.0

    before = await (await client.get("/metrics")).text()
    await claim(client, settings, "a", "r", option_id="iqiyi")
    await claim(client, settings, "b", "r", option_id="iqiyi")
    after = await (await client.get("/metrics")).text()
    assert count(after, "ok") == count(before, "ok") + 1
    assert count(after, "sold_out") == count(before, "sold_out") + 1


async def test_health(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["checks"] == {"redis": "ok", "postgres": "ok"}


async def test_catalogue_follows_changes_made_by_another_process(
    client: Client, settings: Settings
) -> None:
    await setup_benefit(client, settings, stock=3)
    await load_tiers(client, settings, {"v5": 5})
    view = (await (await client.get("/v1/benefits", headers=auth(settings, "v5"))).json())[
        "benefits"
    ][0]
    assert view["can_claim"] is True
    # Another API process pauses it: this process's cached copy is now an old version.
    await catalogue_store.set_paused(client.app[PG], client.app[REDIS], settings.tz, "video", True)
    view = (await (await client.get("/v1/benefits", headers=auth(settings, "v5"))).json())[
        "benefits"
    ][0]
    assert view["paused"] is True and view["reason"] == "paused"
    status, body = await claim(client, settings, "v5", "r", option_id="iqiyi")
    assert status == 423 and body["error"] == "paused"
