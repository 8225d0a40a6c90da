"""``memcluster status`` shows each replica of a replicated shard: node, address, role, state
and lag. First the pure function that computes the rows (tables), then asking nodes that do
not answer (in-process sockets), last a real cluster of three node processes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from cluster_util import Cluster, cluster_fixture
from memcluster import Memory
from memcluster.cluster.dataplane import Peers
from memcluster.cluster.keys import NodeInfo, ShardAssignment
from memcluster.cluster.view import ReplicaState, ReplicaView, Role, ask_replicas, replica_rows
from memcluster.cluster.wire import ReplicaInfo
from memcluster.core.types import Replication
from test_coordinator import EtcdProcess

# -- replica_rows: role, state and lag from the assignment, live nodes and reports -------------

LEADER, FOLLOWER = Role.LEADER, Role.FOLLOWER
IN_SYNC, CATCHING_UP, DOWN = ReplicaState.IN_SYNC, ReplicaState.CATCHING_UP, ReplicaState.DOWN


def _node(node_id: str) -> NodeInfo:
    return NodeInfo(
        id=node_id,
        http_url=f"http://{node_id}:7700",
        peer_url=f"mc://{node_id}:7701",
        started_at=0.0,
    )


def _info(last: int, state: str, leading: bool = False) -> ReplicaInfo:
    return ReplicaInfo(
        collection="c",
        shard=0,
        epoch=3,
        leading=leading,
        last=last,
        committed=last if leading else 0,
        acked={},
        state=state,
    )


ROWS: list[Any] = [
    # id, (replicas, leader, in_sync), live, reports {node: (last, host state)},
    # expected [(node, role, state, lag)]
    pytest.param(
        ("a", "b", "c"),
        "a",
        ("a", "b", "c"),
        {"a", "b", "c"},
        {"a": (10, "active"), "b": (10, "follower"), "c": (7, "follower")},
        [("a", LEADER, IN_SYNC, 0), ("b", FOLLOWER, IN_SYNC, 0), ("c", FOLLOWER, IN_SYNC, 3)],
        id="all-in-sync-lag-is-leader-last-minus-own-last",
    ),
    pytest.param(
        ("a", "b"),
        "a",
        ("a", "b"),
        {"a", "b"},
        {"a": (10, "active"), "b": (12, "follower")},
        [("a", LEADER, IN_SYNC, 0), ("b", FOLLOWER, IN_SYNC, 0)],
        id="follower-asked-after-the-leader-is-clamped-at-0",
    ),
    pytest.param(
        ("a", "b", "c"),
        "a",
        ("a", "b"),
        {"a", "b"},
        {"a": (10, "active"), "b": (10, "follower")},
        [("a", LEADER, IN_SYNC, 0), ("b", FOLLOWER, IN_SYNC, 0), ("c", FOLLOWER, DOWN, None)],
        id="node-not-live-is-down-with-unknown-lag",
    ),
    pytest.param(
        ("a", "b", "c"),
        "a",
        ("a", "b"),
        {"a", "b", "c"},
        {"a": (10, "active"), "b": (10, "follower"), "c": (4, "follower")},
        [("a", LEADER, IN_SYNC, 0), ("b", FOLLOWER, IN_SYNC, 0), ("c", FOLLOWER, CATCHING_UP, 6)],
        id="live-but-not-in-sync-is-catching-up",
    ),
    pytest.param(
        ("a", "b", "c"),
        "a",
        ("a", "b", "c"),
        {"a", "b", "c"},
        {"a": (10, "active"), "b": (0, "incoming"), "c": (9, "ready")},
        [
            ("a", LEADER, IN_SYNC, 0),
            ("b", FOLLOWER, CATCHING_UP, 10),
            ("c", FOLLOWER, CATCHING_UP, 1),
        ],
        id="being-copied-is-catching-up-even-in-the-in-sync-set",
    ),
    pytest.param(
        ("a", "b"),
        "a",
        ("a", "b"),
        {"a", "b"},
        {"a": (10, "active")},
        [("a", LEADER, IN_SYNC, 0), ("b", FOLLOWER, IN_SYNC, None)],
        id="follower-that-did-not-answer-has-unknown-lag-and-its-etcd-state",
    ),
    pytest.param(
        ("a", "b"),
        "a",
        ("a", "b"),
        {"a", "b"},
        {"b": (10, "follower")},
        [("a", LEADER, IN_SYNC, 0), ("b", FOLLOWER, IN_SYNC, None)],
        id="leader-that-did-not-answer-makes-follower-lags-unknown",
    ),
    pytest.param(
        ("a", "b"),
        "a",
        ("a", "b"),
        {"b"},
        {"a": (10, "active"), "b": (8, "follower")},
        [("a", LEADER, DOWN, None), ("b", FOLLOWER, IN_SYNC, None)],
        id="down-leader-is-no-reference-even-with-a-stale-report",
    ),
    pytest.param(
        ("a", "b"),
        None,
        ("a", "b"),
        {"a", "b"},
        {"a": (10, "follower"), "b": (8, "follower")},
        [("a", FOLLOWER, IN_SYNC, None), ("b", FOLLOWER, IN_SYNC, None)],
        id="no-leader-all-followers-lags-unknown",
    ),
    pytest.param(
        ("a", "b"),
        "a",
        ("a", "b"),
        {"a", "b"},
        {"a": (10, "active"), "b": (10, "some-future-state")},
        [("a", LEADER, IN_SYNC, 0), ("b", FOLLOWER, IN_SYNC, 0)],
        id="unknown-host-state-is-not-being-copied",
    ),
    pytest.param(
        ("a",),
        "a",
        ("a",),
        {"a"},
        {},
        [("a", LEADER, IN_SYNC, 0)],
        id="unreplicated-shard-has-one-in-sync-leader",
    ),
]


@pytest.mark.parametrize(("replicas", "leader", "in_sync", "live", "reports", "expected"), ROWS)
def test_replica_rows_give_role_state_and_lag(
    replicas: tuple[str, ...],
    leader: str | None,
    in_sync: tuple[str, ...],
    live: set[str],
    reports: dict[str, tuple[int, str]],
    expected: list[tuple[str, Role, ReplicaState, int | None]],
) -> None:
    assignment = ShardAssignment(epoch=3, replicas=replicas, leader=leader, in_sync=in_sync)
    nodes = {n: _node(n) for n in live}
    reported = {n: _info(last, state, n == leader) for n, (last, state) in reports.items()}
    rows = replica_rows(assignment, nodes, reported)
    assert [(r.node, r.role, r.state, r.lag) for r in rows] == expected
    for row in rows:
        assert row.address == (f"mc://{row.node}:7701" if row.node in live else None)


def test_replica_rows_encode_as_json_strings_for_scripts() -> None:
    row = ReplicaView("a", "mc://a:7701", Role.LEADER, ReplicaState.CATCHING_UP, None)
    assert json.loads(msgspec.json.encode(row)) == {
        "node": "a",
        "address": "mc://a:7701",
        "role": "leader",
        "state": "catching-up",
        "lag": None,
    }


# -- ask_replicas: bounded, and a silent node only goes missing ---------------------------------


def test_ask_replicas_leaves_out_nodes_that_refuse_or_never_answer_within_the_timeout() -> None:
    """One node's port accepts connections and never says a word (a hung process), another's
    refuses them (a killed process): both are left out, and the whole ask takes about one
    timeout, not one per node."""
    hung = socket.create_server(("127.0.0.1", 0))
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    nodes = [
        NodeInfo(id=f"n{i}", http_url="http://x", peer_url=url, started_at=0.0)
        for i, url in enumerate(
            [f"mc://127.0.0.1:{hung.getsockname()[1]}", f"mc://127.0.0.1:{closed_port}"] * 2
        )
    ]

    async def ask() -> dict[str, list[ReplicaInfo]]:
        peers = Peers(max_frame_bytes=1 << 20)
        try:
            return await ask_replicas(nodes, peers, timeout_s=0.5)
        finally:
            await peers.close()

    try:
        started = time.monotonic()
        assert asyncio.run(ask()) == {}
        assert time.monotonic() - started < 1.5
    finally:
        hung.close()


# -- a real cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data")
    yield server
    server.stop()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, etcd: EtcdProcess) -> Iterator[Cluster]:
    yield from cluster_fixture(request, tmp_path, etcd=etcd, name=f"s{time.monotonic_ns()}")


def _status(cluster: Cluster) -> dict[str, Any]:
    done = cluster.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def _wait_status(
    cluster: Cluster, good: Callable[[dict[str, Any]], bool], timeout_s: float, what: str
) -> dict[str, Any]:
    """``status --json``'s document, once ``good`` holds for it."""
    found = cluster.wait_for(
        lambda: doc if good(doc := _status(cluster)) else None, timeout_s, what
    )
    assert found is not None
    return found


def _shards(doc: dict[str, Any], collection: str) -> list[dict[str, Any]]:
    return [s for s in doc["shards"] if s["collection"] == collection]


def _settled(doc: dict[str, Any], collection: str, shards: int) -> bool:
    """Every shard (and the coordination shard) placed on three replicas, one leader, all
    in sync, no lag."""
    found = _shards(doc, collection) + _shards(doc, "#coordination")
    return len(found) == shards + 1 and all(
        s["epoch"] is not None
        and len(s["replicas"]) == 3
        and [r["role"] for r in s["replicas"]].count("leader") == 1
        and all(r["state"] == "in-sync" and r["lag"] == 0 for r in s["replicas"])
        for s in found
    )


@pytest.mark.slow
def test_status_shows_replicas_in_sync_then_a_killed_follower_down(cluster: Cluster) -> None:
    """RF 3 over three nodes, two shards, some acknowledged writes, and the coordination
    shard on three nodes too: ``status --json`` lists three replicas per shard, one leader,
    all in sync with lag 0, and the older fields are still there; the table shows them too.
    After kill -9 of a node that leads neither shard of the collection, once its lease
    expires, it shows as down (no address, lag unknown) in both."""
    cluster.node_args = ["--coordination-replicas", "3"]
    cluster.add_nodes("n1", "n2", "n3")
    client = cluster.client("n1", "binary")
    client.create_collection("rep", dim=4, shards=2, replication_factor=3)
    coll = client.collection("rep")
    for i in range(0, 40, 10):
        coll.put_many(
            [
                Memory(namespace=("a",), key=f"k{j}", vector=np.array([1.0, j, 2.0, 3.0]))
                for j in range(i, i + 10)
            ]
        )

    doc = _wait_status(
        cluster,
        lambda d: _settled(d, "rep", 2),
        60.0,
        "both shards of rep on three in-sync replicas with lag 0",
    )
    assert doc["silent"] == []
    addresses = {n: cluster.nodes[n].mc_url for n in ("n1", "n2", "n3")}
    for shard in _shards(doc, "rep"):
        assignment = shard["assignment"]
        assert shard["available"] is True
        assert shard["epoch"] == assignment["epoch"]
        assert [r["node"] for r in shard["replicas"]] == assignment["replicas"]
        (leader,) = [r["node"] for r in shard["replicas"] if r["role"] == "leader"]
        assert leader == assignment["leader"]
        for replica in shard["replicas"]:
            assert set(replica) == {"node", "address", "role", "state", "lag"}
            assert replica["address"] == addresses[replica["node"]]
    assert sorted(n["id"] for n in doc["nodes"]) == ["n1", "n2", "n3"]
    assert doc["controller"] in addresses

    table = cluster.cli("status")
    assert table.returncode == 0, table.stderr
    assert "rep: replication factor 3" in table.stdout
    assert "#coordination: 3 replicas" in table.stdout
    assert "leader" in table.stdout
    assert "follower" in table.stdout
    assert "in-sync" in table.stdout

    leaders = {s["assignment"]["leader"] for s in _shards(doc, "rep")}
    victim = sorted(set(addresses) - leaders)[0]
    cluster.kill(victim)

    def shown_down(d: dict[str, Any]) -> bool:
        rows = [r for s in _shards(d, "rep") for r in s["replicas"] if r["node"] == victim]
        return len(rows) == 2 and all(r["state"] == "down" for r in rows)

    doc = _wait_status(cluster, shown_down, 30.0, f"{victim} shown down in both shards")
    for shard in _shards(doc, "rep"):
        (mine,) = [r for r in shard["replicas"] if r["node"] == victim]
        assert mine == {
            "node": victim,
            "address": None,
            "role": "follower",
            "state": "down",
            "lag": None,
        }
        others = [r for r in shard["replicas"] if r["node"] != victim]
        assert len(others) == 2
        assert all(r["state"] == "in-sync" for r in others)
    assert victim in doc["down"]
    table = cluster.cli("status")
    assert table.returncode == 0, table.stderr
    assert "down" in table.stdout


def test_status_json_keeps_its_shape_without_replicated_collections(
    cluster: Cluster,
) -> None:
    """An unreplicated collection: every shard still has its old fields, and one replica,
    the leader, in sync."""
    cluster.add_nodes("n1")
    cluster.client("n1").create_collection("plain", dim=4, shards=2)
    doc = _wait_status(
        cluster,
        lambda d: bool(s := _shards(d, "plain")) and all(x["available"] for x in s),
        30.0,
        "plain placed",
    )
    for shard in _shards(doc, "plain"):
        assert {"collection", "shard", "assignment", "available", "epoch", "replicas"} <= set(shard)
        assert shard["replicas"] == [
            {
                "node": "n1",
                "address": cluster.nodes["n1"].mc_url,
                "role": "leader",
                "state": "in-sync",
                "lag": 0,
            }
        ]


def test_chain_members_show_as_head_follower_and_tail() -> None:
    assignment = ShardAssignment(
        epoch=2, replicas=("a", "b", "c", "d"), leader="a", in_sync=("a", "b", "c")
    )
    live = {n: _node(n) for n in "abcd"}
    rows = replica_rows(assignment, live, {}, Replication.CHAIN)
    assert [(r.node, r.role) for r in rows] == [
        ("a", Role.HEAD),
        ("b", Role.FOLLOWER),
        ("c", Role.TAIL),
        ("d", Role.FOLLOWER),  # rejoining at the end: not a member until in sync
    ]


def test_multi_peers_lag_by_the_writes_of_others_they_lack() -> None:
    assignment = ShardAssignment(epoch=1, replicas=("a", "b", "c"), leader="a", in_sync=("a", "b"))
    live = {n: _node(n) for n in "ab"}
    reports = {
        "a": msgspec.structs.replace(_info(50, "active"), acked={"a": 10, "b": 7}),
        "b": msgspec.structs.replace(_info(40, "active"), acked={"a": 8, "b": 9}),
    }
    rows = replica_rows(assignment, live, reports, Replication.MULTI)
    assert [(r.node, r.role, r.state, r.lag) for r in rows] == [
        ("a", Role.PEER, IN_SYNC, 2),  # lacks b's 8 and 9
        ("b", Role.PEER, IN_SYNC, 2),  # lacks a's 9 and 10
        ("c", Role.PEER, DOWN, None),
    ]
