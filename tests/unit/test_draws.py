"""The draw algorithm: odds as published (chi-square over 100,000 draws), sold-out prizes never
drawn, pity on exactly the N-th draw, and the value reimplemented from the documented steps."""

from __future__ import annotations

import hashlib
import hmac
import math
from collections import Counter
from dataclasses import replace

import pytest

from claim_service.domain.draws import (
    VALUE_RANGE,
    AuditRecord,
    Draw,
    DrawRecord,
    Pity,
    PityCounter,
    Prize,
    audit,
    candidates,
    commitment,
    draw_value,
    odds,
    parse_draw,
    pick,
    verify,
)
from claim_service.errors import ValidationError

SEED = hashlib.sha256(b"claim-service draw test seed").digest()
DRAWS = 100_000
P_VALUE = 0.001


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X chi-square with ``dof`` degrees of freedom: the regularized
    upper incomplete gamma Q(dof/2, statistic/2), by its power series."""
    a, x = dof / 2, statistic / 2
    if x <= 0:
        return 1.0
    term = total = 1 / a
    n = 0
    while term > total * 1e-15:
        n += 1
        term *= x / (a + n)
        total += term
    lower = math.exp(-x + a * math.log(x) - math.lgamma(a)) * total
    return max(0.0, 1.0 - lower)


def chi_square(counts: Counter[str | None], probabilities: dict[str, float], n: int) -> float:
    return sum((counts[k] - n * p) ** 2 / (n * p) for k, p in probabilities.items())


def test_the_chi_square_tail_is_right_where_it_is_known() -> None:
    # Critical values of the chi-square distribution at p = 0.001 (any statistics table).
    assert chi2_sf(10.828, 1) == pytest.approx(0.001, rel=1e-3)
    assert chi2_sf(16.266, 3) == pytest.approx(0.001, rel=1e-3)
    assert chi2_sf(3.0, 2) == pytest.approx(math.exp(-1.5), rel=1e-9)


PRIZES = (
    Prize("gold", "Gold", 1, None, "o"),
    Prize("silver", "Silver", 10, None, "o"),
    Prize("bronze", "Bronze", 100, None, "o"),
    Prize("thanks", "Thanks", 889, None, "o"),
)


def test_one_hundred_thousand_draws_match_the_published_odds() -> None:
    draw = Draw("blind_box", PRIZES)
    weighted = candidates(draw, {})
    counts = Counter(pick(draw_value(SEED, f"m{i % 977}", f"r{i}"), weighted) for i in range(DRAWS))
    assert set(counts) == {p.prize_id for p in PRIZES}
    statistic = chi_square(counts, odds(weighted), DRAWS)
    assert chi2_sf(statistic, len(PRIZES) - 1) > P_VALUE, (statistic, counts)


def test_a_prize_out_of_stock_is_never_drawn_and_the_odds_are_those_left() -> None:
    draw = Draw("nine_grid", PRIZES)
    left: dict[str, int | None] = {"gold": 0, "silver": 0, "bronze": None, "thanks": None}
    weighted = candidates(draw, left)
    assert [c[0] for c in weighted] == ["bronze", "thanks"]
    counts = Counter(pick(draw_value(SEED, "m", f"r{i}"), weighted) for i in range(DRAWS))
    assert counts["gold"] == counts["silver"] == 0
    statistic = chi_square(counts, odds(weighted), DRAWS)
    assert chi2_sf(statistic, 1) > P_VALUE, (statistic, counts)
    assert candidates(draw, dict.fromkeys(left, 0)) == []
    assert pick(0, []) is None


def test_stock_runs_down_draw_by_draw_and_never_below_zero() -> None:
    draw = Draw("lucky_bag", (Prize("a", "A", 50, 3, "o"), Prize("b", "B", 50, 5, "o")))
    left: dict[str, int | None] = {"a": 3, "b": 5}
    drawn = []
    for i in range(20):
        prize = pick(draw_value(SEED, "m", f"r{i}"), candidates(draw, left))
        if prize is None:
            break
        left[prize] = (left[prize] or 0) - 1
        drawn.append(prize)
    assert Counter(drawn) == {"a": 3, "b": 5}
    assert left == {"a": 0, "b": 0}


@pytest.mark.parametrize("after", [1, 3, 10])
def test_pity_gives_a_listed_prize_on_exactly_the_nth_draw_without_one(after: int) -> None:
    draw = Draw("blind_box", PRIZES, Pity(after, ("gold", "silver")))
    counter = PityCounter(draw.pity)
    streak = 0
    for i in range(5_000):
        owed = counter.owed
        assert owed == (streak + 1 == after)
        prize = pick(draw_value(SEED, "m", f"r{i}"), candidates(draw, {}, owed_pity=owed))
        assert prize is not None
        if owed:
            assert prize in ("gold", "silver")
        counter.record(prize)
        streak = 0 if prize in ("gold", "silver") else streak + 1
        assert streak < after


def test_the_value_follows_the_documented_steps() -> None:
    seed = bytes(range(32))
    digest = hmac.new(seed, "会员-1:req-1:2".encode(), hashlib.sha256).digest()
    assert draw_value(seed, "会员-1", "req-1", 2) == int.from_bytes(digest[:6], "big")
    assert 0 <= draw_value(seed, "m", "r") < VALUE_RANGE
    assert commitment(seed) == hashlib.sha256(seed).hexdigest()
    # target = v mod T, first prize whose running weight exceeds it
    weighted = [("a", 2), ("b", 3)]
    assert [pick(v, weighted) for v in range(6)] == ["a", "a", "b", "b", "b", "a"]


def test_the_prize_table_is_validated() -> None:
    good = {
        "type": "nine_grid",
        "prizes": [
            {"prize_id": "p1", "name": "Lounge", "weight": 1, "stock": 1, "option_id": "o1"},
            {"prize_id": "thanks", "weight": 99, "option_id": "o2"},
        ],
        "pity": {"after": 10, "prize_ids": ["p1"]},
    }
    draw = parse_draw(good, ["o1", "o2"])
    assert draw.pity == Pity(10, ("p1",)) and draw.prizes[1].stock is None
    for broken, field in (
        ({**good, "type": "wheel"}, "draw.type"),
        ({**good, "prizes": []}, "draw.prizes"),
        ({**good, "pity": {"after": 0, "prize_ids": ["p1"]}}, "draw.pity.after"),
        ({**good, "pity": {"after": 2, "prize_ids": ["nope"]}}, "draw.pity.prize_ids"),
    ):
        with pytest.raises(ValidationError) as caught:
            parse_draw(broken, ["o1", "o2"])
        assert caught.value.field == field
    with pytest.raises(ValidationError):
        parse_draw(good, ["o1"])  # a prize naming no option


def test_verification_recomputes_every_draw_and_finds_an_altered_record() -> None:
    draw = Draw("blind_box", (Prize("a", "A", 1, 5, "o"), Prize("b", "B", 3, None, "o")))
    left: dict[str, int | None] = {"a": 5, "b": None}
    records = []
    for i in range(200):
        weighted = tuple(candidates(draw, left))
        prize = pick(draw_value(SEED, f"m{i}", "r", 0), weighted)
        assert prize is not None
        if left[prize] is not None:
            left[prize] = (left[prize] or 0) - 1
        records.append(DrawRecord(f"m{i}", "r", 0, weighted, prize))
    assert left["a"] == 0  # the rare prize sold out along the way
    assert verify(SEED, records) == []
    altered = list(records)
    first_b = next(i for i, r in enumerate(records) if r.prize_id == "b")
    altered[first_b] = replace(records[first_b], prize_id="a")
    assert verify(SEED, altered) == [(first_b, "b")]
    assert verify(hashlib.sha256(b"another seed").digest(), records) != []


def _audited(draw: Draw, members: int, draws: int) -> list[AuditRecord]:
    """Records made the way ``claim.lua`` makes them: in-stock candidates, pity, streaks."""
    left = {p.prize_id: p.stock for p in draw.prizes}
    counters: dict[str, PityCounter] = {}
    records = []
    seq = 0
    for n in range(draws):
        for i in range(members):
            counter = counters.setdefault(f"m{i}", PityCounter(draw.pity))
            weighted = tuple(candidates(draw, left, owed_pity=counter.owed))
            owed = counter.owed and all(
                p in (draw.pity.prize_ids if draw.pity else ()) for p, _ in weighted
            )
            value = draw_value(SEED, f"m{i}", f"r{n}", 0)
            prize = pick(value, weighted)
            assert prize is not None
            if left[prize] is not None:
                left[prize] = (left[prize] or 0) - 1
            counter.record(prize)
            seq += 1
            records.append(
                AuditRecord(
                    f"c{seq}",
                    DrawRecord(f"m{i}", f"r{n}", 0, weighted, prize),
                    value,
                    owed,
                    counter.streak,
                    seq,
                )
            )
    return records


def test_the_audit_checks_commitment_values_weights_and_pity_chains() -> None:
    draw = Draw(
        "nine_grid",
        (
            Prize("a", "A", 1, 3, "o"),
            Prize("b", "B", 10, None, "o"),
            Prize("c", "C", 89, None, "o"),
        ),
        Pity(3, ("a", "b")),
    )
    records = _audited(draw, members=5, draws=12)
    assert any(r.owed for r in records)
    published = commitment(SEED)
    assert audit(SEED, published, records, draw) == []
    assert [m.what for m in audit(SEED, "0" * 64, records, draw)] == [
        "the seed's SHA-256 is not the published commitment"
    ]
    # A prize's weight in force that is not the published one.
    first = records[0]
    heavier = replace(
        first,
        record=replace(first.record, weights=tuple((p, w * 2) for p, w in first.record.weights)),
    )
    found = audit(SEED, published, [heavier, *records[1:]], draw)
    assert {m.claim_id for m in found} == {first.claim_id}
    # A member owed the pity prize who was drawn among all prizes (and a streak not reset).
    owed_at = next(i for i, r in enumerate(records) if r.owed)
    owed = records[owed_at]
    unrestricted = replace(
        owed,
        owed=False,
        record=replace(owed.record, weights=tuple((p.prize_id, p.weight) for p in draw.prizes)),
    )
    tampered = [*records[:owed_at], unrestricted, *records[owed_at + 1 :]]
    assert owed.claim_id in {m.claim_id for m in audit(SEED, published, tampered, draw)}
    # A recorded value that is not the HMAC of the inputs.
    wrong_value = replace(records[5], value=records[5].value + 1)
    found = audit(SEED, published, [*records[:5], wrong_value, *records[6:]], draw)
    assert any(m.claim_id == wrong_value.claim_id and "value" in m.what for m in found)
