"""The points commands as an operator runs them: ``credit-points`` (once per member and
period, in chunks, progress on stderr and a summary on stdout) and ``expire-points``."""

from __future__ import annotations

import asyncio
import random
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.store.keyspace import POINTS_KEY, text
from claim_service.store.points_credit import CHUNK
from claim_service.store.points_mirror import is_live, member_lots, points_drift
from tests.helpers import admin, auth, benefit_body, direct, drain, fast, service_env

Client = TestClient[Any, Any]

SUMMARY = re.compile(
    r"credited (?P<points>[\d,]+) point\(s\) to (?P<credited>[\d,]+) member\(s\) for "
    r"(?P<period>\d{4}-\d{2}) in [\d.]+s; (?P<already>[\d,]+) credited before, "
    r"(?P<not_eligible>[\d,]+) of (?P<members>[\d,]+) in the tier snapshot not eligible; "
    r"(?P<mirrored>[\d,]+) lot\(s\) added to the Redis mirror\n"
)
PROGRESS = re.compile(
    r"\r  \[(?P<bar>[# ]{30})\] +(?P<share>[\d.]+)% (?P<credited>[\d,]+) credited, "
    r"(?P<already>[\d,]+) already"
)
EXPIRED = re.compile(r"expired (?P<points>[\d,]+) point\(s\) left in lots past their expiry\n")


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str


async def cli(settings: Settings, *args: str) -> Done:
    """Run a command to its end without blocking the event loop: the in-process service's
    own recovery runs on it, and may hold the lock a command waits for."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "claim_service",
        *args,
        env=service_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return Done(proc.returncode, stdout.decode(), stderr.decode())


def number(value: str) -> int:
    return int(value.replace(",", ""))


@dataclass(frozen=True)
class CreditRun:
    summary: dict[str, Any]  # the stdout summary's numbers (and period)
    progress: list[dict[str, Any]]  # each progress update on stderr, in order


async def credit_points(settings: Settings, period: str) -> CreditRun:
    done = await cli(settings, "credit-points", "--period", period)
    assert done.returncode == 0, done.stderr
    found = SUMMARY.fullmatch(done.stdout)
    assert found, f"stdout is not one summary line: {done.stdout!r}"
    summary: dict[str, Any] = {k: number(v) for k, v in found.groupdict().items() if k != "period"}
    summary["period"] = found["period"]
    progress = [
        {
            "bar": m["bar"].count("#"),
            "share": float(m["share"]),
            "credited": number(m["credited"]),
            "already": number(m["already"]),
        }
        for m in PROGRESS.finditer(done.stderr)
    ]
    return CreditRun(summary, progress)


async def expire_points(settings: Settings) -> int:
    done = await cli(settings, "expire-points")
    assert done.returncode == 0, done.stderr
    found = EXPIRED.fullmatch(done.stdout)
    assert found, done.stdout
    return number(found["points"])


def expiry_after(period: str, periods_later: int, settings: Settings) -> datetime:
    later = period
    for _ in range(periods_later):
        later = periods.next_period(later)
    return periods.period_start(later, settings.tz)


async def put_rules(client: Client, settings: Settings, rules: list[dict[str, Any]]) -> None:
    resp = await client.put(
        "/admin/v1/points/rules", json={"rules": rules}, headers=admin(settings)
    )
    assert resp.status == 200, await resp.text()


async def credit_ledger(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    """Every credit entry with its lot and allocations, as rows to compare whole."""
    rows = await pool.fetch(
        """SELECT e.entry_id, e.user_id, e.amount, e.reference, e.period, l.expires_at,
                  (SELECT array_agg((a.lot_id, a.amount)::text ORDER BY a.lot_id)
                   FROM points_allocations a WHERE a.entry_id = e.entry_id) AS allocations
           FROM points_entries e LEFT JOIN points_lots l ON l.lot_id = e.entry_id
           WHERE e.kind = 'credit' ORDER BY e.user_id"""
    )
    return [tuple(r) for r in rows]


# -- credit-points -----------------------------------------------------------------------------


async def test_credit_points_credits_each_eligible_member_once(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    period = periods.current_period(settings.tz)
    tiers = {"ann": 12, "bo": 13, "cy": 15, "dee": 11, "eve": 0, "fay": 4, "gus": 99}
    snapshot = [{"user_id": u, "tier": t} for u, t in tiers.items()]
    resp = await client.put(f"/admin/v1/tiers/{period}", json=snapshot, headers=admin(settings))
    assert resp.status == 200, await resp.text()
    # V12+ one point a period, expiring after 12; V15+ three that never expire.
    await put_rules(
        client,
        settings,
        [
            {"min_tier": 12, "points": 1, "expires_after_periods": 12},
            {"min_tier": 15, "points": 3, "expires_after_periods": None},
        ],
    )
    in_a_year = expiry_after(period, 12, settings)
    expected = {  # user -> (points, lot expiry)
        "ann": (1, in_a_year),
        "bo": (1, in_a_year),
        "cy": (3, None),
        "gus": (3, None),
    }

    first = await credit_points(settings, period)
    assert first.summary == {
        "period": period,
        "points": 8,
        "credited": 4,
        "already": 0,
        "not_eligible": 3,
        "members": 7,
        "mirrored": 4,
    }
    assert first.progress, "progress is reported on stderr"
    assert first.progress[-1]["credited"] == 4 and first.progress[-1]["already"] == 0

    ledger = await credit_ledger(pool)
    assert [(r[1], r[2], r[3], r[4], r[5]) for r in ledger] == [
        (user, points, f"credit:{period}:{user}", period, expires)
        for user, (points, expires) in sorted(expected.items())
    ]
    # Each credit is its own lot, holding all of its points.
    assert [r[6] for r in ledger] == [[f"({r[0]},{r[2]})"] for r in ledger]
    assert await pool.fetchval("SELECT count(*) FROM points_entries") == 4
    assert await pool.fetchval("SELECT count(*) FROM points_lots") == 4

    # The mirror holds the same lots, spendable now.
    assert await is_live(redis)
    mirrored = {text(k) for k in await redis.hkeys(POINTS_KEY)}
    assert mirrored == set(expected)
    for user, (points, expires) in expected.items():
        [lot] = await member_lots(redis, user)
        assert lot.remaining == points
        assert lot.expires_ms == (0 if expires is None else int(expires.timestamp() * 1000))
    assert await points_drift(pool, redis) == []

    second = await credit_points(settings, period)
    assert second.summary == {
        "period": period,
        "points": 0,
        "credited": 0,
        "already": 4,
        "not_eligible": 3,
        "members": 7,
        "mirrored": 0,
    }
    assert await credit_ledger(pool) == ledger
    assert await pool.fetchval("SELECT count(*) FROM points_entries") == 4

    # A mirror that lost a member's lot (a crash between the ledger and Redis) is repaired
    # by running the command again, still without crediting anyone twice.
    await redis.hdel(POINTS_KEY, "cy")
    assert [d.user_id for d in await points_drift(pool, redis)] == ["cy"]
    third = await credit_points(settings, period)
    assert (third.summary["credited"], third.summary["already"]) == (0, 4)
    assert third.summary["mirrored"] == 1
    assert await credit_ledger(pool) == ledger
    assert await points_drift(pool, redis) == []

    view = await (await client.get("/v1/me/points", headers=auth(settings, "ann"))).json()
    assert (view["balance"], view["available"]) == (1, 1)
    assert view["next_expiry"]["points"] == 1
    assert datetime.fromisoformat(view["next_expiry"]["expires_at"]) == in_a_year


async def test_credit_points_walks_a_large_snapshot_in_chunks(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    period = periods.current_period(settings.tz)
    rng = random.Random(20)
    tiers = {f"m{i}": rng.choice([0, 3, 5, 8, 11, 12, 13, 16]) for i in range(20_000)}
    eligible = {u for u, t in tiers.items() if t >= 12}
    csv = tmp_path / "tiers.csv"
    csv.write_text("user_id,tier\n" + "".join(f"{u},{t}\n" for u, t in tiers.items()))
    loaded = await cli(settings, "load-tiers", str(csv), "--period", period)
    assert loaded.returncode == 0, loaded.stderr
    await put_rules(client, settings, [{"min_tier": 12, "points": 1, "expires_after_periods": 12}])

    run = await credit_points(settings, period)
    assert run.summary == {
        "period": period,
        "points": len(eligible),
        "credited": len(eligible),
        "already": 0,
        "not_eligible": len(tiers) - len(eligible),
        "members": len(tiers),
        "mirrored": len(eligible),
    }
    # One progress update per chunk of the snapshot (walked in the database's user_id
    # order), each with the members credited so far.
    ordered = [
        r["user_id"]
        for r in await pool.fetch(
            "SELECT user_id FROM tiers WHERE period = $1 ORDER BY user_id", period
        )
    ]
    assert len(ordered) == len(tiers)
    chunks = [ordered[i : i + CHUNK] for i in range(0, len(ordered), CHUNK)]
    assert len(chunks) > 2
    so_far = [
        sum(u in eligible for chunk in chunks[: n + 1] for u in chunk) for n in range(len(chunks))
    ]
    assert [p["credited"] for p in run.progress] == so_far
    assert all(p["already"] == 0 for p in run.progress)

    rows = await pool.fetch(
        """SELECT e.user_id, e.amount, e.reference, l.expires_at
           FROM points_entries e JOIN points_lots l ON l.lot_id = e.entry_id
           WHERE e.kind = 'credit' AND e.period = $1""",
        period,
    )
    assert {r["user_id"] for r in rows} == eligible and len(rows) == len(eligible)
    assert {r["reference"] for r in rows} == {f"credit:{period}:{u}" for u in eligible}
    assert {(r["amount"], r["expires_at"]) for r in rows} == {
        (1, expiry_after(period, 12, settings))
    }
    assert await pool.fetchval("SELECT count(*) FROM points_entries") == len(eligible)
    assert await redis.hlen(POINTS_KEY) == len(eligible)
    assert await points_drift(pool, redis) == []

    again = await credit_points(settings, period)
    assert (again.summary["credited"], again.summary["points"]) == (0, 0)
    assert (again.summary["already"], again.summary["mirrored"]) == (len(eligible), 0)
    assert await pool.fetchval("SELECT count(*) FROM points_entries") == len(eligible)


async def test_credit_points_progress_ends_at_the_whole_snapshot(
    client: Client, settings: Settings, pool: asyncpg.Pool
) -> None:
    """A run that has walked every member of the snapshot says so: its last progress update
    is at 100% with a full bar, however few of the members a rule makes eligible."""
    period = periods.current_period(settings.tz)
    snapshot = [{"user_id": f"m{i}", "tier": 12 if i % 4 == 0 else 5} for i in range(400)]
    resp = await client.put(f"/admin/v1/tiers/{period}", json=snapshot, headers=admin(settings))
    assert resp.status == 200, await resp.text()
    await put_rules(client, settings, [{"min_tier": 12, "points": 1, "expires_after_periods": 12}])

    run = await credit_points(settings, period)
    assert (run.summary["members"], run.summary["credited"]) == (400, 100)
    last = run.progress[-1]
    assert (last["share"], last["bar"]) == (100.0, 30), (
        f"a complete run's progress ends at {last['share']}% of the snapshot"
    )


# -- expire-points -----------------------------------------------------------------------------


async def test_expire_points_writes_off_what_is_left_once_claims_before_expiry_are_recorded(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    period = periods.current_period(settings.tz)
    resp = await client.put(
        f"/admin/v1/tiers/{period}", json=[{"user_id": "vip", "tier": 12}], headers=admin(settings)
    )
    assert resp.status == 200
    body = benefit_body(stock=10, min_tier=12, quota=[{"min_tier": 12, "per_period": 5}])
    body["options"] = [direct("lounge")]
    body["price_points"] = 1
    resp = await client.put("/admin/v1/benefits/lounge", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()

    now = datetime.now().astimezone()
    soon, later = now + timedelta(seconds=1.5), now + timedelta(hours=1)
    for user, amount, ref, at in (("vip", 3, "flash", soon), ("other", 2, "later", later)):
        resp = await client.post(
            f"/admin/v1/points/{user}/adjust",
            json={
                "amount": amount,
                "reason": "promo",
                "reference": ref,
                "expires_at": at.isoformat(),
            },
            headers=admin(settings),
        )
        assert resp.status == 201, await resp.text()
    # One point of the flash lot is spent; the claim waits in the stream for a writer.
    resp = await client.post(
        "/v1/benefits/lounge/claims",
        json={"request_id": "r", "option_id": "lounge"},
        headers=auth(settings, "vip"),
    )
    assert resp.status == 202, await resp.text()
    claim_id = (await resp.json())["claim_id"]

    await asyncio.sleep(max((soon - datetime.now().astimezone()).total_seconds(), 0) + 0.3)
    # Past its expiry, but a claim accepted before it is not recorded yet: not written off.
    assert await expire_points(settings) == 0
    assert await pool.fetchval("SELECT count(*) FROM points_entries WHERE kind = 'expire'") == 0

    await drain(ClaimWriter(redis, pool, fast(settings)))
    assert await expire_points(settings) == 2
    assert await expire_points(settings) == 0

    flash = await pool.fetchval(
        "SELECT entry_id FROM points_entries WHERE reference = $1", "adjust:flash"
    )
    rows = await pool.fetch(
        """SELECT e.kind, e.amount, e.reference, e.claim_id,
                  array_agg((a.lot_id, a.amount)::text) AS allocations
           FROM points_entries e JOIN points_allocations a USING (entry_id)
           WHERE e.user_id = 'vip' GROUP BY e.entry_id ORDER BY e.entry_id"""
    )
    assert [(r["kind"], r["amount"], r["claim_id"], r["allocations"]) for r in rows] == [
        ("adjust", 3, None, [f"({flash},3)"]),
        ("debit", -1, claim_id, [f"({flash},-1)"]),
        ("expire", -2, None, [f"({flash},-2)"]),
    ]
    assert rows[2]["reference"] == f"expire:{flash}:1"

    view = await (await client.get("/v1/me/points", headers=auth(settings, "vip"))).json()
    assert (view["balance"], view["available"]) == (0, 0)
    assert view["next_expiry"] is None and view["lots"] == []
    assert [(e["kind"], e["amount"]) for e in view["entries"]] == [
        ("expire", -2),
        ("debit", -1),
        ("adjust", 3),
    ]
    # A lot not yet due is left alone.
    other = await (await client.get("/v1/me/points", headers=auth(settings, "other"))).json()
    assert (other["balance"], other["available"]) == (2, 2)
    assert other["next_expiry"]["points"] == 2
    assert datetime.fromisoformat(other["next_expiry"]["expires_at"]) == later.replace(
        microsecond=later.microsecond // 1000 * 1000
    )
    assert await is_live(redis)
    assert await points_drift(pool, redis) == []
