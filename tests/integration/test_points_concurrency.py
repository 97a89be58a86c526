"""Points under concurrency over HTTP: many members spending at once, each firing several
claims together (two prices, retries of the same request), never spend more than they hold,
spend all they can, and once the writer has drained, the Redis mirror matches the ledger.
Run in-process and against a real ``serve --workers 2`` with a real ``writer`` process."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from claim_service.claims.writer import ClaimWriter, backlog
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.points import spendable_points
from claim_service.http.auth import mint_token
from claim_service.http.server import Guard
from claim_service.http.service import create_apps
from claim_service.store.points_mirror import is_live, member_lots, points_drift, redis_ms
from tests.helpers import (
    ServiceClient,
    benefit_body,
    direct,
    drain,
    fast,
    spawn,
    spawn_serve,
    wait_for,
    wait_ready,
    workers_of,
)

PRICES = {"lounge": 1, "golf": 2}
CLAIMS = 8  # fired at once by every member
MEMBERS = 200

# method, path, member (None: ops), JSON body -> status, JSON answer
Send = Callable[[str, str, str | None, Any], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True)
class Member:
    user: str
    lots: tuple[int, ...]  # the points given, one adjustment (lot) each
    requests: tuple[tuple[str, str], ...]  # (request_id, option_id) in firing order
    single: bool  # every claim of one option priced 1, each its own request

    @property
    def given(self) -> int:
        return sum(self.lots)


def plan(members: int, seed: int) -> list[Member]:
    """Points 0..4 each (some in two lots), and eight claims: either all of the 1-point
    option, or both options mixed with two requests sent twice."""
    rng = random.Random(seed)
    found = []
    for i in range(members):
        given = rng.randint(0, 4)
        split = rng.randint(1, given - 1) if given >= 2 and rng.random() < 0.5 else 0
        lots = (split, given - split) if split else ((given,) if given else ())
        single = i % 2 == 0
        if single:
            requests = [(f"r{n}", "lounge") for n in range(CLAIMS)]
        else:
            distinct = [(f"r{n}", rng.choice(list(PRICES))) for n in range(CLAIMS - 2)]
            requests = distinct + rng.sample(distinct, 2)
            rng.shuffle(requests)
        found.append(Member(f"m{i}", lots, tuple(requests), single))
    return found


async def setup(send: Send, settings: Settings, members: list[Member]) -> None:
    """Benefit ``lounge``: option ``lounge`` at 1 point, ``golf`` at 2, stock and quota far
    above what the points allow; every member at tier 12 with their points."""
    body = benefit_body(stock=100_000, min_tier=12, quota=[{"min_tier": 12, "per_period": 50}])
    body["options"] = [direct("lounge"), direct("golf", price_points=PRICES["golf"])]
    body["price_points"] = PRICES["lounge"]
    status, answer = await send("PUT", "/admin/v1/benefits/lounge", None, body)
    assert status == 201, answer
    period = periods.current_period(settings.tz)
    tiers = [{"user_id": m.user, "tier": 12} for m in members]
    status, answer = await send("PUT", f"/admin/v1/tiers/{period}", None, tiers)
    assert status == 200, answer
    tomorrow = (datetime.now().astimezone() + timedelta(days=1)).isoformat()

    async def give(member: Member, n: int, amount: int) -> None:
        adjustment: dict[str, Any] = {
            "amount": amount,
            "reason": "concurrency test",
            "reference": f"{member.user}-{n}",
        }
        if n == 0 and len(member.lots) == 2:  # the first of two lots expires first
            adjustment["expires_at"] = tomorrow
        status, answer = await send(
            "POST", f"/admin/v1/points/{member.user}/adjust", None, adjustment
        )
        assert status == 201, answer

    await asyncio.gather(*(give(m, n, a) for m in members for n, a in enumerate(m.lots)))


Answer = tuple[str, str, int, dict[str, Any]]  # request_id, option_id, status, body


async def fire(send: Send, members: list[Member]) -> dict[str, list[Answer]]:
    """Every claim of every member at once."""

    async def claim(user: str, request_id: str, option_id: str) -> tuple[str, Answer]:
        body = {"request_id": request_id, "option_id": option_id}
        status, answer = await send("POST", "/v1/benefits/lounge/claims", user, body)
        return user, (request_id, option_id, status, answer)

    answers: dict[str, list[Answer]] = defaultdict(list)
    for user, answer in await asyncio.gather(
        *(claim(m.user, r, o) for m in members for r, o in m.requests)
    ):
        answers[user].append(answer)
    return answers


def check_answers(
    members: list[Member], answers: dict[str, list[Answer]]
) -> dict[str, dict[str, str]]:
    """Each member's answers are consistent and spend neither more nor less than they can;
    returns each member's accepted claims (claim id -> option)."""
    accepted: dict[str, dict[str, str]] = {}
    for member in members:
        given = member.given
        mine = answers[member.user]
        assert len(mine) == CLAIMS
        assert {status for _, _, status, _ in mine} <= {200, 202, 402}, mine
        claims = {body["claim_id"]: option for _, option, status, body in mine if status == 202}
        assert all(body["option_id"] == option for _, option, s, body in mine if s == 202)
        cost = sum(PRICES[option] for option in claims.values())
        left = given - cost
        assert 0 <= left, f"{member.user} spent {cost} of {given} point(s)"
        refused = [(option, body) for _, option, status, body in mine if status == 402]
        for option, body in refused:
            assert (body["error"], body["option_id"]) == ("insufficient_points", option), body
            assert body["price"] == PRICES[option], body
            # Refused for want of points, by a balance that has only gone down since.
            assert left <= body["balance"] < body["price"] and body["balance"] <= given, body
        if member.single:
            assert len(claims) == min(given, CLAIMS), (member, mine)
            assert len(refused) == CLAIMS - len(claims)
            assert all((b["balance"], b["price"]) == (0, 1) for _, b in refused)
        else:
            # Nothing was refused that the points left at the end could still pay for.
            assert refused, "the mixed claims ask for more than any member holds"
            assert left < min(PRICES[option] for option, _ in refused), (member, mine)
            # A request sent twice is taken once: the first answer accepts, the repeat
            # replays it; or both are refused.
            by_request: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
            for request_id, _, status, body in mine:
                by_request[request_id].append((status, body))
            for request_id, replies in by_request.items():
                statuses = sorted(status for status, _ in replies)
                if len(replies) == 1 or statuses == [402, 402]:
                    continue
                assert statuses == [200, 202], (request_id, replies)
                (_, replay), (_, first) = sorted(replies, key=lambda r: r[0])
                assert replay["claim_id"] == first["claim_id"] and replay["replayed"] is True
        accepted[member.user] = claims
    return accepted


def assert_varied(answers: dict[str, list[Answer]]) -> None:
    """The burst exercised what it is for: repeats replayed, members refused for want of
    points, some of them with a point left that the 2-point option needed more than."""
    replies = [(status, body) for mine in answers.values() for _, _, status, body in mine]
    assert any(status == 200 for status, _ in replies)
    assert any(status == 402 and body["balance"] == 0 for status, body in replies)
    assert any(status == 402 and body["balance"] == 1 for status, body in replies)


async def check_books(
    send: Send,
    pool: asyncpg.Pool,
    redis: Redis,
    members: list[Member],
    accepted: dict[str, dict[str, str]],
) -> None:
    """Once every claim is recorded: the mirror equals the ledger, each member's ledger holds
    what they were given less what their accepted claims cost, one debit per claim."""
    left = {m.user: m.given - sum(PRICES[o] for o in accepted[m.user].values()) for m in members}
    assert await is_live(redis), "the mirror is live (else points_drift compares nothing)"
    assert await points_drift(pool, redis) == []

    sums = {
        r["user_id"]: r["total"]
        for r in await pool.fetch(
            "SELECT user_id, sum(amount) AS total FROM points_entries GROUP BY user_id"
        )
    }
    assert set(sums) <= set(left)
    assert {u: sums.get(u, 0) for u in left} == left

    debits = await pool.fetch(
        "SELECT claim_id, user_id, amount FROM points_entries WHERE kind = 'debit'"
    )
    expected = {
        claim_id: (user, -PRICES[option])
        for user, claims in accepted.items()
        for claim_id, option in claims.items()
    }
    assert {r["claim_id"]: (r["user_id"], r["amount"]) for r in debits} == expected
    claims = await pool.fetch("SELECT claim_id, user_id, option_id FROM claims")
    assert {r["claim_id"]: (r["user_id"], r["option_id"]) for r in claims} == {
        claim_id: (user, option)
        for user, mine in accepted.items()
        for claim_id, option in mine.items()
    }
    # Every debit is taken from lots that held the points: no lot below zero, and each
    # debit's allocations add up to its amount.
    assert (
        await pool.fetchval(
            """SELECT count(*) FROM (SELECT lot_id FROM points_allocations GROUP BY lot_id
           HAVING sum(amount) < 0) AS overdrawn"""
        )
        == 0
    )
    assert (
        await pool.fetchval(
            """SELECT count(*) FROM points_entries e WHERE e.amount <> (SELECT sum(a.amount)
           FROM points_allocations a WHERE a.entry_id = e.entry_id)"""
        )
        == 0
    )

    now_ms = await redis_ms(redis)
    for member in members:
        assert spendable_points(await member_lots(redis, member.user), now_ms) == left[member.user]

    async def view(member: Member) -> tuple[str, int, int]:
        status, body = await send("GET", "/v1/me/points", member.user, None)
        assert status == 200, body
        return member.user, body["balance"], body["available"]

    views = await asyncio.gather(*(view(m) for m in members))
    assert {u: (b, a) for u, b, a in views} == {u: (n, n) for u, n in left.items()}


# -- in-process ------------------------------------------------------------------------------


@pytest.fixture
async def service(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> AsyncIterator[ServiceClient]:
    """The service with the per-member rate limit off: each member fires a burst at once."""
    local = replace(settings, rate_member_per_s=0.0)
    member, admin_app = create_apps(local, pools=(redis, pool))
    async with ServiceClient(member, admin_app, Guard.for_process(local)) as client:
        yield client


def in_process(client: ServiceClient, settings: Settings) -> Send:
    async def send(method: str, path: str, user: str | None, body: Any) -> tuple[int, Any]:
        token = mint_token(settings, user) if user is not None else settings.admin_token
        resp = await client.request(
            method, path, json=body, headers={"Authorization": f"Bearer {token}"}
        )
        return resp.status, await resp.json()

    return send


async def test_members_spending_at_once_never_overspend_and_the_mirror_matches_the_ledger(
    service: ServiceClient, settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    send = in_process(service, settings)
    members = plan(MEMBERS, seed=11)
    await setup(send, settings, members)
    answers = await fire(send, members)
    accepted = check_answers(members, answers)
    assert_varied(answers)
    # The plan is not degenerate: some members spend everything, some are refused outright.
    assert any(m.given == 0 for m in members) and any(m.given == 4 for m in members)
    assert any(len(m.lots) == 2 for m in members)

    await drain(ClaimWriter(redis, pool, fast(settings)))
    assert await backlog(redis) == 0
    await check_books(send, pool, redis, members, accepted)


# -- two serve workers and a writer, as processes ----------------------------------------------


def worker_connections(pid: int, port: int) -> int:
    """Established TCP connections to ``port`` held open by process ``pid``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


async def test_two_workers_deciding_at_once_never_overspend_and_the_writer_keeps_the_books(
    settings: Settings,
    redis: Redis,
    pool: asyncpg.Pool,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    log = tmp_path / "serve.log"
    env = {"CLAIM_RATE_MEMBER_PER_S": "0", "CLAIM_SHED_LAG_MS": "0"}
    server, ports = spawn_serve(settings, log, "--workers", "2", **env)
    procs.append(server)
    procs.append(spawn(settings, ["writer"], tmp_path / "writer.log", CLAIM_WRITER_BLOCK_MS="100"))
    members = plan(MEMBERS, seed=12)

    # Many connections at once: the kernel spreads connections (not requests) over workers.
    connector = aiohttp.TCPConnector(limit=MEMBERS)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def send(method: str, path: str, user: str | None, body: Any) -> tuple[int, Any]:
            token = mint_token(settings, user) if user is not None else settings.admin_token
            base = ports.admin if path.startswith("/admin/") else ports.base
            async with http.request(
                method, base + path, json=body, headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                return resp.status, await resp.json()

        await wait_ready(http, ports.base, ports.admin)
        await setup(send, settings, members)
        answers = await fire(send, members)
        workers = workers_of(server.pid)
        assert len(workers) == 2
        held = {pid: worker_connections(pid, ports.port) for pid in workers}
        assert all(held.values()), f"both workers took claims' connections: {held}"
        accepted = check_answers(members, answers)
        assert_varied(answers)

        total = sum(len(claims) for claims in accepted.values())

        async def written() -> bool:
            recorded = await pool.fetchval("SELECT count(*) FROM claims")
            return recorded == total and await backlog(redis) == 0

        await wait_for(written, within=30)
        await check_books(send, pool, redis, members, accepted)
    assert server.poll() is None
