"""Every Redis key name, timeout constant and Lua script load lives here.

All keys of one benefit carry the hash tag ``{b:<benefit_id>}`` so that, on a Redis Cluster,
they share one hash slot and one Lua call can touch them all. The tier snapshot is shared by
all benefits and is therefore the one key outside that slot (see ``tiers``).

A benefit's counters are trusted only while its ``live`` marker holds the ``run_id`` of the
Redis server process answering: a restarted, replaced or promoted server has another run id,
so ``claim.lua`` and ``refund.lua`` refuse to touch the counters until ``recovery`` has
rebuilt them from PostgreSQL and the stream and marked the benefit live again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.crc import key_slot

PREFIX = "claim"
CATALOGUE_KEY = f"{PREFIX}:benefits"  # set of benefit ids pushed to Redis
CATALOGUE_LIVE_KEY = f"{PREFIX}:benefits:live"  # run id once every benefit was recovered
# The stock buckets of sharded benefits ("<benefit_id>#<suffix>", see ``bucket_keys``): each
# has a stream of its own, which the writer and the stream readers find here.
BUCKETS_KEY = f"{PREFIX}:benefits:buckets"
DEAD_LETTER_STREAM = f"{PREFIX}:deadletter"  # stream entries the writer could not persist
LAG_CHECK_KEY = f"{PREFIX}:lagcheck"  # lease: one process per interval compares Redis with PG
ZONES_KEY = f"{PREFIX}:zones"  # hash zone_id -> zone JSON, mirrored from PostgreSQL
# The points mirror (see ``points_mirror``): one hash field per member holding their lots,
# the marker naming the server whose mirror recovery verified, and the holds taken by
# negative adjustments (reference -> the lots they took points from).
POINTS_KEY = f"{PREFIX}:points"
POINTS_LIVE_KEY = f"{PREFIX}:points:live"
POINTS_HOLDS_KEY = f"{PREFIX}:points:holds"
# Partners' circuit breakers as each fulfil worker last reported them (see ``partner_health``).
BREAKERS_KEY = f"{PREFIX}:partners:breakers"
# PostgreSQL NOTIFY channel: the writer wakes fulfil workers when it has persisted claims.
CLAIMS_WRITTEN_CHANNEL = "claims_written"
WRITER_GROUP = "writers"
# Pub/sub: a benefit id (or "*" for all) whose stock, codes, configuration or tiers changed in
# a way that can turn a refusal into an acceptance (claims' local gates listen).
STOCK_CHANNEL = f"{PREFIX}:stock"
# Per-period keys outlive their month so late retries and reports still find them, then
# expire; PostgreSQL keeps the permanent record.
PERIOD_KEY_TTL_S = 100 * 24 * 3600
CATALOGUE_NEGATIVE_TTL_S = 1.0
CATALOGUE_NEGATIVE_MAX = 1024  # unknown benefit ids remembered at most (LRU)
RECOVERY_LOCK_S = 120.0
RECOVERY_WAIT_S = 10.0
REDIS_SOCKET_TIMEOUT_S = 5.0
REDIS_CONNECT_RETRIES = 20
STALE_RETRIES = 2


def text(value: object) -> str:
    """A Redis reply value as ``str`` (replies are bytes; tests may use decoded clients)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def tiers_key(period: str) -> str:
    return f"{PREFIX}:tiers:{period}"


def tiers_live_key(period: str) -> str:
    return f"{PREFIX}:tiers:{period}:live"


def events_key(event_type: str) -> str:
    """Hash: member -> when (unix ms) their latest event of ``event_type`` occurred, mirrored
    from PostgreSQL's ``bank_events`` (read by the engine for benefits that need one)."""
    return f"{PREFIX}:events:{event_type}"


def events_live_key(event_type: str) -> str:
    return f"{PREFIX}:events:{event_type}:live"


def rewards_key(benefit_id: str) -> str:
    """Hash: member -> when (unix ms) a campaign's reward of ``benefit_id`` is released to
    them (its cool-off over), mirrored from PostgreSQL's ``campaign_rewards``."""
    return f"{PREFIX}:rewards:{benefit_id}"


def rewards_live_key(benefit_id: str) -> str:
    return f"{PREFIX}:rewards:{benefit_id}:live"


def idem_field(user_id: str, request_id: str) -> str:
    """The idempotency hash field of a member's request. The length prefix (in UTF-8 bytes,
    which is what Lua's ``#`` counts) keeps ``("ab", "c")`` apart from ``("a", "bc")``."""
    return f"{len(user_id.encode())}:{user_id}{request_id}"


def code_bucket(option_id: str, expiry_ms: int) -> str:
    """The field of a card-key option's free codes expiring at ``expiry_ms`` (0: never)."""
    return option_id if expiry_ms == 0 else f"{option_id}|{expiry_ms}"


@dataclass(frozen=True)
class BenefitKeys:
    """The keys of one benefit; ``period`` selects the per-period ones."""

    benefit_id: str

    @property
    def tag(self) -> str:
        return "{b:" + self.benefit_id + "}"

    @property
    def config(self) -> str:
        return f"{PREFIX}:{self.tag}:cfg"

    @property
    def stream(self) -> str:
        return f"{PREFIX}:{self.tag}:stream"

    @property
    def pending(self) -> str:
        return f"{PREFIX}:{self.tag}:pending"

    @property
    def codes(self) -> str:
        """Free codes per card-key option and expiry bucket (see ``code_bucket``)."""
        return f"{PREFIX}:{self.tag}:codes"

    @property
    def code_expiries(self) -> str:
        """Sorted set of the expiring buckets in ``codes``, scored by expiry (unix ms)."""
        return f"{PREFIX}:{self.tag}:codexp"

    @property
    def live(self) -> str:
        return f"{PREFIX}:{self.tag}:live"

    @property
    def recovery_lock(self) -> str:
        return f"{PREFIX}:{self.tag}:recovering"

    def refunded(self, period: str) -> str:
        return f"{PREFIX}:{self.tag}:refunded:{period}"

    def stock(self, period: str) -> str:
        return f"{PREFIX}:{self.tag}:stock:{period}"

    def used(self, period: str) -> str:
        return f"{PREFIX}:{self.tag}:used:{period}"

    def idempotency(self, period: str) -> str:
        return f"{PREFIX}:{self.tag}:idem:{period}"

    def pity(self, period: str) -> str:
        """A draw's members: draws in a row without a pity prize (see ``claim.lua``)."""
        return f"{PREFIX}:{self.tag}:pity:{period}"

    def room_keys(self, period: str) -> list[str]:
        """KEYS for ``room.lua``: the configuration, the period's stock, the room's state
        (admission frontier), its queue (ticket ids by place) and tickets (member -> id)."""
        return [
            self.config,
            self.stock(period),
            f"{PREFIX}:{self.tag}:room:{period}",
            f"{PREFIX}:{self.tag}:queue:{period}",
            f"{PREFIX}:{self.tag}:tickets:{period}",
        ]

    def claim_keys(
        self, period: str, previous: str | None, tiers_period: str, *, cluster: bool = False
    ) -> list[str]:
        """KEYS for ``claim.lua``, in the order the script expects. ``previous`` is the period
        whose idempotency keys a retry may still match (none for a one-off release);
        ``tiers_period`` the month whose tier snapshot applies (the current one). On a
        cluster every key must be in the benefit's slot: the tier snapshot and the points
        mirror are not, so placeholders in the slot stand for them (the caller passes the
        members' tiers; a benefit priced in points is not served on a cluster)."""
        keys = [
            self.config,
            self.stock(period),
            self.used(period),
            self.idempotency(period),
            self.stream,
            tiers_key(tiers_period),
            self.pending,
            self.codes,
            self.code_expiries,
            self.live,
            self.idempotency(previous or period),
            POINTS_KEY,
            POINTS_LIVE_KEY,
            self.pity(period),
        ]
        if cluster:
            keys[5], keys[11], keys[12] = self.elsewhere("tiers"), *self._no_points()
        return keys

    def elsewhere(self, name: str) -> str:
        """A key in the benefit's slot standing for one outside it (never written)."""
        return f"{PREFIX}:{self.tag}:elsewhere:{name}"

    def _no_points(self) -> tuple[str, str]:
        return self.elsewhere("points"), self.elsewhere("points-live")

    def refund_keys(self, period: str, *, cluster: bool = False) -> list[str]:
        """KEYS for ``refund.lua`` (on a cluster, without the points mirror: see
        ``claim_keys``)."""
        keys = [
            self.stock(period),
            self.used(period),
            self.refunded(period),
            self.codes,
            self.code_expiries,
            self.live,
            POINTS_KEY,
            POINTS_LIVE_KEY,
        ]
        if cluster:
            keys[6], keys[7] = self._no_points()
        return keys


@lru_cache(maxsize=1024)
def bucket_keys(benefit_id: str, shards: int) -> tuple[BenefitKeys, ...]:
    """The keys of a sharded benefit's stock buckets, in bucket order. A bucket's keys are a
    benefit's keys under the owner ``<benefit_id>#<suffix>`` ('#' is never in an id), whose
    suffix is the bucket's number, salted when needed so that no two buckets share a hash
    slot (on a cluster they spread over the primaries)."""
    buckets: list[BenefitKeys] = []
    slots = {key_slot(BenefitKeys(benefit_id).tag.encode())}
    for number in range(shards):
        salt = 0
        while True:
            suffix = str(number) if salt == 0 else f"{number}.{salt}"
            keys = BenefitKeys(f"{benefit_id}#{suffix}")
            slot = key_slot(keys.tag.encode())
            if slot not in slots:
                break
            salt += 1
        slots.add(slot)
        buckets.append(keys)
    return tuple(buckets)


def owner_benefit(owner: str) -> str:
    """The benefit id of a key owner (a benefit, or one of its buckets)."""
    return owner.split("#", 1)[0]


def benefit_id_from_stream(stream_key: str) -> str:
    start = stream_key.index("{b:") + 3
    return stream_key[start : stream_key.index("}", start)]


def _data_dir(name: str) -> Path:
    """Locate ``lua/`` or ``migrations/``: packaged in a wheel, or at the repo root."""
    packaged = resources.files("claim_service") / name
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / name


def lua_source(name: str) -> str:
    return (_data_dir("lua") / f"{name}.lua").read_text()


def migrations_dir() -> Path:
    return _data_dir("migrations")


class Scripts:
    """The Lua scripts registered on one client (EVALSHA, falling back to EVAL once)."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.claim: AsyncScript = client.register_script(lua_source("claim"))
        self.restore: AsyncScript = client.register_script(lua_source("restore"))
        self.push_config: AsyncScript = client.register_script(lua_source("push_config"))
        self.refund: AsyncScript = client.register_script(lua_source("refund"))
        self.live: AsyncScript = client.register_script(lua_source("live"))
        self.codes: AsyncScript = client.register_script(lua_source("codes"))
        self.points: AsyncScript = client.register_script(lua_source("points"))
        self.room: AsyncScript = client.register_script(lua_source("room"))
        self.buckets: AsyncScript = client.register_script(lua_source("buckets"))
