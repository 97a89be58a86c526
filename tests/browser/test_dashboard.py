"""The ops dashboard in a real browser: headless Chromium signs in with the admin token,
watches a small release, and the numbers on the page become the right ones. A screenshot
is left in ``test-artifacts/`` for a person to look at."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from playwright.async_api import Browser, Page, expect
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter
from claim_service.config import Settings
from tests.helpers import Client, admin, auth, benefit_body, drain, fast, settle, wait_for
from tests.integration import test_dashboard as td
from tests.integration.campaign_kit import code_for, put_campaign

BENEFIT = "video"
STOCK, CODES, MEMBERS = td.STOCK, td.CODES, td.MEMBERS
WAIT_MS = 15_000


async def open_release(client: Client, settings: Settings) -> None:
    """20 units open now: a card-key option with 30 codes, and a direct-charge one nobody
    claims; members u0..u24 at tier 5, one claim each (as the feed's own tests)."""
    await td.release(client, settings, BENEFIT, partner="iqiyi", direct_option="iqiyi")


async def claim(client: Client, settings: Settings, member: str, request_id: str) -> int:
    return await td.claim(client, settings, member, request_id, BENEFIT)


async def number(page: Page, testid: str) -> float:
    """The number an element shows (0 when the row is not there yet, as for an outcome
    this process has not seen)."""
    found = page.get_by_test_id(testid)
    if await found.count() == 0:
        return 0
    text = (await found.inner_text()).replace(",", "")
    return float(text) if text not in ("", "—") else 0


async def shows(page: Page, testid: str, value: str) -> None:
    await expect(page.get_by_test_id(testid)).to_have_text(value, timeout=WAIT_MS)


async def test_the_dashboard_shows_a_release(
    client: Client,
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    browser: Browser,
    artifacts: Path,
) -> None:
    await open_release(client, settings)
    admin_url = str(client.admin.make_url("/admin/dashboard"))  # type: ignore[attr-defined]
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    # Signing in: the token is swapped for a cookie and leaves the address bar.
    await page.goto(f"{admin_url}?token={settings.admin_token}")
    assert page.url == admin_url
    assert settings.admin_token not in page.url
    await shows(page, "connection", "live")
    await shows(page, f"left-{BENEFIT}", "20")
    await shows(page, f"stock-{BENEFIT}", "20")
    await shows(page, f"accepted-{BENEFIT}", "0")
    await shows(page, f"waiting-room-{BENEFIT}", "—")
    await shows(page, "partner-breaker-iqiyi", "—")
    await shows(page, f"pool-free-{BENEFIT}-youku", "30")
    await expect(page.get_by_test_id("campaigns-panel")).to_be_hidden()  # none yet
    # Outcome counts are this process's since it started: the release adds to them.
    before = {c: await number(page, f"outcome-{c}") for c in ("ok", "quota", "sold_out")}

    # The release: ten claims, one member trying again, fifteen more for the ten units left.
    assert [await claim(client, settings, f"u{i}", "r") for i in range(10)] == [202] * 10
    assert await claim(client, settings, "u0", "again") == 409
    rest = await asyncio.gather(*(claim(client, settings, f"u{i}", "r") for i in range(10, 25)))
    assert sorted(rest) == [202] * 10 + [410] * 5

    await shows(page, f"left-{BENEFIT}", "0")
    await shows(page, "total-left", "0")
    await shows(page, f"accepted-{BENEFIT}", "20")
    await shows(page, f"phase-{BENEFIT}", "sold out")  # live now: claims made it so
    await shows(page, f"option-codes-{BENEFIT}-youku", "10")
    await shows(page, f"option-left-{BENEFIT}-youku", "0")
    await shows(page, "writer-backlog", "20")
    await shows(page, "outcome-ok", f"{before['ok'] + STOCK:,.0f}")
    await shows(page, "outcome-quota", f"{before['quota'] + 1:,.0f}")
    await shows(page, "outcome-sold_out", f"{before['sold_out'] + 5:,.0f}")

    chart = page.get_by_test_id("rate-chart")

    async def charted() -> bool:  # a line: two samples at least, one of them the release
        samples = int(await chart.get_attribute("data-samples") or 0)
        return samples >= 2 and await number(page, "rate-peak") > 0

    await wait_for(charted, WAIT_MS / 1000)
    points = await chart.locator("polyline").first.get_attribute("points") or ""
    assert len(points.split()) >= 2

    # Persisted and delivered: the backlog drains, codes are assigned.
    await drain(ClaimWriter(redis, pool, fast(settings)))
    await shows(page, "writer-backlog", "0")
    await shows(page, "writer-lag", "—")
    await settle(settings, redis, pool)
    await shows(page, f"fulfil-{BENEFIT}-fulfilled", "20")
    await shows(page, f"fulfil-{BENEFIT}-accepted", "0")
    await shows(page, f"pool-assigned-{BENEFIT}-youku", "20")
    await shows(page, f"pool-free-{BENEFIT}-youku", "10")
    await shows(page, f"pool-redis-{BENEFIT}-youku", "10")

    # A second release with a waiting room: the page shows how many wait in it.
    room = {**benefit_body(stock=5, opens_in_s=30)}
    room["waiting_room"] = {"prequeue_minutes": 1, "admit_per_s": 5}
    resp = await client.put("/admin/v1/benefits/lounge", json=room, headers=admin(settings))
    assert resp.status == 201, await resp.text()
    await shows(page, "waiting-room-lounge", "0")
    for i in range(3):
        resp = await client.post("/v1/benefits/lounge/queue", headers=auth(settings, f"u{i}"))
        assert resp.status == 201, await resp.text()
    await shows(page, "waiting-room-lounge", "3")

    # A referral campaign: the panel appears, with its funnel.
    await put_campaign(client, settings, "invite", budget=10)
    await code_for(client, settings, "invite", "u1")
    await expect(page.get_by_test_id("campaigns-panel")).to_be_visible(timeout=WAIT_MS)
    await shows(page, "campaign-codes-invite", "1")
    await shows(page, "campaign-attributed-invite", "0")
    await shows(page, "campaign-attributed-invite-conv", "(0.0%)")
    await shows(page, "campaign-qualified-invite-conv", "(—)")
    await shows(page, "campaign-state-invite", "open")
    await shows(page, "campaign-rewards-invite", "0 / 10")

    shot = artifacts / "dashboard.png"
    await page.screenshot(path=str(shot), full_page=True)
    print(f"dashboard screenshot: {shot}")
    # Nothing was refused by the page's Content-Security-Policy, no script failed.
    assert not problems, problems
