"""What bank events and late registrations do to campaigns (see ``domain.campaigns``).

Each step on a campaign runs in one transaction holding the campaign's row lock, so the
checks (an invitee counted once, a team not over-full, the referrer's velocity, the budget)
and what follows from them are decided one at a time. Every step is idempotent: a replayed
event finds what its first delivery did (an attribution, or the refusal recorded for that
very event) and changes nothing; a first delivery that failed half-way is completed.

Refusals (anti-fraud): ``self_referral`` (the invitee is the code's member, or shares a phone
or device fingerprint with them), ``not_new_customer`` (an earlier account opening, or one
before the campaign), ``already_attributed`` (to another code), ``fingerprint_reused`` (an
invitee of the campaign already has that phone or device), ``velocity_limit`` and
``referrer_limit`` (the referrer's invitees per 24 hours and in all), ``team_full``,
``team_expired``, ``campaign_ended``, ``campaign_paused``, ``late_window_closed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from claim_service.domain.bank_events import BankEvent
from claim_service.domain.campaigns import Campaign, fingerprints, normalise_code
from claim_service.errors import ConflictError, NotFoundError, ValidationError
from claim_service.store import campaign_rewards, campaigns, referral_settle
from claim_service.store.campaigns import Code


@dataclass(frozen=True)
class Outcome:
    campaign_id: str
    outcome: str  # attributed | refused | qualified | revoked
    reason: str | None = None
    referrer_id: str | None = None
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"campaign_id": self.campaign_id, "outcome": self.outcome}
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class Opening:
    """An invitee's account opening: the event it is attributed by."""

    event_id: str
    user_id: str
    occurred_at: datetime
    attrs: dict[str, Any]


class Changes:
    """The (benefit, member) mirrors a step changed, written after its commit."""

    def __init__(self) -> None:
        self.pairs: set[tuple[str, str]] = set()
        self.campaigns: set[str] = set()  # rewards granted there may be due at once

    async def apply(self, pool: asyncpg.Pool, redis: Redis) -> None:
        """After the commit: the mirrors, then the rewards already out of their cool-off."""
        await campaign_rewards.sync(pool, redis, self.pairs)
        for campaign_id in sorted(self.campaigns):
            await campaign_rewards.release_due(pool, redis, campaign_id=campaign_id)

    def add(self, pairs: Any, settled: Campaign | None = None) -> None:
        self.pairs.update(pairs)
        if settled is not None:
            self.campaigns.add(settled.campaign_id)


async def on_event(pool: asyncpg.Pool, redis: Redis, event: BankEvent) -> list[Outcome]:
    """Apply a stored bank event (new or replayed) to every campaign it concerns."""
    changes = Changes()
    outcomes: list[Outcome] = []
    code = None
    if event.type == "account_opened" and "referral_code" in event.attrs:
        try:
            code_text = normalise_code(event.attrs["referral_code"])
        except ValidationError:
            code_text = None  # not a code we could have issued: the event is only stored
        if code_text is not None:
            async with pool.acquire() as conn:
                code = await campaigns.code_of(conn, code_text)
        if code is not None:
            opening = Opening(event.event_id, event.user_id, event.occurred_at, event.attrs)
            outcomes.append(await _attribute(pool, code, opening, "event", changes))
    if event.type == "account_closed":
        outcomes += await _closed(pool, event, changes)
    else:
        outcomes += await _qualified(pool, event, changes)
    await changes.apply(pool, redis)
    return outcomes


async def register_late(
    pool: asyncpg.Pool, redis: Redis, campaign_id: str, code_text: str, invitee: str
) -> Outcome:
    """A new customer registers a missed referral (补登) within the campaign's late window
    of their account opening. Raises ``ConflictError`` with the refusal's reason."""
    async with pool.acquire() as conn:
        await campaigns.load(conn, campaign_id)
        code = await campaigns.code_of(conn, code_text)
        row = await conn.fetchrow(
            """SELECT event_id, user_id, occurred_at, attrs FROM bank_events
               WHERE user_id = $1 AND type = 'account_opened'
               ORDER BY occurred_at, event_id LIMIT 1""",
            invitee,
        )
    if code is None or code.campaign_id != campaign_id:
        raise NotFoundError("unknown_code", "no such referral code in this campaign")
    if row is None:
        raise ConflictError("not_new_customer", "no account opening is known for this member")
    attrs = row["attrs"]
    opening = Opening(row["event_id"], invitee, row["occurred_at"], _json(attrs))
    changes = Changes()
    outcome = await _attribute(pool, code, opening, "late", changes)
    await changes.apply(pool, redis)
    if outcome.outcome == "refused":
        raise ConflictError(str(outcome.reason), _MESSAGES.get(str(outcome.reason), "refused"))
    return outcome


_MESSAGES = {
    "self_referral": "a member cannot be their own referrer",
    "not_new_customer": "only a new customer (a first account opening) can be referred",
    "already_attributed": "this member was referred with another code",
    "fingerprint_reused": "an invitee with this phone or device was already referred",
    "velocity_limit": "the referrer has had too many invitees in the last 24 hours",
    "referrer_limit": "the referrer has had all the invitees the campaign counts",
    "team_full": "the team is full",
    "team_expired": "the team has expired",
    "campaign_ended": "the account was opened after the campaign ended",
    "campaign_paused": "the campaign is paused",
    "late_window_closed": "the window to register a referral late has closed",
}


def _json(value: Any) -> dict[str, Any]:
    """A jsonb column (asyncpg returns it as text)."""
    return value if isinstance(value, dict) else dict(orjson.loads(value))


async def _attribute(
    pool: asyncpg.Pool, code: Code, opening: Opening, source: str, changes: Changes
) -> Outcome:
    invitee = opening.user_id
    async with pool.acquire() as conn, conn.transaction():
        campaign = await campaigns.load(conn, code.campaign_id, lock=True)
        cid = campaign.campaign_id
        found = await conn.fetchrow(
            "SELECT code, state FROM referral_attributions WHERE campaign_id=$1 AND invitee_id=$2",
            cid,
            invitee,
        )
        if found is not None and found["code"] == code.code:
            return Outcome(cid, "attributed", referrer_id=code.user_id, replayed=True)
        attempt = opening.event_id if source == "event" else None
        if attempt is not None:  # a replayed event gets the answer its first delivery got
            earlier = await conn.fetchval(
                """SELECT reason FROM referral_refusals
                   WHERE campaign_id = $1 AND invitee_id = $2 AND attempt = $3""",
                cid,
                invitee,
                attempt,
            )
            if earlier is not None:
                return Outcome(cid, "refused", earlier, code.user_id, replayed=True)
        now = await conn.fetchval("SELECT now()")
        reason = await _refusal(conn, campaign, code, opening, source, now, found is not None)
        if reason is not None:
            await conn.execute(
                """INSERT INTO referral_refusals (campaign_id, invitee_id, code, reason, attempt)
                   VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""",
                cid,
                invitee,
                code.code,
                reason,
                attempt or f"late:{reason}",
            )
            return Outcome(cid, "refused", reason, code.user_id)
        await conn.execute(
            """INSERT INTO referral_attributions (campaign_id, invitee_id, referrer_id, code,
                   source, opened_event_id, opened_at, fingerprints)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            cid,
            invitee,
            code.user_id,
            code.code,
            source,
            opening.event_id,
            opening.occurred_at,
            fingerprints(opening.attrs),
        )
        # The invitee may have qualified before its opening's event arrived.
        event = await conn.fetchrow(
            """SELECT event_id, occurred_at FROM bank_events
               WHERE user_id = $1 AND type = $2 AND occurred_at >= $3 AND occurred_at < $4
               ORDER BY occurred_at, event_id LIMIT 1""",
            invitee,
            campaign.qualify_event,
            opening.occurred_at,
            referral_settle.qualify_by(campaign, code),
        )
        if event is not None:
            await referral_settle.qualify(
                conn, campaign, code, invitee, event["event_id"], event["occurred_at"]
            )
            changes.add(await referral_settle.settle(conn, campaign, code), campaign)
        elif campaign.type == "team":
            changes.add(await referral_settle.settle(conn, campaign, code), campaign)
    return Outcome(cid, "attributed", referrer_id=code.user_id)


async def _refusal(
    conn: Any,
    campaign: Campaign,
    code: Code,
    opening: Opening,
    source: str,
    now: datetime,
    attributed: bool,
) -> str | None:
    cid, invitee = campaign.campaign_id, opening.user_id
    if invitee == code.user_id:
        return "self_referral"
    mine = set(fingerprints(opening.attrs))
    if mine & await campaigns.referrer_fingerprints(conn, code):
        return "self_referral"
    if attributed:
        return "already_attributed"
    earlier = await conn.fetchval(
        """SELECT true FROM bank_events WHERE user_id = $1 AND type = 'account_opened'
             AND (occurred_at, event_id) < ($2, $3) LIMIT 1""",
        invitee,
        opening.occurred_at,
        opening.event_id,
    )
    if earlier or opening.occurred_at < campaign.starts_at:
        return "not_new_customer"
    if opening.occurred_at >= campaign.ends_at:
        return "campaign_ended"
    if campaign.paused:
        return "campaign_paused"
    if source == "late" and now > opening.occurred_at + timedelta(
        days=campaign.late_registration_days
    ):
        return "late_window_closed"
    if mine and await conn.fetchval(
        """SELECT true FROM referral_attributions WHERE campaign_id = $1
             AND state <> 'revoked' AND fingerprints && $2::text[] LIMIT 1""",
        cid,
        sorted(mine),
    ):
        return "fingerprint_reused"
    if campaign.type == "team":
        joined_at = opening.occurred_at if source == "event" else now
        if code.expires_at is not None and joined_at >= code.expires_at:
            return "team_expired"
        members = await conn.fetchval(
            "SELECT count(*) FROM referral_attributions WHERE code = $1 AND state <> 'revoked'",
            code.code,
        )
        if members >= campaign.invitees_required:
            return "team_full"
    counts = await conn.fetchrow(
        """SELECT count(*) FILTER (WHERE state <> 'revoked') AS live,
                  count(*) FILTER (WHERE attributed_at > $3::timestamptz - interval '1 day')
                      AS today
           FROM referral_attributions WHERE campaign_id = $1 AND referrer_id = $2""",
        cid,
        code.user_id,
        now,
    )
    if campaign.max_invitees_per_day is not None and counts["today"] >= (
        campaign.max_invitees_per_day
    ):
        return "velocity_limit"
    if campaign.max_invitees is not None and counts["live"] >= campaign.max_invitees:
        return "referrer_limit"
    return None


async def _qualified(pool: asyncpg.Pool, event: BankEvent, changes: Changes) -> list[Outcome]:
    """``event`` may qualify the member as an invitee, or as a team's opener."""
    outcomes = []
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT a.campaign_id, a.code, false AS opener FROM referral_attributions a
               JOIN campaigns c USING (campaign_id)
               WHERE a.invitee_id = $1 AND a.state = 'attributed'
                 AND c.definition->>'qualify_event' = $2
               UNION ALL
               SELECT r.campaign_id, r.code, true FROM referral_codes r
               JOIN campaigns c USING (campaign_id)
               WHERE r.user_id = $1 AND c.type = 'team' AND r.completed_at IS NULL
                 AND c.definition->>'qualify_event' = $2""",
            event.user_id,
            event.type,
        )
    for row in rows:
        async with pool.acquire() as conn, conn.transaction():
            campaign = await campaigns.load(conn, row["campaign_id"], lock=True)
            code = await campaigns.code_of(conn, row["code"])
            assert code is not None
            at = event.occurred_at
            if row["opener"]:
                changes.add(await referral_settle.settle(conn, campaign, code), campaign)
                continue
            opened = await conn.fetchval(
                """SELECT opened_at FROM referral_attributions
                   WHERE campaign_id = $1 AND invitee_id = $2""",
                campaign.campaign_id,
                event.user_id,
            )
            if not opened <= at < referral_settle.qualify_by(campaign, code):
                continue
            if await referral_settle.qualify(
                conn, campaign, code, event.user_id, event.event_id, at
            ):
                outcomes.append(Outcome(campaign.campaign_id, "qualified", None, code.user_id))
                changes.add(await referral_settle.settle(conn, campaign, code), campaign)
    return outcomes


async def _closed(pool: asyncpg.Pool, event: BankEvent, changes: Changes) -> list[Outcome]:
    """An invitee's account closed: the invitee no longer counts unless the cool-off of its
    qualification was already over; rewards it held up are revoked while still held."""
    outcomes = []
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT campaign_id FROM referral_attributions
               WHERE invitee_id = $1 AND state <> 'revoked'""",
            event.user_id,
        )
    for row in rows:
        async with pool.acquire() as conn, conn.transaction():
            campaign = await campaigns.load(conn, row["campaign_id"], lock=True)
            found = await conn.fetchrow(
                """UPDATE referral_attributions SET state = 'revoked', revoked_at = now()
                   WHERE campaign_id = $1 AND invitee_id = $2 AND state <> 'revoked'
                     AND (hold_until IS NULL OR ($3 < hold_until AND now() < hold_until))
                   RETURNING code, referrer_id""",
                campaign.campaign_id,
                event.user_id,
                event.occurred_at,
            )
            if found is None:
                continue
            code = await campaigns.code_of(conn, found["code"])
            assert code is not None
            outcomes.append(Outcome(campaign.campaign_id, "revoked", None, code.user_id))
            if campaign.type == "team":
                members = await referral_settle.team_members(conn, code)
                changes.add(
                    await campaign_rewards.revoke_held(
                        conn, campaign.campaign_id, code.code, members
                    )
                )
                await conn.execute(
                    "UPDATE referral_codes SET completed_at = NULL WHERE code = $1", code.code
                )
            else:
                count = await conn.fetchval(
                    """SELECT count(*) FROM referral_attributions
                       WHERE campaign_id = $1 AND referrer_id = $2 AND state = 'qualified'""",
                    campaign.campaign_id,
                    code.user_id,
                )
                changes.add(
                    await campaign_rewards.revoke_held(
                        conn, campaign.campaign_id, code.code, [code.user_id], above_level=count
                    )
                )
    return outcomes
