"""Campaign rewards in PostgreSQL (``campaign_rewards``) and their mirror in Redis.

A reward is granted once per (campaign, member, level), held until ``hold_until`` (the
campaign's cool-off), then released: a benefit reward becomes claimable (``claim.lua`` reads
the member's release time from ``keyspace.rewards_key`` and refuses a claim before it), a
points reward is credited through the ledger (reference ``campaign-reward:<reward_id>``, so
exactly once however often a release is retried). Revoked and ``over_budget`` rewards count
against nothing. The budget is checked under the campaign's row lock (``grant`` runs in the
caller's transaction, which holds it), so concurrent grants never exceed it.

The mirror is written after PostgreSQL commits (``sync``): each member's value is the latest
release time of their live rewards of the benefit, or no field. A Redis that lost it gets it
back from PostgreSQL under the benefit's rewards marker (``push_rewards_from_db``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from claim_service.domain.campaigns import Campaign, Reward
from claim_service.domain.points import Adjustment
from claim_service.store import points_ledger
from claim_service.store.keyspace import rewards_key

log = logging.getLogger(__name__)

RELEASE_BATCH = 500
LIVE = ("held", "released")


@dataclass(frozen=True)
class Grant:
    user_id: str
    level: int
    reward: Reward
    hold_until: datetime


async def _used(conn: Any, campaign_id: str) -> tuple[int, int]:
    row = await conn.fetchrow(
        """SELECT count(*) AS rewards, coalesce(sum(points), 0) AS points
           FROM campaign_rewards WHERE campaign_id = $1 AND state IN ('held', 'released')""",
        campaign_id,
    )
    return int(row["rewards"]), int(row["points"])


async def grant(conn: Any, campaign: Campaign, code: str, grants: list[Grant]) -> list[str]:
    """Grant ``grants`` (all within the budget, or none: a team's gift is for all of its
    members) unless granted before; in the caller's transaction, under the campaign's lock.
    A grant the budget cannot cover is recorded ``over_budget``. Returns the benefit ids
    whose mirror changed."""
    fresh = []
    for g in grants:
        state = await conn.fetchval(
            """SELECT state FROM campaign_rewards
               WHERE campaign_id = $1 AND user_id = $2 AND level = $3 AND code = $4""",
            campaign.campaign_id,
            g.user_id,
            g.level,
            code,
        )
        if state is None or state == "revoked":
            fresh.append(g)
    if not fresh:
        return []
    rewards, points = await _used(conn, campaign.campaign_id)
    points_asked = sum(g.reward.points for g in fresh)
    fits = rewards + len(fresh) <= campaign.budget and (
        campaign.points_budget is None or points + points_asked <= campaign.points_budget
    )
    for g in fresh:
        await conn.execute(
            """INSERT INTO campaign_rewards
                   (campaign_id, user_id, level, code, benefit_id, points, state, hold_until)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (campaign_id, user_id, level, code) DO UPDATE SET
                   benefit_id = EXCLUDED.benefit_id,
                   points = EXCLUDED.points, state = EXCLUDED.state,
                   hold_until = EXCLUDED.hold_until, granted_at = now(),
                   released_at = NULL, revoked_at = NULL""",
            campaign.campaign_id,
            g.user_id,
            g.level,
            code,
            g.reward.benefit_id,
            g.reward.points or None,
            "held" if fits else "over_budget",
            g.hold_until,
        )
    if not fits:
        log.warning(
            "campaign %s: %d reward(s) over budget (%d of %d granted)",
            campaign.campaign_id,
            len(fresh),
            rewards,
            campaign.budget,
        )
        return []
    return [g.reward.benefit_id for g in fresh if g.reward.benefit_id is not None]


async def revoke_held(
    conn: Any, campaign_id: str, code: str, users: Iterable[str], *, above_level: int = 0
) -> list[tuple[str, str]]:
    """Revoke the still-held rewards ``code`` earned ``users`` above ``above_level`` (in the
    caller's transaction). Returns the (benefit id, member) pairs whose mirror changed."""
    rows = await conn.fetch(
        """UPDATE campaign_rewards SET state = 'revoked', revoked_at = now()
           WHERE campaign_id = $1 AND code = $2 AND user_id = ANY($3::text[]) AND level > $4
             AND state = 'held' AND hold_until > now()
           RETURNING benefit_id, user_id""",
        campaign_id,
        code,
        list(users),
        above_level,
    )
    return [(r["benefit_id"], r["user_id"]) for r in rows if r["benefit_id"] is not None]


async def sync(pool: asyncpg.Pool, redis: Redis, pairs: Iterable[tuple[str, str]]) -> None:
    """Write each (benefit, member)'s mirror as PostgreSQL now says (after its commit)."""
    pairs = sorted(set(pairs))
    if not pairs:
        return
    rows = await pool.fetch(
        """SELECT p.benefit_id, p.user_id,
                  (SELECT floor(extract(epoch FROM max(r.hold_until)) * 1000)::bigint
                   FROM campaign_rewards r
                   WHERE r.benefit_id = p.benefit_id AND r.user_id = p.user_id
                     AND r.state IN ('held', 'released')) AS ms
           FROM unnest($1::text[], $2::text[]) AS p(benefit_id, user_id)""",
        [b for b, _ in pairs],
        [u for _, u in pairs],
    )
    async with redis.pipeline(transaction=False) as pipe:
        for row in rows:
            key = rewards_key(row["benefit_id"])
            if row["ms"] is None:
                pipe.hdel(key, row["user_id"])
            else:
                pipe.hset(key, row["user_id"], int(row["ms"]))
        await pipe.execute()


async def released(redis: Redis, benefit_id: str, users: list[str]) -> list[int | None]:
    """When each member's reward of ``benefit_id`` is (or was) released, unix ms; None for
    a member without one."""
    found = await redis.hmget(rewards_key(benefit_id), users)
    return [None if value is None else int(value) for value in found]


async def push_rewards_from_db(pool: asyncpg.Pool, redis: Redis, benefit_id: str) -> int:
    """Mirror every member's live rewards of ``benefit_id`` from PostgreSQL. Fields are
    written, not the hash replaced: a reward granted (and mirrored) meanwhile stays."""
    rows = await pool.fetch(
        """SELECT user_id, bool_or(state IN ('held', 'released')) AS live,
                  floor(extract(epoch FROM max(hold_until)
                      FILTER (WHERE state IN ('held', 'released'))) * 1000)::bigint AS ms
           FROM campaign_rewards WHERE benefit_id = $1 GROUP BY user_id""",
        benefit_id,
    )
    key = rewards_key(benefit_id)
    live = [r for r in rows if r["live"]]
    gone = [r["user_id"] for r in rows if not r["live"]]
    async with redis.pipeline(transaction=False) as pipe:
        for start in range(0, len(live), 5_000):
            chunk = live[start : start + 5_000]
            pipe.hset(key, mapping={r["user_id"]: int(r["ms"]) for r in chunk})
        for start in range(0, len(gone), 5_000):
            pipe.hdel(key, *gone[start : start + 5_000])
        await pipe.execute()
    return len(live)


async def release_due(
    pool: asyncpg.Pool,
    redis: Redis,
    *,
    user_id: str | None = None,
    campaign_id: str | None = None,
) -> int:
    """Release the held rewards whose cool-off is over (a member's or a campaign's only):
    points are credited through the ledger first (once per reward), then the reward is
    marked released. Safe to run from any number of processes at once."""
    rows = await pool.fetch(
        """SELECT reward_id, campaign_id, user_id, benefit_id, points, hold_until
           FROM campaign_rewards
           WHERE state = 'held' AND hold_until <= now() AND ($1::text IS NULL OR user_id = $1)
             AND ($3::text IS NULL OR campaign_id = $3)
           ORDER BY hold_until LIMIT $2""",
        user_id,
        RELEASE_BATCH,
        campaign_id,
    )
    pairs = []
    for row in rows:
        if row["points"]:
            adjustment = Adjustment(
                amount=int(row["points"]),
                reason=f"campaign {row['campaign_id']} reward",
                reference=f"campaign-reward:{row['reward_id']}",
                expires_at=None,
            )
            await points_ledger.adjust(pool, redis, row["user_id"], adjustment)
        done = await pool.fetchval(
            """UPDATE campaign_rewards SET state = 'released', released_at = now()
               WHERE reward_id = $1 AND state = 'held' RETURNING true""",
            row["reward_id"],
        )
        if done and row["benefit_id"] is not None:
            pairs.append((row["benefit_id"], row["user_id"]))
    await sync(pool, redis, pairs)
    return len(rows)
