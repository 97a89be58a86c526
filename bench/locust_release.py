"""Set up a release for ``bench/locustfile.py`` on a running ``claim-service serve``.

``python -m bench.locust_release --stock 3000 --members 20000 --opens-in 30`` loads a tier
snapshot for ``m000000..`` (tiers V1-V16 mixed as in the demo, about a fifth below
``min_tier`` 4; V8+ may claim two units), then creates a one-off benefit opening
``--opens-in`` seconds after the tiers are in, and prints the ``export`` line for locust on
stdout (everything else goes to stderr, so ``eval "$(python -m bench.locust_release ...)"``
works). Tiers go through the admin API up to 100,000 members, beyond that through a CSV and
``claim-service load-tiers`` (which needs ``CLAIM_REDIS_URL`` and ``CLAIM_DATABASE_URL``).
Everything talks to the admin listener with ``CLAIM_ADMIN_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from typing import Any

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.local.demo import tier_of

ADMIN_TIERS_MAX = 100_000  # MAX_TIERS_PER_CALL of the admin API
ADMIN_CHUNK = 25_000
MIN_TIER = 4


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.locust_release",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    admin = f"http://{settings.admin_host}:{settings.admin_port}"
    parser.add_argument("--admin-url", default=admin, help=f"admin listener (default {admin})")
    parser.add_argument("--benefit", help="benefit id (default release-HHMMSS, a new one)")
    parser.add_argument("--stock", type=int, default=3000, help="units (default 3000)")
    parser.add_argument("--members", type=int, default=100_000, help="population (100000)")
    parser.add_argument(
        "--opens-in", type=float, default=30.0, help="seconds from now to the opening (default 30)"
    )
    parser.add_argument("--options", type=int, default=2, help="direct-charge options (2)")
    parser.add_argument("--seed", type=int, default=1, help="tier mix seed (default 1)")
    parser.add_argument(
        "--tiers",
        choices=("auto", "admin", "csv"),
        default="auto",
        help="how to load tiers (auto: admin API up to 100,000)",
    )
    return parser


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def admin_call(settings: Settings, method: str, url: str, body: object = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {settings.admin_token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"{method} {url}: HTTP {exc.code} {exc.read()[:500]!r}") from exc
    except OSError as exc:
        raise SystemExit(f"{method} {url}: {exc} (is `claim-service serve` running?)") from exc


def load_tiers(settings: Settings, args: argparse.Namespace, tiers: list[int], period: str) -> None:
    via = args.tiers
    if via == "auto":
        via = "admin" if len(tiers) <= ADMIN_TIERS_MAX else "csv"
    started = time.monotonic()
    if via == "admin":
        for start in range(0, len(tiers), ADMIN_CHUNK):
            rows = [
                {"user_id": f"m{i:06d}", "tier": tiers[i]}
                for i in range(start, min(start + ADMIN_CHUNK, len(tiers)))
            ]
            admin_call(settings, "PUT", f"{args.admin_url}/admin/v1/tiers/{period}", rows)
    else:
        if not (settings.redis_url and settings.database_url):
            raise SystemExit("load-tiers needs CLAIM_REDIS_URL and CLAIM_DATABASE_URL")
        with tempfile.NamedTemporaryFile("w", suffix=".csv", prefix="tiers-") as csv:
            csv.write("user_id,tier\n")
            csv.writelines(f"m{i:06d},{tier}\n" for i, tier in enumerate(tiers))
            csv.flush()
            command = [
                sys.executable,
                "-m",
                "claim_service",
                "load-tiers",
                csv.name,
                "--period",
                period,
            ]
            if subprocess.run(command, stdout=sys.stderr, check=False).returncode != 0:
                raise SystemExit("claim-service load-tiers failed")
    say(f"loaded {len(tiers):,} tiers for {period} via {via} in {time.monotonic() - started:.1f}s")


def benefit_body(args: argparse.Namespace, opens: datetime) -> dict[str, Any]:
    names = ["iqiyi", "tencent", "youku", "mango", "bilibili", "sohu"]
    ids = [names[i] if i < len(names) else f"option{i}" for i in range(max(args.options, 1))]
    return {
        "name": "Video membership, monthly card (locust)",
        "min_tier": MIN_TIER,
        "quota": [{"min_tier": MIN_TIER, "per_period": 1}, {"min_tier": 8, "per_period": 2}],
        "stock_per_period": args.stock,
        "release": {"type": "once", "opens_at": opens.isoformat(timespec="seconds")},
        "options": [
            {
                "option_id": oid,
                "name": oid,
                "kind": "direct_charge",
                "partner": "bench-partner",
                "sku": f"{oid.upper()}-MONTH",
            }
            for oid in ids
        ],
    }


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    args = build_parser(settings).parse_args(argv)
    if args.members < 1 or args.members > 1_000_000 or args.stock < 1:
        raise SystemExit("--members must be 1..1000000 (ids m000000..m999999), --stock >= 1")
    benefit_id = args.benefit or f"release-{datetime.now(settings.tz):%H%M%S}"
    ready = urllib.request.urlopen(f"{args.admin_url}/readyz", timeout=5)  # fails loudly
    ready.close()
    tiers = [tier_of(i, args.seed) for i in range(args.members)]
    # The tier of the month the claims are decided in counts: the month of the opening.
    expected = datetime.now(settings.tz) + timedelta(seconds=args.opens_in)
    load_tiers(settings, args, tiers, periods.period_of(expected, settings.tz))
    # Counted from now, after the tiers: the countdown is the time locust has to start.
    opens = (datetime.now(settings.tz) + timedelta(seconds=args.opens_in)).replace(microsecond=0)
    body = benefit_body(args, opens)
    admin_call(settings, "PUT", f"{args.admin_url}/admin/v1/benefits/{benefit_id}", body)
    eligible = sum(1 for t in tiers if t >= MIN_TIER)
    demand = sum(2 if t >= 8 else 1 for t in tiers if t >= MIN_TIER)
    say(
        f"benefit {benefit_id}: {args.stock:,} units, {len(body['options'])} option(s), opens at "
        f"{opens:%H:%M:%S %Z}; {args.members:,} members, {eligible:,} of them V{MIN_TIER}+ "
        f"wanting {demand:,} units"
    )
    print(
        f"export CLAIM_BENCH_BENEFIT={benefit_id} CLAIM_BENCH_MEMBERS={args.members} "
        f"CLAIM_BENCH_OPENS_AT={opens.isoformat()}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
