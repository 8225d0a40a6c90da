"""Multi-leader collections (``replication="multi"``) in real node processes with real etcd:
every replica takes writes, concurrent writes of one key resolve last-writer-wins the same
way on every replica, a killed replica neither stops writes nor loses acknowledged ones, and
the levels a multi collection cannot give are refused with errors that say what to do."""

from __future__ import annotations

import json
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

NODES = ("n1", "n2", "n3")
KEYS = 40


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data")
    yield server
    server.stop()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, etcd: EtcdProcess) -> Iterator[Cluster]:
    yield from cluster_fixture(request, tmp_path, etcd=etcd, name=f"m{time.monotonic_ns()}")


def _memory(key: str, text: str) -> Memory:
    vector = np.array([1.0, len(text) % 7, hash(key) % 5, 0.5], dtype=np.float32)
    return Memory(namespace=("a",), key=key, text=text, vector=vector)


def _placed(cluster: Cluster, collection: str, shards: int) -> None:
    def placed() -> bool:
        found = {
            v.shard: v.assignment
            for v in cluster.view().shards
            if v.collection == collection and v.assignment is not None
        }
        return len(found) == shards and all(
            isinstance(a, ShardAssignment) and len(a.replicas) == 3 for a in found.values()
        )

    cluster.wait_for(placed, 30.0, f"{collection} placed on 3 replicas")


class Writer:
    """Puts keys k0..k(KEYS-1) in turn through one node, text "<node>-<i>", until stopped;
    remembers every acknowledged (key, text, version)."""

    def __init__(self, cluster: Cluster, node: str, collection: str) -> None:
        self.node = node
        self.coll = cluster.client(node, "binary").collection(collection)
        self.acked: list[tuple[str, str, int]] = []
        self.ack_times: list[float] = []
        self.failures: list[str] = []
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
            key, text = f"k{i % KEYS}", f"{self.node}-{i}"
            try:
                (version,) = self.coll.put_many([_memory(key, text)])
            except memcluster.MemclusterError as exc:
                self.failures.append(repr(exc))
                time.sleep(0.05)
                continue
            self.acked.append((key, text, version))
            self.ack_times.append(time.monotonic())
            i += 1

    def wait_acked(self, n: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.acked) < n:
            assert time.monotonic() < deadline, f"{self.node}: {len(self.acked)} acked"
            time.sleep(0.02)


def _contents(cluster: Cluster, node: str, collection: str) -> dict[str, tuple[str, int]]:
    coll = cluster.client(node, "binary").collection(collection)
    out = {}
    for i in range(KEYS):
        memory = coll.get(("a",), f"k{i}", consistency="eventual")
        if memory is not None:
            assert memory.text is not None
            out[f"k{i}"] = (memory.text, memory.version)
    return out


def _converged(
    cluster: Cluster, nodes: tuple[str, ...], collection: str
) -> dict[str, tuple[str, int]]:
    """Every node's replicas hold the same memories (polled: anti-entropy takes a moment)."""
    seen: list[dict[str, tuple[str, int]]] = []

    def same() -> bool:
        seen[:] = [_contents(cluster, n, collection) for n in nodes]
        return all(s == seen[0] for s in seen)

    cluster.wait_for(same, 30.0, "the replicas converged")
    return seen[0]


def _check_last_writer_wins(final: dict[str, tuple[str, int]], writers: list[Writer]) -> None:
    """Each key holds its acknowledged write with the highest version (its HLC stamp). Two
    replicas may stamp writes of one key in the same millisecond with the same version: the
    replicas then agree on one of them (by origin name, which the client does not see)."""
    newest: dict[str, tuple[set[str], int]] = {}
    for writer in writers:
        for key, text, version in writer.acked:
            if key not in newest or version > newest[key][1]:
                newest[key] = ({text}, version)
            elif version == newest[key][1]:
                newest[key][0].add(text)
    for key, (texts, version) in newest.items():
        assert key in final, f"{key} lost: its newest acknowledged write was {texts}"
        got_text, got_version = final[key]
        assert got_version >= version, f"{key}: {got_text}@{got_version} < {texts}@{version}"
        if got_version == version:
            assert got_text in texts


def test_every_replica_takes_writes_and_concurrent_writes_converge(cluster: Cluster) -> None:
    """Three writers, one through each node, write the same 40 keys at once: every write is
    taken by the node's own replica; once they stop, every replica holds the same memories,
    and each key holds its newest acknowledged write."""
    cluster.add_nodes(*NODES)
    client = cluster.client("n1", "binary")
    client.create_collection(
        "mm", dim=4, shards=2, replication_factor=3, replication="multi", ack="majority"
    )
    _placed(cluster, "mm", 2)
    writers = [Writer(cluster, n, "mm") for n in NODES]
    for w in writers:
        w.__enter__()
    try:
        for w in writers:
            w.wait_acked(300)
    finally:
        for w in writers:
            w.__exit__()
    total = sum(len(w.acked) for w in writers)
    final = _converged(cluster, NODES, "mm")
    print(f"{total} writes through 3 nodes at once; {len(final)} keys converged")
    _check_last_writer_wins(final, writers)
    quorum = client.collection("mm").get(("a",), "k0", consistency="quorum")
    assert quorum is not None
    assert (quorum.text, quorum.version) == final["k0"]
    hits = client.collection("mm").search(
        np.array([1.0, 1.0, 1.0, 0.5], dtype=np.float32), k=5, consistency="quorum"
    )
    assert len(hits) == 5
    assert len({(h.memory.key) for h in hits}) == 5
    done = cluster.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    shards = [s for s in json.loads(done.stdout)["shards"] if s["collection"] == "mm"]
    rows = [(r["role"], r["state"], r["lag"]) for s in shards for r in s["replicas"]]
    print(f"status of mm: {rows}")
    assert rows == [("peer", "in-sync", 0)] * 6


@pytest.mark.parametrize("ack", ["majority", "all"])
def test_a_killed_replica_stops_no_writes_and_catches_up_when_back(
    cluster: Cluster, ack: str
) -> None:
    """kill -9 one node while writers on the other two write: with ack="majority" writes go
    on without waiting for anything; with ack="all" they wait until the dead node's lease
    ends (then "all" counts the replicas that are up). Back, the node catches up (its own
    writes from before the kill included) and every replica holds every newest write."""
    cluster.add_nodes(*NODES)
    client = cluster.client("n1", "binary")
    client.create_collection(
        "mk", dim=4, shards=2, replication_factor=3, replication="multi", ack=ack
    )
    _placed(cluster, "mk", 2)
    victim = Writer(cluster, "n3", "mk")
    with victim:
        victim.wait_acked(100)
    writers = [Writer(cluster, n, "mk") for n in ("n1", "n2")]
    for w in writers:
        w.__enter__()
    try:
        for w in writers:
            w.wait_acked(100)
        killed_at = time.monotonic()
        cluster.kill("n3")
        counts = [len(w.acked) for w in writers]
        for w, before in zip(writers, counts, strict=True):
            w.wait_acked(before + 200)
    finally:
        for w in writers:
            w.__exit__()
    pauses = []
    for w in writers:
        after = [t for t in w.ack_times if t > killed_at]
        pauses.append(max(b - a for a, b in zip([killed_at, *after], after, strict=False)))
    print(f"kill -9 of a multi replica, ack={ack}: longest pause {max(pauses):.3f} s")
    assert max(pauses) < (2.0 if ack == "majority" else 8.0)
    survivors = _converged(cluster, ("n1", "n2"), "mk")
    _check_last_writer_wins(survivors, [victim, *writers])
    cluster.restart("n3")
    final = _converged(cluster, NODES, "mk")
    _check_last_writer_wins(final, [victim, *writers])


def test_what_a_multi_collection_cannot_do_is_refused_with_a_clear_error(
    cluster: Cluster,
) -> None:
    cluster.add_nodes(*NODES)
    client = cluster.client("n1", "binary")
    client.create_collection("mr", dim=4, replication_factor=3, replication="multi")
    _placed(cluster, "mr", 1)
    coll = client.collection("mr")
    coll.put_many([_memory("x", "one")])
    with pytest.raises(memcluster.InvalidArgument, match="consistency='quorum'"):
        coll.get(("a",), "x")  # strong is the default
    with pytest.raises(memcluster.InvalidArgument, match="quorum"):
        coll.get(("a",), "x", consistency="session")
    with pytest.raises(memcluster.InvalidArgument, match="replication='leader' or 'chain'"):
        coll.put_many([Memory(namespace=("a",), key="x", vector=np.ones(4), if_version=1)])
    memory = coll.get(("a",), "x", consistency="quorum")
    assert memory is not None
    assert memory.text == "one"
    # Per-request quorums: W on writes, R on quorum reads.
    (version,) = coll.put_many([_memory("x", "two")], w=3)
    for r in (1, 2, 3):
        got = coll.get(("a",), "x", consistency="quorum", r=r)
        assert got is not None
        assert (got.text, got.version) == ("two", version)
    hits = coll.search(np.ones(4, dtype=np.float32), k=1, consistency="quorum", r=3)
    assert [h.memory.text for h in hits] == ["two"]
    with pytest.raises(memcluster.InvalidArgument, match=r"w must be an int in \[1, 3\]"):
        coll.put_many([_memory("x", "three")], w=4)
    with pytest.raises(memcluster.InvalidArgument, match="r=2 is for consistency='quorum'"):
        coll.get(("a",), "x", consistency="eventual", r=2)
    client.create_collection("ml", dim=4, replication_factor=3)
    leader = client.collection("ml")
    with pytest.raises(memcluster.InvalidArgument, match="w= is for replication='multi'"):
        leader.put_many([_memory("x", "one")], w=2)
    with pytest.raises(memcluster.InvalidArgument, match="sharding='hash'"):
        client.create_collection(
            "mv",
            dim=2,
            shards=2,
            sharding="range",
            range_field="t",
            boundaries=[0.0],
            replication="multi",
        )


def _assignment(cluster: Cluster, collection: str, shard: int = 0) -> ShardAssignment | None:
    for view in cluster.view().shards:
        if (view.collection, view.shard) == (collection, shard):
            return view.assignment
    return None


def test_a_lost_replica_is_rebuilt_and_a_drained_one_hands_its_writes_over(
    cluster: Cluster,
) -> None:
    """RF 3 on 4 nodes, 3 s grace: kill -9 a replica; the controller gives its place to the
    fourth node, which receives the whole state from a peer (a state transfer: the new
    replica has none of the log) and is admitted in sync. Then drain a node that took
    writes: it stops taking them, pushes them to the others, and leaves."""
    cluster.node_args = ["--rereplicate-after", "3"]
    cluster.add_nodes("n1", "n2", "n3", "n4")
    client = cluster.client("n1", "binary")
    client.create_collection("mx", dim=4, replication_factor=3, replication="multi", ack="majority")
    _placed(cluster, "mx", 1)
    first = _assignment(cluster, "mx")
    assert first is not None
    spare = next(n for n in ("n1", "n2", "n3", "n4") if n not in first.replicas)
    victim = next(n for n in first.replicas if n != "n1")
    writers = [Writer(cluster, n, "mx") for n in first.replicas]
    for w in writers:
        with w:
            w.wait_acked(60)
    cluster.kill(victim)
    with Writer(cluster, "n1", "mx") as late:
        late.wait_acked(50)
    rebuilt = cluster.wait_for(
        lambda: (
            (a := _assignment(cluster, "mx")) is not None
            and spare in a.in_sync
            and victim not in a.replicas
            and a
        ),
        60.0,
        f"{spare} replacing {victim}",
    )
    assert isinstance(rebuilt, ShardAssignment)
    final = _converged(cluster, tuple(rebuilt.replicas), "mx")
    _check_last_writer_wins(final, [*writers, late])
    # Drain a replica that takes writes right up to the drain.
    leaving = next(n for n in rebuilt.replicas if n != "n1")
    with Writer(cluster, leaving, "mx") as last:
        last.wait_acked(50)
        done = cluster.cli("drain", leaving, "--timeout", "60")
    assert done.returncode == 0, done.stderr
    after = cluster.wait_for(
        lambda: (
            (a := _assignment(cluster, "mx")) is not None
            and leaving not in a.replicas
            and len(a.in_sync) == 2
            and a
        ),
        60.0,
        f"{leaving} drained",
    )
    assert isinstance(after, ShardAssignment)
    final = _converged(cluster, tuple(after.replicas), "mx")
    _check_last_writer_wins(final, [*writers, late, last])


def test_the_change_feed_of_a_multi_collection_has_every_replicas_writes_once(
    cluster: Cluster,
) -> None:
    """Writes taken by three different replicas all reach the feed (served by one replica),
    each once; a write that loses last-writer-wins on arrival is not an event."""
    cluster.add_nodes(*NODES)
    client = cluster.client("n1", "binary")
    client.create_collection("mf", dim=4, replication_factor=3, replication="multi")
    _placed(cluster, "mf", 1)
    coll = client.collection("mf")
    cursor = coll.feed_cursor()
    for node in NODES:
        mine = cluster.client(node, "binary").collection("mf")
        mine.put_many([_memory(f"{node}-{i}", node) for i in range(20)], w=1)
    events: list[memcluster.Event] = []
    deadline = time.monotonic() + 30
    while len({e.key for e in events}) < 60 and time.monotonic() < deadline:
        events.extend(coll.subscribe(cursor=cursor, idle_timeout_s=0.5))
        if events:
            cursor = events[-1].cursor
    keys = [e.key for e in events]
    assert sorted(keys) == sorted(f"{n}-{i}" for n in NODES for i in range(20))


def test_repeated_kills_pause_no_writes_and_quorum_reads_go_around_the_dead(
    cluster: Cluster,
) -> None:
    """Each round kills another node (each back before the next round) while a writer
    writes through the next one with ack="majority": writes do not wait for the dead node,
    and quorum reads right after the kill, while etcd still lists it, ask another replica."""
    cluster.add_nodes(*NODES)
    client = cluster.client("n1", "binary")
    client.create_collection("mq", dim=4, replication_factor=3, replication="multi", ack="majority")
    _placed(cluster, "mq", 1)
    pauses = []
    writers: list[Writer] = []
    for r in range(3):
        killed, entry = NODES[r], NODES[(r + 1) % 3]
        writer = Writer(cluster, entry, "mq")
        writers.append(writer)
        with writer:
            writer.wait_acked(50)
            killed_at = time.monotonic()
            cluster.kill(killed)
            coll = cluster.client(entry, "binary").collection("mq")
            for i in range(20):  # at once: the dead node is still in the map
                assert coll.get(("a",), f"k{i}", consistency="quorum") is not None
            before = len(writer.acked)
            writer.wait_acked(before + 100)
        after = [t for t in writer.ack_times if t > killed_at]
        pauses.append(max(b - a for a, b in zip([killed_at, *after], after, strict=False)))
        cluster.restart(killed)
        _converged(cluster, NODES, "mq")
    print(f"repeated kills of multi replicas: longest pauses {[f'{p:.3f}' for p in pauses]} s")
    assert max(pauses) < 1.0
    _check_last_writer_wins(_converged(cluster, NODES, "mq"), writers)
