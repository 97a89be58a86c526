"""The claim path under each ``CLAIM_DURABILITY`` mode, set against ``none`` in the same run
(see ``METHOD``)."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import redis as redis_sync
from redis.asyncio import Redis

from claim_service.claims.decisions import ClaimRequest
from claim_service.claims.durability import check_server
from claim_service.claims.engine import ClaimEngine
from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.local.embedded import EmbeddedValkey
from claim_service.store import catalogue_store
from claim_service.store.connections import create_redis
from claim_service.store.recovery import Recovery
from claim_service.store.tiers import save_tiers

OPTION = "iqiyi"
STOCK = 1_000_000
REPLICA_SYNC_TIMEOUT_S = 30.0
STREAMS = 8  # sustained load: this many bursts in flight at once, each resent when answered
SUSTAINED_BURST = 64
MEMBER_TIER = 5
METHOD = (
    "Each mode gets a Valkey of its own, started by the benchmark on this machine and set up "
    "as the mode requires (`replica`'s with a replica started here too); the same engine code "
    "decides claims on each: one claim alone, and bursts of concurrent claims (one batch "
    "each), one burst at a time; and a sustained load: "
    f"{STREAMS} streams of bursts, each sending its next burst as soon as the last is "
    "answered, so that several batches are in flight while one waits for its fsync (what a "
    "release looks like: claims keep arriving while earlier ones are confirmed). The modes "
    "take turns within each repeat, so they share the machine's conditions; every claim comes "
    "from a member who has not claimed that benefit yet."
)


@dataclass(frozen=True)
class Case:
    key: str
    mode: str
    appendfsync: str
    replicas: int
    server: str  # how its Valkey is set up, for the report


CASES = (
    Case("none", "none", "everysec", 0, "AOF fsynced every second (the embedded default)"),
    Case("none_always", "none", "always", 0, "AOF fsynced on every write"),
    Case("local", "local", "always", 0, "AOF fsynced on every write"),
    Case("replica", "replica", "always", 1, "AOF fsynced on every write, 1 replica (no AOF)"),
)


@dataclass
class Measured:
    """One mode's samples (µs per claim) and counts, warm-up rounds included in the counts."""

    case: Case
    engine: ClaimEngine
    redis: Redis
    benefit_id: str
    lone: list[float] = field(default_factory=list)
    bursts: dict[int, list[float]] = field(default_factory=dict)
    sustained: list[float] = field(default_factory=list)
    accepted: int = 0
    sent: int = 0
    waits: int = 0  # WAITAOF the server ran
    batches: int = 0

    def request(self, n: int) -> list[ClaimRequest]:
        start, self.sent = self.sent, self.sent + n
        return [
            ClaimRequest(self.benefit_id, _member(i), f"r{i}", OPTION)
            for i in range(start, start + n)
        ]


@dataclass(frozen=True)
class Workload:
    repeats: int
    lone_claims: int
    bursts: int
    burst_sizes: tuple[int, ...]

    def members_needed(self) -> int:
        per_round = self.lone_claims + self.bursts * (
            sum(self.burst_sizes) + STREAMS * SUSTAINED_BURST
        )
        return (self.repeats + 1) * per_round


async def measure(
    settings: Settings, pg: asyncpg.Pool, redis: Redis, work: Workload, members: int
) -> list[Measured]:
    """Every case, interleaved repeat by repeat (the first round is a warm-up). ``members``
    already have tiers (``redis`` is the main benchmark's server); the rest are added."""
    period = periods.current_period(settings.tz)
    extra = range(members, work.members_needed())
    await save_tiers(pg, redis, period, [(_member(i), MEMBER_TIER) for i in extra])
    async with _servers(settings, pg) as runs:
        for round_ in range(work.repeats + 1):
            turn = round_ % len(runs)  # who goes first changes from round to round
            for run in runs[turn:] + runs[:turn]:
                lone = await _lone(run, work.lone_claims)
                bursts = {s: await _bursts(run, s, work.bursts) for s in work.burst_sizes}
                sustained = await _sustained(run, SUSTAINED_BURST, work.bursts)
                if round_ == 0:
                    continue
                run.lone.append(lone)
                run.sustained.append(sustained)
                for size, sample in bursts.items():
                    run.bursts.setdefault(size, []).append(sample)
            print(f"  durability round {round_}", file=sys.stderr, flush=True)
        for run in runs:
            run.batches = run.engine.batches
            stats = await run.redis.info("commandstats")
            run.waits = int(stats.get("cmdstat_waitaof", {}).get("calls", 0))
    return runs


async def _lone(run: Measured, n: int) -> float:
    requests = run.request(n)
    start = time.perf_counter()
    for request in requests:
        run.accepted += (await run.engine.claim(request)).accepted
    return (time.perf_counter() - start) * 1e6 / n


async def _bursts(run: Measured, size: int, bursts: int) -> float:
    elapsed = 0.0
    for _ in range(bursts):
        requests = run.request(size)
        start = time.perf_counter()
        decisions = await asyncio.gather(*(run.engine.claim(r) for r in requests))
        elapsed += time.perf_counter() - start
        run.accepted += sum(d.accepted for d in decisions)
    return elapsed * 1e6 / (bursts * size)


async def _sustained(run: Measured, size: int, bursts: int) -> float:
    async def stream() -> None:
        for _ in range(bursts):
            requests = run.request(size)
            decisions = await asyncio.gather(*(run.engine.claim(r) for r in requests))
            run.accepted += sum(d.accepted for d in decisions)

    start = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(STREAMS)))
    return (time.perf_counter() - start) * 1e6 / (STREAMS * bursts * size)


@asynccontextmanager
async def _servers(settings: Settings, pg: asyncpg.Pool) -> AsyncIterator[list[Measured]]:
    root = Path(tempfile.mkdtemp(prefix="claim-bench-durability-"))
    servers: list[EmbeddedValkey] = []
    runs: list[Measured] = []
    try:
        for case in CASES:
            master = EmbeddedValkey(root / case.key, appendfsync=case.appendfsync,
                                    extra=("--repl-diskless-sync-delay", "0"))  # fmt: skip
            servers.append(master)
            master.start()
            for i in range(case.replicas):
                replica = EmbeddedValkey(root / f"{case.key}-replica{i}", ephemeral=True)
                replica.replica_of = master.port
                servers.append(replica)
                replica.start()
            _wait_for_replicas(master.port, case.replicas)
            redis = await create_redis(master.url)
            local = replace(settings, redis_url=master.url, durability=case.mode)
            await check_server(redis, local)  # the server honours the mode
            runs.append(await _open_benefit(local, pg, redis, case))
        yield runs
    finally:
        for run in runs:
            await run.redis.aclose()
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _open_benefit(settings: Settings, pg: asyncpg.Pool, redis: Redis, case: Case) -> Measured:
    benefit_id = f"bench-{case.key}-{int(time.time())}"
    opens = datetime.now(UTC) - timedelta(minutes=1)
    body = {
        "name": f"claim-path benchmark, durability {case.mode}",
        "min_tier": 4,
        "quota": [{"min_tier": 4, "per_period": 1}],
        "stock_per_period": STOCK,
        "release": {"type": "once", "opens_at": opens.isoformat()},
        "options": [{"option_id": OPTION, "name": "iQiyi", "kind": "direct_charge",
                     "partner": "iqiyi", "sku": "IQY-M1"}],
    }  # fmt: skip
    benefit = parse_benefit(benefit_id, body, settings.tz)
    await catalogue_store.push_benefit(redis, await catalogue_store.save_benefit(pg, benefit))
    # Live on this server (tiers mirrored from PostgreSQL) before the clock starts.
    await Recovery(pg, redis, settings).ensure_benefit(benefit_id)
    return Measured(case, ClaimEngine(redis, settings, pool=pg), redis, benefit_id)


def _member(i: int) -> str:
    return f"bench-m{i:07d}"  # the main benchmark's members, with more if needed


def _wait_for_replicas(port: int, wanted: int) -> None:
    deadline = time.monotonic() + REPLICA_SYNC_TIMEOUT_S
    with redis_sync.Redis(port=port) as client:
        while True:
            info = client.info("replication")
            online = sum(isinstance(v, dict) and v.get("state") == "online" for v in info.values())
            if online >= wanted:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the benchmark's replica did not sync")
            time.sleep(0.05)


def render(runs: list[Measured], work: Workload) -> str:
    """The report's durability section: a table and what it says."""
    base = runs[0]
    sizes = work.burst_sizes
    head = "| mode | its Valkey | 1 claim alone | " + " | ".join(
        f"{s} concurrent, per claim" for s in sizes
    )
    head += f" | sustained, {STREAMS} × {SUSTAINED_BURST} in flight, per claim"
    lines = [
        "## Durable acknowledgement (`CLAIM_DURABILITY`)",
        "",
        METHOD + f" Medians of {work.repeats} repeats after a warm-up round; in brackets the "
        "throughput relative to `none` on the default server (1/time per claim).",
        "",
        head + " | accepted / sent | WAITAOF per batch |",
        "|---|---|---:|" + "---:|" * (len(sizes) + 1) + "---:|---:|",
    ]
    for run in runs:
        cells = [_cell(run.lone, base.lone)]
        cells += [_cell(run.bursts[s], base.bursts[s]) for s in sizes]
        cells.append(_cell(run.sustained, base.sustained))
        waits = f"{run.waits / run.batches:.2f}" if run.batches else "–"
        flag = "" if run.accepted == run.sent else " **(!)**"
        lines.append(
            f"| `{run.case.mode}` | {run.case.server} | {' | '.join(cells)} | "
            f"{run.accepted:,} / {run.sent:,}{flag} | {waits} |"
        )
    lines += ["", " ".join(_reading(runs, sizes)), ""]
    return "\n".join(lines)


def _cell(samples: list[float], base: list[float]) -> str:
    median = statistics.median(samples)
    return f"{median:,.1f} µs ({statistics.median(base) / median:.2f}×)"


def _samples(run: Measured, what: int | str) -> list[float]:
    """A burst size's samples, or ``"lone"``'s or ``"sustained"``'s."""
    if isinstance(what, int):
        return run.bursts[what]
    return run.lone if what == "lone" else run.sustained


def _reading(runs: list[Measured], sizes: tuple[int, ...]) -> list[str]:
    by = {run.case.key: run for run in runs}

    def vs_none(key: str, what: int | str) -> float:
        return statistics.median(_samples(by["none"], what)) / statistics.median(
            _samples(by[key], what)
        )

    size, big = sizes[0], sizes[-1]
    local = vs_none("local", "sustained")
    lone = statistics.median(by["local"].lone) - statistics.median(by["none"].lone)
    out = [
        f"One burst of {size} at a time (each batch waits for its confirmation before the next "
        f"is sent), `local` decides {vs_none('local', size):.2f}× the claims per second of "
        f"`none` and `replica` {vs_none('replica', size):.2f}×, while `none` on a server that "
        f"fsyncs every write runs at {vs_none('none_always', size):.2f}×: the server's fsync "
        "is that part of the cost, the round trip of the wait the rest.",
        f"Under sustained load ({STREAMS} × {SUSTAINED_BURST} in flight, batches overlapping "
        f"while one waits) `local` runs at {local:.2f}× of `none` "
        f"({'meeting' if local >= 0.9 else 'missing'} the 0.9× target) and `replica` at "
        f"{vs_none('replica', 'sustained'):.2f}×; set against `none` on a server that fsyncs "
        f"every write too, `local` runs at {local / vs_none('none_always', 'sustained'):.2f}×: "
        "what the wait itself costs, the server's fsync aside.",
        f"A claim decided alone waits {lone:,.0f} µs longer under `local` than under `none`: it "
        "is a batch of its own and pays an fsync and a round trip by itself.",
        f"WAITAOF ran {by['local'].waits / max(by['local'].batches, 1):.2f} times per batch "
        "under `local`: one fsync confirmation serves a whole batch, however many claims it "
        "holds.",
    ]
    if big != size:
        out.append(
            f"With {big} in flight in one batch: `local` {vs_none('local', big):.2f}×, "
            f"`replica` {vs_none('replica', big):.2f}× of `none`."
        )
    return out
