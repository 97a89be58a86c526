"""Points routes: the member's view (``/v1/me/points``) and ops' (``/admin/v1/points``):
crediting rules, crediting and expiry runs, adjustments, a member's ledger, period totals."""

from __future__ import annotations

from aiohttp import web

from claim_service.domain import periods
from claim_service.domain.catalogue import ConflictingFields
from claim_service.domain.points import parse_adjustment, parse_rules
from claim_service.errors import ValidationError
from claim_service.http.app import (
    PG,
    REDIS,
    SETTINGS,
    error_response,
    json_response,
    read_json,
    read_json_any,
)
from claim_service.http.auth import check_admin
from claim_service.http.member import member
from claim_service.store import points_credit, points_ledger
from claim_service.store.points_mirror import InsufficientPoints
from claim_service.store.points_views import member_points, period_totals
from claim_service.store.tiers import check_user_id

RULES_BODY_LIMIT = 64 * 1024


def _admin(request: web.Request) -> None:
    check_admin(request.headers.get("Authorization"), request.app[SETTINGS])


def _user(request: web.Request) -> str:
    return check_user_id(request.match_info["user_id"])


def _period(request: web.Request, data: dict[str, object] | None = None) -> str:
    value = (data or {}).get("period", request.query.get("period"))
    if value is None:
        return periods.current_period(request.app[SETTINGS].tz)
    if not isinstance(value, str):
        raise ValidationError("period must be written YYYY-MM", field="period")
    periods.parse_period(value)
    return value


async def my_points(request: web.Request) -> web.Response:
    user_id = member(request)
    app = request.app
    return json_response(await member_points(app[PG], app[REDIS], user_id, app[SETTINGS].tz))


async def get_member_points(request: web.Request) -> web.Response:
    _admin(request)
    app = request.app
    view = await member_points(app[PG], app[REDIS], _user(request), app[SETTINGS].tz, recent=200)
    return json_response(view)


async def put_rules(request: web.Request) -> web.Response:
    _admin(request)
    data = await read_json_any(request, RULES_BODY_LIMIT)
    try:
        rules = parse_rules(data)
    except ConflictingFields as exc:
        return error_response(422, "invalid_request", str(exc), field=exc.field)
    await points_credit.save_rules(request.app[PG], rules)
    return json_response({"rules": [r.to_json() for r in rules]})


async def get_rules(request: web.Request) -> web.Response:
    _admin(request)
    rules = await points_credit.load_rules(request.app[PG])
    return json_response({"rules": [r.to_json() for r in rules]})


async def adjust(request: web.Request) -> web.Response:
    _admin(request)
    app = request.app
    user_id = _user(request)
    data = await read_json(request, app[SETTINGS].max_body_bytes)
    try:
        adjustment = parse_adjustment(data)
    except ConflictingFields as exc:
        return error_response(422, "invalid_request", str(exc), field=exc.field)
    try:
        recorded = await points_ledger.adjust(app[PG], app[REDIS], user_id, adjustment)
    except InsufficientPoints as exc:
        return error_response(
            402,
            "insufficient_points",
            f"the member can spend {exc.balance} point(s), not {-adjustment.amount}",
            balance=exc.balance,
            price=-adjustment.amount,
        )
    entry = recorded.entry
    body = {
        "entry_id": entry["entry_id"],
        "user_id": entry["user_id"],
        "amount": entry["amount"],
        "kind": entry["kind"],
        "reason": entry["reason"],
        "reference": adjustment.reference,
        "created_at": entry["created_at"].astimezone(app[SETTINGS].tz).isoformat(),
        "replayed": recorded.replayed,
    }
    return json_response(body, 200 if recorded.replayed else 201)


async def credit(request: web.Request) -> web.Response:
    """Credit a period's points now (the CLI ``credit-points`` does the same with progress)."""
    _admin(request)
    app = request.app
    data = await read_json(request, app[SETTINGS].max_body_bytes)
    period = _period(request, data)
    report = await points_credit.credit_period(app[PG], app[REDIS], period, app[SETTINGS].tz)
    return json_response(points_credit.report_json(report))


async def expire(request: web.Request) -> web.Response:
    _admin(request)
    expired = await points_ledger.expire_due(request.app[PG], request.app[REDIS])
    return json_response({"expired": expired})


async def totals(request: web.Request) -> web.Response:
    _admin(request)
    app = request.app
    return json_response(await period_totals(app[PG], _period(request), app[SETTINGS].tz))


def add_routes(app: web.Application) -> None:
    """Member routes."""
    app.router.add_get("/v1/me/points", my_points)


def add_admin_routes(app: web.Application) -> None:
    # The fixed paths first: "rules", "credit" and "expire" are not member ids here.
    app.router.add_get("/admin/v1/points", totals)
    app.router.add_get("/admin/v1/points/rules", get_rules)
    app.router.add_put("/admin/v1/points/rules", put_rules)
    app.router.add_post("/admin/v1/points/credit", credit)
    app.router.add_post("/admin/v1/points/expire", expire)
    member_id = "/admin/v1/points/{user_id:(?!(?:rules|credit|expire)$)[^/]+}"
    app.router.add_get(member_id, get_member_points)
    app.router.add_post(member_id + "/adjust", adjust)
