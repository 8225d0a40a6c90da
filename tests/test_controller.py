"""The controller on the in-memory etcd twin: it places every shard of every collection on a
live node, balanced; only the election winner writes; a new controller takes over when the
old one's lease ends; and a write from a stale view is refused by its txn."""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec

from memcluster.cluster.controller import Controller, reconcile
from memcluster.cluster.coordinator import KeyValue, MemoryCoordinator, MemoryEtcd
from memcluster.cluster.keys import (
    NodeInfo,
    ShardAssignment,
    collection_key,
    controller_key,
    encode,
    node_key,
    shard_key,
    shards_prefix,
)
from memcluster.core.clock import ManualClock
from memcluster.core.types import CollectionConfig

CLUSTER = "c"


async def _node(coord: MemoryCoordinator, node_id: str) -> int:
    lease = await coord.grant_lease(10)
    info = NodeInfo(id=node_id, http_url="http://h:1", peer_url="mc://h:2", started_at=0.0)
    await coord.put(node_key(CLUSTER, node_id), encode(info), lease=lease)
    return lease


async def _collection(coord: MemoryCoordinator, name: str, shards: int) -> None:
    config = CollectionConfig(name=name, dim=4, shards=shards)
    await coord.put(collection_key(CLUSTER, name), encode(config))


async def _owners(coord: MemoryCoordinator) -> dict[str, str | None]:
    kvs, _ = await coord.get_prefix(shards_prefix(CLUSTER))
    return {
        kv.key.decode().rsplit("shards/", 1)[1]: msgspec.json.decode(
            kv.value, type=ShardAssignment
        ).leader
        for kv in kvs
    }


def test_reconcile_places_every_shard_on_live_nodes_balanced() -> None:
    async def scenario() -> None:
        coord = MemoryCoordinator(MemoryEtcd(ManualClock()))
        for node in ("a", "b", "c"):
            await _node(coord, node)
        await _collection(coord, "memories", 4)
        await _collection(coord, "notes", 3)
        await reconcile(coord, CLUSTER)
        owners = await _owners(coord)
        assert len(owners) == 7
        assert sorted(Counter(owners.values()).values()) == [2, 2, 3]
        kvs, _ = await coord.get_prefix(shards_prefix(CLUSTER))
        entry = msgspec.json.decode(kvs[0].value, type=ShardAssignment)
        assert (entry.epoch, entry.replicas, entry.in_sync) == (1, (entry.leader,), (entry.leader,))
        before = await _owners(coord)
        await reconcile(coord, CLUSTER)  # a placed map stays as it is
        assert await _owners(coord) == before

    asyncio.run(scenario())


def test_a_write_from_a_stale_view_is_refused() -> None:
    """Another writer places the shard between our read and our write: our txn fails and the
    entry written first stays."""

    async def scenario() -> None:
        coord = MemoryCoordinator(MemoryEtcd(ManualClock()))
        await _node(coord, "a")
        await _collection(coord, "m", 1)
        theirs = ShardAssignment(epoch=1, replicas=("x",), leader="x", in_sync=("x",))
        original_get_prefix = coord.get_prefix
        raced = False

        async def racing_get_prefix(prefix: bytes) -> tuple[list[KeyValue], int]:
            nonlocal raced
            result = await original_get_prefix(prefix)
            if prefix == shards_prefix(CLUSTER) and not raced:
                raced = True
                await coord.put(shard_key(CLUSTER, "m", 0), encode(theirs))
            return result

        coord.get_prefix = racing_get_prefix  # type: ignore[method-assign]
        await reconcile(coord, CLUSTER)
        assert await _owners(coord) == {"m/0000": "x"}

    asyncio.run(scenario())


def test_one_controller_leads_and_another_takes_over_when_its_lease_ends() -> None:
    async def scenario() -> None:
        server = MemoryEtcd(ManualClock())
        first, second = server.client(), server.client()
        lease_a = await _node(first, "a")
        lease_b = await _node(second, "b")
        await _collection(first, "m", 2)
        ctrl_a = Controller(first, CLUSTER, "a", interval_s=0.01)
        ctrl_b = Controller(second, CLUSTER, "b", interval_s=0.01)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(ctrl_a.run(lambda: lease_a))
            await asyncio.sleep(0.05)
            tasks.create_task(ctrl_b.run(lambda: lease_b))
            await asyncio.sleep(0.05)
            assert (ctrl_a.leading, ctrl_b.leading) == (True, False)
            assert set((await _owners(first)).values()) == {"a", "b"}
            await first.revoke(lease_a)  # node a dies: its key and its controller key go
            for _ in range(100):
                if ctrl_b.leading:
                    break
                await asyncio.sleep(0.01)
            assert ctrl_b.leading
            held = await second.get(controller_key(CLUSTER))
            assert held is not None
            assert held.value == b"b"
            ctrl_a.stop()
            ctrl_b.stop()

    asyncio.run(scenario())
