"""A seeded simulation of multi-leader replication (``replication/multi.py`` scheduling the
exchanges, ``shard/lww.py`` and the real :class:`Shard` applying them).

Three replicas, each a real shard on an in-memory WAL with its own wall clock (skewed by up
to a second, so the hybrid logical clock matters), take puts, deletes and puts with a TTL at
random. A network delivers pushes and pulls with delays, drops, duplicates and partitions;
replicas crash (unsynced WAL records are lost: nothing acknowledged, since every write is
fsynced first) and restart with their exchange state forgotten. Small WAL segments and
snapshots make replicas that fall behind need a state transfer.

Checks: at every step, no replica's version vector goes back, a write acknowledged with
``W = 2`` copies is on another replica, and a replica reads its own write back (its stamp is
above everything it has seen, whatever its clock's skew); once the faults stop and the
network heals, every replica holds the same version vector, stamps and memories, and those
are what the model says: for each key, the write with the highest (hlc, origin) stamp over
every write ever acknowledged (absent if that is a delete or has expired). Runs with
last-writer-wins or the HLC's receive rule disabled must break this for some seed, or the
checks mean nothing. A failing seed replays exactly (``MEMCLUSTER_SEED``).
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memcluster.core.clock import ManualClock
from memcluster.core.codec import MergeOp, Record, StampedDeleteOp, StampedPutOp
from memcluster.core.config import Config
from memcluster.core.types import CollectionConfig, Replication
from memcluster.replication.multi import (
    Exchange,
    Kind,
    MultiSync,
    answer_pull,
    answer_push,
)
from memcluster.shard.lww import Lww
from memcluster.shard.shard import PreparedPut, Shard
from memcluster.storage.snapshot import SnapshotStore
from memcluster.storage.wal import MemoryWal

NAMES = ["a", "b", "c"]
NEW_ORIGIN_EACH_LIFE = True
"""As ``cluster.multi.MultiDriver`` names a replica; the test below turns it off."""
KEYS = [f"k{i}" for i in range(12)]
LIMIT = 8
TIMEOUT = 0.5
BASE = 1_700_000_000.0
COLL = CollectionConfig(name="m", dim=2, replication=Replication.MULTI, replication_factor=3)
CONFIG = Config(
    background=False,
    graph=False,
    wal_segment_bytes=2048,
    snapshot_wal_bytes=4096,
    feed_retention_events=16,
)


@dataclass
class Node:
    name: str
    skew: float
    wal: MemoryWal
    snaps: Any
    clock: ManualClock
    shard: Shard
    sync: MultiSync
    up: bool = True
    life: int = 0
    vv_seen: dict[str, int] = field(default_factory=dict)


@dataclass
class Write:
    key: str
    stamp: tuple[int, str, int]
    text: str | None
    expires_at: float | None
    node: str
    origin: str
    oseq: int


def _open(node: Node) -> None:
    """Open the node's replica under a new origin name, as a node does every time."""
    node.shard = Shard.open(COLL, CONFIG, node.wal, node.clock, snapshots=node.snaps)
    assert node.shard.lww is not None
    origin = f"{node.name}~{node.life}" if NEW_ORIGIN_EACH_LIFE else node.name
    node.shard.lww.me = origin
    node.sync = MultiSync(node.name, NAMES, origin=origin, interval_s=0.3, backoff_max_s=1.0)


def _contents(node: Node) -> dict[str, str]:
    out = {}
    for key in KEYS:
        memory = node.shard.get(("ns",), key)
        if memory is not None:
            assert memory.text is not None
            out[key] = memory.text
    return out


def run(seed: int, *, steps: int = 1500) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _run(seed, steps, Path(tmp))


def _run(seed: int, steps: int, root: Path) -> None:
    rng = random.Random(seed)
    now = 0.0
    nodes: dict[str, Node] = {}
    for name in NAMES:
        skew = rng.uniform(-1.0, 1.0)
        clock = ManualClock(BASE + skew)
        snaps = SnapshotStore(root / name)
        node = Node(name, skew, MemoryWal(CONFIG), snaps, clock, None, None)  # type: ignore[arg-type]
        _open(node)
        nodes[name] = node
    events: list[tuple[float, int, Callable[[], None]]] = []
    counter = itertools.count()
    cut: set[frozenset[str]] = set()
    writes: list[Write] = []
    acked: list[tuple[Write, int]] = []  # (write, W) acknowledged with W copies
    pending_acks: list[tuple[Write, int]] = []
    stats = dict.fromkeys(
        ["writes", "crashes", "wipes", "state pages", "records pulled", "W=2 acks"], 0
    )

    def at(t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(events, (t, next(counter), fn))

    def link(a: str, b: str) -> bool:
        return frozenset((a, b)) not in cut and nodes[a].up and nodes[b].up

    def exchange(node: Node, ex: Exchange, faults: bool) -> None:
        life = node.life
        peer = nodes[ex.peer]
        drop = faults and rng.random() < 0.1
        d1, d2 = rng.uniform(0.001, 0.05), rng.uniform(0.001, 0.05)
        outcome: dict[str, Any] = {}
        if ex.kind is Kind.PUSH:
            records = node.shard.missing(node.sync.known(ex.peer) or {}, LIMIT)
            if records is None:  # the peer needs a state transfer: pulls do it
                node.sync.done(ex, now, node.sync.known(ex.peer) or {})
                return
            payload: Any = records
        else:
            payload = node.sync.pull_request(ex.peer, node.shard.version_vector())

        def deliver() -> None:
            if drop or not link(node.name, ex.peer):
                return
            if ex.kind is Kind.PUSH:
                outcome["reply"] = answer_push(peer.shard, payload)
            else:
                outcome["reply"] = answer_pull(peer.shard, payload, LIMIT)

        def respond() -> None:
            if node.life != life or not node.up:
                return
            if (
                "reply" not in outcome
                or not link(node.name, ex.peer)
                or (faults and rng.random() < 0.05)
            ):
                node.sync.failed(ex, now)
                return
            if ex.kind is Kind.PUSH:
                node.sync.done(ex, now, outcome["reply"])
            else:
                reply = outcome["reply"]
                stats["state pages"] += reply.page is not None
                stats["records pulled"] += len(reply.records)
                node.shard.apply_remote(node.sync.records_of(ex, reply, node.clock.time()))
                node.sync.pulled(ex, reply, now, LIMIT)

        at(now + d1, deliver)
        if faults and rng.random() < 0.05:
            at(now + d1 + 0.01, deliver)  # a duplicate
        at(now + d1 + d2 if not drop else now + TIMEOUT, respond)

    def write(node: Node) -> None:
        key = rng.choice(KEYS)
        shard = node.shard
        roll = rng.random()
        before = shard.last_written
        if roll < 0.2:
            shard.delete(("ns",), key)
            text = None
            expires = None
        else:
            text = f"{node.name}-{len(writes)}"
            ttl = rng.uniform(0.05, 2.0) if roll > 0.9 else None
            shard.put(
                [
                    PreparedPut(
                        ("ns",),
                        key,
                        text,
                        np.ones(2, np.float32),
                        b"{}",
                        ttl_s=ttl,
                        if_version=None,
                    )
                ]
            )
            expires = None if ttl is None else node.clock.time() + ttl
            # A write after what this replica holds wins here (the HLC moved past every
            # stamp it has seen, whatever the skew of its wall clock).
            memory = shard.get(("ns",), key)
            assert memory is not None, f"{node.name} lost its own {key}"
            assert memory.text == text, f"{node.name} lost its own {key}"
        record = shard.last_written
        assert record is not before, "a delete of an absent key still writes its tombstone"
        assert record.origin == node.sync.origin
        for op in record.ops:
            if isinstance(op, StampedPutOp | StampedDeleteOp) and op.key == key:
                stamp = (op.hlc, op.origin, int(isinstance(op, StampedDeleteOp)))
                assert record.origin is not None
                w = Write(key, stamp, text, expires, node.name, record.origin, record.oseq)
                writes.append(w)
                node.sync.wrote()
                if rng.random() < 0.3:
                    pending_acks.append((w, 2))
                return
        raise AssertionError(f"the write of {key} is not in its record {record}")

    def check_step() -> None:
        for node in nodes.values():
            if not node.up:
                continue
            vv = node.shard.version_vector()
            for origin, oseq in node.vv_seen.items():
                assert vv.get(origin, 0) >= oseq, f"{node.name}'s version vector went back"
            node.vv_seen = vv
        for w, quorum in list(pending_acks):
            node = nodes[w.node]
            if not node.up or node.sync.origin != w.origin:
                pending_acks.remove((w, quorum))  # the writer crashed: never acknowledged
            elif node.sync.copies(w.oseq) >= quorum:
                pending_acks.remove((w, quorum))
                acked.append((w, quorum))
                stats["W=2 acks"] += 1
                holders = [n for n in nodes.values() if n.vv_seen.get(w.origin, 0) >= w.oseq]
                assert len(holders) >= quorum, f"acknowledged with {quorum} copies: {holders}"

    def advance(dt: float, faults: bool) -> None:
        nonlocal now
        target = now + dt
        while events and events[0][0] <= target:
            t, _, fn = heapq.heappop(events)
            for node in nodes.values():
                node.clock.advance(max(0.0, t - now))
            now = t
            fn()
        for node in nodes.values():
            node.clock.advance(target - now)
        now = target
        for node in nodes.values():
            if node.up:
                for ex in node.sync.due(now):
                    exchange(node, ex, faults)
                if rng.random() < 0.05:
                    node.shard.sweep_expired()
                if rng.random() < 0.004:
                    node.shard.snapshot()

    for _ in range(steps):
        roll = rng.random()
        up = [n for n in nodes.values() if n.up]
        if roll < 0.3 and up:
            write(rng.choice(up))
        elif roll < 0.305 and len(up) > 1:
            victim = rng.choice(up)
            victim.up = False
            victim.life += 1
            victim.shard.close()
            victim.wal.crash()
            stats["crashes"] += 1
        elif roll < 0.33:
            down = [n for n in nodes.values() if not n.up]
            if down:
                node = rng.choice(down)
                node.up = True
                _open(node)
        elif roll < 0.34:
            a, b = rng.sample(NAMES, 2)
            cut.symmetric_difference_update({frozenset((a, b))})
        elif roll < 0.342 and len(up) == len(nodes):
            # Wipe a node whose every write another node holds, and start its replica again
            # empty under the same node name (a replica rebuilt there): it must catch up.
            victim = rng.choice(up)
            mine = victim.shard.version_vector()
            others = [n.shard.version_vector() for n in nodes.values() if n is not victim]
            if all(max(v.get(o, 0) for v in others) >= s for o, s in mine.items()):
                victim.shard.close()
                victim.life += 1
                victim.wal = MemoryWal(CONFIG)
                victim.snaps = SnapshotStore(root / f"{victim.name}-{victim.life}")
                victim.vv_seen = {}
                _open(victim)
                stats["wipes"] += 1
        advance(0.01, faults=True)
        check_step()
    # heal
    cut.clear()
    for node in nodes.values():
        if not node.up:
            node.up = True
            node.life += 1
            _open(node)
    for _ in range(3000):
        advance(0.01, faults=False)
        check_step()
        now_vvs = [n.shard.version_vector() for n in nodes.values()]
        if all(v == now_vvs[0] for v in now_vvs) and not events:
            break
    vvs = {n.name: n.shard.version_vector() for n in nodes.values()}
    assert len({tuple(sorted(v.items())) for v in vvs.values()}) == 1, f"not converged: {vvs}"
    stamps = [n.shard.lww.stamps for n in nodes.values() if n.shard.lww is not None]
    assert all(s == stamps[0] for s in stamps), "equal version vectors, different stamps"
    for node in nodes.values():
        node.shard.validate()
    # Reads filter expired memories by each replica's own (skewed) clock, and a sweep on a
    # replica whose clock runs ahead removes a memory early for everyone: a key whose
    # winning put expires between the slowest and the fastest clock may read either way.
    clocks = [n.clock.time() for n in nodes.values()]
    best: dict[str, Write] = {}
    for w in writes:
        if w.key not in best or w.stamp > best[w.key].stamp:
            best[w.key] = w
    for node in nodes.values():
        got = _contents(node)
        for key in KEYS:
            winner = best.get(key)
            expires = None if winner is None else winner.expires_at
            if expires is not None and min(clocks) - 1e-6 <= expires <= max(clocks) + 1e-6:
                continue
            gone = winner is None or (expires is not None and expires < min(clocks))
            want = None if gone or winner is None else winner.text
            assert got.get(key) == want, f"{node.name}: {key} is {got.get(key)}, wins: {winner}"
    stats["writes"] = len(writes)
    print(f"seed {seed}: {stats}")
    for node in nodes.values():
        node.shard.close()


def _seeds(default: range) -> Iterator[int]:
    env = os.environ.get("MEMCLUSTER_SEED")
    return iter([int(env)] if env else default)


def test_multi_leader_replicas_converge_to_last_writer_wins() -> None:
    for seed in _seeds(range(60)):
        run(seed)


def _breaks(seeds: range) -> int:
    failures = 0
    for seed in seeds:
        try:
            run(seed, steps=800)
        except AssertionError:
            failures += 1
    return failures


def test_without_last_writer_wins_replicas_diverge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Lww, "wins", lambda self, key, stamp: True)
    failures = _breaks(range(30))
    print(f"last-writer-wins disabled: {failures}/30 runs caught")
    assert failures > 0


def test_without_the_clock_observing_others_a_later_write_loses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Lww, "observe", lambda self, hlc: None)
    failures = _breaks(range(30))
    print(f"HLC receive rule disabled: {failures}/30 runs caught")
    assert failures > 0


def test_reusing_an_origin_name_after_a_crash_or_wipe_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica that starts again under its old origin name numbers new writes with
    (origin, oseq) pairs its peers may hold already (lost unsynced records, or a wiped
    copy): they drop the new writes and count them as held."""
    monkeypatch.setattr(sys.modules[__name__], "NEW_ORIGIN_EACH_LIFE", False)
    failures = _breaks(range(30))
    print(f"origin names reused: {failures}/30 runs caught")
    assert failures > 0


def test_a_replica_restarted_after_a_state_transfer_sends_state_not_a_broken_log(
    tmp_path: Path,
) -> None:
    """A state transfer merges writes the WAL does not hold as records: after a restart the
    replica must still know it cannot ship them as records (it sends its state instead)."""
    clock = ManualClock(BASE)

    def shard(name: str, wal: MemoryWal) -> Shard:
        opened = Shard.open(COLL, CONFIG, wal, clock, snapshots=SnapshotStore(tmp_path / name))
        assert opened.lww is not None
        opened.lww.me = name
        return opened

    giver = shard("a", MemoryWal(CONFIG))
    for i in range(10):
        vector = np.ones(2, np.float32)
        giver.put([PreparedPut(("ns",), f"k{i}", str(i), vector, b"{}", None, None)])
    wal = MemoryWal(CONFIG)
    taker = shard("c", wal)
    records = giver.missing({}, 3)
    assert records is not None
    taker.apply_remote(records)
    ops, last, vv = giver.state_page(None, 100)
    assert last is None
    taker.apply_remote([Record(0, BASE, [*ops, MergeOp(vv)])])
    assert taker.version_vector() == {"a": 10}
    taker.close()
    wal.crash()  # reopen: what was synced (everything: apply_remote syncs)
    taker = shard("c", wal)
    assert taker.version_vector() == {"a": 10}
    assert taker.missing({"a": 5}, 10) is None  # not an IndexError
    assert taker.missing({"a": 10}, 10) == []
    taker.validate()


def test_a_peer_that_shows_it_is_up_is_tried_at_once_despite_its_backoff() -> None:
    """After failures a peer is left alone for a while; a write that needs its copy would
    wait that out. Once it shows it is up (it sends an exchange), it is tried at once."""
    sync = MultiSync("a", ["a", "b"], origin="a~0", interval_s=0.5, backoff_max_s=5.0)
    pull = sync.due(0.0)
    assert pull == [Exchange(Kind.PULL, "b")]
    sync.done(pull[0], 0.0, {})
    now = 0.0
    for _ in range(5):  # b dies: the exchanges fail and back off up to 5 s
        now += 5.0
        for ex in sync.due(now):
            sync.failed(ex, now)
    sync.wrote()
    assert sync.due(now + 1.0) == []  # backing off
    sync.alive("b")
    assert {ex.kind for ex in sync.due(now + 1.0)} == {Kind.PUSH, Kind.PULL}
