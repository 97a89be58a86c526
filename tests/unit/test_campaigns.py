"""Campaign definitions and codes: what ops may set, and what a typed code may look like."""

from __future__ import annotations

from typing import Any

import pytest

from claim_service.domain.campaigns import mask, normalise_code, parse_campaign
from claim_service.domain.fields import ConflictingFields
from claim_service.errors import ValidationError

BASE: dict[str, Any] = {
    "type": "referral",
    "name": "Invite two friends",
    "starts_at": "2026-12-01T00:00:00+08:00",
    "ends_at": "2027-03-01T00:00:00+08:00",
    "qualify_event": "first_swipe",
    "invitees_required": 2,
    "reward": {"points": 100},
    "budget": 10,
}


def test_a_campaign_round_trips() -> None:
    campaign = parse_campaign("mgm", {**BASE, "tiers": [{"count": 3.0, "reward": {"points": 5}}]})
    assert campaign.levels()[1][0] == 3 and campaign.name == "Invite two friends"
    assert parse_campaign("mgm", campaign.to_json()) == campaign


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "pyramid"}, "type"),
        ({"qualify_event": "account_opened"}, "qualify_event"),
        ({"invitees_required": 0}, "invitees_required"),
        ({"reward": {"points": 1, "benefit_id": "x"}}, "reward"),
        ({"reward": {"points": 0}}, "reward.points"),
        ({"budget": True}, "budget"),
        ({"tiers": [{"count": 3}]}, "tiers[0].reward"),
    ],
)
def test_malformed_campaigns_are_refused(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_campaign("mgm", {**BASE, **change})
    assert caught.value.field == field and not isinstance(caught.value, ConflictingFields)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ends_at": "2026-11-01T00:00:00+08:00"}, "ends_at"),
        ({"ends_at": "9999-12-31T23:59:59-01:00"}, "ends_at"),  # no such instant in PostgreSQL
        ({"starts_at": "0001-01-01T00:00:00+01:00"}, "starts_at"),
        ({"tiers": [{"count": 2, "reward": {"points": 5}}]}, "tiers"),
        ({"type": "team", "tiers": [{"count": 3, "reward": {"points": 5}}]}, "tiers"),
        ({"team_ttl_seconds": 60}, "team_ttl_seconds"),
        ({"points_budget": 5, "reward": {"benefit_id": "gift"}}, "points_budget"),
    ],
)
def test_contradicting_fields_are_refused(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ConflictingFields) as caught:
        parse_campaign("mgm", {**BASE, **change})
    assert caught.value.field == field


def test_codes_are_read_as_members_type_them() -> None:
    assert normalise_code(" abcd-efgh ") == "ABCDEFGH"
    for bad in ("ABCDEFG", "ABCDEFG0", "ABCDEFGHJ", 12345678, None):
        with pytest.raises(ValidationError):
            normalise_code(bad)
    assert mask("member-42") == "me***42" and mask("ab") == "a***"
