"""Member-facing routes (claim, look up claims, the catalogue, health, the OpenAPI doc) and
the ops listener's health and ``/metrics``."""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from redis.exceptions import RedisError

from claim_service import metrics
from claim_service.claims.decisions import ClaimDecision, ClaimRequest
from claim_service.claims.engine import MAX_ACCOUNT, MAX_REQUEST_ID
from claim_service.claims.records import find_claim, format_time, member_claims
from claim_service.claims.views import member_listing
from claim_service.domain import periods
from claim_service.domain.bank_events import REWARD_EVENT
from claim_service.domain.catalogue import ID_RE, MAX_CHOOSE
from claim_service.errors import BackendUnavailable, NotFoundError, ValidationError
from claim_service.fulfilment.vouchers import reveal
from claim_service.http.app import (
    ENGINE,
    LIMITS,
    PG,
    REDIS,
    SETTINGS,
    VAULT,
    VERIFIER,
    error_response,
    json_response,
    rate_limited,
    read_json,
    shed_load,
)
from claim_service.http.auth import bearer
from claim_service.http.draws import claim_parts, claim_proof, parse_pick
from claim_service.http.queue import admission_refusal

READY_TIMEOUT_S = 2.0
METRICS = web.AppKey("metrics", CollectorRegistry)
# Request ids and partner accounts travel in headers, logs and partner APIs: keep them plain.
PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+\Z")

# claim.lua code -> (HTTP status, error code)
REJECTIONS = {
    "paused": (423, "paused"),
    "not_open": (425, "not_open"),
    "closed": (410, "closed"),
    "unknown_option": (404, "unknown_option"),
    "tier": (403, "tier_too_low"),
    "not_eligible": (403, "not_eligible"),
    "quota": (409, "quota_exceeded"),
    "sold_out": (410, "sold_out"),
    "option_sold_out": (410, "sold_out"),
    "points": (402, "insufficient_points"),
}


def member(request: web.Request) -> str:
    return request.app[VERIFIER].verify(bearer(request.headers.get("Authorization")))


def _benefit_id(request: web.Request) -> str:
    benefit_id = request.match_info["benefit_id"]
    if not ID_RE.match(benefit_id):
        raise NotFoundError("unknown_benefit", "no such benefit")
    return benefit_id


def parse_claim_body(data: dict[str, Any]) -> tuple[str, str | None, str]:
    """request_id, option_id (None: not given) and account of a claim's body."""
    request_id = data.get("request_id")
    if (
        not isinstance(request_id, str)
        or not PRINTABLE_ASCII.match(request_id)
        or not (0 < len(request_id) <= MAX_REQUEST_ID)
    ):
        raise ValidationError(
            f"request_id must be a string of 1..{MAX_REQUEST_ID} printable ASCII characters",
            field="request_id",
        )
    option_id = data.get("option_id")
    if option_id is not None:
        if not isinstance(option_id, str):
            raise ValidationError("option_id must be a string", field="option_id")
        if not ID_RE.match(option_id):
            raise NotFoundError("unknown_option", f"benefit has no option {option_id!r}")
    account = data.get("account", "")
    if account is None:
        account = ""
    if (
        not isinstance(account, str)
        or len(account) > MAX_ACCOUNT
        or (account and not PRINTABLE_ASCII.match(account))
    ):
        raise ValidationError(
            f"account must be a string of at most {MAX_ACCOUNT} printable ASCII characters",
            field="account",
        )
    return request_id, option_id, account


def parse_option_ids(data: dict[str, Any]) -> tuple[str, ...]:
    """A bundle's chosen options (``option_ids``; empty when not given)."""
    chosen = data.get("option_ids")
    if chosen is None:
        return ()
    if (
        not isinstance(chosen, list)
        or not 0 < len(chosen) <= MAX_CHOOSE
        or not all(isinstance(o, str) for o in chosen)
    ):
        raise ValidationError(
            f"option_ids must be a list of 1..{MAX_CHOOSE} option ids", field="option_ids"
        )
    return tuple(chosen)


async def post_claim(request: web.Request) -> web.Response:
    refused = shed_load(request)
    if refused is not None:
        return refused
    limits = request.app[LIMITS]
    user_id = member(request)
    if limits.members.enabled:
        wait = limits.members.take(user_id)
        if wait:
            return rate_limited(wait)
    limits.in_flight += 1
    try:
        return await _claim(request, user_id)
    finally:
        limits.in_flight -= 1


async def _claim(request: web.Request, user_id: str) -> web.Response:
    benefit_id = _benefit_id(request)
    data = await read_json(request, request.app[SETTINGS].max_body_bytes)
    request_id, option_id, account = parse_claim_body(data)
    option_ids, pick = parse_option_ids(data), parse_pick(data)
    engine = request.app[ENGINE]
    benefit = await engine.benefit(benefit_id)
    if benefit is None:
        raise NotFoundError("unknown_benefit", f"no benefit {benefit_id!r}")
    if option_id is None and not option_ids and benefit.draw is None:
        # omitted or null: the benefit's only option
        choices = [option.option_id for option in benefit.options]
        if len(choices) != 1:
            # The body is well formed; the benefit's options decide that one must be named.
            return error_response(
                409,
                "option_required",
                f"this benefit has several options: name one ({', '.join(choices)})",
                field="option_id",
                benefit_id=benefit_id,
                options=choices,
            )
        option_id = choices[0]
    # Well-formed bodies the benefit's own shape refuses: 409, as for option_required.
    choices = [option.option_id for option in benefit.options]
    if benefit.draw is not None and (option_id is not None or option_ids):
        return error_response(
            409,
            "draw_takes_no_option",
            "this benefit is a draw: its prize decides the option; send no option_id",
            field="option_ids" if option_ids else "option_id",
            benefit_id=benefit_id,
            options=[],
        )
    if len(option_ids) > benefit.choose:
        return error_response(
            409,
            "too_many_options",
            f"this benefit takes at most {benefit.choose} option(s) per claim",
            field="option_ids",
            benefit_id=benefit_id,
            options=choices,
            choose=benefit.choose,
        )
    if benefit.waiting_room is not None:
        refused = await admission_refusal(request, benefit, user_id, data)
        if refused is not None:
            return refused
    decision = await engine.claim(
        ClaimRequest(benefit_id, user_id, request_id, option_id, account, option_ids)
    )
    response = decision_response(decision, request.app[SETTINGS].tz)
    if decision.accepted and (decision.draw is not None or len(decision.options) > 1):
        extra = claim_parts(await engine.benefit(benefit_id), decision, pick)
        body = orjson.loads(response.body)  # type: ignore[arg-type]
        return json_response({**body, **extra}, response.status)
    return response


# Answers that are the same for every member (not open, sold out), encoded once: the bodies
# the gate gives thousands of times a second while a benefit is sold out.
_CONSTANT: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
CONSTANT_ANSWERS = 256
CONSTANT_CODES = frozenset({"not_open", "sold_out", "option_sold_out"})


def decision_response(decision: ClaimDecision, tz: ZoneInfo) -> web.Response:
    if decision.code not in CONSTANT_CODES:
        return _decision_response(decision, tz)
    key = (
        decision.code,
        decision.benefit_id,
        decision.option_id,
        decision.period,
        decision.stock_left,
        decision.opens_at,
    )
    body = _CONSTANT.get(key)
    if body is None:
        encoded = _decision_response(decision, tz).body
        assert isinstance(encoded, bytes)
        body = _CONSTANT[key] = encoded
        if len(_CONSTANT) > CONSTANT_ANSWERS:
            _CONSTANT.popitem(last=False)
    status = REJECTIONS[decision.code][0]
    return web.Response(body=body, status=status, content_type="application/json")


def _decision_response(decision: ClaimDecision, tz: ZoneInfo) -> web.Response:
    if decision.accepted:
        body = {
            "claim_id": decision.claim_id,
            "status": "accepted",
            "benefit_id": decision.benefit_id,
            "option_id": decision.option_id,
            "period": decision.period,
            "stock_left": decision.stock_left,
            "created_at": format_time(decision.created_at, tz) if decision.created_at else None,
            "replayed": decision.code == "dup",
        }
        return json_response(body, 200 if decision.code == "dup" else 202)
    status, code = REJECTIONS[decision.code]
    extra: dict[str, Any] = {"benefit_id": decision.benefit_id, "period": decision.period}
    if decision.code == "not_open":
        message = "this benefit is not open yet"
    elif decision.code == "closed":
        message = "this release has closed"
    elif decision.code == "paused":
        message = "claims for this benefit are paused"
    elif decision.code == "tier":
        message = "your tier does not qualify for this benefit"
        extra["tier"] = decision.tier
    elif decision.code == "not_eligible" and decision.needs is not None:
        event, days = decision.needs
        message = f"this benefit needs a {event} event in the last {days} day(s)"
        if event == REWARD_EVENT:
            message = (
                f"this benefit is a campaign's reward, claimable {days} day(s) from its release"
            )
        extra["eligibility"] = {"event": event, "within_days": days}
    elif decision.code == "quota":
        message = "you have used your quota for this period"
        extra["quota"] = {"used": decision.used, "allowed": decision.quota}
    elif decision.code == "option_sold_out":
        message = f"option {decision.option_id!r} is sold out"
        extra["option_id"] = decision.option_id
    elif decision.code == "points":
        message = f"this costs {decision.price} point(s); you can spend {decision.balance}"
        extra["balance"] = decision.balance
        extra["price"] = decision.price
        extra["option_id"] = decision.option_id
    elif decision.code == "unknown_option":
        message = f"benefit has no option {decision.option_id!r}"
    else:
        message = "sold out for this period"
    if decision.code in ("not_open", "closed"):
        extra["opens_at"] = decision.opens_at.isoformat() if decision.opens_at else None
    if decision.code in ("sold_out", "option_sold_out"):
        extra["stock_left"] = decision.stock_left
    return error_response(status, code, message, **extra)


async def get_claim(request: web.Request) -> web.Response:
    user_id = member(request)
    app = request.app
    try:
        claim = await find_claim(
            app[PG], app[REDIS], request.match_info["claim_id"], app[SETTINGS].tz
        )
    except RedisError as exc:
        raise BackendUnavailable("Redis is unavailable") from exc
    if claim is None or claim.pop("user_id") != user_id:
        raise NotFoundError("unknown_claim", "no such claim")
    if claim["status"] == "fulfilled":
        voucher = await reveal(app[PG], app[VAULT], claim["claim_id"])
        if voucher is not None:
            claim["voucher"] = voucher
    return json_response({**claim, **await claim_proof(app, claim)})


async def list_my_claims(request: web.Request) -> web.Response:
    user_id = member(request)
    tz = request.app[SETTINGS].tz
    period = request.query.get("period")
    if period is None:
        period = periods.current_period(tz)
    periods.parse_period(period)
    claims = await member_claims(request.app[PG], user_id, period, tz)
    return json_response({"period": period, "claims": claims})


async def list_benefits(request: web.Request) -> web.Response:
    user_id = member(request)
    return json_response(await member_listing(request.app[ENGINE], request.app[PG], user_id))


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks: dict[str, str] = {}

    async def redis_ok() -> None:
        await request.app[REDIS].ping()

    async def pg_ok() -> None:
        await request.app[PG].fetchval("SELECT 1")

    for name, probe in (("redis", redis_ok), ("postgres", pg_ok)):
        try:
            await asyncio.wait_for(probe(), READY_TIMEOUT_S)
            checks[name] = "ok"
        except Exception as exc:  # any failure means not ready
            checks[name] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return json_response(
        {"status": "ready" if ready else "unavailable", "checks": checks}, 200 if ready else 503
    )


def openapi_document() -> bytes:
    return (resources.files("claim_service.http") / "openapi.json").read_bytes()


async def prometheus_metrics(request: web.Request) -> web.Response:
    """Every worker's metrics, merged; a scrape touches neither Redis nor PostgreSQL."""
    response = web.Response(body=generate_latest(request.app[METRICS]))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(), content_type="application/json")


def add_routes(app: web.Application) -> None:
    """The member listener's routes."""
    app.router.add_post("/v1/benefits/{benefit_id}/claims", post_claim)
    app.router.add_get("/v1/claims/{claim_id}", get_claim)
    app.router.add_get("/v1/me/claims", list_my_claims)
    app.router.add_get("/v1/benefits", list_benefits)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi)


def add_ops_routes(app: web.Application) -> None:
    """Health and metrics on the admin listener."""
    app[METRICS] = metrics.registry()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus_metrics)
