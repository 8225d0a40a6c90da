"""A node's copy of the cluster's metadata, kept current by an etcd watch.

Every node routes requests with a :class:`ShardMap`: the collection configs, the shard map
(which node holds each shard), the live nodes and the draining marks. :meth:`ShardMap.run`
reads everything under ``/memcluster/{cluster}/`` once, then follows a watch from the revision
read, so it misses no change; when the watch breaks it reads everything again. Readers on
other threads see a consistent :class:`Snapshot` (replaced whole on every change, never
mutated), and :meth:`ShardMap.wait_change` lets a router wait for the next change after a
"wrong node" answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

import msgspec

from memcluster.cluster.coordinator import Coordinator, KeyValue, WatchEvent
from memcluster.cluster.keys import (
    COORDINATION,
    NodeInfo,
    ShardAssignment,
    cluster_prefix,
    collections_prefix,
    coordination_key,
    decode,
    draining_prefix,
    nodes_prefix,
    shards_prefix,
)
from memcluster.core.errors import CorruptionError, MemclusterError
from memcluster.core.types import CollectionConfig

log = logging.getLogger("memcluster.cluster")


class Snapshot(msgspec.Struct, frozen=True):
    """The cluster as of one etcd revision."""

    revision: int = 0
    collections: dict[str, CollectionConfig] = {}
    shards: dict[tuple[str, int], ShardAssignment] = {}
    nodes: dict[str, NodeInfo] = {}
    draining: frozenset[str] = frozenset()
    shard_revisions: dict[tuple[str, int], int] = {}
    """Each shard entry's etcd mod revision (replicas condition their proposals on it)."""

    def owner(self, collection: str, shard: int) -> str | None:
        a = self.shards.get((collection, shard))
        return None if a is None else a.leader


class ShardMap:
    """Follows the cluster's keys in etcd. Create it on the node's event loop."""

    def __init__(self, coord: Coordinator, cluster: str) -> None:
        self.coord = coord
        self.cluster = cluster
        self._snapshot = Snapshot()
        self._kvs: dict[bytes, KeyValue] = {}
        self._seen: dict[bytes, int] = {}
        """The revision of each key's last put or delete applied (deletes included)."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.loaded = asyncio.Event()
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._stop = asyncio.Event()

    @property
    def current(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def listen(self, callback: Callable[[Snapshot], None]) -> None:
        """Call ``callback(snapshot)`` on the event loop after every change."""
        self._listeners.append(callback)

    def wait_change(self, revision: int, timeout_s: float) -> Snapshot:
        """Block (a request thread) until the map is newer than ``revision`` or the timeout."""
        with self._changed:
            self._changed.wait_for(lambda: self._snapshot.revision > revision, timeout_s)
            return self._snapshot

    async def refresh(self) -> Snapshot:
        """Read everything again now (a linearizable read); returns the new snapshot.

        Merged key by key with what the watch delivered: a key changes only to a newer
        revision, so a read older than an event already applied cannot undo it, and the watch
        cannot later replay an older change over this read (``_seen`` remembers, per key, the
        revision of its last put or delete)."""
        kvs, revision = await self.coord.get_prefix(cluster_prefix(self.cluster))
        present = {kv.key for kv in kvs}
        for kv in kvs:
            self._apply(WatchEvent("put", kv, kv.mod_revision))
        for key in [k for k in self._kvs if k not in present]:
            self._apply(WatchEvent("delete", KeyValue(key, b"", revision, 0, 0), revision))
        self._publish(revision)
        return self.current

    async def run(self) -> None:
        """Load, then follow changes until :meth:`stop`."""
        while not self._stop.is_set():
            try:
                snap = await self.refresh()
                self.loaded.set()
                events = self.coord.watch_prefix(
                    cluster_prefix(self.cluster), start_revision=snap.revision + 1
                )
                async with contextlib.aclosing(events):
                    stop = asyncio.ensure_future(self._stop.wait())
                    try:
                        while True:
                            nxt = asyncio.ensure_future(anext(events))
                            done, _ = await asyncio.wait(
                                {nxt, stop}, return_when=asyncio.FIRST_COMPLETED
                            )
                            if stop in done:
                                nxt.cancel()
                                with contextlib.suppress(BaseException):
                                    await nxt
                                return
                            try:
                                event: WatchEvent = nxt.result()
                            except StopAsyncIteration:
                                break
                            self._apply(event)
                            self._publish(event.revision)
                    finally:
                        stop.cancel()
            except MemclusterError as exc:
                log.warning("shard map: watch of etcd broke (%s); reading again", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.5)

    def stop(self) -> None:
        self._stop.set()

    def _apply(self, event: WatchEvent) -> None:
        key = event.kv.key
        if self._seen.get(key, 0) >= event.revision:
            return  # this key is newer already (a refresh read it)
        self._seen[key] = event.revision
        if event.kind == "put":
            self._kvs[key] = event.kv
        else:
            self._kvs.pop(key, None)

    def _publish(self, revision: int) -> None:
        revision = max(revision, self._snapshot.revision)  # never goes back
        snap = self._build(revision)
        with self._changed:
            self._snapshot = snap
            self._changed.notify_all()
        for callback in self._listeners:
            try:
                callback(snap)
            except Exception:
                log.exception("shard map listener failed")

    def _build(self, revision: int) -> Snapshot:
        c = self.cluster
        collections: dict[str, CollectionConfig] = {}
        shards: dict[tuple[str, int], ShardAssignment] = {}
        revisions: dict[tuple[str, int], int] = {}
        nodes: dict[str, NodeInfo] = {}
        draining: set[str] = set()
        for key, kv in self._kvs.items():
            try:
                if key.startswith(nodes_prefix(c)):
                    info = decode(kv.value, NodeInfo, key)
                    nodes[info.id] = info
                elif key.startswith(collections_prefix(c)):
                    config = decode(kv.value, CollectionConfig, key)
                    collections[config.name] = config
                elif key.startswith(shards_prefix(c)):
                    name, _, number = key[len(shards_prefix(c)) :].decode().partition("/")
                    shards[(name, int(number))] = decode(kv.value, ShardAssignment, key)
                    revisions[(name, int(number))] = kv.mod_revision
                elif key == coordination_key(c):
                    shards[COORDINATION] = decode(kv.value, ShardAssignment, key)
                    revisions[COORDINATION] = kv.mod_revision
                elif key.startswith(draining_prefix(c)):
                    draining.add(key[len(draining_prefix(c)) :].decode())
            except (CorruptionError, ValueError) as exc:
                log.error("shard map: skipping %r: %s", key, exc)
        shards = {s: a for s, a in shards.items() if s[0] in collections or s == COORDINATION}
        return Snapshot(
            revision=revision,
            collections=collections,
            shards=shards,
            nodes=nodes,
            draining=frozenset(draining),
            shard_revisions={s: revisions[s] for s in shards},
        )
