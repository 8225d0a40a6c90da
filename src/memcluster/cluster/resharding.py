"""Changing a collection's layout while it serves: range splits and learned centroids.

The controller runs :func:`reshard` every few rounds. Two triggers:

* **Range split.** A range-sharded collection with ``split_items`` set: a shard holding more
  memories than that is split at the median of its ``range_field`` values (from a sample).
  The upper half becomes a new shard, numbered ``shards`` (the map of value intervals to
  shard numbers is ``range_shards``), first placed on the same node, from where the balancer
  may move it like any shard.
* **Centroids learned.** A vector-sharded collection created without centroids and with
  ``train_after``: until then every memory goes to shard 0; once shard 0 holds
  ``train_after`` memories, k-means on a sample gives one centroid per shard.

Both are one procedure, a *rehome* of one shard under a new config:

1. the node holding the shard freezes it (writes refused with ``WrongNode``: routers retry)
   and copies every memory the new config places elsewhere to its shard;
2. the controller switches the collection's config in etcd, a txn conditioned on the
   revision it read;
3. the node deletes the copied memories from the shard and serves writes again.

Until step 3 a moved memory exists in two shards: reads see it once (gets take the newest,
searches keep one hit per key) but a count may include it twice for that moment. If step 2
fails (the config changed meanwhile) the shard is unfrozen; a new shard that never came into
force is removed from the map, or emptied before the next attempt. Step 2 is arbitrated with
the node's own give-up timer through the shard's assignment (see ``_Job._rehome``), and the
node runs step 3 itself when it sees the new config, so a controller that dies anywhere in
between leaves neither a frozen shard nor lost writes.
"""

from __future__ import annotations

import asyncio
import bisect
import logging

import msgspec
import numpy as np

from memcluster.cluster import wire
from memcluster.cluster.coordinator import Compare, Coordinator, Delete, Put
from memcluster.cluster.dataplane import Peers
from memcluster.cluster.keys import (
    NodeInfo,
    ShardAssignment,
    collection_key,
    collections_prefix,
    decode,
    encode,
    shard_key,
    shards_prefix,
)
from memcluster.cluster.membership import live_nodes
from memcluster.core.errors import MemclusterError
from memcluster.core.types import CollectionConfig, Sharding
from memcluster.shard.sharding import kmeans

log = logging.getLogger("memcluster.controller")

SAMPLE_SIZE = 4_096
"""Memories sampled for a median or for k-means."""


async def reshard(coord: Coordinator, cluster: str, peers: Peers) -> None:
    """Split the range shards that grew past ``split_items``; learn the centroids of the
    vector collections that reached ``train_after``. One change per collection per call."""
    live = {n.id: n for n in await live_nodes(coord, cluster)}
    configs, _ = await coord.get_prefix(collections_prefix(cluster))
    for kv in configs:
        config = decode(kv.value, CollectionConfig, kv.key)
        wants_split = config.sharding is Sharding.RANGE and config.split_items is not None
        wants_centroids = (
            config.sharding is Sharding.VECTOR
            and config.centroids is None
            and config.train_after is not None
        )
        if not (wants_split or wants_centroids):
            continue
        try:
            entries, _ = await coord.get_prefix(shards_prefix(cluster, config.name))
            owners = {}
            placed: dict[int, tuple[ShardAssignment, int]] = {}
            for entry in entries:
                number = int(entry.key.rsplit(b"/", 1)[1])
                assignment = decode(entry.value, ShardAssignment, entry.key)
                owners[number] = assignment.leader
                placed[number] = (assignment, entry.mod_revision)
            if any(owners.get(n) not in live for n in range(config.shards)):
                continue  # not all placed and up: later
            job = _Job(coord, cluster, peers, config, kv.mod_revision, owners, live, placed)
            if wants_split:
                await job.split()
            else:
                await job.learn_centroids()
        except MemclusterError as exc:
            log.warning("resharding %s: %s; trying again later", config.name, exc)


class _Job:
    def __init__(
        self,
        coord: Coordinator,
        cluster: str,
        peers: Peers,
        config: CollectionConfig,
        revision: int,
        owners: dict[int, str | None],
        live: dict[str, NodeInfo],
        placed: dict[int, tuple[ShardAssignment, int]],
    ) -> None:
        self.coord = coord
        self.cluster = cluster
        self.peers = peers
        self.config = config
        self.revision = revision
        self.owners = owners
        self.live = live
        self.placed = placed
        """Each shard's assignment and the revision it was read at."""

    def _url(self, shard: int) -> str:
        owner = self.owners[shard]
        assert owner is not None
        return self.live[owner].peer_url

    async def _sample(self, shard: int, field: str | None) -> wire.SampleReply:
        body = wire.Sample(collection=self.config.name, shard=shard, size=SAMPLE_SIZE, field=field)
        return await self.peers.request(self._url(shard), "shard.sample", body, wire.SampleReply)

    async def _counts(self) -> dict[int, int]:
        by_node: dict[str, list[int]] = {}
        for n in range(self.config.shards):
            by_node.setdefault(self._url(n), []).append(n)
        counts: dict[int, int] = {}
        for url, shards in by_node.items():
            body = wire.ShardScope(collection=self.config.name, shards=shards)
            reply = await self.peers.request(url, "shard.stats", body, wire.ShardStats)
            counts.update({n: st["items"] for n, st in reply.stats.items()})
        return counts

    async def split(self) -> None:
        config = self.config
        assert config.split_items is not None
        assert config.range_field is not None
        counts = await self._counts()
        shard = max(counts, key=lambda n: (counts[n], -n))
        if counts[shard] <= config.split_items:
            return
        sample = await self._sample(shard, config.range_field)
        if not sample.values:
            return
        at = float(np.median(sample.values))
        bounds = list(config.boundaries or [])
        order = list(config.range_shards or range(config.shards))
        interval = order.index(shard)
        lo = bounds[interval - 1] if interval > 0 else -np.inf
        hi = bounds[interval] if interval < len(bounds) else np.inf
        if not lo < at < hi:
            at = float(np.max(sample.values))  # many equal values: split above them
            if not lo < at < hi:
                log.warning("%s/%04d cannot be split: its values are all equal", config.name, shard)
                return
        assert bisect.bisect_left(bounds, at) == interval
        new = config.shards
        bounds.insert(interval, at)
        order.insert(interval + 1, new)
        layout = msgspec.structs.replace(
            config, shards=new + 1, boundaries=bounds, range_shards=order
        )
        owner = self.owners[shard]
        assert owner is not None
        key = shard_key(self.cluster, config.name, new)
        placed = ShardAssignment(epoch=1, replicas=(owner,), leader=owner, in_sync=(owner,))
        existing = await self.coord.get(key)
        if existing is None:
            await self.coord.txn([Compare(key, 0)], [Put(key, encode(placed))])
        else:  # left by a failed attempt: start it empty again
            self.owners[new] = owner
            await self._wait_open(new)
            body = wire.ShardScope(collection=config.name, shards=[new])
            await self.peers.request(self._url(new), "shard.delete_where", body, wire.ShardCount)
        log.info(
            "splitting %s/%04d (%d memories) at %s=%g into a new shard %04d",
            config.name,
            shard,
            counts[shard],
            config.range_field,
            at,
            new,
        )
        self.owners[new] = owner
        await self._wait_open(new)
        if not await self._rehome(shard, layout):
            await self.coord.txn([], [Delete(key)])  # the new shard never came into force

    async def learn_centroids(self) -> None:
        config = self.config
        assert config.train_after is not None
        counts = await self._counts()
        if counts.get(0, 0) < config.train_after:
            return
        sample = await self._sample(0, None)
        # The float32 wire extension is flat: give the rows back their dim.
        vectors = np.asarray(sample.vectors, dtype=np.float32).reshape(-1, config.dim)
        centroids = kmeans(vectors, config.shards, metric=config.metric)
        layout = msgspec.structs.replace(config, centroids=centroids.tolist())
        log.info(
            "%s reached %d memories: placing them by %d learned centroids",
            config.name,
            counts[0],
            config.shards,
        )
        await self._rehome(0, layout)

    async def _wait_open(self, shard: int) -> None:
        body = wire.ShardScope(collection=self.config.name, shards=[shard])
        for _ in range(100):
            try:
                await self.peers.request(self._url(shard), "shard.stats", body, wire.ShardStats)
                return
            except MemclusterError:
                await asyncio.sleep(0.1)
        raise MemclusterError(f"{self.config.name}/{shard:04d} did not open on its node")

    async def _rehome(self, shard: int, layout: CollectionConfig) -> bool:
        """Copy, switch the config, finish (see the module docstring); True if in force.

        The switch is one txn conditioned on both the collection's config and the shard's
        assignment as read, and it raises the shard's epoch: a node that gave up waiting and
        unfroze the shard (raising the epoch itself) makes it fail, and once it succeeded that
        node can no longer unfreeze, so no write lands between the copy and the switch."""
        url = self._url(shard)
        body = wire.Rehome(config=layout, shard=shard)
        ref = wire.ShardRef(collection=layout.name, shard=shard)
        try:
            moved = await self.peers.request(url, "shard.rehome", body, wire.Rehomed, 600.0)
        except MemclusterError:
            await self.peers.request(url, "shard.unfreeze", ref, wire.Done)
            raise
        key = collection_key(self.cluster, layout.name)
        akey = shard_key(self.cluster, layout.name, shard)
        assignment, revision = self.placed[shard]
        bumped = msgspec.structs.replace(assignment, epoch=assignment.epoch + 1)
        try:
            switched = await self.coord.txn(
                [Compare(key, self.revision), Compare(akey, revision)],
                [Put(key, encode(layout)), Put(akey, encode(bumped))],
            )
        except MemclusterError:
            current = await self.coord.get(key)  # committed before the error?
            switched = current is not None and current.value == encode(layout)
        if not switched:
            log.warning("%s changed while resharding; giving this change up", layout.name)
            await self.peers.request(url, "shard.unfreeze", ref, wire.Done)
            return False
        # The node also finishes by itself when it sees the new config: this only hurries it.
        await self.peers.request(url, "shard.rehome_finish", body, wire.Done, 600.0)
        log.info("%s/%04d rehomed: copied %s", layout.name, shard, moved.moved)
        return True
