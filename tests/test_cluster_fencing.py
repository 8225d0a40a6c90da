"""Fencing tokens and leases in a real cluster: the lock lives on the coordination shard's node, the
memories on other nodes. A write under a stale token is refused (StaleToken) whether the lock
was released, expired or taken by another holder, and a holder that lost its lock cannot
overwrite what the new holder wrote. Memories put on a lease through one node are deleted
when the lease is revoked through another."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from cluster_util import Cluster, cluster_fixture, wait_for
from memcluster import Memory
from memcluster.core.errors import LeaseExpired, StaleToken
from test_coordinator import EtcdProcess


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    etcd = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data")
    try:
        for c in cluster_fixture(request, tmp_path_factory.mktemp("fencing"), etcd=etcd, name="f"):
            c.add_nodes("n1", "n2", "n3")
            yield c
    finally:
        etcd.stop()


def _memory(key: str, value: int) -> Memory:
    return Memory(namespace=("a",), key=key, vector=np.ones(4), metadata={"v": value})


@pytest.mark.parametrize("kind", ["http", "binary"])
def test_fenced_writes_across_nodes(cluster: Cluster, kind: str) -> None:
    a, b = cluster.client("n1", kind), cluster.client("n2", kind)  # type: ignore[arg-type]
    name = f"fenced-{kind}"
    coll_a = a.create_collection(name, dim=4, shards=6)
    coll_b = b.collection(name)
    first = a.acquire_lock(f"L-{kind}", ttl_s=30)
    coll_b.put(("a",), "x", vector=np.ones(4), metadata={"v": 1}, fence=(f"L-{kind}", first))
    a.release_lock(f"L-{kind}", first)
    with pytest.raises(StaleToken):  # released: the coordination shard says so
        coll_b.put(("a",), "x", vector=np.ones(4), metadata={"v": 2}, fence=(f"L-{kind}", first))
    second = b.acquire_lock(f"L-{kind}", ttl_s=30)
    assert second > first
    coll_a.put_many([_memory("x", 3), _memory("y", 3)], fence=(f"L-{kind}", second))
    with pytest.raises(StaleToken):
        coll_a.delete(("a",), "y", fence=(f"L-{kind}", first))
    got = coll_b.get(("a",), "x")
    assert got is not None
    assert got.metadata == {"v": 3}
    with pytest.raises(StaleToken):
        coll_b.put(("a",), "z", vector=np.ones(4), fence=("never-acquired", 1))
    assert coll_b.get(("a",), "z") is None
    b.release_lock(f"L-{kind}", second)


def test_memories_on_a_lease_go_when_it_ends(cluster: Cluster) -> None:
    a, b, c = cluster.client("n1"), cluster.client("n2", "binary"), cluster.client("n3")
    coll = a.create_collection("leased", dim=4, shards=6)
    lease = b.grant_lease(30)
    b.collection("leased").put_many(
        [
            Memory(namespace=("agent",), key=f"w{i}", vector=np.ones(4), lease=lease)
            for i in range(20)
        ]
        + [Memory(namespace=("agent",), key="kept", vector=np.ones(4))]
    )
    assert coll.count() == 21
    c.revoke(lease)
    wait_for(lambda: coll.count() == 1, 10, "the lease's memories to go")
    assert coll.get(("agent",), "kept") is not None
    with pytest.raises(LeaseExpired):
        coll.put(("agent",), "late", vector=np.ones(4), lease=lease)
    assert coll.get(("agent",), "late") is None
