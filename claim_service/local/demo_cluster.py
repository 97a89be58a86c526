"""``claim-service demo --cluster``: the same burst on a local Valkey Cluster of three
primaries (``EmbeddedCluster``; PostgreSQL embedded as usual), the video benefit declared
``"shards": 8`` so that its claims are decided by every primary.

What a sharded benefit or a cluster cannot have is left out, and the summary says so
(``SKIPPED``): the waiting room, the card-key option and its codes, and the points half (its
lounge pass is priced in points). ``fulfil`` starts once the burst is over, so that no refund
puts a unit back mid-burst: every ``sold_out`` must then come after the last acceptance. The
summary adds, per bucket and per primary, the claims answered and accepted, what the buckets
lent each other (``out:<j>``/``in:<j>``/``moved`` in each bucket's period stock hash), and the
checks of sharded stock: the buckets on every primary, borrowing happened, every loan
credited, each bucket's claims in PostgreSQL, no ``sold_out`` before the last acceptance.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import asyncpg
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from claim_service.config import Settings
from claim_service.domain import periods
from claim_service.domain.shards import bucket_of
from claim_service.errors import ConfigError
from claim_service.local import demo_fulfilment
from claim_service.local.demo_burst import burst
from claim_service.local.demo_report import BurstStats, DemoOptions, report, say
from claim_service.local.embedded import EmbeddedPostgres
from claim_service.local.embedded_cluster import CLUSTER_SCHEME, EmbeddedCluster
from claim_service.store.keyspace import bucket_keys, text

SHARDS = 8
PRIMARIES = 3
OPTION_IDS = ("iqiyi", "tencent")  # the direct-charge options: no card key when sharded
SKIPPED = (
    ("waiting room", "a sharded benefit cannot have one (its queue and admissions are counted "
     "per benefit; refused 422, field shards): members claim straight at the opening"),
    ("Youku card-key option and its codes", "a sharded benefit cannot have card keys (the code "
     "pool is per benefit): two direct-charge options instead"),
    ("the points half (crediting, adjustments, the lounge rush, its section)", "the lounge pass "
     "is priced in points, and claims priced in points answer 503 on a cluster (the points "
     "mirror is one key for every benefit)"),
)  # fmt: skip


@contextlib.contextmanager
def cluster_servers(settings: Settings) -> Iterator[Settings]:
    """A configured cluster and PostgreSQL, or a local cluster of three primaries (no
    replicas) and an embedded PostgreSQL, stopped afterwards."""
    if settings.redis_url and settings.database_url:
        if not settings.redis_url.startswith(CLUSTER_SCHEME + "://"):
            raise ConfigError(
                f"demo --cluster needs a {CLUSTER_SCHEME}:// CLAIM_REDIS_URL (or neither "
                "CLAIM_REDIS_URL nor CLAIM_DATABASE_URL, to start a local cluster)"
            )
        say(f"using configured servers: {settings.redis_url} and PostgreSQL from "
            "CLAIM_DATABASE_URL")  # fmt: skip
        yield settings
        return
    say(f"starting an embedded Valkey Cluster ({PRIMARIES} primaries) and PostgreSQL ...")
    with tempfile.TemporaryDirectory(prefix="claim-service-", ignore_cleanup_errors=True) as tmp:
        postgres = EmbeddedPostgres(Path(tmp) / "postgres")
        with EmbeddedCluster(PRIMARIES, 0, ephemeral=False, data_dir=Path(tmp) / "cluster") as vc:
            try:
                postgres.start()
                yield settings.with_urls(vc.url, postgres.url)
            finally:
                postgres.stop()


def sharded(benefit: dict[str, Any]) -> dict[str, Any]:
    """The video benefit as a cluster can spread it: ``SHARDS`` buckets, no waiting room, its
    direct-charge options only."""
    options = [o for o in benefit["options"] if o["option_id"] in OPTION_IDS]
    plain = {k: v for k, v in benefit.items() if k != "waiting_room"}
    return {**plain, "options": options, "shards": SHARDS}


def _cluster(redis: Redis) -> RedisCluster:
    return cast(RedisCluster, redis)


def primary_of(redis: Redis, key: str) -> str:
    node = _cluster(redis).get_node_from_key(key)
    return f"{node.host}:{node.port}" if node is not None else "?"


def spread_id(redis: Redis, stem: str) -> str:
    """``stem``, or ``stem-<n>`` for the first n whose buckets land on every primary (8
    buckets miss one of three primaries about one time in nine)."""
    primaries = len(_cluster(redis).get_primaries())
    for n in range(100):
        benefit_id = stem if n == 0 else f"{stem}-{n}"
        nodes = {primary_of(redis, k.config) for k in bucket_keys(benefit_id, SHARDS)}
        if len(nodes) == primaries:
            return benefit_id
    return stem


async def script_calls(redis: Redis) -> dict[str, int]:
    """Lua script calls each primary has run so far (``INFO commandstats``)."""
    cluster, calls = _cluster(redis), {}
    for node in cluster.get_primaries():
        stats = await cluster.info("commandstats", target_nodes=node)
        calls[f"{node.host}:{node.port}"] = sum(
            int(stats.get(f"cmdstat_{cmd}", {}).get("calls", 0)) for cmd in ("evalsha", "eval")
        )
    return calls


@dataclass(frozen=True)
class Bucket:
    number: int
    primary: str
    counters: dict[str, int]

    def moves(self, side: str) -> dict[int, int]:
        """Cumulative units this bucket lent to (``out``) or received from (``in``) each."""
        return {j: self.counters.get(f"{side}:{j}", 0) for j in range(SHARDS)}


async def buckets(redis: Redis, benefit_id: str, period: str) -> list[Bucket]:
    found = []
    for number, keys in enumerate(bucket_keys(benefit_id, SHARDS)):
        raw = await redis.hgetall(keys.stock(period))
        counters = {text(k): int(v) for k, v in raw.items() if text(k) != "held"}
        found.append(Bucket(number, primary_of(redis, keys.config), counters))
    return found


async def burst_report(
    redis: Redis,
    benefit_id: str,
    stats: BurstStats,
    at_end: list[Bucket],
    calls_before: dict[str, int],
) -> list[tuple[str, bool]]:
    """The buckets and primaries as the burst left them; the checks of sharded stock."""
    answered: Counter[int] = Counter()
    for user, n in stats.answers.items():
        answered[bucket_of(user, SHARDS)] += n
    told: Counter[int] = Counter()  # 202 answers, by the member's bucket
    for user, n in stats.claims_by_member.items():
        told[bucket_of(user, SHARDS)] += n
    calls = await script_calls(redis)
    primaries = sorted({b.primary for b in at_end} | set(calls))
    say("")
    say(f"== sharded stock on the cluster ({SHARDS} buckets of {benefit_id} over "
        f"{len(primaries)} primaries) ==")  # fmt: skip
    say("  bucket  primary             answered  accepted      lent  borrowed")
    for b in at_end:
        say(f"  {b.number:>6}  {b.primary:<17} {answered[b.number]:>10,} "
            f"{b.counters.get('accepted', 0):>9,} {sum(b.moves('out').values()):>9,} "
            f"{sum(b.moves('in').values()):>9,}")  # fmt: skip
    for primary in primaries:
        mine = [b for b in at_end if b.primary == primary]
        numbers = ", ".join(str(b.number) for b in mine) or "none"
        done = calls.get(primary, 0) - calls_before.get(primary, 0)
        took = sum(b.counters.get("accepted", 0) for b in mine)
        say(f"  primary {primary:<17} buckets {numbers:<11} answered "
            f"{sum(answered[b.number] for b in mine):>7,}  accepted {took:>6,}  "
            f"Lua calls {done:>7,}")  # fmt: skip
    loans = sum(sum(b.moves("in").values()) for b in at_end)
    lenders = sum(1 for b in at_end if any(b.moves("out").values()))
    borrowers = sum(1 for b in at_end if any(b.moves("in").values()))
    say(f"  borrowed                {loans:>10,}   units between buckets ({borrowers} borrowed, "
        f"{lenders} lent: counters out:<j>, in:<j>, moved)")  # fmt: skip
    first, last = stats.first_sold_out_ms, stats.last_accepted_ms
    sold_out_ok = first is None or last is None or last <= first + 1  # created_at: whole ms
    if first is not None and last is not None:
        say(f"  last acceptance         {first - last:>10,.0f}   ms before the first sold_out "
            "answer")  # fmt: skip
    say("  fulfil started once the burst was over: no refund put a unit back mid-burst")
    deciding = {b.primary for b in at_end if answered[b.number] and b.counters.get("accepted")}
    return [
        (f"sharded: the {SHARDS} buckets decided claims on all {len(primaries)} primaries",
         len(primaries) > 1 and deciding == set(primaries)),
        ("sharded: each bucket accepted exactly its own members' 202 answers",
         all(b.counters.get("accepted", 0) == told[b.number] for b in at_end)),
        ("sharded: buckets borrowed from one another", loans > 0),
        ("sharded: no sold_out answered before the last acceptance", sold_out_ok),
    ]  # fmt: skip


async def final_checks(
    pool: asyncpg.Pool, redis: Redis, benefit_id: str, period: str
) -> list[tuple[str, bool]]:
    """Once every claim is final (refunds included): each loan credited to its receiver, and
    each bucket holding exactly its own members' live claims."""
    now = await buckets(redis, benefit_id, period)
    credited = all(
        now[i].counters.get(f"in:{j}", 0) == now[j].counters.get(f"out:{i}", 0)
        for i in range(SHARDS)
        for j in range(SHARDS)
        if i != j
    )
    live: Counter[int] = Counter()
    for row in await pool.fetch(
        "SELECT user_id FROM claims WHERE benefit_id = $1 AND status <> 'refunded'", benefit_id
    ):
        live[bucket_of(row["user_id"], SHARDS)] += 1
    return [
        ("sharded: every loan credited (in:<i> on each receiver == out:<j> on its lender)",
         credited),
        ("sharded: each bucket's taken == its members' live claims in PostgreSQL",
         all(b.counters.get("taken", 0) == live[b.number] for b in now)),
    ]  # fmt: skip


def skipped() -> None:
    say("== not run on a cluster ==")
    for what, why in SKIPPED:
        say(f"  skipped {what}: {why}")


@dataclass(frozen=True)
class Stack:
    """What the demo started: the clients of its servers and processes."""

    http: aiohttp.ClientSession
    base: str
    admin_base: str
    sim_url: str
    settings: Settings
    pool: asyncpg.Pool
    redis: Redis


async def release(
    stack: Stack,
    benefit_id: str,
    opens: datetime,
    options: DemoOptions,
    start_fulfil: Callable[[], None],
) -> list[tuple[str, bool]]:
    """The burst on the sharded benefit, ``fulfil`` started once it is over, the summary;
    returns the invariants."""
    http, settings, pool, redis = stack.http, stack.settings, stack.pool, stack.redis
    await demo_fulfilment.setup_fulfilment(
        http, stack.admin_base, settings, benefit_id, stack.sim_url, None
    )
    period = periods.current_period(settings.tz)
    calls = await script_calls(redis)
    stats = await burst(http, stack.base, settings, benefit_id, opens, options, None, OPTION_IDS)
    at_end = await buckets(redis, benefit_id, period)
    # What was left when the burst ended, over every bucket (a reply's is its bucket's).
    stats.stock_left = options.stock - sum(b.counters.get("taken", 0) for b in at_end)
    start_fulfil()
    checks = await report(pool, redis, settings, benefit_id, stats, options, SHARDS)
    checks += await burst_report(redis, benefit_id, stats, at_end, calls)
    settle_s = await demo_fulfilment.wait_settled(pool, benefit_id)
    checks += await demo_fulfilment.fulfilment_report(
        pool, redis, http, stack.sim_url, settings, benefit_id, settle_s, SHARDS
    )
    checks += await final_checks(pool, redis, benefit_id, period)
    skipped()
    return checks
