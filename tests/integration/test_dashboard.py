"""The ops dashboard without a browser: its feed's numbers through a release, one sampler
per worker whatever the number of viewers (and none without viewers), and its sign-in:
bearer or a session cookie that the token alone can mint, never the token in the URL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import jsonschema_rs
import orjson
import pytest
from redis.asyncio import Redis

from claim_service import metrics
from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.http.dashboard import COOKIE, DASHBOARD, POLICY, session_cookie
from claim_service.http.member import openapi_document
from claim_service.store.keyspace import BenefitKeys, Scripts
from claim_service.store.partner_health import report_breaker
from claim_service.store.reconcile import Reconciler
from tests.helpers import Client, admin, auth, benefit_body, direct, drain, fast, settle, wait_for
from tests.integration.campaign_kit import ago, code_for, put_campaign

BENEFIT = "dash"
STOCK = 20
CODES = 30
MEMBERS = 25
PARTNER = "dash-partner"
COMPONENTS = orjson.loads(openapi_document())["components"]
SNAPSHOT = jsonschema_rs.Draft202012Validator(
    {"$ref": "#/components/schemas/DashboardSnapshot", "components": COMPONENTS}
)


@dataclass
class Feed:
    """A dashboard stream read in the background: every snapshot and its id."""

    snapshots: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    heartbeats: int = 0
    invalid: list[str] = field(default_factory=list)  # snapshots the document does not allow

    @property
    def latest(self) -> dict[str, Any]:
        return self.snapshots[-1][1]

    async def until(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = 15.0
    ) -> dict[str, Any]:
        async def seen() -> bool:
            assert not self.invalid, self.invalid
            return bool(self.snapshots) and predicate(self.latest)

        try:
            await wait_for(seen, within)
        except AssertionError:
            raise AssertionError(f"not reached; last snapshot: {self.snapshots[-1:]}") from None
        return self.latest


async def read_feed(resp: aiohttp.ClientResponse, feed: Feed) -> None:
    seq, name = 0, ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("id: "):
            seq = int(line[4:])
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and name == "snapshot":
            snapshot = orjson.loads(line[6:])
            feed.invalid += [str(e) for e in SNAPSHOT.iter_errors(snapshot)]  # as documented
            feed.snapshots.append((seq, snapshot))
        elif line.startswith(":"):
            feed.heartbeats += 1


@contextlib.asynccontextmanager
async def watching(client: Client, settings: Settings) -> AsyncIterator[Feed]:
    resp = await client.get("/admin/dashboard/events", headers=admin(settings))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    feed = Feed()
    task = asyncio.create_task(read_feed(resp, feed))
    try:
        yield feed
    finally:
        resp.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await task


@pytest.fixture
def quick_board(client: Client) -> None:
    """Sample four times a second (PostgreSQL too) so that the tests wait less."""
    board = client.admin_app[DASHBOARD]  # type: ignore[attr-defined]
    board.tick_s = board.pg_every_s = 0.25


async def release(
    client: Client,
    settings: Settings,
    benefit_id: str = BENEFIT,
    partner: str = PARTNER,
    direct_option: str = "x",
) -> None:
    """The benefit: 20 units, a card-key option with 30 codes and an unclaimed direct-charge
    one; members u0..u24 at tier 5, one unit each."""
    body = benefit_body(
        stock=STOCK,
        quota=1,
        options=[
            {"option_id": "youku", "kind": "card_key"},
            direct(direct_option, partner=partner),
        ],
    )
    resp = await client.put(f"/admin/v1/benefits/{benefit_id}", json=body, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": f"u{i}", "tier": 5} for i in range(MEMBERS)]
    resp = await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))
    assert resp.status == 200, await resp.text()
    codes = [f"DASH-{i:04d}" for i in range(CODES)]
    resp = await client.post(
        f"/admin/v1/benefits/{benefit_id}/options/youku/codes", json=codes, headers=admin(settings)
    )
    assert resp.status == 200, await resp.text()


async def claim(
    client: Client, settings: Settings, member: str, request_id: str, benefit_id: str = BENEFIT
) -> int:
    resp = await client.post(
        f"/v1/benefits/{benefit_id}/claims",
        headers=auth(settings, member),
        json={"request_id": request_id, "option_id": "youku"},
    )
    return resp.status


def outcome(snapshot: dict[str, Any], code: str) -> int:
    found = [o["decided"] + o["local"] for o in snapshot["outcomes"] if o["code"] == code]
    return found[0] if found else 0


def benefit(snapshot: dict[str, Any]) -> dict[str, Any]:
    return next(b for b in snapshot["benefits"] if b["benefit_id"] == BENEFIT)


async def test_the_feed_follows_a_release(
    client: Client, settings: Settings, redis: Redis, pool: asyncpg.Pool, quick_board: None
) -> None:
    await release(client, settings)
    async with watching(client, settings) as feed:
        before = await feed.until(lambda s: any(b["benefit_id"] == BENEFIT for b in s["benefits"]))
        row = benefit(before)
        assert (row["left"], row["stock"], row["accepted"], row["phase"]) == (20, 20, 0, "open")
        assert row["waiting_room"] is None and row["drift"] is None
        youku = row["options"][0]
        # Free codes are counted in Redis once it vouches for the benefit (recovery, or the
        # first claim): until then they are unknown, not zero.
        assert (youku["codes_free"], youku["left"]) in ((CODES, STOCK), (None, STOCK))
        assert youku["codes_free"] == (CODES if row["live"] else None)
        # Counters are this process's since it started: the release adds to them.
        sold_out, quota, accepted = (outcome(before, c) for c in ("sold_out", "quota", "ok"))

        # Ten claims, one member trying twice, then fifteen more for the ten units left.
        assert [await claim(client, settings, f"u{i}", "r") for i in range(10)] == [202] * 10
        assert await claim(client, settings, "u0", "again") == 409
        statuses = await asyncio.gather(
            *(claim(client, settings, f"u{i}", "r") for i in range(10, MEMBERS))
        )
        assert sorted(statuses) == [202] * 10 + [410] * 5

        after = await feed.until(lambda s: benefit(s)["left"] == 0 and s["writer"]["backlog"])
        row = benefit(after)
        assert (row["accepted"], row["taken"], row["phase"]) == (STOCK, STOCK, "sold_out")
        assert row["live"]
        assert row["backlog"] == STOCK and row["lag_ms"] is not None
        assert row["options"][0]["codes_free"] == CODES - STOCK
        assert outcome(after, "ok") - accepted == STOCK
        assert outcome(after, "quota") - quota == 1
        assert outcome(after, "sold_out") - sold_out == 5
        assert max(v for _, v in after["claims_per_s"]["samples"]) > 0

        # Persisted, then delivered: backlog drains, codes are assigned, states move.
        await drain(ClaimWriter(redis, pool, fast(settings)))
        await settle(settings, redis, pool)
        done = await feed.until(
            lambda s: s["writer"]["backlog"] == 0 and benefit(s)["fulfilment"]["fulfilled"] == STOCK
        )
        assert done["writer"]["lag_ms"] is None
        assert benefit(done)["fulfilment"] == {
            "accepted": 0,
            "fulfilling": 0,
            "fulfilled": STOCK,
            "failed": 0,
            "refunded": 0,
        }
        pools = [p for p in done["code_pools"] if p["benefit_id"] == BENEFIT]
        assert pools == [
            {
                "benefit_id": BENEFIT,
                "option_id": "youku",
                "loaded": CODES,
                "assigned": STOCK,
                "free": CODES - STOCK,
                "expired": 0,
                "free_in_redis": CODES - STOCK,
            }
        ]
        partner = next(p for p in done["partners"] if p["partner_id"] == PARTNER)
        assert partner["in_flight"] == 0 and partner["breaker"] is None

        # Drift and breakers as this serve's metrics report them.
        await Reconciler(pool, redis, settings).report_all()
        metrics.PARTNER_CIRCUIT.labels(PARTNER).set(1)
        try:
            reported = await feed.until(lambda s: benefit(s)["drift"] is not None)
            reported = await feed.until(
                lambda s: any(p["breaker"] == "open" for p in s["partners"])
            )
            assert benefit(reported)["drift"] == 0
            assert reported["points_drift"] == 0
        finally:
            metrics.PARTNER_CIRCUIT.labels(PARTNER).set(0)

        # Breakers as the fulfil workers report them: the worst fresh state wins.
        await report_breaker(redis, PARTNER, "fulfil-a", "closed")
        await report_breaker(redis, PARTNER, "fulfil-b", "half_open")
        reported = await feed.until(
            lambda s: any(p["breaker"] == "half_open" for p in s["partners"])
        )

        # Redis stops vouching for the benefit (as after a restart): the row says so.
        await Scripts(redis).live(keys=[BenefitKeys(BENEFIT).live], args=["clear"])
        stale = benefit(await feed.until(lambda s: not benefit(s)["live"]))
        assert stale["options"][0]["codes_free"] is None


def campaign(snapshot: dict[str, Any], campaign_id: str) -> dict[str, Any] | None:
    return next((c for c in snapshot["campaigns"] if c["campaign_id"] == campaign_id), None)


async def test_the_feed_shows_campaign_funnels(
    client: Client, settings: Settings, quick_board: None
) -> None:
    async with watching(client, settings) as feed:
        assert (await feed.until(lambda s: True))["campaigns"] == []  # none: the page hides them
        # One open now, one that ended long ago (shown after those open or lately ended).
        await put_campaign(client, settings, "invite", budget=10)
        await put_campaign(
            client, settings, "a-old", name="", starts_at=ago(days=40), ends_at=ago(days=10)
        )
        await code_for(client, settings, "invite", "u1")
        await code_for(client, settings, "invite", "u1")  # the same code again: still one

        def issued(s: dict[str, Any]) -> bool:
            row = campaign(s, "invite")
            return row is not None and row["funnel"]["codes_issued"] == 1

        snapshot = await feed.until(issued)
        assert [c["campaign_id"] for c in snapshot["campaigns"]] == ["invite", "a-old"]
        row = campaign(snapshot, "invite")
        assert row is not None
        assert row.pop("ends_at")
        assert row == {
            "campaign_id": "invite",
            "name": "Invite two friends",
            "type": "referral",
            "open": True,
            "funnel": {
                "codes_issued": 1,
                "attributed": 0,
                "qualified": 0,
                "rewarded": 0,
                "revoked": 0,
            },
            "conversion": {
                "attributed_per_code": 0.0,
                "qualified_per_attributed": None,
                "rewarded_per_qualified": None,
                "revoked_per_rewarded": None,
            },
            "rewards": {"held": 0, "released": 0, "revoked": 0, "over_budget": 0},
            "budget": {"rewards": 10, "rewards_granted": 0, "points": None, "points_granted": 0},
        }
        old = campaign(snapshot, "a-old")
        assert old is not None and not old["open"] and old["funnel"]["codes_issued"] == 0


async def test_one_sampler_per_worker_whatever_the_viewers(
    client: Client, settings: Settings, quick_board: None
) -> None:
    board = client.admin_app[DASHBOARD]  # type: ignore[attr-defined]
    await release(client, settings)
    async with contextlib.AsyncExitStack() as stack:
        feeds = [await stack.enter_async_context(watching(client, settings)) for _ in range(5)]
        assert board.viewers == 5
        start = board.seq
        await asyncio.sleep(1.5)
        ticks = board.seq - start
        # One snapshot a tick for all five (not five), each sent to every viewer alike.
        assert 3 <= ticks <= 8, ticks
        frames = [dict(f.snapshots) for f in feeds]
        shared = set.intersection(*(set(f) for f in frames))
        assert len(shared) >= 3
        for seq in shared:
            assert all(f[seq] == frames[0][seq] for f in frames)
        assert feeds[0].latest["viewers"] == 5
    await wait_for(lambda: _true(board.viewers == 0), 5)
    idle = board.seq
    await asyncio.sleep(1.0)
    assert board.seq == idle, "nobody watches: nothing is sampled"


async def _true(value: bool) -> bool:
    return value


# -- sign-in -------------------------------------------------------------------------------


async def test_the_page_needs_the_admin_token(client: Client, settings: Settings) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, auth(settings, "u1")):
        for path in ("/admin/dashboard", "/admin/dashboard/events"):
            resp = await client.get(path, headers=headers)
            assert resp.status == 401, await resp.text()
            assert (await resp.json())["error"] == "unauthorized"
    resp = await client.get("/admin/dashboard?token=wrong", allow_redirects=False)
    assert resp.status == 401 and "Set-Cookie" not in resp.headers
    resp = await client.get("/admin/dashboard?token=%C3%A9", allow_redirects=False)
    assert resp.status == 401

    page = await client.get("/admin/dashboard", headers=admin(settings))
    assert page.status == 200 and page.content_type == "text/html"
    assert page.headers["Content-Security-Policy"] == POLICY
    assert "'unsafe-inline'" not in POLICY and "script-src 'sha256-" in POLICY
    assert 'data-testid="total-left"' in await page.text()


async def test_signing_in_sets_a_session_cookie_and_drops_the_token(
    client: Client, settings: Settings
) -> None:
    token = settings.admin_token
    resp = await client.get(f"/admin/dashboard?token={token}", allow_redirects=False)
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == "/admin/dashboard"
    assert resp.headers["Cache-Control"] == "no-store"
    cookie = resp.cookies[COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/admin"
    assert token not in cookie.value and token not in resp.headers["Location"]
    session = {"Cookie": f"{COOKIE}={cookie.value}"}
    client.session.cookie_jar.clear()  # the test client keeps cookies: send them by hand

    page = await client.get("/admin/dashboard", headers=session)
    assert page.status == 200, await page.text()
    events = await client.get("/admin/dashboard/events", headers=session)
    assert events.status == 200 and events.content_type == "text/event-stream"
    events.close()
    # The cookie opens the dashboard only, never the admin API.
    api = await client.get("/admin/v1/benefits", headers=session)
    assert api.status == 401
    # A wrong bearer is refused even with a good cookie.
    wrong = await client.get("/admin/dashboard", headers={**session, "Authorization": "Bearer x"})
    assert wrong.status == 401

    now = int(time.time())
    for forged in (
        session_cookie("another-token", now + 3600),  # minted without the token (or an old one)
        session_cookie(token, now - 1),  # expired
        session_cookie(token, now + 10 * 24 * 3600),  # longer than a session lasts
        cookie.value[:-1] + ("0" if cookie.value[-1] != "0" else "1"),
        "garbage",
        "",
    ):
        resp = await client.get("/admin/dashboard", headers={"Cookie": f"{COOKIE}={forged}"})
        assert resp.status == 401, forged
