"""Card-key pools: redemption codes loaded by ops, encrypted at rest, one per claim ever.

A code row carries the claim it went to (``claim_id`` is UNIQUE), and codes are taken with
``FOR UPDATE SKIP LOCKED``, so no code can reach two claims, also under concurrency and
crashes. Loading codes raises the option's free-code counts in Redis, one per expiry bucket,
which ``claim.lua`` checks (first expiring first out, expired buckets dropped), so a card-key
option never accepts more claims than it has unexpired codes. Codes are assigned in the same
order (soonest expiry first).
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from claim_service import metrics
from claim_service.domain.catalogue import parse_timestamp
from claim_service.errors import (
    BackendUnavailable,
    ConflictError,
    NotFoundError,
    ValidationError,
)
from claim_service.store.keyspace import BenefitKeys, Scripts, code_bucket
from claim_service.store.recovery import benefit_lock
from claim_service.store.stock_events import announce
from claim_service.store.vault import Vault, code_context

log = logging.getLogger(__name__)

CHUNK = 5_000
MAX_CODE = 256
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The ends of the calendar a code's expiry is kept within, a second inside datetime.min and
# max, which asyncpg would store as -infinity and infinity.
FIRST_INSTANT = datetime(1, 1, 1, 0, 0, 1, tzinfo=UTC)
LAST_INSTANT = datetime(9999, 12, 31, 23, 59, 58, tzinfo=UTC)


def expiry_ms(expires_at: datetime | None) -> int:
    """A code's expiry as its bucket in Redis: unix ms, 0 for never."""
    if expires_at is None:
        return 0
    return (expires_at - EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True)
class CodeRow:
    code: str
    secret: str | None = None
    expires_at: datetime | None = None


@dataclass
class LoadReport:
    loaded: int = 0
    duplicates: int = 0
    expired: int = 0


def check_code_row(
    code: Any, secret: Any, expires_at: Any, tz: ZoneInfo, *, any_iso_time: bool = False
) -> CodeRow:
    """A code to load. ``expires_at`` (``None`` or empty: never) is an RFC 3339 timestamp with
    its offset, as the API documents; CSV files (``any_iso_time``) may write any ISO 8601 form,
    taken in ``tz`` when it has no offset."""
    if not isinstance(code, str) or not 0 < len(code.strip()) <= MAX_CODE:
        raise ValidationError(f"code must be 1..{MAX_CODE} characters", field="code")
    if secret is not None and (not isinstance(secret, str) or len(secret) > MAX_CODE):
        raise ValidationError(f"secret must be at most {MAX_CODE} characters", field="secret")
    expiry = None
    if expires_at not in (None, ""):
        if not any_iso_time:
            expiry = parse_timestamp(expires_at, "expires_at")
        elif not isinstance(expires_at, str):
            raise ValidationError("expires_at must be an ISO 8601 timestamp", field="expires_at")
        else:
            try:
                expiry = datetime.fromisoformat(expires_at)
            except ValueError as exc:
                raise ValidationError(
                    "expires_at must be an ISO 8601 timestamp", field="expires_at"
                ) from exc
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=tz)
        try:
            expiry = min(max(expiry.astimezone(UTC), FIRST_INSTANT), LAST_INSTANT)
        except OverflowError:  # past year 1 or 9999 in UTC, by its offset
            expiry = FIRST_INSTANT if expiry.year == 1 else LAST_INSTANT
        # Whole milliseconds: the expiry is also a bucket name in Redis.
        expiry = expiry.replace(microsecond=expiry.microsecond // 1000 * 1000)
    return CodeRow(code.strip(), secret or None, expiry)


def read_code_csv(path: Path, tz: ZoneInfo) -> Iterator[CodeRow]:
    """``code[,secret[,expires_at]]`` per line; a first line starting with ``code`` is a header."""
    with path.open(newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or not row[0].strip():
                continue
            if lineno == 1 and row[0].strip().lower() == "code":
                continue
            padded = [*row, None, None][:3]
            try:
                yield check_code_row(padded[0], padded[1], padded[2], tz, any_iso_time=True)
            except ValidationError as exc:
                raise ValidationError(f"{path}:{lineno}: {exc}") from exc


async def _card_key_option(pool: asyncpg.Pool, benefit_id: str, option_id: str) -> None:
    kind = await pool.fetchval(
        "SELECT kind FROM benefit_options WHERE benefit_id = $1 AND option_id = $2",
        benefit_id,
        option_id,
    )
    if kind is None:
        raise NotFoundError("unknown_option", f"no option {option_id!r} on {benefit_id!r}")
    if kind != "card_key":
        # A well-formed request for an option of the wrong kind: the option's state, not the
        # input, is in the way.
        raise ConflictError("not_card_key", f"option {option_id!r} is not a card_key option")


async def load_codes(
    pool: asyncpg.Pool,
    redis: Redis,
    vault: Vault,
    benefit_id: str,
    option_id: str,
    rows: Iterable[CodeRow],
) -> LoadReport:
    """Encrypt and store codes (a code already loaded for the option is skipped), then raise
    the option's free-code counts by the new, unexpired codes. Each chunk holds the benefit's
    recovery lock, so a recovery counts it exactly once (before or after, never both)."""
    await _card_key_option(pool, benefit_id, option_id)
    context = code_context(benefit_id, option_id)
    report = LoadReport()
    now = datetime.now().astimezone()
    chunk: list[CodeRow] = []

    async def flush() -> None:
        seen: set[bytes] = set()
        sealed: list[tuple[bytes, bytes | None, bytes, datetime | None]] = []
        for row in chunk:
            digest = vault.fingerprint(row.code, context)
            if digest in seen:
                report.duplicates += 1
                continue
            seen.add(digest)
            secret = vault.seal(row.secret, context + ":secret") if row.secret else None
            sealed.append((vault.seal(row.code, context), secret, digest, row.expires_at))
        try:
            async with benefit_lock(redis, benefit_id):
                inserted = await pool.fetch(
                    """INSERT INTO voucher_codes (benefit_id, option_id, code_enc, secret_enc,
                                                  code_hash, expires_at)
                       SELECT $1, $2, c, s, h, e
                       FROM unnest($3::bytea[], $4::bytea[], $5::bytea[], $6::timestamptz[])
                            AS x(c, s, h, e)
                       ON CONFLICT (benefit_id, option_id, code_hash) DO NOTHING
                       RETURNING expires_at""",
                    benefit_id,
                    option_id,
                    [s[0] for s in sealed],
                    [s[1] for s in sealed],
                    [s[2] for s in sealed],
                    [s[3] for s in sealed],
                )
                buckets = Counter(
                    expiry_ms(r["expires_at"])
                    for r in inserted
                    if r["expires_at"] is None or r["expires_at"] > now
                )
                argv: list[Any] = ["add"]
                for expiry, count in buckets.items():
                    argv += [code_bucket(option_id, expiry), count, expiry]
                keys = BenefitKeys(benefit_id)
                if buckets:  # -1: not live; recovery will count these from PostgreSQL
                    await Scripts(redis).codes(
                        keys=[keys.codes, keys.code_expiries, keys.live], args=argv
                    )
                    await announce(redis, benefit_id)
        except RedisError as exc:
            raise BackendUnavailable("codes stored; Redis not updated, run `warm`") from exc
        usable = sum(buckets.values())
        report.loaded += len(inserted)
        report.expired += len(inserted) - usable
        report.duplicates += len(sealed) - len(inserted)
        chunk.clear()

    for row in rows:
        chunk.append(row)
        if len(chunk) >= CHUNK:
            await flush()
    if chunk:
        await flush()
    log.info(
        "loaded %d code(s) for %s/%s (%d duplicate, %d already expired)",
        report.loaded,
        benefit_id,
        option_id,
        report.duplicates,
        report.expired,
    )
    return report


async def assign_code(conn: Any, claim_id: str, benefit_id: str, option_id: str) -> int | None:
    """The code held by ``claim_id``, or a free unexpired one now given to it (None if none).
    Must run inside the caller's transaction."""
    held = await conn.fetchval("SELECT code_id FROM voucher_codes WHERE claim_id = $1", claim_id)
    if held is not None:
        return int(held)
    code_id = await conn.fetchval(
        """UPDATE voucher_codes SET claim_id = $1, assigned_at = now()
           WHERE code_id = (
               SELECT code_id FROM voucher_codes
               WHERE benefit_id = $2 AND option_id = $3 AND claim_id IS NULL
                 AND (expires_at IS NULL OR expires_at > now())
               ORDER BY expires_at NULLS LAST, code_id LIMIT 1 FOR UPDATE SKIP LOCKED)
           RETURNING code_id""",
        claim_id,
        benefit_id,
        option_id,
    )
    return None if code_id is None else int(code_id)


async def reveal(pool: asyncpg.Pool, vault: Vault, claim_id: str) -> dict[str, Any] | None:
    """The decrypted voucher of a claim, for its owner only (the caller checks ownership)."""
    row = await pool.fetchrow(
        """SELECT benefit_id, option_id, code_enc, secret_enc, expires_at
           FROM voucher_codes WHERE claim_id = $1""",
        claim_id,
    )
    if row is None:
        return None
    context = code_context(row["benefit_id"], row["option_id"])
    return {
        "code": vault.open(row["code_enc"], context),
        "secret": vault.open(row["secret_enc"], context + ":secret") if row["secret_enc"] else None,
        "expires_at": row["expires_at"].isoformat() if row["expires_at"] else None,
    }


async def pool_levels(pool: asyncpg.Pool, benefit_id: str | None = None) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        """SELECT benefit_id, option_id,
                  count(*) AS loaded,
                  count(claim_id) AS assigned,
                  count(*) FILTER (WHERE claim_id IS NULL
                                   AND (expires_at IS NULL OR expires_at > now())) AS free,
                  count(*) FILTER (WHERE claim_id IS NULL AND expires_at <= now()) AS expired
           FROM voucher_codes WHERE $1::text IS NULL OR benefit_id = $1
           GROUP BY benefit_id, option_id ORDER BY benefit_id, option_id""",
        benefit_id,
    )
    return [dict(r) for r in rows]


async def publish_pool_levels(pool: asyncpg.Pool, low_watermark: int) -> list[dict[str, Any]]:
    """Set the pool gauges; returns the pools below ``low_watermark``."""
    low = []
    for level in await pool_levels(pool):
        labels = (level["benefit_id"], level["option_id"])
        metrics.CODES_FREE.labels(*labels).set(level["free"])
        is_low = level["free"] < low_watermark
        metrics.CODES_LOW.labels(*labels).set(1 if is_low else 0)
        if is_low:
            low.append(level)
    return low
