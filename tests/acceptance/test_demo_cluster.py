"""``claim-service demo --cluster`` as a person runs it, in a short form: it starts its own
Valkey Cluster of three primaries and PostgreSQL, sells the sharded video benefit's stock
exactly, with its buckets deciding claims on every primary and borrowing from one another,
says which parts of the demo a cluster cannot run, and exits 0 with no ERROR logged."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

STOCK = 400
SHARDS = 8
SHORT = ["--stock", str(STOCK), "--members", "2000", "--concurrency", "50"]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory of its own for the demo (its log, its servers' data), with a
    short path: PostgreSQL's socket path must stay under the Unix limit."""
    path = Path(tempfile.mkdtemp(prefix="cdemo-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def demo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "claim_service", "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def own_servers(tmp: Path) -> dict[str, str]:
    """This environment without configured servers: the demo starts its own."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("CLAIM_REDIS_URL", "CLAIM_DATABASE_URL")
    }
    return {**env, "TMPDIR": str(tmp)}


def test_the_demo_on_a_cluster_decides_on_every_primary_and_keeps_the_invariants(
    short_tmp: Path,
) -> None:
    done = demo("--cluster", *SHORT, env=own_servers(short_tmp))
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr[-3000:]}"
    assert "starting an embedded Valkey Cluster (3 primaries) and PostgreSQL" in out
    assert f"units in {SHARDS} buckets, 2 options" in out
    assert "all invariants hold" in out and "[FAIL]" not in out
    accepted = re.search(r"^  accepted +([\d,]+) ", out, re.M)
    assert accepted and int(accepted[1].replace(",", "")) == STOCK, out

    # Every bucket answered claims, and the buckets sit on three primaries, each deciding.
    rows = re.findall(r"^ +(\d) +(127\.0\.0\.1:\d+) +([\d,]+) +([\d,]+) +([\d,]+) +([\d,]+)$",
                      out, re.M)  # fmt: skip
    assert [int(r[0]) for r in rows] == list(range(SHARDS)), out
    assert all(int(r[2].replace(",", "")) > 0 for r in rows), out
    assert sum(int(r[3].replace(",", "")) for r in rows) == STOCK
    primaries = re.findall(r"^  primary (127\.0\.0\.1:\d+) +buckets .* answered +([\d,]+) ", out,
                           re.M)  # fmt: skip
    assert len(primaries) == 3 and {p for p, _ in primaries} == {r[1] for r in rows}, out
    assert all(int(n.replace(",", "")) > 0 for _, n in primaries), out
    borrowed = re.search(r"^  borrowed +([\d,]+) +units between buckets", out, re.M)
    assert borrowed and int(borrowed[1].replace(",", "")) > 0, out
    for check in (
        "units taken never exceed stock",
        "no undersell: stock reached exactly 0 while demand lasted",
        "no member over the quota of their tier",
        "rows in PostgreSQL == accepted",
        "no request persisted twice",
        f"sharded: the {SHARDS} buckets decided claims on all 3 primaries",
        "sharded: each bucket accepted exactly its own members' 202 answers",
        "sharded: buckets borrowed from one another",
        "sharded: no sold_out answered before the last acceptance",
        "every claim reached a final state",
        "refunded units and quotas returned exactly once",
        "sharded: every loan credited (in:<i> on each receiver == out:<j> on its lender)",
        "sharded: each bucket's taken == its members' live claims in PostgreSQL",
    ):
        assert f"  [ok] {check}\n" in out, f"{check!r} not checked:\n{out}"

    # What a cluster cannot run is said, and not run.
    assert "== not run on a cluster ==" in out
    for skipped in (
        "skipped waiting room:",
        "skipped Youku card-key option",
        "skipped the points half",
    ):
        assert skipped in out, out
    assert "== waiting room" not in out and "== points" not in out and "youku" not in out
    logfile = short_tmp / "claim-service-demo.log"
    assert f"logs: {logfile})" in out
    assert " ERROR " not in logfile.read_text(), "the demo's processes logged an ERROR"


def test_the_demo_on_a_cluster_refuses_a_configured_server_that_is_not_one(
    short_tmp: Path,
) -> None:
    env = {
        **own_servers(short_tmp),
        "CLAIM_REDIS_URL": "redis://127.0.0.1:1/0",
        "CLAIM_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres",
    }
    done = demo("--cluster", *SHORT, env=env)
    assert done.returncode == 2
    assert "demo --cluster needs a redis+cluster:// CLAIM_REDIS_URL" in done.stderr
