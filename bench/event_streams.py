"""``./run bench event-streams``: a worker holding thousands of idle Server-Sent Events
streams (``GET /v1/benefits/{id}/events``) still answers claims, in bounded memory, and pushes
every change of the benefit to every stream.

One ``serve --workers 1`` and a ``writer`` on 127.0.0.1, on embedded Valkey and PostgreSQL
(or the servers named by ``CLAIM_REDIS_URL`` and ``CLAIM_DATABASE_URL`` when both are set),
two benefits open with plenty of stock, members with tiers. In order, in one run:

1. baseline: the worker idle (CPU, ``/healthz`` answer time), then claims paced at a fixed
   rate (open loop, each by a member who has not claimed, sent by a process of their own)
   with no stream open;
2. the streams opened from this process (aiohttp, a window of openings in flight), each
   counted once it answered 200 and sent its first ``state``; one more past
   ``CLAIM_MAX_EVENT_STREAMS``; the worker over a heartbeat period with the streams idle;
3. the same claim load with the streams open and idle (the watched benefit's stock is large
   enough that the claims cross no feed stock step: nothing is pushed but heartbeats);
4. the same claim load, on a second benefit, while the watched one is paused and resumed
   through the admin API over and over: how many streams received each ``paused`` /
   ``open``, how long after the request, and what each broadcast cost the worker;
5. the streams closed, then opened again at once (clients reconnecting; a refused one
   retries after the server's ``retry:`` hint, as an ``EventSource`` does), then closed.

The worker's RSS and open files are read from ``/proc`` at each step. The report (in the run
folder ``bench/runs/<time>-event-streams/``, and ``bench/results/event_streams.md`` with
``--record``) sets every figure with streams against the same one without, from this run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import orjson
import uvloop

from bench.peak.report import _commit as head_commit
from bench.peak.stack import Service, Stack, log_warnings
from bench.report import machine
from claim_service.claims.live import HEARTBEAT_S, MIN_GAP_S, STOCK_STEPS
from claim_service.config import Settings
from claim_service.http.auth import mint_token
from claim_service.http.events import RETRY_MS
from claim_service.http.server import file_limit
from claim_service.local.embedded import EmbeddedServers, die_with_parent

BENCH = Path(__file__).resolve().parent
BENEFIT = "es-bench"  # the one the streams watch
OTHER = "es-other"  # claimed while BENEFIT is paused and resumed
OPTION = "iqiyi"
OPEN_WINDOW = 100  # openings in flight: under the listen backlog, so none is dropped
OPEN_DEADLINE_S = 60.0  # a stream not open by then (retries included) counts as failed
BROADCAST_WAIT_S = 15.0
BROADCAST_GAP_S = 1.0
SETTLE_S = 2.0
PROBE_EVERY_S = 0.02
CLAIM_CONNECTIONS = 64
WARM_S = 2  # claims on each benefit before any measured: caches, pools, scripts


@dataclass(frozen=True)
class Plan:
    streams: int
    claim_rate: int  # claims a second, open loop
    claim_s: int
    quick: bool

    @property
    def claims(self) -> int:
        return self.claim_rate * self.claim_s

    @property
    def stock(self) -> int:
        # A feed stock step is a STOCK_STEPS-th of the stock: two claim loads stay within one
        # step, so the streams stay idle while claims are made on the benefit they watch.
        return 3 * self.claims * STOCK_STEPS


FULL = Plan(streams=10_000, claim_rate=300, claim_s=20, quick=False)
QUICK = Plan(streams=1_000, claim_rate=200, claim_s=5, quick=True)
PHASES = {
    "none": "no stream (baseline)",
    "idle": "streams open, idle",
    "broadcasts": "streams open, broadcasts",
}


@dataclass
class Stream:
    """One member's event stream, as this client saw it."""

    token: str
    ready: asyncio.Future[None]
    status: int | None = None
    error: str | None = None
    refused: int = 0  # 503 answers retried
    refused_as: str | None = None  # the error code of the first
    open_s: float | None = None  # first request -> first ``state``
    seqs: list[tuple[int, str]] = field(default_factory=list)
    last_at: dict[str, float] = field(default_factory=dict)
    keepalives: int = 0
    ended: bool = False

    @property
    def live(self) -> bool:
        return self.open_s is not None and not self.ended


@dataclass
class ClaimRun:
    latencies: list[float] = field(default_factory=list)  # seconds
    late: list[float] = field(default_factory=list)  # sent after its due time, seconds
    outcomes: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0


@dataclass
class Idle:
    seconds: float
    cpu_share: float  # of one core
    probes: list[float]
    keepalives: int


@dataclass
class Opening:
    wanted: int
    streams: list[Stream]
    wall_s: float

    @property
    def opened(self) -> list[Stream]:
        return [s for s in self.streams if s.open_s is not None]


@dataclass
class Broadcast:
    round: int
    event: str
    live: int
    delays: list[float]  # admin request sent -> event read by the stream
    cpu_s: float  # the worker's CPU time from the request to the last stream reading it


@dataclass
class Results:
    plan: Plan
    command: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    load_before: tuple[float, float, float] = field(default_factory=os.getloadavg)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    wall_s: float = 0.0
    embedded: bool = True
    valkey: str = "?"
    postgres: str = "?"
    pid: int = 0
    samples: list[tuple[str, int, int]] = field(default_factory=list)  # label, RSS KiB, fds
    peak_rss_kib: int = 0
    rss_before_kib: int = 0  # no stream, after the baseline claims
    rss_streams_kib: int = 0  # the streams open and idle
    idle: dict[str, Idle] = field(default_factory=dict)
    claims: dict[str, ClaimRun] = field(default_factory=dict)
    openings: list[Opening] = field(default_factory=list)
    past_cap: str = "?"
    idle_pushed: Counter[str] = field(default_factory=Counter)  # events during idle claims
    gaps: int = 0
    broadcasts: list[Broadcast] = field(default_factory=list)
    warnings: Counter[str] = field(default_factory=Counter)


def say(message: str) -> None:
    print(f"[event-streams {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def worker_pid(serve_pid: int) -> int:
    """The process answering: a ``serve --workers N`` child running ``spawn_main`` (found as
    ``tests/helpers.workers_of`` finds them), or ``serve`` itself, which with one worker
    serves in its own process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == serve_pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            return int(entry.name)
    return serve_pid


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found["VmRSS"], found["VmHWM"]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class EventStreamsBench:
    sse: aiohttp.ClientSession  # the streams: one connection each

    def __init__(self, stack: Stack, svc: Service, plan: Plan, results: Results) -> None:
        self.stack, self.svc, self.plan, self.results = stack, svc, plan, results
        self.pid = worker_pid(svc.proc.pid)
        self.url = f"{svc.base}/v1/benefits/{BENEFIT}/events"
        self.admin = {"Authorization": f"Bearer {stack.settings.admin_token}"}
        self.members = [f"es-c{i:06d}" for i in range(3 * plan.claims)]
        self.warm = [f"es-w{i:06d}" for i in range(2 * WARM_S * plan.claim_rate)]
        self.streams: list[Stream] = []
        self.tasks: list[asyncio.Task[None]] = []

    @contextlib.asynccontextmanager
    async def sessions(self) -> AsyncIterator[None]:
        streams = aiohttp.TCPConnector(limit=0)  # one connection per stream, no cap
        forever = aiohttp.ClientTimeout(total=None, sock_connect=30)
        async with aiohttp.ClientSession(connector=streams, timeout=forever) as self.sse:
            yield

    async def setup(self) -> None:
        opens = datetime.now(UTC) - timedelta(minutes=1)
        for benefit, stock in ((BENEFIT, self.plan.stock), (OTHER, 2 * self.plan.claims)):
            body = {
                "name": "event-streams benchmark", "min_tier": 4,
                "quota": [{"min_tier": 4, "per_period": 1}], "stock_per_period": stock,
                "release": {"type": "once", "opens_at": opens.isoformat()},
                "options": [{"option_id": OPTION, "name": "iQiyi", "kind": "direct_charge",
                             "partner": "iqiyi", "sku": "IQY-M1"}],
            }  # fmt: skip
            await self.stack.put_benefit(self.svc, benefit, body)
        await self.stack.put_tiers(self.svc, [(m, 5) for m in self.members + self.warm])

    def sample(self, label: str) -> int:
        """Note the worker's RSS (returned, KiB) and open files."""
        rss, hwm = memory_kib(self.pid)
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        self.results.samples.append((label, rss, fds))
        self.results.peak_rss_kib = max(self.results.peak_rss_kib, hwm)
        say(f"{label}: RSS {rss / 1024:.1f} MiB, {fds} open files")
        return rss

    async def run(self) -> None:
        r, plan = self.results, self.plan
        r.pid = self.pid
        self.sample("started, benefits and tiers set up")
        say("warm-up claims, then the baseline: idle, then claims with no stream")
        half = len(self.warm) // 2
        await self.claims(BENEFIT, self.warm[:half])
        await self.claims(OTHER, self.warm[half:])
        r.idle["none"] = await self.idle(5.0)
        c = plan.claims
        r.claims["none"] = await self.claims(BENEFIT, self.members[:c])
        r.rss_before_kib = self.sample("after the baseline claims, no stream open")
        say(f"opening {plan.streams:,} streams")
        r.openings.append(await self.open_streams())
        await asyncio.sleep(SETTLE_S)
        r.rss_streams_kib = self.sample(f"{plan.streams:,} streams open, idle")
        r.past_cap = await self.past_cap()
        r.idle["streams"] = await self.idle(HEARTBEAT_S + 1)
        self.sample(f"after a heartbeat period ({HEARTBEAT_S:.0f} s) with the streams idle")
        say("claims with the streams open and idle")
        marks = [len(s.seqs) for s in self.streams]
        r.claims["idle"] = await self.claims(BENEFIT, self.members[c : 2 * c])
        for stream, mark in zip(self.streams, marks, strict=True):
            r.idle_pushed.update(name for _, name in stream.seqs[mark:])
        self.sample("after the claims with the streams idle")
        say("claims on another benefit while the watched one is paused and resumed")
        r.claims["broadcasts"] = await self.claims(
            OTHER, self.members[2 * c :], alongside=self.broadcast_rounds
        )
        self.sample("after the claims during broadcasts")
        r.gaps = sum(_has_gap(s) for s in self.streams if s.open_s is not None)
        await self.close_streams()
        await asyncio.sleep(SETTLE_S)
        self.sample("streams closed")
        say(f"reopening {plan.streams:,} streams at once")
        r.openings.append(await self.open_streams())
        await asyncio.sleep(SETTLE_S)
        self.sample(f"{plan.streams:,} streams reopened, idle")
        await self.close_streams()
        await asyncio.sleep(SETTLE_S)
        self.sample("streams closed again")

    # -- the worker idle -----------------------------------------------------------------

    async def idle(self, seconds: float) -> Idle:
        keepalives = sum(s.keepalives for s in self.streams)
        cpu0, t0 = cpu_s(self.pid), time.perf_counter()
        probes = await self.probe(seconds)
        share = (cpu_s(self.pid) - cpu0) / (time.perf_counter() - t0)
        return Idle(seconds, share, probes, sum(s.keepalives for s in self.streams) - keepalives)

    async def probe(self, seconds: float) -> list[float]:
        """``GET /healthz`` answer times, one after another, for ``seconds``: how long the
        worker's loop keeps a request waiting."""
        found: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            async with self.stack.http.get(self.svc.base + "/healthz") as resp:
                await resp.read()
            found.append(time.perf_counter() - t0)
            await asyncio.sleep(PROBE_EVERY_S)
        return found

    # -- claims --------------------------------------------------------------------------

    async def claims(
        self,
        benefit: str,
        members: list[str],
        alongside: Callable[[asyncio.Event], Awaitable[None]] | None = None,
    ) -> ClaimRun:
        """``members`` claim ``benefit`` at ``plan.claim_rate`` a second, sent by a process of
        their own (``send_claims``), so that this one reading thousands of streams does not
        delay them; ``alongside`` runs from the first claim until the last is answered."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.event_streams", cwd=BENCH.parent,
            env=self.stack.env(), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=1 << 24, preexec_fn=die_with_parent,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        url = f"{self.svc.base}/v1/benefits/{benefit}/claims"
        try:
            spec = {"url": url, "members": members, "rate": self.plan.claim_rate}
            proc.stdin.write(orjson.dumps(spec) + b"\n")
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise RuntimeError(f"the claim process did not start: {line!r}")
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            done = asyncio.Event()
            side = asyncio.ensure_future(alongside(done)) if alongside else None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 3 * self.plan.claim_s + 60)
            finally:
                done.set()
                if side is not None:
                    await side
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        data = orjson.loads(line)
        return ClaimRun(data["latencies"], data["late"], Counter(data["outcomes"]), data["wall_s"])

    # -- streams -------------------------------------------------------------------------

    async def open_streams(self) -> Opening:
        """``plan.streams`` streams, ``OPEN_WINDOW`` attempts in flight; returns once each
        sent its first ``state`` or gave up."""
        loop = asyncio.get_running_loop()
        tokens = [mint_token(self.stack.settings, f"es-s{i:06d}") for i in range(self.plan.streams)]
        window = asyncio.Semaphore(OPEN_WINDOW)
        self.streams = [Stream(token, loop.create_future()) for token in tokens]
        started = time.perf_counter()
        self.tasks = [asyncio.create_task(self.hold(s, window)) for s in self.streams]
        await asyncio.wait([s.ready for s in self.streams], timeout=OPEN_DEADLINE_S + 30)
        opening = Opening(self.plan.streams, self.streams, time.perf_counter() - started)
        say(f"{len(opening.opened):,} of {self.plan.streams:,} open in {opening.wall_s:.1f} s")
        return opening

    async def hold(self, stream: Stream, window: asyncio.Semaphore) -> None:
        """Open ``stream`` (retrying a 503 after the server's ``retry:`` hint until
        ``OPEN_DEADLINE_S``) and read its events until cancelled or cut off. An attempt
        holds a place in ``window`` until its answer (its first event when 200)."""
        headers = {"Authorization": f"Bearer {stream.token}", "Accept": "text/event-stream"}
        started: float | None = None
        try:
            while True:
                await window.acquire()
                held = [True]

                def let_go(held: list[bool] = held) -> None:
                    if held[0]:
                        held[0] = False
                        window.release()

                started = started or time.perf_counter()
                try:
                    async with self.sse.get(self.url, headers=headers) as resp:
                        stream.status = resp.status
                        if resp.status == 200:
                            await self.read(stream, resp, started, let_go)
                            return
                        stream.error = _error_code(await resp.read())
                finally:
                    let_go()
                if resp.status != 503 or time.perf_counter() - started > OPEN_DEADLINE_S:
                    return
                stream.refused += 1
                stream.refused_as = stream.refused_as or stream.error
                await asyncio.sleep(RETRY_MS / 1000)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            stream.error = type(exc).__name__
        finally:
            stream.ended = True
            if not stream.ready.done():
                stream.ready.set_result(None)

    async def read(
        self,
        stream: Stream,
        resp: aiohttp.ClientResponse,
        started: float,
        opened: Callable[[], None],
    ) -> None:
        seq, name = 0, ""
        async for raw in resp.content:
            line = raw.rstrip(b"\r\n")
            if line.startswith(b"id: "):
                seq = int(line[4:])
            elif line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b":"):
                stream.keepalives += 1
            elif not line and name:  # the end of an event
                now = time.perf_counter()
                stream.seqs.append((seq, name))
                stream.last_at[name] = now
                if stream.open_s is None and name == "state":
                    stream.open_s = now - started
                    stream.error = None
                    stream.ready.set_result(None)
                    opened()
                name = ""
        stream.error = "ended by the server"

    async def past_cap(self) -> str:
        """The answer to one more stream than the worker may hold."""
        token = mint_token(self.stack.settings, "es-past-cap")
        headers = {"Authorization": f"Bearer {token}"}
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            async with self.stack.http.get(self.url, headers=headers, timeout=timeout) as resp:
                if resp.status == 200:
                    return "200 (accepted)"
                return f"{resp.status} {_error_code(await resp.read())}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__

    async def close_streams(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    # -- broadcasts ----------------------------------------------------------------------

    async def broadcast_rounds(self, done: asyncio.Event) -> None:
        """Pause and resume ``BENEFIT``, each change waited for on every stream, until
        ``done`` (it ends resumed)."""
        round_ = 0
        while not done.is_set():
            round_ += 1
            for action, event in (("pause", "paused"), ("resume", "open")):
                self.results.broadcasts.append(await self.broadcast(round_, action, event))
                await asyncio.sleep(BROADCAST_GAP_S)

    async def broadcast(self, round_: int, action: str, event: str) -> Broadcast:
        live = [s for s in self.streams if s.live]
        url = f"{self.svc.admin}/admin/v1/benefits/{BENEFIT}/{action}"
        cpu0, t0 = cpu_s(self.pid), time.perf_counter()
        async with self.stack.http.post(url, headers=self.admin) as resp:
            if resp.status != 200:
                raise RuntimeError(f"POST {url}: {resp.status} {await resp.text()}")
        deadline = t0 + BROADCAST_WAIT_S
        got: list[float] = []
        while time.perf_counter() < deadline:
            got = [s.last_at[event] - t0 for s in live if s.last_at.get(event, 0.0) > t0]
            if len(got) == len(live):
                break
            await asyncio.sleep(0.01)
        cpu = cpu_s(self.pid) - cpu0
        shown = f"p50 {_pct(got, 0.5) * 1000:.0f} ms" if got else "none"
        say(f"{event} (round {round_}): {len(got):,} of {len(live):,} streams, {shown}, "
            f"worker CPU {cpu:.2f} s")  # fmt: skip
        return Broadcast(round_, event, len(live), got, cpu)


def _error_code(body: bytes) -> str:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return str(orjson.loads(body).get("error"))
    return body[:60].decode(errors="replace")


def _has_gap(stream: Stream) -> bool:
    """An event missing between two this stream received (a fresh ``state`` may skip)."""
    pairs = zip(stream.seqs, stream.seqs[1:], strict=False)
    return any(b != a + 1 and name != "state" for (a, _), (b, name) in pairs)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


# -- the report ----------------------------------------------------------------------------


def checks(r: Results) -> list[tuple[str, bool, str]]:
    """(what, held, what was seen) for each acceptance figure of the run."""
    n, c = r.plan.streams, r.plan.claims
    first, again = r.openings[0], r.openings[-1]
    missed = [b for b in r.broadcasts if len(b.delays) < b.live]
    refused = sum(s.refused > 0 for s in again.streams)
    pushed = ", ".join(f"{k}: {v:,}" for k, v in r.idle_pushed.items()) or "none"
    return [
        (f"{n:,} streams open (200 and a first `state`)", len(first.opened) == n,
         f"{len(first.opened):,} of {n:,}"),
        ("one stream past the cap refused 503 `too_many_streams`",
         r.past_cap == "503 too_many_streams", r.past_cap),
        *((f"every claim answered 202: {PHASES[k]}", run.outcomes == Counter({"202": c}),
           _outcomes(run)) for k, run in r.claims.items()),
        ("the streams idle during the idle claim load (nothing pushed)", not r.idle_pushed,
         f"events pushed: {pushed}"),
        ("every open stream received every pause/resume broadcast",
         bool(r.broadcasts) and not missed,
         f"{len(r.broadcasts) - len(missed)} of {len(r.broadcasts)} broadcasts reached all"),
        ("no stream missed an event between two it received", r.gaps == 0,
         f"{r.gaps:,} with a gap"),
        (f"{n:,} streams reopened at once right after {n:,} closed (clients reconnecting)",
         refused == 0 and len(again.opened) == n,
         f"{n - refused:,} of {n:,} at the first attempt; {refused:,} refused 503 "
         f"({_codes(again)}); {len(again.opened):,} open after {again.wall_s:.1f} s"),
    ]  # fmt: skip


def render(r: Results) -> str:
    p, n = r.plan, r.plan.streams
    runs = [r.claims[k] for k in PHASES]
    per_stream = (r.rss_streams_kib - r.rss_before_kib) * 1024 / n
    first, again = r.openings[0], r.openings[-1]
    opens = [s.open_s for s in first.opened if s.open_s is not None]
    delays = {e: [d for b in r.broadcasts if b.event == e for d in b.delays]
              for e in ("paused", "open")}  # fmt: skip
    cpu = [b.cpu_s for b in r.broadcasts]
    servers = ("embedded, throw-away: Valkey without AOF, PostgreSQL with fsync off"
               if r.embedded else "from CLAIM_REDIS_URL / CLAIM_DATABASE_URL")  # fmt: skip
    out = [
        "# Event streams: a worker holding idle SSE streams still answers claims"
        + (" (quick run)" if p.quick else ""),
        "",
        f"- date: {r.started_at:%Y-%m-%d %H:%M:%S %Z}",
        f"- reproduce: `{r.command}` (`--record` writes this file; `--quick`: "
        f"{QUICK.streams:,} streams, a smoke run)",
        f"- commit: {head_commit()}",
        *(f"- {k}: {v}" for k, v in machine()),
        f"- Valkey {r.valkey}, PostgreSQL {r.postgres} ({servers})",
        f"- load average at start / end: {_load(r.load_before)} / {_load(r.load_after)}",
        f"- run time: {r.wall_s:.0f} s",
        f"- under test: one `serve --insecure-dev --workers 1` on 127.0.0.1 (with one worker "
        f"it serves in its own process: pid {r.pid}) and a `writer`, default settings"
        + ("" if not p.quick else f" but `CLAIM_MAX_EVENT_STREAMS={n}`"),
        "- the streams and the `/healthz` probes come from the benchmark's process, each claim "
        "load from a process of its own (aiohttp, uvloop); they, the worker, the writer, Valkey "
        "and PostgreSQL share the CPUs, which other work shares too: read the ratios, measured "
        "in the same run, more than absolute times",
        "",
        "## Checks",
        "",
        "| check | held | seen |",
        "|---|---|---|",
        *(f"| {what} | {'yes' if ok else '**no**'} | {seen} |" for what, ok, seen in checks(r)),
        "",
        f"## Claims without and with {n:,} open streams",
        "",
        f"{p.claims:,} claims each time, paced at {p.claim_rate}/s (open loop, "
        f"{CLAIM_CONNECTIONS} keep-alive connections at most), each by a member who had not "
        f"claimed (after {WARM_S} s of unmeasured warm-up claims on each benefit); latency "
        "from sending the request to reading the whole answer. Idle: the "
        "claims are on the benefit the streams watch, within one feed stock step, so nothing "
        "but heartbeats is pushed. Broadcasts: the claims are on a second benefit while the "
        f"watched one is paused and resumed ({len(r.broadcasts)} changes, each pushed to "
        f"every stream, {BROADCAST_GAP_S:.0f} s apart once all streams had it).",
        "",
        _phases_row("figure", list(PHASES.values()), ["ratio", "ratio"]),
        "|---|---:|---:|---:|---:|---:|",
        *(_latency_row(f"claim {name}", [_pct(x.latencies, q) for x in runs])
          for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))),
        _phases_row("claims sent per second", [f"{p.claims / x.wall_s:,.0f}" for x in runs]),
        _phases_row("outcomes", [_outcomes(x) for x in runs]),
        _phases_row("sent late by the claim process, p99", [_ms(_pct(x.late, 0.99)) for x in runs]),
        "",
        *_reading(r),
        "## The worker's memory, open files and idle cost",
        "",
        "| when | RSS | open files |",
        "|---|---:|---:|",
        *(f"| {label} | {rss / 1024:,.1f} MiB | {fds:,} |" for label, rss, fds in r.samples),
        f"| peak RSS over the run (VmHWM) | {r.peak_rss_kib / 1024:,.1f} MiB | |",
        "",
        f"Memory per idle stream: **{per_stream / 1024:.1f} KiB** (RSS with {n:,} streams "
        f"open minus RSS before, over {n:,}).",
        "",
        "| worker idle | no stream | streams open | ratio |",
        "|---|---:|---:|---:|",
        f"| CPU (share of one core) | {r.idle['none'].cpu_share:.1%} | "
        f"{r.idle['streams'].cpu_share:.1%} | |",
        _ratio_row("`GET /healthz` p50", _pct(r.idle["none"].probes, 0.5),
                   _pct(r.idle["streams"].probes, 0.5)),
        _ratio_row("`GET /healthz` max", max(r.idle["none"].probes),
                   max(r.idle["streams"].probes)),
        f"| keep-alive comments received | {r.idle['none'].keepalives:,} in "
        f"{r.idle['none'].seconds:.0f} s | {r.idle['streams'].keepalives:,} in "
        f"{r.idle['streams'].seconds:.0f} s | |",
        "",
        "## Opening the streams",
        "",
        f"{OPEN_WINDOW} openings in flight at a time (request to first `state` event); a 503 "
        f"is retried after the server's `retry:` hint ({RETRY_MS} ms) until "
        f"{OPEN_DEADLINE_S:.0f} s.",
        "",
        "| opening | open | refused 503 at first | failed | wall time | open p50 / p99 |",
        "|---|---:|---:|---:|---:|---:|",
        *(_opening_row(name, o) for name, o in (("first", first), ("right after closing", again))),
        "",
        f"One more stream with {n:,} open: {r.past_cap}. First opening, open latency p50 "
        f"{_ms(_pct(opens, 0.5))}, p99 {_ms(_pct(opens, 0.99))}.",
        "",
        *_reconnect_reading(again, n),
        "## Broadcasts: the watched benefit paused and resumed through the admin API",
        "",
        "Delay from sending the admin request to this client reading the event on a stream "
        f"(the feed hears the change at once and refreshes {MIN_GAP_S * 1000:.0f} ms later; "
        f"the client reads {n:,} sockets on the same CPUs, so the tail is partly its own); "
        "worker CPU: the worker's CPU time from the request to the last stream reading it.",
        "",
        "| event | round | streams open | received | p50 | p99 | max | worker CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| `{b.event}` | {b.round} | {b.live:,} | {len(b.delays):,} | "
          f"{_ms(_pct(b.delays, 0.5))} | {_ms(_pct(b.delays, 0.99))} | "
          f"{_ms(max(b.delays, default=float('nan')))} | {_ms(b.cpu_s)} |"
          for b in r.broadcasts),
        *(f"| `{e}`, all rounds | | | {len(d):,} | {_ms(_pct(d, 0.5))} | "
          f"{_ms(_pct(d, 0.99))} | {_ms(max(d, default=float('nan')))} | "
          f"{_ms(_pct(cpu, 0.5))} (p50) |" for e, d in delays.items()),
        "",
        "## Warnings the worker logged",
        "",
        *([f"- {c:,}× {m}" for m, c in r.warnings.most_common(8)] or ["none"]),
        "",
    ]  # fmt: skip
    return "\n".join(out)


def _phases_row(name: str, cells: list[str], ratios: list[str] | None = None) -> str:
    """A row of the claims table: the baseline, then each phase followed by its ratio."""
    base, *rest = cells
    ratios = ratios or [""] * len(rest)
    pairs = [f"{cell} | {ratio}" for cell, ratio in zip(rest, ratios, strict=True)]
    return f"| {name} | {base} | {' | '.join(pairs)} |"


def _latency_row(name: str, values: list[float]) -> str:
    base = values[0]
    return _phases_row(name, [_ms(v) for v in values], [f"{v / base:.2f}×" for v in values[1:]])


def _reading(r: Results) -> list[str]:
    """What the claims table says, in words, from this run's figures."""
    base, idle, busy = (r.claims[k] for k in PHASES)
    n, c = r.plan.streams, r.plan.claims
    cpu = [b.cpu_s for b in r.broadcasts] or [float("nan")]
    refused = c - busy.outcomes["202"]

    def ratio(run: ClaimRun, q: float) -> str:
        return f"{_pct(run.latencies, q) / _pct(base.latencies, q):.2f}×"

    return [
        f"With {n:,} idle streams open the worker accepted {idle.outcomes['202']:,} of {c:,} "
        f"claims, at {ratio(idle, 0.5)} the baseline's p50 and {ratio(idle, 0.99)} its p99. "
        f"While it pushed {len(r.broadcasts)} changes to every stream (each cost it "
        f"{_ms(_pct(cpu, 0.5))} of CPU, median; max {_ms(max(cpu))}), claims were answered at "
        f"{ratio(busy, 0.5)} the baseline's p50 and {ratio(busy, 0.99)} its p99 "
        f"({_ms(_pct(busy.latencies, 0.99))}), "
        + (f"and {refused:,} of {c:,} were not accepted ({_outcomes(busy)})."
           if refused else "all accepted."),
        "",
    ]  # fmt: skip


def _reconnect_reading(again: Opening, n: int) -> list[str]:
    refused = sum(s.refused > 0 for s in again.streams)
    if not refused:
        return []
    return [
        f"**Reconnecting clients are refused.** {refused:,} of the {n:,} streams opened "
        f"{SETTLE_S:.0f} s after the previous {n:,} were closed got 503 `too_many_streams`; "
        f"all were open only after {again.wall_s:.1f} s: the worker went on counting the "
        "departed clients' streams against `CLAIM_MAX_EVENT_STREAMS` until it noticed they "
        "had gone.",
        "",
    ]


def _ratio_row(name: str, base: float, value: float) -> str:
    return f"| {name} | {_ms(base)} | {_ms(value)} | {value / base:.2f}× |"


def _opening_row(name: str, o: Opening) -> str:
    opens = [s.open_s for s in o.opened if s.open_s is not None]
    failed = Counter(s.error or str(s.status) for s in o.streams if s.open_s is None)
    return (f"| {name} | {len(o.opened):,} of {o.wanted:,} | "
            f"{sum(s.refused > 0 for s in o.streams):,} ({_codes(o)}) | "
            f"{', '.join(f'{k}: {v:,}' for k, v in failed.items()) or '0'} | "
            f"{o.wall_s:.1f} s | {_ms(_pct(opens, 0.5))} / {_ms(_pct(opens, 0.99))} |")  # fmt: skip


def _codes(o: Opening) -> str:
    codes = Counter(s.refused_as for s in o.streams if s.refused)
    return ", ".join(f"{k}: {v:,}" for k, v in codes.items()) or "none"


def _outcomes(c: ClaimRun) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(c.outcomes.items()))


def _ms(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing measured
        return "–"
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:,.1f} ms" if ms < 100 else f"{ms:,.0f} ms"


def _load(avg: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in avg)


# -- the claim load, in a process of its own ------------------------------------------------


async def send_claims(
    url: str, members: list[str], rate: float, go: Callable[[], Awaitable[None]]
) -> ClaimRun:
    """``members`` claim at ``rate`` a second, open loop (each sent when due, whatever the
    answers before it), once ``go`` returns; tokens and bodies are made before."""
    settings = Settings.from_env()
    calls = [({"Authorization": f"Bearer {mint_token(settings, m)}",
               "Content-Type": "application/json"},
              orjson.dumps({"request_id": f"r-{m}", "option_id": OPTION}))
             for m in members]  # fmt: skip
    run = ClaimRun()
    connector = aiohttp.TCPConnector(limit=CLAIM_CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one(headers: dict[str, str], body: bytes, due: float) -> None:
            t0 = time.perf_counter()
            run.late.append(t0 - due)
            try:
                async with http.post(url, data=body, headers=headers) as resp:
                    answer = await resp.read()
                    code = "" if resp.status == 202 else " " + _error_code(answer)
                    run.outcomes[f"{resp.status}{code}"] += 1
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                run.outcomes[type(exc).__name__] += 1
                return
            run.latencies.append(time.perf_counter() - t0)

        await go()
        tasks = []
        start = time.perf_counter()
        for i, (headers, body) in enumerate(calls):
            due = start + i / rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(headers, body, due)))
        await asyncio.gather(*tasks)
        run.wall_s = time.perf_counter() - start
    return run


async def _claim_process() -> None:
    """``python -m bench.event_streams``: a spec on stdin, ``ready`` on stdout, ``go`` on
    stdin, then the claims, and their figures as one line of JSON on stdout."""
    loop = asyncio.get_running_loop()
    spec = orjson.loads(await loop.run_in_executor(None, sys.stdin.buffer.readline))

    async def go() -> None:
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)

    run = await send_claims(spec["url"], spec["members"], spec["rate"], go)
    figures = {"latencies": run.latencies, "late": run.late,
               "outcomes": dict(run.outcomes), "wall_s": run.wall_s}  # fmt: skip
    sys.stdout.write(orjson.dumps(figures).decode() + "\n")
    sys.stdout.flush()


# -- running it ----------------------------------------------------------------------------


@contextlib.contextmanager
def _servers() -> Iterator[tuple[str, str, bool]]:
    redis_url = os.environ.get("CLAIM_REDIS_URL")
    database_url = os.environ.get("CLAIM_DATABASE_URL")
    if redis_url and database_url:
        yield redis_url, database_url, False
        return
    with EmbeddedServers(ephemeral=True) as servers:
        yield servers.redis_url, servers.database_url, True


async def _run(r: Results, run_dir: Path, redis_url: str, database_url: str) -> None:
    plan = r.plan
    async with Stack(run_dir, redis_url, database_url) as stack:
        r.valkey, r.postgres = await stack.versions()
        await stack.command("migrate", "migrate")
        env = {"CLAIM_MAX_EVENT_STREAMS": str(plan.streams)} if plan.quick else {}
        async with stack.service("serve", workers=1, writer=True, **env) as svc:
            bench = EventStreamsBench(stack, svc, plan, r)
            async with bench.sessions():
                await bench.setup()
                await bench.run()
        r.warnings = log_warnings(stack.logs / "serve.log")


def main(*, quick: bool, record: bool, output: Path | None) -> int:
    plan = QUICK if quick else FULL
    limit = file_limit()  # the streams are this process's sockets; `serve` inherits it
    if limit < plan.streams + 1024:  # per process: this one, and `serve` with its own
        print(f"the open-file limit ({limit}) is too low for {plan.streams:,} streams",
              file=sys.stderr)  # fmt: skip
        return 2
    run_dir = output or BENCH / "runs" / (
        datetime.now().strftime("%Y%m%d-%H%M%S") + "-event-streams" + ("-quick" if quick else "")
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    results = Results(plan, "./run bench event-streams" + (" --quick" if quick else ""))
    started = time.monotonic()
    say(f"run folder {run_dir}")
    with _servers() as (redis_url, database_url, embedded):
        results.embedded = embedded
        uvloop.run(_run(results, run_dir, redis_url, database_url))
    results.wall_s = time.monotonic() - started
    results.load_after = os.getloadavg()
    text = render(results)
    name = "event_streams.quick.md" if quick else "event_streams.md"
    targets = [run_dir / name] + ([BENCH / "results" / name] if record else [])
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(text)
    say(f"report written to {', '.join(str(p) for p in targets)}")
    return 0 if all(ok for _, ok, _ in checks(results)) else 1


if __name__ == "__main__":
    uvloop.run(_claim_process())
