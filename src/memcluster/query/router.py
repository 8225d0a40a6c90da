"""Any node answers any request: route it to the shards' owners, scatter, gather, merge.

:class:`ClusterStore` gives a cluster node the interface the server serves
(:class:`memcluster.node.service.Store`), so HTTP and binary clients use a cluster exactly as
they use one server. For each request it

1. **plans** the shards: one for a key in a hash collection; the shards a namespace, a range
   filter or the nearest centroids allow for a search (:class:`~memcluster.shard.sharding.
   Sharder`); all of them otherwise;
2. **scatters**: groups the shards by the node the shard map names, and sends each node one
   request for its shards over the binary protocol (shards held here are served in-process),
   all in parallel, within ``route_deadline_s``;
3. **gathers and merges**: the global top-k by score (ties by namespace and key), sums, or
   the first page of the merged key order.

A node that answers ``WrongNode`` (the shard moved, or is not open yet) or cannot be reached
makes the router wait for the next change of the shard map and send that part again, until
the deadline. A shard whose node is down is reported at once: ``ShardUnavailable`` naming the
shard and the node, or, for a search with ``allow_partial=True``, an answer from the other
shards that lists it in ``missing_shards``.

Writes: the shards of one node are written atomically; a batch that spans nodes is written
node by node, so a batch rejected by one node (a version conflict, capacity) may have been
written on another. Every put carries an idempotency key (the caller's, or one made here),
so a part sent again after a lost connection is answered from the shard's record; deletes are
not sent again (a lost reply leaves unknown whether the memory existed). Range- and
vector-sharded collections place a memory by its field or vector, so a memory that changes
them moves: it is located first, written to its new shard, and its old copy deleted only
while unchanged (see ``ClusterCollection._put_moving``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from memcluster.cluster import wire
from memcluster.cluster.coordinator import Compare, Coordinator, Delete, Op, Put
from memcluster.cluster.dataplane import DataPlane, Peers, follow_local
from memcluster.cluster.keys import (
    COORDINATION,
    ShardAssignment,
    collection_key,
    encode,
    shards_prefix,
)
from memcluster.cluster.shardmap import ShardMap, Snapshot
from memcluster.core import api, session, validation
from memcluster.core.api import OPERATIONS, Consistency
from memcluster.core.config import Config
from memcluster.core.errors import (
    CollectionExists,
    CollectionNotFound,
    CursorExpired,
    InvalidArgument,
    LeaseExpired,
    MemclusterError,
    PayloadTooLarge,
    ShardUnavailable,
    Timeout,
    Unreachable,
    VersionConflict,
    WrongNode,
)
from memcluster.core.types import (
    Ack,
    CollectionConfig,
    CollectionInfo,
    CollectionStats,
    Hit,
    Memory,
    Message,
    Page,
    Replication,
    SearchResult,
    Written,
)
from memcluster.query.feeds import MergedFeed, StreamReader
from memcluster.shard.coord import CoordShard
from memcluster.shard.feed import TopicReader, decode_cursor, encode_cursor
from memcluster.shard.prepare import (
    decode_list_cursor,
    encode_list_cursor,
    payload_json,
    prepare_puts,
)
from memcluster.shard.sharding import Sharder, check_config

T = TypeVar("T")
R = TypeVar("R")

ROUTE_DEADLINE_S = 15.0
"""How long a request keeps re-routing around moves and restarts before it fails."""


_READS = frozenset({"shard.get", "shard.search", "shard.count", "shard.list", "shard.stats"})
"""Operations a chain's tail answers (writes go to its head)."""
_ANY_MULTI_REPLICA = frozenset(
    {
        "shard.put",
        "shard.delete",
        "shard.delete_where",
        "shard.get",
        "shard.search",
        "shard.count",
        "shard.list",
    }
)
"""Operations any replica of a ``multi`` shard answers, this node's first (``shard.stats``,
which gives change-feed positions, goes to the map's leader, as subscriptions do)."""
_WRITES = frozenset({"shard.put", "shard.delete", "shard.delete_where"})


def _strong_reader(
    snap: Snapshot, collection: str, assignment: ShardAssignment | None
) -> str | None:
    """Where a strong read goes when it is not the leader: a chain collection's tail."""
    config = snap.collections.get(collection)
    if assignment is None or config is None or config.replication is not Replication.CHAIN:
        return None
    members = [r for r in assignment.replicas if r in assignment.in_sync]
    return members[-1] if members else None


class ClusterStore:
    """The cluster seen from one node. Its methods block: the server calls them on its
    request threads, and they talk to other nodes through the node's event loop."""

    def __init__(
        self,
        *,
        node_id: str,
        shard_map: ShardMap,
        dataplane: DataPlane,
        peers: Peers,
        coord: Coordinator,
        loop: asyncio.AbstractEventLoop,
        config: Config,
        route_deadline_s: float = ROUTE_DEADLINE_S,
    ) -> None:
        self.node_id = node_id
        self.map = shard_map
        self.dp = dataplane
        self.peers = peers
        self.coord = coord
        self.loop = loop
        self.config = config
        self.route_deadline_s = route_deadline_s
        self._local = {kind: fn for kind, (_, fn) in dataplane.local.items()}
        self._sharders: dict[str, tuple[CollectionConfig, Sharder]] = {}

    # -- plumbing ------------------------------------------------------------------------------

    def _await(self, coro: Any, timeout_s: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def sharder(self, config: CollectionConfig) -> Sharder:
        cached = self._sharders.get(config.name)
        if cached is None or cached[0] != config:
            cached = (config, Sharder(config))
            self._sharders[config.name] = cached
        return cached[1]

    def scatter(
        self,
        collection: str,
        shards: Sequence[int],
        kind: str,
        body: Callable[[list[int]], msgspec.Struct],
        reply: type[T],
        *,
        allow_partial: bool = False,
        resend: bool = True,
        reroute: bool = True,
        any_replica: bool = False,
    ) -> tuple[list[T], list[str]]:
        """Send ``body(shards of a node)`` to each owner of ``shards``; the replies and the
        shards that could not answer (only with ``allow_partial``; else ShardUnavailable).
        ``any_replica`` (eventual reads): to any live replica, this node's first.

        A replicated shard whose leader is down waits for the failover (within the deadline)
        instead of failing.

        A part refused with WrongNode (not applied) is sent again once the map changed,
        unless ``reroute`` is False (then WrongNode is raised, for a caller that must place
        its request again). A part whose connection was lost or timed out may have been
        applied: it is sent again only if ``resend`` (reads, idempotent writes); else the
        error is raised."""
        deadline = time.monotonic() + self.route_deadline_s
        pending = sorted(set(shards))
        replies: list[T] = []
        missing: list[str] = []
        last_problem = ""
        while pending:
            snap = self.map.current
            config = snap.collections.get(collection)
            if config is not None and config.replication is Replication.MULTI:
                # Every replica takes writes and answers reads.
                any_replica = any_replica or kind in _ANY_MULTI_REPLICA
            groups: dict[str, list[int]] = {}
            waiting: list[int] = []
            for n in pending:
                owner = snap.owner(collection, n)
                assignment = snap.shards.get((collection, n))
                replicated = assignment is not None and len(assignment.replicas) > 1
                if replicated and not any_replica and kind in _READS:
                    owner = _strong_reader(snap, collection, assignment) or owner
                if any_replica and assignment is not None:
                    up = [r for r in assignment.replicas if r in snap.nodes]
                    if up and self.node_id in up:
                        owner = self.node_id
                    elif up and kind in _WRITES:
                        owner = up[0]  # a resend goes where the first try went
                    elif up:
                        owner = random.choice(up)
                if owner is None:
                    waiting.append(n)
                    last_problem = f"shard {collection}/{n:04d} has no node yet"
                elif owner not in snap.nodes and replicated:
                    waiting.append(n)
                    last_problem = (
                        f"shard {collection}/{n:04d}: its leader {owner} is down and no replica"
                        " has taken over yet"
                    )
                elif owner not in snap.nodes:
                    problem = (
                        f"shard {collection}/{n:04d} is unavailable: its node {owner} is down"
                        " (no heartbeat within the lease TTL); it returns with that node"
                    )
                    if not allow_partial:
                        raise ShardUnavailable(problem)
                    missing.append(f"{collection}/{n:04d}")
                else:
                    groups.setdefault(owner, []).append(n)
            futures: dict[str, concurrent.futures.Future[Any]] = {}
            local: list[int] | None = None
            for owner, group in groups.items():
                if owner == self.node_id:
                    local = group
                else:
                    url = snap.nodes[owner].peer_url
                    futures[owner] = asyncio.run_coroutine_threadsafe(
                        self.peers.request(url, kind, body(group), reply, self.route_deadline_s),
                        self.loop,
                    )
            retry: list[int] = list(waiting)
            failure: MemclusterError | None = None
            if local is not None:
                try:
                    got = self._local[kind](body(local))
                    assert isinstance(got, reply)
                    replies.append(got)
                except WrongNode as exc:
                    if not reroute:
                        failure = failure or exc
                    retry.extend(local)
                    last_problem = str(exc)
            for owner, future in futures.items():
                try:
                    replies.append(future.result())
                except (WrongNode, ShardUnavailable) as exc:
                    # ShardUnavailable from a node: a leader that cannot confirm its etcd
                    # lease; the map moves to a new leader soon (WrongNode: moved already).
                    if not reroute:
                        failure = failure or exc
                    retry.extend(groups[owner])
                    last_problem = str(exc)
                except (Unreachable, Timeout) as exc:
                    if not resend and not allow_partial:
                        failure = failure or exc
                    retry.extend(groups[owner])
                    last_problem = str(exc)
            if failure is not None:
                raise failure
            pending = sorted(retry)
            if pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    names = ", ".join(f"{collection}/{n:04d}" for n in pending)
                    if allow_partial:
                        missing.extend(f"{collection}/{n:04d}" for n in pending)
                        break
                    raise ShardUnavailable(
                        f"shards {names} did not answer within {self.route_deadline_s} s:"
                        f" {last_problem}"
                    )
                self._wait_change(snap, min(left, 0.2))
        return replies, sorted(missing)

    def quorum(
        self,
        collection: str,
        shards: Sequence[int],
        r: int | None,
        kind: str,
        body: Callable[[list[int]], msgspec.Struct],
        reply: type[T],
    ) -> list[T]:
        """A quorum read of a ``multi`` collection: ``body`` to ``r`` in-sync replicas of each
        shard (default: a majority), this node's first, another in place of one that fails;
        the replies (the caller merges them by version). ShardUnavailable when fewer than
        ``r`` replicas of a shard are up or answer."""
        snap = self.map.current
        plan: dict[int, tuple[int, list[str]]] = {}
        for n in sorted(set(shards)):
            assignment = snap.shards.get((collection, n))
            replicas = [] if assignment is None else list(assignment.replicas)
            # Only replicas in sync count: a new one may still be empty, and a quorum read
            # of it could miss a write acknowledged by a majority.
            synced = [] if assignment is None else [x for x in replicas if x in assignment.in_sync]
            need = len(replicas) // 2 + 1 if r is None else r
            if not 1 <= need <= max(1, len(replicas)):
                raise InvalidArgument(
                    f"r={r}: shard {collection}/{n:04d} has {len(replicas)} replicas; give"
                    f" 1 to {len(replicas)}"
                )
            up = [x for x in synced if x in snap.nodes]
            random.shuffle(up)
            up.sort(key=lambda x: x != self.node_id)
            if len(up) < need:
                others = ", ".join(x for x in replicas if x not in up)
                raise ShardUnavailable(
                    f"a quorum read of shard {collection}/{n:04d} needs {need} replicas in"
                    f" sync and {len(up)} are up ({others}: down or catching up); lower r, or"
                    " read with consistency='eventual'"
                )
            plan[n] = (need, up)

        async def ask(node: str, group: list[int]) -> T:
            if node == self.node_id:
                got = await asyncio.get_running_loop().run_in_executor(
                    None, self._local[kind], body(group)
                )
                assert isinstance(got, reply)
                return got
            url = snap.nodes[node].peer_url
            return await self.peers.request(url, kind, body(group), reply, self.route_deadline_s)

        async def gather() -> list[T]:
            """Ask ``need`` replicas of each shard; one that fails is replaced by another
            in-sync replica (a node just killed is still in the map until its lease
            ends)."""
            answered = dict.fromkeys(plan, 0)
            tried = dict.fromkeys(plan, 0)
            out: list[T] = []
            problems: list[str] = []
            while True:
                groups: dict[str, list[int]] = {}
                for n, (need, up) in plan.items():
                    lacking = need - answered[n]
                    if lacking > len(up) - tried[n]:
                        raise ShardUnavailable(
                            f"a quorum read of shard {collection}/{n:04d} got {answered[n]} of"
                            f" the {need} answers it needs: {'; '.join(problems)}; retry, or"
                            " read with consistency='eventual'"
                        )
                    for node in up[tried[n] : tried[n] + lacking]:
                        groups.setdefault(node, []).append(n)
                    tried[n] += max(0, lacking)
                if not groups:
                    return out
                jobs = [ask(node, group) for node, group in groups.items()]
                results = await asyncio.gather(*jobs, return_exceptions=True)
                for (node, group), result in zip(groups.items(), results, strict=True):
                    if isinstance(result, MemclusterError):
                        problems.append(f"{node}: {result}")
                    elif isinstance(result, BaseException):
                        raise result
                    else:
                        out.append(result)
                        for n in group:
                            answered[n] += 1

        replies: list[T] = self._await(gather())
        return replies

    def _wait_change(self, snap: Snapshot, timeout_s: float) -> None:
        before = snap.revision
        if self.map.wait_change(before, timeout_s).revision == before:
            time.sleep(0.02)

    # -- collections ---------------------------------------------------------------------------

    def create_collection_from(self, config: CollectionConfig) -> ClusterCollection:
        config = self._check(config)
        key = collection_key(self.map.cluster, config.name)
        if not self._await(self.coord.txn([Compare(key, 0)], [Put(key, encode(config))])):
            raise CollectionExists(
                f"collection {config.name!r} exists already; use db.collection()"
            )
        # Wait (briefly) until the controller placed every shard, so that the first write
        # does not have to.
        deadline = time.monotonic() + self.route_deadline_s
        snap = self.map.current
        while time.monotonic() < deadline:
            placed = [snap.owner(config.name, n) for n in range(config.shards)]
            if config.name in snap.collections and all(placed):
                break
            snap = self.map.wait_change(snap.revision, 0.2)
        return ClusterCollection(self, config)

    def _check(self, config: CollectionConfig) -> CollectionConfig:
        validation.collection_name(config.name)
        validation.int_in_range("dim", config.dim, 1, self.config.dim_max)
        validation.int_in_range("shards", config.shards, 1, self.config.shards_max)
        return check_config(config)

    def collection(self, name: str) -> ClusterCollection:
        validation.collection_name(name)
        config = self.map.current.collections.get(name)
        if config is None:
            # Created through another node a moment ago? Ask etcd before saying no.
            config = self._await(self.map.refresh()).collections.get(name)
        if config is None:
            raise CollectionNotFound(
                f"no collection named {name!r}; db.list_collections() lists them, "
                "db.create_collection() makes one"
            )
        return ClusterCollection(self, config)

    def list_collections(self) -> list[str]:
        return sorted(self.map.current.collections)

    def drop_collection(self, name: str) -> None:
        self.collection(name)  # CollectionNotFound, with its hint
        cluster = self.map.cluster
        key = collection_key(cluster, name)

        async def drop() -> bool:
            kv = await self.coord.get(key)
            if kv is None:
                return False
            # Every shard key etcd has (a split may have added some since our map was read).
            shards, _ = await self.coord.get_prefix(shards_prefix(cluster, name))
            ops: list[Op] = [Delete(key), *(Delete(s.key) for s in shards)]
            return await self.coord.txn([Compare(key, kv.mod_revision)], ops)

        if not self._await(drop()):
            raise CollectionNotFound(f"no collection named {name!r} to drop")

    # -- coordination: served by the node holding the coordination shard ---------------------

    def _coordinate(
        self,
        kind: str,
        body: msgspec.Struct,
        reply: type[T],
        local: Callable[[CoordShard], T],
        *,
        wait_s: float = 0.0,
    ) -> T:
        """Run a coordination operation where the coordination shard is: here, or forwarded
        as the same public operation to its node. Sent again after WrongNode (refused before
        any effect); after a lost connection only if the operation may be retried."""
        # A blocking acquire may wait up to wait_s in the holder's queue before a move wakes
        # it with WrongNode: that wait is not re-routing time.
        deadline = time.monotonic() + self.route_deadline_s + wait_s
        op = OPERATIONS.get(kind)
        retry_lost = op is None or op.retry  # node-to-node checks have no effect to repeat
        while True:
            snap = self.map.current
            owner = snap.owner(*COORDINATION)
            problem: MemclusterError
            if owner is None:
                problem = ShardUnavailable("the coordination shard has no node yet")
            elif owner not in snap.nodes:
                assignment = snap.shards.get(COORDINATION)
                if assignment is None or len(assignment.replicas) < 2:
                    raise ShardUnavailable(
                        "the coordination shard (leases, locks, counters, topics) is"
                        f" unavailable: its node {owner} is down; it returns with that node"
                    )
                problem = ShardUnavailable(
                    f"the coordination shard's leader {owner} is down; waiting for a failover"
                )
            else:
                try:
                    if owner == self.node_id:
                        return local(self.dp.host.coordination())
                    url = snap.nodes[owner].peer_url
                    got: T = self._await(
                        self.peers.request(url, kind, body, reply, self.route_deadline_s + wait_s)
                    )
                    return got
                except WrongNode as exc:
                    problem = exc
                except ShardUnavailable as exc:
                    if owner == self.node_id:
                        raise  # this node cannot confirm its lease: it will not see a new map
                    problem = exc  # a leader that cannot confirm its lease; a failover comes
                except Unreachable as exc:
                    if not retry_lost and exc.sent:
                        raise
                    problem = exc  # (not sent: the node is down; a failover may come)
            if time.monotonic() > deadline:
                raise ShardUnavailable(
                    f"the coordination shard did not answer within {self.route_deadline_s} s:"
                    f" {problem}"
                )
            self._wait_change(snap, 0.2)

    def check_fence(self, fence: object) -> tuple[str, int]:
        """``fence`` as (lock, token), checked to hold its lock now; StaleToken if not.

        The shards then refuse the write if a higher token of that lock wrote there first, so
        a holder that lost its lock between this check and its write cannot overwrite what
        the new holder wrote (the storage-side fencing check of a fencing token)."""
        if (
            not isinstance(fence, tuple | list)
            or len(fence) != 2
            or not isinstance(fence[0], str)
            or isinstance(fence[1], bool)
            or not isinstance(fence[1], int)
        ):
            raise InvalidArgument(
                f"fence is {fence!r}; pass (lock name, token) as acquire_lock returned it"
            )
        name, token = fence[0], int(fence[1])

        def local(c: CoordShard) -> wire.Done:
            c.check_fence(name, token)
            return wire.Done()

        self._coordinate(
            "coord.check_fence", wire.FenceCheck(lock=name, token=token), wire.Done, local
        )
        return name, token

    def lease_checker(self) -> Callable[[object], int]:
        """``lease_of`` for :func:`prepare_puts`: a memory's lease, checked alive at the
        coordination shard (once per lease per batch); LeaseExpired if it ended."""
        checked: set[int] = set()

        def lease_of(lease: object) -> int:
            if lease is None:
                return 0
            if isinstance(lease, bool) or not isinstance(lease, int) or lease < 1:
                raise InvalidArgument(f"lease is {lease!r}; pass an id that grant_lease returned")
            if lease not in checked:
                alive = self._coordinate(
                    "coord.leases_alive",
                    wire.Leases([lease]),
                    wire.Leases,
                    lambda c: wire.Leases([lease] if c.lease_alive(lease) else []),
                )
                if not alive.leases:
                    raise LeaseExpired(
                        f"lease {lease} does not exist or has expired: grant a new one with"
                        " grant_lease(ttl_s)"
                    )
                checked.add(lease)
            return lease

        return lease_of

    def grant_lease(self, ttl_s: float) -> int:
        return self._coordinate(
            "leases.grant",
            api.LeaseBody(ttl_s=ttl_s),
            api.LeaseReply,
            lambda c: api.LeaseReply(c.grant_lease(ttl_s)),
        ).lease

    def keepalive(self, lease: int) -> float:
        return self._coordinate(
            "leases.keepalive",
            api.LeaseRef(lease=lease),
            api.KeepaliveReply,
            lambda c: api.KeepaliveReply(c.keepalive(lease)),
        ).expires_at

    def revoke(self, lease: int) -> None:
        def local(c: CoordShard) -> api.Empty:
            c.revoke(lease)
            return api.Empty()

        self._coordinate("leases.revoke", api.LeaseRef(lease=lease), api.Empty, local)

    def acquire_lock(
        self, name: str, ttl_s: float = 10.0, timeout_s: float = 30.0, lease: int | None = None
    ) -> int:
        body = api.LockBody(name=name, ttl_s=ttl_s, timeout_s=timeout_s, lease=lease)
        return self._coordinate(
            "locks.acquire",
            body,
            api.TokenReply,
            lambda c: api.TokenReply(c.acquire_lock(name, ttl_s, timeout_s, lease)),
            wait_s=_wait(timeout_s),
        ).token

    def release_lock(self, name: str, token: int) -> None:
        def local(c: CoordShard) -> api.Empty:
            c.release_lock(name, token)
            return api.Empty()

        self._coordinate("locks.release", api.ReleaseBody(name=name, token=token), api.Empty, local)

    def acquire_semaphore(
        self,
        name: str,
        permits: int,
        ttl_s: float = 10.0,
        timeout_s: float = 30.0,
        lease: int | None = None,
    ) -> int:
        body = api.SemaphoreBody(
            name=name, permits=permits, ttl_s=ttl_s, timeout_s=timeout_s, lease=lease
        )
        return self._coordinate(
            "semaphores.acquire",
            body,
            api.TokenReply,
            lambda c: api.TokenReply(c.acquire_semaphore(name, permits, ttl_s, timeout_s, lease)),
            wait_s=_wait(timeout_s),
        ).token

    def release_semaphore(self, name: str, token: int) -> None:
        def local(c: CoordShard) -> api.Empty:
            c.release_semaphore(name, token)
            return api.Empty()

        body = api.ReleaseBody(name=name, token=token)
        self._coordinate("semaphores.release", body, api.Empty, local)

    def incr(self, key: str, delta: int = 1) -> int:
        return self._coordinate(
            "counters.incr",
            api.CounterBody(key=key, delta=delta),
            api.CounterReply,
            lambda c: api.CounterReply(c.incr(key, delta)),
        ).value

    def counter(self, key: str) -> int:
        return self._coordinate(
            "counters.get",
            api.CounterKey(key=key),
            api.CounterReply,
            lambda c: api.CounterReply(c.counter(key)),
        ).value

    def publish(self, topic: str, payload: Any) -> int:
        data = payload_json(payload, self.config)
        return self._coordinate(
            "topics.publish",
            api.PublishBody(topic=topic, payload=payload),
            api.PublishReply,
            lambda c: api.PublishReply(c.publish(topic, data)),
        ).seq

    def topic_reader(self, topic: str, cursor: str | None = None, group: str | None = None) -> Any:
        validation.key(topic, self.config)
        if group is not None:
            raise InvalidArgument("consumer groups are not supported yet: subscribe without group=")
        if cursor is None:  # "from now": pin now, so a reopened stream resumes from here
            cursor = encode_cursor(f"topic:{topic}", [self._coordination_seq()])

        async def open_stream(at: str | None) -> AsyncIterator[Any]:
            snap = self.map.current
            owner = snap.owner(*COORDINATION)
            if owner is None or owner not in snap.nodes:
                raise ShardUnavailable(f"the coordination shard's node {owner} is not up")
            if owner == self.node_id:
                reader = TopicReader(
                    self.dp.host.coordination(), topic, at, self.config.feed_batch_events
                )
                async for message in follow_local(reader):
                    yield message
            else:
                body = api.TopicBody(topic=topic, cursor=at)
                url = snap.nodes[owner].peer_url
                async for message in self.peers.stream(url, "topics.subscribe", body, Message):
                    yield message

        return StreamReader(
            self.loop, open_stream, cursor, lambda m: m.cursor, what=f"topic {topic!r} stream"
        )

    def _coordination_seq(self) -> int:
        """The coordination shard's applied seq (where "now" is for a new topic reader)."""
        snap = self.map.current
        owner = snap.owner(*COORDINATION)
        if owner == self.node_id:
            return self.dp.host.coordination().applied_seq
        replies, _ = self.scatter(
            COORDINATION[0],
            [0],
            "shard.stats",
            lambda group: wire.ShardScope(collection=COORDINATION[0], shards=group),
            wire.ShardStats,
        )
        return replies[0].stats[0]["last_seq"]


def _key(memory: Memory) -> tuple[tuple[str, ...], str]:
    return memory.namespace, memory.key


def _wait(timeout_s: object) -> float:
    return float(timeout_s) if isinstance(timeout_s, int | float) else 0.0


class ClusterCollection:
    """One collection of the cluster, as the server's handlers use it."""

    def __init__(self, store: ClusterStore, config: CollectionConfig) -> None:
        self._store = store
        self.config = config
        self.name = config.name
        self._sharder = store.sharder(config)

    def _all(self) -> list[int]:
        return list(range(self.config.shards))

    def _scope(
        self, namespace: Sequence[str] | None, filter: Mapping[str, Any] | None
    ) -> tuple[tuple[str, ...], dict[str, Any] | None]:
        prefix = validation.namespace(namespace, self._store.config, allow_empty=True)
        if filter is not None and not isinstance(filter, Mapping):
            raise InvalidArgument(f"filter must be a JSON object, got {type(filter).__name__}")
        return prefix, None if filter is None else dict(filter)

    # -- writes --------------------------------------------------------------------------------

    def put_many(
        self,
        memories: Sequence[Memory],
        idempotency_key: str | None = None,
        fence: tuple[str, int] | None = None,
        ack: Ack | str | None = None,
        w: int | None = None,
    ) -> list[int]:
        """``ack``: this write's acknowledgement policy on a replicated collection ("all",
        "majority", "leader"; None: the collection's). ``w``: a ``multi`` collection's write
        quorum (acknowledged once this many replicas hold it)."""
        cfg = self._store.config
        level = None if ack is None else validation.enum_value("ack", ack, Ack)
        if w is not None:
            validation.int_in_range("w", w, 1, self.config.replication_factor)
            if not self._multi():
                raise InvalidArgument(
                    f"w= is for replication='multi' collections; {self.name!r} has"
                    f" replication={self.config.replication.value!r}: use ack='all',"
                    " 'majority' or 'leader'"
                )
        if len(memories) > cfg.batch_items_max:
            raise PayloadTooLarge(
                f"batch has {len(memories)} memories; the limit is {cfg.batch_items_max}: split it"
            )
        if not memories:
            return []
        if idempotency_key is not None:
            validation.key(idempotency_key, cfg)
        prepared, matrix = prepare_puts(memories, self.config, cfg, self._store.lease_checker())
        checked = None if fence is None else self._store.check_fence(fence)
        # Every shard remembers the batch's key: a part resent after a lost connection, or
        # after the layout changed, is answered from that record instead of written twice.
        idem = idempotency_key or f"auto-{uuid.uuid4().hex}"
        if self._sharder.keyed:
            placed = [self._sharder.key_shard(p.namespace, p.key) or 0 for p in prepared]
            return self._write(list(memories), placed, idem, checked, reroute=True, ack=level, w=w)
        return self._put_moving(memories, prepared, matrix, idem, checked, level)

    def _write(
        self,
        memories: list[Memory],
        placed: Sequence[int],
        idem: str,
        fence: tuple[str, int] | None,
        *,
        reroute: bool,
        floors: dict[int, int] | None = None,
        ack: Ack | None = None,
        w: int | None = None,
    ) -> list[int]:
        """Write each memory to its placed shard, one request per node; the versions.
        ``floors``: per shard, a version the new versions there must exceed."""
        floors = floors or {}
        batches: dict[int, list[Memory]] = {}
        positions: dict[int, list[int]] = {}
        for i, (memory, shard) in enumerate(zip(memories, placed, strict=True)):
            batches.setdefault(shard, []).append(memory)
            positions.setdefault(shard, []).append(i)
        replies, _ = self._store.scatter(
            self.name,
            list(batches),
            "shard.put",
            lambda group: wire.ShardPut(
                collection=self.name,
                batches={n: batches[n] for n in group},
                idempotency_key=idem,
                fence=fence,
                version_floors={n: floors[n] for n in group if n in floors},
                ack=None if ack is None else ack.value,
                w=w,
            ),
            wire.ShardPutReply,
            reroute=reroute,
            # multi: a write that timed out waiting for copies is durable where it was taken
            # and spreads from there; written again elsewhere it would get a newer stamp.
            resend=not self._multi(),
        )
        versions = [0] * len(memories)
        seqs: dict[int, int] = {}
        for reply in replies:
            seqs.update(reply.seqs)
            for shard, got in reply.versions.items():
                for i, version in zip(positions[shard], got, strict=True):
                    versions[i] = version
        return Written(versions, session.merge(None, self.name, seqs))

    def _put_moving(
        self,
        memories: Sequence[Memory],
        prepared: Sequence[Any],
        matrix: npt.NDArray[np.float32],
        idem: str,
        fence: tuple[str, int] | None,
        ack: Ack | None = None,
    ) -> list[int]:
        """A put to a range or vector collection, where a memory's shard follows its field or
        vector. Each memory's current copies are located first: ``if_version`` is checked
        against the newest, a memory that moves is written to its new shard as absent there,
        and its old copies are then deleted only while still at the version located, so a
        concurrent write is never undone (two concurrent writes of one memory to different
        shards can leave two copies: reads take the newest, the next write of it tidies up).
        A layout change (a split) in between places the batch again."""
        keys = [(p.namespace, p.key) for p in prepared]
        deadline = time.monotonic() + self._store.route_deadline_s
        first = True
        while True:
            config = self._store.map.current.collections.get(self.name, self.config)
            sharder = self._store.sharder(config)
            found = self._locate(keys, config)
            if first:
                for i, memory in enumerate(memories):
                    if memory.if_version is None:
                        continue
                    copies = found.get(i, [])
                    current = max(copies, key=lambda c: c[2])[1] if copies else 0
                    if memory.if_version != current:
                        raise VersionConflict(
                            f"{self.name}: {keys[i][0]}/{keys[i][1]!r} is at version"
                            f" {current}, the write expected {memory.if_version} (0 = absent);"
                            " read it again and retry with its current version",
                            expected=memory.if_version,
                            actual=current,
                        )
                first = False
            placed = sharder.place(
                [p.namespace for p in prepared],
                [p.key for p in prepared],
                matrix,
                [m.metadata for m in memories],
            )
            sending = []
            floors: dict[int, int] = {}
            for i, memory in enumerate(memories):
                copies = found.get(i, [])
                if placed[i] not in {c[0] for c in copies}:
                    if memory.if_version is not None:
                        memory = msgspec.structs.replace(memory, if_version=0)  # absent there
                    if copies:  # its version keeps counting up from where it was
                        newest = max(c[1] for c in copies)
                        floors[placed[i]] = max(floors.get(placed[i], 0), newest)
                sending.append(memory)
            try:
                versions = self._write(
                    sending, placed, idem, fence, reroute=False, floors=floors, ack=ack
                )
            except WrongNode:
                if time.monotonic() > deadline:
                    raise
                self._store.map.wait_change(self._store.map.current.revision, 0.2)
                continue
            stale: dict[int, list[tuple[tuple[str, ...], str, int]]] = {}
            for i, copies in found.items():
                for shard, version, _ in copies:
                    if shard != placed[i]:
                        stale.setdefault(shard, []).append((*keys[i], version))
            if stale:
                self._delete_stale(stale)
            return versions

    def _delete_stale(self, stale: dict[int, list[tuple[tuple[str, ...], str, int]]]) -> None:
        """Delete the old copies of moved memories, each only while at the version located."""
        self._store.scatter(
            self.name,
            list(stale),
            "shard.delete_versions",
            lambda group: wire.ShardDeleteVersions(
                collection=self.name, deletes={n: stale[n] for n in group}
            ),
            wire.ShardCount,
        )

    def _locate(
        self, keys: list[tuple[tuple[str, ...], str]], config: CollectionConfig
    ) -> dict[int, list[tuple[int, int, float]]]:
        """For each key (by index): its copies, as (shard, version, updated_at)."""
        replies, _ = self._store.scatter(
            self.name,
            list(range(config.shards)),
            "shard.locate",
            lambda group: wire.ShardLocate(collection=self.name, shards=group, keys=keys),
            wire.Located,
        )
        found: dict[int, list[tuple[int, int, float]]] = {}
        for reply in replies:
            for shard, hits in reply.found.items():
                for i, version, updated in hits:
                    found.setdefault(i, []).append((shard, version, updated))
        return found

    def delete(
        self, namespace: tuple[str, ...], key: str, fence: tuple[str, int] | None = None
    ) -> bool:
        ns, k = self._key(namespace, key)
        checked = None if fence is None else self._store.check_fence(fence)
        replies, _ = self._store.scatter(
            self.name,
            self._key_shards(ns, k),
            "shard.delete",
            lambda group: wire.ShardDelete(
                collection=self.name, deletes={n: [(ns, k)] for n in group}, fence=checked
            ),
            wire.ShardCount,
            resend=False,  # a lost reply leaves it unknown whether it existed
        )
        return sum(r.count for r in replies) > 0

    def delete_where(
        self, namespace: tuple[str, ...] | None = None, filter: Mapping[str, Any] | None = None
    ) -> int:
        prefix, flt = self._scope(namespace, filter)
        return self._sum("shard.delete_where", prefix, flt, resend=False)

    # -- reads ---------------------------------------------------------------------------------

    def _key(self, namespace: Sequence[str], key: str) -> tuple[tuple[str, ...], str]:
        cfg = self._store.config
        return validation.namespace(namespace, cfg), validation.key(key, cfg)

    def _key_shards(self, ns: tuple[str, ...], key: str) -> list[int]:
        shard = self._sharder.key_shard(ns, key)
        return self._all() if shard is None else [shard]

    def get(
        self,
        namespace: tuple[str, ...],
        key: str,
        consistency: Consistency | str = Consistency.STRONG,
        token: str | None = None,
        r: int | None = None,
    ) -> Memory | None:
        return self.get_with_session(namespace, key, consistency, token, r)[0]

    def get_with_session(
        self,
        namespace: tuple[str, ...],
        key: str,
        consistency: Consistency | str = Consistency.STRONG,
        token: str | None = None,
        r: int | None = None,
    ) -> tuple[Memory | None, str | None]:
        """The memory, and for a session read the session token updated with what it saw.
        ``r``: a quorum read's replicas (``multi`` collections; None: a majority)."""
        ns, k = self._key(namespace, key)
        level = self._level(consistency, r)
        eventual = level is Consistency.EVENTUAL
        shards = self._key_shards(ns, k)
        if self._multi() and level is Consistency.QUORUM:
            quorum = self._store.quorum(
                self.name,
                shards,
                r,
                "shard.get",
                lambda group: wire.ShardGet(
                    collection=self.name, shards=group, namespace=ns, key=k, eventual=True
                ),
                wire.ShardGetReply,
            )
            # The replicas' rule: the highest stamp wins, a memory's or its tombstone's (an
            # expired memory not yet swept reads as absent but keeps its put's stamp).
            newest = max(quorum, key=lambda g: g.stamp or (0, "", 0))
            return newest.memory if newest.stamp and not newest.stamp[2] else None, None

        def read(need: dict[int, int] | None) -> list[wire.ShardGetReply]:
            replies, _ = self._store.scatter(
                self.name,
                shards,
                "shard.get",
                lambda group: wire.ShardGet(
                    collection=self.name,
                    shards=group,
                    namespace=ns,
                    key=k,
                    eventual=eventual,
                    session=need,
                ),
                wire.ShardGetReply,
                any_replica=eventual or need is not None,
                reroute=need is None,
            )
            return replies

        replies, token = self._session_read(level, token, read)
        found = [r.memory for r in replies if r.memory is not None]
        return (max(found, key=lambda m: m.updated_at) if found else None), token

    def _multi(self) -> bool:
        config = self._store.map.current.collections.get(self.name, self.config)
        return config.replication is Replication.MULTI

    def _level(self, consistency: Consistency | str, r: int | None) -> Consistency:
        """The read level asked for; InvalidArgument for one a ``multi`` collection cannot
        give (its replicas take writes independently: no replica has them all at once), or
        for ``r`` outside a ``multi`` collection's quorum read."""
        level = validation.enum_value("consistency", consistency, Consistency)
        if r is not None and not (self._multi() and level is Consistency.QUORUM):
            raise InvalidArgument(
                f"r={r} is for consistency='quorum' reads of replication='multi' collections;"
                f" this read is consistency={level.value!r} on a"
                f" replication={self.config.replication.value!r} collection"
            )
        if self._multi() and level in (Consistency.STRONG, Consistency.SESSION):
            raise InvalidArgument(
                f"collection {self.name!r} has replication='multi': it offers no"
                f" consistency={level.value!r} reads (every replica takes writes); read with"
                " consistency='quorum' (the newest of a majority of replicas: with"
                " ack='majority' writes it sees every acknowledged write) or 'eventual'"
            )
        return level

    def _session_read(
        self,
        level: Consistency,
        token: str | None,
        read: Callable[[dict[int, int] | None], list[R]],
    ) -> tuple[list[R], str | None]:
        """Run ``read`` as ``level`` asks: a session read goes to any replica that has
        applied the session's seqs (the leader if none has, soon enough), and returns the
        token raised to what it saw; other levels return no token."""
        if level is not Consistency.SESSION:
            return read(None), None
        need = session.wanted(token, self.name)
        try:
            replies = read(need)
        except WrongNode:  # a replica behind the session (or moved): the leader answers
            replies = read(None)
        seen: dict[int, int] = {}
        for reply in replies:
            seen.update(getattr(reply, "seqs", {}))
        return replies, session.merge(token, self.name, seen)

    def _sum(
        self, kind: str, prefix: tuple[str, ...], flt: dict[str, Any] | None, resend: bool = True
    ) -> int:
        replies, _ = self._store.scatter(
            self.name,
            self._sharder.search_shards(prefix, flt),
            kind,
            lambda group: wire.ShardScope(
                collection=self.name, shards=group, namespace=prefix, filter=flt
            ),
            wire.ShardCount,
            resend=resend,
        )
        return sum(r.count for r in replies)

    def count(
        self, namespace: tuple[str, ...] | None = None, filter: Mapping[str, Any] | None = None
    ) -> int:
        prefix, flt = self._scope(namespace, filter)
        return self._sum("shard.count", prefix, flt)

    def search(
        self,
        vector: Any,
        k: int = 10,
        namespace: tuple[str, ...] | None = None,
        filter: Mapping[str, Any] | None = None,
        include_vectors: bool = False,
        consistency: Consistency | str = Consistency.STRONG,
        nprobe: int | None = None,
        allow_partial: bool = False,
        token: str | None = None,
        r: int | None = None,
    ) -> SearchResult:
        """``consistency="session"`` with ``token``: see ``memcluster.core.session``; the
        result's ``session`` is the token raised to what this search saw."""
        cfg = self._store.config
        validation.int_in_range("k", k, 1, cfg.search_k_max)
        level = self._level(consistency, r)
        eventual = level is Consistency.EVENTUAL
        if nprobe is not None:
            validation.int_in_range("nprobe", nprobe, 0, cfg.shards_max)
        prefix, flt = self._scope(namespace, filter)
        query = validation.query_vector(vector, self.config.dim, self.config.metric)
        shards = self._sharder.search_shards(prefix, flt, query, nprobe)
        missing: list[str] = []

        def body(
            group: list[int], need: dict[int, int] | None = None, any_copy: bool = eventual
        ) -> wire.ShardSearch:
            return wire.ShardSearch(
                collection=self.name,
                shards=group,
                vector=query,
                k=k,
                namespace=prefix,
                filter=flt,
                include_vectors=include_vectors,
                eventual=any_copy,
                session=None if need is None else {n: need.get(n, 0) for n in group},
            )

        def read(need: dict[int, int] | None) -> list[wire.ShardHits]:
            replies, lost = self._store.scatter(
                self.name,
                shards,
                "shard.search",
                lambda group: body(group, need),
                wire.ShardHits,
                allow_partial=bool(allow_partial),
                any_replica=eventual or need is not None,
                reroute=need is None,
            )
            missing[:] = lost
            return replies

        if self._multi() and level is Consistency.QUORUM:
            replies = self._store.quorum(
                self.name,
                shards,
                r,
                "shard.search",
                lambda group: body(group, any_copy=True),
                wire.ShardHits,
            )
            token = None
        else:
            replies, token = self._session_read(level, token, read)
        hits: list[Hit] = [h for r in replies for h in r.hits]
        if self._multi():  # the replicas' copies of a memory: keep the newest
            newest: dict[tuple[tuple[str, ...], str], Hit] = {}
            for hit in hits:
                held = newest.get(_key(hit.memory))
                if held is None or hit.memory.version > held.memory.version:
                    newest[_key(hit.memory)] = hit
            hits = list(newest.values())
        hits.sort(key=lambda h: (-h.score, h.memory.namespace, h.memory.key))
        if not self._sharder.keyed:
            # While a range split or a centroid placement moves memories, one may be in two
            # shards for a moment: keep its best hit.
            seen: set[tuple[tuple[str, ...], str]] = set()
            unique = []
            for hit in hits:
                if (hit.memory.namespace, hit.memory.key) not in seen:
                    seen.add((hit.memory.namespace, hit.memory.key))
                    unique.append(hit)
            hits = unique
        return SearchResult(hits[:k], missing, token)

    def list(
        self,
        namespace: tuple[str, ...] | None = None,
        filter: Mapping[str, Any] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        validation.int_in_range("limit", limit, 1, self._store.config.list_limit_max)
        prefix, flt = self._scope(namespace, filter)
        after = None if cursor is None else decode_list_cursor(cursor)
        replies, _ = self._store.scatter(
            self.name,
            self._sharder.search_shards(prefix, flt),
            "shard.list",
            lambda group: wire.ShardList(
                collection=self.name,
                shards=group,
                namespace=prefix,
                filter=flt,
                after=after,
                limit=limit + 1,
            ),
            wire.ShardItems,
        )
        items = sorted(
            (m for r in replies for m in r.items), key=lambda m: (m.namespace, m.key, -m.updated_at)
        )
        if not self._sharder.keyed:  # a memory mid-move may have two copies: list the newest
            items = [m for i, m in enumerate(items) if i == 0 or _key(items[i - 1]) != _key(m)]
        more = len(items) > limit
        items = items[:limit]
        next_cursor = encode_list_cursor((items[-1].namespace, items[-1].key)) if more else None
        return Page(items=items, next_cursor=next_cursor)

    def describe(self) -> CollectionInfo:
        """Config and size; shards whose node is down count as empty (see the shard map)."""
        replies, _ = self._store.scatter(
            self.name,
            self._all(),
            "shard.stats",
            lambda group: wire.ShardScope(collection=self.name, shards=group),
            wire.ShardStats,
            allow_partial=True,  # describe what is up; the shard map says what is down
        )
        stats: dict[int, dict[str, int]] = {}
        for r in replies:
            stats.update(r.stats)
        nothing = {"items": 0, "bytes": 0, "indexed_items": 0, "last_seq": 0}
        per = [stats.get(n, nothing) for n in self._all()]
        return CollectionInfo(
            config=self.config,
            stats=CollectionStats(
                items=sum(s["items"] for s in per),
                bytes=sum(s["bytes"] for s in per),
                indexed_items=sum(s["indexed_items"] for s in per),
                last_seq=[s["last_seq"] for s in per],
            ),
        )

    # -- change feed ---------------------------------------------------------------------------

    def feed_cursor(self) -> str:
        """The change feed's current end (every shard's applied seq)."""
        replies, _ = self._store.scatter(
            self.name,
            self._all(),
            "shard.stats",
            lambda group: wire.ShardScope(collection=self.name, shards=group),
            wire.ShardStats,
        )
        seqs = {n: st["last_seq"] for r in replies for n, st in r.stats.items()}
        return encode_cursor(self.name, [seqs[n] for n in self._all()])

    def feed_reader(
        self,
        namespace: tuple[str, ...] | None = None,
        filter: Mapping[str, Any] | None = None,
        cursor: str | None = None,
        include_vectors: bool = False,
    ) -> MergedFeed:
        """The change feed, read from every shard's node and merged (see
        :mod:`memcluster.query.feeds`); resumable from any event's cursor across moves, and
        following the shards a range split appends."""
        prefix, flt = self._scope(namespace, filter)
        store, name = self._store, self.name

        def shard_count() -> int:
            config = store.map.current.collections.get(name)
            return self.config.shards if config is None else max(config.shards, self.config.shards)

        cursor = cursor if cursor is not None else self.feed_cursor()
        positions = decode_cursor(cursor, name, shard_count())

        def open_shard(n: int, position: int) -> StreamReader:
            served_by: list[str] = []

            def shard_cursor(seq: int) -> str:
                # Shard n's stream reads only its own position; naming no later shard keeps
                # the cursor valid at a node that has not seen a split yet.
                return encode_cursor(name, [0] * n + [seq])

            async def open_stream(at: str | None) -> AsyncIterator[wire.ShardFeedItem]:
                body = wire.ShardSubscribe(
                    collection=name,
                    shard=n,
                    cursor=at if at is not None else shard_cursor(position),
                    namespace=prefix,
                    filter=flt,
                    include_vectors=include_vectors,
                )
                snap = store.map.current
                owner = snap.owner(name, n)
                if owner is None or owner not in snap.nodes:
                    raise ShardUnavailable(f"shard {name}/{n:04d}: its node {owner} is not up")
                config = snap.collections.get(name)
                multi = config is not None and config.replication is Replication.MULTI
                if multi and served_by and served_by[-1] != owner:
                    raise CursorExpired(
                        f"change feed of shard {name}/{n:04d}: the replica serving it moved"
                        f" from {served_by[-1]} to {owner}, and a replication='multi'"
                        " collection's feed positions are one replica's own: subscribe again"
                        " from a new cursor (changes in between may be missed)"
                    )
                served_by.append(owner)
                if owner == store.node_id:
                    stream = store.dp.subscribe(body)
                else:
                    url = snap.nodes[owner].peer_url
                    stream = store.peers.stream(url, "shard.subscribe", body, wire.ShardFeedItem)
                async for item in stream:
                    yield item

            return StreamReader(
                store.loop,
                open_stream,
                shard_cursor(position),
                lambda item: shard_cursor(item.position),
                what=f"change feed of shard {name}/{n:04d}",
            )

        return MergedFeed(name, positions, open_shard, shard_count)


__all__ = ["ClusterCollection", "ClusterStore", "MemclusterError"]
