"""``verify-draws`` as an auditor runs it on a finished period: every draw recomputed from the
revealed seed and the records, 0 mismatches; one altered record is named."""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import datetime, timedelta

import asyncpg
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from tests.acceptance.test_points_cli import cli
from tests.helpers import Client, admin, auth, drain, fast
from tests.integration.test_draws import draw_body

SUMMARY = re.compile(
    r"verified (?P<draws>[\d,]+) draw\(s\) of box in (?P<period>\d{4}-\d{2}) against "
    r"commitment (?P<commitment>[0-9a-f]{64}): (?P<mismatches>\d+) mismatch\(es\) "
    r"in (?P<records>\d+) record\(s\)\n"
)
MEMBERS = 60


async def test_verify_draws_on_a_finished_period(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    body = draw_body(per_period=3, pity={"after": 2, "prize_ids": ["bronze"]})
    closes_in_s = 4.0
    release = body["release"]
    release["closes_at"] = (
        datetime.now().astimezone() + timedelta(seconds=closes_in_s)
    ).isoformat()
    answer = await client.put("/admin/v1/benefits/box", json=body, headers=admin(settings))
    assert answer.status == 201, await answer.text()
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": f"m{i}", "tier": 5} for i in range(MEMBERS)]
    answer = await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))
    assert answer.status == 200
    published = await (
        await client.get("/v1/benefits/box/draw", headers=auth(settings, "m0"))
    ).json()
    assert published["seed"] is None

    async def draw(i: int, n: int) -> int:
        answer = await client.post(
            "/v1/benefits/box/claims", json={"request_id": f"r{n}"}, headers=auth(settings, f"m{i}")
        )
        return answer.status

    statuses = await asyncio.gather(*(draw(i, n) for n in range(3) for i in range(MEMBERS)))
    assert set(statuses) == {202}
    await drain(ClaimWriter(redis, pool, fast(settings), consumer="t"))

    # Before the period closes the seed stays secret.
    assert (await (await client.get("/v1/benefits/box/draw", headers=auth(settings, "m0"))).json())[
        "seed"
    ] is None
    await asyncio.sleep(closes_in_s + 5.5)  # the close, then the reveal's grace
    revealed = await (
        await client.get(f"/v1/benefits/box/draw?period={period}", headers=auth(settings, "m0"))
    ).json()
    seed = revealed["seed"]
    assert seed is not None and revealed["commitment"] == published["commitment"]
    assert hashlib.sha256(bytes.fromhex(seed)).hexdigest() == published["commitment"]
    results = await (
        await client.get(
            f"/v1/benefits/box/draw/results?period={period}", headers=auth(settings, "m0")
        )
    ).json()
    assert results["final"] and results["draws"] == 3 * MEMBERS

    for extra in ((), ("--seed", seed)):
        done = await cli(settings, "verify-draws", "box", period, *extra)
        assert done.returncode == 0, done
        summary = SUMMARY.fullmatch(done.stdout)
        assert summary is not None, done.stdout
        assert summary["draws"] == str(3 * MEMBERS) and summary["mismatches"] == "0"
        assert summary["commitment"] == published["commitment"]

    # A seed other than the committed one does not check out.
    done = await cli(settings, "verify-draws", "box", period, "--seed", "00" * 32)
    assert done.returncode == 1 and "not the published commitment" in done.stdout

    # One record altered behind the service's back (its trigger disabled by the intruder).
    victim = await pool.fetchrow(
        "SELECT claim_id, prize_id FROM draws WHERE prize_id = 'thanks' ORDER BY seq LIMIT 1"
    )
    assert victim is not None
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE draws DISABLE TRIGGER draws_keep")
        await conn.execute(
            "UPDATE draws SET prize_id = 'gold' WHERE claim_id = $1", victim["claim_id"]
        )
        await conn.execute("ALTER TABLE draws ENABLE TRIGGER draws_keep")
    done = await cli(settings, "verify-draws", "box", period)
    assert done.returncode == 1, done
    assert f"MISMATCH {victim['claim_id']}: prize gold recorded, thanks computed" in done.stdout
    summary = SUMMARY.search(done.stdout)
    assert summary is not None and summary["records"] == "1"
