"""The operator commands as a person runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from claim_service import catalogue_store, periods
from claim_service.auth import TokenVerifier
from claim_service.catalogue import parse_benefit
from claim_service.config import Settings
from claim_service.keyspace import BenefitKeys, tiers_key
from claim_service.recovery import Recovery
from tests.conftest import benefit_body


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CLAIM_REDIS_URL": settings.redis_url or "",
        "CLAIM_DATABASE_URL": settings.database_url or "",
    }
    return subprocess.run(
        [sys.executable, "-m", "claim_service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_load_tiers_from_a_large_csv(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    period = periods.current_period(settings.tz)
    csv = tmp_path / "tiers.csv"
    csv.write_text("user_id,tier\n" + "".join(f"m{i},{i % 17}\n" for i in range(60_000)))
    done = cli(settings, "load-tiers", str(csv), "--period", period)
    assert done.returncode == 0, done.stderr
    assert "loaded 60,000 tier rows" in done.stdout
    assert await pool.fetchval("SELECT count(*) FROM tiers WHERE period = $1", period) == 60_000
    assert await redis.hlen(tiers_key(period)) == 60_000
    assert await redis.hget(tiers_key(period), "m16") == b"16"

    bad = tmp_path / "bad.csv"
    bad.write_text("m1,5\nm2,five\n")
    failed = cli(settings, "load-tiers", str(bad), "--period", period)
    assert failed.returncode == 2 and "bad.csv:2" in failed.stderr


async def test_load_codes_migrate_warm_and_token(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    body = benefit_body(options=[{"option_id": "youku", "kind": "card_key"}])
    benefit = parse_benefit("video", body, settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    codes = tmp_path / "codes.csv"
    codes.write_text(
        "code,secret,expires_at\n"
        + "".join(f"C{i},S{i},\n" for i in range(300))
        + "OLD,1,2001-01-01T00:00:00+08:00\n"
    )
    done = cli(settings, "load-codes", "video", "youku", str(codes))
    assert done.returncode == 0, done.stderr
    assert "loaded 301 code(s)" in done.stdout and "300 free" in done.stdout
    # Counted in Redis when the benefit is (made) live, before it takes a claim.
    await Recovery(pool, redis, settings).ensure_benefit("video")
    assert await redis.hget(BenefitKeys("video").codes, "youku") == b"300"
    more = tmp_path / "more.csv"
    more.write_text("D1\nD2\n")
    assert cli(settings, "load-codes", "video", "youku", str(more)).returncode == 0
    assert await redis.hget(BenefitKeys("video").codes, "youku") == b"302"
    assert "C17" not in done.stdout + done.stderr

    again = cli(settings, "migrate")
    assert again.returncode == 0 and "applied 0 migration(s)" in again.stdout

    await redis.flushall()
    warmed = cli(settings, "warm")
    assert warmed.returncode == 0, warmed.stderr
    assert "1 benefit(s)" in warmed.stdout
    assert await redis.hget(BenefitKeys("video").codes, "youku") == b"302"

    token = cli(settings, "token", "m42", "--ttl", "60")
    assert TokenVerifier(settings).verify(token.stdout.strip()) == "m42"
    assert cli(settings, "token", "bad\x01id").returncode == 2
