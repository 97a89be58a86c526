"""``POST /v1/events``: events from the bank's core systems (see ``domain.bank_events``).

Signed like partner callbacks: ``X-Claim-Signature`` is the hex HMAC-SHA256 of
``<X-Claim-Timestamp> + "." + <raw body>`` keyed with ``CLAIM_EVENTS_SECRET``, the timestamp
within 5 minutes of now. Idempotent by ``event_id``: 201 when new, 200 for a replay of the
same event, 409 ``event_id_reused`` for the same id with other content, 422 for an event
more than 5 minutes in the future. Off (503) while
``CLAIM_EVENTS_SECRET`` is not set. The answer lists what the event did to campaigns
(``store.referrals``): attributed, refused (with the reason), qualified, revoked.
"""

from __future__ import annotations

import time

from aiohttp import web

from claim_service.domain.bank_events import parse_event
from claim_service.errors import BackendUnavailable
from claim_service.fulfilment.signing import (
    MAX_SKEW_S,
    SignatureError,
    check_signature,
    signature_headers,
)
from claim_service.http.app import (
    PG,
    REDIS,
    SETTINGS,
    check_length,
    error_response,
    json_response,
    parse_json_object,
    read_body,
)
from claim_service.http.auth import AuthError
from claim_service.store import bank_events, referrals


async def post_event(request: web.Request) -> web.Response:
    app = request.app
    try:  # unsigned requests are refused alike, whether the intake is on or off
        timestamp, signature = signature_headers(request.headers)
    except SignatureError as exc:
        raise AuthError(str(exc)) from exc
    secret = app[SETTINGS].events_secret
    if secret is None:
        raise BackendUnavailable("event intake is off: CLAIM_EVENTS_SECRET is not set")
    limit = app[SETTINGS].max_body_bytes
    check_length(request, limit)
    body = await read_body(request, limit)
    try:
        check_signature(secret, timestamp, body, signature)
    except SignatureError as exc:
        raise AuthError(str(exc)) from exc
    event = parse_event(parse_json_object(body))
    if event.occurred_at.timestamp() > time.time() + MAX_SKEW_S:
        # Well formed, but no event has happened yet: 422, as for fields that contradict.
        return error_response(
            422, "invalid_request", "occurred_at is in the future", field="occurred_at"
        )
    created = await bank_events.record(app[PG], event)
    # Mirrored on a replay too: a mirror written late (or lost with its server) catches up.
    await bank_events.mirror(app[REDIS], [(event.type, event.user_id, event.occurred_ms)])
    # Campaigns: attribution by attrs.referral_code, qualification, revocation. Applied on a
    # replay too: it finds what the first delivery did (and completes it if that failed).
    outcomes = await referrals.on_event(app[PG], app[REDIS], event)
    answer = {
        **event.to_json(),
        "replayed": not created,
        "campaigns": [o.to_json() for o in outcomes],
    }
    return json_response(answer, 201 if created else 200)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/events", post_event)
