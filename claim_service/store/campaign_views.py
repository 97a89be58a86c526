"""What members and ops see of a campaign: a member's progress and the campaign's funnel."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from claim_service.domain.campaigns import Campaign, mask
from claim_service.store import campaigns

REFUSAL_LIMIT = 20


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


async def _rewards(conn: Any, campaign: Campaign, user_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT level, benefit_id, points, state, hold_until, granted_at, released_at,
                  revoked_at
           FROM campaign_rewards WHERE campaign_id = $1 AND user_id = $2 ORDER BY level""",
        campaign.campaign_id,
        user_id,
    )
    return [
        {
            "level": r["level"],
            "reward": {"benefit_id": r["benefit_id"]}
            if r["benefit_id"]
            else {"points": r["points"]},
            "state": r["state"],
            "hold_until": _time(r["hold_until"]),
            "granted_at": _time(r["granted_at"]),
            "released_at": _time(r["released_at"]),
            "revoked_at": _time(r["revoked_at"]),
        }
        for r in rows
    ]


async def progress(pool: asyncpg.Pool, campaign: Campaign, user_id: str) -> dict[str, Any]:
    """The member's code, invitees (masked), counts, next reward and rewards; for a team-up,
    their team (as its opener or a member)."""
    async with pool.acquire() as conn:
        now = await conn.fetchval("SELECT now()")
        code = await campaigns.member_code(conn, campaign.campaign_id, user_id)
        joined = await conn.fetchrow(
            """SELECT code, state FROM referral_attributions
               WHERE campaign_id = $1 AND invitee_id = $2""",
            campaign.campaign_id,
            user_id,
        )
        view: dict[str, Any] = {
            "campaign_id": campaign.campaign_id,
            "type": campaign.type,
            "open": campaign.is_open(now),
            "code": code.code if code else None,
            "referred_by_code": joined["code"] if joined else None,
        }
        team_code = code.code if code else None
        if campaign.type == "team" and joined is not None and joined["state"] != "revoked":
            team_code = joined["code"]
        rows = await conn.fetch(
            """SELECT invitee_id, state, attributed_at, qualified_at, hold_until, revoked_at
               FROM referral_attributions WHERE code = $1 ORDER BY attributed_at, invitee_id""",
            team_code,
        )
        states = [r["state"] for r in rows]
        counts = {
            "attributed": len(states),
            "qualified": states.count("qualified"),
            "revoked": states.count("revoked"),
        }
        view["invitees"] = counts
        view["invitee_list"] = [
            {
                "invitee": mask(r["invitee_id"]) if r["invitee_id"] != user_id else "you",
                "state": r["state"],
                "attributed_at": _time(r["attributed_at"]),
                "qualified_at": _time(r["qualified_at"]),
                "hold_until": _time(r["hold_until"]),
            }
            for r in rows
        ]
        if campaign.type == "referral":
            next_level = next(
                ((lvl, rw) for lvl, rw in campaign.levels() if lvl > counts["qualified"]), None
            )
            view["next_reward"] = (
                None
                if next_level is None
                else {"at": next_level[0], "reward": next_level[1].to_json()}
            )
        else:
            team = await campaigns.code_of(conn, team_code) if team_code else None
            view["team"] = None if team is None else _team(campaign, team, rows, now, user_id)
        view["rewards"] = await _rewards(conn, campaign, user_id)
    return view


def _team(
    campaign: Campaign, team: campaigns.Code, rows: list[Any], now: datetime, user_id: str
) -> dict[str, Any]:
    live = [r for r in rows if r["state"] != "revoked"]
    if team.completed_at is not None:
        state = "complete"
    elif team.expires_at is not None and team.expires_at <= now:
        state = "expired"
    elif len(live) >= campaign.invitees_required:
        state = "full"
    else:
        state = "forming"
    return {
        "code": team.code,
        "opener": "you" if team.user_id == user_id else mask(team.user_id),
        "state": state,
        "size": campaign.invitees_required + 1,
        "members": len(live) + 1,
        "expires_at": _time(team.expires_at),
        "completed_at": _time(team.completed_at),
    }


async def funnel(pool: asyncpg.Pool, campaign: Campaign) -> dict[str, Any]:
    """Codes issued -> attributed -> qualified -> rewarded -> revoked, with conversion rates,
    refusals by reason, and the budget."""
    cid = campaign.campaign_id
    async with pool.acquire() as conn:
        codes = await conn.fetchval(
            "SELECT count(*) FROM referral_codes WHERE campaign_id = $1", cid
        )
        people: Any = await conn.fetchrow(
            """SELECT count(*) AS attributed,
                      count(*) FILTER (WHERE qualified_at IS NOT NULL) AS qualified,
                      count(*) FILTER (WHERE state = 'revoked') AS revoked,
                      count(*) FILTER (WHERE source = 'late') AS late
               FROM referral_attributions WHERE campaign_id = $1""",
            cid,
        )
        rewards = {
            r["state"]: (int(r["n"]), int(r["points"]))
            for r in await conn.fetch(
                """SELECT state, count(*) AS n, coalesce(sum(points), 0) AS points
                   FROM campaign_rewards WHERE campaign_id = $1 GROUP BY state""",
                cid,
            )
        }
        refusals = {
            r["reason"]: int(r["n"])
            for r in await conn.fetch(
                """SELECT reason, count(*) AS n FROM referral_refusals WHERE campaign_id = $1
                   GROUP BY reason ORDER BY n DESC LIMIT $2""",
                cid,
                REFUSAL_LIMIT,
            )
        }
    held, released = rewards.get("held", (0, 0)), rewards.get("released", (0, 0))
    revoked = rewards.get("revoked", (0, 0))[0]
    granted = held[0] + released[0]
    rewarded = granted + revoked
    stages = {
        "codes_issued": int(codes),
        "attributed": int(people["attributed"]),
        "qualified": int(people["qualified"]),
        "rewarded": rewarded,
        "revoked": revoked,
    }
    return {
        "campaign_id": cid,
        "type": campaign.type,
        "funnel": stages,
        "conversion": {
            "attributed_per_code": _ratio(stages["attributed"], stages["codes_issued"]),
            "qualified_per_attributed": _ratio(stages["qualified"], stages["attributed"]),
            "rewarded_per_qualified": _ratio(rewarded, stages["qualified"]),
            "revoked_per_rewarded": _ratio(revoked, rewarded),
        },
        "invitees_revoked": int(people["revoked"]),
        "late_attributions": int(people["late"]),
        "refused": refusals,
        "rewards": {
            "held": held[0],
            "released": released[0],
            "revoked": revoked,
            "over_budget": rewards.get("over_budget", (0, 0))[0],
        },
        "budget": {
            "rewards": campaign.budget,
            "rewards_granted": granted,
            "points": campaign.points_budget,
            "points_granted": held[1] + released[1],
        },
    }
