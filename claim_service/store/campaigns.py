"""Campaigns and their codes in PostgreSQL (see ``domain.campaigns``).

``save`` creates or replaces a campaign (its ``type`` is fixed once it exists); ``issue_code``
gives a member their code, the same one on every retry (for a team-up, their team's code
until that team expired unfinished, then a new team's).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson

from claim_service.domain.campaigns import Campaign, from_record, new_code
from claim_service.errors import ConflictError, NotFoundError

DEFINITION_DROP = ("campaign_id", "version")


@dataclass(frozen=True)
class Code:
    code: str
    campaign_id: str
    user_id: str
    fingerprints: list[str]
    expires_at: datetime | None
    completed_at: datetime | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
        }


def _code(row: Any) -> Code:
    return Code(
        row["code"],
        row["campaign_id"],
        row["user_id"],
        list(row["fingerprints"]),
        row["expires_at"],
        row["completed_at"],
        row["created_at"],
    )


CODE_COLUMNS = "code, campaign_id, user_id, fingerprints, expires_at, completed_at, created_at"


def _campaign(row: Any) -> Campaign:
    return from_record(row["campaign_id"], orjson.loads(row["definition"]), row["version"])


async def save(pool: asyncpg.Pool, campaign: Campaign) -> tuple[Campaign, bool]:
    """Create or replace ``campaign``; (the stored campaign, True when created)."""
    definition = {k: v for k, v in campaign.to_json().items() if k not in DEFINITION_DROP}
    async with pool.acquire() as conn, conn.transaction():
        kind = await conn.fetchval(
            "SELECT type FROM campaigns WHERE campaign_id = $1 FOR UPDATE", campaign.campaign_id
        )
        if kind is not None and kind != campaign.type:
            raise ConflictError(
                "type_fixed", f"campaign {campaign.campaign_id!r} is a {kind}: its type is fixed"
            )
        row = await conn.fetchrow(
            """INSERT INTO campaigns (campaign_id, type, definition) VALUES ($1, $2, $3::jsonb)
               ON CONFLICT (campaign_id) DO UPDATE SET definition = EXCLUDED.definition,
                   version = campaigns.version + 1, updated_at = now()
               RETURNING campaign_id, definition, version""",
            campaign.campaign_id,
            campaign.type,
            orjson.dumps(definition).decode(),
        )
    return _campaign(row), kind is None


async def load(conn: Any, campaign_id: str, *, lock: bool = False) -> Campaign:
    """The campaign (``NotFoundError`` when unknown); ``lock`` takes its row lock, which
    serialises every attribution, qualification and grant of the campaign."""
    row = await conn.fetchrow(
        "SELECT campaign_id, definition, version FROM campaigns WHERE campaign_id = $1"
        + (" FOR UPDATE" if lock else ""),
        campaign_id,
    )
    if row is None:
        raise NotFoundError("unknown_campaign", f"no campaign {campaign_id!r}")
    return _campaign(row)


async def load_all(pool: asyncpg.Pool) -> list[Campaign]:
    rows = await pool.fetch(
        "SELECT campaign_id, definition, version FROM campaigns ORDER BY campaign_id"
    )
    return [_campaign(r) for r in rows]


async def code_of(conn: Any, code: str) -> Code | None:
    row = await conn.fetchrow(f"SELECT {CODE_COLUMNS} FROM referral_codes WHERE code = $1", code)
    return None if row is None else _code(row)


async def member_code(conn: Any, campaign_id: str, user_id: str) -> Code | None:
    """The member's latest code in the campaign (a team-up: their latest team's)."""
    row = await conn.fetchrow(
        f"""SELECT {CODE_COLUMNS} FROM referral_codes WHERE campaign_id = $1 AND user_id = $2
            ORDER BY created_at DESC LIMIT 1""",
        campaign_id,
        user_id,
    )
    return None if row is None else _code(row)


async def issue_code(
    pool: asyncpg.Pool, campaign: Campaign, user_id: str, fingerprints: list[str]
) -> tuple[Code, bool]:
    """The member's code, created on the first request; (code, True when new). A team-up's
    opener gets a new team (and code) only once their last one expired unfinished."""
    async with pool.acquire() as conn, conn.transaction():
        # One request per member at a time: a retry racing the first gets the same code.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            f"code:{campaign.campaign_id}:{user_id}",
        )
        now = await conn.fetchval("SELECT now()")
        found = await member_code(conn, campaign.campaign_id, user_id)
        reusable = found is not None and (
            campaign.type == "referral"
            or found.completed_at is not None
            or (found.expires_at is not None and found.expires_at > now)
        )
        if found is not None and reusable:
            merged = sorted(set(found.fingerprints) | set(fingerprints))
            if merged != found.fingerprints:
                await conn.execute(
                    "UPDATE referral_codes SET fingerprints = $2 WHERE code = $1",
                    found.code,
                    merged,
                )
            return Code(**{**found.__dict__, "fingerprints": merged}), False
        if not campaign.is_open(now):
            raise ConflictError(
                "campaign_not_open", f"campaign {campaign.campaign_id!r} is not open"
            )
        expires = None
        if campaign.type == "team":
            expires = now + timedelta(seconds=campaign.team_ttl_seconds)
        while True:
            row = await conn.fetchrow(
                f"""INSERT INTO referral_codes
                        (code, campaign_id, user_id, fingerprints, expires_at)
                    VALUES ($1, $2, $3, $4, $5) ON CONFLICT (code) DO NOTHING
                    RETURNING {CODE_COLUMNS}""",
                new_code(),
                campaign.campaign_id,
                user_id,
                sorted(set(fingerprints)),
                expires,
            )
            if row is not None:  # else the random code was taken (31^8 of them): again
                return _code(row), True


async def referrer_fingerprints(conn: Any, code: Code) -> set[str]:
    """Every phone and device fingerprint known for the code's member: those given with
    the code, and those of their own bank events."""
    rows = await conn.fetch(
        """SELECT DISTINCT f FROM bank_events e,
               LATERAL (VALUES ('phone_hash:' || (e.attrs->>'phone_hash')),
                               ('device_hash:' || (e.attrs->>'device_hash'))) AS v(f)
           WHERE e.user_id = $1 AND f IS NOT NULL""",
        code.user_id,
    )
    return {r["f"] for r in rows} | set(code.fingerprints)
