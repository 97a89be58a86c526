"""The operator commands as a person runs them."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.http.auth import TokenVerifier
from claim_service.local.embedded import free_port
from claim_service.store import catalogue_store
from claim_service.store.keyspace import BenefitKeys, idem_field, tiers_key
from claim_service.store.recovery import Recovery
from claim_service.store.tiers import save_tiers
from tests.helpers import benefit_body, drain, fast, service_env


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "claim_service", *args],
        env=service_env(settings),
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


# -- closed by default ------------------------------------------------------------------------


def start(settings: Settings, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "claim_service", *args],
        env=service_env(settings, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def refused(proc: subprocess.Popen[str]) -> str:
    """The stderr of a command that must exit at once, refusing to start."""
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("it started instead of refusing") from None
    assert proc.returncode == 2, stderr
    return stderr


def serves(proc: subprocess.Popen[str], port: int) -> None:
    """The command is up and answers on ``port``; then it is stopped."""
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("it did not start")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_public_dev_secrets_are_refused_unless_everything_is_local(settings: Settings) -> None:
    port, admin_port = free_port(), free_port()
    ports = ["--port", str(port), "--admin-port", str(admin_port)]
    stderr = refused(start(settings, "serve", "--host", "0.0.0.0", *ports))
    for name in ("CLAIM_JWT_SECRET", "CLAIM_ADMIN_TOKEN", "CLAIM_CODES_KEY", "--insecure-dev"):
        assert name in stderr
    assert "0.0.0.0" in stderr
    refused(start(settings, "serve", "--admin-host", "0.0.0.0", *ports))
    # The codes key protects data in a shared database: fulfil needs it on a shared one.
    remote_db = {"CLAIM_DATABASE_URL": "postgresql://claims@192.0.2.1:5432/claims"}
    assert "CLAIM_CODES_KEY" in refused(start(settings, "fulfil", **remote_db))

    # Loopback only, explicitly insecure, or real secrets: it starts.
    if not settings.exposure([]):  # the test servers are on this machine
        serves(start(settings, "serve", *ports), port)
    serves(start(settings, "serve", "--host", "0.0.0.0", "--insecure-dev", *ports), port)
    secrets = {
        "CLAIM_JWT_SECRET": "a-real-secret-for-this-test-" + "x" * 16,
        "CLAIM_ADMIN_TOKEN": "a-real-admin-token-for-this-test",
        "CLAIM_CODES_KEY": "00" * 32,
    }
    serves(start(settings, "serve", "--host", "0.0.0.0", *ports, **secrets), port)


# -- reconcile ---------------------------------------------------------------------------------


async def test_reconcile_reports_drift_and_fixes_it(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    period = periods.current_period(settings.tz)
    benefit = parse_benefit("video", benefit_body(stock=10, quota=1), settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    await save_tiers(pool, redis, period, [(f"m{i}", 5) for i in range(5)])
    engine = ClaimEngine(redis, settings, pool=pool)
    for i in range(3):
        assert (await engine.claim(ClaimRequest("video", f"m{i}", "r", "iqiyi"))).accepted
    await drain(ClaimWriter(redis, pool, fast(settings)))

    healthy = cli(settings, "reconcile")
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout == "1 benefit(s) and the points mirror compared: no drift\n"

    keys = BenefitKeys("video")
    await redis.hincrby(keys.stock(period), "taken", 1)
    await redis.hdel(keys.idempotency(period), idem_field("m1", "r"))
    drifted = cli(settings, "reconcile")
    assert drifted.returncode == 1, drifted.stderr
    lines = drifted.stdout.splitlines()
    assert f"video {period} taken: Redis 4, expected 3 (+1)" in lines
    claim_id = await pool.fetchval("SELECT claim_id FROM claims WHERE user_id = 'm1'")
    assert (
        f"video {period} idem_missing member 'm1' request 'r': Redis none, expected claim "
        f"{claim_id}" in lines
    )
    assert (
        lines[-1] == "1 benefit(s) and the points mirror compared: 2 drift(s) in 1 benefit(s); "
        "--fix repairs them"
    )
    assert len(lines) == 3
    assert int(await redis.hget(keys.stock(period), "taken") or 0) == 4  # reported, untouched

    fixed = cli(settings, "reconcile", "--fix")
    assert fixed.returncode == 0, fixed.stderr
    assert "video: rebuilt from PostgreSQL and the stream; 0 drift(s) left" in fixed.stdout
    assert fixed.stdout.splitlines()[-1] == (
        "1 benefit(s) and the points mirror compared: 2 drift(s) in 1 benefit(s); "
        "0 left after --fix"
    )
    assert int(await redis.hget(keys.stock(period), "taken") or 0) == 3
    assert cli(settings, "reconcile", "--period", period).returncode == 0
    bad = cli(settings, "reconcile", "--period", "2026-13")
    assert bad.returncode == 2 and "YYYY-MM" in bad.stderr
