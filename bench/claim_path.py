"""Micro-benchmark of the claim path, every figure set against baselines from the same run.

Measured, each repeated several times (the median is reported, with the spread):

* a Redis PING round trip from the engine's own client (the baseline), alone and 64 at once;
* one claim decided alone (sequential ``ClaimEngine.claim`` calls: batches of one);
* claims decided concurrently (``asyncio.gather`` of 64 / 256), which the engine coalesces
  into one ``claim.lua`` call per batch;
* JWT verification of a token the verifier has not seen (HS256, plus RS256/ES256 for
  gateway-signed tokens) against a cached verification of the same token;
* the whole HTTP path: an in-process aiohttp server on 127.0.0.1 and an aiohttp client
  firing concurrent claims, against the rate of a trivial ``GET /healthz``;
* the same engine under each ``CLAIM_DURABILITY`` mode (``claim_durability``): ``local`` and
  ``replica`` against ``none``, each on a Valkey (and replica) started for it.

Every claim is made by a member that has not claimed before, and the number of accepted
claims is checked: timing rejections (quota, sold out) would flatter the claim path.

Starts throw-away embedded servers unless ``CLAIM_REDIS_URL`` and ``CLAIM_DATABASE_URL`` are
both set; on servers of your own it leaves a paused ``bench-<time>`` benefit, its claims
(in Redis, for the writer to persist) and tiers for ``bench-m*`` members behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt
import orjson
import uvloop
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from redis.asyncio import Redis

from bench import claim_durability
from bench.report import Report, Row, write_report
from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.engine import ClaimEngine
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.http.app import ENGINE
from claim_service.http.auth import TokenVerifier, mint_token
from claim_service.http.service import create_app
from claim_service.local.embedded import EmbeddedServers
from claim_service.store import catalogue_store
from claim_service.store.connections import create_pg_pool, create_redis
from claim_service.store.keyspace import BenefitKeys, text
from claim_service.store.migrations import migrate
from claim_service.store.tiers import save_tiers

OPTION = "iqiyi"
MEMBER_TIER = 5
STOCK = 1_000_000


@dataclass(frozen=True)
class Plan:
    """How much to measure; each measurement runs once to warm up, then ``repeats`` times."""

    repeats: int
    pings: int
    lone_claims: int
    burst_sizes: tuple[int, ...]
    bursts: int
    verifications: int
    cached_verifications: int
    http_requests: int
    http_concurrency: int

    def members_needed(self) -> int:
        per_round = self.lone_claims + self.bursts * sum(self.burst_sizes) + self.http_requests
        return (self.repeats + 1) * per_round


FULL = Plan(repeats=7, pings=5000, lone_claims=1000, burst_sizes=(64, 256), bursts=20,
            verifications=2000, cached_verifications=100_000, http_requests=5000,
            http_concurrency=64)  # fmt: skip
QUICK = Plan(repeats=3, pings=500, lone_claims=100, burst_sizes=(64, 256), bursts=3,
             verifications=300, cached_verifications=5000, http_requests=500,
             http_concurrency=64)  # fmt: skip


class MemberIds:
    """Hands out member ids that have never claimed, so every claim can be accepted."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._next = 0

    def all(self) -> list[str]:
        return [self.name(i) for i in range(self.total)]

    @staticmethod
    def name(i: int) -> str:
        return f"bench-m{i:07d}"

    def take(self, n: int) -> list[str]:
        if self._next + n > self.total:
            raise RuntimeError("benchmark plan used more members than it set tiers for")
        start, self._next = self._next, self._next + n
        return [self.name(i) for i in range(start, start + n)]


@dataclass
class Bench:
    plan: Plan
    settings: Settings
    redis: Redis
    pg: asyncpg.Pool
    benefit_id: str
    members: MemberIds
    engine: ClaimEngine
    accepted_total: int = 0  # every accepted claim, warm-up rounds included
    rows: list[Row] = field(default_factory=list)

    def request(self, user: str) -> ClaimRequest:
        return ClaimRequest(self.benefit_id, user, f"r-{user}", OPTION)

    async def repeat(self, body: Callable[[], Awaitable[float]]) -> list[float]:
        await body()  # warm-up: script load, connection pool, caches
        return [await body() for _ in range(self.plan.repeats)]

    # -- (a) baselines -------------------------------------------------------------------

    async def ping(self) -> None:
        n = self.plan.pings

        async def one_at_a_time() -> float:
            start = time.perf_counter()
            for _ in range(n):
                await self.redis.ping()
            return _us(time.perf_counter() - start, n)

        async def many_at_once() -> float:
            rounds = n // 64
            start = time.perf_counter()
            for _ in range(rounds):
                await asyncio.gather(*(self.redis.ping() for _ in range(64)))
            return _us(time.perf_counter() - start, rounds * 64)

        self.rows.append(Row("ping", "Redis PING round trip (baseline)", "µs",
                             await self.repeat(one_at_a_time), n))  # fmt: skip
        self.rows.append(Row("ping64", "64 concurrent PINGs, per PING (no coalescing)", "µs",
                             await self.repeat(many_at_once), n // 64 * 64,
                             baseline="ping"))  # fmt: skip

    # -- (b, c) the engine ---------------------------------------------------------------

    async def lone_claims(self) -> None:
        n = self.plan.lone_claims
        accepted = 0
        batches = 0

        async def body() -> float:
            nonlocal accepted, batches
            users = self.members.take(n)
            before, ok = self.engine.batches, 0
            start = time.perf_counter()
            for user in users:
                decision = await self.engine.claim(self.request(user))
                ok += decision.accepted
            elapsed = time.perf_counter() - start
            self.accepted_total += ok
            accepted += ok
            batches += self.engine.batches - before
            return _us(elapsed, n)

        samples = await self.repeat(body)
        timed = n * (self.plan.repeats + 1)
        self.rows.append(Row("lone", "one claim decided alone (batch of 1)", "µs", samples,
                             n * self.plan.repeats, accepted=accepted, expected=timed,
                             baseline="ping",
                             note=f"avg batch {timed / batches:.1f}"))  # fmt: skip

    async def burst_claims(self, size: int) -> None:
        bursts = self.plan.bursts
        accepted = 0
        batches = claims = 0

        async def body() -> float:
            nonlocal accepted, batches, claims
            ok = 0
            b0, c0 = self.engine.batches, self.engine.batched_claims
            elapsed = 0.0
            for _ in range(bursts):
                requests = [self.request(u) for u in self.members.take(size)]
                start = time.perf_counter()
                decisions = await asyncio.gather(*(self.engine.claim(r) for r in requests))
                elapsed += time.perf_counter() - start
                ok += sum(d.accepted for d in decisions)
            self.accepted_total += ok
            accepted += ok
            batches += self.engine.batches - b0
            claims += self.engine.batched_claims - c0
            return _us(elapsed, bursts * size)

        samples = await self.repeat(body)
        total = bursts * size * (self.plan.repeats + 1)
        self.rows.append(Row(f"burst{size}", f"{size} concurrent claims, per claim", "µs",
                             samples, bursts * size * self.plan.repeats, accepted=accepted,
                             expected=total, baseline="ping",
                             note=f"avg batch {claims / batches:.1f}"))  # fmt: skip

    # -- (d, e) JWT ----------------------------------------------------------------------

    async def jwt_verification(self) -> None:
        n = self.plan.verifications
        users = [f"jwt-{i}" for i in range(n)]
        variants: list[tuple[str, str, Settings, list[str]]] = [
            ("jwt_hs256", "HS256", self.settings,
             [mint_token(self.settings, u) for u in users]),
        ]  # fmt: skip
        for alg, private in (("RS256", rsa.generate_private_key(65537, 2048)),
                             ("ES256", ec.generate_private_key(ec.SECP256R1()))):  # fmt: skip
            public = private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            settings = replace(self.settings, jwt_public_key=public.decode())
            exp = int(time.time()) + 3600
            tokens = [jwt.encode({"sub": u, "exp": exp}, private, algorithm=alg) for u in users]
            variants.append((f"jwt_{alg.lower()}", alg, settings, tokens))

        for key, alg, settings, tokens in variants:

            def fresh(settings: Settings = settings, tokens: list[str] = tokens) -> float:
                # A new verifier per token: nothing is cached, every signature is checked.
                verifiers = [TokenVerifier(settings) for _ in tokens]
                start = time.perf_counter()
                for verifier, token in zip(verifiers, tokens, strict=True):
                    verifier.verify(token)
                return _us(time.perf_counter() - start, len(tokens))

            what = f"{alg} verification, token not cached"
            if alg != "HS256":
                what += " (gateway key; extra)"
            samples = await self.repeat(_sync(fresh))
            self.rows.append(Row(key, what, "µs", samples, n * self.plan.repeats,
                                 baseline="ping"))  # fmt: skip

        m = self.plan.cached_verifications
        verifier = TokenVerifier(self.settings)
        token = variants[0][3][0]
        verifier.verify(token)

        def cached() -> float:
            start = time.perf_counter()
            for _ in range(m):
                verifier.verify(token)
            return _us(time.perf_counter() - start, m)

        self.rows.append(Row("jwt_cached", "HS256 verification, same token again (cached)",
                             "µs", await self.repeat(_sync(cached)), m * self.plan.repeats,
                             baseline="ping"))  # fmt: skip

    # -- (f) HTTP ------------------------------------------------------------------------

    async def http(self) -> None:
        app = create_app(self.settings, pools=(self.redis, self.pg))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            host, port = runner.addresses[0][:2]
            base = f"http://{host}:{port}"
            connector = aiohttp.TCPConnector(limit=self.plan.http_concurrency)
            async with aiohttp.ClientSession(base, connector=connector) as session:
                await self._http_rows(session, app[ENGINE])
        finally:
            await runner.cleanup()

    async def _http_rows(self, session: aiohttp.ClientSession, engine: ClaimEngine) -> None:
        n, concurrency = self.plan.http_requests, self.plan.http_concurrency
        health: Counter[int] = Counter()

        async def healthz() -> float:
            calls: list[tuple[str, str, dict[str, Any]]] = [("GET", "/healthz", {})] * n
            elapsed = await _fire(session, calls, concurrency, health)
            return n / elapsed

        claim_statuses: Counter[int] = Counter()
        path = f"/v1/benefits/{self.benefit_id}/claims"

        async def claims() -> float:
            calls: list[tuple[str, str, dict[str, Any]]] = []
            for user in self.members.take(n):  # tokens are minted before the clock starts
                headers = {"Authorization": f"Bearer {mint_token(self.settings, user)}",
                           "Content-Type": "application/json"}  # fmt: skip
                body = orjson.dumps({"request_id": f"r-{user}", "option_id": OPTION})
                calls.append(("POST", path, {"data": body, "headers": headers}))
            before = claim_statuses[202]
            elapsed = await _fire(session, calls, concurrency, claim_statuses)
            self.accepted_total += claim_statuses[202] - before
            return n / elapsed

        # Interleaved, so the baseline and the claims see the same machine conditions.
        await healthz()
        await claims()
        health_samples, claim_samples = [], []
        for _ in range(self.plan.repeats):
            health_samples.append(await healthz())
            claim_samples.append(await claims())
        total = n * (self.plan.repeats + 1)
        if health[200] != total:
            raise RuntimeError(f"GET /healthz answered {dict(health)}")
        note = f"{concurrency} in flight"
        self.rows.append(Row("healthz", "HTTP GET /healthz (baseline)", "req/s", health_samples,
                             n * self.plan.repeats, note=note))  # fmt: skip
        self.rows.append(Row("http_claims", "HTTP POST claim, fresh token each", "req/s",
                             claim_samples, n * self.plan.repeats, accepted=claim_statuses[202],
                             expected=total, baseline="healthz",
                             note=f"{note}; avg batch "
                                  f"{engine.batched_claims / max(engine.batches, 1):.1f}; "
                                  f"statuses {dict(claim_statuses)}"))  # fmt: skip


async def _fire(
    session: aiohttp.ClientSession,
    calls: list[tuple[str, str, dict[str, Any]]],
    concurrency: int,
    statuses: Counter[int],
) -> float:
    """Send ``calls`` with ``concurrency`` requests in flight; the elapsed seconds."""
    pending = iter(calls)

    async def worker() -> None:
        for method, url, kwargs in pending:
            async with session.request(method, url, **kwargs) as resp:
                await resp.read()
                statuses[resp.status] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


def _us(seconds: float, ops: int) -> float:
    return seconds * 1e6 / ops


def _sync(fn: Callable[[], float]) -> Callable[[], Awaitable[float]]:
    async def run() -> float:
        return fn()

    return run


@contextlib.contextmanager
def _servers() -> Iterator[tuple[str, str, bool]]:
    redis_url = os.environ.get("CLAIM_REDIS_URL")
    database_url = os.environ.get("CLAIM_DATABASE_URL")
    if redis_url and database_url:
        yield redis_url, database_url, False
        return
    with EmbeddedServers(ephemeral=True) as servers:
        yield servers.redis_url, servers.database_url, True


@contextlib.asynccontextmanager
async def _prepare(settings: Settings, plan: Plan) -> AsyncIterator[Bench]:
    """Migrate, create the benefit and the members' tiers; yields the benchmark."""
    assert settings.redis_url and settings.database_url
    conn = await asyncpg.connect(settings.database_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    redis = await create_redis(settings.redis_url)
    pg = await create_pg_pool(settings.database_url, max_size=10)
    try:
        benefit_id = f"bench-{int(time.time())}"
        opens = datetime.now(UTC) - timedelta(minutes=1)
        body = {
            "name": "claim-path benchmark",
            "min_tier": 4,
            "quota": [{"min_tier": 4, "per_period": 1}],
            "stock_per_period": STOCK,
            "release": {"type": "once", "opens_at": opens.isoformat()},
            "options": [
                {"option_id": OPTION, "name": "iQiyi", "kind": "direct_charge",
                 "partner": "iqiyi", "sku": "IQY-M1"},
            ],
        }  # fmt: skip
        benefit = parse_benefit(benefit_id, body, settings.tz)
        await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pg, benefit))
        members = MemberIds(plan.members_needed())
        period = periods.current_period(settings.tz)
        await save_tiers(pg, redis, period, [(u, MEMBER_TIER) for u in members.all()])
        engine = ClaimEngine(redis, settings, pool=pg)
        yield Bench(plan, settings, redis, pg, benefit_id, members, engine)
        # Keep a reused server's catalogue quiet after the run.
        await catalogue_store.set_paused(pg, redis, settings.tz, benefit_id, True)
    finally:
        await pg.close()
        await redis.aclose()


async def run(
    plan: Plan, redis_url: str, database_url: str
) -> tuple[Report, list[claim_durability.Measured]]:
    settings = Settings.from_env({}, redis_url=redis_url, database_url=database_url)
    started = time.perf_counter()
    report = Report(started_at=datetime.now(UTC))
    async with _prepare(settings, plan) as bench:
        info = await bench.redis.info("server")
        report.valkey = str(info.get("valkey_version") or info.get("redis_version"))
        report.postgres = str(await bench.pg.fetchval("SHOW server_version"))
        report.members = plan.members_needed()
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("PING baseline", bench.ping),
            ("lone claims", bench.lone_claims),
            *((f"bursts of {s}", _bind(bench.burst_claims, s)) for s in plan.burst_sizes),
            ("JWT verification", bench.jwt_verification),
            ("HTTP", bench.http),
        ]
        for name, step in steps:
            t0 = time.perf_counter()
            await step()
            print(f"  {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        keys = BenefitKeys(bench.benefit_id)
        period = periods.current_period(settings.tz)
        taken = await bench.redis.hget(keys.stock(period), "taken")
        report.stock_taken = int(text(taken)) if taken is not None else 0
        report.accepted_total = bench.accepted_total
        report.rows = bench.rows
        t0 = time.perf_counter()
        durability = await claim_durability.measure(
            settings, bench.pg, bench.redis, _workload(plan), plan.members_needed()
        )
        print(f"  durability: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    report.duration_s = time.perf_counter() - started
    report.load_after = os.getloadavg()
    return report, durability


def _workload(plan: Plan) -> claim_durability.Workload:
    # Fewer lone claims: under the durable modes each waits for an fsync of its own.
    lone = plan.lone_claims // 4
    return claim_durability.Workload(plan.repeats, lone, plan.bursts, plan.burst_sizes)


def _bind(fn: Callable[[int], Awaitable[None]], size: int) -> Callable[[], Awaitable[None]]:
    return lambda: fn(size)


def main(*, quick: bool, output: Path) -> int:
    plan = QUICK if quick else FULL
    command = "./run bench claim-path" + (" --quick" if quick else "")
    started = time.perf_counter()
    with _servers() as (redis_url, database_url, embedded):
        print(f"servers up in {time.perf_counter() - started:.1f} s "
              f"({'embedded, ephemeral' if embedded else 'from CLAIM_*_URL'})",
              file=sys.stderr, flush=True)  # fmt: skip
        report, durability = uvloop.run(run(plan, redis_url, database_url))
    report.command = command
    report.quick = quick
    report.embedded = embedded
    report.repeats = plan.repeats
    report.wall_s = time.perf_counter() - started
    text_ = write_report(report, output)
    text_ += "\n" + claim_durability.render(durability, _workload(plan))
    output.write_text(text_)
    print(text_)
    print(f"report written to {output}", file=sys.stderr)
    durable_ok = all(m.accepted == m.sent for m in durability)
    return 0 if report.all_accepted and durable_ok else 1
