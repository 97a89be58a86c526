"""The waiting room over HTTP, on real servers: one ticket per member, the pre-queue shuffled
by a committed seed (its order re-derived from the revealed seed), admission at the room's
rate, no claim without an admission while the window is open, the room closed at sold out
and opened again by a top-up."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import Any

import jwt
from redis.asyncio import Redis

from claim_service.claims.admission import Admissions
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.waiting_room import order, shuffle_key
from claim_service.store import rooms
from claim_service.store.rooms import RoomTimes
from tests.helpers import Client, admin, auth, benefit_body, member_token, wait_for
from tests.integration.test_events import events_of
from tests.unit.test_draws import chi2_sf

ROOM = {"prequeue_minutes": 1, "admit_per_s": 4}
ROOMS, ROOM_TICKETS = 300, 10


async def open_room(
    client: Client, settings: Settings, *, stock: int, opens_in_s: float, members: int
) -> None:
    body = {**benefit_body(stock=stock, opens_in_s=opens_in_s, quota=1), "waiting_room": ROOM}
    answer = await client.put("/admin/v1/benefits/video", json=body, headers=admin(settings))
    assert answer.status == 201, await answer.text()
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": f"m{i}", "tier": 5} for i in range(members)]
    await client.put(f"/admin/v1/tiers/{period}", json=tiers, headers=admin(settings))


async def join(client: Client, settings: Settings, user: str) -> tuple[int, dict[str, Any]]:
    answer = await client.post("/v1/benefits/video/queue", headers=auth(settings, user))
    return answer.status, await answer.json()


async def ticket(client: Client, settings: Settings, user: str) -> dict[str, Any]:
    answer = await client.get("/v1/benefits/video/queue", headers=auth(settings, user))
    assert answer.status == 200, await answer.text()
    return dict(await answer.json())


async def claim(
    client: Client, settings: Settings, user: str, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"request_id": "r1", "option_id": "iqiyi"}
    if token is not None:
        body["admission_token"] = token
    answer = await client.post("/v1/benefits/video/claims", json=body, headers=auth(settings, user))
    return answer.status, await answer.json()


async def test_a_release_through_the_room(client: Client, settings: Settings) -> None:
    await open_room(client, settings, stock=5, opens_in_s=2.0, members=14)
    early = [f"m{i}" for i in range(12)]
    tickets = {}
    for user in early:
        status, body = await join(client, settings, user)
        assert status == 201, body
        assert body["status"] == "prequeue" and body["position"] is None
        assert "admission_token" not in body
        tickets[user] = body["ticket_id"]
    # One ticket per member: a retry returns the same one.
    status, again = await join(client, settings, "m3")
    assert status == 200 and again["ticket_id"] == tickets["m3"]
    assert again["queue_size"] == 12
    # Before the opening a claim is refused for the window, not the room.
    status, body = await claim(client, settings, "m0")
    assert status == 425 and body["error"] == "not_open"
    proof = await (
        await client.get("/v1/benefits/video/queue/order", headers=auth(settings, "m0"))
    ).json()
    assert proof["commitment"] and proof["seed"] is None and proof["prequeue"] is None

    await asyncio.sleep(max(0.0, 2.1 - 0))
    await wait_for(lambda: _opened(client, settings), within=10)
    # After the opening: late arrivals at the back, claims need an admission.
    status, late = await join(client, settings, "m12")
    assert status == 201 and late["position"] == 13
    status, body = await claim(client, settings, "m0")
    assert status == 403 and body["error"] == "admission_required"
    assert body["queue"] == "/v1/benefits/video/queue"

    # Members are admitted in their order, about admit_per_s a second.
    positions = {user: (await ticket(client, settings, user))["position"] for user in early}
    assert sorted(positions.values()) == list(range(1, 13))
    first = min(positions, key=positions.__getitem__)
    last = max(positions, key=positions.__getitem__)
    assert (await ticket(client, settings, last))["status"] == "waiting"
    mine = await _admitted(client, settings, first)
    assert mine["position"] == 1 and mine["ahead"] == 0
    # An admission is this member's, for this benefit: another member cannot use it.
    status, body = await claim(client, settings, last, mine["admission_token"])
    assert status == 403 and body["error"] == "admission_required"
    status, body = await claim(client, settings, first, mine["admission_token"])
    assert status == 202, body

    # The shuffle is reproducible from the revealed seed.
    await asyncio.sleep(5.2)
    proof = await (
        await client.get("/v1/benefits/video/queue/order", headers=auth(settings, "m0"))
    ).json()
    seed = bytes.fromhex(proof["seed"])
    assert hashlib.sha256(seed).hexdigest() == proof["commitment"]
    assert proof["prequeue"] == order(seed, list(tickets.values()))
    assert proof["late"] == [late["ticket_id"]]
    by_ticket = {t: i for i, t in enumerate(proof["prequeue"], start=1)}
    assert positions == {user: by_ticket[tickets[user]] for user in early}

    # The room sells out: it closes, and tells everyone.
    ranked = sorted(early, key=positions.__getitem__)
    accepted = 1
    for user in ranked[1:]:
        if accepted == 5:
            break
        mine = await _admitted(client, settings, user)
        status, body = await claim(client, settings, user, mine["admission_token"])
        assert status == 202, body
        accepted += 1
    assert (await ticket(client, settings, ranked[-1]))["status"] == "sold_out"
    status, body = await join(client, settings, "m13")
    assert status == 410 and body["error"] == "sold_out"
    status, body = await claim(client, settings, ranked[-1])
    assert status == 410 and body["error"] == "sold_out"
    frozen = (await ticket(client, settings, ranked[-1]))["admitted"]
    await asyncio.sleep(0.6)
    assert (await ticket(client, settings, ranked[-1]))["admitted"] == frozen

    # A top-up opens it again: admissions resume where they stood.
    answer = await client.post(
        "/admin/v1/benefits/video/stock", json={"amount": 2}, headers=admin(settings)
    )
    assert answer.status == 200, await answer.text()
    mine = await _admitted(client, settings, ranked[-1], within=10)
    assert mine["status"] == "admitted"
    status, body = await claim(client, settings, ranked[-1], mine["admission_token"])
    assert status == 202, body


async def _opened(client: Client, settings: Settings) -> bool:
    return bool((await ticket(client, settings, "m0"))["status"] != "prequeue")


async def _admitted(
    client: Client, settings: Settings, user: str, within: float = 10.0
) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def admitted() -> bool:
        found.update(await ticket(client, settings, user))
        return bool(found["status"] == "admitted")

    await wait_for(admitted, within=within, every=0.1)
    return found


async def test_forged_expired_and_foreign_admissions_are_refused(
    client: Client, settings: Settings
) -> None:
    await open_room(client, settings, stock=5, opens_in_s=-1, members=2)
    period = periods.current_period(settings.tz)
    admissions = Admissions(settings.codes_key)
    good, _ = admissions.issue("m0", "video", period, "t" * 32)
    other_period, _ = admissions.issue("m0", "video", periods.next_period(period), "t" * 32)
    other_benefit, _ = admissions.issue("m0", "audio", period, "t" * 32)
    claims = {"sub": "m0", "bid": "video", "per": period, "aud": "claim-admission"}
    expired = jwt.encode(
        {**claims, "exp": int(time.time()) - 60}, admissions._key, algorithm="HS256"
    )
    # Signed with the member tokens' secret: a member token is not an admission.
    forged = jwt.encode(
        {**claims, "exp": int(time.time()) + 60}, settings.jwt_secret, algorithm="HS256"
    )
    for token in (
        None,
        "",
        "garbage",
        expired,
        forged,
        other_period,
        other_benefit,
        member_token(settings, "m0"),
    ):
        status, body = await claim(client, settings, "m0", token)
        assert status == 403 and body["error"] == "admission_required", token
    status, body = await claim(client, settings, "m1", good)  # m0's admission
    assert status == 403
    status, body = await claim(client, settings, "m0", good)
    assert status == 202, body
    answer = await client.post(
        "/v1/benefits/video/claims",
        json={"request_id": "r2", "option_id": "iqiyi", "admission_token": 7},
        headers=auth(settings, "m0"),
    )
    assert answer.status == 400


async def test_room_routes_answer_clearly(client: Client, settings: Settings) -> None:
    # A benefit without a room has no queue; a room not yet open gives no ticket.
    body = benefit_body(stock=5, opens_in_s=-1)
    await client.put("/admin/v1/benefits/plain", json=body, headers=admin(settings))
    answer = await client.post("/v1/benefits/plain/queue", headers=auth(settings, "m0"))
    assert answer.status == 404 and (await answer.json())["error"] == "no_waiting_room"
    answer = await client.post("/v1/benefits/nope/queue", headers=auth(settings, "m0"))
    assert answer.status == 404 and (await answer.json())["error"] == "unknown_benefit"
    answer = await client.post("/v1/benefits/plain/queue")
    assert answer.status == 401
    await open_room(client, settings, stock=5, opens_in_s=600, members=1)
    proof = await (
        await client.get("/v1/benefits/video/queue/order", headers=auth(settings, "m0"))
    ).json()
    assert proof["commitment"] is None and proof["seed"] is None
    status, body = await join(client, settings, "m0")
    assert status == 425 and body["error"] == "prequeue_not_open"
    answer = await client.get("/v1/benefits/video/queue", headers=auth(settings, "m0"))
    assert answer.status == 404 and (await answer.json())["error"] == "no_ticket"
    answer = await client.get(
        "/v1/benefits/video/queue/order?period=2026-13", headers=auth(settings, "m0")
    )
    assert answer.status == 400
    # The setting is validated and kept.
    bad = {**benefit_body(stock=5), "waiting_room": {"prequeue_minutes": 0, "admit_per_s": 5}}
    answer = await client.put("/admin/v1/benefits/video", json=bad, headers=admin(settings))
    assert answer.status == 400
    assert (await answer.json())["field"] == "waiting_room.prequeue_minutes"
    answer = await client.get("/admin/v1/benefits/video", headers=admin(settings))
    assert (await answer.json())["waiting_room"] == ROOM


async def test_the_event_stream_carries_each_ticket_and_the_closing(
    client: Client, settings: Settings
) -> None:
    await open_room(client, settings, stock=2, opens_in_s=2.0, members=6)
    users = [f"m{i}" for i in range(6)]
    for user in users:
        assert (await join(client, settings, user))[0] == 201
    streams: dict[str, list[tuple[int, str, Any]]] = {user: [] for user in users}
    readers = [
        asyncio.create_task(events_of(client, settings, user, "sold_out", streams[user]))
        for user in users
    ]

    def queue_events(user: str) -> list[dict[str, Any]]:
        return [data for _, name, data in streams[user] if name == "queue"]

    # Each member hears their own ticket: in the pre-queue, then their place once open.
    async def placed() -> bool:
        return all(any(e.get("position") for e in queue_events(u)) for u in users)

    await wait_for(placed, within=15)
    for user in users:
        events = queue_events(user)
        assert all(e["ticket_id"] == events[0]["ticket_id"] for e in events)
        assert events[0]["status"] in ("prequeue", "waiting", "admitted")
    # Admitted members are handed their admission on the stream, and claim with it.
    tokens: dict[str, str] = {}

    async def admitted() -> bool:
        for user in users:
            for event in queue_events(user):
                if event.get("admission_token"):
                    assert event["status"] == "admitted" and event["ahead"] == 0
                    tokens[user] = event["admission_token"]
        return len(tokens) >= 2

    await wait_for(admitted, within=15)
    for user in list(tokens)[:2]:
        status, body = await claim(client, settings, user, tokens[user])
        assert status == 202, body
    # Sold out reaches every stream, the waiting ones included.
    await asyncio.wait_for(asyncio.gather(*readers), timeout=15)
    for user in users:
        assert streams[user][-1][1] == "sold_out"
        ids = [seq for seq, _, _ in streams[user]]
        assert ids == sorted(ids)


async def test_early_arrival_gives_no_advantage_in_the_real_room(redis: Redis) -> None:
    """300 rooms of 10 tickets joined one by one through ``room.lua`` (each with its own
    seed): the k-th arrival's place at the opening is spread evenly over the positions (a
    chi-square test of the 10 x 10 table at p = 0.001)."""
    rng = random.Random(12)  # fixed: the test gives the same answer every run
    now_ms = int(time.time() * 1000)
    times = RoomTimes("2026-11", now_ms - 60_000, now_ms + 600_000, 0, 10)
    table = [[0] * ROOM_TICKETS for _ in range(ROOM_TICKETS)]
    for room in range(ROOMS):
        seed = rng.randbytes(32)
        arrivals = []
        for i in range(ROOM_TICKETS):
            ticket = rng.randbytes(16).hex()
            view = await rooms.visit(
                redis,
                f"room{room}",
                times,
                f"u{i}",
                join=True,
                ticket_id=ticket,
                shuffle_key=shuffle_key(seed, ticket),
            )
            assert view.new and view.phase == rooms.PREQUEUE
            arrivals.append(ticket)
        ranks = await rooms.ranks_of(redis, f"room{room}", times.period, arrivals)
        assert sorted(ranks.values()) == list(range(ROOM_TICKETS))
        for k, ticket in enumerate(arrivals):
            table[k][ranks[ticket]] += 1
    expected = ROOMS / ROOM_TICKETS
    statistic = sum((n - expected) ** 2 / expected for row in table for n in row)
    assert chi2_sf(statistic, (ROOM_TICKETS - 1) ** 2) > 0.001, statistic


async def test_one_ticket_per_member_under_concurrent_retries(
    client: Client, settings: Settings
) -> None:
    await open_room(client, settings, stock=5, opens_in_s=30, members=3)
    answers = await asyncio.gather(*(join(client, settings, f"m{i % 3}") for i in range(60)))
    for i in range(3):
        mine = [body for j, (_, body) in enumerate(answers) if j % 3 == i]
        assert len({body["ticket_id"] for body in mine}) == 1
        assert sorted(status for j, (status, _) in enumerate(answers) if j % 3 == i) == [
            200
        ] * 19 + [201]
    assert (await ticket(client, settings, "m0"))["queue_size"] == 3


async def test_admissions_stand_still_while_paused(client: Client, settings: Settings) -> None:
    await open_room(client, settings, stock=50, opens_in_s=-0.5, members=0)
    for i in range(40):
        assert (await join(client, settings, f"m{i}"))[0] == 201
    answer = await client.post("/admin/v1/benefits/video/pause", headers=admin(settings))
    assert answer.status == 200
    paused = await ticket(client, settings, "m39")
    assert paused["status"] == "paused" and "admission_token" not in paused
    await asyncio.sleep(0.8)
    assert (await ticket(client, settings, "m39"))["admitted"] == paused["admitted"]
    answer = await client.post("/admin/v1/benefits/video/resume", headers=admin(settings))
    assert answer.status == 200

    async def moving() -> bool:
        return bool((await ticket(client, settings, "m39"))["admitted"] > paused["admitted"])

    await wait_for(moving, within=5)
