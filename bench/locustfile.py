"""Locust scenario: members racing for one benefit on a running ``claim-service serve``.

Each simulated user is one member (``m000000``, ``m000001``, ... wrapping at
``CLAIM_BENCH_MEMBERS``) with a token minted like ``claim-service token`` does, posting claims
with a fresh ``request_id`` each time, as a member tapping "claim" again would. The first
claims are accepted (202); after that the member's quota (409) or the stock (410) turns
them away. Those rejections are the service working, so they count as successes, each
under its own name (``claim 409 quota_exceeded``, ...) so the stats show the mix; anything
else (5xx, 401, 404, 429) is a failure.

Environment:

``CLAIM_BENCH_BENEFIT``
    the benefit id (required); members need a tier in the current period's snapshot.
``CLAIM_BENCH_MEMBERS``
    how many members ``m000000..`` have tiers (default 1000).
``CLAIM_BENCH_OPTION``
    the option to claim (default: the benefit's first option, read from ``GET /v1/benefits``).
``CLAIM_BENCH_THINK_S``
    each user waits a random 0..this many seconds between claims (default 0.5).
``CLAIM_JWT_SECRET`` (and ``CLAIM_JWT_AUDIENCE`` / ``CLAIM_JWT_ISSUER`` if the server uses them)
    must match the server's, or every claim fails with 401.

Set up a benefit and members, then run headless and bounded (users, spawn rate, duration)::

    claim-service dev           # keep running; in another shell, export the URLs it prints
    claim-service migrate
    claim-service serve --port 8080 --admin-port 8081 --writer &   # admin API on 8081
    python -c 'print("user_id,tier"); [print(f"m{i:06d},9") for i in range(1000)]' \
        > /tmp/members.csv
    claim-service load-tiers /tmp/members.csv --period "$(TZ=Asia/Shanghai date +%Y-%m)"
    curl -X PUT http://127.0.0.1:8081/admin/v1/benefits/video \
        -H "Authorization: Bearer ${CLAIM_ADMIN_TOKEN:-dev-admin-token}" \
        -H 'Content-Type: application/json' -d '{"name": "Video card", "min_tier": 4,
          "quota": 1, "stock_per_period": 500, "release": {"type": "once",
          "opens_at": "2020-01-01T00:00:00+08:00"}, "options": [{"option_id": "iqiyi",
          "name": "iQiyi", "kind": "direct_charge", "partner": "iqiyi", "sku": "IQY-M1"}]}'
    CLAIM_BENCH_BENEFIT=video CLAIM_BENCH_MEMBERS=1000 \
        locust -f bench/locustfile.py --headless -u 200 -r 50 -t 30s --host http://127.0.0.1:8080

Users are numbered per locust process: with ``--processes`` or distributed workers, users
of different processes can share a member, as one member on two phones would.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from typing import Any

from locust import FastHttpUser, between, task
from locust.exception import StopUser

from claim_service.config import Settings
from claim_service.http.auth import mint_token

BENEFIT = os.environ.get("CLAIM_BENCH_BENEFIT", "")
MEMBERS = int(os.environ.get("CLAIM_BENCH_MEMBERS", "1000"))
THINK_S = float(os.environ.get("CLAIM_BENCH_THINK_S", "0.5"))
# The service's answers that mean "decided": accepted, replayed, or turned away by a rule.
DECIDED = {
    202: "accepted",
    200: "replayed",
    403: "tier_too_low",
    409: "quota_exceeded",
    410: "sold_out",
    423: "paused",
    425: "not_open",
}

_settings = Settings.from_env()
_users = itertools.count()
_option: str | None = os.environ.get("CLAIM_BENCH_OPTION") or None


class Member(FastHttpUser):
    """One member claiming the benefit again and again."""

    wait_time = between(0, THINK_S)

    def on_start(self) -> None:
        if not BENEFIT:
            raise StopUser("set CLAIM_BENCH_BENEFIT to the benefit id to claim")
        self.user_id = f"m{next(_users) % MEMBERS:06d}"
        self.headers = {"Authorization": f"Bearer {mint_token(_settings, self.user_id)}"}
        self.path = f"/v1/benefits/{BENEFIT}/claims"
        self.option = _option or self._first_option()

    def _first_option(self) -> str:
        global _option
        name = "GET /v1/benefits (setup)"
        with self.client.get("/v1/benefits", headers=self.headers, name=name,
                             catch_response=True) as resp:  # fmt: skip
            views: list[dict[str, Any]] = []
            if resp.status_code == 200:
                views = resp.json().get("benefits", [])
            found = next((v for v in views if v.get("benefit_id") == BENEFIT), None)
            if found is None or not found.get("options"):
                resp.failure(f"benefit {BENEFIT!r} not listed (HTTP {resp.status_code})")
                raise StopUser()
        _option = str(found["options"][0]["option_id"])
        return _option

    @task
    def claim(self) -> None:
        body = {"request_id": uuid.uuid4().hex, "option_id": self.option}
        with self.client.post(self.path, json=body, headers=self.headers, name="claim",
                              catch_response=True) as resp:  # fmt: skip
            status = resp.status_code
            error = ""
            if status not in (200, 202):
                with contextlib.suppress(ValueError, AttributeError):
                    error = str(resp.json().get("error", ""))
            # Name each outcome by status (and error code: 410 is sold_out or closed).
            label = error or DECIDED.get(status, "")
            resp.request_meta["name"] = f"claim {status} {label}".rstrip()
            if status in DECIDED:
                resp.success()
            else:
                resp.failure(f"HTTP {status} {error}".rstrip())
