"""Replicated shards in real node processes with real etcd (issue 6): leader-follower
replication, failover after kill -9, a killed follower, a restart of everything.

Every test writes through a client while it attacks the cluster, records which writes were
acknowledged, and checks afterwards that every one of them is there."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import memcluster
from cluster_util import Cluster, cluster_fixture
from memcluster import Memory
from memcluster.cluster.keys import ShardAssignment
from test_coordinator import EtcdProcess


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data")
    yield server
    server.stop()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, etcd: EtcdProcess) -> Iterator[Cluster]:
    yield from cluster_fixture(request, tmp_path, etcd=etcd, name=f"r{time.monotonic_ns()}")


def _memory(i: int) -> Memory:
    vector = np.array([1.0, i % 7, i % 5, (i % 3) + 0.5], dtype=np.float32)
    return Memory(namespace=("a",), key=f"k{i}", vector=vector, metadata={"i": i})


def _assignment(cluster: Cluster, collection: str, shard: int = 0) -> ShardAssignment | None:
    for view in cluster.view().shards:
        if (view.collection, view.shard) == (collection, shard):
            return view.assignment
    return None


def _placed(cluster: Cluster, collection: str, shard: int = 0) -> ShardAssignment:
    """The shard's assignment once the controller placed it with a leader."""
    found = cluster.wait_for(
        lambda: (a := _assignment(cluster, collection, shard)) is not None and a.leader and a,
        30.0,
        f"{collection}/{shard} placed",
    )
    assert isinstance(found, ShardAssignment)
    return found


def _longest_pause(ack_times: list[float], since: float) -> float:
    """The longest time without an acknowledged write after ``since``."""
    after = [t for t in ack_times if t > since]
    return max((b - a for a, b in zip([since, *after], after, strict=False)), default=0.0)


class Writer:
    """Writes k0, k1, ... one at a time through one node, until stopped; remembers which
    writes were acknowledged and when writes failed."""

    def __init__(self, client: memcluster.Client, collection: str) -> None:
        self.coll = client.collection(collection)
        self.acked: list[int] = []
        self.failures: list[tuple[float, str]] = []
        self.ack_times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self.coll.put_many([_memory(i)])
            except memcluster.MemclusterError as exc:
                self.failures.append((time.monotonic(), repr(exc)))
                time.sleep(0.05)
                continue
            self.acked.append(i)
            self.ack_times.append(time.monotonic())
            i += 1

    def wait_acked(self, n: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.acked) < n:
            assert time.monotonic() < deadline, f"only {len(self.acked)} writes acknowledged"
            time.sleep(0.02)


def test_writes_replicate_and_survive_kill_9_of_the_leader(cluster: Cluster) -> None:
    """RF 3, ack=all: kill -9 the leader under a write load. Writes resume on a new leader
    within a few seconds, with no acknowledged write lost; the old leader comes back as a
    follower and catches up."""
    cluster.add_nodes("n1", "n2", "n3")
    client = cluster.client("n1", "binary")
    client.create_collection("rep", dim=4, replication_factor=3)
    assignment = _placed(cluster, "rep")
    assert len(assignment.replicas) == 3
    assert set(assignment.in_sync) == set(assignment.replicas)
    leader = assignment.leader
    assert leader is not None
    entry = next(n for n in ("n1", "n2", "n3") if n != leader)
    with Writer(cluster.client(entry, "binary"), "rep") as writer:
        writer.wait_acked(200)
        killed_at = time.monotonic()
        cluster.kill(leader)
        before = len(writer.acked)
        writer.wait_acked(before + 200, timeout_s=60.0)
    paused = _longest_pause(writer.ack_times, killed_at)
    print(f"leader kill -9: writes paused {paused:.2f} s at most")
    assert paused < 10.0
    after = _assignment(cluster, "rep")
    assert after is not None
    assert after.leader not in (None, leader)
    assert after.epoch > assignment.epoch
    coll = cluster.client(entry, "binary").collection("rep")
    missing = [i for i in writer.acked if coll.get(("a",), f"k{i}") is None]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    # The old leader returns as a follower and is taken back into the in-sync set.
    cluster.restart(leader)
    cluster.wait_for(
        lambda: leader in (_assignment(cluster, "rep") or after).in_sync,
        60.0,
        "the old leader in sync",
    )


def _all_there(cluster: Cluster, node: str, collection: str, acked: list[int]) -> None:
    coll = cluster.client(node, "binary").collection(collection)
    missing = [i for i in acked if coll.get(("a",), f"k{i}") is None]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"


def test_a_killed_follower_leaves_the_in_sync_set_and_writes_go_on(cluster: Cluster) -> None:
    """kill -9 a follower: after the ack timeout the leader removes it from the in-sync set
    (through etcd) and acknowledges again; restarted, it catches up and is taken back."""
    cluster.add_nodes("n1", "n2", "n3")
    client = cluster.client("n1", "binary")
    client.create_collection("f", dim=4, replication_factor=3)
    first = _placed(cluster, "f")
    follower = next(n for n in first.replicas if n != first.leader)
    with Writer(client, "f") as writer:
        writer.wait_acked(100)
        killed_at = time.monotonic()
        cluster.kill(follower)
        before = len(writer.acked)
        writer.wait_acked(before + 100, timeout_s=60.0)
    paused = _longest_pause(writer.ack_times, killed_at)
    print(f"follower kill -9: writes paused {paused:.2f} s at most")
    assert paused < 10.0
    now = _assignment(cluster, "f")
    assert now is not None
    assert follower not in now.in_sync
    assert now.leader == first.leader
    _all_there(cluster, "n1", "f", writer.acked)
    cluster.restart(follower)
    cluster.wait_for(
        lambda: follower in (_assignment(cluster, "f") or now).in_sync, 60.0, "back in sync"
    )
    _all_there(cluster, follower, "f", writer.acked)


def test_everything_restarts_and_no_acknowledged_write_is_lost(cluster: Cluster) -> None:
    """Stop every node (SIGTERM) after acknowledged writes, start them again: a leader is
    chosen (a restarted leader resigns and the failover picks the most complete replica),
    every write is there, and writes go on."""
    cluster.add_nodes("n1", "n2", "n3")
    client = cluster.client("n1", "binary")
    client.create_collection("all", dim=4, shards=2, replication_factor=3, ack="majority")
    cluster.wait_for(lambda: all(_assignment(cluster, "all", s) for s in (0, 1)), 30.0, "placement")
    with Writer(client, "all") as writer:
        writer.wait_acked(150)
    for name in ("n1", "n2", "n3"):
        cluster.kill(name)
    for name in ("n1", "n2", "n3"):
        cluster.restart(name)
    coll = cluster.client("n2", "binary").collection("all")

    def readable() -> bool:
        try:
            coll.get(("a",), "k0")
            return True
        except memcluster.MemclusterError:
            return False

    cluster.wait_for(readable, 60.0, "a leader for every shard")
    _all_there(cluster, "n2", "all", writer.acked)
    with Writer(cluster.client("n3", "binary"), "all") as more:
        more.wait_acked(20, timeout_s=60.0)
