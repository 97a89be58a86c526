"""Zones of the catalogue and the tier ladder: where benefits are shown, and what a member's
next tier unlocks (a zone, a benefit, a larger quota)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from claim_service.domain.catalogue import MAX_TIER, Benefit, _int, _str, check_id
from claim_service.errors import ValidationError

MAX_POSITION = 1_000_000


@dataclass(frozen=True)
class Zone:
    zone_id: str
    name: str
    min_tier: int  # members below it see the zone locked
    position: int  # zones are listed by position, then zone_id

    def to_json(self) -> dict[str, Any]:
        return {
            "zone_id": self.zone_id,
            "name": self.name,
            "min_tier": self.min_tier,
            "position": self.position,
        }


def zone_order(zone: Zone) -> tuple[int, str]:
    """The order zones are listed in."""
    return zone.position, zone.zone_id


def parse_zone(zone_id: str, data: Any) -> Zone:
    """Validate the admin JSON for a zone; raises ``ValidationError`` naming the field."""
    check_id(zone_id, "zone_id")
    if not isinstance(data, dict):
        raise ValidationError("zone must be a JSON object")
    name = _str(data, "name", 200)
    if name is None:
        raise ValidationError("name is required", field="name")
    return Zone(
        zone_id=zone_id,
        name=name,
        min_tier=_int(data, "min_tier", 0, MAX_TIER),
        position=_int(data, "position", 0, MAX_POSITION),
    )


def next_tier(
    tier: int, zones: Iterable[Zone], benefits: Iterable[Benefit]
) -> dict[str, Any] | None:
    """What the nearest tier above ``tier`` that unlocks anything unlocks: zones opening at
    it, benefits becoming claimable by tier, and larger quotas of benefits already claimable.
    ``None`` when no higher tier unlocks anything."""
    ordered = sorted(zones, key=zone_order)
    catalogue = list(benefits)
    steps = {z.min_tier for z in ordered} | {b.min_tier for b in catalogue}
    steps |= {s.min_tier for b in catalogue for s in b.quota}
    for step in sorted(t for t in steps if tier < t <= MAX_TIER):
        opened = [z for z in ordered if z.min_tier == step]
        eligible = [b for b in catalogue if b.min_tier == step]
        # A benefit newly eligible is listed once, under ``benefits``, not again here.
        larger = [
            b for b in catalogue if b.min_tier <= tier and b.quota_for(step) > b.quota_for(tier)
        ]
        if opened or eligible or larger:
            return {
                "tier": step,
                "zones": [{"zone_id": z.zone_id, "name": z.name} for z in opened],
                "benefits": [
                    {"benefit_id": b.benefit_id, "name": b.name, "zone": b.zone} for b in eligible
                ],
                "quotas": [
                    {
                        "benefit_id": b.benefit_id,
                        "name": b.name,
                        "allowed_now": b.quota_for(tier),
                        "allowed": b.quota_for(step),
                    }
                    for b in larger
                ],
            }
    return None
