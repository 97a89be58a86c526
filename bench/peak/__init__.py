"""``./run bench peak``: the claim service at release-time load, against baselines measured
in the same run, on this machine (server and load generator sharing it).

Scenarios, in order: the load generator's own ceiling (a trivial server); baselines (a) bare
aiohttp, (b) + PyJWT per request, (c) one EVALSHA per claim, (d) PostgreSQL only, against
the service at full claim throughput with 1 and 2 workers (writer running) and its sold-out
answers, in interleaved rounds (``comparison``); a release (stock, members of mixed tiers,
a thousand connections, a spike at the opening, retries with the same request_id) checked
against PostgreSQL and Redis; the writer draining a backlog alone; overload at a multiple of
the sustained rate (open loop); and the claim path with ``CLAIM_DURABILITY=local``.

Writes ``peak.md`` and ``peak/*.png`` into an untracked run folder (``bench/runs/<time>/``,
with every process's log and the generator's summaries), or with ``--record`` into
``bench/results/`` as well. Uses embedded Valkey and PostgreSQL unless ``CLAIM_REDIS_URL``
and ``CLAIM_DATABASE_URL`` are both set (then it leaves ``peak-*`` benefits, their claims
and ``peak-*`` members' tiers behind). Progress goes to stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import uvloop

from bench.peak import comparison, plots, release, scenarios
from bench.peak.model import FULL, QUICK, Plan, Results, Scenario
from bench.peak.report import render
from bench.peak.stack import Stack, log_warnings, say
from bench.peak.targets import evaluate
from claim_service.local.embedded import EmbeddedServers

BENCH = Path(__file__).resolve().parents[1]
RUNS_DIR = BENCH / "runs"
RESULTS_DIR = BENCH / "results"
Step = Callable[[Stack, Plan, Results], Awaitable[None]]


STEPS: tuple[tuple[str, Step], ...] = (
    ("generator ceiling", scenarios.ceiling),
    ("comparison", comparison.comparison),
    ("release", release.release),
    ("writer alone", release.writer_alone),
    ("overload", scenarios.overload),
    ("durability", scenarios.durability),
)


@contextlib.contextmanager
def _servers() -> Iterator[tuple[str, str, bool]]:
    redis_url = os.environ.get("CLAIM_REDIS_URL")
    database_url = os.environ.get("CLAIM_DATABASE_URL")
    if redis_url and database_url:
        yield redis_url, database_url, False
        return
    with EmbeddedServers(ephemeral=True) as servers:
        yield servers.redis_url, servers.database_url, True


async def _run(results: Results, run_dir: Path, redis_url: str, database_url: str) -> None:
    plan = results.plan
    async with Stack(run_dir, redis_url, database_url) as stack:
        results.valkey, results.postgres = await stack.versions()
        await stack.command("migrate", "migrate")
        await scenarios.tiers(stack, plan)
        for name, step in STEPS:
            if name == "overload" and "svc1" not in results.scenarios:
                results.skipped.append("overload: no sustained rate was measured")
                continue
            started = time.monotonic()
            before = set(results.scenarios)
            try:
                await step(stack, plan, results)
            except Exception as exc:  # report the rest of the run all the same
                traceback.print_exc()
                results.skipped.append(f"{name}: failed ({type(exc).__name__}: {exc})")
            for key in set(results.scenarios) - before:
                _note_logs(stack, results.scenarios[key])
            say(f"{name}: {time.monotonic() - started:.1f} s")


def _note_logs(stack: Stack, scenario: Scenario) -> None:
    """What the service's processes warned about during the scenario, in its notes."""
    for suffix in ("", "-writer"):
        path = stack.logs / f"{scenario.key}{suffix}.log"
        for message, count in log_warnings(path).most_common(3):
            scenario.notes.append(f"{path.name}: {count:,}× “{message}”")


def _write(results: Results, folder: Path) -> Path:
    """``peak.md`` and ``peak/*.png`` into ``folder``; keeps its profile findings."""
    path = folder / "peak.md"
    previous = path.read_text() if path.exists() else None
    pictures = plots.draw(results, folder / "peak")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render(results, pictures, previous))
    tmp.replace(path)
    return path


def main(
    *, quick: bool, record: bool, output: Path | None, keep_records: bool, profile: bool = False
) -> int:
    plan = replace(QUICK if quick else FULL, profile=profile)
    command = "./run bench peak" + (" --quick" if quick else "")
    run_dir = output or RUNS_DIR / (
        datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if quick else "")
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    results = Results(plan, command)
    started = time.monotonic()
    say(f"run folder {run_dir}")
    with _servers() as (redis_url, database_url, embedded):
        results.embedded = embedded
        say("servers up (" + ("embedded, throw-away" if embedded else "from CLAIM_*_URL") + ")")
        uvloop.run(_run(results, run_dir, redis_url, database_url))
    results.wall_s = time.monotonic() - started
    results.load_after = os.getloadavg()
    report = _write(results, run_dir)
    if record:
        report = _write(results, RESULTS_DIR)
    if not keep_records:  # the bulky inputs and raw records (tens of MB in a full run)
        for bulky in [
            run_dir / "tiers.csv",
            run_dir / scenarios.STEADY_TOKENS,
            *(run_dir / "records").glob("*.bin"),
            *(run_dir / "records").glob("*.claims"),
        ]:
            bulky.unlink(missing_ok=True)
    print(report.read_text())
    for target in evaluate(results):
        say(f"{target.verdict():>22}  {target.name}: {target.shown}")
    say(f"report written to {report} ({results.wall_s:.0f} s)")
    failed = [c.name for c in results.checks if not c.ok]
    if failed:
        print("release checks failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed or results.skipped else 0
