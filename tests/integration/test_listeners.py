"""Two listeners over one set of pools: members never reach ``/admin`` or ``/metrics``; a
scrape and a forged partner callback cost PostgreSQL nothing (or one cached load)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.fulfilment.signing import signed_headers
from claim_service.http.server import Guard
from claim_service.http.service import create_apps
from tests.helpers import ServiceClient, admin, auth

Client = TestClient[Any, Any]
PARTNER = {"base_url": "http://127.0.0.1:9/", "secret": "s" * 32}


def base(client: ServiceClient, path: str, *, admin_listener: bool) -> str:
    """An absolute URL on the listener chosen, whatever the path."""
    server = client.admin.server if admin_listener else client.server
    return f"http://{server.host}:{server.port}{path}"


async def test_each_listener_serves_only_its_own_routes(
    client: ServiceClient, settings: Settings
) -> None:
    ops, member = admin(settings), auth(settings, "m1")
    async with aiohttp.ClientSession() as http:

        async def status(path: str, admin_listener: bool, headers: dict[str, str]) -> int:
            url = base(client, path, admin_listener=admin_listener)
            async with http.get(url, headers=headers) as resp:
                if resp.status == 404:  # JSON like every error
                    assert (await resp.json())["error"] == "not_found"
                return resp.status

        # members' port: no admin API (not even with the admin token), no metrics
        assert await status("/admin/v1/benefits", False, ops) == 404
        assert await status("/admin/v1/writer", False, ops) == 404
        assert await status("/metrics", False, {}) == 404
        assert await status("/v1/benefits", False, member) == 200
        assert await status("/openapi.json", False, {}) == 200
        # ops' port: no member routes
        assert await status("/admin/v1/benefits", True, ops) == 200
        assert await status("/metrics", True, {}) == 200
        assert await status("/v1/benefits", True, member) == 404
        # health on both
        for admin_listener in (False, True):
            assert await status("/healthz", admin_listener, {}) == 200
            assert await status("/readyz", admin_listener, {}) == 200
        # partner callbacks come from outside: member port
        url = base(client, "/v1/partners/p1/callbacks", admin_listener=False)
        async with http.post(url, data=b"{}") as resp:
            assert resp.status == 401


class QueryCount:
    """Queries sent through a pool, by the table they name, counted by the driver itself
    (background work such as the recovery watch queries the pool too)."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def __call__(self, record: Any) -> None:
        self.queries.append(record.query)

    def on(self, table: str) -> int:
        return sum(1 for query in self.queries if table in query)


@pytest.fixture
async def counted(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> AsyncIterator[tuple[ServiceClient, QueryCount]]:
    """The service over a pool whose every query is counted."""
    queries = QueryCount()

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(queries)

    assert settings.database_url
    counted_pool = await asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=4, init=init
    )
    assert counted_pool is not None
    member, ops = create_apps(settings, pools=(redis, counted_pool))
    try:
        async with ServiceClient(member, ops, Guard.for_process(settings)) as test_client:
            yield test_client, queries
    finally:
        await counted_pool.close()


async def test_a_scrape_asks_postgresql_nothing(
    counted: tuple[ServiceClient, QueryCount], settings: Settings
) -> None:
    client, queries = counted
    resp = await client.get("/admin/v1/benefits/video/codes", headers=admin(settings))
    assert resp.status == 200  # ops asking for pool levels do count codes
    before = queries.on("voucher_codes")
    assert before > 0
    for _ in range(5):
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert "claim_decisions_total" in await resp.text()
    assert queries.on("voucher_codes") == before


async def test_forged_callbacks_cost_at_most_one_partner_load(
    counted: tuple[ServiceClient, QueryCount], settings: Settings
) -> None:
    client, queries = counted
    resp = await client.put("/admin/v1/partners/p1", json=PARTNER, headers=admin(settings))
    assert resp.status == 201
    body = json.dumps({"order_id": "0" * 32, "status": "success"}).encode()
    before = queries.on("partners")
    forged = signed_headers("a-guessed-secret-" + "x" * 16, body)
    replies = await asyncio.gather(
        *(
            client.post(f"/v1/partners/{partner}/callbacks", data=body, headers=forged)
            for partner in ["p1"] * 150 + [f"nope{i}" for i in range(50)]
        )
    )
    assert {r.status for r in replies} == {401}
    assert queries.on("partners") - before <= 1  # the partners, read once for the lot
    # Changing a partner empties the cache: the next look-up would read them again.
    resp = await client.put("/admin/v1/partners/p1", json=PARTNER, headers=admin(settings))
    assert resp.status == 200
    before = queries.on("partners")
    for headers in ({}, {"X-Claim-Signature": "00" * 32}, {**forged, "X-Claim-Timestamp": "1"}):
        resp = await client.post("/v1/partners/p1/callbacks", data=body, headers=headers)
        assert resp.status == 401
    assert queries.on("partners") == before  # refused on their headers alone


async def test_a_callback_is_refused_before_its_body_arrives(
    client: ServiceClient, settings: Settings
) -> None:
    resp = await client.put("/admin/v1/partners/p1", json=PARTNER, headers=admin(settings))
    assert resp.status == 201
    stale = signed_headers(PARTNER["secret"], b"{}", now=time.time() - 3600)
    for headers in (
        "",  # no signature at all
        "".join(f"{k}: {v}\r\n" for k, v in stale.items()),  # a stale one
    ):
        server = client.server
        reader, writer = await asyncio.open_connection(server.host, server.port)
        # The body is announced and never sent: the answer must not wait for it.
        writer.write(
            b"POST /v1/partners/p1/callbacks HTTP/1.1\r\nHost: test\r\n"
            + headers.encode()
            + b"Content-Length: 100\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 401"), head
        writer.close()
