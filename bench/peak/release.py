"""The release-time burst and the writer draining a backlog alone.

The release: a benefit of ``release_stock`` units opening ``release_opens_in_s`` after the
load starts; ``release_connections`` connections play ``release_members`` members of mixed
tiers (some below ``min_tier``), hammering before the opening (425), all at once when it
opens (the spike), resending a share of accepted claims with the same ``request_id``, until
each connection sees ``410``. Then the books are checked from PostgreSQL and Redis: exactly
the stock accepted and persisted, the very claims that were answered 202, no member over
quota, none below ``min_tier``; and how long after the last accepted claim the last row was
in PostgreSQL (from the rows' ``written_at``, so nothing polls the database meanwhile).

The writer alone: claims accepted with no writer running build a backlog in the stream,
then one ``claim-service writer`` drains it; its rate is read from the rows' own commit
batches (``written_at``), so polling does not slow it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from bench.peak.model import (
    CLAIMS_PATH,
    MIN_TIER,
    RELEASE_OPTIONS,
    RELEASE_PREFIX,
    Check,
    Plan,
    Results,
    Scenario,
    release_benefit,
    steady_benefit,
)
from bench.peak.records import Run
from bench.peak.scenarios import SERVE, benefit_id, steady_spec
from bench.peak.stack import Stack, say
from bench.peak.wire import Spec

ROWS_POLL_S = 0.05
PERSIST_WAIT_S = 60.0
WRITER_WAIT_S = 180.0
DECIDED = (200, 202, 403, 409, 410)  # a claim decided (not 425, 429, 503, errors)

OVER_QUOTA = """
SELECT count(*) FROM (
    SELECT c.user_id, count(*) AS n, max(t.tier) AS tier
    FROM claims c JOIN tiers t ON t.period = c.period AND t.user_id = c.user_id
    WHERE c.benefit_id = $1 GROUP BY c.user_id
) per_member
WHERE n > CASE WHEN tier >= 8 THEN 2 WHEN tier >= $2 THEN 1 ELSE 0 END"""


async def release(stack: Stack, plan: Plan, results: Results) -> None:
    say(
        f"release: {plan.release_stock:,} units, {plan.release_members:,} members, "
        f"{plan.release_connections:,} connections"
    )
    benefit = benefit_id(stack, "release")
    async with stack.service("release") as svc:
        opens_at = 0.0

        async def go() -> dict[str, float]:
            nonlocal opens_at
            opens_at = time.time() + plan.release_opens_in_s
            await stack.put_benefit(svc, benefit, release_benefit(plan.release_stock, opens_at))
            return {"open_ts": opens_at}

        spec = Spec(
            mode="release",
            port=svc.port,
            path=CLAIMS_PATH.format(benefit),
            out=str(stack.records / "release"),
            connections=plan.release_connections,
            label="release",
            timeout_s=plan.client_timeout_s,
            member_prefix=RELEASE_PREFIX,
            members=plan.release_members,
            request_prefix="",
            options=RELEASE_OPTIONS,
            retry_share=plan.release_retry_share,
            max_s=plan.release_max_s,
            seed=plan.seed,
        )
        run = await stack.generate(spec, go)
        deadline = time.monotonic() + PERSIST_WAIT_S
        while await stack.rows(benefit) < int(run.meta["accepted"]):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(ROWS_POLL_S)
        stock = await stack.stock(svc, benefit)
    load = (
        f"{plan.release_connections:,} connections playing {plan.release_members:,} "
        f"members; opens {plan.release_opens_in_s:g} s after the load starts; "
        f"{plan.release_retry_share:.0%} of accepted claims resent with the same "
        "request_id; until sold out"
    )
    scenario = results.add(
        Scenario("release", "release", SERVE.format(1), load, run, focus=DECIDED)
    )
    run.window = (run.wall_to_s(opens_at), run.window[1])
    scenario.extra.update(opens_s=run.wall_to_s(opens_at), stock=stock, benefit=benefit)
    await _check_books(stack, plan, results, scenario)
    _spike(results, scenario)


async def _check_books(stack: Stack, plan: Plan, results: Results, scenario: Scenario) -> None:
    run, benefit, stock_n = scenario.run, scenario.extra["benefit"], plan.release_stock
    stock = scenario.extra["stock"]
    answered = set(Path(run.meta["spec"]["out"]).with_suffix(".claims").read_bytes().split())
    rows = await stack.pg.fetch("SELECT claim_id FROM claims WHERE benefit_id = $1", benefit)
    persisted = {r["claim_id"].encode() for r in rows}
    over = int(await stack.pg.fetchval(OVER_QUOTA, benefit, MIN_TIER))
    below = int(
        await stack.pg.fetchval(
            "SELECT count(*) FROM claims WHERE benefit_id = $1 AND tier < $2", benefit, MIN_TIER
        )
    )
    accepted = int(run.meta["accepted"])
    taken, left = int(stock["taken"]), int(stock["left"])
    sold_out = bool(run.meta["first_sold_out_ns"]) and left == 0
    checks = [
        Check(
            "sells out",
            sold_out,
            f"{left:,} left; first 410 "
            + ("seen" if run.meta["first_sold_out_ns"] else "never seen"),
        ),
        Check(
            "zero oversell",
            taken <= stock_n and accepted <= stock_n and len(persisted) <= stock_n,
            f"taken {taken:,}, answered 202 {accepted:,}, rows {len(persisted):,} of {stock_n:,}",
        ),
        Check(
            "zero undersell",
            taken == stock_n and accepted == stock_n,
            f"taken {taken:,}, accepted {accepted:,} of {stock_n:,}",
        ),
        Check("rows == stock", len(rows) == stock_n, f"{len(rows):,} rows in PostgreSQL"),
        Check(
            "rows are the claims answered 202",
            answered == persisted,
            f"{len(answered - persisted):,} answered but not persisted, "
            f"{len(persisted - answered):,} persisted but never answered",
        ),
        Check("no member over quota", over == 0, f"{over:,} members over their tier's quota"),
        Check("no claim below min_tier", below == 0, f"{below:,} claims below V{MIN_TIER}"),
        Check(
            "retries return the same claim",
            run.meta["replay_mismatches"] == 0,
            f"{run.meta['replays']:,} resent, {run.meta['replay_mismatches']:,} answered otherwise",
        ),
    ]
    results.checks.extend(checks)
    # When each row reached PostgreSQL: its written_at (the writer's transaction start, a
    # few milliseconds before the commit); read afterwards, so nothing polls during the run.
    batches = await stack.pg.fetch(
        """SELECT extract(epoch FROM written_at)::float8 AS at, count(*) AS n FROM claims
           WHERE benefit_id = $1 GROUP BY written_at ORDER BY written_at""",
        benefit,
    )
    total, cumulative = 0, []
    for batch in batches:
        total += int(batch["n"])
        cumulative.append((run.wall_to_s(float(batch["at"])), total))
    results.series["release_rows"] = cumulative
    if batches and run.meta["last_accept_ns"]:
        last_accept = _wall(run, int(run.meta["last_accept_ns"]))
        results.figures["persist_s"] = max(float(batches[-1]["at"]) - last_accept, 0.0)
    results.figures["sell_out_s"] = (
        _wall(run, int(run.meta["first_sold_out_ns"])) - (run.go_wall + scenario.extra["opens_s"])
        if run.meta["first_sold_out_ns"]
        else float("nan")
    )


def _wall(run: Run, ns: int) -> float:
    return float(run.meta["base_wall"]) + (ns - int(run.meta["base_ns"])) / 1e9


def _spike(results: Results, scenario: Scenario) -> None:
    """Claims decided in the first second after the opening vs each later second's."""
    run = scenario.run
    opens = scenario.extra["opens_s"]
    decided = run.of(*DECIDED)
    since_open = run.end_s[decided] - opens
    sold = results.figures.get("sell_out_s", float("nan"))
    last = int(sold) if sold == sold else int(since_open.max(initial=0))
    per_second = [int(((since_open >= k) & (since_open < k + 1)).sum()) for k in range(last)]
    results.series["release_per_second"] = per_second
    if per_second:
        results.figures["spike_rate"] = per_second[0]
    later = per_second[1:]
    if later:
        results.figures["release_steady_rate"] = statistics.median(later)


async def writer_alone(stack: Stack, plan: Plan, results: Results) -> None:
    """Claims accepted with no writer running, then one writer draining them alone."""
    n = plan.writer_backlog
    say(f"writer alone: building a backlog of {n:,} accepted claims (no writer running)")
    benefit = benefit_id(stack, "backlog")
    async with stack.service("backlog", writer=False) as svc:
        await stack.put_benefit(svc, benefit, steady_benefit(n, "writer backlog"))
        spec = steady_spec(
            stack,
            plan,
            "backlog",
            svc.port,
            benefit,
            max_requests=n,
            duration_s=WRITER_WAIT_S,
            warmup_s=0.0,
        )
        run = await stack.generate(spec)
    results.add(
        Scenario(
            "backlog",
            "claim service, no writer running",
            SERVE.format(1).removesuffix(" + claim-service writer"),
            f"closed loop, {plan.connections} connections, {n:,} claims",
            run,
        )
    )
    say(f"writer alone: draining {n:,} claims")
    started = time.monotonic()
    proc = stack.spawn("writer-alone", ["-m", "claim_service", "writer"], stack.env())
    try:
        while time.monotonic() - started < WRITER_WAIT_S:
            if await stack.rows(benefit) >= n:
                break
            await asyncio.sleep(0.1)
        results.figures["writer_wall_s"] = time.monotonic() - started
    finally:
        await asyncio.to_thread(stack.stop, proc)
    row = await stack.pg.fetchrow(
        """SELECT count(*) AS n, min(written_at) AS first, max(written_at) AS last,
                  count(*) FILTER (WHERE written_at = (SELECT max(written_at) FROM claims
                                                       WHERE benefit_id = $1)) AS in_last
           FROM claims WHERE benefit_id = $1""",
        benefit,
    )
    assert row is not None
    results.figures["writer_rows"] = int(row["n"])
    span = (row["last"] - row["first"]).total_seconds() if row["n"] else 0.0
    if span > 0:  # rows committed from the first batch's start to the last batch's start
        results.figures["writer_rows_per_s"] = (int(row["n"]) - int(row["in_last"])) / span
