"""Ops routes under ``/admin/v1``: benefits, zones, pause/resume, stock top-ups, tier
snapshots."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from claim_service.claims.writer import backlog
from claim_service.domain import periods
from claim_service.domain.catalogue import (
    MAX_STOCK,
    ConflictingFields,
    as_integer,
    check_id,
    parse_benefit,
)
from claim_service.domain.zones import parse_zone
from claim_service.errors import ValidationError
from claim_service.http.app import (
    ENGINE,
    PG,
    REDIS,
    SETTINGS,
    error_response,
    json_response,
    read_json,
    read_json_any,
)
from claim_service.http.auth import check_admin
from claim_service.store import catalogue_store, zones_store
from claim_service.store.anomalies import list_anomalies
from claim_service.store.buckets import stock_counters
from claim_service.store.keyspace import BenefitKeys, bucket_keys
from claim_service.store.tiers import check_tier, check_user_id, save_tiers

MAX_TIERS_PER_CALL = 100_000
MAX_ANOMALIES = 1000
ANOMALY_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
# Decimal digits only: str.isdigit() also takes "²", which int() refuses.
LIMIT_RE = re.compile(r"0*([0-9]{1,4})\Z")


def _admin(request: web.Request) -> None:
    check_admin(request.headers.get("Authorization"), request.app[SETTINGS])


async def put_benefit(request: web.Request) -> web.Response:
    _admin(request)
    app = request.app
    benefit_id = check_id(request.match_info["benefit_id"], "benefit_id")
    data = await read_json(request, app[SETTINGS].max_body_bytes * 16)
    try:
        benefit = parse_benefit(benefit_id, data, app[SETTINGS].tz)
    except ConflictingFields as exc:
        return error_response(422, "invalid_request", str(exc), field=exc.field)
    if benefit.zone is not None and not await zones_store.zone_exists(app[PG], benefit.zone):
        return error_response(
            422,
            "unknown_zone",
            f"no zone {benefit.zone!r}: create it with PUT /admin/v1/zones/{benefit.zone} first",
            field="zone",
            zone=benefit.zone,
        )
    existed = await app[PG].fetchval("SELECT 1 FROM benefits WHERE benefit_id = $1", benefit_id)
    saved = await catalogue_store.save_benefit(app[PG], benefit)
    await catalogue_store.push_benefit(app[REDIS], saved)
    engine = app[ENGINE]
    await engine.benefit(benefit_id, refresh=True)
    if saved.draw is not None and engine.seeds is not None:
        # Commit to the seeds now, before the opening: their hashes are published from here.
        current = engine.current_period(saved)
        for period in (current, periods.next_period(current)):
            await engine.seeds.commitment(benefit_id, period)
    return json_response(saved.to_json(), 200 if existed else 201)


async def get_benefit(request: web.Request) -> web.Response:
    _admin(request)
    app = request.app
    benefit_id = check_id(request.match_info["benefit_id"], "benefit_id")
    benefit = await catalogue_store.load_benefit(app[PG], app[SETTINGS].tz, benefit_id)
    period = request.query.get("period")
    if period is None:  # the period a claim decided now counts against
        period = app[ENGINE].current_period(benefit)
    periods.parse_period(period)
    return json_response({**benefit.to_json(), "stock": await _stock(request, benefit_id, period)})


async def _stock(request: web.Request, benefit_id: str, period: str) -> dict[str, Any]:
    redis = request.app[REDIS]
    keys = BenefitKeys(benefit_id)
    benefit = await request.app[ENGINE].benefit(benefit_id, refresh=True)
    shards = benefit.shards if benefit else 1
    counters = await stock_counters(redis, benefit_id, shards, period)
    owners = (keys, *bucket_keys(benefit_id, shards)) if shards > 1 else (keys,)
    base = benefit.stock_per_period if benefit else 0
    added = counters.get("added", 0)
    taken = counters.get("taken", 0)
    return {
        "period": period,
        "per_period": base,
        "added": added,
        "taken": taken,
        "left": max(base + added - taken, 0),
        "taken_by_option": {
            k.removeprefix("taken:"): v for k, v in counters.items() if k.startswith("taken:")
        },
        "unpersisted": sum([int(await redis.hlen(k.pending)) for k in owners]),
    }


async def list_benefits(request: web.Request) -> web.Response:
    _admin(request)
    benefits = await catalogue_store.load_benefits(request.app[PG], request.app[SETTINGS].tz)
    return json_response({"benefits": [b.to_json() for b in benefits]})


async def put_zone(request: web.Request) -> web.Response:
    """``PUT /admin/v1/zones/{zone_id}``: saved in PostgreSQL, then mirrored to Redis."""
    _admin(request)
    app = request.app
    zone_id = check_id(request.match_info["zone_id"], "zone_id")
    zone = parse_zone(zone_id, await read_json(request, app[SETTINGS].max_body_bytes))
    created = await zones_store.save_zone(app[PG], zone)
    await zones_store.mirror_zones(app[REDIS], app[PG])
    return json_response(zone.to_json(), 201 if created else 200)


async def list_zones(request: web.Request) -> web.Response:
    _admin(request)
    zones = await zones_store.list_zones(request.app[PG])
    return json_response({"zones": [z.to_json() for z in zones]})


async def _set_paused(request: web.Request, paused: bool) -> web.Response:
    _admin(request)
    app = request.app
    benefit_id = check_id(request.match_info["benefit_id"], "benefit_id")
    benefit = await catalogue_store.set_paused(
        app[PG], app[REDIS], app[SETTINGS].tz, benefit_id, paused
    )
    await app[ENGINE].benefit(benefit_id, refresh=True)
    return json_response(benefit.to_json())


async def pause(request: web.Request) -> web.Response:
    return await _set_paused(request, True)


async def resume(request: web.Request) -> web.Response:
    return await _set_paused(request, False)


async def add_stock(request: web.Request) -> web.Response:
    _admin(request)
    app = request.app
    benefit_id = check_id(request.match_info["benefit_id"], "benefit_id")
    data = await read_json(request, app[SETTINGS].max_body_bytes)
    amount = as_integer(data.get("amount"))
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_STOCK:
        raise ValidationError(f"amount must be an integer in 1..{MAX_STOCK}", field="amount")
    period = data.get("period")
    if period is None:
        benefit = await catalogue_store.load_benefit(app[PG], app[SETTINGS].tz, benefit_id)
        period = app[ENGINE].current_period(benefit)
    if not isinstance(period, str):
        raise ValidationError("period must be written YYYY-MM", field="period")
    periods.parse_period(period)
    note = data.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > 500 or "\x00" in note):
        raise ValidationError("note must be a string of at most 500 characters", field="note")
    await catalogue_store.add_stock(app[PG], app[REDIS], benefit_id, period, amount, note)
    return json_response(await _stock(request, benefit_id, period))


async def put_tiers(request: web.Request) -> web.Response:
    _admin(request)
    app = request.app
    period = request.match_info["period"]
    periods.parse_period(period)
    data = await read_json_any(request, app[SETTINGS].admin_max_body_bytes)
    if isinstance(data, dict):
        data = data.get("tiers")
    if not isinstance(data, list) or len(data) > MAX_TIERS_PER_CALL:
        raise ValidationError(
            f'body must be a list of at most {MAX_TIERS_PER_CALL} {{"user_id", "tier"}}'
        )
    rows: dict[str, int] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValidationError(f"item {i} must be an object", field=f"[{i}]")
        try:
            rows[check_user_id(item.get("user_id"))] = check_tier(as_integer(item.get("tier")))
        except ValidationError as exc:
            raise ValidationError(f"item {i}: {exc}", field=f"[{i}]") from exc
    loaded = await save_tiers(app[PG], app[REDIS], period, list(rows.items()))
    return json_response({"period": period, "loaded": loaded})


async def writer_backlog(request: web.Request) -> web.Response:
    _admin(request)
    return json_response({"unpersisted": await backlog(request.app[REDIS])})


async def get_anomalies(request: web.Request) -> web.Response:
    """``GET /admin/v1/anomalies[?kind=&limit=]``: counts by kind and the newest entries."""
    _admin(request)
    kind = request.query.get("kind") or None
    if kind is not None and not ANOMALY_KIND_RE.match(kind):
        raise ValidationError("kind must be a snake_case name, e.g. request_conflict", field="kind")
    limit = LIMIT_RE.match(request.query.get("limit", "100"))
    if limit is None or not 0 < int(limit.group(1)) <= MAX_ANOMALIES:
        raise ValidationError(f"limit must be an integer in 1..{MAX_ANOMALIES}", field="limit")
    return json_response(await list_anomalies(request.app[PG], kind, int(limit.group(1))))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/v1/benefits", list_benefits)
    app.router.add_put("/admin/v1/benefits/{benefit_id}", put_benefit)
    app.router.add_get("/admin/v1/benefits/{benefit_id}", get_benefit)
    app.router.add_post("/admin/v1/benefits/{benefit_id}/pause", pause)
    app.router.add_post("/admin/v1/benefits/{benefit_id}/resume", resume)
    app.router.add_post("/admin/v1/benefits/{benefit_id}/stock", add_stock)
    app.router.add_get("/admin/v1/zones", list_zones)
    app.router.add_put("/admin/v1/zones/{zone_id}", put_zone)
    app.router.add_put("/admin/v1/tiers/{period}", put_tiers)
    app.router.add_get("/admin/v1/writer", writer_backlog)
    app.router.add_get("/admin/v1/anomalies", get_anomalies)
