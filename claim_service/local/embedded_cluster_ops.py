"""What ``EmbeddedCluster`` asks of its nodes: the cluster's view as each node states it,
and the documented steps of a live slot migration.

Kept apart from the process handling so that the parsing of ``CLUSTER NODES`` and the order
of the resharding commands (the part a reviewer must check against the Valkey docs) read on
their own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

CLUSTER_SLOTS = 16384
PROBE_TIMEOUT_S = 1.0
MIGRATE_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class NodeView:
    """One line of ``CLUSTER NODES``: a node as seen by the node that was asked."""

    node_id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None  # the primary a replica follows
    slots: tuple[tuple[int, int], ...]  # owned ranges, inclusive; migrations left out

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "noaddr", "handshake"})


def client(port: int, timeout_s: float = PROBE_TIMEOUT_S) -> redis.Redis:
    """A short-lived, non-cluster client of one node: cluster administration is per node."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )


def parse_nodes(text: str) -> list[NodeView]:
    """``CLUSTER NODES`` text (``id ip:port@cport flags primary ping pong epoch link
    slot…``)."""
    views = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split(",")[0].split("@")[0]
        port = int(address.rpartition(":")[2] or 0)
        slots = []
        for item in fields[8:]:
            if item.startswith("["):  # "[slot->-id]" / "[slot-<-id]": a migration underway
                continue
            start, _, end = item.partition("-")
            slots.append((int(start), int(end or start)))
        views.append(
            NodeView(
                node_id=fields[0],
                port=port,
                flags=frozenset(fields[2].split(",")),
                primary_id=None if fields[3] == "-" else fields[3],
                slots=tuple(sorted(slots)),
            )
        )
    return views


def cluster_nodes(port: int) -> list[NodeView]:
    with client(port) as conn:
        return parse_nodes(str(conn.execute_command("CLUSTER", "NODES")))


def cluster_info(port: int) -> dict[str, str]:
    with client(port) as conn:
        text = str(conn.execute_command("CLUSTER", "INFO"))
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def slot_map(views: list[NodeView]) -> tuple[tuple[int, int, str], ...]:
    """Who owns which slots, in a form two nodes' views can be compared by."""
    return tuple(sorted((a, b, v.node_id) for v in views if v.is_primary for a, b in v.slots))


def replication_map(views: list[NodeView]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((v.node_id, v.primary_id) for v in views if v.primary_id))


def even_ranges(primaries: int) -> list[tuple[int, int]]:
    """The 16384 slots split into ``primaries`` contiguous ranges of near equal size."""
    bounds = [i * CLUSTER_SLOTS // primaries for i in range(primaries + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(primaries)]


def owner_of(views: list[NodeView], slot: int) -> NodeView:
    for view in views:
        if view.is_primary and any(a <= slot <= b for a, b in view.slots):
            return view
    raise LookupError(f"slot {slot} is not served by any primary")


def migrate_slot_steps(
    slot: int,
    source: NodeView,
    target: NodeView,
    other_primaries: list[int],
    *,
    batch: int = 10,
    pause_s: float = 0.0,
) -> int:
    """Move ``slot`` with its keys from ``source`` to ``target`` while clients keep using it;
    returns how many keys moved.

    The live resharding steps of the cluster specification, in its order: mark the slot
    IMPORTING on the target before MIGRATING on the source (so the ASK redirects the source
    starts giving are honoured at once), move the keys in batches with ``MIGRATE … KEYS`` (each
    key moves atomically; a client asking for a key already moved gets ASK, a multi-key
    command over keys on both sides gets TRYAGAIN), then assign the slot with ``SETSLOT …
    NODE`` on the target first, the source second and every other primary last, so that no
    node ever points the slot back at the source. ``pause_s`` between batches widens the
    window in which clients meet ASK/TRYAGAIN, for drills."""
    moved = 0
    with client(target.port) as dst, client(source.port, MIGRATE_TIMEOUT_MS / 1000) as src:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        while True:
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            # No REPLACE: a key already on the target would mean two owners; refuse loudly.
            src.execute_command(
                "MIGRATE", "127.0.0.1", target.port, "", 0, MIGRATE_TIMEOUT_MS, "KEYS", *keys
            )
            moved += len(keys)
            if pause_s:
                time.sleep(pause_s)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    for port in other_primaries:
        with client(port) as other:
            other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    log.info(
        "slot %d: %d keys moved from 127.0.0.1:%d to 127.0.0.1:%d",
        slot,
        moved,
        source.port,
        target.port,
    )
    return moved
