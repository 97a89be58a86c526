"""``python -m bench <benchmark> [options]`` (what ``./run bench`` calls)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    p = sub.add_parser(
        "claim-path",
        help="one claim alone vs coalesced batches vs JWT vs HTTP, against a Redis PING",
    )
    p.add_argument("--quick", action="store_true", help="fewer, shorter repeats (a smoke run)")
    p.add_argument(
        "--output",
        type=Path,
        help="report path (default bench/results/claim_path.md, or claim_path.quick.md)",
    )
    p = sub.add_parser(
        "voucher-latency",
        help="claim -> card-key code in the member's hands, paced and in a burst",
    )
    p.add_argument("--quick", action="store_true", help="fewer claims (a smoke run)")
    p.add_argument("--output", type=Path, help="report path")
    p = sub.add_parser(
        "peak",
        help="release-time load: the service against baselines, a release, overload",
    )
    p.add_argument("--quick", action="store_true", help="small numbers (a smoke run)")
    p.add_argument(
        "--record",
        action="store_true",
        help="also write bench/results/peak.md and bench/results/peak/*.png",
    )
    p.add_argument("--output", type=Path, help="run folder (default bench/runs/<time>/, untracked)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy flame graph of serve during the 1-worker claim scenario (run folder)",
    )
    p.add_argument(
        "--keep-records",
        action="store_true",
        help="keep the load generator's raw records (*.bin) in the run folder",
    )
    p = sub.add_parser(
        "event-streams",
        help="claims with and without 10,000 idle SSE streams on a worker; memory, broadcasts",
    )
    p.add_argument("--quick", action="store_true", help="1,000 streams (a smoke run)")
    p.add_argument(
        "--record", action="store_true", help="also write bench/results/event_streams.md"
    )
    p.add_argument("--output", type=Path, help="run folder (default bench/runs/<time>-…/)")
    p = sub.add_parser(
        "cluster-scaling",
        help="claim decisions/s on one Valkey vs a three-primary cluster, Redis CPU per claim",
    )
    p.add_argument("--quick", action="store_true", help="one short round each (a smoke run)")
    p.add_argument(
        "--record", action="store_true", help="also write bench/results/cluster_scaling.md"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.benchmark == "claim-path":
        from bench import claim_path

        name = "claim_path.quick.md" if args.quick else "claim_path.md"
        return claim_path.main(quick=args.quick, output=args.output or RESULTS_DIR / name)
    if args.benchmark == "voucher-latency":
        from bench import voucher_latency

        name = "voucher_latency.quick.md" if args.quick else "voucher_latency.md"
        return voucher_latency.main(quick=args.quick, output=args.output or RESULTS_DIR / name)
    if args.benchmark == "peak":
        from bench import peak

        return peak.main(
            quick=args.quick,
            record=args.record,
            output=args.output,
            keep_records=args.keep_records,
            profile=args.profile,
        )
    if args.benchmark == "event-streams":
        from bench import event_streams

        return event_streams.main(quick=args.quick, record=args.record, output=args.output)
    if args.benchmark == "cluster-scaling":
        from bench import cluster_scaling

        return cluster_scaling.main(quick=args.quick, record=args.record, results_dir=RESULTS_DIR)
    raise AssertionError(args.benchmark)


if __name__ == "__main__":
    sys.exit(main())
