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
in-sync set. A move (drain, balance) asks the target to pull the shard from the source
(:meth:`memcluster.cluster.dataplane.DataPlane.pull`: snapshot, WAL tail, freeze, last
records), then switches the owner with a txn that raises the epoch, conditioned on the
revision read; if the pull or the txn fails, the source is unfrozen and the target drops its
copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec

from memcluster.cluster import wire
from memcluster.cluster.coordinator import Compare, Coordinator, Put, campaign
from memcluster.cluster.dataplane import Peers
from memcluster.cluster.keys import (
    COORDINATION,
    NodeInfo,
    ShardAssignment,
    assignment_key,
    collections_prefix,
    controller_key,
    coordination_key,
    decode,
    draining_prefix,
    encode,
    parse_collection_key,
    parse_shard_key,
    shards_prefix,
)
from memcluster.cluster.membership import live_nodes
from memcluster.cluster.placement import Assign, Move, ShardId, plan
from memcluster.cluster.resharding import reshard
from memcluster.cluster.shardmap import ShardMap, Snapshot
from memcluster.core.errors import MemclusterError, is_retryable
from memcluster.core.types import CollectionConfig, Replication
from memcluster.replication.leader import Ack, Status, StatusRequest, failover, repair_chain
from memcluster.replication.leader import Config as ReplicaConfig

log = logging.getLogger("memcluster.controller")

RESHARD_EVERY = 3
"""Rounds between checks for range shards to split and centroids to learn."""

REREPLICATE_AFTER_S = 60.0
"""How long a replica's node may stay down before the controller rebuilds it elsewhere."""

MOVE_TIMEOUT_S = 600.0
"""Longest a shard copy may take before the controller gives the move up."""


async def reconcile(
    coord: Coordinator,
    cluster: str,
    peers: Peers | None = None,
    moving: dict[ShardId, asyncio.Task[bool]] | None = None,
    *,
    coordination_replicas: int = 1,
    down_since: dict[str, float] | None = None,
    rereplicate_after_s: float = REREPLICATE_AFTER_S,
) -> list[Assign | Move]:
    """One round: place every unplaced shard on a live node and, with ``peers`` (to reach the
    nodes), carry out the moves that draining and balance ask for. Returns the actions
    planned. Safe to run from several nodes at once: the txns make all but one write fail.

    With ``moving``, moves run as tasks kept there, and the round does not wait for them
    (a copy may take minutes; new collections still get placed meanwhile); a shard whose move
    is in flight is not moved again. The coordination shard is placed with
    ``coordination_replicas`` replicas.

    Replicated shards are also repaired (:func:`_repair`): a replica whose node has been down
    for ``rereplicate_after_s`` (by ``down_since``, which the caller keeps across rounds) is
    replaced, and a shard with fewer replicas than its factor gets new ones on live nodes."""
    live = {n.id: n for n in await live_nodes(coord, cluster)}
    configs, _ = await coord.get_prefix(collections_prefix(cluster))
    entries, _ = await coord.get_prefix(shards_prefix(cluster))
    drains, _ = await coord.get_prefix(draining_prefix(cluster))
    draining = {kv.key[len(draining_prefix(cluster)) :].decode() for kv in drains}
    owners: dict[ShardId, str | None] = {}
    revisions: dict[ShardId, int] = {}
    assignments: dict[ShardId, ShardAssignment] = {}
    collections: dict[str, CollectionConfig] = {}
    for kv in configs:
        name = parse_collection_key(cluster, kv.key)
        config = decode(kv.value, CollectionConfig, kv.key)
        collections[name] = config
        for shard in range(config.shards):
            owners[(name, shard)] = None
            revisions[(name, shard)] = 0
    coordination = await coord.get(coordination_key(cluster))
    owners[COORDINATION] = None
    revisions[COORDINATION] = 0
    found = [(parse_shard_key(cluster, kv.key), kv) for kv in entries]
    if coordination is not None:
        found.append((COORDINATION, coordination))
    for shard_id, kv in found:
        if shard_id in owners:
            assignment = decode(kv.value, ShardAssignment, kv.key)
            assignments[shard_id] = assignment
            owners[shard_id] = assignment.leader or (assignment.replicas or (None,))[0]
            revisions[shard_id] = kv.mod_revision
    step = plan(owners, set(live), draining if peers is not None else frozenset())
    held: dict[str, int] = dict.fromkeys(live, 0)
    for assignment in assignments.values():
        for node in assignment.replicas:
            if node in held:
                held[node] += 1
    moves: list[Move] = []
    for action in step.actions:
        if isinstance(action, Assign):
            key = assignment_key(cluster, action.shard)
            placed = collections.get(action.shard[0])
            factor = coordination_replicas if placed is None else placed.replication_factor
            others = sorted(
                (n for n in live if n != action.node and n not in draining),
                key=lambda n: (held[n], n),
            )[: factor - 1]
            replicas = (action.node, *others)
            for node in replicas:
                held[node] += 1
            if len(replicas) < factor:
                log.warning(
                    "%s/%d: %d replicas wanted, %d live nodes to hold them",
                    *action.shard,
                    factor,
                    len(replicas),
                )
            entry = ShardAssignment(
                epoch=1, replicas=replicas, leader=action.node, in_sync=replicas
            )
            written = await coord.txn(
                [Compare(key, revisions[action.shard])], [Put(key, encode(entry))]
            )
            if not written:
                log.info(
                    "%s/%d changed while planning; the next round reads it again", *action.shard
                )
        elif peers is None:
            log.info(
                "would move %s/%d from %s to %s (%s)",
                *action.shard,
                action.source,
                action.target,
                action.reason,
            )
        elif len(assignments[action.shard].replicas) > 1:
            pass  # replicated: its replicas are replaced one by one instead (_repair)
        else:
            moves.append(action)
    if peers is not None:
        lost = [
            (shard_id, a)
            for shard_id, a in assignments.items()
            if len(a.replicas) > 1
            and (
                a.leader is None
                or a.leader not in live
                or (_is_chain(collections, shard_id) and any(n not in live for n in a.replicas))
            )
        ]
        await asyncio.gather(
            *(
                _failover(
                    coord, cluster, peers, shard_id, a, revisions[shard_id], live, collections
                )
                for shard_id, a in lost
            )
        )
        now = time.monotonic()
        if down_since is None:
            down_since = {}
        for node in {n for a in assignments.values() for n in a.replicas}:
            if node in live:
                down_since.pop(node, None)
            else:
                down_since.setdefault(node, now)
        gone = {n for n, since in down_since.items() if now - since >= rereplicate_after_s}
        for shard_id, a in assignments.items():
            of = collections.get(shard_id[0])
            factor = coordination_replicas if of is None else of.replication_factor
            if (factor > 1 or len(a.replicas) > 1) and a.leader in draining:
                # Hand the lead to another replica first; the next rounds replace this one.
                await _failover(
                    coord,
                    cluster,
                    peers,
                    shard_id,
                    a,
                    revisions[shard_id],
                    live,
                    collections,
                    exclude=frozenset([a.leader]),
                )
            elif (factor > 1 or len(a.replicas) > 1) and a.leader in live:
                await _repair(
                    coord,
                    cluster,
                    shard_id,
                    a,
                    revisions[shard_id],
                    factor,
                    live,
                    draining,
                    gone,
                    held,
                )
        await _balance(
            coord,
            cluster,
            assignments,
            revisions,
            collections,
            coordination_replicas,
            live,
            draining,
            held,
        )
    if moves and peers is not None:
        jobs = {
            m.shard: _move(
                coord,
                cluster,
                peers,
                m,
                collections.get(m.shard[0]),  # None: the coordination shard
                live,
                assignments[m.shard],
                revisions[m.shard],
            )
            for m in moves
            if moving is None or m.shard not in moving
        }
        if moving is None:
            await asyncio.gather(*jobs.values())
        else:
            for shard_id, job in jobs.items():
                moving[shard_id] = asyncio.create_task(job, name=f"move {shard_id}")
    # A replicated shard on a down node fails over (or, multi, needs nothing): not news.
    single = [
        s for s in step.unavailable if s not in assignments or len(assignments[s].replicas) < 2
    ]
    if single:
        log.warning("shards on down nodes, unavailable: %s", single)
    return list(step.actions)


async def _repair(
    coord: Coordinator,
    cluster: str,
    shard_id: ShardId,
    current: ShardAssignment,
    revision: int,
    factor: int,
    live: dict[str, NodeInfo],
    draining: set[str],
    gone: set[str],
    held: dict[str, int],
) -> None:
    """Re-replication: drop the replicas on nodes ``gone`` (down past the grace period) and
    add replicas on the least loaded live nodes until the shard has ``factor`` replicas off
    draining nodes. A new replica starts empty and outside the in-sync set; the leader
    streams it the log (or has it copy the shard, when the log no longer reaches back) and
    takes it in once it has everything. A replica on a draining node (never the leader: it
    hands the lead over first) is dropped once the others in sync are enough: ``factor``,
    or all there are when no node is free to take its place. One txn, conditioned on the
    revision read; the epoch stays (the leader does not change)."""
    staying = [n for n in current.replicas if n not in gone and n not in draining]
    leaving = [n for n in current.replicas if n in draining and n not in gone]
    candidates = sorted(
        (n for n in live if n not in current.replicas and n not in draining),
        key=lambda n: (held[n], n),
    )
    added = candidates[: max(0, factor - len(staying))]
    ready = [n for n in staying if n in current.in_sync]
    if added or len(ready) < min(factor, len(staying)) or not ready:
        leaving_dropped: list[str] = []  # keep it until its replacement is in sync
    else:
        leaving_dropped = leaving
    surplus: list[str] = []
    if len(staying) > factor and len(ready) == len(staying) and not leaving:
        # A balancing move's new replica is in sync: drop the busiest follower.
        followers = [n for n in staying if n != current.leader]
        surplus = sorted(followers, key=lambda n: (held.get(n, 0), n), reverse=True)
        surplus = surplus[: len(staying) - factor]
    dropped = [n for n in current.replicas if n in gone] + leaving_dropped + surplus
    if not dropped and not added:
        return
    replicas = [n for n in current.replicas if n not in dropped]
    entry = ShardAssignment(
        epoch=current.epoch,
        replicas=(*replicas, *added),
        leader=current.leader,
        in_sync=tuple(n for n in current.in_sync if n in replicas),
    )
    key = assignment_key(cluster, shard_id)
    if await coord.txn([Compare(key, revision)], [Put(key, encode(entry))]):
        for node in added:
            held[node] += 1
        log.warning(
            "%s/%04d: replicas now %s (dropped, down too long or drained: %s; added: %s)",
            *shard_id,
            ", ".join(entry.replicas),
            ", ".join(dropped) or "none",
            ", ".join(added) or "none",
        )


async def _balance(
    coord: Coordinator,
    cluster: str,
    assignments: dict[ShardId, ShardAssignment],
    revisions: dict[ShardId, int],
    collections: dict[str, CollectionConfig],
    coordination_replicas: int,
    live: dict[str, NodeInfo],
    draining: set[str],
    held: dict[str, int],
) -> None:
    """Rebalancing replicated shards (a node joined): when a follower's node holds at least
    two replicas more than a node outside the shard, add a replica there (one per round).
    :func:`_repair` drops the busiest follower once the new replica is in sync, so the shard
    never has fewer copies in sync than its factor."""
    eligible = [n for n in live if n not in draining]
    for shard_id, a in sorted(assignments.items()):
        config = collections.get(shard_id[0])
        factor = coordination_replicas if config is None else config.replication_factor
        if (
            factor < 2
            or len(a.replicas) != factor
            or a.leader not in live
            or set(a.in_sync) != set(a.replicas)
        ):
            continue
        outside = [n for n in eligible if n not in a.replicas]
        followers = [n for n in a.replicas if n != a.leader and n in held]
        if not outside or not followers:
            continue
        target = min(outside, key=lambda n: (held[n], n))
        source = max(followers, key=lambda n: (held[n], n))
        if held[source] < held[target] + 2:
            continue
        entry = msgspec.structs.replace(a, replicas=(*a.replicas, target))
        key = assignment_key(cluster, shard_id)
        if await coord.txn([Compare(key, revisions[shard_id])], [Put(key, encode(entry))]):
            held[target] += 1
            log.info(
                "%s/%04d: balancing: a replica on %s, to replace the one on %s",
                *shard_id,
                target,
                source,
            )
        return


async def _move_multi_leader(
    coord: Coordinator,
    cluster: str,
    shard_id: ShardId,
    current: ShardAssignment,
    revision: int,
    live: dict[str, NodeInfo],
    exclude: frozenset[str],
) -> None:
    """A ``multi`` shard's map leader is gone or draining. Every replica takes writes, so
    nothing waits for it; the leader only admits new replicas and serves the change feed:
    give the role to the first live in-sync replica (any would do), with the next epoch."""
    candidates = [n for n in current.in_sync if n in live and n not in exclude]
    candidates += [n for n in current.replicas if n in live and n not in exclude]
    if not candidates:
        return
    entry = msgspec.structs.replace(current, epoch=current.epoch + 1, leader=candidates[0])
    key = assignment_key(cluster, shard_id)
    if await coord.txn([Compare(key, revision)], [Put(key, encode(entry))]):
        log.info("%s/%04d (multi): %s is the map's leader now", *shard_id, candidates[0])


def _is_chain(collections: dict[str, CollectionConfig], shard_id: ShardId) -> bool:
    config = collections.get(shard_id[0])
    return config is not None and config.replication is Replication.CHAIN


async def _failover(
    coord: Coordinator,
    cluster: str,
    peers: Peers,
    shard_id: ShardId,
    current: ShardAssignment,
    revision: int,
    live: dict[str, NodeInfo],
    collections: dict[str, CollectionConfig],
    exclude: frozenset[str] = frozenset(),
) -> None:
    """The leader of a replicated shard is gone (its node's lease expired, so it can no
    longer act as leader): ask the live replicas to adopt the next epoch and say how far they
    are, and promote the in-sync one with the highest entry, by a txn conditioned on the
    revision read (:func:`memcluster.replication.leader.failover`).

    With ``exclude`` (a draining leader, alive), those nodes are not asked: the others adopt
    the new epoch and so stop acknowledging the old leader, and one of them leads; if none
    can safely, nothing is written."""
    config = collections.get(shard_id[0])
    if config is None and shard_id != COORDINATION:
        return  # its collection is being dropped
    epoch = current.epoch + 1
    if config is not None and config.replication is Replication.MULTI:
        await _move_multi_leader(coord, cluster, shard_id, current, revision, live, exclude)
        return
    statuses: list[Status] = []

    async def ask(node: str) -> None:
        info = live.get(node)
        if info is None:
            return
        body = wire.ReplStatus(
            collection=shard_id[0], shard=shard_id[1], request=StatusRequest(epoch=epoch)
        )
        try:
            got = await peers.request(info.peer_url, "repl.status", body, Status, timeout_s=2.0)
        except MemclusterError as exc:
            log.info("failover of %s/%04d: no status from %s: %s", *shard_id, node, exc)
            return
        assert isinstance(got, Status)
        statuses.append(got)

    await asyncio.gather(*(ask(n) for n in current.replicas if n not in exclude))
    before = ReplicaConfig(
        version=revision,
        epoch=current.epoch,
        leader=current.leader,
        replicas=current.replicas,
        in_sync=current.in_sync,
    )
    if _is_chain(collections, shard_id):
        # A chain cuts out every member whose node is down (or that is drained), at once.
        dead = {n for n in current.replicas if n not in live} | set(exclude)
        chosen = repair_chain(before, statuses, dead)
    else:
        chosen = failover(before, statuses, Ack.ALL if config is None else Ack(config.ack.value))
    if exclude and chosen.leader is None:
        log.info("%s/%04d: no other replica can lead yet; the leader stays", *shard_id)
        return
    entry = ShardAssignment(
        epoch=chosen.epoch, replicas=chosen.replicas, leader=chosen.leader, in_sync=chosen.in_sync
    )
    key = assignment_key(cluster, shard_id)
    if not await coord.txn([Compare(key, revision)], [Put(key, encode(entry))]):
        log.info("failover of %s/%04d: the map changed meanwhile; next round", *shard_id)
    elif chosen.leader is None:
        log.warning(
            "failover of %s/%04d: no in-sync replica answered (%s); waiting for one",
            *shard_id,
            ", ".join(s.node for s in statuses) or "none",
        )
    else:
        log.warning(
            "failover of %s/%04d: %s leads epoch %d (was %s)",
            *shard_id,
            chosen.leader,
            chosen.epoch,
            current.leader,
        )


async def _move(
    coord: Coordinator,
    cluster: str,
    peers: Peers,
    move: Move,
    config: CollectionConfig | None,
    live: dict[str, NodeInfo],
    current: ShardAssignment,
    revision: int,
) -> bool:
    """Copy the shard to the target (it pulls from the source), then switch the owner in etcd
    by a txn conditioned on the revision read; undo the freeze if anything fails."""
    collection, number = move.shard
    source, target = live[move.source].peer_url, live[move.target].peer_url
    ref = wire.ShardRef(collection=collection, shard=number)
    started = time.monotonic()
    log.info(
        "moving %s/%04d from %s to %s (%s)",
        collection,
        number,
        move.source,
        move.target,
        move.reason,
    )
    key = assignment_key(cluster, move.shard)
    try:
        await peers.request(
            target,
            "shard.pull",
            wire.Pull(config=config, shard=number, source=source),
            wire.Done,
            timeout_s=MOVE_TIMEOUT_S,
        )
        switched = ShardAssignment(
            epoch=current.epoch + 1,
            replicas=(move.target,),
            leader=move.target,
            in_sync=(move.target,),
        )
        try:
            done = await coord.txn([Compare(key, revision)], [Put(key, encode(switched))])
        except MemclusterError:
            # The txn may have committed before the error: read what etcd has before undoing
            # (undoing a switch that happened would drop the only copy).
            kv = await coord.get(key)
            done = kv is not None and kv.value == encode(switched)
        if done:
            log.info(
                "moved %s/%04d to %s in %.2f s",
                collection,
                number,
                move.target,
                time.monotonic() - started,
            )
            return True
        log.warning("moving %s/%04d: the shard map changed meanwhile; undoing", collection, number)
    except MemclusterError as exc:
        log.warning(
            "moving %s/%04d from %s to %s failed: %s",
            collection,
            number,
            move.source,
            move.target,
            exc,
        )
    for url, kind in ((source, "shard.unfreeze"), (target, "shard.abort")):
        try:
            await peers.request(url, kind, ref, wire.Done, timeout_s=10.0)
        except MemclusterError as exc:
            log.warning("moving %s/%04d: %s on %s failed: %s", collection, number, kind, url, exc)
    return False


class Controller:
    """Campaigns for the controller key on ``lease`` and reconciles while it holds it."""

    def __init__(
        self,
        coord: Coordinator,
        cluster: str,
        node_id: str,
        *,
        interval_s: float = 1.0,
        peers: Peers | None = None,
        coordination_replicas: int = 1,
        rereplicate_after_s: float = REREPLICATE_AFTER_S,
    ) -> None:
        self.coord = coord
        self.peers = peers
        self.cluster = cluster
        self.node_id = node_id
        self.interval_s = interval_s
        self.coordination_replicas = coordination_replicas
        self.rereplicate_after_s = rereplicate_after_s
        self._down_since: dict[str, float] = {}
        """Since when (monotonic) each replica's node has been seen down."""
        self.leading = False
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        """Set to reconcile now rather than at the next interval (stop, or a node left)."""
        self._nodes: frozenset[str] | None = None
        self._moving: dict[ShardId, asyncio.Task[bool]] = {}
        """Moves in flight (they outlive a round; a move's own txn guards its switch)."""

    async def run(self, lease: Callable[[], int | None]) -> None:
        """Until :meth:`stop`: campaign on the lease ``lease()`` names (the node's membership
        lease, which changes if the node registers again), and reconcile while leading."""
        key = controller_key(self.cluster)
        rounds = 0
        while not self._stop.is_set():
            current = lease()
            rounds += 1
            try:
                self.leading = current is not None and await campaign(
                    self.coord, key, self.node_id, current
                )
                if self.leading:
                    for shard in [s for s, t in self._moving.items() if t.done()]:
                        self._moving.pop(shard)
                    await reconcile(
                        self.coord,
                        self.cluster,
                        self.peers,
                        self._moving,
                        coordination_replicas=self.coordination_replicas,
                        down_since=self._down_since,
                        rereplicate_after_s=self.rereplicate_after_s,
                    )
                    if self.peers is not None and rounds % RESHARD_EVERY == 0:
                        await reshard(self.coord, self.cluster, self.peers)
            except MemclusterError as exc:
                self.leading = False
                if not is_retryable(exc):
                    log.error("controller on %s: %s", self.node_id, exc)
                else:
                    log.warning("controller on %s: %s; retrying", self.node_id, exc)
            except Exception:  # a bug: log it, keep the node up, try again next round
                self.leading = False
                log.exception("controller on %s: unexpected error; retrying", self.node_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def watch(self, shard_map: ShardMap) -> None:
        """Reconcile at once when the set of live nodes changes (a failover then starts as
        soon as etcd expires the leader's lease, not up to ``interval_s`` later). Call it
        on the event loop the controller runs on."""

        def changed(snap: Snapshot) -> None:
            nodes = frozenset(snap.nodes)
            if self._nodes is not None and nodes != self._nodes:
                self._wake.set()
            self._nodes = nodes

        shard_map.listen(changed)
