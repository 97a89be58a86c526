"""Member event streams over HTTP (Server-Sent Events): a countdown before the opening, then
``open``, coarse ``stock``, ``sold_out`` reaching every stream, ``reopened`` on a top-up and
``paused``; events in order, with ids a client can resume from."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from claim_service.claims.live import SWEEP_S, LiveFeeds
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.http.events import LIVE
from tests.helpers import Client, admin, auth, benefit_body, wait_for

STREAMS = 90  # the test client keeps at most 100 connections
STOCK = 5


async def events_of(
    client: Client,
    settings: Settings,
    user: str,
    until: str,
    out: list[tuple[int, str, Any]],
    headers: dict[str, str] | None = None,
) -> None:
    """Read ``user``'s stream into ``out`` (id, event, data) until an ``until`` event."""
    answer = await client.get(
        "/v1/benefits/video/events", headers={**auth(settings, user), **(headers or {})}
    )
    assert answer.status == 200, await answer.text()
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    seq, name, data = 0, "", None
    async for raw in answer.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("id: "):
            seq = int(line[4:])
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = orjson.loads(line[6:])
        elif line == "" and name:
            out.append((seq, name, data))
            if name == until:
                answer.close()
                return
            name = ""


async def test_every_stream_hears_the_release_in_order(client: Client, settings: Settings) -> None:
    body = benefit_body(stock=STOCK, opens_in_s=2.5, min_tier=1, quota=1)
    answer = await client.put("/admin/v1/benefits/video", json=body, headers=admin(settings))
    assert answer.status == 201
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": f"m{i}", "tier": 5} for i in range(STOCK + 3)]
    await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))

    streams: list[list[tuple[int, str, Any]]] = [[] for _ in range(STREAMS)]
    readers = [
        asyncio.create_task(events_of(client, settings, f"w{i}", "sold_out", streams[i]))
        for i in range(STREAMS)
    ]

    # Wait for the opening (the streams say when), then claim the whole stock.
    async def opened() -> bool:
        return any(name == "open" for s in streams for _, name, _ in s)

    await wait_for(opened, within=10)
    answers = await asyncio.gather(
        *(
            client.post(
                "/v1/benefits/video/claims",
                json={"request_id": "r", "option_id": "iqiyi"},
                headers=auth(settings, f"m{i}"),
            )
            for i in range(STOCK + 3)
        )
    )
    assert sorted(a.status for a in answers) == [202] * STOCK + [410] * 3
    await asyncio.wait_for(asyncio.gather(*readers), 10)
    for events in streams:
        names = [name for _, name, _ in events]
        assert names[0] == "state" and events[0][2]["phase"] == "not_open"
        assert names[-1] == "sold_out" and events[-1][2]["stock_left"] == 0
        assert "countdown" in names and names.index("countdown") < names.index("open")
        assert set(names[names.index("open") + 1 : -1]) <= {"stock"}
        ids = [seq for seq, _, _ in events]
        assert ids == sorted(ids) and len(set(ids[1:])) == len(ids) - 1  # in order, once each
        lefts = [data["stock_left"] for _, name, data in events if name in ("stock", "sold_out")]
        assert lefts == sorted(lefts, reverse=True)


async def test_top_up_reopens_and_pause_is_pushed(client: Client, settings: Settings) -> None:
    body = benefit_body(stock=1, min_tier=1, quota=1)
    answer = await client.put("/admin/v1/benefits/video", json=body, headers=admin(settings))
    assert answer.status == 201
    period = periods.current_period(settings.tz)
    await client.put(
        f"/admin/v1/tiers/{period}", json=[{"user_id": "m0", "tier": 5}], headers=admin(settings)
    )
    answer = await client.post(
        "/v1/benefits/video/claims",
        json={"request_id": "r", "option_id": "iqiyi"},
        headers=auth(settings, "m0"),
    )
    assert answer.status == 202
    first: list[tuple[int, str, Any]] = []
    reader = asyncio.create_task(events_of(client, settings, "w", "paused", first))

    async def connected() -> bool:
        return bool(first)

    await wait_for(connected, within=10, every=0.02)
    assert first[0][1] == "state" and first[0][2]["phase"] == "sold_out"
    answer = await client.post(
        "/admin/v1/benefits/video/stock", json={"amount": 2}, headers=admin(settings)
    )
    assert answer.status == 200, await answer.text()

    async def reopened() -> bool:
        return any(name == "reopened" for _, name, _ in first)

    await wait_for(reopened, within=10, every=0.02)
    answer = await client.post("/admin/v1/benefits/video/pause", headers=admin(settings))
    assert answer.status == 200
    await asyncio.wait_for(reader, 10)
    assert [name for _, name, _ in first] == ["state", "reopened", "paused"]
    assert first[1][2]["stock_left"] == 2
    # Resuming after the last event received: nothing missed, nothing repeated.
    resumed: list[tuple[int, str, Any]] = []
    answer = await client.post("/admin/v1/benefits/video/resume", headers=admin(settings))
    assert answer.status == 200
    last = str(first[-1][0])
    await asyncio.wait_for(
        events_of(client, settings, "w", "open", resumed, {"Last-Event-ID": last}), 10
    )
    assert [name for _, name, _ in resumed] == ["open"] and resumed[0][0] == first[-1][0] + 1


async def test_unknown_benefit_and_missing_token(client: Client, settings: Settings) -> None:
    answer = await client.get("/v1/benefits/nope/events", headers=auth(settings, "m"))
    assert answer.status == 404
    answer = await client.get("/v1/benefits/nope/events")
    assert answer.status == 401


async def test_a_closed_stream_frees_its_place_within_a_sweep(
    client: Client, settings: Settings
) -> None:
    """Clients that go away are noticed by the feed's sweep (not at the next heartbeat), so
    a reconnect storm after a network blip finds its places free."""
    body = benefit_body(stock=5, min_tier=1, quota=1)
    answer = await client.put("/admin/v1/benefits/video", json=body, headers=admin(settings))
    assert answer.status == 201
    live: LiveFeeds = client.app[LIVE]
    answers = [
        await client.get("/v1/benefits/video/events", headers=auth(settings, f"w{i}"))
        for i in range(20)
    ]
    assert {a.status for a in answers} == {200} and live.streams == 20
    for a in answers:
        a.close()

    async def freed() -> bool:
        return live.streams == 0

    await wait_for(freed, within=SWEEP_S * 3 + 1)
