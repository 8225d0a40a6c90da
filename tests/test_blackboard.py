"""Blackboard triggers fire for exactly the writes their predicate matches.

Each write is also judged by brute force: the filter by the reference evaluator in
``filter_model.py``, the similarity by numpy. Handlers must see exactly those writes.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import numpy as np
import pytest

from filter_model import matches
from memcluster.core.types import Event

Store = Any
DIM = 8


def _unit(v: np.ndarray) -> np.ndarray:
    return v / float(np.linalg.norm(v))


def test_triggers_fire_for_exactly_the_matching_writes(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    store.create_collection("board", dim=DIM)
    board = store.blackboard("board", ("team-a", "b1"))
    anchor = nrng.normal(size=DIM).astype(np.float32)
    where = {"kind": "hypothesis", "confidence": {"$gte": 0.5}}
    seen: dict[str, list[str]] = {"where": [], "near": [], "both": [], "all": []}
    lock = threading.Lock()

    def record(name: str) -> Any:
        def handler(event: Event) -> None:
            with lock:
                seen[name].append(event.key)

        return handler

    board.on(where=where)(record("where"))
    board.on(near=(anchor, 0.3))(record("near"))
    board.on(where=where, near=(anchor, 0.3))(record("both"))
    board.on()(record("all"))

    def explode(event: Event) -> None:
        raise RuntimeError(f"handler failed on {event.key}")

    board.on(where={"kind": "boom"})(explode)

    board.start()
    time.sleep(0.3)
    coll = store.collection("board")
    expected: dict[str, list[str]] = {"where": [], "near": [], "both": [], "all": []}
    booms = []
    for i in range(60):
        key = f"k{i:02d}"
        meta = {
            "kind": rng.choice(["hypothesis", "fact", "boom"]),
            "confidence": round(rng.random(), 2),
        }
        vec = (anchor * rng.uniform(-1, 1) + nrng.normal(size=DIM)).astype(np.float32)
        on_board = rng.random() < 0.8
        namespace = ("team-a", "b1") if on_board else ("team-a", "elsewhere")
        coll.put(namespace, key, vector=vec, metadata=meta)
        if not on_board:
            continue
        close = float(_unit(vec) @ _unit(anchor)) >= 0.3
        expected["all"].append(key)
        if matches(where, meta, 0.0, 0.0):
            expected["where"].append(key)
        if close:
            expected["near"].append(key)
        if close and matches(where, meta, 0.0, 0.0):
            expected["both"].append(key)
        if meta["kind"] == "boom":
            booms.append(key)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(seen["all"]) < len(expected["all"]):
        time.sleep(0.05)
    time.sleep(0.3)
    board.stop()
    for name, keys in expected.items():
        assert sorted(seen[name]) == sorted(keys), name
        assert len(seen[name]) == len(set(seen[name])), f"{name}: a write fired twice"
    # A failing handler is reported for each of its events, and stops nobody.
    assert sorted(event.key for _, event, _ in board.errors) == sorted(booms)
    assert all(isinstance(exc, RuntimeError) for _, _, exc in board.errors)


def test_watch_yields_matching_writes(store: Store) -> None:
    store.create_collection("watched", dim=2)
    board = store.blackboard("watched", ("b",))
    cursor = store.collection("watched").feed_cursor()
    coll = store.collection("watched")
    coll.put(("b",), "near", vector=[1, 0.1], metadata={"kind": "x"})
    coll.put(("b",), "far", vector=[-1, 0], metadata={"kind": "x"})
    coll.put(("b",), "other-kind", vector=[1, 0], metadata={"kind": "y"})
    coll.put(("c",), "off-board", vector=[1, 0], metadata={"kind": "x"})
    got = [
        e.key
        for e in board.watch(
            where={"kind": "x"}, near=([1, 0], 0.9), cursor=cursor, idle_timeout_s=0.5
        )
    ]
    assert got == ["near"]


def test_near_needs_a_vector_and_a_threshold(store: Store) -> None:
    import memcluster

    store.create_collection("bad-near", dim=2)
    board = store.blackboard("bad-near", ("b",))
    with pytest.raises(memcluster.InvalidArgument, match="near"):
        board.on(near=[1, 0])
    with pytest.raises(memcluster.DimensionMismatch):
        board.on(near=([1, 0, 0], 0.5))
