"""The embedded Valkey Cluster harness (``EmbeddedCluster``) is what the cluster-mode tests and
drills will stand on, so it is checked here with redis-py's own ``RedisCluster``: the slots are
covered and agreed, a hash-tagged Lua script runs and a cross-slot one is refused, a slot moved
live under writes loses and duplicates nothing, and a killed primary's replica takes over.
Real ``valkey-server`` processes only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterCrossSlotError, ClusterError, RedisClusterException

from claim_service.local.embedded_cluster import EmbeddedCluster
from claim_service.local.embedded_cluster_ops import CLUSTER_SLOTS, cluster_info

TAG = "{b:video}"
COUNTER, LOG = f"{TAG}:claims", f"{TAG}:log"
# One claim-like atomic step over two keys of one benefit: count it and record who made it.
CLAIM_LUA = "redis.call('INCR', KEYS[1]); return redis.call('RPUSH', KEYS[2], ARGV[1])"
WRITERS = 16
FILLER_KEYS = 300  # enough keys in the slot that the migration overlaps the writes
FAILOVER_WITHIN_S = 10.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(primaries=3, replicas_per_primary=1) as servers:
        yield servers


def cluster_client(servers: EmbeddedCluster) -> RedisCluster:
    # reinitialize_steps=0: on MOVED, patch the slot only. The default (a full refresh every
    # 5th MOVED) closes every node's connections under commands still in flight, and the
    # client's retry of those can run a script twice (see the harness report).
    nodes = [ClusterNode(host, port) for host, port in servers.startup_nodes]
    return RedisCluster(startup_nodes=nodes, decode_responses=True, reinitialize_steps=0)


@pytest.fixture
async def cluster_redis(cluster: EmbeddedCluster) -> AsyncIterator[RedisCluster]:
    rc = cluster_client(cluster)
    await rc.initialize()
    await rc.flushall(target_nodes=RedisCluster.PRIMARIES)
    await rc.script_flush()  # every primary
    yield rc
    await rc.aclose()


def test_the_harness_forms_the_cluster_it_describes(cluster: EmbeddedCluster) -> None:
    nodes = cluster.nodes
    primaries = [n for n in nodes if n.role == "primary"]
    replicas = [n for n in nodes if n.role == "replica"]
    assert len(primaries) == 3 and len(replicas) == 3
    assert sorted(r.primary_id or "" for r in replicas) == sorted(p.node_id for p in primaries)
    assert all(n.pid is not None for n in nodes)
    hosts = ",".join(n.address for n in nodes)
    assert cluster.url == f"redis+cluster://{hosts}"
    owners = {cluster.primary_for_slot(slot).port for slot in range(0, CLUSTER_SLOTS, 1000)}
    assert owners == {p.port for p in primaries}
    assert all(cluster_info(n.port)["cluster_state"] == "ok" for n in nodes)
    assert all(cluster_info(n.port)["cluster_slots_assigned"] == "16384" for n in nodes)


async def test_keys_in_every_slot_range_are_stored_and_read(
    cluster: EmbeddedCluster, cluster_redis: RedisCluster
) -> None:
    keys = [f"member:{i}" for i in range(200)]
    assert len({cluster.primary_for_slot(key_slot(k.encode())).port for k in keys}) == 3
    for i, key in enumerate(keys):
        await cluster_redis.set(key, i)
    assert [await cluster_redis.get(key) for key in keys] == [str(i) for i in range(200)]


async def test_a_hash_tagged_script_runs_and_survives_a_lost_script_cache(
    cluster: EmbeddedCluster, cluster_redis: RedisCluster
) -> None:
    claim = cluster_redis.register_script(CLAIM_LUA)
    assert await claim(keys=[COUNTER, LOG], args=["m1"]) == 1
    owner = cluster.primary_for_slot(key_slot(TAG.encode()))
    with redis.Redis(port=owner.port) as node:
        node.script_flush()  # as a restarted or promoted node would have it
    assert await claim(keys=[COUNTER, LOG], args=["m2"]) == 2  # NOSCRIPT, load, run again
    assert await cluster_redis.get(COUNTER) == "2"
    assert await cluster_redis.lrange(LOG, 0, -1) == ["m1", "m2"]


async def test_a_script_over_two_slots_is_refused(cluster_redis: RedisCluster) -> None:
    claim = cluster_redis.register_script(CLAIM_LUA)
    other_log = "{b:music}:log"
    assert key_slot(TAG.encode()) != key_slot(b"{b:music}")
    with pytest.raises(RedisClusterException, match="same key slot"):  # by the client
        await claim(keys=[COUNTER, other_log], args=["m1"])
    await cluster_redis.script_load(CLAIM_LUA)
    owner = cluster_redis.get_node_from_key(COUNTER)
    with pytest.raises(ClusterCrossSlotError):  # and by the server, sent there regardless
        await cluster_redis.execute_command(
            "EVALSHA", claim.sha, 2, COUNTER, other_log, "m1", target_nodes=owner
        )
    assert await cluster_redis.exists(COUNTER, other_log) == 0


async def test_a_slot_moved_during_writes_loses_and_duplicates_nothing(
    cluster: EmbeddedCluster, cluster_redis: RedisCluster
) -> None:
    slot = key_slot(TAG.encode())
    source = cluster.primary_for_slot(slot)
    target = next(n for n in cluster.nodes if n.role == "primary" and n.port != source.port)
    for i in range(FILLER_KEYS):
        await cluster_redis.set(f"{TAG}:filler:{i}", i)
    claim = cluster_redis.register_script(CLAIM_LUA)
    acknowledged: list[str] = []
    ambiguous: list[BaseException] = []
    refused = 0
    done = asyncio.Event()

    async def writer(name: str) -> None:
        nonlocal refused
        sequence = 0
        while not done.is_set():
            sequence += 1
            ident = f"{name}-{sequence}"
            while True:
                try:
                    await claim(keys=[COUNTER, LOG], args=[ident])
                    acknowledged.append(ident)
                    break
                except ClusterError as exc:
                    # Every attempt met MOVED/ASK/TRYAGAIN: nothing ran; the same id again.
                    assert "TTL exhausted" in str(exc)
                    refused += 1
                except Exception as exc:  # may or may not have run: counted, must not occur
                    ambiguous.append(exc)
                    break

    with redis.Redis(port=source.port) as node:
        node.config_resetstat()
    writers = [asyncio.create_task(writer(f"w{i}")) for i in range(WRITERS)]
    await asyncio.sleep(0.2)
    moved = await asyncio.to_thread(cluster.migrate_slot, slot, target, batch=1, pause_s=0.002)
    await asyncio.sleep(0.2)
    done.set()
    await asyncio.gather(*writers)

    assert moved == FILLER_KEYS + 2
    assert cluster.primary_for_slot(slot).port == target.port
    with redis.Redis(port=source.port, decode_responses=True) as node:
        redirects = node.info("errorstats")
        assert node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    # The writes really met the migration half-way (else this test proves nothing).
    assert "errorstat_ASK" in redirects or "errorstat_TRYAGAIN" in redirects, redirects
    assert ambiguous == []
    recorded = await cluster_redis.lrange(LOG, 0, -1)
    assert len(recorded) == len(set(recorded)), "a claim was recorded twice"
    assert sorted(recorded) == sorted(acknowledged), "a claim was lost or unacknowledged"
    assert await cluster_redis.get(COUNTER) == str(len(acknowledged))
    fillers = [await cluster_redis.get(f"{TAG}:filler:{i}") for i in range(FILLER_KEYS)]
    assert fillers == [str(i) for i in range(FILLER_KEYS)]
    print(f"migration: {moved} keys, {len(acknowledged)} claims, {refused} redirect loops")


async def test_a_killed_primary_is_replaced_by_its_replica(tmp_path: Path) -> None:
    with EmbeddedCluster(primaries=3, replicas_per_primary=1, data_dir=tmp_path) as servers:
        slot = key_slot(TAG.encode())
        victim = servers.primary_for_slot(slot)
        (heir,) = servers.replicas_of(victim)
        with redis.Redis(port=victim.port, decode_responses=True) as node:
            for i in range(50):
                node.set(f"{TAG}:seed:{i}", i)
            assert node.execute_command("WAIT", 1, 2000) == 1  # the replica holds them
        servers.kill(victim)
        killed_at = time.monotonic()
        await asyncio.to_thread(servers.wait_healthy, FAILOVER_WITHIN_S)
        took = time.monotonic() - killed_at
        assert servers.primary_for_slot(slot).port == heir.port
        alive = [n for n in servers.nodes if n.pid is not None]
        assert all(cluster_info(n.port)["cluster_state"] == "ok" for n in alive)
        rc = cluster_client(servers)
        try:
            values = [await rc.get(f"{TAG}:seed:{i}") for i in range(50)]
            assert values == [str(i) for i in range(50)]
            claim = rc.register_script(CLAIM_LUA)  # not in the promoted node's cache yet
            assert await claim(keys=[COUNTER, LOG], args=["after"]) == 1
        finally:
            await rc.aclose()
        print(f"failover: replica promoted and cluster ok {took:.1f}s after the kill")
