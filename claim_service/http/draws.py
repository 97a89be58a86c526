"""Draw routes: the published draw (commitment, prizes, stock, odds now; the seed once the
period closed), the published results, and the draw parts of claim answers and proofs."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from claim_service.claims.decisions import ClaimDecision
from claim_service.claims.engine import ClaimEngine, bundle_item_id
from claim_service.domain import periods
from claim_service.domain.catalogue import ID_RE, Benefit, as_integer
from claim_service.domain.draws import NINE_GRID_CELLS, grid_cell, odds
from claim_service.errors import BackendUnavailable, NotFoundError, ValidationError
from claim_service.http.app import ENGINE, PG, REDIS, VERIFIER, json_response
from claim_service.http.auth import bearer
from claim_service.store import draw_records
from claim_service.store.draw_seeds import DrawSeeds

# The seed is revealed this long after the period closed by Redis's clock as last seen here,
# so no claim Redis still decides in that period can be drawn with a known seed.
REVEAL_GRACE_MS = 5_000
FIRST_PERIOD, LAST_PERIOD = "1970-01", "9998-12"  # periods a draw can have been held in
LUCKY_BAGS = 6
BLIND_BOXES = 12
ALGORITHM = (
    "value = first 6 bytes (big-endian) of HMAC-SHA256(key = seed, message = "
    "'<user_id>:<request_id>:<nonce>'); target = value mod (sum of the weights in force); "
    "the prize is the first of the weights in force (published order) whose running sum "
    "exceeds target. Weights in force: the prizes with weight > 0 still in stock (own stock, "
    "option cap, codes); when the member's draw is their pity.after-th in a row without a "
    "pity prize, only the pity prizes in stock (if any). commitment = SHA-256(seed)."
)


def period_closes_ms(engine: ClaimEngine, benefit: Benefit, period: str) -> int:
    """When ``period``'s draws end, on the servers' clock (unix ms)."""
    _opens, closes = engine.window(benefit, period)
    if benefit.release.fixed_period:
        assert closes is not None  # a one-off draw must close (see ``parse_benefit``)
        return engine.calendar.real_ms(closes)
    end = engine.calendar.bounds_ms(period)[1]
    return min(end, engine.calendar.real_ms(closes)) if closes is not None else end


def is_revealed(engine: ClaimEngine, benefit: Benefit, period: str) -> bool:
    return engine.redis_ms() >= period_closes_ms(engine, benefit, period) + REVEAL_GRACE_MS


def seeds_of(engine: ClaimEngine) -> DrawSeeds:
    if engine.seeds is None:
        raise BackendUnavailable("draws need PostgreSQL")
    return engine.seeds


def presentation(benefit: Benefit, prize_id: str, value: int | None, pick: int | None) -> Any:
    """What a client animates (never what decides the prize): the nine-grid cell the prize
    sits in, or the bag / box the member tapped (``pick``; else one chosen from the value)."""
    assert benefit.draw is not None
    kind = benefit.draw.type
    if kind == "nine_grid":
        return {"cell": grid_cell(prize_id, benefit.draw), "cells": NINE_GRID_CELLS}
    count = LUCKY_BAGS if kind == "lucky_bag" else BLIND_BOXES
    chosen = pick if pick is not None else (value % count if value is not None else 0)
    name = "bag" if kind == "lucky_bag" else "box"
    return {name: chosen % count, name + "es" if name == "box" else name + "s": count}


def parse_pick(data: dict[str, Any]) -> int | None:
    pick = as_integer(data.get("pick"))
    if pick is None:
        return None
    if isinstance(pick, bool) or not isinstance(pick, int) or not 0 <= pick < 64:
        raise ValidationError("pick must be an integer in 0..63", field="pick")
    return pick


def claim_parts(
    benefit: Benefit | None, decision: ClaimDecision, pick: int | None
) -> dict[str, Any]:
    """The bundle and draw parts of an accepted claim's answer."""
    out: dict[str, Any] = {}
    if len(decision.options) > 1 and decision.claim_id:
        out["options"] = list(decision.options)
        out["items"] = [
            {"option_id": o, "claim_id": bundle_item_id(decision.claim_id, i)}
            for i, o in enumerate(decision.options)
        ]
    draw = decision.draw
    if draw is not None and benefit is not None and benefit.draw is not None:
        prize = benefit.draw.prize(draw.prize_id)
        out["draw"] = {
            "type": benefit.draw.type,
            "prize_id": draw.prize_id,
            "prize_name": prize.name if prize else draw.prize_id,
            "nonce": draw.nonce,
            "value": draw.value,
            "weights": [{"prize_id": p, "weight": w} for p, w in draw.weights] or None,
            "owed_pity": draw.owed,
            "presentation": presentation(benefit, draw.prize_id, draw.value, pick),
        }
    return out


async def claim_proof(app: web.Application, claim: dict[str, Any]) -> dict[str, Any]:
    """The bundle and draw parts of ``GET /v1/claims/{id}``."""
    out: dict[str, Any] = {}
    pool, redis = app[PG], app[REDIS]
    bundle = await pool.fetch(
        """SELECT claim_id, option_id, status, bundle_item, bundle_size FROM claims
           WHERE bundle_id = (SELECT bundle_id FROM claims WHERE claim_id = $1)
           ORDER BY bundle_item""",
        claim["claim_id"],
    )
    if bundle:
        out["bundle"] = {
            "claim_id": bundle[0]["claim_id"] if bundle[0]["bundle_item"] == 0 else None,
            "size": bundle[0]["bundle_size"],
            "items": [
                {"claim_id": r["claim_id"], "option_id": r["option_id"], "status": r["status"]}
                for r in bundle
            ],
        }
    engine = app[ENGINE]
    benefit = await engine.benefit(claim["benefit_id"])
    if benefit is None or benefit.draw is None:
        return out
    stored = await draw_records.find_draw(pool, redis, claim)
    if stored is None:
        return out
    seeds = seeds_of(engine)
    period = stored.period
    revealed = is_revealed(engine, benefit, period)
    proof = stored.to_json()
    proof["commitment"] = await seeds.commitment(benefit.benefit_id, period, create=False)
    proof["seed"] = (await seeds.seed(benefit.benefit_id, period)).hex() if revealed else None
    proof["algorithm"] = ALGORITHM
    prize = benefit.draw.prize(stored.record.prize_id or "")
    out["draw"] = {
        "type": benefit.draw.type,
        "prize_id": stored.record.prize_id,
        "prize_name": prize.name if prize else stored.record.prize_id,
        "presentation": presentation(benefit, stored.record.prize_id or "", stored.value, None),
        "proof": proof,
    }
    return out


async def _draw_benefit(request: web.Request) -> tuple[ClaimEngine, Benefit, str]:
    request.app[VERIFIER].verify(bearer(request.headers.get("Authorization")))
    benefit_id = request.match_info["benefit_id"]
    engine = request.app[ENGINE]
    benefit = await engine.benefit(benefit_id) if ID_RE.match(benefit_id) else None
    if benefit is None:
        raise NotFoundError("unknown_benefit", "no such benefit")
    if benefit.draw is None:
        raise NotFoundError("not_a_draw", f"benefit {benefit_id!r} is not a draw")
    period = request.query.get("period") or engine.current_period(benefit)
    periods.parse_period(period)
    if not FIRST_PERIOD <= period <= LAST_PERIOD:
        raise ValidationError(f"period must be in {FIRST_PERIOD}..{LAST_PERIOD}", field="period")
    return engine, benefit, period


async def get_draw(request: web.Request) -> web.Response:
    engine, benefit, period = await _draw_benefit(request)
    assert benefit.draw is not None
    current = engine.current_period(benefit)
    # Seeds are made for the current and the next period on sight, never for any other.
    create = period in (current, periods.next_period(current))
    seeds = seeds_of(engine)
    commitment = await seeds.commitment(benefit.benefit_id, period, create=create)
    revealed = commitment is not None and is_revealed(engine, benefit, period)
    levels = await draw_records.prize_levels(request.app[REDIS], benefit, period, engine.redis_ms())
    in_force = [(p.prize_id, p.weight) for p in benefit.draw.prizes if levels[p.prize_id][2]]
    chances = odds(in_force)
    prizes = []
    for prize in benefit.draw.prizes:
        taken, left, drawable = levels[prize.prize_id]
        entry = {
            **prize.to_json(),
            "taken": taken,
            "left": left,
            "in_stock": drawable,
            "probability": chances.get(prize.prize_id, 0.0),
        }
        if benefit.draw.type == "nine_grid":
            entry["cell"] = grid_cell(prize.prize_id, benefit.draw)
        prizes.append(entry)
    pity = benefit.draw.pity
    closes = period_closes_ms(engine, benefit, period)
    return json_response(
        {
            "benefit_id": benefit.benefit_id,
            "period": period,
            "type": benefit.draw.type,
            "commitment": commitment,
            "seed": (await seeds.seed(benefit.benefit_id, period)).hex() if revealed else None,
            "reveals_at": periods.from_ms(
                closes + REVEAL_GRACE_MS + engine.calendar.shift_ms, engine.tz
            ).isoformat(),
            "prizes": prizes,
            "pity": {"after": pity.after, "prize_ids": list(pity.prize_ids)} if pity else None,
            "price_points": benefit.price_points,
            "algorithm": ALGORITHM,
        }
    )


async def get_results(request: web.Request) -> web.Response:
    engine, benefit, period = await _draw_benefit(request)
    counts = await draw_records.results(request.app[PG], benefit, period)
    return json_response(
        {
            "benefit_id": benefit.benefit_id,
            "period": period,
            "final": is_revealed(engine, benefit, period),
            "draws": sum(c["drawn"] for c in counts),
            "prizes": counts,
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/benefits/{benefit_id}/draw", get_draw)
    app.router.add_get("/v1/benefits/{benefit_id}/draw/results", get_results)
