"""Referral and team-up campaigns end to end over HTTP: codes, attribution by the bank's
events and late registration, qualification, rewards claimed through the claim path or
credited as points, tiers, team-ups that complete and expire, progress and the funnel."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.store.keyspace import BenefitKeys, rewards_key, rewards_live_key
from tests.helpers import admin, auth
from tests.integration.campaign_kit import (
    Client,
    balance,
    claim,
    code_for,
    late,
    outcome,
    progress,
    put_campaign,
    reward_benefit,
    send,
)


async def test_a_campaign_is_created_replaced_and_listed(bank: Client, settings: Settings) -> None:
    created = await put_campaign(
        bank, settings, "mgm", tiers=[{"count": 3, "reward": {"points": 300}}]
    )
    assert created["version"] == 1 and created["type"] == "referral"
    assert created["tiers"] == [{"count": 3, "reward": {"points": 300}}]
    replaced = await put_campaign(bank, settings, "mgm", budget=5)
    assert replaced["version"] == 2 and replaced["budget"] == 5 and replaced["tiers"] == []
    resp = await bank.put(
        "/admin/v1/campaigns/mgm",
        json={**replaced, "type": "team"},
        headers=admin(settings),
    )
    assert resp.status == 409 and (await resp.json())["error"] == "type_fixed"
    # A reward benefit must be one only rewarded members may claim.
    resp = await bank.put(
        "/admin/v1/campaigns/other",
        json={**replaced, "reward": {"benefit_id": "nope"}},
        headers=admin(settings),
    )
    assert resp.status == 422 and (await resp.json())["error"] == "invalid_reward"
    listing = await (await bank.get("/admin/v1/campaigns", headers=admin(settings))).json()
    assert [c["campaign_id"] for c in listing["campaigns"]] == ["mgm"]
    unknown = await bank.get("/admin/v1/campaigns/none", headers=admin(settings))
    assert unknown.status == 404 and (await unknown.json())["error"] == "unknown_campaign"


async def test_a_code_is_stable_and_comes_with_a_link(bank: Client, settings: Settings) -> None:
    await put_campaign(bank, settings, "mgm")
    first = await bank.post("/v1/campaigns/mgm/referral-code", headers=auth(settings, "ref"))
    assert first.status == 201, await first.text()
    body = await first.json()
    assert body["link"] == f"claimapp://referral?campaign=mgm&code={body['code']}"
    retries = await asyncio.gather(
        *(
            bank.post("/v1/campaigns/mgm/referral-code", headers=auth(settings, "ref"))
            for _ in range(5)
        )
    )
    assert {r.status for r in retries} == {200}
    assert {(await r.json())["code"] for r in retries} == {body["code"]}
    other = await code_for(bank, settings, "mgm", "someone-else")
    assert other != body["code"]
    await put_campaign(
        bank,
        settings,
        "later",
        starts_at="2099-01-01T00:00:00+08:00",
        ends_at="2099-02-01T00:00:00+08:00",
    )
    closed = await bank.post("/v1/campaigns/later/referral-code", headers=auth(settings, "ref"))
    assert closed.status == 409 and (await closed.json())["error"] == "campaign_not_open"
    unknown = await bank.post("/v1/campaigns/none/referral-code", headers=auth(settings, "ref"))
    assert unknown.status == 404


async def test_a_referrer_with_two_qualified_invitees_claims_the_reward(
    bank: Client, settings: Settings
) -> None:
    await reward_benefit(bank, settings, "mgm-gift", stock=1)
    await put_campaign(bank, settings, "mgm", reward={"benefit_id": "mgm-gift"})
    codes = {r: await code_for(bank, settings, "mgm", r) for r in ("ann", "bob")}
    refused = await claim(bank, settings, "mgm-gift", "ann")
    assert refused.status == 403 and (await refused.json())["error"] == "not_eligible"
    for referrer, invitees in (("ann", ("a1", "a2")), ("bob", ("b1", "b2"))):
        for invitee in invitees:
            answer = await send(
                bank,
                f"open-{invitee}",
                "account_opened",
                invitee,
                referral_code=codes[referrer].lower(),  # typed by hand: any case
            )
            assert outcome(answer) == ("attributed", None)
    state = await progress(bank, settings, "mgm", "ann")
    assert state["invitees"] == {"attributed": 2, "qualified": 0, "revoked": 0}
    assert state["next_reward"] == {"at": 2, "reward": {"benefit_id": "mgm-gift"}}
    assert [i["invitee"] for i in state["invitee_list"]] == ["a***", "a***"]  # masked
    assert (await send(bank, "task-a1", "wealth_task_done", "a1"))["campaigns"][0]["outcome"] == (
        "qualified"
    )
    assert (await claim(bank, settings, "mgm-gift", "ann")).status == 403  # one of two
    await send(bank, "task-a2", "wealth_task_done", "a2")
    state = await progress(bank, settings, "mgm", "ann")
    assert state["invitees"]["qualified"] == 2 and state["next_reward"] is None
    assert [(r["level"], r["state"]) for r in state["rewards"]] == [(2, "released")]
    accepted = await claim(bank, settings, "mgm-gift", "ann")
    assert accepted.status == 202, await accepted.text()
    # bob gets there second: the reward's stock (1) is gone, first come first served.
    await send(bank, "task-b1", "wealth_task_done", "b1")
    await send(bank, "task-b2", "wealth_task_done", "b2")
    late_comer = await claim(bank, settings, "mgm-gift", "bob")
    assert late_comer.status == 410 and (await late_comer.json())["error"] == "sold_out"
    # An invitee's progress says who referred them; a stranger has none.
    assert (await progress(bank, settings, "mgm", "a1"))["referred_by_code"] == codes["ann"]
    stranger = await progress(bank, settings, "mgm", "nobody")
    assert stranger["code"] is None and stranger["rewards"] == []
    funnel = await (
        await bank.get("/admin/v1/campaigns/mgm/funnel", headers=admin(settings))
    ).json()
    assert funnel["funnel"] == {
        "codes_issued": 2,
        "attributed": 4,
        "qualified": 4,
        "rewarded": 2,
        "revoked": 0,
    }
    assert funnel["conversion"]["attributed_per_code"] == 2.0
    assert funnel["conversion"]["rewarded_per_qualified"] == 0.5
    assert funnel["budget"]["rewards_granted"] == 2


async def test_tier_rewards_come_at_three_and_five(bank: Client, settings: Settings) -> None:
    await reward_benefit(bank, settings, "fee-waiver", stock=10)
    await put_campaign(
        bank,
        settings,
        "cards",
        qualify_event="first_swipe",
        reward={"points": 100},
        tiers=[
            {"count": 3, "reward": {"points": 300}},
            {"count": 5, "reward": {"benefit_id": "fee-waiver"}},
        ],
    )
    code = await code_for(bank, settings, "cards", "ann")
    for i in range(5):
        await send(bank, f"open-{i}", "account_opened", f"friend-{i}", referral_code=code)
    levels = []
    for i in range(5):
        await send(bank, f"swipe-{i}", "first_swipe", f"friend-{i}")
        state = await progress(bank, settings, "cards", "ann")
        levels.append([r["level"] for r in state["rewards"]])
        if i == 3:
            assert state["next_reward"] == {"at": 5, "reward": {"benefit_id": "fee-waiver"}}
            assert (await claim(bank, settings, "fee-waiver", "ann")).status == 403
    assert levels == [[], [2], [2, 3], [2, 3], [2, 3, 5]]
    assert {r["state"] for r in state["rewards"]} == {"released"}
    assert await balance(bank, settings, "ann") == 400  # 100 at two, 300 at three
    assert (await claim(bank, settings, "fee-waiver", "ann")).status == 202
    # Points are credited once however often the release runs.
    await progress(bank, settings, "cards", "ann")
    assert await balance(bank, settings, "ann") == 400


async def test_a_team_up_completes_and_each_member_claims_the_gift(
    bank: Client, settings: Settings
) -> None:
    await reward_benefit(bank, settings, "team-gift", stock=10)
    await put_campaign(bank, settings, "trio", type="team", reward={"benefit_id": "team-gift"})
    code = await code_for(bank, settings, "trio", "opener")
    for joiner in ("j1", "j2"):
        answer = await send(bank, f"open-{joiner}", "account_opened", joiner, referral_code=code)
        assert outcome(answer) == ("attributed", None)
    full = await send(bank, "open-j3", "account_opened", "j3", referral_code=code)
    assert outcome(full) == ("refused", "team_full")
    state = await progress(bank, settings, "trio", "j1")
    assert state["team"]["state"] == "full" and state["team"]["opener"] == "op***er"
    assert state["team"]["members"] == 3 == state["team"]["size"]
    for member in ("j1", "j2"):
        await send(bank, f"task-{member}", "wealth_task_done", member)
    # Not yet: the opener has not qualified.
    assert (await claim(bank, settings, "team-gift", "j1")).status == 403
    await send(bank, "task-opener", "wealth_task_done", "opener")
    for member in ("opener", "j1", "j2"):
        resp = await claim(bank, settings, "team-gift", member)
        assert resp.status == 202, (member, await resp.text())
    assert (await claim(bank, settings, "team-gift", "j3")).status == 403
    state = await progress(bank, settings, "trio", "opener")
    assert state["team"]["state"] == "complete"
    assert [r["state"] for r in state["rewards"]] == ["released"]
    # A completed team stays the opener's team.
    assert await code_for(bank, settings, "trio", "opener") == code


async def test_a_team_up_expires_unfinished(bank: Client, settings: Settings) -> None:
    await reward_benefit(bank, settings, "team-gift", stock=10)
    await put_campaign(
        bank, settings, "trio", type="team", reward={"benefit_id": "team-gift"}, team_ttl_seconds=2
    )
    code = await code_for(bank, settings, "trio", "opener")
    await send(bank, "open-j1", "account_opened", "j1", referral_code=code)
    await send(bank, "task-opener", "wealth_task_done", "opener")
    await send(bank, "task-j1", "wealth_task_done", "j1")
    await asyncio.sleep(3.2)  # the opening event (1 s old) is now past the expiry too
    expired = await send(bank, "open-j2", "account_opened", "j2", referral_code=code)
    assert outcome(expired) == ("refused", "team_expired")
    state = await progress(bank, settings, "trio", "opener")
    assert state["team"]["state"] == "expired" and state["rewards"] == []
    assert (await claim(bank, settings, "team-gift", "j1")).status == 403
    # The opener may open a new team now, with a new code.
    assert await code_for(bank, settings, "trio", "opener") != code


async def test_late_attribution_inside_and_outside_the_window(
    bank: Client, settings: Settings
) -> None:
    await put_campaign(bank, settings, "mgm", late_registration_days=7)
    code = await code_for(bank, settings, "mgm", "ann")
    await send(bank, "open-recent", "account_opened", "recent", days_ago=3)
    await send(bank, "open-old", "account_opened", "too-late", days_ago=9)
    inside = await late(bank, settings, "mgm", "recent", code)
    assert inside.status == 201, await inside.text()
    again = await late(bank, settings, "mgm", "recent", code)
    assert again.status == 200
    outside = await late(bank, settings, "mgm", "too-late", code)
    assert outside.status == 409 and (await outside.json())["error"] == "late_window_closed"
    never = await late(bank, settings, "mgm", "no-account", code)
    assert never.status == 409 and (await never.json())["error"] == "not_new_customer"
    unknown = await late(bank, settings, "mgm", "recent", "ABCDEFGH")
    assert unknown.status == 404 and (await unknown.json())["error"] == "unknown_code"
    malformed = await late(bank, settings, "mgm", "recent", "not a code!")
    assert malformed.status == 400
    state = await progress(bank, settings, "mgm", "ann")
    assert state["invitees"]["attributed"] == 1
    funnel = await (
        await bank.get("/admin/v1/campaigns/mgm/funnel", headers=admin(settings))
    ).json()
    assert funnel["late_attributions"] == 1 and funnel["refused"] == {"late_window_closed": 1}
    # A campaign without a late window refuses every late registration.
    await put_campaign(bank, settings, "strict")
    strict = await code_for(bank, settings, "strict", "ann")
    refused = await late(bank, settings, "strict", "recent", strict)
    assert refused.status == 409 and (await refused.json())["error"] == "late_window_closed"


async def test_a_released_reward_survives_redis_losing_its_mirror(
    bank: Client, settings: Settings, redis: Redis
) -> None:
    await reward_benefit(bank, settings, "mgm-gift", stock=5)
    await put_campaign(
        bank, settings, "mgm", invitees_required=1, reward={"benefit_id": "mgm-gift"}
    )
    code = await code_for(bank, settings, "mgm", "ann")
    await send(bank, "open-f", "account_opened", "friend", referral_code=code)
    await send(bank, "task-f", "wealth_task_done", "friend")
    assert await redis.hget(rewards_key("mgm-gift"), "ann") is not None
    # The server restarted empty, say: the mirror and the benefit's marker are gone.
    await redis.delete(
        rewards_key("mgm-gift"), rewards_live_key("mgm-gift"), BenefitKeys("mgm-gift").live
    )
    resp = await claim(bank, settings, "mgm-gift", "ann")
    assert resp.status == 202, await resp.text()
    assert (await claim(bank, settings, "mgm-gift", "friend")).status == 403


async def test_a_member_in_two_teams_is_rewarded_by_each(bank: Client, settings: Settings) -> None:
    await put_campaign(bank, settings, "duo", type="team", invitees_required=1)
    first = await code_for(bank, settings, "duo", "opener")
    await send(bank, "open-both", "account_opened", "both", referral_code=first)
    second = await code_for(bank, settings, "duo", "both")  # the new customer opens a team too
    await send(bank, "open-last", "account_opened", "last", referral_code=second)
    for member in ("opener", "both", "last"):
        await send(bank, f"task-{member}", "wealth_task_done", member)
    state = await progress(bank, settings, "duo", "both")
    assert state["team"]["state"] == "complete" and len(state["rewards"]) == 2
    assert await balance(bank, settings, "both") == 200
    assert await balance(bank, settings, "opener") == 100 == await balance(bank, settings, "last")
