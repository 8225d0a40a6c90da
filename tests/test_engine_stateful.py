"""The engine against a simple model: a dict plus exact search.

Goal: any sequence of puts, batches, conditional writes, deletes, TTL expiries, background
steps, snapshots, clean reopens and crashes leaves the engine answering exactly like the model.
Method: a hypothesis rule-based state machine drives a real on-disk database (real WAL files)
and a dict; after every step every memory, the count and a few searches are compared. The
graph is the exact in-memory twin (``Config(graph=False)``) with ``exact_items_max=0``, so the
graph code path (buffer, sealing, pending deletes, re-fetch) runs and answers are exact.
A "crash" abandons the database without closing it: everything written to the OS survives,
as after kill -9 (power loss is covered by the WAL tests). Hypothesis prints the failing steps
and a reproduction blob; ``--hypothesis-seed=N`` replays a run.
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import memcluster
from memcluster import Memory
from memcluster.core.clock import ManualClock
from memcluster.core.config import Config

DIM = 4
NAMESPACES = [("a",), ("a", "x"), ("b",)]
KEYS = [f"k{i}" for i in range(6)]
CONFIG = Config(
    background=False,
    graph=False,
    exact_items_max=0,
    exact_filter_items_max=0,
    seal_chunk_items=3,
    wal_segment_bytes=2048,
)

vectors = st.lists(st.integers(-4, 4).map(float), min_size=DIM, max_size=DIM).filter(
    lambda v: any(v)
)
names = st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(KEYS))


class Model:
    """What the engine should hold: (namespace, key) -> memory fields."""

    def __init__(self) -> None:
        self.items: dict[tuple[tuple[str, ...], str], dict[str, Any]] = {}

    def live(self, now: float) -> dict[tuple[tuple[str, ...], str], dict[str, Any]]:
        return {
            k: v for k, v in self.items.items() if v["expires_at"] is None or v["expires_at"] > now
        }

    def version(self, key: tuple[tuple[str, ...], str], now: float) -> int:
        item = self.live(now).get(key)
        return 0 if item is None else int(item["version"])


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="mc-stateful-"))
        self.clock = ManualClock()
        self.model = Model()
        self.db = memcluster.open(self.dir, CONFIG, clock=self.clock)
        self.coll = self.db.create_collection("m", dim=DIM, metric="dot", shards=2)

    def teardown(self) -> None:
        self.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- writes ------------------------------------------------------------------------------

    def _expect(self, key: tuple[tuple[str, ...], str], if_version: int | None) -> bool:
        return if_version is None or if_version == self.model.version(key, self.clock.time())

    @rule(
        name=names,
        vector=vectors,
        ttl=st.none() | st.sampled_from([1.0, 5.0]),
        cond=st.sampled_from(["none", "absent", "current", "stale"]),
        tag=st.integers(0, 3),
    )
    def put(
        self,
        name: tuple[tuple[str, ...], str],
        vector: list[float],
        ttl: float | None,
        cond: str,
        tag: int,
    ) -> None:
        now = self.clock.time()
        current = self.model.version(name, now)
        if_version = {"none": None, "absent": 0, "current": current, "stale": current + 1}[cond]
        try:
            version = self.coll.put(
                name[0],
                name[1],
                vector=vector,
                metadata={"tag": tag},
                ttl_s=ttl,
                if_version=if_version,
            )
        except memcluster.VersionConflict as exc:
            assert not self._expect(name, if_version)
            assert exc.actual == current  # noqa: PT017
            return
        assert self._expect(name, if_version)
        assert version > current
        self.model.items[name] = {
            "vector": np.array(vector, dtype=np.float32),
            "tag": tag,
            "version": version,
            "expires_at": None if ttl is None else now + ttl,
        }

    @rule(
        batch=st.lists(st.tuples(names, vectors), min_size=1, max_size=6, unique_by=lambda t: t[0]),
        idem=st.none() | st.sampled_from(["i1", "i2"]),
    )
    def put_many(
        self, batch: list[tuple[tuple[tuple[str, ...], str], list[float]]], idem: str | None
    ) -> None:
        if idem is not None:
            return self._put_many_idempotent(batch, idem)
        now = self.clock.time()
        versions = self.coll.put_many(
            [Memory(namespace=n[0], key=n[1], vector=v, metadata={"tag": 9}) for n, v in batch]
        )
        for (name, vector), version in zip(batch, versions, strict=True):
            self.model.items[name] = {
                "vector": np.array(vector, dtype=np.float32),
                "tag": 9,
                "version": version,
                "expires_at": None,
            }
        assert all(v > 0 for v in versions)
        del now

    def _put_many_idempotent(
        self, batch: list[tuple[tuple[tuple[str, ...], str], list[float]]], idem: str
    ) -> None:
        # Keyed batches are always the same content per key, so a retry is a true retry.
        fixed = [((("idem",), f"{idem}-{i}"), [1.0, float(i), 0.0, 1.0]) for i in range(3)]
        versions = self.coll.put_many(
            [Memory(namespace=n[0], key=n[1], vector=v, metadata={"tag": 7}) for n, v in fixed],
            idempotency_key=idem,
        )
        for (name, vector), version in zip(fixed, versions, strict=True):
            if name not in self.model.items:
                self.model.items[name] = {
                    "vector": np.array(vector, dtype=np.float32),
                    "tag": 7,
                    "version": version,
                    "expires_at": None,
                }
            assert self.model.items[name]["version"] == version
        del batch

    @rule(name=names)
    def delete(self, name: tuple[tuple[str, ...], str]) -> None:
        existed = self.coll.delete(name[0], name[1])
        assert existed == (name in self.model.live(self.clock.time()))
        self.model.items.pop(name, None)

    @rule(tag=st.integers(0, 3))
    def delete_where(self, tag: int) -> None:
        now = self.clock.time()
        doomed = [k for k, v in self.model.live(now).items() if v["tag"] == tag]
        assert self.coll.delete_where(filter={"tag": tag}) == len(doomed)
        for k in doomed:
            del self.model.items[k]

    # -- time, background, restarts --------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.5, 2.0, 6.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def maintain(self) -> None:
        self.db.maintain()
        now = self.clock.time()
        self.model.items = self.model.live(now)  # the sweep deleted the expired ones

    @rule()
    def seal_one_chunk(self) -> None:
        for shard in self.coll._shards:
            shard.seal()

    @rule()
    def snapshot(self) -> None:
        for shard in self.coll._shards:
            shard.snapshot()

    @rule()
    def reopen(self) -> None:
        self.db.close()
        self.db = memcluster.open(self.dir, CONFIG, clock=self.clock)
        self.coll = self.db.collection("m")

    @rule()
    def crash(self) -> None:
        """Abandon the database without syncing or closing the WAL (like kill -9)."""
        db = self.db
        for shard in self.coll._shards:
            shard._closed = True
        fcntl.flock(db._lock_file, fcntl.LOCK_UN)
        db._lock_file.close()
        db._closed = True
        self.db = memcluster.open(self.dir, CONFIG, clock=self.clock)
        self.coll = self.db.collection("m")

    # -- checks --------------------------------------------------------------------------------

    @invariant()
    def shard_invariants_hold(self) -> None:
        for shard in self.coll._shards:
            shard.validate()

    @invariant()
    def every_memory_matches_the_model(self) -> None:
        now = self.clock.time()
        live = self.model.live(now)
        assert self.coll.count() == len(live)
        for name in [(ns, k) for ns in NAMESPACES for k in KEYS]:
            got = self.coll.get(name[0], name[1])
            want = live.get(name)
            if want is None:
                assert got is None, name
            else:
                assert got is not None, name
                assert got.version == want["version"]
                assert got.metadata == {"tag": want["tag"]}
                np.testing.assert_array_equal(got.vector, want["vector"])

    @precondition(lambda self: True)
    @invariant()
    def search_matches_exact_search(self) -> None:
        now = self.clock.time()
        live = self.model.live(now)
        for query in ([1.0, 0.5, -0.25, 2.0], [-1.0, 3.0, 0.0, 0.5]):
            q = np.array(query, dtype=np.float32)
            for prefix, flt in (((), None), (("a",), None), ((), {"tag": {"$in": [1, 2]}})):
                candidates = [
                    (float(v["vector"] @ q), k)
                    for k, v in live.items()
                    if k[0][: len(prefix)] == prefix and (flt is None or v["tag"] in (1, 2))
                ]
                hits = self.coll.search(vector=query, k=5, namespace=prefix, filter=flt)
                expected_scores = sorted((s for s, _ in candidates), reverse=True)[:5]
                assert [round(h.score, 4) for h in hits] == [round(s, 4) for s in expected_scores]
                for h in hits:
                    key = (h.memory.namespace, h.memory.key)
                    assert key in live
                    assert round(float(live[key]["vector"] @ q), 4) == round(h.score, 4)


TestEngineStateful = EngineMachine.TestCase
TestEngineStateful.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
