"""Anti-fraud in referral campaigns: self-referral by id or fingerprint, old customers,
invitees counted twice, revocation in the cool-off, velocity and per-referrer limits, the
budget. Each is refused, and the refusal is what the funnel and progress show."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import asyncpg
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from tests.helpers import admin
from tests.integration.campaign_kit import (
    Client,
    balance,
    claim,
    code_for,
    event_body,
    late,
    outcome,
    progress,
    put_campaign,
    reward_benefit,
    send,
    send_body,
)


async def test_self_referral_by_id_or_fingerprint_is_refused(
    bank: Client, settings: Settings
) -> None:
    await put_campaign(bank, settings, "mgm", late_registration_days=30)
    code = await code_for(bank, settings, "mgm", "ann", device_hash="dev-ann")
    # ann's own phone, known from one of her bank events
    await send(bank, "ann-card", "card_activated", "ann", phone_hash="phone-ann")
    own = await send(bank, "open-ann", "account_opened", "ann", referral_code=code)
    assert outcome(own) == ("refused", "self_referral")
    same_device = await send(
        bank, "open-x", "account_opened", "x-user", referral_code=code, device_hash="dev-ann"
    )
    assert outcome(same_device) == ("refused", "self_referral")
    same_phone = await send(
        bank, "open-y", "account_opened", "y-user", referral_code=code, phone_hash="phone-ann"
    )
    assert outcome(same_phone) == ("refused", "self_referral")
    resp = await late(bank, settings, "mgm", "ann", code)
    assert resp.status == 409 and (await resp.json())["error"] == "self_referral"
    # Another member's device is fine.
    fine = await send(
        bank, "open-z", "account_opened", "z-user", referral_code=code, device_hash="dev-z"
    )
    assert outcome(fine) == ("attributed", None)
    state = await progress(bank, settings, "mgm", "ann")
    assert state["invitees"]["attributed"] == 1
    funnel = await (
        await bank.get("/admin/v1/campaigns/mgm/funnel", headers=admin(settings))
    ).json()
    assert funnel["refused"] == {"self_referral": 4}  # three events, one late registration


async def test_an_old_customer_is_no_invitee(bank: Client, settings: Settings) -> None:
    await put_campaign(bank, settings, "mgm", late_registration_days=30)
    code = await code_for(bank, settings, "mgm", "ann")
    # An account opened two years ago, before the campaign: a second one is no new customer.
    await send(bank, "open-old-1", "account_opened", "veteran", days_ago=730)
    again = await send(bank, "open-old-2", "account_opened", "veteran", referral_code=code)
    assert outcome(again) == ("refused", "not_new_customer")
    # An account opened before the campaign started, registered late.
    await send(bank, "open-before", "account_opened", "before", days_ago=31)
    resp = await late(bank, settings, "mgm", "before", code)
    assert resp.status == 409 and (await resp.json())["error"] == "not_new_customer"
    assert (await progress(bank, settings, "mgm", "ann"))["invitees"]["attributed"] == 0


async def test_an_invitee_counts_once(bank: Client, settings: Settings, pool: asyncpg.Pool) -> None:
    await put_campaign(bank, settings, "mgm", late_registration_days=30)
    ann = await code_for(bank, settings, "mgm", "ann")
    bob = await code_for(bank, settings, "mgm", "bob")
    opened = event_body("open-1", "account_opened", "friend", referral_code=ann)
    first = await send_body(bank, opened)
    assert outcome(first) == ("attributed", None)
    replay = await send_body(bank, opened)
    assert replay["replayed"] is True and outcome(replay) == ("attributed", None)
    other = await send(bank, "open-2", "account_opened", "friend", referral_code=bob)
    assert outcome(other) == ("refused", "already_attributed")
    resp = await late(bank, settings, "mgm", "friend", bob)
    assert resp.status == 409 and (await resp.json())["error"] == "already_attributed"
    # Two qualifying events (and their replays) qualify the invitee once.
    tasks = [event_body(f"task-{i}", "wealth_task_done", "friend") for i in (1, 2)]
    for body in (*tasks, tasks[0]):
        await send_body(bank, body)
    assert (await progress(bank, settings, "mgm", "ann"))["invitees"] == {
        "attributed": 1,
        "qualified": 1,
        "revoked": 0,
    }
    assert (await progress(bank, settings, "mgm", "bob"))["invitees"]["attributed"] == 0
    # The same person with a second id but the same phone is counted once too.
    await send(bank, "open-p1", "account_opened", "p-one", referral_code=ann, phone_hash="ph")
    twin = await send(
        bank, "open-p2", "account_opened", "p-two", referral_code=bob, phone_hash="ph"
    )
    assert outcome(twin) == ("refused", "fingerprint_reused")
    assert await pool.fetchval("SELECT count(*) FROM referral_attributions") == 2


async def test_a_reward_held_in_the_cool_off_is_revoked_by_an_account_closed(
    bank: Client, settings: Settings
) -> None:
    await reward_benefit(bank, settings, "mgm-gift", stock=10)
    await put_campaign(bank, settings, "points", cool_off_days=7)
    await put_campaign(bank, settings, "gift", cool_off_days=7, reward={"benefit_id": "mgm-gift"})
    for campaign in ("points", "gift"):
        code = await code_for(bank, settings, campaign, "ann")
        for i in (1, 2):
            invitee = f"{campaign}-{i}"
            await send(bank, f"open-{invitee}", "account_opened", invitee, referral_code=code)
            await send(bank, f"task-{invitee}", "wealth_task_done", invitee)
        state = await progress(bank, settings, campaign, "ann")
        assert [r["state"] for r in state["rewards"]] == ["held"]
    assert await balance(bank, settings, "ann") == 0  # held: not credited yet
    held = await claim(bank, settings, "mgm-gift", "ann")
    assert held.status == 403 and (await held.json())["error"] == "not_eligible"
    for campaign in ("points", "gift"):
        closed = await send(bank, f"close-{campaign}-2", "account_closed", f"{campaign}-2")
        assert outcome(closed) == ("revoked", None)
        state = await progress(bank, settings, campaign, "ann")
        assert [r["state"] for r in state["rewards"]] == ["revoked"]
        assert state["invitees"] == {"attributed": 2, "qualified": 1, "revoked": 1}
    assert await balance(bank, settings, "ann") == 0
    assert (await claim(bank, settings, "mgm-gift", "ann", "r2")).status == 403
    funnel = await (
        await bank.get("/admin/v1/campaigns/points/funnel", headers=admin(settings))
    ).json()
    assert funnel["funnel"]["revoked"] == 1 and funnel["rewards"]["revoked"] == 1
    assert funnel["budget"]["rewards_granted"] == 0


async def test_a_close_after_the_cool_off_changes_nothing(bank: Client, settings: Settings) -> None:
    await put_campaign(bank, settings, "mgm", cool_off_days=7)
    code = await code_for(bank, settings, "mgm", "ann")
    for i in (1, 2):  # opened and qualified ten days ago: the cool-off is over
        await send(bank, f"open-{i}", "account_opened", f"f{i}", referral_code=code, days_ago=10)
        await send(bank, f"task-{i}", "wealth_task_done", f"f{i}", days_ago=10)
    state = await progress(bank, settings, "mgm", "ann")
    assert [r["state"] for r in state["rewards"]] == ["released"]
    assert await balance(bank, settings, "ann") == 100
    answer = await send(bank, "close-2", "account_closed", "f2")
    assert answer["campaigns"] == []
    state = await progress(bank, settings, "mgm", "ann")
    assert [r["state"] for r in state["rewards"]] == ["released"]
    assert state["invitees"]["revoked"] == 0 and await balance(bank, settings, "ann") == 100


async def test_velocity_and_per_referrer_limits_refuse_more_invitees(
    bank: Client, settings: Settings
) -> None:
    await put_campaign(bank, settings, "fast", max_invitees_per_day=2)
    await put_campaign(bank, settings, "capped", max_invitees=1)
    fast = await code_for(bank, settings, "fast", "ann")
    capped = await code_for(bank, settings, "capped", "ann")
    results = [
        outcome(await send(bank, f"open-{i}", "account_opened", f"v{i}", referral_code=fast))
        for i in range(3)
    ]
    assert results == [("attributed", None)] * 2 + [("refused", "velocity_limit")]
    results = [
        outcome(await send(bank, f"open-c{i}", "account_opened", f"c{i}", referral_code=capped))
        for i in range(2)
    ]
    assert results == [("attributed", None), ("refused", "referrer_limit")]
    # Another referrer is not slowed down by ann.
    bob = await code_for(bank, settings, "fast", "bob")
    assert outcome(await send(bank, "open-b", "account_opened", "vb", referral_code=bob)) == (
        "attributed",
        None,
    )


async def test_the_budget_is_never_exceeded(bank: Client, settings: Settings) -> None:
    await put_campaign(bank, settings, "small", budget=1, points_budget=150)
    await put_campaign(
        bank,
        settings,
        "points-bound",
        budget=10,
        points_budget=250,
        tiers=[{"count": 3, "reward": {"points": 200}}],
    )
    for campaign, referrers in (("small", ("ann", "bob")), ("points-bound", ("cy",))):
        for referrer in referrers:
            code = await code_for(bank, settings, campaign, referrer)
            for i in range(3):
                invitee = f"{campaign}-{referrer}-{i}"
                await send(bank, f"o-{invitee}", "account_opened", invitee, referral_code=code)
                await send(bank, f"t-{invitee}", "wealth_task_done", invitee)
    assert [r["state"] for r in (await progress(bank, settings, "small", "ann"))["rewards"]] == [
        "released"
    ]
    assert [r["state"] for r in (await progress(bank, settings, "small", "bob"))["rewards"]] == [
        "over_budget"
    ]
    # 100 at two fits 250 points; 200 more at three would not.
    cy = (await progress(bank, settings, "points-bound", "cy"))["rewards"]
    assert [(r["level"], r["state"]) for r in cy] == [(2, "released"), (3, "over_budget")]
    assert await balance(bank, settings, "cy") == 100


async def test_a_running_writer_releases_points_when_the_cool_off_ends(
    bank: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    await put_campaign(bank, settings, "mgm", invitees_required=1, cool_off_days=1)
    code = await code_for(bank, settings, "mgm", "ann")
    # Qualified a day less two seconds ago: held for two more seconds.
    await send(bank, "open-f", "account_opened", "friend", referral_code=code, days_ago=1)
    await send(bank, "task-f", "wealth_task_done", "friend", days_ago=1 - 2 / 86_400)
    state = await pool.fetchval("SELECT state FROM campaign_rewards")
    assert state == "held" and await balance(bank, settings, "ann") == 0
    writer = ClaimWriter(redis, pool, replace(settings, rewards_release_every_s=0.2))
    stop = asyncio.Event()
    running = asyncio.create_task(writer.run(stop))
    try:
        for _ in range(50):
            if await pool.fetchval("SELECT state FROM campaign_rewards") == "released":
                break
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await running
    assert await balance(bank, settings, "ann") == 100
