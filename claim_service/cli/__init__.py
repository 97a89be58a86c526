"""``claim-service``: the one place that wires processes together (``serve``, ``writer``,
``fulfil``, the tooling in ``local``).

May import every package.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from claim_service import __version__
from claim_service.cli.commands import (
    cmd_credit_points,
    cmd_demo,
    cmd_dev,
    cmd_expire_points,
    cmd_fulfil,
    cmd_load_codes,
    cmd_load_tiers,
    cmd_migrate,
    cmd_reconcile,
    cmd_token,
    cmd_verify_draws,
    cmd_warm,
    cmd_writer,
)
from claim_service.cli.runtime import configure_logging
from claim_service.cli.serve import cmd_serve
from claim_service.config import Settings
from claim_service.errors import ClaimServiceError
from claim_service.local import partner_sim, partner_sim_config

NAME_HELP = (
    "a stable name per instance: restarted under the same name, it resumes its own "
    "unfinished work at once instead of waiting for it to time out"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="claim-service",
        description="Flash benefit claims: atomic Redis decisions, durable PostgreSQL records.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run a release-time burst end to end on local servers")
    p.add_argument("--stock", type=int, default=8000)
    p.add_argument("--members", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--codes", type=int, default=2500, help="Youku codes loaded (card-key)")
    p.add_argument(
        "--retries",
        type=float,
        default=0.1,
        help="share of requests retried with the same request_id",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="on a local Valkey Cluster of three primaries, the video benefit in 8 shards "
        "(no waiting room, card keys or points there)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("dev", help="start local Valkey and PostgreSQL and print their URLs")
    p.add_argument("--data-dir", help="where the servers keep data (default CLAIM_DATA_DIR)")
    p.set_defaults(func=cmd_dev)

    insecure_help = (
        "start even with public development secrets on a listener or server that is not "
        "local (a throw-away setup only)"
    )
    p = sub.add_parser("serve", help="serve the HTTP API")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--admin-host", help="the admin and metrics listener (default 127.0.0.1)")
    p.add_argument("--admin-port", type=int)
    p.add_argument("--workers", type=int, help="worker processes sharing the ports")
    p.add_argument("--writer", action="store_true", help="also run a writer in each worker")
    p.add_argument("--insecure-dev", action="store_true", help=insecure_help)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("writer", help="persist accepted claims from Redis to PostgreSQL")
    p.add_argument("--name", help=NAME_HELP)
    p.set_defaults(func=cmd_writer)

    p = sub.add_parser("fulfil", help="deliver persisted claims (card-key and direct charge)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--insecure-dev", action="store_true", help=insecure_help)
    p.add_argument("--name", help=NAME_HELP)
    p.set_defaults(func=cmd_fulfil)

    p = sub.add_parser("load-codes", help="load redemption codes (CSV: code[,secret[,expires_at]])")
    p.add_argument("benefit")
    p.add_argument("option")
    p.add_argument("file")
    p.set_defaults(func=cmd_load_codes)

    p = sub.add_parser("partner-sim", help="run the fulfilment partner simulator")
    partner_sim_config.add_arguments(p)
    p.set_defaults(func=lambda _settings, args: partner_sim.run(args))

    p = sub.add_parser("migrate", help="apply pending database migrations")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("warm", help="rebuild Redis from PostgreSQL (after a Redis data loss)")
    p.add_argument("--period", action="append", help="YYYY-MM (repeatable; default: current)")
    p.set_defaults(func=cmd_warm)

    p = sub.add_parser(
        "reconcile", help="report where Redis's counters differ from PostgreSQL and the stream"
    )
    p.add_argument("--period", help="YYYY-MM (default: each benefit's current period)")
    p.add_argument(
        "--fix",
        action="store_true",
        help="rebuild each benefit that drifted (claims wait meanwhile), then compare again",
    )
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("load-tiers", help="load a CSV of user_id,tier for a period")
    p.add_argument("file")
    p.add_argument("--period", required=True, help="YYYY-MM")
    p.set_defaults(func=cmd_load_tiers)

    p = sub.add_parser(
        "credit-points", help="credit a period's points to its tier snapshot, once per member"
    )
    p.add_argument("--period", help="YYYY-MM (default: the current period)")
    p.set_defaults(func=cmd_credit_points)

    p = sub.add_parser("expire-points", help="write off points left in lots past their expiry")
    p.set_defaults(func=cmd_expire_points)

    p = sub.add_parser(
        "verify-draws", help="recompute every draw of a period from its seed and the records"
    )
    p.add_argument("benefit_id")
    p.add_argument("period", help="YYYY-MM")
    p.add_argument("--seed", help="the revealed seed (hex) to check instead of the stored one")
    p.set_defaults(func=cmd_verify_draws)

    p = sub.add_parser("token", help="mint a dev member token (HS256, CLAIM_JWT_SECRET)")
    p.add_argument("user_id")
    p.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    p.set_defaults(func=cmd_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = {
            k: getattr(args, k, None)
            for k in ("host", "port", "admin_host", "admin_port", "workers")
        }
        settings = Settings.from_env(**overrides)
        configure_logging(settings)
        func: Callable[[Settings, argparse.Namespace], int] = args.func
        return func(settings, args)
    except ClaimServiceError as exc:
        print(f"claim-service: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
