"""Concurrent writers, readers and the background thread agree with a sequential model.

Goal: the background step that moves the buffer into the graph never loses an update made
while it inserts (the slot's version changed), and searches during the churn return only live
memories. Method: writer threads overwrite and delete a small key space while the maintenance
thread seals tiny chunks and searcher threads query; afterwards each key holds its last written
vector, and the graph holds exactly that vector for every sealed memory. (Whether a search
then finds it is graph recall, which heavy in-place churn lowers in hnswlib: not tested here.)
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import memcluster
from memcluster.core.config import Config
from memcluster.core.types import Durability


@pytest.mark.slow
def test_updates_during_sealing_are_never_lost(tmp_path: Path, seed: int) -> None:
    config = Config(
        durability=Durability.NONE,
        exact_items_max=0,
        exact_filter_items_max=0,
        seal_chunk_items=7,
        maintenance_interval_s=0.001,
    )
    dim, keys_per_writer, writers, rounds = 8, 40, 3, 60
    errors: list[BaseException] = []
    last: dict[str, np.ndarray | None] = {}
    lock = threading.Lock()
    with memcluster.open(tmp_path, config) as db:
        coll = db.create_collection("m", dim=dim, metric="l2", shards=2)

        def writer(w: int) -> None:
            rng = np.random.default_rng(seed + w)
            try:
                for _ in range(rounds):
                    for i in range(keys_per_writer):
                        key = f"w{w}-{i}"
                        if rng.random() < 0.1:
                            coll.delete(("ns",), key)
                            value = None
                        else:
                            value = rng.standard_normal(dim).astype(np.float32)
                            coll.put(("ns",), key, vector=value)
                        with lock:
                            last[key] = value
            except BaseException as exc:
                errors.append(exc)

        stop = threading.Event()

        def searcher() -> None:
            rng = np.random.default_rng(seed + 100)
            try:
                while not stop.is_set():
                    for hit in coll.search(vector=rng.standard_normal(dim), k=5):
                        assert hit.memory.key.startswith("w")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        threads.append(threading.Thread(target=searcher))
        for t in threads:
            t.start()
        for t in threads[:-1]:
            t.join()
        stop.set()
        threads[-1].join()
        assert not errors, errors
        db.maintain()
        assert coll.describe().stats.indexed_items == coll.count()
        for key, value in last.items():
            got = coll.get(("ns",), key)
            if value is None:
                assert got is None, key
                continue
            assert got is not None, key
            np.testing.assert_array_equal(got.vector, value)
        for shard in coll._shards:
            sealed = [
                (key, slot) for (_, key), slot in shard._keys.items() if not shard._in_buffer[slot]
            ]
            assert len(sealed) == shard.live_count
            in_graph = shard._index.vectors(np.array([slot for _, slot in sealed], dtype=np.int64))
            for (key, _), row in zip(sealed, in_graph, strict=True):
                np.testing.assert_array_equal(row, last[key], err_msg=key)
