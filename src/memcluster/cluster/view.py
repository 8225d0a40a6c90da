"""A read-only view of a cluster, from etcd: nodes, controller, collections and shard map, and
(when asked to) how far each shard replica is from its leader, from the nodes themselves.

What etcd says and what the nodes say
-------------------------------------
etcd holds each shard's :class:`~memcluster.cluster.keys.ShardAssignment`: its epoch, its
replicas, its leader and its in-sync set. That is enough for a replica's role and state. Its
lag (in operations) is known only to the nodes: :func:`cluster_view` given ``peers`` asks every
live node for ``repl.info`` (:class:`~memcluster.cluster.wire.ReplicaInfos`), all of them at
once, each bounded by ``ask_timeout_s``. A node that does not answer in time (or fails) only
makes lags unknown (None): its followers', and those of the shards it leads. It is listed in
:attr:`ClusterView.silent`.

A replica's state (:func:`replica_rows`, a pure function of the assignment, the live nodes and
the nodes' answers)::

    node not live (its lease expired) ......................................... down
    live, not in the in-sync set, or its copy is being made (incoming, ready) . catching-up
    live, in the in-sync set .................................................. in-sync

Its lag is the leader's last seq minus its own last seq, each as its node reported it. The two
nodes answer at slightly different moments, so a follower can report a seq the leader had not
yet reported: the lag is clamped at 0. The leader's own lag is 0 while its node is live (it is
the reference). A follower's lag is None when it is down, when the shard has no leader, or
when its node or the leader's did not report the shard (it did not answer, or was not asked).

Every read from etcd is linearizable, but the set of reads is not one snapshot, and the nodes
are asked after etcd was read: an assignment that changed in between shows roles from etcd and
lags from the nodes' newer state.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping, Sequence
from typing import assert_never

import msgspec

from memcluster.cluster import wire
from memcluster.cluster.coordinator import Coordinator, leader
from memcluster.cluster.dataplane import Peers
from memcluster.cluster.host import State
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
from memcluster.core.errors import MemclusterError
from memcluster.core.types import CollectionConfig, Replication

log = logging.getLogger("memcluster.cluster")

ASK_TIMEOUT_S = 2.0
"""How long :func:`cluster_view` waits for a node's ``repl.info`` answer (connecting included)."""


class Role(enum.StrEnum):
    LEADER = "leader"
    FOLLOWER = "follower"
    HEAD = "head"
    """``replication="chain"``: the first in-sync member, which takes the writes."""
    TAIL = "tail"
    """``replication="chain"``: the last in-sync member, which acknowledges writes and
    serves strong reads (the members between are followers)."""
    PEER = "peer"
    """``replication="multi"``: every replica takes writes."""


class ReplicaState(enum.StrEnum):
    """See the module docstring for when each applies."""

    IN_SYNC = "in-sync"
    CATCHING_UP = "catching-up"
    DOWN = "down"


class ReplicaView(msgspec.Struct, frozen=True):
    """One replica of a shard, as ``memcluster status`` shows it."""

    node: str
    address: str | None
    """Its node's binary-protocol address (``mc://HOST:PORT``); None while the node is down."""
    role: Role
    state: ReplicaState
    lag: int | None
    """Operations behind the leader; None when unknown (see the module docstring)."""


class ShardView(msgspec.Struct, frozen=True):
    collection: str
    shard: int
    assignment: ShardAssignment | None
    """None while the controller has not placed it."""
    available: bool
    """Its leader's node is up."""
    epoch: int | None = None
    """The assignment's epoch; None while unplaced."""
    replicas: list[ReplicaView] = []
    """Each replica of the assignment, in its order (empty while unplaced)."""


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
    silent: list[str] = []
    """Live nodes that were asked for their replicas' state and did not answer in time (or
    failed): their replicas' lags are unknown. Empty when the nodes were not asked."""

    def shards_held(self, node: str) -> int:
        return sum(1 for s in self.shards if s.assignment and node in s.assignment.replicas)


def _being_copied(host_state: str) -> bool:
    """Is a replica whose host reports ``host_state`` still being copied? A state this
    version does not know (a newer node's) counts as not."""
    try:
        state = State(host_state)
    except ValueError:
        return False
    match state:
        case State.INCOMING | State.READY:
            return True
        case State.ACTIVE | State.FROZEN | State.FOLLOWER:
            return False
        case _:
            assert_never(state)


def _role(assignment: ShardAssignment, node_id: str, replication: Replication) -> Role:
    if replication is Replication.MULTI:
        return Role.PEER
    if replication is Replication.CHAIN:
        members = [n for n in assignment.replicas if n in assignment.in_sync]
        if members and node_id == members[0]:
            return Role.HEAD
        if members and node_id == members[-1]:
            return Role.TAIL
    return Role.LEADER if node_id == assignment.leader else Role.FOLLOWER


def _multi_lags(
    assignment: ShardAssignment, reported: Mapping[str, wire.ReplicaInfo]
) -> dict[str, int]:
    """``multi`` replicas: how many writes each lacks of those the others hold (each
    reports its version vector in ``acked``)."""
    vvs = {n: reported[n].acked for n in assignment.replicas if n in reported}
    newest: dict[str, int] = {}
    for vv in vvs.values():
        for origin, oseq in vv.items():
            newest[origin] = max(newest.get(origin, 0), oseq)
    return {
        n: sum(oseq - vv.get(origin, 0) for origin, oseq in newest.items()) for n, vv in vvs.items()
    }


def replica_rows(
    assignment: ShardAssignment,
    nodes: Mapping[str, NodeInfo],
    reported: Mapping[str, wire.ReplicaInfo],
    replication: Replication = Replication.LEADER,
) -> list[ReplicaView]:
    """The replicas of one shard, in the assignment's order.

    ``nodes``: the live nodes by id. ``reported``: node id -> what that node reported about
    this shard (nodes that did not answer, or did not report the shard, are absent).
    """
    leader_id = assignment.leader
    lead = reported.get(leader_id) if leader_id is not None and leader_id in nodes else None
    multi_lags = _multi_lags(assignment, reported) if replication is Replication.MULTI else {}
    rows = []
    for node_id in assignment.replicas:
        node = nodes.get(node_id)
        mine = reported.get(node_id)
        role = _role(assignment, node_id, replication)
        lag: int | None
        if node is None:
            state, lag = ReplicaState.DOWN, None
        else:
            copying = mine is not None and _being_copied(mine.state)
            synced = node_id in assignment.in_sync and not copying
            state = ReplicaState.IN_SYNC if synced else ReplicaState.CATCHING_UP
            if replication is Replication.MULTI:
                lag = multi_lags.get(node_id)
            elif node_id == leader_id:
                lag = 0
            elif lead is None or mine is None:
                lag = None
            else:
                lag = max(0, lead.last - mine.last)
        address = node.peer_url if node is not None else None
        rows.append(ReplicaView(node_id, address, role, state, lag))
    return rows


async def ask_replicas(
    nodes: Sequence[NodeInfo], peers: Peers, timeout_s: float = ASK_TIMEOUT_S
) -> dict[str, list[wire.ReplicaInfo]]:
    """Ask every node in ``nodes`` for ``repl.info`` at once; node id -> its answer. A node
    that fails, or does not answer within ``timeout_s`` (connecting included), is absent."""

    async def ask(node: NodeInfo) -> list[wire.ReplicaInfo] | None:
        try:
            async with asyncio.timeout(timeout_s):
                got = await peers.request(
                    node.peer_url, "repl.info", wire.Empty(), wire.ReplicaInfos, timeout_s=timeout_s
                )
        except (MemclusterError, TimeoutError) as exc:
            log.info("status: no repl.info from %s at %s: %r", node.id, node.peer_url, exc)
            return None
        return got.replicas

    async with asyncio.TaskGroup() as tasks:
        asked = {node.id: tasks.create_task(ask(node)) for node in nodes}
    return {node: answer for node, task in asked.items() if (answer := task.result()) is not None}


async def cluster_view(
    coord: Coordinator,
    cluster: str,
    *,
    peers: Peers | None = None,
    ask_timeout_s: float = ASK_TIMEOUT_S,
) -> ClusterView:
    """Read everything once (each read is linearizable; the set is not one snapshot). With
    ``peers``, also ask every live node for its replicas' state (:func:`ask_replicas`), which
    fills in the lags; without, every lag but a live leader's is None."""
    nodes = await live_nodes(coord, cluster)
    up = {n.id: n for n in nodes}
    configs_kv, _ = await coord.get_prefix(collections_prefix(cluster))
    entries, revision = await coord.get_prefix(shards_prefix(cluster))
    configs = [decode(kv.value, CollectionConfig, kv.key) for kv in configs_kv]
    for kv, config in zip(configs_kv, configs, strict=True):
        assert parse_collection_key(cluster, kv.key) == config.name
    placed = {
        parse_shard_key(cluster, kv.key): decode(kv.value, ShardAssignment, kv.key)
        for kv in entries
    }
    found: list[tuple[str, int, ShardAssignment | None]] = []
    coordination = await coord.get(coordination_key(cluster))
    if coordination is not None:
        coord_shard = decode(coordination.value, ShardAssignment, coordination.key)
        found.append(("#coordination", 0, coord_shard))
    for config in configs:
        for shard in range(config.shards):
            found.append((config.name, shard, placed.get((config.name, shard))))
    drains, _ = await coord.get_prefix(draining_prefix(cluster))
    controller = await leader(coord, controller_key(cluster))
    answers = await ask_replicas(nodes, peers, ask_timeout_s) if peers is not None else {}
    reported: dict[tuple[str, int], dict[str, wire.ReplicaInfo]] = {}
    for node_id, infos in answers.items():
        for info in infos:
            reported.setdefault((info.collection, info.shard), {})[node_id] = info
    shards = []
    for collection, shard, assignment in found:
        if assignment is None:
            shards.append(ShardView(collection, shard, None, False))
            continue
        of = next((c for c in configs if c.name == collection), None)
        replication = Replication.LEADER if of is None else of.replication
        rows = replica_rows(assignment, up, reported.get((collection, shard), {}), replication)
        available = assignment.leader in up or (
            replication is Replication.MULTI and any(n in up for n in assignment.replicas)
        )
        shards.append(ShardView(collection, shard, assignment, available, assignment.epoch, rows))
    named = {n for s in shards if s.assignment for n in s.assignment.replicas}
    return ClusterView(
        cluster=cluster,
        nodes=nodes,
        controller=controller,
        collections=configs,
        shards=shards,
        revision=revision,
        draining=sorted(kv.key[len(draining_prefix(cluster)) :].decode() for kv in drains),
        down=sorted(named - set(up)),
        silent=sorted(set(up) - set(answers)) if peers is not None else [],
    )
