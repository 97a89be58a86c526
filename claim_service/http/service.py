"""The two applications of ``serve``: the member listener and the ops listener, over one
set of Redis and PostgreSQL pools opened in ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from claim_service.claims.engine import ClaimEngine
from claim_service.claims.live import LiveFeeds
from claim_service.claims.rooms import WaitingRooms
from claim_service.config import Settings
from claim_service.http import (
    admin,
    bank_events,
    campaigns,
    dashboard,
    draws,
    events,
    member,
    partner,
    points,
    queue,
)
from claim_service.http.app import (
    ENGINE,
    HANDLER_ARGS,
    LIMITS,
    PG,
    REDIS,
    SETTINGS,
    VAULT,
    VERIFIER,
    error_middleware,
)
from claim_service.http.auth import TokenVerifier
from claim_service.http.limits import ClaimLimits
from claim_service.store.connections import create_pg_pool, create_redis
from claim_service.store.recovery import Recovery
from claim_service.store.vault import Vault


def create_app(
    settings: Settings, *, pools: tuple[Redis, asyncpg.Pool] | None = None
) -> web.Application:
    """The member-facing service (``CLAIM_HOST:CLAIM_PORT``). ``pools`` lets tests share
    clients; otherwise they are opened from the settings' URLs in ``cleanup_ctx`` and closed
    on shutdown. ``create_admin_app`` serves ops from the same pools."""
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=settings.max_body_bytes,
        handler_args=HANDLER_ARGS,
    )
    app[SETTINGS] = settings
    app[VERIFIER] = TokenVerifier(settings)
    app[VAULT] = Vault(settings.codes_key)
    app[LIMITS] = ClaimLimits(settings)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        if pools is not None:
            redis, pg = pools
        else:
            redis_url, database_url = settings.require_urls()
            redis = await create_redis(redis_url, max_connections=256)
            pg = await create_pg_pool(database_url, max_size=10)
        app[REDIS] = redis
        app[PG] = pg
        app[ENGINE] = ClaimEngine(redis, settings, pool=pg)
        app[queue.ROOMS] = WaitingRooms(app[ENGINE], redis, pg)
        app[events.LIVE] = LiveFeeds(app[ENGINE], redis, app[queue.ROOMS])
        # Recovers what a new (restarted, replaced, promoted) Redis lacks, and repairs one
        # found behind PostgreSQL, while serving.
        stop_watch = asyncio.Event()
        watch = asyncio.create_task(Recovery(pg, redis, settings).watch(stop_watch))
        gate = asyncio.create_task(app[ENGINE].gate.run(stop_watch))
        lag = asyncio.create_task(app[LIMITS].watch_lag(stop_watch))
        live = asyncio.create_task(app[events.LIVE].run(stop_watch))
        yield
        stop_watch.set()
        await live
        await watch
        await gate
        await lag
        await app[ENGINE].drain()
        if pools is None:
            await pg.close()
            await redis.aclose()

    app.cleanup_ctx.append(resources)
    member.add_routes(app)
    points.add_routes(app)
    draws.add_routes(app)
    events.add_routes(app)
    queue.add_routes(app)
    partner.add_routes(app)
    bank_events.add_routes(app)
    campaigns.add_routes(app)
    return app


def create_admin_app(settings: Settings, member_app: web.Application) -> web.Application:
    """The ops service (``CLAIM_ADMIN_HOST:CLAIM_ADMIN_PORT``): ``/admin``, ``/metrics`` and
    health. It serves from ``member_app``'s pools and engine, so ``member_app`` starts first
    and stops last."""
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=settings.admin_max_body_bytes,
        handler_args=HANDLER_ARGS,
    )
    app[SETTINGS] = member_app[SETTINGS]
    app[VERIFIER] = member_app[VERIFIER]
    app[VAULT] = member_app[VAULT]
    app[partner.PARTNERS] = member_app[partner.PARTNERS]

    async def shared(app: web.Application) -> AsyncIterator[None]:
        if REDIS not in member_app:
            raise RuntimeError("start the member application before the admin one")
        app[REDIS] = member_app[REDIS]
        app[PG] = member_app[PG]
        app[ENGINE] = member_app[ENGINE]
        yield

    app.cleanup_ctx.append(shared)
    app.cleanup_ctx.append(dashboard.feed)  # after ``shared``: it reads from those pools
    admin.add_routes(app)
    partner.add_admin_routes(app)
    points.add_admin_routes(app)
    campaigns.add_admin_routes(app)
    member.add_ops_routes(app)
    dashboard.add_routes(app)
    return app


def create_apps(
    settings: Settings, *, pools: tuple[Redis, asyncpg.Pool] | None = None
) -> tuple[web.Application, web.Application]:
    """The member and admin applications over one set of pools (start them in this order)."""
    member_app = create_app(settings, pools=pools)
    return member_app, create_admin_app(settings, member_app)
