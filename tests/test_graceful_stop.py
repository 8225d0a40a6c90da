"""Graceful stop (SIGTERM) of a replicated shard's leader under writes through the other nodes,
in real node processes with real etcd.

The node leaves the cluster at once (it revokes its lease), so a failover can start without
waiting for a lease to expire: writes through the surviving nodes must pause only briefly,
the stopping node must finish within its grace period, and no acknowledged write may be lost.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import memcluster
from cluster_util import Cluster, cluster_fixture
from memcluster.cluster.keys import ShardAssignment
from memcluster.core.config import Config
from test_coordinator import EtcdProcess
from test_replication import Writer, _assignment, _longest_pause, _placed

NODES = ("n1", "n2", "n3")
ROUNDS = 4
"""Even rounds stop the leader of the collection's shard, odd rounds the coordination
shard's leader (it may lead both)."""
PAUSE_MAX_S = 10.0


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    etcd = EtcdProcess(tmp_path / "etcd")
    try:
        yield from cluster_fixture(
            request, tmp_path / "cluster", etcd=etcd, name=f"g{time.monotonic_ns()}"
        )
    finally:
        etcd.stop()


class Counter(threading.Thread):
    """Increments one counter (the coordination shard) through one client until stopped,
    recording when each increment was acknowledged."""

    def __init__(self, client: memcluster.Client, key: str) -> None:
        super().__init__(daemon=True, name=f"counter-{key}")
        self.client = client
        self.key = key
        self.ack_times: list[float] = []
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.client.incr(self.key)
            except memcluster.MemclusterError as exc:  # an unknown outcome: reported
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)
                continue
            self.ack_times.append(time.monotonic())

    def wait_acked(self, n: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.ack_times) < n:
            assert time.monotonic() < deadline, f"increments stalled at {len(self.ack_times)}"
            time.sleep(0.02)


def _in_sync(cluster: Cluster, collection: str) -> ShardAssignment | None:
    a = _assignment(cluster, collection)
    if a is None or a.leader is None or set(a.in_sync) != set(NODES):
        return None
    return a


def test_sigterm_of_the_leader_under_writes_pauses_them_briefly_and_loses_none(
    cluster: Cluster, seed: int
) -> None:
    """RF 3, ack=all, the coordination shard on 3 nodes too. ``ROUNDS`` times: a writer and
    a counter through each of the two other nodes, SIGTERM the node leading the collection's
    shard (or, every other round, the coordination shard) after a random delay (seeded), and
    check that the node exits 0 within its grace period, that writes and increments resume
    within ``PAUSE_MAX_S``, and that every acknowledged write is readable (strong reads);
    restart the node and wait until it is back in sync, then stop the next leader."""
    rng = random.Random(seed)
    grace_s = Config().shutdown_grace_s
    cluster.node_args = ["--coordination-replicas", "3", "--rereplicate-after", "600"]
    cluster.add_nodes(*NODES)
    admin = cluster.client("n1", "binary")
    admin.create_collection("rep", dim=4, replication_factor=3)
    _placed(cluster, "rep")
    cluster.wait_for(lambda: _in_sync(cluster, "rep"), 30.0, "rep in sync on 3 nodes")
    cluster.wait_for(
        lambda: _in_sync(cluster, "#coordination"), 30.0, "the coordination shard in sync"
    )
    report: list[str] = []
    for round_ in range(ROUNDS):
        before = _in_sync(cluster, "rep")
        coordination = _in_sync(cluster, "#coordination")
        assert before is not None
        assert before.leader is not None
        assert coordination is not None
        assert coordination.leader is not None
        victim = before.leader if round_ % 2 == 0 else coordination.leader
        led = [
            name
            for name, a in (("rep", before), ("coordination", coordination))
            if a.leader == victim
        ]
        entries = [n for n in NODES if n != victim]
        writers = [Writer(cluster.client(n, "binary"), "rep") for n in entries]
        for i, w in enumerate(writers):
            w.prefix = f"r{round_}w{i}-"
        counters = [Counter(cluster.client(n, "binary"), "hits") for n in entries]
        for c in counters:
            c.start()
        try:
            with writers[0], writers[1]:
                for w in writers:
                    w.wait_acked(50)
                time.sleep(rng.uniform(0.0, 1.0))
                stopped_at = time.monotonic()
                code = cluster.stop(victim)
                stop_s = time.monotonic() - stopped_at
                for w in writers:
                    w.wait_acked(len(w.acked) + 50, timeout_s=60.0)
                for c in counters:
                    c.wait_acked(len(c.ack_times) + 20)
        finally:
            for c in counters:
                c.stop_event.set()
            for c in counters:
                c.join(30)
        pause = max(_longest_pause(w.ack_times, stopped_at) for w in writers)
        counter_pause = max(_longest_pause(c.ack_times, stopped_at) for c in counters)
        after = _assignment(cluster, "rep")
        after_coordination = _assignment(cluster, "#coordination")
        report.append(
            f"round {round_}: stopped {victim} (leading {', '.join(led)}) in {stop_s:.2f} s,"
            f" exit {code}; writes paused {pause:.2f} s, increments {counter_pause:.2f} s;"
            f" leaders now {after.leader if after else None},"
            f" {after_coordination.leader if after_coordination else None}"
        )
        print(report[-1])
        assert code == 0, f"{victim} exited {code}"
        assert stop_s < grace_s, f"{victim} took {stop_s:.2f} s to stop (grace {grace_s} s)"
        assert pause < PAUSE_MAX_S, report[-1]
        assert counter_pause < PAUSE_MAX_S, report[-1]
        assert after is not None
        assert after.leader not in (None, victim)
        assert after_coordination is not None
        assert after_coordination.leader not in (None, victim)
        reader = cluster.client(entries[0], "binary").collection("rep")
        for w in writers:
            missing = [i for i in w.acked if reader.get(("a",), f"{w.prefix}k{i}") is None]
            assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
        cluster.restart(victim)
        cluster.wait_for(lambda: _in_sync(cluster, "rep"), 60.0, f"{victim} back in sync")
        cluster.wait_for(
            lambda: _in_sync(cluster, "#coordination"), 60.0, "coordination back in sync"
        )
    busy = [n for n in NODES if "still busy" in cluster.nodes[n].log.read_text(errors="replace")]
    print("\n".join(report))
    assert not busy, f"nodes that stopped with requests still busy: {busy}"
