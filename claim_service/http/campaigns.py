"""Referral and team-up campaigns (see ``domain.campaigns``).

Ops: ``PUT /admin/v1/campaigns/{id}`` (201 created, 200 replaced; 409 ``type_fixed``; 422
for fields that contradict or a reward benefit that is unknown or not a reward),
``GET /admin/v1/campaigns[/{id}]``, ``GET /admin/v1/campaigns/{id}/funnel``.

Members: ``POST /v1/campaigns/{id}/referral-code`` (201 new, 200 the same code again; a
team-up: the member's team), ``POST /v1/campaigns/{id}/attribution`` (a late registration:
201 attributed, 200 already, 409 with the refusal's reason), ``GET
/v1/campaigns/{id}/progress``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from claim_service.domain.campaigns import (
    REWARD_EVENT,
    Campaign,
    normalise_code,
    parse_campaign,
    parse_fingerprints,
)
from claim_service.domain.fields import ID_RE, ConflictingFields, check_id
from claim_service.errors import NotFoundError
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
from claim_service.store import campaign_rewards, campaign_views, campaigns, catalogue_store
from claim_service.store.campaigns import Code
from claim_service.store.referrals import register_late

BODY_LIMIT = 64 * 1024


def _admin(request: web.Request) -> None:
    check_admin(request.headers.get("Authorization"), request.app[SETTINGS])


def _campaign_id(request: web.Request) -> str:
    campaign_id = request.match_info["campaign_id"]
    if not ID_RE.match(campaign_id):
        raise NotFoundError("unknown_campaign", "no such campaign")
    return campaign_id


async def _load(request: web.Request) -> Campaign:
    async with request.app[PG].acquire() as conn:
        return await campaigns.load(conn, _campaign_id(request))


async def put_campaign(request: web.Request) -> web.Response:
    _admin(request)
    app = request.app
    campaign_id = check_id(request.match_info["campaign_id"], "campaign_id")
    data = await read_json(request, BODY_LIMIT)
    try:
        campaign = parse_campaign(campaign_id, data)
    except ConflictingFields as exc:
        return error_response(422, "invalid_request", str(exc), field=exc.field)
    benefits = {
        b.benefit_id: b for b in await catalogue_store.load_benefits(app[PG], app[SETTINGS].tz)
    }
    for benefit_id in sorted(campaign.reward_benefits()):
        benefit = benefits.get(benefit_id)
        if benefit is None or benefit.eligibility is None or not benefit.eligibility.held:
            return error_response(
                422,
                "invalid_reward",
                f"reward benefit {benefit_id!r} must exist with eligibility "
                f'{{"event": "{REWARD_EVENT}", ...}}: only members a campaign rewarded may '
                "claim it",
                field="reward",
                benefit_id=benefit_id,
            )
    saved, created = await campaigns.save(app[PG], campaign)
    return json_response(saved.to_json(), 201 if created else 200)


async def get_campaign(request: web.Request) -> web.Response:
    _admin(request)
    return json_response((await _load(request)).to_json())


async def list_campaigns(request: web.Request) -> web.Response:
    _admin(request)
    found = await campaigns.load_all(request.app[PG])
    return json_response({"campaigns": [c.to_json() for c in found]})


async def get_funnel(request: web.Request) -> web.Response:
    _admin(request)
    campaign = await _load(request)
    return json_response(await campaign_views.funnel(request.app[PG], campaign))


def _code_json(request: web.Request, campaign: Campaign, code: Code) -> dict[str, Any]:
    link = request.app[SETTINGS].referral_link.format(campaign=campaign.campaign_id, code=code.code)
    out = {"campaign_id": campaign.campaign_id, "type": campaign.type, **code.to_json()}
    out["link"] = link
    if campaign.type == "referral":
        out.pop("expires_at")
    return out


async def post_referral_code(request: web.Request) -> web.Response:
    user_id = member(request)
    app = request.app
    campaign = await _load(request)
    body = await read_json_any(request, BODY_LIMIT) if request.can_read_body else None
    found = parse_fingerprints(body)
    code, created = await campaigns.issue_code(app[PG], campaign, user_id, found)
    return json_response(_code_json(request, campaign, code), 201 if created else 200)


async def post_attribution(request: web.Request) -> web.Response:
    user_id = member(request)
    app = request.app
    campaign_id = _campaign_id(request)
    data = await read_json(request, BODY_LIMIT)
    code = normalise_code(data.get("referral_code"))
    outcome = await register_late(app[PG], app[REDIS], campaign_id, code, user_id)
    body = {"campaign_id": campaign_id, "referral_code": code, "state": "attributed"}
    return json_response(body, 200 if outcome.replayed else 201)


async def get_progress(request: web.Request) -> web.Response:
    user_id = member(request)
    app = request.app
    campaign = await _load(request)
    await campaign_rewards.release_due(app[PG], app[REDIS], user_id=user_id)
    return json_response(await campaign_views.progress(app[PG], campaign, user_id))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/campaigns/{campaign_id}/referral-code", post_referral_code)
    app.router.add_post("/v1/campaigns/{campaign_id}/attribution", post_attribution)
    app.router.add_get("/v1/campaigns/{campaign_id}/progress", get_progress)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/admin/v1/campaigns", list_campaigns)
    app.router.add_put("/admin/v1/campaigns/{campaign_id}", put_campaign)
    app.router.add_get("/admin/v1/campaigns/{campaign_id}", get_campaign)
    app.router.add_get("/admin/v1/campaigns/{campaign_id}/funnel", get_funnel)
