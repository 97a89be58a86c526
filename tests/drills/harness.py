"""The fault drills' tools: a client that records every claim it was told succeeded, and an
audit that compares those promises with what PostgreSQL and Redis hold afterwards.

A drill opens benefit ``video`` (one direct-charge option ``iqiyi`` unless told otherwise,
quota 1 per member) on a running ``serve``, sends a burst in which every member claims once
and, a little later, tries a second claim with a new ``request_id`` (refused while Redis
remembers the first), injects its fault mid-burst, lets the system settle and audits:

- **sent**: HTTP requests sent (retries included);
- **acknowledged**: distinct claims answered ``202``/``200``;
- **rows**: claims of the benefit in PostgreSQL;
- **lost**: acknowledged, never persisted;
- **duplicated**: one request acknowledged under two claim ids, or persisted twice;
- **oversold**: claims holding a unit (acknowledged or persisted, not refunded) beyond stock;
- **over quota**: a member's claims holding a unit beyond their quota;
- **drift**: what ``claim-service reconcile`` reports for the benefit afterwards;
- and a drill's own ``checks``, counts that must be zero too (the points drill's ledger
  audit: points overspent, claims without their debit, debits without their claim…).

Scale: ``CLAIM_DRILL_SCALE=quick`` (the default, what CI runs) or ``full`` (``./run drills``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from claim_service.claims.writer import backlog
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.store.connections import create_redis
from claim_service.store.reconcile import Reconciler
from tests.helpers import (
    Listeners,
    admin,
    benefit_body,
    direct,
    member_token,
    spawn_serve,
    wait_ready,
)

BENEFIT = "video"
OPTION = "iqiyi"
QUOTA = 1
ACKED = (200, 202)
RETRIED = (429, 503)  # "not decided (yet), or not known": the same request is retried


@dataclass(frozen=True)
class Scale:
    members: int
    stock: int
    concurrency: int
    pg_outage_s: float
    redis_outage_s: float
    partner_outage_s: float
    points_members: int = 300  # the points drill: members each given 0..3 points


QUICK = Scale(
    members=500, stock=400, concurrency=24, pg_outage_s=4, redis_outage_s=2, partner_outage_s=2
)
FULL = Scale(
    members=6000,
    stock=4800,
    concurrency=64,
    pg_outage_s=30,
    redis_outage_s=10,
    partner_outage_s=15,
    points_members=4000,
)


def scale() -> Scale:
    name = os.environ.get("CLAIM_DRILL_SCALE", "quick")
    if name not in ("quick", "full"):
        raise ValueError(f"CLAIM_DRILL_SCALE must be quick or full, not {name!r}")
    return FULL if name == "full" else QUICK


# -- set-up ----------------------------------------------------------------------------------


async def open_benefit(
    http: aiohttp.ClientSession,
    ports: Listeners,
    settings: Settings,
    *,
    stock: int,
    members: int,
    option: dict[str, Any] | None = None,
    on_failure: str | None = None,
    quota: int = QUOTA,
    price_points: int = 0,
) -> None:
    """Benefit ``video`` open now with one option (costing ``price_points`` points), members
    u0.. at tier 5, through the admin API of a running ``serve``."""
    body = benefit_body(stock=stock, quota=quota, options=[option or direct(OPTION)])
    if on_failure is not None:
        body["on_failure"] = on_failure
    if price_points:
        body["price_points"] = price_points
    async with http.put(
        f"{ports.admin}/admin/v1/benefits/{BENEFIT}", headers=admin(settings), json=body
    ) as resp:
        assert resp.status == 201, await resp.text()
    tiers = [{"user_id": f"u{i}", "tier": 5} for i in range(members)]
    period = periods.current_period(settings.tz)
    async with http.put(
        f"{ports.admin}/admin/v1/tiers/{period}", headers=admin(settings), json=tiers
    ) as resp:
        assert resp.status == 200, await resp.text()


async def serve_release(
    settings: Settings,
    log: Path,
    procs: list[subprocess.Popen[bytes]],
    *args: str,
    **env: str,
) -> tuple[subprocess.Popen[bytes], Listeners]:
    """``serve`` (with ``args`` and ``env``) started and ready, benefit ``video`` open on it at
    the drill's scale."""
    size = scale()
    serve, ports = spawn_serve(settings, log, *args, **env)
    procs.append(serve)
    async with aiohttp.ClientSession() as http:
        await ready_unless_exited(serve, log, wait_ready(http, ports.base, ports.admin))
        await open_benefit(http, ports, settings, stock=size.stock, members=size.members)
    return serve, ports


async def ready_unless_exited(
    proc: subprocess.Popen[bytes], log: Path, ready: Awaitable[None]
) -> None:
    """Await ``ready``, but fail at once, with the end of ``log``, if ``proc`` exits first
    (a ``serve`` that refused to start)."""
    waiting = asyncio.ensure_future(ready)
    try:
        while not waiting.done():
            if proc.poll() is not None:
                tail = (await asyncio.to_thread(log.read_text, errors="replace"))[-3000:]
                raise AssertionError(f"exited ({proc.returncode}) before it was ready:\n{tail}")
            await asyncio.wait({waiting}, timeout=0.1)
        await waiting
    finally:
        waiting.cancel()


def claims_of(members: int, second_after: int = 50) -> Iterator[tuple[str, str]]:
    """Every member's first claim (``a``) and, ``second_after`` claims later, a second one
    with a new request id (``b``) that quota 1 must refuse."""
    for i in range(members):
        yield f"u{i}", "a"
        if i >= second_after:
            yield f"u{i - second_after}", "b"
    for i in range(max(0, members - second_after), members):
        yield f"u{i}", "b"


# -- the recording client --------------------------------------------------------------------


@dataclass
class Answer:
    at: float  # monotonic, when sent
    elapsed: float
    status: int  # 0: no HTTP answer (connection refused or reset, client timeout)


@dataclass
class Record:
    """Everything the members were told."""

    sent: int = 0
    answers: list[Answer] = field(default_factory=list)
    acks: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    finals: Counter[int] = field(default_factory=Counter)
    unanswered: int = 0  # requests still undecided when the client gave up

    @property
    def acknowledged(self) -> dict[str, str]:
        """Claim id -> member, for every claim a member was told succeeded."""
        return {cid: user for (user, _), ids in self.acks.items() for cid in ids}

    def statuses(self, since: float = 0.0, until: float = float("inf")) -> Counter[int]:
        return Counter(a.status for a in self.answers if since <= a.at < until)


class RecordingClient:
    """Claims as a member's app does: each request retried with the same ``request_id``
    after a 503 or a broken connection until it has a final answer."""

    def __init__(
        self,
        base: str,
        settings: Settings,
        *,
        request_timeout_s: float = 10.0,
        give_up_s: float = 120.0,
        retry_pause_s: float = 0.05,
    ) -> None:
        self.base = base
        self.settings = settings
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self.give_up_s = give_up_s
        self.retry_pause_s = retry_pause_s
        self.record = Record()
        self.body: dict[str, Any] = {"option_id": OPTION}
        self._tokens: dict[str, str] = {}

    def _headers(self, user: str) -> dict[str, str]:
        token = self._tokens.get(user)
        if token is None:
            token = self._tokens[user] = member_token(self.settings, user)
        return {"Authorization": f"Bearer {token}"}

    async def once(self, http: aiohttp.ClientSession, user: str, request_id: str) -> int:
        record = self.record
        body = {**self.body, "request_id": request_id, "account": f"acct-{user}"}
        started = time.monotonic()
        record.sent += 1
        status, payload = 0, None
        try:
            async with http.post(
                f"{self.base}/v1/benefits/{BENEFIT}/claims",
                json=body,
                headers=self._headers(user),
                timeout=self.timeout,
            ) as resp:
                status = resp.status
                payload = await resp.json() if status in ACKED else None
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        record.answers.append(Answer(started, time.monotonic() - started, status))
        if payload is not None:
            record.acks[(user, request_id)].add(str(payload["claim_id"]))
        return status

    async def claim(self, http: aiohttp.ClientSession, user: str, request_id: str) -> int:
        """Until a final answer (or ``give_up_s``); returns the final status, 0 if none."""
        deadline = time.monotonic() + self.give_up_s
        while True:
            status = await self.once(http, user, request_id)
            if status not in (0, *RETRIED):
                self.record.finals[status] += 1
                return status
            if time.monotonic() > deadline:
                self.record.unanswered += 1
                return 0
            await asyncio.sleep(self.retry_pause_s)

    async def burst(self, claims: Sequence[tuple[str, str]], concurrency: int) -> None:
        pending = iter(claims)
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def member_after_member() -> None:
                for user, request_id in pending:
                    await self.claim(http, user, request_id)

            await asyncio.gather(*(member_after_member() for _ in range(concurrency)))

    async def acknowledged_at_least(self, n: int, within: float = 60.0) -> None:
        async def enough() -> bool:
            return len(self.record.acks) >= n

        await until(enough, within, "acknowledgements")


async def until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {within:.0f}s for {what}")
        await asyncio.sleep(0.05)


# -- the audit -------------------------------------------------------------------------------


@dataclass
class DrillReport:
    drill: str
    sent: int
    acknowledged: int
    rows: int
    lost: int
    duplicated: int
    oversold: int
    over_quota: int
    drift: int
    unchecked: int = 0  # benefits reconcile could not compare (not live on that Redis)
    checks: dict[str, int] = field(default_factory=dict)  # a drill's own, must be 0 too
    notes: dict[str, Any] = field(default_factory=dict)

    COUNTS = ("lost", "duplicated", "oversold", "over_quota", "drift", "unchecked")

    @property
    def failures(self) -> dict[str, int]:
        found = {name: getattr(self, name) for name in self.COUNTS if getattr(self, name)}
        return found | {name: n for name, n in self.checks.items() if n}

    def line(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (self.checks | self.notes).items())
        return (
            f"{self.drill}: sent={self.sent} acknowledged={self.acknowledged} rows={self.rows}"
            f" lost={self.lost} duplicated={self.duplicated} oversold={self.oversold}"
            f" over_quota={self.over_quota} drift={self.drift}"
            + (f" unchecked={self.unchecked}" if self.unchecked else "")
            + extra
        )


REPORTS: list[DrillReport] = []  # printed at the end of the run (tests/drills/conftest.py)


async def drained(redis_url: str, within: float = 60.0) -> None:
    """Every accepted claim in the streams written to PostgreSQL."""
    redis = await create_redis(redis_url)
    try:

        async def empty() -> bool:
            return await backlog(redis) == 0

        await until(empty, within, "the writer to drain the streams")
    finally:
        await redis.aclose()


async def audit(
    drill: str,
    record: Record,
    pool: asyncpg.Pool,
    settings: Settings,
    redis_url: str,
    *,
    stock: int,
    quota: int = QUOTA,
    checks: dict[str, int] | None = None,
    notes: dict[str, Any] | None = None,
) -> DrillReport:
    """The audit of one drill, recorded for the table at the end of the run and printed;
    ``checks`` (counts that must be zero) and ``notes`` are the drill's own."""
    rows = await pool.fetch(
        "SELECT claim_id, user_id, request_id, status FROM claims WHERE benefit_id = $1",
        BENEFIT,
    )
    persisted = {r["claim_id"] for r in rows}
    acknowledged = record.acknowledged
    duplicated = sum(len(ids) - 1 for ids in record.acks.values())
    duplicated += len(rows) - len({(r["user_id"], r["request_id"]) for r in rows})
    refunded = {r["claim_id"] for r in rows if r["status"] == "refunded"}
    holders = {r["claim_id"]: r["user_id"] for r in rows} | acknowledged
    holding = {cid: user for cid, user in holders.items() if cid not in refunded}
    per_member = Counter(holding.values())
    redis = await create_redis(redis_url)
    try:
        compared = await Reconciler(pool, redis, settings).check_all()
    finally:
        await redis.aclose()
    report = DrillReport(
        drill=drill,
        sent=record.sent,
        acknowledged=len(acknowledged),
        rows=len(rows),
        lost=len(set(acknowledged) - persisted),
        duplicated=duplicated,
        oversold=max(0, len(holding) - stock),
        over_quota=sum(max(0, n - quota) for n in per_member.values()),
        drift=sum(len(check.drift) for check in compared),
        unchecked=sum(1 for check in compared if not check.live),
        checks=dict(checks or {}),
        notes=dict(notes or {}),
    )
    REPORTS.append(report)
    print(report.line())
    return report
