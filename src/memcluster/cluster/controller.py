"""The controller: one node at a time places shards on nodes, through etcd.

Every node runs a :class:`Controller`. They campaign for the ``controller`` key on their
membership lease, so the controller dies with its node and another takes over within one
lease TTL. The holder reconciles every ``interval_s``:

1. read the live nodes, the collection configs and the shard map, noting the revision read;
2. ask :func:`memcluster.cluster.placement.plan` what to do;
3. write each new assignment as a txn conditioned on that shard's key being unchanged since the
   read (absent, for a new shard). A txn that fails means the map changed under us: the next
   round reads it again. Nothing is ever written from a stale view.

A shard map entry starts at epoch 1 with one replica, which is its leader and its whole
in-sync set. Moves (drain, balance) need shard transfer, which is not built yet: the
controller logs them and leaves those shards where they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from memcluster.cluster.coordinator import Compare, Coordinator, Put, campaign
from memcluster.cluster.keys import (
    ShardAssignment,
    collections_prefix,
    controller_key,
    decode,
    encode,
    parse_collection_key,
    parse_shard_key,
    shard_key,
    shards_prefix,
)
from memcluster.cluster.membership import live_nodes
from memcluster.cluster.placement import Assign, Move, ShardId, plan
from memcluster.core.errors import MemclusterError, is_retryable
from memcluster.core.types import CollectionConfig

log = logging.getLogger("memcluster.controller")


async def reconcile(coord: Coordinator, cluster: str) -> list[Assign | Move]:
    """One round: place every unplaced shard on a live node. Returns the actions planned
    (assignments written; moves only reported). Safe to run from several nodes at once: the
    txns make all but one write fail."""
    nodes = {n.id for n in await live_nodes(coord, cluster)}
    configs, _ = await coord.get_prefix(collections_prefix(cluster))
    entries, _ = await coord.get_prefix(shards_prefix(cluster))
    owners: dict[ShardId, str | None] = {}
    revisions: dict[ShardId, int] = {}
    for kv in configs:
        name = parse_collection_key(cluster, kv.key)
        config = decode(kv.value, CollectionConfig, kv.key)
        for shard in range(config.shards):
            owners[(name, shard)] = None
            revisions[(name, shard)] = 0
    for kv in entries:
        shard_id = parse_shard_key(cluster, kv.key)
        if shard_id in owners:
            assignment = decode(kv.value, ShardAssignment, kv.key)
            owners[shard_id] = assignment.leader or (assignment.replicas or (None,))[0]
            revisions[shard_id] = kv.mod_revision
    step = plan(owners, nodes)
    for action in step.actions:
        if isinstance(action, Assign):
            collection, shard = action.shard
            key = shard_key(cluster, collection, shard)
            entry = ShardAssignment(
                epoch=1, replicas=(action.node,), leader=action.node, in_sync=(action.node,)
            )
            written = await coord.txn(
                [Compare(key, revisions[action.shard])], [Put(key, encode(entry))]
            )
            if not written:
                log.info(
                    "%s/%d changed while planning; the next round reads it again", *action.shard
                )
        else:
            log.info(
                "would move %s/%d from %s to %s (%s): shard transfer is not built yet",
                *action.shard,
                action.source,
                action.target,
                action.reason,
            )
    if step.unavailable:
        log.warning("shards on down nodes, unavailable: %s", step.unavailable)
    return list(step.actions)


class Controller:
    """Campaigns for the controller key on ``lease`` and reconciles while it holds it."""

    def __init__(
        self, coord: Coordinator, cluster: str, node_id: str, *, interval_s: float = 1.0
    ) -> None:
        self.coord = coord
        self.cluster = cluster
        self.node_id = node_id
        self.interval_s = interval_s
        self.leading = False
        self._stop = asyncio.Event()

    async def run(self, lease: Callable[[], int | None]) -> None:
        """Until :meth:`stop`: campaign on the lease ``lease()`` names (the node's membership
        lease, which changes if the node registers again), and reconcile while leading."""
        key = controller_key(self.cluster)
        while not self._stop.is_set():
            current = lease()
            try:
                self.leading = current is not None and await campaign(
                    self.coord, key, self.node_id, current
                )
                if self.leading:
                    await reconcile(self.coord, self.cluster)
            except MemclusterError as exc:
                self.leading = False
                if not is_retryable(exc):
                    log.error("controller on %s: %s", self.node_id, exc)
                else:
                    log.warning("controller on %s: %s; retrying", self.node_id, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    def stop(self) -> None:
        self._stop.set()
