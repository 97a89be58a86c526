"""Zones and the tier ladder (pure functions, no servers)."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

import pytest

from claim_service.domain.catalogue import Benefit, parse_benefit
from claim_service.domain.zones import Zone, next_tier, parse_zone
from claim_service.errors import ValidationError

SHANGHAI = ZoneInfo("Asia/Shanghai")


def benefit(benefit_id: str, min_tier: int, quota: Any = 1, zone: str | None = None) -> Benefit:
    body = {
        "name": benefit_id.title(),
        "min_tier": min_tier,
        "quota": quota,
        "stock_per_period": 100,
        "release": {"type": "monthly", "day": 10, "time": "10:00"},
        "options": [{"option_id": "o", "kind": "card_key"}],
        "zone": zone,
    }
    return parse_benefit(benefit_id, body, SHANGHAI)


ZONES = [
    Zone("lounge", "Airport lounges", 8, 20),
    Zone("basics", "Everyday", 0, 10),
    Zone("vip", "VIP", 12, 30),
]
VIDEO = benefit("video", 4, [{"min_tier": 4, "per_period": 1}, {"min_tier": 12, "per_period": 3}])
LOUNGE = benefit("lounge-pass", 8, 1, zone="lounge")
COFFEE = benefit("coffee", 0, 2, zone="basics")


def test_parse_zone() -> None:
    zone = parse_zone("lounge", {"name": "Airport lounges", "min_tier": 8.0, "position": 20})
    assert zone == Zone("lounge", "Airport lounges", 8, 20)
    assert zone.to_json() == {
        "zone_id": "lounge",
        "name": "Airport lounges",
        "min_tier": 8,
        "position": 20,
    }
    # Unknown keys are ignored, as in a benefit.
    assert parse_zone("z", {"name": "Z", "min_tier": 0, "position": 0, "x": 1}).position == 0


@pytest.mark.parametrize(
    ("zone_id", "data", "field"),
    [
        ("bad id", {"name": "Z", "min_tier": 0, "position": 0}, "zone_id"),
        ("", {"name": "Z", "min_tier": 0, "position": 0}, "zone_id"),
        ("z", {"min_tier": 0, "position": 0}, "name"),
        ("z", {"name": "", "min_tier": 0, "position": 0}, "name"),
        ("z", {"name": "a\x00b", "min_tier": 0, "position": 0}, "name"),
        ("z", {"name": "a" * 201, "min_tier": 0, "position": 0}, "name"),
        ("z", {"name": 5, "min_tier": 0, "position": 0}, "name"),
        ("z", {"name": "Z", "position": 0}, "min_tier"),
        ("z", {"name": "Z", "min_tier": 100, "position": 0}, "min_tier"),
        ("z", {"name": "Z", "min_tier": True, "position": 0}, "min_tier"),
        ("z", {"name": "Z", "min_tier": 1.5, "position": 0}, "min_tier"),
        ("z", {"name": "Z", "min_tier": 0}, "position"),
        ("z", {"name": "Z", "min_tier": 0, "position": -1}, "position"),
        ("z", {"name": "Z", "min_tier": 0, "position": "1"}, "position"),
        ("z", {"name": "Z", "min_tier": 0, "position": 1_000_001}, "position"),
    ],
    ids=repr,
)
def test_invalid_zones_name_the_field(zone_id: str, data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_zone(zone_id, data)
    assert caught.value.field == field
    assert field in str(caught.value)


def test_a_zone_must_be_an_object() -> None:
    with pytest.raises(ValidationError, match="object"):
        parse_zone("z", ["name"])


def test_next_tier_is_the_nearest_one_that_unlocks_anything() -> None:
    benefits = [VIDEO, LOUNGE, COFFEE]
    assert next_tier(4, ZONES, benefits) == {
        "tier": 8,
        "zones": [{"zone_id": "lounge", "name": "Airport lounges"}],
        "benefits": [{"benefit_id": "lounge-pass", "name": "Lounge-Pass", "zone": "lounge"}],
        "quotas": [],
    }
    # From V8 on the next step is V12: a zone and video's larger quota.
    for tier in (8, 11):
        assert next_tier(tier, ZONES, benefits) == {
            "tier": 12,
            "zones": [{"zone_id": "vip", "name": "VIP"}],
            "benefits": [],
            "quotas": [{"benefit_id": "video", "name": "Video", "allowed_now": 1, "allowed": 3}],
        }
    assert next_tier(12, ZONES, benefits) is None
    assert next_tier(99, ZONES, benefits) is None


def test_a_larger_quota_alone_is_a_step() -> None:
    assert next_tier(5, [], [VIDEO]) == {
        "tier": 12,
        "zones": [],
        "benefits": [],
        "quotas": [{"benefit_id": "video", "name": "Video", "allowed_now": 1, "allowed": 3}],
    }


def test_a_benefit_newly_eligible_is_not_also_a_larger_quota() -> None:
    # Below its min_tier the member may claim none of it: at V4 it is a benefit unlocked.
    step = next_tier(0, [], [VIDEO])
    assert step is not None and step["tier"] == 4
    assert step["benefits"] == [{"benefit_id": "video", "name": "Video", "zone": None}]
    assert step["quotas"] == []


def test_steps_that_unlock_nothing_are_skipped() -> None:
    # A quota step that lowers the quota, and a zone already open, unlock nothing.
    shrinking = benefit(
        "odd", 0, [{"min_tier": 0, "per_period": 2}, {"min_tier": 6, "per_period": 1}]
    )
    same = benefit("flat", 0, [{"min_tier": 0, "per_period": 1}, {"min_tier": 7, "per_period": 1}])
    zones = [Zone("open", "Open", 0, 0), Zone("later", "Later", 9, 1)]
    step = next_tier(3, zones, [shrinking, same])
    assert step is not None
    assert step["tier"] == 9 and step["zones"] == [{"zone_id": "later", "name": "Later"}]
    assert next_tier(9, zones, [shrinking, same]) is None


def test_zones_unlocked_together_come_by_position() -> None:
    zones = [Zone("b", "B", 5, 2), Zone("c", "C", 5, 1), Zone("a", "A", 5, 2)]
    step = next_tier(1, zones, [])
    assert step is not None
    assert [z["zone_id"] for z in step["zones"]] == ["c", "a", "b"]


def test_nothing_at_all() -> None:
    assert next_tier(0, [], []) is None
