"""Benefit definitions, release windows and periods (pure functions, no servers)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from claim_service.domain import periods
from claim_service.domain.catalogue import parse_benefit
from claim_service.errors import ValidationError

SHANGHAI = ZoneInfo("Asia/Shanghai")


def body(**overrides: object) -> dict[str, object]:
    return {
        "min_tier": 4,
        "quota": [{"min_tier": 4, "per_period": 1}, {"min_tier": 8, "per_period": 2}],
        "stock_per_period": 80000,
        "release": {"type": "monthly", "day": 10, "time": "10:00"},
        "options": [{"option_id": "iqiyi", "kind": "direct_charge", "partner": "p", "sku": "s"}],
        **overrides,
    }


def test_monthly_release_opens_on_the_10th_at_10_local_time() -> None:
    benefit = parse_benefit("video", body(), SHANGHAI)
    opens, closes = benefit.release.window("2026-12", SHANGHAI)
    assert opens == datetime(2026, 12, 10, 10, 0, tzinfo=SHANGHAI)
    assert opens.astimezone(ZoneInfo("UTC")).hour == 2
    assert closes is None


def test_monthly_day_is_clamped_to_the_month() -> None:
    release = {
        "type": "monthly",
        "day": 31,
        "time": "09:30",
        "close_day": 31,
        "close_time": "23:59",
    }
    benefit = parse_benefit("video", body(release=release), SHANGHAI)
    opens, closes = benefit.release.window("2027-02", SHANGHAI)
    assert (opens.day, opens.hour, opens.minute) == (28, 9, 30)
    assert closes is not None and (closes.day, closes.hour) == (28, 23)


def test_quota_grows_with_tier() -> None:
    benefit = parse_benefit("video", body(), SHANGHAI)
    assert [benefit.quota_for(t) for t in (0, 3, 4, 7, 8, 16)] == [0, 0, 1, 1, 2, 2]
    flat = parse_benefit("video", body(quota=3), SHANGHAI)
    assert flat.quota_for(4) == 3 and flat.quota_for(3) == 0


def test_round_trip_through_json() -> None:
    benefit = parse_benefit("video", body(on_failure="hold"), SHANGHAI, version=7)
    again = parse_benefit("video", benefit.to_json(), SHANGHAI, version=7)
    assert again == benefit


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"release": {"type": "monthly", "day": 0}}, "release.day"),
        ({"release": {"type": "weekly"}}, "release.type"),
        ({"options": []}, "options"),
        ({"on_failure": "forget"}, "on_failure"),
        ({"stock_per_period": -1}, "stock_per_period"),
    ],
)
def test_invalid_definitions_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_benefit("video", body(**overrides), SHANGHAI)
    assert info.value.field is not None and field in info.value.field


def test_periods() -> None:
    moment = datetime(2026, 11, 30, 17, 0, tzinfo=ZoneInfo("UTC"))  # 01:00 on Dec 1 in Shanghai
    assert periods.period_of(moment, SHANGHAI) == "2026-12"
    assert periods.next_period("2026-12") == "2027-01"
    assert periods.days_in_period("2028-02") == 29
    with pytest.raises(ValidationError):
        periods.parse_period("2026-13")


def test_release_times_may_name_seconds() -> None:
    release = {"type": "monthly", "day": 1, "close_day": 31, "close_time": "23:59:59"}
    benefit = parse_benefit("video", body(release=release), SHANGHAI)
    _, closes = benefit.release.window("2026-11", SHANGHAI)
    assert closes == datetime(2026, 11, 30, 23, 59, 59, tzinfo=SHANGHAI)
    assert benefit.release.to_json()["close_time"] == "23:59:59"
    assert benefit.release.to_json()["time"] == "00:00"
    with pytest.raises(ValidationError):
        parse_benefit("video", body(release={**release, "close_time": "23:59:60"}), SHANGHAI)


def test_a_one_off_release_has_one_period_for_its_whole_window() -> None:
    release = {"type": "once", "opens_at": "2026-11-30T20:00:00+08:00", "closes_at": None}
    benefit = parse_benefit("video", body(release=release), SHANGHAI)
    december = datetime(2026, 12, 2, 9, 0, tzinfo=SHANGHAI)
    assert benefit.release.period_at(december, SHANGHAI) == "2026-11"
    monthly = parse_benefit("video", body(), SHANGHAI)
    assert monthly.release.period_at(december, SHANGHAI) == "2026-12"


def test_calendar_bounds_and_shift() -> None:
    calendar = periods.Calendar(SHANGHAI)
    start, end = calendar.bounds_ms("2026-12")
    assert start == periods.to_ms(datetime(2026, 12, 1, tzinfo=SHANGHAI))
    assert end == periods.to_ms(datetime(2027, 1, 1, tzinfo=SHANGHAI))
    assert calendar.period_at(end - 1) == "2026-12" and calendar.period_at(end) == "2027-01"
    shifted = periods.Calendar(SHANGHAI, shift_ms=1000)
    assert shifted.period_at(end - 1000) == "2027-01"
    assert periods.previous_period("2027-01") == "2026-12"


def _options(*ids: str) -> list[dict[str, object]]:
    return [{"option_id": o, "kind": "direct_charge", "partner": "p", "sku": "s"} for o in ids]


def test_bundles_choose_up_to_their_options() -> None:
    benefit = parse_benefit("pack", body(options=_options("a", "b", "c"), choose=2), SHANGHAI)
    assert benefit.choose == 2 and benefit.to_json()["choose"] == 2
    assert parse_benefit("one", body(), SHANGHAI).choose == 1
    with pytest.raises(ValidationError, match="choose is more than"):
        parse_benefit("pack", body(options=_options("a", "b"), choose=3), SHANGHAI)
    with pytest.raises(ValidationError, match="choose"):
        parse_benefit("pack", body(options=_options("a", "b"), choose=0), SHANGHAI)


def test_draw_benefits_round_trip_and_refuse_contradictions() -> None:
    draw = {
        "type": "nine_grid",
        "prizes": [
            {"prize_id": "gold", "weight": 1, "stock": 1, "option_id": "a"},
            {"prize_id": "thanks", "weight": 99, "option_id": "b"},
        ],
        "pity": {"after": 5, "prize_ids": ["gold"]},
    }
    benefit = parse_benefit("box", body(options=_options("a", "b"), draw=draw), SHANGHAI)
    again = parse_benefit("box", benefit.to_json(), SHANGHAI)
    assert again.draw == benefit.draw and benefit.draw is not None
    assert benefit.draw.prize("thanks") is not None and benefit.draw.pity is not None
    with pytest.raises(ValidationError, match="one prize per claim"):
        parse_benefit("box", body(options=_options("a", "b"), draw=draw, choose=2), SHANGHAI)
    once = {"type": "once", "opens_at": "2026-12-10T10:00:00+08:00"}
    with pytest.raises(ValidationError, match="a draw needs a release that closes"):
        parse_benefit("box", body(options=_options("a", "b"), draw=draw, release=once), SHANGHAI)
    priced = _options("a", "b")
    priced[0]["price_points"] = 3
    with pytest.raises(ValidationError, match="price_points"):
        parse_benefit("box", body(options=priced, draw=draw), SHANGHAI)
    elsewhere = {**draw, "prizes": [{"prize_id": "x", "weight": 1, "option_id": "zzz"}]}
    with pytest.raises(ValidationError, match="names no option"):
        parse_benefit("box", body(options=_options("a"), draw=elsewhere), SHANGHAI)
