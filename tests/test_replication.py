"""Replicated shards in real node processes with real etcd (issue 6): leader-follower
replication, failover after kill -9, a killed follower, a restart of everything.

Every test writes through a client while it attacks the cluster, records which writes were
acknowledged, and checks afterwards that every one of them is there."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
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
        self.prefix = ""
        """Prepended to the keys (writers sharing a collection)."""
        self.acked: list[int] = []
        self.versions: dict[str, int] = {}
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
                memory = _memory(i)
                if self.prefix:
                    memory = msgspec.structs.replace(memory, key=self.prefix + memory.key)
                (version,) = self.coll.put_many([memory])
            except memcluster.MemclusterError as exc:
                self.failures.append((time.monotonic(), repr(exc)))
                time.sleep(0.05)
                continue
            self.acked.append(i)
            self.versions[f"{self.prefix}k{i}"] = version
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


class Proxy:
    """A TCP proxy on loopback in front of etcd for one node; :meth:`cut` drops every
    connection and refuses new ones (the node is cut off from etcd, not from its peers)."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self._target = (host, int(port))
        self._cut = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self._target)
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._cut.set()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        self.cut()
        self._server.close()


def test_eventual_reads_are_served_by_followers_while_the_leader_is_down(
    cluster: Cluster,
) -> None:
    """With the leader killed and no failover yet, an eventual read through a follower
    answers from its own copy at once; a strong read waits for the new leader."""
    cluster.add_nodes("n1", "n2", "n3")
    client = cluster.client("n1", "binary")
    client.create_collection("ev", dim=4, replication_factor=3)
    first = _placed(cluster, "ev")
    assert first.leader is not None
    follower = next(n for n in first.replicas if n != first.leader)
    coll = client.collection("ev")
    coll.put_many([_memory(i) for i in range(20)])
    reader = cluster.client(follower, "binary").collection("ev")
    assert reader.get(("a",), "k7", consistency="eventual") is not None  # connected
    cluster.kill(first.leader)
    started = time.monotonic()
    got = reader.get(("a",), "k7", consistency="eventual")
    eventual_s = time.monotonic() - started
    assert got is not None
    assert got.metadata == {"i": 7}
    hits = reader.search(np.ones(4), k=20, consistency="eventual")
    assert {h.memory.key for h in hits} == {f"k{i}" for i in range(20)}
    during = _assignment(cluster, "ev")
    assert during is not None
    assert during.epoch == first.epoch, "the failover came first: the reads proved nothing"
    started = time.monotonic()
    assert reader.get(("a",), "k7") is not None  # strong: after the failover
    strong_s = time.monotonic() - started
    print(f"with the leader dead: eventual get {eventual_s * 1000:.0f} ms, strong {strong_s:.2f} s")
    assert eventual_s < 1.0


def test_a_leader_cut_off_from_etcd_stops_serving_strong_reads(
    cluster: Cluster, etcd: EtcdProcess
) -> None:
    """The leader loses etcd (not its peers): once its lease may have expired it refuses
    strong reads (ShardUnavailable) while still serving eventual ones; the controller
    promotes another replica, through which strong reads and writes go on."""
    proxies = {name: Proxy(etcd.url) for name in ("n1", "n2", "n3")}
    try:
        for name, proxy in proxies.items():
            cluster.etcd_via[name] = proxy.url
        cluster.add_nodes("n1", "n2", "n3")
        client = cluster.client("n1", "binary")
        client.create_collection("cut", dim=4, replication_factor=3)
        first = _placed(cluster, "cut")
        leader = first.leader
        assert leader is not None
        client.collection("cut").put_many([_memory(i) for i in range(10)])
        at_leader = cluster.client(leader, "binary").collection("cut")
        assert at_leader.get(("a",), "k1") is not None
        cut_at = time.monotonic()
        proxies[leader].cut()

        def refused() -> bool:
            try:
                at_leader.get(("a",), "k1")
            except memcluster.ShardUnavailable:
                return True
            return False

        cluster.wait_for(refused, 10.0, "the cut-off leader refusing strong reads")
        refused_s = time.monotonic() - cut_at
        assert at_leader.get(("a",), "k1", consistency="eventual") is not None
        other = next(n for n in first.replicas if n != leader)
        elsewhere = cluster.client(other, "binary").collection("cut")
        elsewhere.put_many([_memory(100)])
        assert elsewhere.get(("a",), "k100") is not None
        now = _assignment(cluster, "cut")
        assert now is not None
        assert now.leader not in (None, leader)
        print(f"cut off from etcd: strong reads refused after {refused_s:.2f} s")
        cluster.kill(leader)  # it cannot deregister without etcd
    finally:
        for proxy in proxies.values():
            proxy.close()


def test_a_change_feed_across_a_failover_has_every_acknowledged_write_once(
    cluster: Cluster,
) -> None:
    """A subscriber follows an RF 3 shard through a follower's node while the leader is
    killed under writes: it receives every acknowledged write exactly once, in seq order,
    and never an event of a write that the failover undid (the feed delivers only what the
    replicas acknowledged; an undone write's seq would come again with another write)."""
    from test_cluster_agents import FeedFollower, finish

    cluster.add_nodes("n1", "n2", "n3")
    client = cluster.client("n1", "binary")
    client.create_collection("feed", dim=4, replication_factor=3)
    first = _placed(cluster, "feed")
    entry = next(n for n in first.replicas if n != first.leader)
    coll = cluster.client(entry, "binary").collection("feed")
    follower = FeedFollower(coll, coll.feed_cursor(), idle_timeout_s=5.0)
    follower.start()
    try:
        with Writer(cluster.client(entry, "binary"), "feed") as writer:
            writer.wait_acked(100)
            assert first.leader is not None
            cluster.kill(first.leader)
            writer.wait_acked(len(writer.acked) + 100, timeout_s=60.0)
        acked = set(writer.versions.items())
        cluster.wait_for(lambda: acked <= follower.seen(), 30.0, "every acknowledged write")
    finally:
        finish(follower)
    assert follower.errors == []
    versions = [e.version for e in follower.events]
    assert versions == sorted(set(versions)), "an event twice, or out of order"
    final = {
        e.key: cluster.client(entry, "binary").collection("feed").get(("a",), e.key)
        for e in follower.events
    }
    phantoms = [e.key for e in follower.events if final[e.key] is None]
    assert not phantoms, f"events of writes that are not there: {phantoms[:5]}"


def test_counters_and_locks_survive_kill_9_of_the_coordination_leader(cluster: Cluster) -> None:
    """With the coordination shard on 3 nodes, kill -9 its leader while three clients
    increment one counter: no acknowledged increment is lost or given twice (the values the
    clients got are distinct, and the counter ends at least at the highest), and lock
    fencing tokens granted after the failover are above every token granted before."""
    from test_cluster_agents import Incrementer

    cluster.node_args = ["--coordination-replicas", "3"]
    cluster.add_nodes("n1", "n2", "n3")
    coordination = cluster.wait_for(
        lambda: (
            (a := _assignment(cluster, "#coordination")) is not None and len(a.in_sync) == 3 and a
        ),
        30.0,
        "the coordination shard on 3 nodes, in sync",
    )
    assert isinstance(coordination, ShardAssignment)
    assert len(coordination.replicas) == 3
    leader = coordination.leader
    assert leader is not None
    others = [n for n in ("n1", "n2", "n3") if n != leader]
    client = cluster.client(others[0], "binary")
    before = [client.acquire_lock("L", ttl_s=30, timeout_s=5) for _ in range(1)]
    client.release_lock("L", before[0])
    workers = [Incrementer(cluster.client(n, "binary"), "hits") for n in (*others, others[0])]
    for worker in workers:
        worker.start()
    try:
        cluster.wait_for(lambda: sum(len(w.values) for w in workers) >= 150, 30.0, "increments")
        killed_at = time.monotonic()
        cluster.kill(leader)
        done = sum(len(w.values) for w in workers)
        cluster.wait_for(
            lambda: sum(len(w.values) for w in workers) >= done + 150, 60.0, "increments resume"
        )
        resumed_s = time.monotonic() - killed_at
    finally:
        for worker in workers:
            worker.stop_event.set()
        for worker in workers:
            worker.join(30)
    values = [v for w in workers for v in w.values]
    assert len(values) == len(set(values)), "an increment's value was given twice"
    final = client.incr("hits", 0)
    assert final >= max(values)
    assert final <= len(values) + sum(len(w.errors) for w in workers)  # only unknown outcomes
    token = client.acquire_lock("L", ttl_s=30, timeout_s=10)
    assert token > before[0]
    after = _assignment(cluster, "#coordination")
    assert after is not None
    assert after.leader not in (None, leader)
    kinds = sorted({e.split(":")[0] for w in workers for e in w.errors})
    print(
        f"coordination leader kill -9: errors {kinds[:5]};"
        f" {len(values)} increments acknowledged,"
        f" {sum(len(w.errors) for w in workers)} failed (outcome unknown), counter {final};"
        f" 150 more within {resumed_s:.2f} s"
    )


def test_a_replica_down_past_the_grace_period_is_rebuilt_on_another_node(
    cluster: Cluster,
) -> None:
    """RF 3 on 4 nodes with a 3 s grace period: kill -9 a follower; the controller replaces
    it with the fourth node, which gets every write (read there with consistency=eventual)
    and joins the in-sync set. The dead node, back, drops its stale copy."""
    cluster.node_args = ["--rereplicate-after", "3"]
    cluster.add_nodes("n1", "n2", "n3", "n4")
    client = cluster.client("n1", "binary")
    client.create_collection("re", dim=4, replication_factor=3)
    first = _placed(cluster, "re")
    spare = next(n for n in ("n1", "n2", "n3", "n4") if n not in first.replicas)
    victim = next(n for n in first.replicas if n != first.leader)
    coll = client.collection("re")
    coll.put_many([_memory(i) for i in range(300)])
    cluster.kill(victim)
    coll.put_many([_memory(i) for i in range(300, 400)])
    rebuilt = cluster.wait_for(
        lambda: (
            (a := _assignment(cluster, "re")) is not None
            and spare in a.in_sync
            and victim not in a.replicas
            and a
        ),
        60.0,
        f"{spare} replacing {victim}",
    )
    assert isinstance(rebuilt, ShardAssignment)
    assert len(rebuilt.replicas) == 3
    at_spare = cluster.client(spare, "binary").collection("re")
    missing = [
        i for i in range(400) if at_spare.get(("a",), f"k{i}", consistency="eventual") is None
    ]
    assert not missing, f"the new replica lacks {len(missing)} writes, e.g. {missing[:5]}"
    cluster.restart(victim)
    # Back, the victim drops its stale copy; balancing may then give it a fresh one.
    settled = cluster.wait_for(
        lambda: (
            (a := _assignment(cluster, "re")) is not None
            and len(a.in_sync) == 3
            and set(a.in_sync) == set(a.replicas)
            and a
        ),
        60.0,
        "3 replicas in sync again",
    )
    assert isinstance(settled, ShardAssignment)
    if victim in settled.replicas:
        at_victim = cluster.client(victim, "binary").collection("re")
        lacking = [
            i for i in range(400) if at_victim.get(("a",), f"k{i}", consistency="eventual") is None
        ]
        assert not lacking, f"{victim}'s fresh copy lacks {len(lacking)} writes"
    else:
        kept = cluster.nodes[victim].data / "shards" / "re"
        assert not kept.exists() or not any(kept.iterdir()), "the stale copy was kept"


def test_an_idle_follower_that_dies_leaves_the_in_sync_set_without_a_write(
    cluster: Cluster,
) -> None:
    """Heartbeats: with no writes at all, a killed follower still leaves the in-sync set
    within about the ack timeout, so the next write does not have to wait for it."""
    cluster.add_nodes("n1", "n2", "n3")
    client = cluster.client("n1", "binary")
    client.create_collection("idle", dim=4, replication_factor=3)
    first = _placed(cluster, "idle")
    client.collection("idle").put_many([_memory(0)])
    follower = next(n for n in first.replicas if n != first.leader)
    killed_at = time.monotonic()
    cluster.kill(follower)
    cluster.wait_for(
        lambda: follower not in (_assignment(cluster, "idle") or first).in_sync,
        15.0,
        "the dead follower out of the in-sync set",
    )
    print(
        f"idle follower kill -9: out of the in-sync set after {time.monotonic() - killed_at:.2f} s"
    )
    started = time.monotonic()
    client.collection("idle").put_many([_memory(1)])
    assert time.monotonic() - started < 1.0


def test_session_reads_see_the_clients_own_writes_on_any_replica(cluster: Cluster) -> None:
    """ack=leader (followers lag): a client writing through one node and reading its write
    back through another with consistency="session" always sees it (the SDK carries the
    token; a replica behind it waits or the leader answers). Eventual reads may not; the
    test prints how often they did not. HTTP clients pass the token in a header."""
    cluster.add_nodes("n1", "n2", "n3")
    admin = cluster.client("n1", "binary")
    admin.create_collection("sess", dim=4, replication_factor=3, ack="leader")
    first = _placed(cluster, "sess")
    followers = [n for n in first.replicas if n != first.leader]
    writer = cluster.client(first.leader or "n1", "binary")
    reader = cluster.client(followers[0], "binary")
    stale_eventual = 0
    for i in range(150):
        writer.collection("sess").put_many([_memory(i)])
        reader.session = writer.session  # the same agent, through another node
        got = reader.collection("sess").get(("a",), f"k{i}", consistency="session")
        assert got is not None, f"session read missed write {i}"
        writer.collection("sess").put_many([_memory(1000 + i)])
        if reader.collection("sess").get(("a",), f"k{1000 + i}", consistency="eventual") is None:
            stale_eventual += 1
    hits = reader.collection("sess").search(np.ones(4), k=5, consistency="session")
    assert hits.session is not None
    print(f"session reads: 150/150 saw their write; eventual reads stale {stale_eventual}/150")
    # HTTP: the token comes back in a header and goes out in one.
    base = cluster.nodes[followers[1]].http_url
    with httpx.Client(base_url=base, timeout=10) as http:
        put = http.post(
            "/v1/collections/sess/memories",
            json={"memories": [{"namespace": ["a"], "key": "h", "vector": [1, 2, 3, 4]}]},
        )
        put.raise_for_status()
        token = put.headers["memcluster-session"]
        assert put.json()["session"] == token
        fetched = http.post(
            "/v1/collections/sess/memories/get",
            json={"namespace": ["a"], "key": "h", "consistency": "session"},
            headers={"Memcluster-Session": token},
        )
        fetched.raise_for_status()
        assert fetched.json()["memory"]["key"] == "h"
        bad = http.post(
            "/v1/collections/sess/memories/get",
            json={"namespace": ["a"], "key": "h", "consistency": "session"},
            headers={"Memcluster-Session": "%%%"},
        )
        assert bad.status_code == 400
        assert "session token" in bad.json()["message"]


def test_a_write_may_ask_for_its_own_acknowledgement_policy(cluster: Cluster) -> None:
    """ack per write: with a follower just killed (still in the in-sync set), a write with
    ack="leader" returns at once, while one with the collection's ack="all" waits until the
    leader has taken the dead follower out of the in-sync set. A bad ack is refused."""
    cluster.add_nodes("n1", "n2", "n3")
    client = cluster.client("n1", "binary")
    client.create_collection("acks", dim=4, replication_factor=3)
    first = _placed(cluster, "acks")
    coll = client.collection("acks")
    coll.put_many([_memory(0)])
    cluster.kill(next(n for n in first.replicas if n not in (first.leader, "n1")))
    started = time.monotonic()
    coll.put_many([_memory(1)], ack="leader")
    fast = time.monotonic() - started
    started = time.monotonic()
    coll.put_many([_memory(2)])
    slow = time.monotonic() - started
    print(f"with a follower just killed: ack=leader {fast * 1000:.0f} ms, ack=all {slow:.2f} s")
    assert fast < 0.5
    assert slow > fast
    with pytest.raises(memcluster.InvalidArgument, match="ack"):
        coll.put_many([_memory(3)], ack="some")


def test_draining_the_leaders_node_hands_the_lead_over_and_replaces_its_replica(
    cluster: Cluster,
) -> None:
    """RF 3 on 4 nodes: drain the leader's node under writes. Another in-sync replica takes
    the lead (a new epoch), the fourth node gets a replica and catches up, and the drained
    node ends up holding nothing; no acknowledged write is lost."""
    cluster.add_nodes("n1", "n2", "n3", "n4")
    client = cluster.client("n1", "binary")
    client.create_collection("dr", dim=4, replication_factor=3)
    first = _placed(cluster, "dr")
    leader = first.leader
    assert leader is not None
    entry = next(n for n in ("n1", "n2", "n3", "n4") if n != leader)
    with Writer(cluster.client(entry, "binary"), "dr") as writer:
        writer.wait_acked(100)
        done = cluster.cli("drain", leader, "--timeout", "60")
        assert done.returncode == 0, done.stdout + done.stderr
        writer.wait_acked(len(writer.acked) + 50)
    after = _assignment(cluster, "dr")
    assert after is not None
    assert leader not in after.replicas
    assert after.leader is not None
    assert after.epoch > first.epoch
    assert len(after.replicas) == 3
    _all_there(cluster, entry, "dr", writer.acked)
    print(f"drained {leader}: replicas {first.replicas} -> {after.replicas}")


def test_random_kills_and_restarts_under_writes_lose_nothing(cluster: Cluster, seed: int) -> None:
    """Chaos, seeded: 4 nodes, 3 shards at RF 3 (ack=all), a writer through each of two
    nodes; for about 30 s one of the other nodes is killed (-9) or stopped, and restarted a
    few seconds later, again and again. Afterwards every shard has a leader and 3 replicas
    in sync, every acknowledged write is readable, and the replicas hold them too (a sample
    read with consistency=eventual through every node)."""
    import random

    rng = random.Random(seed)
    names = ("n1", "n2", "n3", "n4")
    cluster.node_args = ["--rereplicate-after", "600"]  # the same replicas come back
    cluster.add_nodes(*names)
    admin = cluster.client("n1", "binary")
    admin.create_collection("chaos", dim=4, shards=3, replication_factor=3)
    for shard in range(3):
        _placed(cluster, "chaos", shard)
    entries = rng.sample(names, 2)
    writers = [Writer(cluster.client(n, "binary"), "chaos") for n in entries]
    for i, w in enumerate(writers):  # distinct keys per writer
        w.coll = cluster.client(entries[i], "binary").collection("chaos")
        w.prefix = f"w{i}-"
    down: str | None = None
    actions: list[str] = []
    with writers[0], writers[1]:
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(1.5, 4.0))
            if down is not None:
                cluster.restart(down)
                actions.append(f"restart {down}")
                down = None
                continue
            victim = rng.choice([n for n in names if n not in entries])
            if rng.random() < 0.7:
                cluster.kill(victim)
                actions.append(f"kill -9 {victim}")
            else:
                cluster.stop(victim)
                actions.append(f"stop {victim}")
            down = victim
        if down is not None:
            cluster.restart(down)
            actions.append(f"restart {down}")
        for w in writers:
            w.wait_acked(len(w.acked) + 20, timeout_s=60.0)
    print(f"actions: {actions}; acknowledged: {[len(w.acked) for w in writers]}")

    def settled() -> bool:
        for shard in range(3):
            a = _assignment(cluster, "chaos", shard)
            if a is None or a.leader is None or len(a.in_sync) < 3:
                return False
        return True

    cluster.wait_for(settled, 60.0, "every shard led, with 3 replicas in sync")
    reader = cluster.client(entries[0], "binary").collection("chaos")
    for w in writers:
        missing = [i for i in w.acked if reader.get(("a",), f"{w.prefix}k{i}") is None]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    # Every copy: an eventual read through a node is served by its own replica when it
    # holds one (4 nodes, 3 replicas per shard: each node holds most shards).
    for name in names:
        local = cluster.client(name, "binary").collection("chaos")
        for w in writers:
            for i in w.acked[:: max(1, len(w.acked) // 50)]:
                key = f"{w.prefix}k{i}"
                got = local.get(("a",), key, consistency="eventual")
                assert got is not None, f"the replica read through {name} lacks {key}"


def test_a_joining_node_receives_replicas_until_the_load_is_even(cluster: Cluster) -> None:
    """3 nodes hold 3 shards at RF 3 (3 replicas each); a 4th joins under writes. Replicas
    move to it one at a time (add, catch up, drop the busiest follower) until no node holds
    two more than another; every shard keeps 3 replicas, and nothing is lost."""
    cluster.add_nodes("n1", "n2", "n3")
    client = cluster.client("n1", "binary")
    client.create_collection("bal", dim=4, shards=3, replication_factor=3)
    for shard in range(3):
        _placed(cluster, "bal", shard)
    with Writer(client, "bal") as writer:
        writer.wait_acked(100)
        cluster.add_node("n4")

        def balanced() -> bool:
            held = dict.fromkeys(("n1", "n2", "n3", "n4"), 0)
            for shard in range(3):
                a = _assignment(cluster, "bal", shard)
                if a is None or len(a.replicas) != 3 or set(a.in_sync) != set(a.replicas):
                    return False
                for node in a.replicas:
                    held[node] += 1
            coordination = _assignment(cluster, "#coordination")  # counts too
            for node in coordination.replicas if coordination else ():
                held[node] += 1
            return max(held.values()) - min(held.values()) <= 1

        cluster.wait_for(balanced, 60.0, "replicas spread over 4 nodes")
        writer.wait_acked(len(writer.acked) + 50)
    _all_there(cluster, "n4", "bal", writer.acked)
    on_n4 = []
    for shard in range(3):
        a = _assignment(cluster, "bal", shard)
        if a is not None and "n4" in a.replicas:
            on_n4.append(shard)
    print(f"n4 holds replicas of shards {on_n4}")
    assert on_n4


@pytest.mark.parametrize("victim", ["head", "middle", "tail"])
def test_chain_replication_survives_kill_9_of_any_member(cluster: Cluster, victim: str) -> None:
    """replication="chain", RF 3: writes enter at the head and are acknowledged by the tail,
    strong reads go to the tail. kill -9 the head, a middle member or the tail under writes:
    the chain is repaired without it (a new epoch), writes resume, no acknowledged write is
    lost, and the member, restarted, rejoins at the end."""
    cluster.add_nodes("n1", "n2", "n3")
    client = cluster.client("n1", "binary")
    with pytest.raises(memcluster.InvalidArgument, match="chain"):
        client.create_collection(
            "bad", dim=4, replication_factor=3, replication="chain", ack="leader"
        )
    client.create_collection("ch", dim=4, replication_factor=3, replication="chain")
    first = _placed(cluster, "ch")
    order = list(first.replicas)
    assert first.leader == order[0]
    target = {"head": order[0], "middle": order[1], "tail": order[2]}[victim]
    entry = next(n for n in order if n != target)
    with Writer(cluster.client(entry, "binary"), "ch") as writer:
        writer.wait_acked(100)
        killed_at = time.monotonic()
        cluster.kill(target)
        writer.wait_acked(len(writer.acked) + 100, timeout_s=60.0)
    paused = _longest_pause(writer.ack_times, killed_at)
    after = _assignment(cluster, "ch")
    assert after is not None
    print(
        f"chain, {victim} ({target}) killed: writes paused {paused:.2f} s; chain {after.replicas}"
    )
    assert target not in after.in_sync
    assert after.epoch > first.epoch
    assert paused < 10.0
    started = time.monotonic()
    _all_there(cluster, entry, "ch", writer.acked)  # strong reads, at the tail
    print(f"{len(writer.acked)} strong reads in {time.monotonic() - started:.2f} s")
    cluster.restart(target)
    cluster.wait_for(
        lambda: target in (_assignment(cluster, "ch") or after).in_sync, 60.0, "rejoined"
    )
    again = _assignment(cluster, "ch")
    assert again is not None
    assert again.replicas[-1] == target  # it joined at the end: the new tail
    _all_there(cluster, target, "ch", writer.acked)
