"""Draws (blind box 盲盒, nine-grid 九宫格, lucky bag 福袋): the prize table and the provably
fair algorithm, as plain functions anyone can reimplement from this docstring.

**Commitment.** Per benefit and period a secret seed (32 random bytes) is made before the
opening; ``commitment(seed)`` = hex SHA-256 of the seed is published, the seed itself when
the period closes.

**A draw's random value.** ``draw_value(seed, user_id, request_id, nonce)`` is
HMAC-SHA256(key = seed, message = UTF-8 of ``"<user_id>:<request_id>:<nonce>"``); its first
6 bytes, big-endian, are the value ``v`` (0 <= v < 2**48). ``nonce`` is the draw's index
within its claim (0 for a single draw).

**From the value to a prize.** The candidates are the prizes, in the order published, whose
weight is above 0 and which still have stock at that moment (a prize without a stock never
runs out); when the member is owed a guaranteed prize (see pity) only the listed pity prizes
in stock are candidates, unless none is in stock. With ``T`` the sum of the candidates'
weights, ``target = v mod T``; the prize drawn is the first candidate whose running sum of
weights exceeds ``target``. (The modulo bias is at most T / 2**48: below 1e-8 for weights
summing to a million.) No candidate: nothing is drawn (the draw is sold out).

**Pity (保底).** ``{"after": N, "prize_ids": [...]}``: a member's N-th draw in a row without
one of the listed prizes draws among the listed prizes (in stock); drawing one of them starts
the count again.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from claim_service.domain.fields import (
    CONTROL_RE,
    MAX_STOCK,
    ConflictingFields,
    as_integer,
    check_id,
)
from claim_service.errors import ValidationError

DRAW_TYPES = ("blind_box", "nine_grid", "lucky_bag")
VALUE_BYTES = 6
VALUE_RANGE = 1 << (8 * VALUE_BYTES)
MAX_PRIZES = 64
MAX_WEIGHT = 1_000_000
MAX_PITY = 10_000
NINE_GRID_CELLS = 8  # the centre cell is the button


@dataclass(frozen=True)
class Prize:
    prize_id: str
    name: str
    weight: int
    stock: int | None  # None: never runs out ("thanks for playing")
    option_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "prize_id": self.prize_id,
            "name": self.name,
            "weight": self.weight,
            "stock": self.stock,
            "option_id": self.option_id,
        }


@dataclass(frozen=True)
class Pity:
    after: int
    prize_ids: tuple[str, ...]


@dataclass(frozen=True)
class Draw:
    type: str
    prizes: tuple[Prize, ...]
    pity: Pity | None = None

    def prize(self, prize_id: str) -> Prize | None:
        return next((p for p in self.prizes if p.prize_id == prize_id), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "prizes": [p.to_json() for p in self.prizes],
            "pity": (
                {"after": self.pity.after, "prize_ids": list(self.pity.prize_ids)}
                if self.pity
                else None
            ),
        }


def commitment(seed: bytes) -> str:
    return hashlib.sha256(seed).hexdigest()


def draw_value(seed: bytes, user_id: str, request_id: str, nonce: int = 0) -> int:
    message = f"{user_id}:{request_id}:{nonce}".encode()
    digest = hmac.new(seed, message, hashlib.sha256).digest()
    return int.from_bytes(digest[:VALUE_BYTES], "big")


def candidates(
    draw: Draw, left: Mapping[str, int | None], *, owed_pity: bool = False
) -> list[tuple[str, int]]:
    """(prize_id, weight) of the prizes that can be drawn now, in published order; ``left``
    maps each prize to its stock left (None: unlimited)."""
    in_stock = [
        (p.prize_id, p.weight)
        for p in draw.prizes
        if p.weight > 0 and (left.get(p.prize_id) is None or (left[p.prize_id] or 0) > 0)
    ]
    if owed_pity and draw.pity is not None:
        owed = [c for c in in_stock if c[0] in draw.pity.prize_ids]
        if owed:
            return owed
    return in_stock


def pick(value: int, weighted: Sequence[tuple[str, int]]) -> str | None:
    """The prize ``value`` draws among ``weighted`` (see the module's docstring)."""
    total = sum(weight for _, weight in weighted)
    if total <= 0:
        return None
    target = value % total
    running = 0
    for prize_id, weight in weighted:
        running += weight
        if target < running:
            return prize_id
    raise AssertionError("unreachable: target < total")


def odds(weighted: Sequence[tuple[str, int]]) -> dict[str, float]:
    """Each candidate's probability."""
    total = sum(weight for _, weight in weighted)
    return {prize_id: weight / total for prize_id, weight in weighted} if total else {}


def grid_cell(prize_id: str, draw: Draw) -> int:
    """Where a nine-grid shows a prize: the ring's cells 0..7 clockwise from the top left,
    prizes in published order (more than eight prizes share cells). Presentation only."""
    index = next(i for i, p in enumerate(draw.prizes) if p.prize_id == prize_id)
    return index % NINE_GRID_CELLS


def parse_draw(data: Any, option_ids: Sequence[str]) -> Draw:
    """``{"type", "prizes": [{"prize_id", "name", "weight", "stock", "option_id"}], "pity"}``."""
    if not isinstance(data, dict):
        raise ValidationError("draw must be an object", field="draw")
    kind = data.get("type")
    if kind not in DRAW_TYPES:
        raise ValidationError(
            f"draw.type must be one of {', '.join(DRAW_TYPES)}", field="draw.type"
        )
    raw = data.get("prizes")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_PRIZES:
        raise ValidationError(f"draw.prizes must be a list of 1..{MAX_PRIZES}", field="draw.prizes")
    prizes = tuple(_prize(item, i, option_ids) for i, item in enumerate(raw))
    if len({p.prize_id for p in prizes}) != len(prizes):
        raise ConflictingFields("prize ids must be unique", field="draw.prizes")
    if not any(p.weight > 0 for p in prizes):
        raise ConflictingFields("at least one prize needs a weight above 0", field="draw.prizes")
    pity = None
    if data.get("pity") is not None:
        pity = _pity(data["pity"], {p.prize_id for p in prizes})
    return Draw(kind, prizes, pity)


def _whole(data: dict[str, Any], name: str, lo: int, hi: int, field: str) -> int:
    value = as_integer(data.get(name))
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationError(f"{field} must be an integer in {lo}..{hi}", field=field)
    return value


def _prize(item: Any, index: int, option_ids: Sequence[str]) -> Prize:
    where = f"draw.prizes[{index}]"
    if not isinstance(item, dict):
        raise ValidationError(f"{where} must be an object", field=where)
    prize_id = check_id(item.get("prize_id"), f"{where}.prize_id")
    name = item.get("name", prize_id)
    if not isinstance(name, str) or not 0 < len(name) <= 200 or CONTROL_RE.search(name):
        raise ValidationError(
            f"{where}.name must be 1..200 characters, no control characters",
            field=f"{where}.name",
        )
    option_id = check_id(item.get("option_id"), f"{where}.option_id")
    if option_id not in option_ids:
        raise ConflictingFields(f"{where}.option_id names no option", field=f"{where}.option_id")
    stock = None
    if item.get("stock") is not None:
        stock = _whole(item, "stock", 0, MAX_STOCK, f"{where}.stock")
    weight = _whole(item, "weight", 0, MAX_WEIGHT, f"{where}.weight")
    return Prize(prize_id, name, weight, stock, option_id)


def _pity(data: Any, prize_ids: set[str]) -> Pity:
    if not isinstance(data, dict):
        raise ValidationError("draw.pity must be an object", field="draw.pity")
    after = _whole(data, "after", 1, MAX_PITY, "draw.pity.after")
    listed = data.get("prize_ids")
    if not isinstance(listed, list) or not listed or not all(isinstance(p, str) for p in listed):
        raise ValidationError(
            "draw.pity.prize_ids must list prize ids", field="draw.pity.prize_ids"
        )
    if not set(listed) <= prize_ids:
        raise ConflictingFields("draw.pity.prize_ids names no prize", field="draw.pity.prize_ids")
    return Pity(after, tuple(dict.fromkeys(listed)))


class PityCounter:
    """A member's draws in a row without a pity prize (the model ``claim.lua`` follows)."""

    def __init__(self, pity: Pity | None) -> None:
        self.pity = pity
        self.streak = 0

    @property
    def owed(self) -> bool:
        return self.pity is not None and self.streak + 1 >= self.pity.after

    def record(self, prize_id: str) -> None:
        if self.pity is not None and prize_id in self.pity.prize_ids:
            self.streak = 0
        else:
            self.streak += 1


@dataclass(frozen=True)
class DrawRecord:
    """What a draw's proof holds: its inputs, the candidates and weights in force when it
    was decided (published order), and the prize it gave."""

    user_id: str
    request_id: str
    nonce: int
    weights: tuple[tuple[str, int], ...]
    prize_id: str | None


def verify(seed: bytes, records: Sequence[DrawRecord]) -> list[tuple[int, str | None]]:
    """Recompute every record's draw from the revealed seed: (index, the prize it should have
    given) for each record whose prize differs. Empty: every draw checks out."""
    wrong = []
    for index, record in enumerate(records):
        value = draw_value(seed, record.user_id, record.request_id, record.nonce)
        expected = pick(value, record.weights)
        if expected != record.prize_id:
            wrong.append((index, expected))
    return wrong


@dataclass(frozen=True)
class AuditRecord:
    """A recorded draw as ``verify-draws`` reads it (see ``store.draw_records``)."""

    claim_id: str
    record: DrawRecord
    value: int
    owed: bool
    streak: int
    seq: int


@dataclass(frozen=True)
class Mismatch:
    claim_id: str
    what: str


def audit(
    seed: bytes, published: str, records: Sequence[AuditRecord], draw: Draw | None
) -> list[Mismatch]:
    """Everything that does not check out when the period's draws (in ``seq`` order) are
    recomputed from ``seed``: the commitment, each draw's value and prize, the weights in
    force against the prize table ``draw`` (when given), and each member's pity count."""
    found = []
    if commitment(seed) != published:
        found.append(Mismatch("", "the seed's SHA-256 is not the published commitment"))
    weights = {p.prize_id: p.weight for p in draw.prizes} if draw else {}
    pity = draw.pity if draw else None
    streaks: dict[str, int] = {}
    for item in sorted(records, key=lambda r: r.seq):
        record = item.record
        value = draw_value(seed, record.user_id, record.request_id, record.nonce)
        if value != item.value:
            found.append(Mismatch(item.claim_id, f"value {item.value} recorded, {value} computed"))
        expected = pick(value, record.weights)
        if expected != record.prize_id:
            found.append(
                Mismatch(item.claim_id, f"prize {record.prize_id} recorded, {expected} computed")
            )
        if draw is not None:
            for prize_id, weight in record.weights:
                if weights.get(prize_id) != weight:
                    found.append(
                        Mismatch(
                            item.claim_id,
                            f"weight {weight} of {prize_id} is not the published "
                            f"{weights.get(prize_id)}",
                        )
                    )
        if pity is None:
            continue
        before = streaks.get(record.user_id, 0)
        restricted = all(p in pity.prize_ids for p, _ in record.weights)
        if item.owed and (before + 1 < pity.after or not restricted):
            found.append(Mismatch(item.claim_id, "drawn as owed the pity prize, but was not"))
        if (
            not item.owed
            and before + 1 >= pity.after
            and any(p in pity.prize_ids for p, _ in record.weights)
        ):
            found.append(Mismatch(item.claim_id, "owed the pity prize, but drawn among all"))
        after = 0 if record.prize_id in pity.prize_ids else before + 1
        if after != item.streak:
            found.append(Mismatch(item.claim_id, f"streak {item.streak} recorded, {after} due"))
        streaks[record.user_id] = after
    return found
