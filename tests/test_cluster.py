"""A real cluster end to end: etcd and ``memcluster node`` processes on loopback.

Goal: a cluster answers as one server does, keeps every acknowledged write through a join, a
drain and a crash, and says exactly which shards are missing while a node is down. Method:
:class:`cluster_util.Cluster` runs one etcd per module and node processes with a 2 s lease.
Tests that leave membership alone share one three-node cluster (each with collections of its
own); a join, a drain or a kill gets a cluster of its own (a cluster name of its own in the
same etcd). Placement is checked as the planner defines it: every shard placed, and loads
(collection shards plus the coordination shard) within one of each other. Answers are
compared with a model: brute-force numpy top-k, the sorted key set, a single ``memcluster
serve``. Waits are on conditions (the view in etcd, a count), never fixed sleeps. A node that
exits on its own fails the test that was running.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import numpy.typing as npt
import pytest

import memcluster
from cluster_util import LEASE_TTL_S, Cluster, cluster_fixture, report_on_failure
from memcluster import Memory
from memcluster.cluster.keys import COORDINATION
from memcluster.core.errors import RequestError, ShardUnavailable
from memcluster.core.hashing import shard_of
from server_util import ServerProcess
from test_coordinator import EtcdProcess

Floats = npt.NDArray[np.float64]
NODES = ("n1", "n2", "n3")
KINDS: tuple[Literal["http", "binary"], ...] = ("http", "binary")
_names = itertools.count(1)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdProcess) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("shared"), etcd=etcd, cluster="shared")
    try:
        cluster.add_nodes(*NODES)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def three(request: pytest.FixtureRequest, shared: Cluster) -> Iterator[Cluster]:
    """The shared three-node cluster; its logs are printed if the test fails, and a node that
    crashed fails the test (in teardown) and is started again for the next one."""
    for name in shared.crashed():
        shared.restart(name)
    failed_before = request.session.testsfailed
    yield shared
    report_on_failure(request, shared, failed_before)
    shared.check_no_crash()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, etcd: EtcdProcess) -> Iterator[Cluster]:
    """A cluster of this test's own (no node started yet)."""
    yield from cluster_fixture(request, tmp_path / "cluster", etcd=etcd, name=f"c{next(_names)}")


# -- helpers --------------------------------------------------------------------------------


def unit(rows: Floats) -> Floats:
    norms: Floats = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / norms


def random_memories(
    rng: np.random.Generator, n: int, dim: int, namespaces: list[tuple[str, ...]]
) -> list[Memory]:
    vectors = rng.normal(size=(n, dim))
    return [
        Memory(
            namespace=namespaces[i % len(namespaces)],
            key=f"k{i:05d}",
            text=f"memory {i}",
            vector=vectors[i].tolist(),
            metadata={"i": i, "t": float(rng.random())},
        )
        for i in range(n)
    ]


def exact_top_k(memories: list[Memory], query: Floats, k: int) -> tuple[list[str], float]:
    """The keys of the cosine top-k by brute force, and the score gap between the k-th and
    the next (a gap under float32 rounding would make the order a coin toss)."""
    matrix = unit(np.array([m.vector for m in memories], dtype=np.float64))
    scores = matrix @ unit(query)
    order = np.argsort(-scores, kind="stable")
    gap = float(scores[order[k - 1]] - scores[order[k]]) if len(order) > k else 1.0
    return [memories[i].key for i in order[:k]], gap


def put_in_batches(coll: Any, memories: list[Memory], batch: int = 500) -> None:
    for start in range(0, len(memories), batch):
        coll.put_many(memories[start : start + batch])


def all_keys(coll: Any, limit: int = 1000) -> list[tuple[tuple[str, ...], str]]:
    out: list[tuple[tuple[str, ...], str]] = []
    cursor = None
    while True:
        page = coll.list(limit=limit, cursor=cursor)
        out.extend((m.namespace, m.key) for m in page.items)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


# -- one cluster, every node answers -------------------------------------------------------


def test_three_nodes_split_the_shards_and_every_node_answers_for_data_written_elsewhere(
    three: Cluster, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    view = three.view()
    assert [n.id for n in view.nodes] == list(NODES)
    assert view.controller in NODES
    three.client("n1").create_collection("everywhere", dim=8, shards=6)
    three.wait_for(
        lambda: three.placed_and_balanced("everywhere", NODES), 15, "6 shards spread over 3 nodes"
    )
    memories = random_memories(rng, 120, 8, [("team", "a"), ("team", "b"), ("solo",)])
    three.client("n1", "http").collection("everywhere").put_many(memories[:60])
    three.client("n2", "binary").collection("everywhere").put_many(memories[60:])
    expected = sorted((m.namespace, m.key) for m in memories)
    sample = random.Random(seed).sample(memories, 12)
    for node in NODES:
        for kind in KINDS:
            coll = three.client(node, kind).collection("everywhere")
            where = f"through {node} over {kind}"
            assert coll.count() == 120, where
            assert coll.count(namespace=("team",)) == 80, where
            assert all_keys(coll, limit=50) == expected, where
            for m in sample:
                got = coll.get(m.namespace, m.key)
                assert got is not None, f"{where}: {m.key}"
                assert (got.text, got.metadata) == (m.text, m.metadata), where
                np.testing.assert_allclose(got.vector, unit(np.array(m.vector)), atol=1e-6)
                hits = coll.search(m.vector, k=3)
                assert hits[0].memory.key == m.key, where
                assert hits[0].score == pytest.approx(1.0, abs=1e-5)
                assert hits.missing_shards == []


# -- a join under load ----------------------------------------------------------------------


class Writer(threading.Thread):
    """Writes batches of new keys until stopped, recording what was acknowledged."""

    def __init__(self, coll: Any, seed: int, batch: int = 20) -> None:
        super().__init__(daemon=True, name="writer")
        self.coll = coll
        self.rng = np.random.default_rng(seed)
        self.batch = batch
        self.acked: dict[str, dict[str, Any]] = {}
        self.batches = 0
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        number = 0
        while not self.stop_event.is_set():
            memories = [
                Memory(
                    namespace=("w", str(number % 3)),
                    key=f"b{number:05d}-{j:02d}",
                    text=f"batch {number} item {j}",
                    vector=self.rng.normal(size=8).tolist(),
                    metadata={"batch": number, "j": j},
                )
                for j in range(self.batch)
            ]
            try:
                self.coll.put_many(memories, idempotency_key=f"batch-{number}")
            except Exception as exc:  # every failure is counted and reported
                self.errors.append(f"batch {number}: {type(exc).__name__}: {exc}")
            else:
                for m in memories:
                    self.acked[m.key] = {"namespace": m.namespace, **m.metadata}
                self.batches += 1
            number += 1


class Searcher(threading.Thread):
    def __init__(self, coll: Any, seed: int) -> None:
        super().__init__(daemon=True, name="searcher")
        self.coll = coll
        self.rng = np.random.default_rng(seed + 1)
        self.done = 0
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.coll.search(self.rng.normal(size=8).tolist(), k=5)
                self.coll.count()
            except Exception as exc:  # every failure is counted and reported
                self.errors.append(f"{type(exc).__name__}: {exc}")
            else:
                self.done += 1


@pytest.mark.slow
def test_a_joining_node_receives_shards_while_writes_and_searches_go_on(
    cluster: Cluster, seed: int
) -> None:
    """Goal: a join rebalances without losing or refusing a write. Method: a writer through n1
    (binary) and a searcher through n2 (HTTP) run while n4 joins; the 8 shards and the
    coordination shard (3+3+3) become 3+2+2+2, so two shards move to n4 under writes; then
    every acknowledged key is read back with its value through n4, and none is extra."""
    cluster.add_nodes(*NODES)
    cluster.client("n1").create_collection("joined", dim=8, shards=8)
    cluster.wait_for(
        lambda: cluster.placed_and_balanced("joined", NODES), 15, "8 shards spread over 3 nodes"
    )
    writer = Writer(cluster.client("n1", "binary").collection("joined"), seed)
    searcher = Searcher(cluster.client("n2", "http").collection("joined"), seed)
    writer.start()
    searcher.start()
    try:
        cluster.wait_for(lambda: writer.batches >= 10, 30, "10 batches before the join")
        before_join = writer.batches
        cluster.add_node("n4")
        cluster.wait_for(
            lambda: cluster.placed_and_balanced("joined", (*NODES, "n4")),
            60,
            "shards moved to n4 until the load is even",
        )
        moved = writer.batches
        cluster.wait_for(lambda: writer.batches >= moved + 10, 30, "10 batches after the moves")
    finally:
        writer.stop_event.set()
        searcher.stop_event.set()
        writer.join(60)
        searcher.join(60)
    print(
        f"batches: {before_join} before the join, {moved - before_join} during,"
        f" {writer.batches - moved} after; searches: {searcher.done}"
    )
    assert writer.errors == []
    assert searcher.errors == []
    assert searcher.done > 0
    assert len(writer.acked) == writer.batches * writer.batch
    joined = cluster.client("n4", "http").collection("joined")
    listed = {}
    cursor = None
    while True:
        page = joined.list(limit=1000, cursor=cursor)
        listed.update({m.key: {"namespace": m.namespace, **m.metadata} for m in page.items})
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    lost = sorted(set(writer.acked) - set(listed))
    where = {
        key: (
            f"shard {shard_of(tuple(writer.acked[key]['namespace']), key, 8)},"
            f" get: {joined.get(writer.acked[key]['namespace'], key)}"
        )
        for key in lost[:20]
    }
    assert lost == [], f"{len(lost)} acknowledged keys not listed: {where}"
    assert listed == writer.acked
    assert joined.count() == len(writer.acked)
    for key in random.Random(seed).sample(sorted(writer.acked), 50):
        value = writer.acked[key]
        got = joined.get(value["namespace"], key)
        assert got is not None, key
        assert got.metadata == {"batch": value["batch"], "j": value["j"]}


# -- drain ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("which", ["collection-shards-only", "coordination-holder"])
def test_drain_moves_every_shard_off_the_node_and_keeps_every_key(
    cluster: Cluster, seed: int, which: str
) -> None:
    """Goal: ``memcluster drain`` empties a node without losing a key. Method: 6 shards and
    300 keys on 3 nodes; drain, through the CLI in a subprocess, a node that holds only
    collection shards, or the one that holds the coordination shard too (so that it moves as
    well); read everything back through every node, then stop the drained node and read
    again."""
    rng = np.random.default_rng(seed)
    cluster.add_nodes(*NODES)
    cluster.client("n1").create_collection("drained", dim=8, shards=6)
    cluster.wait_for(
        lambda: cluster.placed_and_balanced("drained", NODES), 15, "shards spread over 3 nodes"
    )
    memories = random_memories(rng, 300, 8, [("a",), ("b", "c")])
    cluster.client("n1", "binary").collection("drained").put_many(memories)
    expected = sorted((m.namespace, m.key) for m in memories)
    holder = cluster.wait_for(
        lambda: cluster.shard_map().get(COORDINATION), 15, "the coordination shard placed"
    )
    assert holder is not None
    drained = holder if which == "coordination-holder" else max(set(NODES) - {holder})
    rest = [n for n in NODES if n != drained]

    done = cluster.cli("drain", drained, "--timeout", "30")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "holds no shards" in done.stdout
    view = cluster.view()
    assert view.shards_held(drained) == 0
    assert view.draining == [drained]
    assert sorted(cluster.held("drained")) == rest
    cluster.wait_for(
        lambda: drained not in cluster.held(),
        15,
        f"every shard off {drained}, the coordination shard too",
    )
    for node in NODES:  # the drained node still routes, though it holds nothing
        assert all_keys(cluster.client(node, "binary").collection("drained")) == expected, node
    assert cluster.stop(drained) == 0
    cluster.wait_for(
        lambda: drained not in {n.id for n in cluster.view().nodes}, 5, f"{drained} gone"
    )
    after = cluster.client(rest[0], "http").collection("drained")
    assert after.count() == 300
    for m in memories:
        got = after.get(m.namespace, m.key)
        assert got is not None, m.key
        assert got.metadata == m.metadata


# -- a crash ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_node_makes_exactly_its_shards_unavailable_until_it_restarts(
    cluster: Cluster, seed: int
) -> None:
    """Goal: a crashed node is detected within its lease, its shards (and only they) are
    reported missing by name, and its restart brings everything back. Method: 6 shards on 3
    nodes, 300 keys; kill -9 n2; read through n1 with client retries off."""
    rng = np.random.default_rng(seed)
    cluster.add_nodes(*NODES)
    coll = cluster.client("n1").create_collection("crashed", dim=8, shards=6)
    cluster.wait_for(
        lambda: cluster.placed_and_balanced("crashed", NODES), 15, "shards spread over 3 nodes"
    )
    memories = random_memories(rng, 300, 8, [("a",), ("b",)])
    coll.put_many(memories)
    lost = sorted(cluster.held("crashed")["n2"])
    lost_names = [f"crashed/{n:04d}" for n in lost]
    on_lost = [m for m in memories if shard_of(m.namespace, m.key, 6) in lost]
    kept = {m.key for m in memories} - {m.key for m in on_lost}
    assert on_lost
    assert kept

    cluster.kill("n2")
    killed = time.monotonic()
    cluster.wait_for(lambda: cluster.view().down == ["n2"], LEASE_TTL_S + 3, "n2 down in the view")
    print(f"n2 seen down {time.monotonic() - killed:.2f} s after kill -9")

    for kind in KINDS:
        down = cluster.client("n1", kind, retries=0).collection("crashed")
        victim = on_lost[0]
        shard = f"crashed/{shard_of(victim.namespace, victim.key, 6):04d}"
        with pytest.raises(ShardUnavailable) as raised:
            down.get(victim.namespace, victim.key)
        assert shard in str(raised.value)
        assert "n2" in str(raised.value)
        with pytest.raises(ShardUnavailable, match="n2") as raised:
            down.count()
        assert any(name in str(raised.value) for name in lost_names), raised.value
        with pytest.raises(ShardUnavailable, match="n2"):
            down.search(victim.vector, k=5)
        partial = down.search(victim.vector, k=300, allow_partial=True)
        assert partial.missing_shards == lost_names
        assert {h.memory.key for h in partial} == kept
        survivor = next(m for m in memories if m.key in kept)
        got = down.get(survivor.namespace, survivor.key)
        assert got is not None
        assert got.metadata == survivor.metadata

    cluster.restart("n2")
    cluster.wait_for(
        lambda: all(s.available for s in cluster.view().shards), 15, "every shard available"
    )
    back = cluster.client("n1", "binary").collection("crashed")
    cluster.wait_for(lambda: back.count() == 300, 15, "count 300 after the restart")
    assert sorted(cluster.held("crashed")["n2"]) == lost
    for m in on_lost:
        got = back.get(m.namespace, m.key)
        assert got is not None, m.key
        assert got.metadata == m.metadata
    full = back.search(on_lost[0].vector, k=300)
    assert full.missing_shards == []
    assert len(full) == 300


# -- search across shards is exact ----------------------------------------------------------

STRATEGIES: dict[str, Callable[[np.random.Generator, Floats], dict[str, Any]]] = {
    "hash": lambda rng, sample: {"sharding": "hash"},
    "range": lambda rng, sample: {
        "sharding": "range",
        "range_field": "t",
        "boundaries": [i / 6 for i in range(1, 6)],
    },
    "vector": lambda rng, sample: {
        "sharding": "vector",
        "centroids": sample[rng.choice(len(sample), 6, replace=False)].tolist(),
    },
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_search_across_shards_equals_exact_search_over_all_the_data(
    three: Cluster, seed: int, strategy: str
) -> None:
    """Goal: scatter-gather loses nothing. Method: 3,000 random 16-d vectors in 6 shards (500
    a shard: below ``exact_items_max``, so each shard searches exactly), 50 queries, k=10,
    through every node and both protocols in turn, against numpy's brute-force cosine top-k.
    A query whose 10th and 11th scores are within float32 rounding is skipped (none expected).
    Range: also a filter on the range field, which prunes shards. Vector: nprobe=0 (all)."""
    rng = np.random.default_rng(seed)
    dim, k = 16, 10
    memories = random_memories(rng, 3000, dim, [("p",), ("q", "r")])
    sample = np.array([m.vector for m in memories])
    name = f"exact-{strategy}"
    options = STRATEGIES[strategy](rng, sample)
    three.client("n1").create_collection(name, dim=dim, shards=6, **options)
    three.wait_for(lambda: three.placed_and_balanced(name, NODES), 15, "shards spread over 3 nodes")
    put_in_batches(three.client("n3", "binary").collection(name), memories, 1000)
    colls = [three.client(n, kind).collection(name) for n in NODES for kind in KINDS]
    assert colls[0].count() == 3000
    nprobe = 0 if strategy == "vector" else None
    subset = [m for m in memories if m.metadata["t"] >= 0.5]
    compared = 0
    for q in range(50):
        coll = colls[q % len(colls)]
        query = rng.normal(size=dim)
        expected, gap = exact_top_k(memories, query, k)
        if gap > 1e-5:
            hits = coll.search(query.tolist(), k=k, nprobe=nprobe)
            assert [h.memory.key for h in hits] == expected, f"query {q} through {coll}"
            compared += 1
        if strategy == "range":
            expected, gap = exact_top_k(subset, query, k)
            if gap > 1e-5:
                hits = coll.search(query.tolist(), k=k, filter={"t": {"$gte": 0.5}})
                assert [h.memory.key for h in hits] == expected, f"filtered query {q}"
    assert compared >= 45


# -- list pagination ------------------------------------------------------------------------


def test_list_pages_across_shards_yield_every_key_once_in_order(three: Cluster, seed: int) -> None:
    rng = random.Random(seed)
    namespaces = [("a",), ("a", "x"), ("b",), ("b", "y", "z"), ("c",)]
    memories = [
        Memory(
            namespace=rng.choice(namespaces),
            key="".join(rng.choices("abcdefghij0123456789", k=rng.randint(1, 8))),
            vector=[rng.random() + 0.1, rng.random(), rng.random(), rng.random()],
        )
        for _ in range(400)
    ]
    latest = {(m.namespace, m.key): m for m in memories}  # a repeated (ns, key) overwrites
    three.client("n2").create_collection("listed", dim=4, shards=6)
    three.client("n2", "binary").collection("listed").put_many(list(latest.values()))
    cases: list[tuple[tuple[str, ...] | None, int]] = [
        (None, 7),
        (None, 1000),
        (("a",), 13),
        (("b", "y"), 1),
    ]
    for node, kind in itertools.product(NODES, KINDS):
        coll = three.client(node, kind).collection("listed")
        for namespace, limit in cases:
            expected = sorted(
                k for k in latest if namespace is None or k[0][: len(namespace)] == namespace
            )
            seen: list[tuple[tuple[str, ...], str]] = []
            cursor = None
            while True:
                page = coll.list(namespace=namespace, limit=limit, cursor=cursor)
                seen.extend((m.namespace, m.key) for m in page.items)
                if page.next_cursor is None:
                    break
                assert len(page.items) == limit
                assert len(seen) <= len(expected), "pages repeat keys"
                cursor = page.next_cursor
            assert seen == expected, f"{node} {kind} namespace={namespace} limit={limit}"


# -- bad input ------------------------------------------------------------------------------

NS = ("t", "x")
GOOD = [1.0, 0.0, 0.0]
BAD_CALLS: list[tuple[str, Callable[[Any], Any]]] = [
    ("short vector", lambda db: db.collection("bad").put(NS, "k", vector=[1.0, 2.0])),
    ("long vector", lambda db: db.collection("bad").put(NS, "k", vector=[1.0] * 4)),
    ("nan vector", lambda db: db.collection("bad").put(NS, "k", vector=[1, float("nan"), 0])),
    ("zero vector", lambda db: db.collection("bad").put(NS, "k", vector=[0, 0, 0])),
    ("empty namespace", lambda db: db.collection("bad").put((), "k", vector=GOOD)),
    (
        "one nan in a batch over every shard",
        lambda db: db.collection("bad").put_many(
            [Memory(namespace=NS, key=f"g{i}", vector=GOOD) for i in range(30)]
            + [Memory(namespace=NS, key="nan", vector=[float("nan"), 0, 0])]
        ),
    ),
    (
        "one short vector in a batch",
        lambda db: db.collection("bad").put_many(
            [Memory(namespace=NS, key=f"g{i}", vector=GOOD) for i in range(30)]
            + [Memory(namespace=NS, key="short", vector=[1.0])]
        ),
    ),
    ("search short query", lambda db: db.collection("bad").search([1.0, 0.0], k=3)),
    ("search nan query", lambda db: db.collection("bad").search([float("nan"), 0, 0], k=3)),
    ("search k=0", lambda db: db.collection("bad").search(GOOD, k=0)),
    ("bad filter", lambda db: db.collection("bad").count(filter={"a": {"$nope": 1}})),
    ("unknown collection put", lambda db: db.collection("nope").put(NS, "k", vector=GOOD)),
    ("unknown collection search", lambda db: db.collection("nope").search(GOOD, k=3)),
    ("bad collection name", lambda db: db.create_collection("no/slash", dim=3)),
    ("dim 0", lambda db: db.create_collection("dim0", dim=0)),
    ("existing collection", lambda db: db.create_collection("bad", dim=3)),
]

RAW_HTTP: list[tuple[str, str, dict[str, Any]]] = [
    (
        "wrong dim",
        "/v1/collections/bad/memories",
        {"memories": [{"namespace": ["t"], "key": "k", "vector": [1, 2]}]},
    ),
    (
        "nan as null",
        "/v1/collections/bad/memories",
        {"memories": [{"namespace": ["t"], "key": "k", "vector": [1, None, 2]}]},
    ),
    ("unknown collection", "/v1/collections/nope/memories/count", {}),
    ("bad search k", "/v1/collections/bad/search", {"vector": [1, 0, 0], "k": 0}),
]


def _error_of(call: Callable[[], Any]) -> type[BaseException] | None:
    try:
        call()
    except memcluster.MemclusterError as exc:
        return type(exc)
    return None


def test_bad_input_through_a_node_gets_the_errors_of_a_single_server_and_writes_nothing(
    three: Cluster, server: ServerProcess
) -> None:
    """Goal: a cluster node validates as a server does. Method: every call in BAD_CALLS, and a
    few raw HTTP requests, against a single ``memcluster serve`` and through n2 (which holds
    only some of the shards), over both protocols: the same error class (HTTP status and wire
    code for raw requests), a RequestError, and nothing written on either."""
    with memcluster.connect(server.http_url) as single:
        for name in single.list_collections():
            single.drop_collection(name)
        single.create_collection("bad", dim=3, shards=6)
        three.client("n1").create_collection("bad", dim=3, shards=6)
        three.wait_for(
            lambda: three.placed_and_balanced("bad", NODES), 15, "shards spread over 3 nodes"
        )
        for kind in KINDS:
            with memcluster.connect(server.mc_url if kind == "binary" else server.http_url) as one:
                node = three.client("n2", kind, retries=0)
                for what, call in BAD_CALLS:
                    expected = _error_of(lambda: call(one))  # noqa: B023 - called at once
                    got = _error_of(lambda: call(node))  # noqa: B023 - called at once
                    assert expected is not None, f"{what}: the single server accepted it"
                    assert issubclass(expected, RequestError), what
                    assert got is expected, f"{what} over {kind}: {got} != {expected}"
        for what, path, body in RAW_HTTP:
            single_reply = httpx.post(server.http_url + path, json=body)
            node_reply = httpx.post(three.nodes["n2"].http_url + path, json=body)
            assert 400 <= single_reply.status_code < 500, (what, single_reply.text)
            assert (node_reply.status_code, node_reply.json()["code"]) == (
                single_reply.status_code,
                single_reply.json()["code"],
            ), (what, node_reply.text, single_reply.text)
        assert single.collection("bad").count() == 0
        assert three.client("n3", "binary").collection("bad").count() == 0
        assert not {"dim0", "no/slash"} & set(three.client("n1").list_collections())
