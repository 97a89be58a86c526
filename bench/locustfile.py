"""Locust scenario: a release as it happens, against a running ``claim-service serve``.

Prepare one with ``python -m bench.locust_release``; ``docs/locust.md`` has the steps
(headless with ``--csv``/``--html``, distributed with ``--master``/``--worker``), the
knobs (``CLAIM_BENCH_*``) and what each outcome name means.

- **Members** are drawn at random, without replacement, from the whole population
  ``m000000..`` (``CLAIM_BENCH_MEMBERS``): each locust process shuffles its share (worker
  ``i`` of ``--expect-workers N`` owns ids ``i, i+N, ...``); a user takes the next member
  whenever its last one is done, so 200 users meet thousands of members.
- **A journey**: the catalogue (``GET /v1/benefits``, refreshed until the opening; some tap
  early and get 425), then claims with retries of the SAME ``request_id`` on 503, 429,
  timeouts and broken connections; 403/409/410 are final. After a 202 some re-send it as
  if the answer was lost (it must come back 200 ``replayed``, the same claim).
- **The shape**: a few users browse before the opening, the spike (``-u`` at ``-r``/s)
  comes at it and holds until sold out (``stock_left`` 0 in an answer or the catalogue),
  a few seconds more, then the run stops; ``-t`` caps it.

Requests are named by outcome (``claim 202``, ``claim 410 sold_out``, ``resend 200
replayed``, ``claim 503 unavailable``, ``claim error``): the service's decisions and 429
are successes; 5xx, 401, 404, connection errors and anything unexpected are failures.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from locust import FastHttpUser, LoadTestShape, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

from claim_service.config import Settings
from claim_service.http.auth import mint_token

log = logging.getLogger("claim_release")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


BENEFIT = os.environ.get("CLAIM_BENCH_BENEFIT", "")
MEMBERS = int(_env_float("CLAIM_BENCH_MEMBERS", 100_000))
SEED = int(_env_float("CLAIM_BENCH_SEED", 1))
THINK_S = _env_float("CLAIM_BENCH_THINK_S", 0.3)  # catalogue -> claim
REFRESH_S = _env_float("CLAIM_BENCH_REFRESH_S", 2.0)  # catalogue refreshes before the opening
EARLY = _env_float("CLAIM_BENCH_EARLY", 0.2)
TAP_ANYWAY = _env_float("CLAIM_BENCH_TAP_ANYWAY", 0.1)
RESEND = _env_float("CLAIM_BENCH_RESEND", 0.1)
CHECK_CLAIM = _env_float("CLAIM_BENCH_CHECK_CLAIM", 0.2)
ATTEMPTS = int(_env_float("CLAIM_BENCH_ATTEMPTS", 5))
TIMEOUT_S = _env_float("CLAIM_BENCH_TIMEOUT_S", 10.0)
PEAK_USERS = int(_env_float("CLAIM_BENCH_PEAK_USERS", 0))  # 0: locust's -u
SPAWN_RATE = _env_float("CLAIM_BENCH_SPAWN_RATE", 0)  # 0: locust's -r
WARM_USERS = int(_env_float("CLAIM_BENCH_WARM_USERS", 0))  # 0: a tenth of the peak
MAX_S = _env_float("CLAIM_BENCH_MAX_S", 0)  # 0: locust's -t, else 120 s
SPIKE_LEAD_S = _env_float("CLAIM_BENCH_SPIKE_LEAD_S", 2.0)
AFTER_SOLD_OUT_S = _env_float("CLAIM_BENCH_AFTER_SOLD_OUT_S", 3.0)
PROBE_EVERY_S = 2.0
MESSAGE = "claim_release"  # worker -> master: sold out, population exhausted

DECIDED = {200, 202, 403, 409, 410, 423, 425, 429}  # answers that are not failures
RETRIED = {0, 429, 502, 503, 504}  # 0: timeout or connection error
SETTINGS = Settings.from_env()


def parse_time(text: object) -> float | None:
    """An RFC 3339 timestamp as epoch seconds (None when absent or unreadable)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class Release:
    """This process's view of the release: the opening, sold out, and its members."""

    def __init__(self) -> None:
        self.opens_at = parse_time(os.environ.get("CLAIM_BENCH_OPENS_AT"))
        self.sold_out_at: float | None = None
        self.exhausted = False
        self._members: Iterator[int] = iter(())
        self._reported: set[str] = set()

    def reset(self) -> None:
        self.sold_out_at = None
        self.exhausted = False
        self._reported.clear()

    def deal(self, offset: int, stride: int) -> None:
        """Shuffle this process's share of the population (ids ``offset + k * stride``)."""
        share = list(range(offset, MEMBERS, stride))
        random.Random(SEED * 1_000_003 + offset).shuffle(share)
        self._members = iter(share)
        log.info("members: %d of %d (offset %d, stride %d)", len(share), MEMBERS, offset, stride)

    def draw(self, runner: Any) -> str | None:
        index = next(self._members, None)
        if index is None:
            self.report(runner, "exhausted", True)
            return None
        return f"m{index:06d}"

    def report(self, runner: Any, key: str, value: object) -> None:
        """Tell the runner that decides the shape (the master, or this process), once."""
        if key not in self._reported:
            self._reported.add(key)
            runner.send_message(MESSAGE, {key: value})

    def note(self, data: dict[str, Any]) -> None:
        if "sold_out_at" in data:
            at = float(data["sold_out_at"])
            self.sold_out_at = at if self.sold_out_at is None else min(self.sold_out_at, at)
        if data.get("exhausted"):
            self.exhausted = True


RELEASE = Release()


def _on_init(environment: Any, **_: Any) -> None:
    runner = environment.runner
    if runner is not None and not isinstance(runner, WorkerRunner):
        runner.register_message(MESSAGE, _on_message)


def _on_message(environment: Any, msg: Any, **_: Any) -> None:
    RELEASE.note(msg.data or {})


def _on_test_start(environment: Any, **_: Any) -> None:
    runner = environment.runner
    RELEASE.reset()
    if not BENEFIT:
        log.error("set CLAIM_BENCH_BENEFIT (python -m bench.locust_release prints it)")
        environment.process_exit_code = 2
        runner.quit()
        return
    if isinstance(runner, MasterRunner):
        return  # the master only hears about the release from its workers
    offset, stride = 0, 1
    if isinstance(runner, WorkerRunner):
        # The master sends its --expect-workers with the first spawn; indexes count from 0.
        stride = max(int(getattr(environment.parsed_options, "expect_workers", 1) or 1), 1)
        offset = max(runner.worker_index, 0)
        if offset >= stride:
            log.warning("worker %d of --expect-workers %d: members overlap", offset, stride)
            offset %= stride
    RELEASE.deal(offset, stride)


def _sleep_until(moment: float) -> None:
    time.sleep(min(max(moment - time.time(), 0.0), 600.0))


def _body(resp: Any) -> dict[str, Any]:
    try:
        data = resp.json()
    except (ValueError, TypeError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


class Member(FastHttpUser):
    """A slot members pass through: each task is one member's whole journey."""

    wait_time = constant(0)
    host = f"http://127.0.0.1:{SETTINGS.port}"
    network_timeout = TIMEOUT_S
    connection_timeout = TIMEOUT_S

    @task
    def journey(self) -> None:
        user_id = RELEASE.draw(self.environment.runner)
        if user_id is None:  # every member of this share had their turn
            time.sleep(1.0)
            return
        headers = {"Authorization": f"Bearer {mint_token(SETTINGS, user_id)}"}
        view = self.view(headers)
        for _ in range(3):  # paused: look again a little later
            if view is None or view.get("reason") != "paused":
                break
            time.sleep(1.0)
            view = self.view(headers)
        if view is None:
            return
        opens_at = parse_time(view.get("opens_at")) or RELEASE.opens_at
        while view.get("reason") == "not_open" and opens_at and time.time() < opens_at - REFRESH_S:
            time.sleep(REFRESH_S * random.uniform(0.5, 1.5))  # the countdown page refreshes
            view = self.view(headers) or view
        reason = view.get("reason")
        if reason == "not_open":
            if random.random() >= EARLY and opens_at is not None:
                _sleep_until(opens_at + random.uniform(0, THINK_S))
        elif reason is not None and random.random() >= TAP_ANYWAY:
            return  # the app greys the button out
        else:
            time.sleep(random.uniform(0, THINK_S))
        quota = view.get("quota") or {}
        units = max(int(quota.get("allowed", 1)) - int(quota.get("used", 0)), 1)
        options = [str(o["option_id"]) for o in view.get("options", [])]
        while units > 0 and options:
            option = random.choice(options)
            body = {"request_id": uuid.uuid4().hex, "option_id": option}
            status, answer = self.claim(headers, body, opens_at)
            if status == 410 and answer.get("error") == "sold_out" and answer.get("stock_left"):
                options.remove(option)  # this option's cap or code pool, not the stock
                continue
            if status not in (200, 202):
                return
            units -= 1
            if random.random() < RESEND:  # the answer was lost: the app sends it again
                self.claim(headers, body, opens_at, kind="resend", claim_id=answer["claim_id"])
            if random.random() < CHECK_CLAIM:
                self.client.get(
                    f"/v1/claims/{answer['claim_id']}", headers=headers, name="GET /v1/claims/{id}"
                )

    def view(self, headers: dict[str, str]) -> dict[str, Any] | None:
        """The catalogue as this member sees it: the benefit's entry, or None."""
        with self.client.get(
            "/v1/benefits", headers=headers, name="GET /v1/benefits", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code} {_body(resp).get('error', '')}".rstrip())
                return None
            views = _body(resp).get("benefits", [])
            found = next((v for v in views if v.get("benefit_id") == BENEFIT), None)
            if found is None:
                resp.failure(f"benefit {BENEFIT!r} is not in the catalogue")
                return None
            reason = found.get("reason")
            resp.request_meta["name"] = f"GET /v1/benefits ({reason or 'can_claim'})"
        if found.get("stock_left") == 0 and reason != "not_open":
            RELEASE.report(self.environment.runner, "sold_out_at", time.time())
        return dict(found)

    def claim(
        self,
        headers: dict[str, str],
        body: dict[str, str],
        opens_at: float | None,
        *,
        kind: str = "claim",
        claim_id: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Send one claim until it has a final answer, always with the same request_id."""
        attempts = early = 0
        while True:
            attempts += 1
            status, answer, retry_after = self.post_claim(headers, body, kind, claim_id)
            if status == 425 and early < 3:  # tapped before the opening: wait for it
                early += 1
                attempts -= 1
                opens_at = parse_time(answer.get("opens_at")) or opens_at or time.time() + 1
                _sleep_until(opens_at + random.uniform(0, 0.3))
            elif status in RETRIED and attempts < ATTEMPTS:
                backoff = min(0.1 * 2**attempts, 2.0) * random.uniform(0.5, 1.5)
                time.sleep(retry_after if retry_after is not None else backoff)
            else:
                return status, answer

    def post_claim(
        self, headers: dict[str, str], body: dict[str, str], kind: str, claim_id: str | None
    ) -> tuple[int, dict[str, Any], float | None]:
        path = f"/v1/benefits/{BENEFIT}/claims"
        with self.client.post(
            path, json=body, headers=headers, name=kind, catch_response=True
        ) as resp:
            status = resp.status_code
            answer = _body(resp) if status else {}
            error = str(answer.get("error", ""))
            label = "replayed" if answer.get("replayed") else error
            # A re-sent request must come back as the claim it already is, no second unit.
            replayed = status == 200 and answer.get("claim_id") == claim_id
            name = f"{kind} {status} {label}".rstrip() if status else f"{kind} error"
            resp.request_meta["name"] = name
            if not status:
                resp.failure(str(resp.error or "no response"))
            elif status not in DECIDED:
                resp.failure(f"HTTP {status} {error}".rstrip())
            elif claim_id is not None and status in (200, 202) and not replayed:
                resp.failure(f"the same request_id came back {status} {answer.get('claim_id')}")
            else:
                resp.success()
            retry_after = None
            if status in (429, 503) and resp.headers is not None:
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        if answer.get("stock_left") == 0 and (status == 202 or error == "sold_out"):
            RELEASE.report(self.environment.runner, "sold_out_at", time.time())
        return status, answer, retry_after


def parse_retry_after(value: object) -> float | None:
    try:
        return min(max(float(str(value)), 0.0), 10.0) if value is not None else None
    except ValueError:
        return None


class ReleaseShape(LoadTestShape):
    """Browsing before the opening, the spike at it, held until sold out (or the cap)."""

    use_common_options = True  # -u is the peak, -r its spawn rate, -t the cap
    _probed = 0.0
    _logged = 0.0

    def tick(self) -> tuple[int, float] | None:
        runner = self.runner
        assert runner is not None
        options = runner.environment.parsed_options
        peak = PEAK_USERS or int(getattr(options, "num_users", 0) or 200)
        rate = SPAWN_RATE or float(getattr(options, "spawn_rate", 0) or peak)
        warm = WARM_USERS or max(peak // 10, 1)
        cap = MAX_S or float(getattr(options, "run_time", 0) or 120)
        now = time.time()
        if now - self._probed >= PROBE_EVERY_S:
            self._probed = now
            self.probe(runner, now)
        sold = RELEASE.sold_out_at
        if sold is not None and (now >= sold + AFTER_SOLD_OUT_S or RELEASE.exhausted):
            log.info(
                "sold out %.1f s after the opening; stopping", sold - (RELEASE.opens_at or sold)
            )
            return None
        if RELEASE.exhausted:
            log.warning("every member had their turn before the benefit sold out; stopping")
            return None
        if time.perf_counter() - self.start_time >= cap:
            log.warning("not sold out within %.0f s; stopping", cap)
            return None
        if RELEASE.opens_at is not None and now < RELEASE.opens_at - SPIKE_LEAD_S:
            return warm, max(float(warm), 1.0)
        return peak, rate

    def probe(self, runner: Any, now: float) -> None:
        """The benefit as the catalogue shows it: the opening, progress, and sold out."""
        url = f"{runner.environment.host or Member.host}/v1/benefits"
        token = mint_token(SETTINGS, "bench-probe")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=1.0) as resp:
                views = json.loads(resp.read()).get("benefits", [])
        except (OSError, ValueError) as exc:
            log.warning("catalogue probe failed: %s", exc)
            return
        found = next((v for v in views if v.get("benefit_id") == BENEFIT), None)
        if found is None:
            return
        if RELEASE.opens_at is None:
            RELEASE.opens_at = parse_time(found.get("opens_at"))
        left = found.get("stock_left")
        opened = RELEASE.opens_at is not None and now >= RELEASE.opens_at
        if left == 0 and opened:
            RELEASE.note({"sold_out_at": now})
        if now - self._logged >= 5.0:
            self._logged = now
            since = f"T{now - RELEASE.opens_at:+.0f}s" if RELEASE.opens_at else "T?"
            log.info(
                "release %s: %s, stock left %s, %d users", BENEFIT, since, left, runner.user_count
            )


def _summary(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or not BENEFIT:
        return
    lines = [f"{'outcome':<40} {'requests':>9} {'failures':>9}"]
    for entry in sorted(environment.stats.entries.values(), key=lambda e: e.name):
        lines.append(f"{entry.name:<40} {entry.num_requests:>9,} {entry.num_failures:>9,}")
    if RELEASE.sold_out_at is not None and RELEASE.opens_at is not None:
        lines.append(f"sold out {RELEASE.sold_out_at - RELEASE.opens_at:.1f} s after the opening")
    else:
        lines.append("not sold out")
    log.info("release %s:\n%s", BENEFIT, "\n".join(lines))


hooks: Any = events  # locust's event hooks are untyped
hooks.init.add_listener(_on_init)
hooks.test_start.add_listener(_on_test_start)
hooks.quitting.add_listener(_summary)
