"""A fulfil worker process killed mid-run, then two workers at once: nothing lost or doubled."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.local.partner_sim import PartnerSimulator
from claim_service.local.partner_sim_config import SimConfig
from tests.helpers import (
    CODES,
    SECRET,
    admin,
    auth,
    callback_base,
    claim_all,
    claim_codes,
    drain,
    fast,
    setup_codes,
    setup_partner,
    spawn,
    wait_for,
)

Client = TestClient[Any, Any]
ENV = {
    "CLAIM_FULFIL_LEASE_S": "1",
    "CLAIM_FULFIL_CONCURRENCY": "6",
    "CLAIM_FULFIL_POLL_MS": "20",
    "CLAIM_RETRY_BASE_MS": "20",
    "CLAIM_RETRY_MAX_MS": "200",
    "CLAIM_FULFIL_PROCESSING_RECHECK_S": "1",
    "CLAIM_BREAKER_THRESHOLD": "1000",
}


async def test_killed_fulfil_worker_resumes_without_loss_or_double_charge(
    client: Client,
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    sim = PartnerSimulator(
        SimConfig(
            secret=SECRET,
            partner_id="sim",
            latency_ms=20,
            seed=11,
            failure_rate=0.2,
            timeout_rate=0.2,
            timeout_delay_s=0.5,
            processing_rate=0.3,
            callback_delay_ms=50,
            duplicate_callback_rate=0.3,
            callback_base=callback_base(client),
        )
    )
    await sim.start("127.0.0.1", 0)
    try:
        await setup_partner(client, settings, sim, members=200, stock=200, max_attempts=20)
        # Half of the members pick a card-key option instead.
        body = await (await client.get("/admin/v1/benefits/video", headers=admin(settings))).json()
        body["options"].append({"option_id": "youku", "kind": "card_key"})
        body.pop("stock", None)
        assert (
            await client.put("/admin/v1/benefits/video", json=body, headers=admin(settings))
        ).status == 200
        resp = await client.post(
            "/admin/v1/benefits/video/options/youku/codes",
            json=CODES[:40] + [f"EXTRA-{i}" for i in range(60)],
            headers=admin(settings),
        )
        assert (await resp.json())["pool"]["free"] == 100
        await claim_all(client, settings, 100)  # iqiyi for u0..u99
        for i in range(100, 200):
            r = await client.post(
                "/v1/benefits/video/claims",
                headers=auth(settings, f"u{i}"),
                json={"request_id": "r", "option_id": "youku"},
            )
            assert r.status == 202
        await drain(ClaimWriter(redis, pool, fast(settings)))
        assert await pool.fetchval("SELECT count(*) FROM claims") == 200

        log = tmp_path / "fulfil.log"
        first = spawn(settings, ["fulfil"], log, **ENV)
        procs.append(first)

        async def some_done() -> bool:
            return (
                int(await pool.fetchval("SELECT count(*) FROM claims WHERE status = 'fulfilled'"))
                >= 40
            )

        await wait_for(some_done)
        in_flight = await pool.fetchval("SELECT count(*) FROM claims WHERE lease_owner IS NOT NULL")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert in_flight > 0, "the worker was killed with claims in hand"
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM claims WHERE status IN ('accepted', 'fulfilling')"
            )
            > 0
        )

        procs.append(spawn(settings, ["fulfil"], log, **ENV))
        procs.append(spawn(settings, ["fulfil"], log, **ENV))

        async def settled() -> bool:
            return (
                int(
                    await pool.fetchval(
                        "SELECT count(*) FROM claims WHERE status IN ('accepted', 'fulfilling', "
                        "'failed')"
                    )
                )
                == 0
            )

        await wait_for(settled, within=90)
        rows = await pool.fetch("SELECT claim_id, option_id, status, code_id FROM claims")
        statuses = Counter((r["option_id"], r["status"]) for r in rows)
        assert statuses[("youku", "fulfilled")] == 100, statuses
        codes = [r["code_id"] for r in rows if r["option_id"] == "youku"]
        assert len(set(codes)) == 100 and None not in codes
        assert (
            await pool.fetchval("SELECT count(*) FROM voucher_codes WHERE claim_id IS NOT NULL")
            == 100
        )
        stats = sim.stats()
        assert stats["double_charged"] == 0
        charged = {o.order_id for o in sim.orders.values() if o.times_charged}
        fulfilled = {
            r["claim_id"] for r in rows if r["option_id"] == "iqiyi" and r["status"] == "fulfilled"
        }
        assert charged == fulfilled
        assert statuses[("iqiyi", "fulfilled")] + statuses[("iqiyi", "refunded")] == 100
        assert stats["duplicates_received"] > 0, "some orders were resent after the kill/timeouts"
    finally:
        await sim.stop()


async def test_a_named_fulfil_worker_restarted_takes_its_leases_back_at_once(
    client: Client,
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    await setup_codes(client, settings, stock=100, codes=30)
    assert sum(r["http"] == 202 for r in await claim_codes(client, settings, range(30))) == 30
    await drain(ClaimWriter(redis, pool, fast(settings)))
    # Worker "f1" died holding every claim under a lease that would last ten more minutes.
    await pool.execute(
        "UPDATE claims SET lease_owner = 'f1', lease_until = now() + interval '10 minutes'"
    )
    log = tmp_path / "fulfil.log"
    other = spawn(settings, ["fulfil", "--name", "f2"], log)
    procs.append(other)
    await asyncio.sleep(2.0)
    assert await pool.fetchval("SELECT count(*) FROM claims WHERE status = 'fulfilled'") == 0
    other.terminate()
    other.wait(15)
    procs.append(spawn(settings, ["fulfil", "--name", "f1"], log))

    async def all_fulfilled() -> bool:
        return (
            int(await pool.fetchval("SELECT count(*) FROM claims WHERE status = 'fulfilled'")) == 30
        )

    await wait_for(all_fulfilled, within=30)
    assert (
        await pool.fetchval("SELECT count(DISTINCT code_id) FROM claims WHERE status = 'fulfilled'")
        == 30
    )
