"""The steady scenarios outside the comparison rounds (``comparison``): the generator's
ceiling, overload and durable acknowledgements; and what every steady scenario shares.

A steady scenario is a closed loop of ``plan.connections`` connections over the steady
members, against a benefit of its own whose stock and per-member quota no scenario reaches,
so that every claim is accepted and the figures time the claim path, not a rejection (each
checks that the answers were all 202, and that the service's stock taken matches).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import replace
from typing import Any

from bench.peak.model import (
    CLAIMS_PATH,
    OPTION,
    RELEASE_PREFIX,
    STEADY_PREFIX,
    STEADY_STOCK,
    Plan,
    Results,
    Scenario,
    release_tier,
    steady_benefit,
)
from bench.peak.records import CONN_ERROR, TIMEOUT
from bench.peak.stack import Service, Stack, say
from bench.peak.wire import Spec, mint_tokens
from claim_service.local.embedded import EmbeddedValkey

STEADY_TOKENS = "tokens-steady.txt"
SERVE = "claim-service serve --insecure-dev --workers {} + claim-service writer"


def steady_spec(
    stack: Stack, plan: Plan, label: str, port: int, benefit_id: str, **overrides: Any
) -> Spec:
    """A closed loop of ``plan.connections`` over the steady members, every request new."""
    spec = Spec(
        mode="closed",
        port=port,
        path=CLAIMS_PATH.format(benefit_id),
        out=str(stack.records / label),
        connections=plan.connections,
        label=label,
        warmup_s=plan.warmup_s,
        duration_s=plan.duration_s,
        timeout_s=plan.client_timeout_s,
        member_prefix=STEADY_PREFIX,
        members=plan.steady_members,
        request_prefix=f"{label}-",
        options=(OPTION,),
        seed=plan.seed,
        tokens_file=str(stack.run_dir / STEADY_TOKENS),
    )
    return replace(spec, **overrides)


def closed_load(plan: Plan, connections: int | None = None) -> str:
    return (
        f"closed loop, {connections or plan.connections} connections, "
        f"{plan.measure_s:g} s after {plan.warmup_s:g} s warm-up"
    )


def benefit_id(stack: Stack, key: str) -> str:
    return f"peak-{key}-{stack.run_dir.name}"


async def ceiling(stack: Stack, plan: Plan, results: Results) -> None:
    """The generator against the cheapest server there is: its own ceiling."""
    say("generator ceiling (trivial server)")
    async with stack.baseline("trivial", "trivial", 0) as port:
        run = await stack.generate(steady_spec(stack, plan, "ceiling", port, "trivial"))
    results.add(
        Scenario(
            "ceiling",
            "load generator ceiling (trivial server)",
            "raw asyncio Protocol answering a fixed 202",
            closed_load(plan),
            run,
        )
    )


async def read_books(stack: Stack, svc: Service, benefit: str) -> tuple[int, int, float]:
    """Right after the load: stock taken, claims the writer had yet to persist, and how long
    it then took to persist them."""
    taken = int((await stack.stock(svc, benefit))["taken"])
    left, seconds = await stack.drain(svc)
    return taken, left, seconds


def check(scenario: Scenario, books: tuple[int, int, float], *, strict: bool = True) -> None:
    """Every answer as expected and each 202 a unit taken (``strict``); whether the writer
    kept up."""
    taken, left, seconds = books
    accepted = scenario.counts().get(202, 0)
    scenario.extra.update(taken=taken, unpersisted=left, drain_s=seconds)
    gave_up = scenario.counts().get(TIMEOUT, 0) + scenario.counts().get(CONN_ERROR, 0)
    if strict and 202 in scenario.focus and accepted < taken <= accepted + gave_up:
        scenario.notes.append(
            f"{taken - accepted:,} claims accepted after their client had given up (timeouts)"
        )
    elif strict and 202 in scenario.focus and taken != accepted:
        scenario.notes.append(f"**stock taken {taken:,} ≠ {accepted:,} answered 202**")
    if strict and scenario.unexpected - gave_up:
        wanted = "/".join(map(str, scenario.focus))
        scenario.notes.append(f"**{scenario.unexpected - gave_up:,} answers were not {wanted}**")
    if left:
        scenario.notes.append(
            f"writer {left:,} claims behind when the load stopped, caught up {seconds:.1f} s later"
        )


async def overload(stack: Stack, plan: Plan, results: Results) -> None:
    """An open loop at ``overload_factor`` × the claim rate the service sustained."""
    sustained = results.scenarios["svc1"].rate
    rate = plan.overload_factor * sustained
    say(f"overload: {rate:,.0f} req/s offered ({plan.overload_factor:g}× {sustained:,.0f})")
    benefit = benefit_id(stack, "overload")
    async with stack.service("overload") as svc:
        await stack.put_benefit(svc, benefit, steady_benefit(STEADY_STOCK, "overload"))
        spec = steady_spec(
            stack,
            plan,
            "overload",
            svc.port,
            benefit,
            mode="open",
            rate=rate,
            connections=plan.overload_connections,
        )
        run = await stack.generate(spec)
        books = await read_books(stack, svc, benefit)
    load = (
        f"open loop at {rate:,.0f} req/s ({plan.overload_factor:g}× the sustained claim "
        f"rate) over up to {plan.overload_connections:,} connections, client timeout "
        f"{plan.client_timeout_s:g} s, {plan.measure_s:g} s after {plan.warmup_s:g} s"
    )
    scenario = results.add(
        Scenario("overload", "claim service, overload", SERVE.format(1), load, run)
    )
    scenario.extra.update(offered=rate, sustained=sustained)
    # Claims whose client gave up (timed out) may still have been accepted.
    late = books[0] - scenario.counts().get(202, 0)
    if late:
        scenario.notes.append(f"{late:,} claims accepted after their client had given up")
    check(scenario, books, strict=False)


async def durability(stack: Stack, plan: Plan, results: Results) -> None:
    """The steady claim scenario with ``CLAIM_DURABILITY=local`` on a Valkey that fsyncs
    every write (what ``local`` requires), against ``none`` (``svc1``)."""
    say("durability local (Valkey with appendfsync always)")
    data = stack.run_dir / "valkey-durable"
    valkey = EmbeddedValkey(data, appendfsync="always")
    await asyncio.to_thread(valkey.start)
    key = "durable"
    benefit = benefit_id(stack, key)
    try:
        async with stack.service(key, CLAIM_REDIS_URL=valkey.url, CLAIM_DURABILITY="local") as svc:
            # This Valkey is new: mirror the members' tiers into it through the admin API.
            members = [(f"{STEADY_PREFIX}{i:06d}", 5) for i in range(plan.steady_members)]
            await stack.put_tiers(svc, members)
            await stack.put_benefit(svc, benefit, steady_benefit(STEADY_STOCK, key))
            run = await stack.generate(steady_spec(stack, plan, key, svc.port, benefit))
            books = await read_books(stack, svc, benefit)
    finally:
        await asyncio.to_thread(valkey.stop)
        shutil.rmtree(data, ignore_errors=True)
    scenario = results.add(
        Scenario(
            key,
            "claim service, CLAIM_DURABILITY=local",
            SERVE.format(1) + " (CLAIM_DURABILITY=local; Valkey "
            "appendonly yes, appendfsync always)",
            closed_load(plan),
            run,
        )
    )
    check(scenario, books)


async def tiers(stack: Stack, plan: Plan) -> None:
    """Load every member's tier: the steady members at V5, the release's mixed
    (``claim-service load-tiers`` from a CSV, as ops would)."""
    started = time.monotonic()
    path = stack.run_dir / "tiers.csv"
    rows = [f"{STEADY_PREFIX}{i:06d},5\n" for i in range(plan.steady_members)]
    rows += [
        f"{RELEASE_PREFIX}{i:06d},{release_tier(i, plan.seed)}\n"
        for i in range(plan.release_members)
    ]
    await asyncio.to_thread(path.write_text, "user_id,tier\n" + "".join(rows))
    await stack.command("load-tiers", "load-tiers", str(path), "--period", stack.period)
    # The steady members' tokens, minted once: every steady run sends the same ones.
    tokens = mint_tokens(stack.settings, STEADY_PREFIX, plan.steady_members)
    await asyncio.to_thread((stack.run_dir / STEADY_TOKENS).write_text, "\n".join(tokens))
    say(
        f"tiers loaded for {plan.steady_members + plan.release_members:,} members in "
        f"{time.monotonic() - started:.1f} s"
    )
