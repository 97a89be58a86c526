"""Waiting-room routes (see ``claims.rooms``): take or look at a ticket, the published proof
of a period's shuffle, and the admission check the claim route makes."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from claim_service.claims.rooms import WaitingRooms
from claim_service.domain import periods
from claim_service.domain.catalogue import ID_RE, Benefit
from claim_service.errors import NotFoundError, ValidationError
from claim_service.http.app import (
    ENGINE,
    SETTINGS,
    VERIFIER,
    error_response,
    json_response,
    read_body,
    shed_load,
)
from claim_service.http.auth import bearer
from claim_service.store import rooms

ROOMS = web.AppKey("rooms", WaitingRooms)
FIRST_PERIOD, LAST_PERIOD = "1970-01", "9998-12"


async def _room_benefit(request: web.Request) -> tuple[str, Benefit]:
    user_id = request.app[VERIFIER].verify(bearer(request.headers.get("Authorization")))
    benefit_id = request.match_info["benefit_id"]
    benefit = await request.app[ENGINE].benefit(benefit_id) if ID_RE.match(benefit_id) else None
    if benefit is None:
        raise NotFoundError("unknown_benefit", "no such benefit")
    if benefit.waiting_room is None:
        raise NotFoundError("no_waiting_room", f"benefit {benefit_id!r} has no waiting room")
    return user_id, benefit


async def join_queue(request: web.Request) -> web.Response:
    """``POST /v1/benefits/{id}/queue``: the member's ticket, made on the first call."""
    refused = shed_load(request)
    if refused is not None:
        return refused
    user_id, benefit = await _room_benefit(request)
    await read_body(request, request.app[SETTINGS].max_body_bytes)  # whatever it is: unused
    room = request.app[ROOMS]
    view, times = await room.join(benefit, user_id)
    answer = room.answer(benefit, times, view, user_id)
    if view.ticket_id is None:
        return _no_ticket(view.phase, answer)
    return json_response(answer, 201 if view.new else 200)


def _no_ticket(phase: str, answer: dict[str, Any]) -> web.Response:
    """Why no ticket can be given now."""
    if phase == rooms.EARLY:
        return error_response(
            425,
            "prequeue_not_open",
            "the waiting room opens at prequeue_opens_at",
            **{k: answer[k] for k in ("benefit_id", "period", "prequeue_opens_at", "opens_at")},
        )
    if phase == rooms.SOLD_OUT:
        return error_response(
            410, "sold_out", "no stock is left: the waiting room is closed", **_brief(answer)
        )
    return error_response(410, "closed", "the release window has closed", **_brief(answer))


def _brief(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: answer[k] for k in ("benefit_id", "period", "refresh_after_s")}


async def get_ticket(request: web.Request) -> web.Response:
    """``GET /v1/benefits/{id}/queue``: the member's ticket as it stands (no new ticket)."""
    user_id, benefit = await _room_benefit(request)
    room = request.app[ROOMS]
    view, times = await room.look(benefit, user_id)
    answer = room.answer(benefit, times, view, user_id)
    if view.ticket_id is None:
        return error_response(
            404,
            "no_ticket",
            "you hold no ticket for this period: POST to this address to take one",
            room_status=answer["status"],
            **{k: answer[k] for k in ("benefit_id", "period", "queue_size")},
        )
    return json_response(answer)


async def get_order(request: web.Request) -> web.Response:
    """``GET /v1/benefits/{id}/queue/order``: the commitment, and once revealed the seed and
    the order of every ticket (ticket ids only)."""
    _user, benefit = await _room_benefit(request)
    room = request.app[ROOMS]
    period = request.query.get("period") or room.times(benefit).period
    periods.parse_period(period)
    if not FIRST_PERIOD <= period <= LAST_PERIOD:
        raise ValidationError(f"period must be in {FIRST_PERIOD}..{LAST_PERIOD}", field="period")
    proof = await room.proof(benefit, period)
    proof["algorithm"] = (
        "key(ticket) = first 6 bytes (big-endian) of HMAC-SHA256(key = seed, message = "
        "ticket_id); the pre-queue is ordered by (key, ticket_id); late arrivals follow in "
        "the order they came. commitment = SHA-256(seed)."
    )
    return json_response(proof)


async def admission_refusal(
    request: web.Request, benefit: Benefit, user_id: str, data: dict[str, Any]
) -> web.Response | None:
    """None when the claim may go on: the benefit's window is not open (``claim.lua`` then
    refuses it), or the member shows a valid admission token for this benefit and period.
    Otherwise 410 when the room is closed for want of stock, else 403."""
    token = data.get("admission_token")
    if token is not None and not isinstance(token, str):
        raise ValidationError("admission_token must be a string", field="admission_token")
    room = request.app[ROOMS]
    period = room.claim_period(benefit)
    if period is None or room.admissions.check(token, user_id, benefit.benefit_id, period):
        return None
    view, _times = await room.look(benefit, times=room.claim_times(benefit))
    if view.phase == rooms.SOLD_OUT:
        return error_response(
            410, "sold_out", "no stock is left", benefit_id=benefit.benefit_id, period=period
        )
    return error_response(
        403,
        "admission_required",
        "this release has a waiting room: take a ticket and claim once admitted",
        benefit_id=benefit.benefit_id,
        period=period,
        queue=f"/v1/benefits/{benefit.benefit_id}/queue",
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/benefits/{benefit_id}/queue", join_queue)
    app.router.add_get("/v1/benefits/{benefit_id}/queue", get_ticket)
    app.router.add_get("/v1/benefits/{benefit_id}/queue/order", get_order)
