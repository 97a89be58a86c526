"""Fulfilment routes: partner callbacks (member listener); partner configuration, card-key
pools and claim ops (admin listener)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from aiohttp import web

from claim_service import metrics
from claim_service.claims.records import CLAIM_ID_RE, COLUMNS, claim_json, format_time
from claim_service.domain.catalogue import ID_RE, check_id
from claim_service.errors import NotFoundError, ValidationError
from claim_service.fulfilment import compensation, partners, vouchers
from claim_service.fulfilment.outcomes import apply_callback
from claim_service.fulfilment.signing import SignatureError, check_signature, signature_headers
from claim_service.http.app import (
    PG,
    REDIS,
    SETTINGS,
    VAULT,
    check_length,
    json_response,
    parse_json_object,
    read_body,
    read_json,
    read_json_any,
)
from claim_service.http.auth import AuthError, check_admin
from claim_service.store.claim_states import events
from claim_service.store.vault import Vault

CALLBACK_STATUSES = ("success", "failed", "processing")
MAX_CODES_PER_CALL = 100_000
PARTNERS_TTL_S = 5.0


class PartnerCache:
    """Every partner's configuration, decrypted, read from PostgreSQL at most once per
    ``ttl_s`` (one load at a time): a burst of callbacks, forged or not, costs the database
    one query per interval, not one per request. Bounded by the ``partners`` table, which ops
    fill."""

    def __init__(self, ttl_s: float = PARTNERS_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._partners: dict[str, partners.Partner] = {}
        self._loaded_at = -float("inf")
        self._lock = asyncio.Lock()

    async def get(self, pool: asyncpg.Pool, vault: Vault, partner_id: str) -> partners.Partner:
        """The partner, or ``NotFoundError``; ``VaultError`` when secrets cannot be read."""
        if time.monotonic() - self._loaded_at > self.ttl_s:
            async with self._lock:
                if time.monotonic() - self._loaded_at > self.ttl_s:
                    self._partners = await partners.load_partners(pool, vault)
                    self._loaded_at = time.monotonic()
        partner = self._partners.get(partner_id)
        if partner is None:
            raise NotFoundError("unknown_partner", f"no partner {partner_id!r}")
        return partner

    def forget(self) -> None:
        """Reload on the next look-up (this process changed a partner)."""
        self._loaded_at = -float("inf")


PARTNERS = web.AppKey("partners", PartnerCache)


def _admin(request: web.Request) -> None:
    check_admin(request.headers.get("Authorization"), request.app[SETTINGS])


async def partner_callback(request: web.Request) -> web.Response:
    """``POST /v1/partners/{partner_id}/callbacks``, signed like our orders.

    The checks that need neither the body nor the database (partner id, signature headers
    present and well formed, timestamp fresh, declared length) come first; partners come
    from a cache, and the body is read last, only to check its signature.
    """
    app = request.app
    partner_id = request.match_info["partner_id"]
    if not ID_RE.match(partner_id):
        raise AuthError("unknown partner or bad signature")
    try:
        timestamp, signature = signature_headers(request.headers)
    except SignatureError as exc:
        raise AuthError(str(exc)) from exc
    limit = app[SETTINGS].max_body_bytes
    check_length(request, limit)
    try:
        partner = await app[PARTNERS].get(app[PG], app[VAULT], partner_id)
    except NotFoundError as exc:
        # Without a known partner there is no secret to check the signature against.
        raise AuthError("unknown partner or bad signature") from exc
    body = await read_body(request, limit)
    try:
        check_signature(partner.secret, timestamp, body, signature)
    except SignatureError as exc:
        raise AuthError(str(exc)) from exc
    data = _callback_body(body)
    status = await apply_callback(
        app[PG],
        app[REDIS],
        partner_id,
        data["order_id"],
        data["status"],
        data.get("partner_ref"),
        data.get("reason"),
    )
    return json_response({"order_id": data["order_id"], "status": status})


def _callback_body(body: bytes) -> dict[str, Any]:
    data = parse_json_object(body)
    order_id = data.get("order_id")
    if not isinstance(order_id, str) or not CLAIM_ID_RE.match(order_id):
        raise NotFoundError("unknown_order", "no such order")
    if data.get("status") not in CALLBACK_STATUSES:
        raise ValidationError(
            f"status must be one of {', '.join(CALLBACK_STATUSES)}", field="status"
        )
    for name in ("partner_ref", "reason"):
        value = data.get(name)
        # Stored as text, which PostgreSQL refuses to hold a NUL in.
        if value is not None and (
            not isinstance(value, str) or len(value) > 200 or "\x00" in value
        ):
            raise ValidationError(
                f"{name} must be a string of at most 200 characters, no NUL", field=name
            )
    return data


async def put_partner(request: web.Request) -> web.Response:
    _admin(request)
    app = request.app
    partner_id = check_id(request.match_info["partner_id"], "partner_id")
    partner = partners.parse_partner(partner_id, await read_json(request, 64 * 1024))
    created = await partners.save_partner(app[PG], app[VAULT], partner)
    app[PARTNERS].forget()
    return json_response(partner.public(), 201 if created else 200)


async def get_partner(request: web.Request) -> web.Response:
    _admin(request)
    partner_id = check_id(request.match_info["partner_id"], "partner_id")
    partner = await partners.load_partner(request.app[PG], request.app[VAULT], partner_id)
    return json_response(partner.public())


async def post_codes(request: web.Request) -> web.Response:
    """Load codes: a JSON list of ``{"code", "secret"?, "expires_at"?}`` (or plain strings)."""
    _admin(request)
    app = request.app
    benefit_id = check_id(request.match_info["benefit_id"], "benefit_id")
    option_id = check_id(request.match_info["option_id"], "option_id")
    data = await read_json_any(request, app[SETTINGS].admin_max_body_bytes)
    if isinstance(data, dict):
        data = data.get("codes")
    if not isinstance(data, list) or not 0 < len(data) <= MAX_CODES_PER_CALL:
        raise ValidationError(f"body must be a list of 1..{MAX_CODES_PER_CALL} codes")
    rows = []
    for i, item in enumerate(data):
        try:
            if isinstance(item, str):
                rows.append(vouchers.check_code_row(item, None, None, app[SETTINGS].tz))
            elif isinstance(item, dict):
                rows.append(
                    vouchers.check_code_row(
                        item.get("code"),
                        item.get("secret"),
                        item.get("expires_at"),
                        app[SETTINGS].tz,
                    )
                )
            else:
                raise ValidationError("must be a string or an object")
        except ValidationError as exc:
            raise ValidationError(f"item {i}: {exc}", field=f"[{i}]") from exc
    report = await vouchers.load_codes(app[PG], app[REDIS], app[VAULT], benefit_id, option_id, rows)
    levels = await vouchers.pool_levels(app[PG], benefit_id)
    _publish(levels, app[SETTINGS].codes_low_watermark)
    level = next((lv for lv in levels if lv["option_id"] == option_id), None)
    return json_response(
        {
            "loaded": report.loaded,
            "duplicates": report.duplicates,
            "expired": report.expired,
            "pool": level,
        }
    )


async def get_codes(request: web.Request) -> web.Response:
    _admin(request)
    benefit_id = check_id(request.match_info["benefit_id"], "benefit_id")
    levels = await vouchers.pool_levels(request.app[PG], benefit_id)
    watermark = request.app[SETTINGS].codes_low_watermark
    _publish(levels, watermark)
    return json_response(
        {
            "low_watermark": watermark,
            "pools": [{**lv, "low": lv["free"] < watermark} for lv in levels],
        }
    )


def _publish(levels: list[dict[str, Any]], watermark: int) -> None:
    """Pool gauges from levels counted for ops anyway (``/metrics`` never counts them)."""
    for level in levels:
        labels = (level["benefit_id"], level["option_id"])
        metrics.CODES_FREE.labels(*labels).set(level["free"])
        metrics.CODES_LOW.labels(*labels).set(1 if level["free"] < watermark else 0)


def _claim_id(request: web.Request) -> str:
    claim_id = request.match_info["claim_id"]
    if not CLAIM_ID_RE.match(claim_id):
        raise NotFoundError("unknown_claim", "no such claim")
    return claim_id


async def admin_get_claim(request: web.Request) -> web.Response:
    _admin(request)
    claim_id = _claim_id(request)
    pool = request.app[PG]
    tz = request.app[SETTINGS].tz
    row = await pool.fetchrow(
        f"""SELECT {COLUMNS}, user_id, attempts, next_attempt_at, partner_ref, failure_reason,
                   code_id, lease_owner, outcome_unknown_since
            FROM claims WHERE claim_id = $1""",
        claim_id,
    )
    if row is None:
        raise NotFoundError("unknown_claim", "no such claim (or not persisted yet)")
    async with pool.acquire() as conn:
        trail = await events(conn, claim_id)
    return json_response(
        {
            **claim_json(row, tz),
            "user_id": row["user_id"],
            "attempts": row["attempts"],
            "next_attempt_at": format_time(row["next_attempt_at"], tz),
            "partner_ref": row["partner_ref"],
            "failure_reason": row["failure_reason"],
            # Set while the partner has not said whether it charged the order.
            "outcome_unknown_since": format_time(row["outcome_unknown_since"], tz)
            if row["outcome_unknown_since"]
            else None,
            "has_voucher": row["code_id"] is not None,
            "leased_by": row["lease_owner"],
            "events": trail,
        }
    )


async def retry_claim(request: web.Request) -> web.Response:
    _admin(request)
    claim_id = _claim_id(request)
    status = await compensation.ops_retry(request.app[PG], request.app[REDIS], claim_id)
    return json_response({"claim_id": claim_id, "status": status})


async def refund_claim(request: web.Request) -> web.Response:
    _admin(request)
    claim_id = _claim_id(request)
    status = await compensation.ops_refund(request.app[PG], request.app[REDIS], claim_id)
    return json_response({"claim_id": claim_id, "status": status})


def add_routes(app: web.Application) -> None:
    """The member listener's route: partner callbacks."""
    app[PARTNERS] = PartnerCache()
    app.router.add_post("/v1/partners/{partner_id}/callbacks", partner_callback)


def add_admin_routes(app: web.Application) -> None:
    """The admin listener's routes."""
    app.router.add_put("/admin/v1/partners/{partner_id}", put_partner)
    app.router.add_get("/admin/v1/partners/{partner_id}", get_partner)
    app.router.add_post("/admin/v1/benefits/{benefit_id}/options/{option_id}/codes", post_codes)
    app.router.add_get("/admin/v1/benefits/{benefit_id}/codes", get_codes)
    app.router.add_get("/admin/v1/claims/{claim_id}", admin_get_claim)
    app.router.add_post("/admin/v1/claims/{claim_id}/retry", retry_claim)
    app.router.add_post("/admin/v1/claims/{claim_id}/refund", refund_claim)
