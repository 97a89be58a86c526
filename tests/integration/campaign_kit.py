"""Set-ups shared by the campaign tests: the bank's signed events, campaigns, reward
benefits, codes and claims, all over HTTP against the in-process service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from claim_service.config import Settings
from claim_service.fulfilment.signing import signed_headers
from tests.conftest import service_client
from tests.helpers import admin, auth, benefit_body, direct

Client = TestClient[Any, Any]
EVENTS_SECRET = "events-secret-for-campaigns-0123456789"


@pytest.fixture
async def bank(settings: Settings, redis: Redis, pool: asyncpg.Pool) -> AsyncIterator[Client]:
    """The service with the event intake on (and no background reward release: tests ask
    for progress, which releases what is due)."""
    with_secret = replace(settings, events_secret=EVENTS_SECRET)
    async with service_client(with_secret, redis, pool) as client:
        yield client


def ago(days: float = 0.0, seconds: float = 0.0) -> str:
    return (datetime.now().astimezone() - timedelta(days=days, seconds=seconds)).isoformat()


def event_body(
    event_id: str, kind: str, user: str, *, days_ago: float = 0.0, **attrs: Any
) -> bytes:
    body = {
        "event_id": event_id,
        "type": kind,
        "user_id": user,
        "occurred_at": ago(days_ago, seconds=1),
        "attrs": attrs,
    }
    return orjson.dumps(body)


async def send_body(client: Client, body: bytes) -> dict[str, Any]:
    resp = await client.post("/v1/events", data=body, headers=signed_headers(EVENTS_SECRET, body))
    assert resp.status in (200, 201), await resp.text()
    return dict(await resp.json())


async def send(
    client: Client, event_id: str, kind: str, user: str, *, days_ago: float = 0.0, **attrs: Any
) -> dict[str, Any]:
    """Post one event; its answer (``campaigns``: what it did to them)."""
    return await send_body(client, event_body(event_id, kind, user, days_ago=days_ago, **attrs))


def outcome(answer: dict[str, Any]) -> tuple[str, str | None]:
    """The one campaign outcome of an event's answer: (outcome, reason)."""
    assert len(answer["campaigns"]) == 1, answer
    found = answer["campaigns"][0]
    return found["outcome"], found.get("reason")


async def reward_benefit(
    client: Client, settings: Settings, benefit_id: str, stock: int, within_days: int = 30
) -> None:
    """A benefit only members a campaign rewarded may claim."""
    body = {
        **benefit_body(stock=stock, min_tier=0, quota=1, options=[direct("gift")]),
        "eligibility": {"event": "campaign_reward", "within_days": within_days},
    }
    resp = await client.put(f"/admin/v1/benefits/{benefit_id}", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()


async def put_campaign(
    client: Client, settings: Settings, campaign_id: str, **fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "referral",
        "name": "Invite two friends",
        "starts_at": ago(days=30),
        "ends_at": ago(days=-30),
        "qualify_event": "wealth_task_done",
        "invitees_required": 2,
        "reward": {"points": 100},
        "budget": 1000,
        **fields,
    }
    resp = await client.put(
        f"/admin/v1/campaigns/{campaign_id}", json=body, headers=admin(settings)
    )
    assert resp.status in (200, 201), await resp.text()
    return dict(await resp.json())


async def code_for(
    client: Client, settings: Settings, campaign_id: str, user: str, **fingerprints: str
) -> str:
    resp = await client.post(
        f"/v1/campaigns/{campaign_id}/referral-code",
        headers=auth(settings, user),
        json=fingerprints or None,
    )
    assert resp.status in (200, 201), await resp.text()
    return str((await resp.json())["code"])


async def progress(
    client: Client, settings: Settings, campaign_id: str, user: str
) -> dict[str, Any]:
    resp = await client.get(f"/v1/campaigns/{campaign_id}/progress", headers=auth(settings, user))
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def claim(
    client: Client, settings: Settings, benefit_id: str, user: str, request_id: str = "r"
) -> Any:
    return await client.post(
        f"/v1/benefits/{benefit_id}/claims",
        headers=auth(settings, user),
        json={"request_id": request_id, "option_id": "gift"},
    )


async def late(client: Client, settings: Settings, campaign_id: str, user: str, code: str) -> Any:
    return await client.post(
        f"/v1/campaigns/{campaign_id}/attribution",
        headers=auth(settings, user),
        json={"referral_code": code},
    )


async def balance(client: Client, settings: Settings, user: str) -> int:
    resp = await client.get("/v1/me/points", headers=auth(settings, user))
    assert resp.status == 200, await resp.text()
    return int((await resp.json())["balance"])
