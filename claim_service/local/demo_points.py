"""The demo's points half, through the same HTTP API: three zones, an airport lounge pass in
享生活 priced in points (积点), crediting by tier (run twice: it credits once), a few
adjustments, V12+ members spending their points concurrently during the burst (some trying
more often than they can pay for: 402), and the points invariants once the writer drained.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.points import spendable_points
from claim_service.http.auth import mint_token
from claim_service.local.demo_report import DRAIN_TIMEOUT_S, say
from claim_service.store.points_mirror import is_live, member_lots, points_drift, redis_ms

# (zone_id, name, min_tier); listed in this order.
ZONES = (("hui", "惠生活", 4), ("yue", "悦生活", 8), ("xiang", "享生活", 12))
VIDEO_ZONE = "hui"
LOUNGE_ZONE = "xiang"
LOUNGE_OPTION = "lounge"
LOUNGE_PRICE = 1
LOUNGE_STOCK = 600  # more than the claimers can pay for: points, not stock, limit them
LOUNGE_QUOTA = 5  # above anyone's tries: the quota never answers before the points
POINTS_TIER = 12
EXPIRES_AFTER = 12
CLAIMERS = 400  # V12+ members going for the lounge pass (bounded: the burst stays the same)
BONUS_MEMBERS = 5
BONUS_POINTS = 2
CONCURRENCY = 16  # lounge members at a time, each sending all its tries at once
SETTLE_TIMEOUT_S = 30.0
OPEN = {"accepted", "fulfilling", "failed"}  # claim states not final yet


@dataclass
class PointsPlan:
    lounge_id: str
    period: str
    credited: dict[str, Any]  # the first crediting run's report
    again: dict[str, Any]  # the second run's
    bonus: list[str]
    points: dict[str, int]  # each claimer's spendable points as the burst starts
    tries: dict[str, int]  # how many lounge claims each claimer sends at once


@dataclass
class LoungeStats:
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    passes: Counter[str] = field(default_factory=Counter)  # accepted, by member
    odd_refusals: int = 0  # a 402 whose balance or price is not what it should be


def _admin(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.admin_token}"}


def _member(settings: Settings, user: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint_token(settings, user, 600)}


async def create_zones(http: aiohttp.ClientSession, admin_base: str, settings: Settings) -> None:
    """The zones come first: a benefit naming an unknown zone is refused."""
    for position, (zone_id, name, min_tier) in enumerate(ZONES, start=1):
        zone = {"name": name, "min_tier": min_tier, "position": position}
        async with http.put(f"{admin_base}/admin/v1/zones/{zone_id}", json=zone,
                            headers=_admin(settings)) as resp:  # fmt: skip
            resp.raise_for_status()


async def _admin_call(
    http: aiohttp.ClientSession, method: str, url: str, settings: Settings, body: Any
) -> dict[str, Any]:
    async with http.request(method, url, json=body, headers=_admin(settings)) as resp:
        resp.raise_for_status()
        reply: dict[str, Any] = await resp.json()
        return reply


async def setup_points(
    http: aiohttp.ClientSession,
    admin_base: str,
    redis: Redis,
    settings: Settings,
    lounge_id: str,
    opens: datetime,
    tiers: dict[str, int],
    seed: int,
) -> PointsPlan:
    """Crediting rules, the lounge pass and its codes, the period's crediting run twice, a few
    adjustments; then who will claim the pass and how often."""
    rules = {"rules": [{"min_tier": POINTS_TIER, "points": 1,
                        "expires_after_periods": EXPIRES_AFTER}]}  # fmt: skip
    await _admin_call(http, "PUT", f"{admin_base}/admin/v1/points/rules", settings, rules)
    lounge = {
        "name": "Airport lounge pass",
        "zone": LOUNGE_ZONE,
        "price_points": LOUNGE_PRICE,
        "min_tier": POINTS_TIER,
        "quota": [{"min_tier": POINTS_TIER, "per_period": LOUNGE_QUOTA}],
        "stock_per_period": LOUNGE_STOCK,
        "release": {"type": "once", "opens_at": opens.isoformat()},
        "options": [{"option_id": LOUNGE_OPTION, "name": "Lounge visit", "kind": "card_key"}],
    }
    await _admin_call(http, "PUT", f"{admin_base}/admin/v1/benefits/{lounge_id}", settings, lounge)
    codes = [{"code": f"LG-{lounge_id}-{i:05d}"} for i in range(LOUNGE_STOCK)]
    await _admin_call(http, "POST", f"{admin_base}/admin/v1/benefits/{lounge_id}/options/"
                      f"{LOUNGE_OPTION}/codes", settings, codes)  # fmt: skip
    period = periods.current_period(settings.tz)
    credit_url = f"{admin_base}/admin/v1/points/credit"
    credited = await _admin_call(http, "POST", credit_url, settings, {"period": period})
    again = await _admin_call(http, "POST", credit_url, settings, {"period": period})

    rng = random.Random(seed)
    vips = sorted(user for user, tier in tiers.items() if tier >= POINTS_TIER)
    rng.shuffle(vips)
    claimers = vips[:CLAIMERS]
    bonus = claimers[:BONUS_MEMBERS]
    for user in bonus:
        adjustment = {"amount": BONUS_POINTS, "reason": "demo: welcome to 享生活",
                      "reference": f"{lounge_id}:welcome:{user}"}  # fmt: skip
        await _admin_call(http, "POST", f"{admin_base}/admin/v1/points/{user}/adjust",
                          settings, adjustment)  # fmt: skip
    # What each can spend, as claim.lua will see it (on a reused database: more than 1).
    now_ms = await redis_ms(redis)
    points = {u: spendable_points(await member_lots(redis, u), now_ms) for u in claimers}
    tries = {u: points[u] + rng.choices((0, 1, 2), (55, 35, 10))[0] for u in claimers}
    say(
        f"zones {', '.join(f'{name} V{tier}+' for _, name, tier in ZONES)}; lounge pass "
        f"{lounge_id} in 享生活 ({LOUNGE_PRICE} point, {LOUNGE_STOCK} units); "
        f"{credited['credited']:,} V{POINTS_TIER}+ members credited, then "
        f"{again['credited']:,} more on a second run; {len(bonus)} given +{BONUS_POINTS}"
    )
    return PointsPlan(lounge_id, period, credited, again, bonus, points, tries)


async def lounge_rush(
    base: str, settings: Settings, plan: PointsPlan, opens: datetime, seed: int
) -> LoungeStats:
    """From the opening, the claimers send all their tries at once, ``CONCURRENCY`` members at
    a time, on connections of their own (the video burst keeps its own)."""
    stats = LoungeStats()
    rng = random.Random(seed + 1)
    url = f"{base}/v1/benefits/{plan.lounge_id}/claims"
    queue: asyncio.Queue[str] = asyncio.Queue()
    for user in plan.tries:
        queue.put_nowait(user)

    async def attempt(http: aiohttp.ClientSession, user: str, n: int) -> None:
        body = {"request_id": f"{user}-lounge-{n}", "option_id": LOUNGE_OPTION}
        while True:
            stats.sent += 1
            async with http.post(url, json=body, headers=_member(settings, user)) as resp:
                status, reply = resp.status, await resp.json()
            if status != 425:
                break
            await asyncio.sleep(max(opens.timestamp() - time.time(), 0) + rng.random() * 0.05)
        stats.outcomes[reply.get("error", "accepted")] += 1
        if status == 202:
            stats.passes[user] += 1
        elif status == 402:
            if (reply.get("price"), reply.get("balance")) != (LOUNGE_PRICE, 0):
                stats.odd_refusals += 1

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            user = queue.get_nowait()
            try:
                await asyncio.gather(*(attempt(http, user, n) for n in range(plan.tries[user])))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                stats.outcomes["client_error"] += 1

    connector = aiohttp.TCPConnector(limit=CONCURRENCY * (BONUS_POINTS + 3))
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.sleep(max(opens.timestamp() - time.time(), 0) + 0.05)
        await asyncio.gather(*(worker(http) for _ in range(CONCURRENCY)))
    return stats


async def _wait_recorded(pool: asyncpg.Pool, lounge_id: str, accepted: int) -> dict[str, int]:
    """Wait until the writer recorded every accepted pass and the card-key codes went out;
    returns the passes by status."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S + SETTLE_TIMEOUT_S
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = {r["status"]: r["n"] for r in await pool.fetch(
            "SELECT status, count(*) AS n FROM claims WHERE benefit_id = $1 GROUP BY 1",
            lounge_id)}  # fmt: skip
        if sum(counts.values()) >= accepted and not OPEN & set(counts):
            break
        await asyncio.sleep(0.2)
    return counts


def _unlocks(listing: dict[str, Any]) -> str:
    step = listing.get("next_tier")
    if not step:
        return "nothing more"
    what = [f"zone {z['name']}" for z in step["zones"]]
    what += [f"{b['name']}" for b in step["benefits"]]
    what += [f"quota {q['allowed_now']} -> {q['allowed']} of {q['name']}" for q in step["quotas"]]
    return f"V{step['tier']} unlocks " + "; ".join(what)


async def points_report(
    pool: asyncpg.Pool,
    redis: Redis,
    http: aiohttp.ClientSession,
    base: str,
    settings: Settings,
    plan: PointsPlan,
    stats: LoungeStats,
    tiers: dict[str, int],
) -> list[tuple[str, bool]]:
    """Print the points section; return the points invariants."""
    accepted = sum(stats.passes.values())
    by_status = await _wait_recorded(pool, plan.lounge_id, accepted)
    spent = int(await pool.fetchval(
        """SELECT coalesce(-sum(e.amount), 0) FROM points_entries e
           JOIN claims c ON c.claim_id = e.claim_id
           WHERE c.benefit_id = $1 AND e.kind = 'debit'""", plan.lounge_id))  # fmt: skip
    negative = int(await pool.fetchval(
        """SELECT count(*) FROM (SELECT user_id FROM points_entries GROUP BY 1
           HAVING sum(amount) < 0) x""") or 0)  # fmt: skip
    # A balance is the sum of the member's entries; their lots must hold exactly that.
    unbalanced = int(await pool.fetchval(
        """SELECT count(*) FROM (SELECT user_id, sum(amount) AS n FROM points_entries
                                 GROUP BY 1) e
           FULL JOIN (SELECT l.user_id, sum(a.amount) AS n FROM points_lots l
                      JOIN points_allocations a USING (lot_id) GROUP BY 1) l USING (user_id)
           WHERE e.n IS DISTINCT FROM l.n""") or 0)  # fmt: skip
    outstanding = int(await pool.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM points_entries") or 0)  # fmt: skip
    live = await is_live(redis)  # points_drift compares nothing while the mirror is not live
    drift = await points_drift(pool, redis)
    # The members' own view of it, for those given extra points.
    views = []
    for user in plan.bonus:
        async with http.get(f"{base}/v1/me/points", headers=_member(settings, user)) as resp:
            resp.raise_for_status()
            views.append((user, await resp.json()))
    views_ok = all(
        view["balance"] == view["available"] == plan.points[user] - stats.passes[user]
        for user, view in views
    )
    expected_passes = {u: min(n, plan.points[u]) for u, n in plan.tries.items()}
    expected_402 = sum(n - expected_passes[u] for u, n in plan.tries.items())
    v4 = next((u for u, tier in sorted(tiers.items()) if tier == 4), None)
    unlocks = "no V4 member"
    if v4 is not None:
        async with http.get(f"{base}/v1/benefits", headers=_member(settings, v4)) as resp:
            resp.raise_for_status()
            unlocks = _unlocks(await resp.json())

    first, again = plan.credited, plan.again
    say(f"== points (积点, {plan.period}; lounge pass {plan.lounge_id} in 享生活) ==")
    say(f"  members credited        {first['credited']:>10,}   ({first['points']:,} points, "
        f"V{POINTS_TIER}+ 1 a period, expiring after {EXPIRES_AFTER})")  # fmt: skip
    say(f"  credited on a 2nd run   {again['credited']:>10,}   ({again['points']:,} points; "
        f"{again['already_credited']:,} already credited)")  # fmt: skip
    say(f"  adjusted                {len(plan.bonus):>10,}   (+{BONUS_POINTS} each, by "
        "reference)")  # fmt: skip
    say(f"  lounge claimers         {len(plan.tries):>10,}   ({stats.sent:,} requests, each "
        "member's tries at once)")  # fmt: skip
    say(f"  passes accepted         {accepted:>10,}   (" + ", ".join(
        f"{k} {v:,}" for k, v in sorted(by_status.items())) + ")")  # fmt: skip
    say(f"  answered 402            {stats.outcomes['insufficient_points']:>10,}   "
        "(insufficient_points: more tries than points)")  # fmt: skip
    for code, n in sorted(stats.outcomes.items()):
        if code not in ("accepted", "insufficient_points"):
            say(f"  lounge rejected {code:<8} {n:>9,}")
    say(f"  points spent            {spent:>10,}   ({LOUNGE_PRICE} a pass)")
    say(f"  points outstanding      {outstanding:>10,}   (every member's balance)")
    say(f"  next tier of V4 {v4}      {unlocks}")
    lounge_claims = sum(by_status.values())
    return [
        ("points credited once: a second run credited 0",
         again["credited"] == 0 and again["already_credited"] == first["eligible"]),
        ("no member's points balance below zero", negative == 0),
        ("points spent == accepted lounge passes x price",
         spent == accepted * LOUNGE_PRICE and lounge_claims == accepted),
        ("each claimer got min(tries, points) passes, the other tries 402",
         dict(stats.passes) == {u: n for u, n in expected_passes.items() if n}
         and stats.outcomes["insufficient_points"] == expected_402
         and stats.odd_refusals == 0),
        ("points mirror in Redis == ledger in PostgreSQL", live and drift == []),
        ("each balance == sum of entries == what the lots hold", unbalanced == 0 and views_ok),
        ("no lounge transport errors", stats.outcomes["client_error"] == 0),
    ]  # fmt: skip
