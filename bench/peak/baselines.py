"""The baseline servers the claim service is measured against, each its own process:
``python -m bench.peak.baselines KIND --port P --benefit B [--stock N]``.

All but ``trivial`` are aiohttp on uvloop, one process, answering ``POST
/v1/benefits/{id}/claims`` with the service's own JSON handling (``read_json``,
``parse_claim_body``, errors through its ``error_middleware``) and an accepted-claim body of
the same shape, so that they differ from the service only in what the name says:

- ``bare`` (a): no authentication, nothing decided: the cost of the HTTP and JSON layers;
- ``jwt`` (b): as ``bare``, plus a PyJWT HS256 decode of the bearer token per request;
- ``evalsha`` (c): the service's token check (``TokenVerifier``, with its cache) and one
  ``EVALSHA`` of a small Lua script per claim (``baseline_claim.lua``: replay check, stock
  decrement, claim record), no coalescing;
- ``postgres`` (d): the service's token check and one PostgreSQL transaction per claim: a
  conditional ``UPDATE … SET units_left = units_left - 1 WHERE … AND units_left > 0
  RETURNING`` then an ``INSERT`` (``baseline_pg.sql``);
- ``trivial``: a raw asyncio Protocol answering every request with a fixed 202, the
  cheapest server there is: what the load generator can drive at most (its ceiling).

Redis and PostgreSQL come from ``CLAIM_REDIS_URL`` / ``CLAIM_DATABASE_URL``, the JWT secret
from ``CLAIM_JWT_SECRET``, as for the service. What (c) and (d) write is removed when they
stop.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import cast

import asyncpg
import jwt
import orjson
import uvloop
from aiohttp import web
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.http.app import error_middleware, read_json
from claim_service.http.auth import AuthError, TokenVerifier, bearer
from claim_service.http.member import parse_claim_body
from claim_service.store.connections import create_pg_pool, create_redis

HERE = Path(__file__).resolve().parent
KINDS = ("trivial", "bare", "jwt", "evalsha", "postgres")
# The service's own pool sizes (`serve`), so that (c) and (d) get the same resources.
REDIS_POOL_SIZE = 256
PG_POOL_SIZE = 10
KEY_PREFIX = "bench-peak"
TAKE_UNIT = """UPDATE bench_peak_stock SET units_left = units_left - 1
               WHERE benefit_id = $1 AND units_left > 0 RETURNING units_left"""
RECORD_CLAIM = """INSERT INTO bench_peak_claims (claim_id, benefit_id, user_id, request_id,
                  option_id) VALUES ($1, $2, $3, $4, $5)"""

Decide = Callable[[str, str, str, str], Awaitable[tuple[int, str, int]]]


def accepted_body(
    benefit_id: str, option_id: str, claim_id: str, left: int, settings: Settings
) -> bytes:
    """The service's 202 body, field for field."""
    now = datetime.now(settings.tz)
    return orjson.dumps(
        {
            "claim_id": claim_id,
            "status": "accepted",
            "benefit_id": benefit_id,
            "option_id": option_id,
            "period": periods.current_period(settings.tz),
            "stock_left": left,
            "created_at": now.isoformat(timespec="milliseconds"),
            "replayed": False,
        }
    )


def new_claim_id() -> str:
    """As the service's: 48-bit milliseconds then 80 random bits, in hex."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def claim_app(kind: str, settings: Settings, decide: Decide | None) -> web.Application:
    """The member listener of baselines (a) to (d)."""
    verifier = TokenVerifier(settings)

    def member(request: web.Request) -> str:
        if kind == "bare":
            return "anonymous"
        token = bearer(request.headers.get("Authorization"))
        if kind == "jwt":  # a decode per request, nothing cached
            try:
                claims = jwt.decode(
                    token,
                    settings.jwt_secret,
                    algorithms=["HS256"],
                    options={"require": ["sub", "exp"]},
                )
            except jwt.PyJWTError as exc:
                raise AuthError("invalid token") from exc
            return str(claims["sub"])
        return verifier.verify(token)

    async def post_claim(request: web.Request) -> web.Response:
        user = member(request)
        benefit_id = request.match_info["benefit_id"]
        data = await read_json(request, settings.max_body_bytes)
        request_id, option_id, _ = parse_claim_body(data)
        option = option_id or "default"
        code, claim_id, left = (1, new_claim_id(), 0)
        if decide is not None:
            code, claim_id, left = await decide(benefit_id, user, request_id, option)
        if code == 0:
            body = orjson.dumps(
                {
                    "error": "sold_out",
                    "message": "sold out for this period",
                    "benefit_id": benefit_id,
                    "stock_left": 0,
                }
            )
            return web.Response(body=body, status=410, content_type="application/json")
        body = accepted_body(benefit_id, option, claim_id, left, settings)
        return web.Response(
            body=body, status=202 if code == 1 else 200, content_type="application/json"
        )

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/v1/benefits/{benefit_id}/claims", post_claim)
    return app


async def evalsha_decider(
    settings: Settings, benefit_id: str, stock: int
) -> tuple[Decide, Callable[[], Awaitable[None]]]:
    """Baseline (c): one EVALSHA per claim on a pooled client configured as the service's."""
    redis: Redis = await create_redis(
        settings.redis_url or "",
        max_connections=REDIS_POOL_SIZE,
        timeout_s=settings.redis_timeout_ms / 1000,
    )
    script = redis.register_script((HERE / "baseline_claim.lua").read_text())
    stock_key = f"{KEY_PREFIX}:{benefit_id}:stock"
    claims_key = f"{KEY_PREFIX}:{benefit_id}:claims"
    await redis.delete(claims_key)
    await redis.hset(stock_key, "left", stock)

    async def decide(benefit: str, user: str, request_id: str, option: str) -> tuple[int, str, int]:
        code, claim_id, left = await script(
            keys=[stock_key, claims_key], args=[f"{user}\x00{request_id}", new_claim_id()]
        )
        return (
            int(code),
            claim_id.decode() if isinstance(claim_id, bytes) else str(claim_id),
            int(left),
        )

    async def close() -> None:
        await redis.delete(stock_key, claims_key)
        await redis.aclose(close_connection_pool=True)

    return decide, close


async def postgres_decider(
    settings: Settings, benefit_id: str, stock: int
) -> tuple[Decide, Callable[[], Awaitable[None]]]:
    """Baseline (d): one transaction per claim, the stock row updated under its row lock."""
    pool = await create_pg_pool(settings.database_url or "", max_size=PG_POOL_SIZE)
    await pool.execute((HERE / "baseline_pg.sql").read_text())
    await pool.execute("DELETE FROM bench_peak_claims WHERE benefit_id = $1", benefit_id)
    await pool.execute(
        """INSERT INTO bench_peak_stock (benefit_id, units_left) VALUES ($1, $2)
           ON CONFLICT (benefit_id) DO UPDATE SET units_left = EXCLUDED.units_left""",
        benefit_id,
        stock,
    )

    async def decide(benefit: str, user: str, request_id: str, option: str) -> tuple[int, str, int]:
        claim_id = new_claim_id()
        try:
            async with pool.acquire() as conn, conn.transaction():
                left = await conn.fetchval(TAKE_UNIT, benefit)
                if left is None:
                    return 0, "", 0
                await conn.execute(RECORD_CLAIM, claim_id, benefit, user, request_id, option)
                return 1, claim_id, int(left)
        except asyncpg.UniqueViolationError:  # a retry: the claim it made before
            known = await pool.fetchval(
                "SELECT claim_id FROM bench_peak_claims WHERE benefit_id = $1 AND user_id = $2"
                " AND request_id = $3",
                benefit,
                user,
                request_id,
            )
            return 2, str(known), 0

    async def close() -> None:
        await pool.execute("DELETE FROM bench_peak_claims WHERE benefit_id = $1", benefit_id)
        await pool.execute("DELETE FROM bench_peak_stock WHERE benefit_id = $1", benefit_id)
        await pool.close()

    return decide, close


class TrivialServer(asyncio.Protocol):
    """Answers every request (read as far as its Content-Length) with the same 202."""

    BODY = orjson.dumps(
        {
            "claim_id": "0" * 32,
            "status": "accepted",
            "benefit_id": "trivial",
            "option_id": "iqiyi",
            "period": "2026-01",
            "stock_left": 0,
            "created_at": "2026-01-10T10:00:00.000+08:00",
            "replayed": False,
        }
    )
    ANSWER = (
        b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            at = buf.find(b"Content-Length:", 0, end)
            length = int(buf[at + 15 : buf.find(b"\r\n", at, end + 2)]) if at >= 0 else 0
            if len(buf) < end + 4 + length:
                break
            buf = buf[end + 4 + length :]
            assert self.transport is not None
            self.transport.write(self.ANSWER)
        self.buf = buf


async def serve(kind: str, port: int, benefit_id: str, stock: int) -> None:
    settings = Settings.from_env()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if kind == "trivial":
        server = await loop.create_server(TrivialServer, "127.0.0.1", port, backlog=4096)
        await stop.wait()
        server.close()
        return
    decide: Decide | None = None
    close: Callable[[], Awaitable[None]] | None = None
    if kind == "evalsha":
        decide, close = await evalsha_decider(settings, benefit_id, stock)
    elif kind == "postgres":
        decide, close = await postgres_decider(settings, benefit_id, stock)
    runner = web.AppRunner(claim_app(kind, settings, decide), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if close is not None:
            await close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peak.baselines", description=__doc__)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--benefit", default="baseline")
    parser.add_argument("--stock", type=int, default=10_000_000)
    args = parser.parse_args()
    uvloop.run(serve(args.kind, args.port, args.benefit, args.stock))


if __name__ == "__main__":
    main()
