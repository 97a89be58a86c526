"""How far a referrer or a team has got, and what that earns (see ``store.referrals``):
invitees qualify, and ``settle`` grants the rewards reached, in the caller's transaction
(which holds the campaign's row lock)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from claim_service.domain.campaigns import Campaign
from claim_service.store import campaign_rewards
from claim_service.store.campaign_rewards import Grant
from claim_service.store.campaigns import Code


def qualify_by(campaign: Campaign, code: Code) -> datetime:
    """A qualifying event counts before the campaign ends (and a team expires)."""
    if code.expires_at is not None:
        return min(campaign.ends_at, code.expires_at)
    return campaign.ends_at


async def qualify(
    conn: Any, campaign: Campaign, code: Code, invitee: str, event_id: str, at: datetime
) -> bool:
    done = await conn.fetchval(
        """UPDATE referral_attributions SET state = 'qualified', qualified_at = $3,
               qualify_event_id = $4, hold_until = $5
           WHERE campaign_id = $1 AND invitee_id = $2 AND state = 'attributed'
           RETURNING true""",
        campaign.campaign_id,
        invitee,
        at,
        event_id,
        at + timedelta(days=campaign.cool_off_days),
    )
    return bool(done)


async def team_members(conn: Any, code: Code) -> list[str]:
    rows = await conn.fetch(
        "SELECT invitee_id FROM referral_attributions WHERE code = $1", code.code
    )
    return [code.user_id, *(r["invitee_id"] for r in rows)]


async def settle(conn: Any, campaign: Campaign, code: Code) -> list[tuple[str, str]]:
    """Grant what the code's member (a team: every member) has now earned."""
    if campaign.type == "team":
        return await _settle_team(conn, campaign, code)
    rows = await conn.fetch(
        """SELECT hold_until FROM referral_attributions
           WHERE campaign_id = $1 AND referrer_id = $2 AND state = 'qualified'
           ORDER BY qualified_at, invitee_id""",
        campaign.campaign_id,
        code.user_id,
    )
    holds = [r["hold_until"] for r in rows]
    grants = [
        Grant(code.user_id, level, reward, max(holds[:level]))
        for level, reward in campaign.levels()
        if level <= len(holds)
    ]
    changed: list[tuple[str, str]] = []
    for g in grants:  # each level on its own: a tier beyond the budget leaves the others
        benefits = await campaign_rewards.grant(conn, campaign, code.code, [g])
        changed += [(b, g.user_id) for b in benefits]
    return changed


async def _settle_team(conn: Any, campaign: Campaign, code: Code) -> list[tuple[str, str]]:
    if code.completed_at is not None or code.expires_at is None:
        return []
    rows = await conn.fetch(
        """SELECT invitee_id, state, hold_until, qualified_at FROM referral_attributions
           WHERE code = $1 AND state <> 'revoked'""",
        code.code,
    )
    if len(rows) < campaign.invitees_required or any(r["state"] != "qualified" for r in rows):
        return []
    # The opener qualifies with the same event, from the campaign's start.
    opener_at = await conn.fetchval(
        """SELECT min(occurred_at) FROM bank_events
           WHERE user_id = $1 AND type = $2 AND occurred_at >= $3 AND occurred_at < $4""",
        code.user_id,
        campaign.qualify_event,
        campaign.starts_at,
        qualify_by(campaign, code),
    )
    if opener_at is None:
        return []
    cool_off = timedelta(days=campaign.cool_off_days)
    hold = max([opener_at + cool_off, *(r["hold_until"] for r in rows)])
    completed = max([opener_at, *(r["qualified_at"] for r in rows)])
    await conn.execute(
        "UPDATE referral_codes SET completed_at = $2 WHERE code = $1", code.code, completed
    )
    members = [code.user_id, *(r["invitee_id"] for r in rows)]
    grants = [Grant(m, campaign.invitees_required, campaign.reward, hold) for m in members]
    benefits = await campaign_rewards.grant(conn, campaign, code.code, grants)
    return [(b, m) for b in set(benefits) for m in members]
