"""The comparison the targets rest on: the claim service (1 and 2 workers, writer running,
and its sold-out answers) against baselines (a)–(d), in interleaved rounds.

Every server is started once and stays up (an idle one costs nothing); the generator then
loads each in turn, round after round, in an order that rotates, so that other work on the
machine coming and going weighs on all of them alike. Each round is a closed loop of
``plan.connections`` connections, ``plan.round_warmup_s`` to warm up then ``plan.round_s``
measured, with request ids of its own (every claim fresh); a scenario's figures pool its
rounds. One ``writer`` process serves both services, as one would in production, and is let
catch up after each round against a service before the next round starts (how far behind
it was is noted).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.peak.model import STEADY_STOCK, Plan, Results, Scenario, steady_benefit
from bench.peak.records import Run
from bench.peak.scenarios import SERVE, benefit_id, check, read_books, steady_spec
from bench.peak.stack import Service, Stack, say

BASELINES = (
    ("a", "bare", "baseline (a): bare aiohttp, same JSON handling, no auth"),
    ("b", "jwt", "baseline (b): (a) + a PyJWT decode per request"),
    ("c", "evalsha", "baseline (c): one EVALSHA per claim, no coalescing"),
    ("d", "postgres", "baseline (d): PostgreSQL only, UPDATE … WHERE left > 0 + INSERT"),
)
# The order of a round (rotated by one each round): the closest comparisons side by side.
ORDER = ("a", "b", "svc1", "soldout", "c", "d", "svc2")


@dataclass
class Contender:
    key: str
    title: str
    server: str
    port: int
    benefit: str
    service: Service | None = None
    focus: tuple[int, ...] = (202,)
    behind: int = 0  # most claims its writer had left to persist after a round ...
    drain_s: float = 0.0  # ... and the longest it then took


async def comparison(stack: Stack, plan: Plan, results: Results) -> None:
    async with contextlib.AsyncExitStack() as up:
        contenders = await _start(stack, up)
        load = (
            f"closed loop, {plan.connections} connections, {plan.rounds} interleaved rounds of "
            f"{plan.round_s:g} s (after {plan.round_warmup_s:g} s warm-up each)"
        )
        for number in range(1, plan.rounds + 1):
            turn = (number - 1) % len(contenders)
            say(f"comparison round {number}/{plan.rounds}")
            for c in contenders[turn:] + contenders[:turn]:
                run = await _round(stack, plan, c, number)
                scenario = results.get(c.key)
                if scenario is None:
                    results.add(Scenario(c.key, c.title, c.server, load, run, focus=c.focus))
                else:
                    scenario.more.append(run)
                if c.service is not None:
                    left, seconds = await stack.drain(c.service)
                    c.behind, c.drain_s = max(c.behind, left), max(c.drain_s, seconds)
        for c in contenders:
            if c.service is not None:
                taken, _, _ = await read_books(stack, c.service, c.benefit)
                check(results.scenarios[c.key], (taken, c.behind, c.drain_s))


async def _start(stack: Stack, up: contextlib.AsyncExitStack) -> list[Contender]:
    """Every server of the comparison, up until ``up`` closes; in ``ORDER``."""
    found: dict[str, Contender] = {}
    for key, kind, title in BASELINES:
        benefit = benefit_id(stack, key)
        port = await up.enter_async_context(stack.baseline(kind, benefit, STEADY_STOCK))
        found[key] = Contender(key, title, f"python -m bench.peak.baselines {kind}", port, benefit)
    for workers in (1, 2):
        key = f"svc{workers}"
        svc = await up.enter_async_context(stack.service(key, workers=workers, writer=workers == 1))
        benefit = benefit_id(stack, key)
        await stack.put_benefit(svc, benefit, steady_benefit(STEADY_STOCK, key))
        title = f"claim service, {workers} worker{'s' if workers > 1 else ''}, writer running"
        found[key] = Contender(key, title, SERVE.format(workers), svc.port, benefit, svc)
        if workers == 1:
            sold = benefit_id(stack, "soldout")
            await stack.put_benefit(svc, sold, steady_benefit(0, "sold out"))
            found["soldout"] = Contender(
                "soldout",
                "claim service, sold out (410 answers)",
                SERVE.format(1),
                svc.port,
                sold,
                svc,
                focus=(410,),
            )
    say("comparison: every server up (" + ", ".join(found) + ")")
    return [found[key] for key in ORDER]


async def _round(stack: Stack, plan: Plan, c: Contender, number: int) -> Run:
    label = f"{c.key}-{number}"
    spec = steady_spec(
        stack,
        plan,
        label,
        c.port,
        c.benefit,
        warmup_s=plan.round_warmup_s,
        duration_s=plan.round_warmup_s + plan.round_s,
    )
    profiling: list[asyncio.Task[None]] = []

    async def go() -> dict[str, Any]:
        assert c.service is not None
        profiling.append(asyncio.create_task(_profile(stack, plan, c.service)))
        return {}

    profile = plan.profile and c.key == "svc1" and number == 1
    run = await stack.generate(spec, go if profile else None)
    await asyncio.gather(*profiling)
    return run


async def _profile(stack: Stack, plan: Plan, svc: Service) -> None:
    """py-spy on ``serve`` for the measured part of a round: a flame graph in the run
    folder (``--profile``)."""
    await asyncio.sleep(plan.round_warmup_s)
    out = stack.run_dir / "profile-svc1.svg"
    say(f"py-spy recording serve (pid {svc.proc.pid}) into {out}")
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("py-spy")),
        "record",
        "--pid",
        str(svc.proc.pid),
        "--duration",
        f"{max(int(plan.round_s), 1)}",
        "--rate",
        "200",
        "--nonblocking",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await proc.wait()
