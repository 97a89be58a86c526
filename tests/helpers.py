"""Helpers shared by the test modules; the fixtures are in ``tests/conftest.py``.

- requests and bodies: ``auth``, ``admin``, ``member_token``, ``direct``, ``benefit_body``;
- the in-process service: ``ServiceClient`` (both listeners behind one test client) and
  ``TABLES`` (every table a test flushes);
- processes: ``service_env``, ``spawn``, ``spawn_serve``, ``Listeners``, ``wait_ready``,
  ``workers_of``, ``open_video``;
- waiting: ``wait_for``;
- durability and failover: ``setup_open_benefit``, ``durable_service``, ``command_calls``,
  ``stream_claim_ids``;
- the writer: ``fast``, ``drain``;
- partners and direct charge: ``SECRET``, ``quick``, ``setup_partner``, ``claim_all``,
  ``run_until_final``, ``assert_units_returned_once``, ``callback_base``;
- card-key pools: ``CODES``, ``setup_codes``, ``claim_codes``, ``settle``;
- raw HTTP: ``hostile_requests``, ``send_raw``.

The benefit set-up for a direct-charge partner and the one for a card-key pool are
``setup_partner`` and ``setup_codes``; claiming the direct-charge option is ``claim_all``,
claiming the card-key one ``claim_codes``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from redis.asyncio import Redis
from yarl import URL

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.fulfilment.signing import signed_headers
from claim_service.fulfilment.worker import FulfilmentWorker
from claim_service.http.auth import mint_token
from claim_service.http.server import Guard, ServiceRunner
from claim_service.http.service import create_apps
from claim_service.local.embedded import free_port
from claim_service.local.partner_sim import PartnerSimulator
from claim_service.store import catalogue_store
from claim_service.store.connections import create_redis
from claim_service.store.keyspace import BenefitKeys, text
from claim_service.store.tiers import save_tiers

Client = TestClient[Any, Any]

# -- requests and bodies -------------------------------------------------------------------


def member_token(settings: Settings, user_id: str, ttl: int = 3600) -> str:
    return mint_token(settings, user_id, ttl)


def auth(settings: Settings, user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {member_token(settings, user_id)}"}


def admin(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.admin_token}"}


def direct(option_id: str, **extra: Any) -> dict[str, Any]:
    """A direct-charge option (card-key options need codes loaded before they can be claimed)."""
    return {"option_id": option_id, "kind": "direct_charge", "partner": "p", "sku": "s", **extra}


def benefit_body(
    *,
    stock: int = 10,
    min_tier: int = 4,
    quota: Any = None,
    opens_in_s: float = -60,
    closes_in_s: float | None = None,
    options: list[dict[str, Any]] | None = None,
    paused: bool = False,
) -> dict[str, Any]:
    now = datetime.now().astimezone()
    release: dict[str, Any] = {
        "type": "once",
        "opens_at": (now + timedelta(seconds=opens_in_s)).isoformat(),
    }
    if closes_in_s is not None:
        release["closes_at"] = (now + timedelta(seconds=closes_in_s)).isoformat()
    return {
        "name": "Video membership, monthly card",
        "min_tier": min_tier,
        "quota": quota
        if quota is not None
        else [
            {"min_tier": 4, "per_period": 1},
            {"min_tier": 8, "per_period": 2},
        ],
        "stock_per_period": stock,
        "release": release,
        "paused": paused,
        "options": options
        or [
            {
                "option_id": "iqiyi",
                "name": "iQiyi",
                "kind": "direct_charge",
                "partner": "iqiyi",
                "sku": "IQY-M1",
            },
            {
                "option_id": "tencent",
                "name": "Tencent Video",
                "kind": "direct_charge",
                "partner": "tencent",
                "sku": "TX-M1",
            },
        ],
    }


# -- the in-process service ----------------------------------------------------------------

TABLES = (
    "anomalies, claims, claim_events, voucher_codes, partners, tiers, stock_additions, "
    "benefit_options, benefits, zones, points_rules, points_allocations, points_lots, "
    "points_entries, draws, draw_seeds, room_seeds, bank_events, campaign_rewards, "
    "referral_refusals, referral_attributions, referral_codes, campaigns"
)


class ServiceTestServer(TestServer):
    """A test server run as ``serve`` runs its listeners (guarded connections, handlers not
    cancelled when their client goes away)."""

    def __init__(self, app: web.Application, guard: Guard) -> None:
        super().__init__(app)
        self.guard = guard

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        kwargs["handler_cancellation"] = False
        return ServiceRunner(self.app, self.guard, **kwargs)


def is_admin_path(path: str) -> bool:
    return path == "/metrics" or path == "/admin" or path.startswith(("/admin/", "/admin?"))


class ServiceClient(TestClient[Any, Any]):
    """The member and admin listeners behind one client: each request goes to the listener
    that serves its path under ``serve`` (``/admin…`` and ``/metrics`` to the admin one)."""

    def __init__(self, member: web.Application, admin: web.Application, guard: Guard) -> None:
        super().__init__(ServiceTestServer(member, guard))
        self.admin = TestClient(ServiceTestServer(admin, guard))

    @property
    def admin_app(self) -> web.Application:
        return self.admin.app

    def server_for(self, path: str) -> TestServer:
        """The test server of the listener that serves ``path``."""
        chosen = self.admin.server if is_admin_path(path) else self.server
        assert isinstance(chosen, TestServer)
        return chosen

    def make_url(self, path: Any) -> URL:
        url = URL(path)
        if url.is_absolute():
            return url
        return self.server_for(url.path).make_url(path)

    async def start_server(self) -> None:
        await super().start_server()  # the member listener owns the pools: first up
        await self.admin.start_server()

    async def close(self) -> None:
        await self.admin.close()
        await super().close()


# -- processes -----------------------------------------------------------------------------


def service_env(settings: Settings, **env: str) -> dict[str, str]:
    """This process's environment, pointed at the test servers, with ``env`` on top."""
    return {
        **os.environ,
        "CLAIM_REDIS_URL": settings.redis_url or "",
        "CLAIM_DATABASE_URL": settings.database_url or "",
        **env,
    }


def spawn(settings: Settings, args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "claim_service", *args],
        env=service_env(settings, **env),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


@dataclass(frozen=True)
class Listeners:
    """The two ports of a ``serve`` process."""

    port: int
    admin_port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def spawn_serve(
    settings: Settings, log: Path, *args: str, **env: str
) -> tuple[subprocess.Popen[bytes], Listeners]:
    """``serve`` on two free ports; the tests' servers are throw-away (``--insecure-dev``)."""
    ports = Listeners(free_port(), free_port())
    command = ["serve", "--insecure-dev", "--port", str(ports.port)]
    command += ["--admin-port", str(ports.admin_port), *args]
    return spawn(settings, command, log, **env), ports


async def wait_ready(http: aiohttp.ClientSession, *urls: str, within: float = 30.0) -> None:
    async def ready() -> bool:
        try:
            for url in urls:
                async with http.get(url + "/readyz") as resp:
                    if resp.status != 200:
                        return False
            return True
        except aiohttp.ClientError:
            return False

    await wait_for(ready, within)


def workers_of(parent: int) -> set[int]:
    """Live worker processes of a ``serve --workers N`` parent."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.add(int(entry.name))
    return found


async def open_video(http: aiohttp.ClientSession, settings: Settings, ports: Listeners) -> None:
    """Benefit ``video`` open now, and members m0..m999 at tier 5."""
    async with http.put(
        f"{ports.admin}/admin/v1/benefits/video",
        headers=admin(settings),
        json=benefit_body(stock=1000),
    ) as resp:
        assert resp.status == 201, await resp.text()
    period = periods.current_period(settings.tz)
    snapshot = [{"user_id": f"m{i}", "tier": 5} for i in range(1000)]
    async with http.put(
        f"{ports.admin}/admin/v1/tiers/{period}", headers=admin(settings), json=snapshot
    ) as resp:
        assert resp.status == 200, await resp.text()


# -- waiting -------------------------------------------------------------------------------


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], within: float = 30.0, every: float = 0.05
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(every)
    raise AssertionError("condition not reached in time")


# -- the writer ----------------------------------------------------------------------------


def fast(settings: Settings) -> Settings:
    return replace(settings, writer_block_ms=50)


async def drain(writer: ClaimWriter, rounds: int = 50) -> None:
    """Step the writer until a full round finds nothing left to do."""
    idle = 0
    for _ in range(rounds):
        idle = idle + 1 if await writer.step() == 0 else 0
        if idle >= 2:
            return


# -- partners and direct charge ------------------------------------------------------------

SECRET = "partner-secret-0123456789"


def quick(settings: Settings, **overrides: Any) -> Settings:
    return replace(
        settings,
        retry_base_ms=20,
        retry_max_ms=150,
        fulfil_poll_ms=20,
        fulfil_processing_recheck_s=1,
        breaker_threshold=1000,
        **overrides,
    )


def callback_base(client: Client) -> str:
    """Where a partner sends its callbacks to ``client``'s service."""
    return str(client.make_url("")).rstrip("/")


async def setup_partner(
    client: Client,
    settings: Settings,
    sim: PartnerSimulator,
    *,
    members: int,
    stock: int,
    on_failure: str = "refund",
    max_attempts: int = 12,
    timeout_s: float = 0.25,
) -> None:
    partner = {
        "base_url": sim.url,
        "secret": SECRET,
        "timeout_s": timeout_s,
        "max_in_flight": 32,
        "max_attempts": max_attempts,
    }
    resp = await client.put("/admin/v1/partners/sim", json=partner, headers=admin(settings))
    assert resp.status in (200, 201), await resp.text()
    assert "secret" not in await resp.json()
    body = benefit_body(stock=stock, quota=1, options=[direct("iqiyi", partner="sim", sku="IQY")])
    body["on_failure"] = on_failure
    resp = await client.put("/admin/v1/benefits/video", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": f"u{i}", "tier": 5} for i in range(members)]
    assert (
        await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))
    ).status == 200


async def claim_all(client: Client, settings: Settings, members: int) -> list[str]:
    async def one(i: int) -> str | None:
        resp = await client.post(
            "/v1/benefits/video/claims",
            headers=auth(settings, f"u{i}"),
            json={"request_id": "r", "option_id": "iqiyi", "account": f"1380000{i:04d}"},
        )
        return (await resp.json())["claim_id"] if resp.status == 202 else None

    return [c for c in await asyncio.gather(*(one(i) for i in range(members))) if c]


async def run_until_final(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    within: float = 60.0,
    *,
    waiting_ok: bool = False,
) -> None:
    """Run a fulfil worker until every claim is final (or, with ``waiting_ok``, final or
    visibly waiting for its partner to say whether the order was charged)."""
    await drain(ClaimWriter(redis, pool, fast(settings)))
    stop = asyncio.Event()
    worker = FulfilmentWorker(pool, redis, settings)
    task = asyncio.create_task(worker.run(stop))
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            open_claims = await pool.fetchval(
                """SELECT count(*) FROM claims WHERE status IN ('accepted', 'fulfilling')
                   AND NOT ($1 AND outcome_unknown_since IS NOT NULL)""",
                waiting_ok,
            )
            failed = await pool.fetchval("""SELECT count(*) FROM claims c JOIN benefits b
                USING (benefit_id) WHERE c.status = 'failed' AND b.on_failure = 'refund'""")
            if open_claims == 0 and failed == 0:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("fulfilment did not settle")
    finally:
        stop.set()
        await task


async def assert_units_returned_once(settings: Settings, redis: Redis, pool: asyncpg.Pool) -> None:
    period = periods.current_period(settings.tz)
    keys = BenefitKeys("video")
    live = await pool.fetchval("SELECT count(*) FROM claims WHERE status <> 'refunded'")
    assert int(await redis.hget(keys.stock(period), "taken") or 0) == live
    refunded = await pool.fetchval("SELECT count(*) FROM claims WHERE status = 'refunded'")
    assert await redis.scard(keys.refunded(period)) == refunded
    per_member = {
        r["user_id"]: r["n"]
        for r in await pool.fetch(
            "SELECT user_id, count(*) FILTER (WHERE status <> 'refunded') AS n FROM claims "
            "GROUP BY user_id"
        )
    }
    used = {text(k): int(v) for k, v in (await redis.hgetall(keys.used(period))).items()}
    assert {u: n for u, n in used.items() if n} == {u: n for u, n in per_member.items() if n}
    refund_events = await pool.fetchval(
        "SELECT count(*) FROM claim_events WHERE to_status = 'refunded' AND from_status = 'failed'"
    )
    assert refund_events == refunded


# -- card-key pools ------------------------------------------------------------------------

CODES = [f"YK-{i:05d}-SECRETCODE" for i in range(40)]


async def setup_codes(
    client: Client, settings: Settings, stock: int = 100, codes: int = 40
) -> None:
    body = benefit_body(
        stock=stock, quota=1, options=[{"option_id": "youku", "kind": "card_key"}, direct("x")]
    )
    resp = await client.put("/admin/v1/benefits/video", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": f"u{i}", "tier": 5} for i in range(100)]
    resp = await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))
    assert resp.status == 200
    if codes:
        load = [{"code": c, "secret": f"pin-{i}"} for i, c in enumerate(CODES[:codes])]
        resp = await client.post(
            "/admin/v1/benefits/video/options/youku/codes", json=load, headers=admin(settings)
        )
        assert resp.status == 200, await resp.text()
        report = await resp.json()
        assert report["loaded"] == codes and report["pool"]["free"] == codes


async def claim_codes(client: Client, settings: Settings, users: range) -> list[dict[str, Any]]:
    async def one(i: int) -> dict[str, Any]:
        resp = await client.post(
            "/v1/benefits/video/claims",
            headers=auth(settings, f"u{i}"),
            json={"request_id": "r", "option_id": "youku"},
        )
        return {**(await resp.json()), "http": resp.status}

    return list(await asyncio.gather(*(one(i) for i in users)))


async def settle(settings: Settings, redis: Redis, pool: asyncpg.Pool) -> FulfilmentWorker:
    await drain(ClaimWriter(redis, pool, fast(settings)))
    worker = FulfilmentWorker(pool, redis, replace(settings, codes_low_watermark=5))
    while await worker.tick():
        await worker.drain()
    await worker.drain()
    return worker


# -- raw HTTP ------------------------------------------------------------------------------


def hostile_requests(
    token: str, admin_token: str, partner_secret: str
) -> Iterator[tuple[bytes, int | None]]:
    """Raw requests carrying secrets, and the JSON status each gets (``None``: the client
    hangs up before an answer)."""
    bearer = f"Authorization: Bearer {token}".encode()
    ops = f"Authorization: Bearer {admin_token}".encode()
    # Every answer closes its connection, so that each case is read to its end.
    get = b"GET /v1/benefits HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
    post = b"POST /v1/benefits/video/claims HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
    admin_get = b"GET /admin/v1/benefits HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
    yield get + bearer + b"\x01\r\n\r\n", 400  # a control character in a header
    yield admin_get + ops + b"\x01\r\n\r\n", 400
    yield get + bearer + b"A" * 20_000 + b"\r\n\r\n", 400  # one header too large
    yield admin_get + ops + b"A" * 20_000 + b"\r\n\r\n", 400
    many = b"".join(b"X-%d: %s\r\n" % (i, token.encode()) for i in range(200))
    yield get + many + b"\r\n", 400  # too many headers
    framing = b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef"
    yield post + bearer + b"\r\n" + framing, 400  # two lengths
    chunked = b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    yield post + bearer + b"\r\n" + chunked, 400  # a broken chunk size
    yield admin_get.replace(b"GET", b"G\x00T") + ops + b"\r\n\r\n", 400
    # an unauthenticated body in an encoding nobody can decode
    yield post + b"Content-Encoding: br\r\nContent-Length: 10\r\n\r\n0123456789", 401
    # a signature that is not ASCII
    callback = b"POST /v1/partners/p1/callbacks HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
    body = b'{"order_id": "' + b"0" * 32 + b'", "status": "success"}'
    signed = signed_headers(partner_secret, body)
    stamp = f"X-Claim-Timestamp: {signed['X-Claim-Timestamp']}\r\n".encode()
    sig = "X-Claim-Signature: é".encode() + b"f" * 63 + b"\r\n"
    length = b"Content-Length: %d\r\n\r\n" % len(body)
    yield callback + stamp + sig + length + body, 401
    # a member gone half-way through the body
    yield (
        post + bearer + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        b'{"request_id": "r"',
        None,
    )


async def send_raw(host: str, port: int, request: bytes, status: int | None) -> None:
    """Send one raw request; unless the client is to hang up, read the whole answer (the
    server closes) and check it is a JSON error of ``status``."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        if status is None:
            return
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == str(status).encode(), data[:300]
    assert b"\r\ncontent-type: application/json" in head.lower(), head
    code = {400: "invalid_request", 401: "unauthorized"}[status]
    assert json.loads(payload)["error"] == code, payload


# -- durability and failover ---------------------------------------------------------------


async def setup_open_benefit(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, *, stock: int, members: int
) -> None:
    """Benefit ``video`` (option ``iqiyi``, quota 1) open now, members u0.. at tier 5."""
    benefit = parse_benefit("video", benefit_body(stock=stock, quota=1), settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pool, benefit))
    period = periods.current_period(settings.tz)
    await save_tiers(pool, redis, period, [(f"u{i}", 5) for i in range(members)])


@asynccontextmanager
async def durable_service(
    settings: Settings, pool: asyncpg.Pool, redis_url: str, **overrides: Any
) -> AsyncIterator[tuple[ServiceClient, Redis]]:
    """The service on the Redis at ``redis_url`` (flushed) with ``overrides`` to its settings,
    benefit ``video`` open to u0..u199 (stock 100)."""
    redis = await create_redis(redis_url)
    try:
        await redis.flushall()
        local = replace(settings, redis_url=redis_url, **overrides)
        await setup_open_benefit(local, redis, pool, stock=100, members=200)
        member, admin_app = create_apps(local, pools=(redis, pool))
        async with ServiceClient(member, admin_app, Guard.for_process(local)) as client:
            yield client, redis
    finally:
        await redis.aclose()


async def command_calls(redis: Redis) -> Counter[str]:
    """How often the server ran each command (``INFO commandstats``), by lower-case name."""
    stats = await redis.info("commandstats")
    return Counter(
        {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if "calls" in v}
    )


async def stream_claim_ids(redis: Redis, user_id: str, benefit_id: str = "video") -> list[str]:
    """The claim ids the benefit's stream holds for ``user_id``."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(  # type: ignore[assignment]
        BenefitKeys(benefit_id).stream
    )
    return [text(f[b"c"]) for _, f in entries if text(f[b"u"]) == user_id]
