"""A read-only view of a cluster, from etcd: nodes, controller, collections and shard map."""

from __future__ import annotations

import msgspec

from memcluster.cluster.coordinator import Coordinator, leader
from memcluster.cluster.keys import (
    NodeInfo,
    ShardAssignment,
    collections_prefix,
    controller_key,
    coordination_key,
    decode,
    draining_prefix,
    parse_collection_key,
    parse_shard_key,
    shards_prefix,
)
from memcluster.cluster.membership import live_nodes
from memcluster.core.types import CollectionConfig


class ShardView(msgspec.Struct, frozen=True):
    collection: str
    shard: int
    assignment: ShardAssignment | None
    """None while the controller has not placed it."""
    available: bool
    """Its leader's node is up."""


class ClusterView(msgspec.Struct, frozen=True):
    cluster: str
    nodes: list[NodeInfo]
    controller: str | None
    collections: list[CollectionConfig]
    shards: list[ShardView]
    revision: int
    """The etcd revision the shard map was read at."""
    draining: list[str] = []
    """Nodes marked for draining (``memcluster drain``)."""
    down: list[str] = []
    """Nodes the shard map names that are not up (their lease expired)."""

    def shards_held(self, node: str) -> int:
        return sum(1 for s in self.shards if s.assignment and node in s.assignment.replicas)


async def cluster_view(coord: Coordinator, cluster: str) -> ClusterView:
    """Read everything once (each read is linearizable; the set is not one snapshot)."""
    nodes = await live_nodes(coord, cluster)
    up = {n.id for n in nodes}
    configs_kv, _ = await coord.get_prefix(collections_prefix(cluster))
    entries, revision = await coord.get_prefix(shards_prefix(cluster))
    configs = [decode(kv.value, CollectionConfig, kv.key) for kv in configs_kv]
    for kv, config in zip(configs_kv, configs, strict=True):
        assert parse_collection_key(cluster, kv.key) == config.name
    placed = {
        parse_shard_key(cluster, kv.key): decode(kv.value, ShardAssignment, kv.key)
        for kv in entries
    }
    shards = []
    coordination = await coord.get(coordination_key(cluster))
    if coordination is not None:
        coord_shard = decode(coordination.value, ShardAssignment, coordination.key)
        shards.append(ShardView("#coordination", 0, coord_shard, coord_shard.leader in up))
    for config in configs:
        for shard in range(config.shards):
            assignment = placed.get((config.name, shard))
            available = assignment is not None and assignment.leader in up
            shards.append(ShardView(config.name, shard, assignment, available))
    drains, _ = await coord.get_prefix(draining_prefix(cluster))
    named = {n for s in shards if s.assignment for n in s.assignment.replicas}
    return ClusterView(
        cluster=cluster,
        nodes=nodes,
        controller=await leader(coord, controller_key(cluster)),
        collections=configs,
        shards=shards,
        revision=revision,
        draining=sorted(kv.key[len(draining_prefix(cluster)) :].decode() for kv in drains),
        down=sorted(named - up),
    )
