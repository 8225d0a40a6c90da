"""The shards of a cluster node (``cluster/host.py``): states, and the shard transfer that a
move is made of, checked in one process between two hosts (no network, no etcd).

A move copies the source's snapshot, then its WAL tail while writes go on, then freezes the
source (writes refused with WrongNode) and copies the last records. The copy must then equal
the source exactly: every acknowledged write, with its version."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest

from memcluster.cluster.host import ShardHost, State
from memcluster.cluster.keys import COORDINATION
from memcluster.core.clock import ManualClock
from memcluster.core.config import Config
from memcluster.core.errors import StaleToken, WrongNode
from memcluster.core.types import CollectionConfig, Memory
from memcluster.index.filters import compile_filter

COLL = CollectionConfig(name="m", dim=4, shards=2)


def _host(path: Path) -> ShardHost:
    return ShardHost(path / "shards", Config(background=False), ManualClock())


def _memories(start: int, n: int) -> list[Memory]:
    return [
        Memory(
            namespace=("a",),
            key=f"k{i}",
            vector=np.array([1.0, i % 7, i % 3, 1.0], dtype=np.float32),
            metadata={"i": i},
        )
        for i in range(start, start + n)
    ]


def _contents(host: ShardHost, shard: int) -> dict[str, tuple[int, dict[str, object]]]:
    items = host.list_page([("m", shard)], (), compile_filter(None), None, 100_000)
    return {m.key: (m.version, m.metadata) for m in items}


def _transfer(source: ShardHost, target: ShardHost, shard: int, during: threading.Event) -> int:
    """What DataPlane.pull does, minus the network: returns the final applied seq."""
    transfer, seq, sizes = source.transfer_begin(("m", shard))
    files = {
        name: source.transfer_read(transfer, name, 0, size + 1) for name, size in sizes.items()
    }
    source.transfer_end(transfer)
    target.install_snapshot(("m", shard), COLL, seq, files)
    applied = seq
    for _ in range(5):  # catch up while writes go on
        records, _ = source.tail(("m", shard), applied, 7)
        applied = target.apply(("m", shard), records) if records else applied
    during.set()
    final = source.freeze(("m", shard))
    while applied < final:
        records, _ = source.tail(("m", shard), applied, 7)
        applied = target.apply(("m", shard), records)
    target.ready(("m", shard))
    return applied


def test_states_gate_writes_but_not_reads(tmp_path: Path) -> None:
    host = _host(tmp_path)
    try:
        host.open(COLL, 0)
        host.put("m", {0: _memories(0, 3)}, None)
        host.freeze(("m", 0))
        with pytest.raises(WrongNode, match="m/0000 is frozen"):
            host.put("m", {0: _memories(3, 1)}, None)
        with pytest.raises(WrongNode):
            host.delete(("m", 0), [(("a",), "k0")])
        assert host.get(("m", 0), ("a",), "k1") is not None  # reads go on
        host.activate(("m", 0))
        host.put("m", {0: _memories(3, 1)}, None)
        with pytest.raises(WrongNode, match="does not hold shard m/0001"):
            host.get(("m", 1), ("a",), "k0")
        host.drop(("m", 0))
        assert host.on_disk() == []
        with pytest.raises(WrongNode):
            host.get(("m", 0), ("a",), "k0")
    finally:
        host.close()


@pytest.mark.parametrize("snapshot_first", [False, True])
def test_a_transfer_under_writes_copies_every_acknowledged_write(
    tmp_path: Path, seed: int, snapshot_first: bool
) -> None:
    rng = random.Random(seed)
    source, target = _host(tmp_path / "a"), _host(tmp_path / "b")
    try:
        source.open(COLL, 1)
        source.put("m", {1: _memories(0, 50)}, None)
        if snapshot_first:
            source.reader(("m", 1)).snapshot()
            source.put("m", {1: _memories(50, 20)}, None)
        acked: dict[str, int] = {}
        refused = 0
        frozen = threading.Event()

        def write() -> None:
            nonlocal refused
            i = 1000
            while True:
                memory = _memories(rng.randrange(0, 2000), 1)
                try:
                    version = source.put("m", {1: memory}, None)[1][0]
                except WrongNode:
                    refused += 1
                    if frozen.is_set():
                        return
                    continue
                acked[memory[0].key] = version
                i += 1

        writer = threading.Thread(target=write)
        writer.start()
        _transfer(source, target, 1, frozen)
        writer.join()
        assert refused >= 1
        assert target.states()[("m", 1)] is State.READY
        with pytest.raises(WrongNode):  # serves only once the map names it
            target.put("m", {1: _memories(0, 1)}, None)
        target.activate(("m", 1))
        copied = _contents(target, 1)
        assert copied == _contents(source, 1)
        for key, version in acked.items():
            assert copied[key][0] >= version, key
        target.put("m", {1: _memories(0, 1)}, None)
    finally:
        source.close()
        target.close()


def test_a_copy_survives_a_restart_of_its_node(tmp_path: Path) -> None:
    source, target = _host(tmp_path / "a"), _host(tmp_path / "b")
    source.open(COLL, 0)
    source.put("m", {0: _memories(0, 30)}, None)
    source.reader(("m", 0)).snapshot()
    source.put("m", {0: _memories(30, 5)}, None)
    _transfer(source, target, 0, threading.Event())
    target.activate(("m", 0))
    expected = _contents(source, 0)
    source.close()
    target.close()
    again = _host(tmp_path / "b")
    try:
        assert again.on_disk() == [("m", 0)]
        again.reopen(("m", 0))
        assert _contents(again, 0) == expected
    finally:
        again.close()


def test_the_coordination_shard_moves_with_its_locks_and_counters(tmp_path: Path) -> None:
    source, target = _host(tmp_path / "a"), _host(tmp_path / "b")
    try:
        source.open_coordination()
        coord = source.coordination()
        token = coord.acquire_lock("L", 30.0, 1.0)
        assert coord.incr("c", 5) == 5
        waiter_error: list[BaseException] = []

        def wait_for_lock() -> None:
            try:
                coord.acquire_lock("L", 30.0, 10.0)
            except BaseException as exc:
                waiter_error.append(exc)

        waiter = threading.Thread(target=wait_for_lock)
        waiter.start()
        transfer, seq, sizes = source.transfer_begin(COORDINATION)
        files = {n: source.transfer_read(transfer, n, 0, s + 1) for n, s in sizes.items()}
        target.install_snapshot(COORDINATION, None, seq, files)
        final = source.freeze(COORDINATION)
        records, _ = source.tail(COORDINATION, seq, 1000)
        assert target.apply(COORDINATION, records) == final
        waiter.join(5)
        assert isinstance(waiter_error[0], WrongNode)  # the waiter asks the new holder
        with pytest.raises(WrongNode):
            coord.incr("c")
        target.ready(COORDINATION)
        target.activate(COORDINATION)
        moved = target.coordination()
        assert moved.counter("c") == 5
        assert moved.incr("c") == 6
        moved.release_lock("L", token)  # the token holds on the new node
        assert moved.acquire_lock("L", 30.0, 1.0) > token
    finally:
        source.close()
        target.close()


def test_a_shard_refuses_writes_under_a_lower_fencing_token(tmp_path: Path) -> None:
    """In a cluster the lock lives on another node: each shard records the highest token
    that wrote under a lock (a FenceOp in its WAL) and refuses lower ones, across restarts."""
    host = _host(tmp_path)
    host.open(COLL, 0)
    host.put("m", {0: _memories(0, 1)}, None, ("L", 5))
    host.put("m", {0: _memories(1, 1)}, None, ("L", 5))  # the same holder again
    host.put("m", {0: _memories(2, 1)}, None, ("other", 1))  # another lock: independent
    with pytest.raises(StaleToken, match="token 3 is stale: token 5"):
        host.put("m", {0: _memories(3, 1)}, None, ("L", 3))
    host.put("m", {0: _memories(4, 1)}, None, ("L", 9))
    with pytest.raises(StaleToken):
        host.delete(("m", 0), [(("a",), "k0")], ("L", 5))
    assert host.get(("m", 0), ("a",), "k0") is not None  # the refused delete did nothing
    assert host.get(("m", 0), ("a",), "k3") is None  # nor the refused put
    host.reader(("m", 0)).snapshot()
    host.put("m", {0: _memories(5, 1)}, None, ("L", 11))  # after the snapshot: in the WAL
    host.close()
    again = _host(tmp_path)
    try:
        again.reopen(("m", 0))
        with pytest.raises(StaleToken):
            again.put("m", {0: _memories(6, 1)}, None, ("L", 10))
        again.put("m", {0: _memories(6, 1)}, None, ("L", 11))
    finally:
        again.close()


def test_versions_of_memories_moving_in_continue_above_their_old_version(
    tmp_path: Path,
) -> None:
    """A memory moving to a shard whose seqs are behind keeps counting up (a VersionOp): its
    version never goes back, so an ``if_version`` read before a move cannot match after it.
    The offset survives a snapshot and a WAL replay, and the transfer target gets it too."""
    host = _host(tmp_path)
    host.open(COLL, 0)
    host.open(COLL, 1)
    (v1,) = host.put("m", {1: _memories(0, 1)}, None, version_floors={1: 500})[1]
    assert v1 > 500
    (v2,) = host.put("m", {1: _memories(1, 1)}, None)[1]
    assert v2 == v1 + 1  # later writes stay above
    (v0,) = host.put("m", {0: _memories(2, 1)}, None, version_floors={0: 0})[0]
    assert v0 == 1  # no floor needed: versions are seqs
    (low,) = host.put("m", {1: _memories(3, 1)}, None, version_floors={1: 3})[1]
    assert low == v2 + 1  # a floor below the shard's versions changes nothing
    host.reader(("m", 1)).snapshot()
    (v3,) = host.put("m", {1: _memories(4, 1)}, None, version_floors={1: 10_000})[1]
    assert v3 > 10_000
    before = _contents(host, 1)
    host.close()
    again = _host(tmp_path)
    try:
        again.reopen(("m", 1))
        assert _contents(again, 1) == before
        (v4,) = again.put("m", {1: _memories(5, 1)}, None)[1]
        assert v4 == v3 + 1
        again.reader(("m", 1)).validate()
        target = _host(tmp_path / "target")
        try:
            _transfer(again, target, 1, threading.Event())
            target.activate(("m", 1))
            assert _contents(target, 1) == _contents(again, 1)
            assert target.reader(("m", 1)).version_high == again.reader(("m", 1)).version_high
        finally:
            target.close()
    finally:
        again.close()


def test_the_change_feed_stops_at_what_the_replicas_acknowledged(tmp_path: Path) -> None:
    """A replicated shard's leader sets ``visible_upto``: the feed never delivers a change
    beyond it (from memory or from the WAL), so no subscriber sees a write a failover undoes."""
    host = _host(tmp_path)
    try:
        host.open(COLL, 0)
        shard = host.reader(("m", 0))
        for i in range(6):
            host.put("m", {0: _memories(i, 1)}, None)
        visible = 3
        shard.visible_upto = lambda: visible
        assert [c[0] for c in shard.changes(0, 100)] == [1, 2, 3]
        assert shard.changes(3, 100) == []
        visible = 5
        assert [c[0] for c in shard.changes(3, 100)] == [4, 5]
        shard._feed.clear()  # as if the memory buffer rolled over: read from the WAL
        visible = 4
        assert [c[0] for c in shard.changes(0, 100)] == [1, 2, 3, 4]
    finally:
        host.close()
