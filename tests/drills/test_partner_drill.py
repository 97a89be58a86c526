"""Drill 7: the partner goes away (connections refused) while its orders are being sent, and
comes back. Every claim ends delivered or refunded, no partner order is paid twice, every
charged order is a delivered claim and every delivered claim a charged order."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from claim_service.config import Settings
from claim_service.local.embedded import EmbeddedValkey, free_port
from claim_service.local.partner_sim import PartnerSimulator
from claim_service.local.partner_sim_config import SimConfig
from tests.drills.harness import (
    OPTION,
    RecordingClient,
    audit,
    claims_of,
    drained,
    open_benefit,
    scale,
    until,
)
from tests.helpers import SECRET, admin, direct, spawn, spawn_serve, wait_ready

ENV = {
    "CLAIM_DURABILITY": "local",
    "CLAIM_FULFIL_POLL_MS": "20",
    "CLAIM_RETRY_BASE_MS": "50",
    "CLAIM_RETRY_MAX_MS": "500",
    "CLAIM_FULFIL_PROCESSING_RECHECK_S": "1",
}


@pytest.fixture
async def partner() -> AsyncIterator[PartnerSimulator]:
    sim = PartnerSimulator(
        SimConfig(secret=SECRET, partner_id="sim", latency_ms=5, seed=7, callback_delay_ms=20)
    )
    yield sim
    await sim.stop()


async def test_drill_partner_outage_during_fulfilment(
    settings: Settings,
    pool: asyncpg.Pool,
    valkey: EmbeddedValkey,
    partner: PartnerSimulator,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    size = scale()
    local = replace(settings, redis_url=valkey.url)
    serve, ports = spawn_serve(local, tmp_path / "serve.log", "--writer", **ENV)
    procs.append(serve)
    partner.config = replace(partner.config, callback_base=ports.base)
    partner_port = free_port()
    await partner.start("127.0.0.1", partner_port)
    async with aiohttp.ClientSession() as http:
        await wait_ready(http, ports.base, ports.admin)
        body = {
            "base_url": partner.url,
            "secret": SECRET,
            "timeout_s": 0.5,
            "max_in_flight": 32,
            "max_attempts": 40,
        }
        async with http.put(
            f"{ports.admin}/admin/v1/partners/sim", json=body, headers=admin(local)
        ) as resp:
            assert resp.status == 201, await resp.text()
        option = direct(OPTION, partner="sim", sku="IQY")
        await open_benefit(
            http, ports, local, stock=size.stock, members=size.members, option=option,
            on_failure="refund",
        )  # fmt: skip
    procs.append(spawn(local, ["fulfil"], tmp_path / "fulfil.log", **ENV))
    client = RecordingClient(ports.base, local)
    burst = asyncio.create_task(client.burst(list(claims_of(size.members)), size.concurrency))

    async def partner_busy() -> bool:
        return partner.stats()["charged"] >= size.stock // 5

    await until(partner_busy, 60, "the partner to receive orders")
    await partner.stop()  # the partner's host is gone: connections refused
    charged_before = partner.stats()["charged"]
    await asyncio.sleep(size.partner_outage_s)
    await partner.start("127.0.0.1", partner_port)
    back = time.monotonic()
    await burst
    await drained(valkey.url)

    async def settled() -> bool:
        return not await pool.fetchval(
            "SELECT count(*) FROM claims WHERE status IN ('accepted', 'fulfilling', 'failed')"
        )

    await until(settled, 120, "every claim to be delivered or refunded")
    rows = await pool.fetch("SELECT claim_id, status FROM claims")
    report = await audit(
        "7 partner outage", client.record, pool, local, valkey.url, stock=size.stock
    )
    statuses = Counter(r["status"] for r in rows)
    stats = partner.stats()
    charged = {o.order_id for o in partner.orders.values() if o.times_charged}
    fulfilled = {r["claim_id"] for r in rows if r["status"] == "fulfilled"}
    report.notes.update(
        paid_twice=stats["double_charged"],
        fulfilled=statuses["fulfilled"],
        refunded=statuses["refunded"],
        settled_after_s=round(time.monotonic() - back, 1),
    )
    assert report.failures == {}, report.line()
    assert stats["double_charged"] == 0
    assert charged == fulfilled
    assert charged_before < len(charged), "orders were sent after the partner came back"
    assert set(statuses) <= {"fulfilled", "refunded"}
