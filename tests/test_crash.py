"""Durability under attack: kill -9 during writes, torn tails, flipped bits.

Goal: every write acknowledged before a SIGKILL is there after reopening; a torn WAL tail is
repaired; a flipped bit in the middle of the WAL is reported as corruption, never skipped.
Method: a child process writes and prints each acknowledged key; the parent kills it at a
seeded random moment, reopens the directory and checks every printed key and its vector.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import memcluster
from memcluster.core.config import Config

CHILD = r"""
import sys, numpy as np, memcluster
db = memcluster.open(sys.argv[1])
if "m" in db.list_collections():
    coll = db.collection("m")
else:
    coll = db.create_collection("m", dim=16, shards=2)
i = int(sys.argv[2])
while True:
    if i % 3 == 0:
        keys = [f"k{i + j}" for j in range(5)]
        coll.put_many([
            memcluster.Memory(
                namespace=("ns",), key=k, vector=np.arange(16.0) + int(k[1:]) + 1, metadata={"i": i}
            )
            for k in keys
        ])
        i += 5
    else:
        keys = [f"k{i}"]
        coll.put(("ns",), keys[0], vector=np.arange(16.0) + i + 1, metadata={"i": i})
        i += 1
    print("ack " + " ".join(keys), flush=True)
"""


def expected_vector(key: str) -> np.ndarray:
    v = np.arange(16.0) + int(key[1:]) + 1
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
def test_kill_9_during_writes_loses_no_acknowledged_write(
    tmp_path: Path, seed: int, round_: int
) -> None:
    rng = random.Random(seed + round_)
    acked: list[str] = []
    for life in range(2):  # kill, restart on the same directory, kill again
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(life * 100_000)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        for _ in range(rng.randint(30, 300)):
            line = child.stdout.readline()
            if not line:
                break
            acked.extend(line.split()[1:])
        time.sleep(rng.uniform(0, 0.02))  # land the kill somewhere inside a later write
        child.send_signal(signal.SIGKILL)
        rest, err = child.communicate()
        # Lines printed before the kill are acknowledged too.
        for line in rest.splitlines():
            if line.startswith("ack "):
                acked.extend(line.split()[1:])
        assert child.returncode == -signal.SIGKILL, err
    assert len(acked) > 20, "the child acknowledged too little to test anything"
    with memcluster.open(tmp_path, Config(background=False)) as db:
        coll = db.collection("m")
        for key in acked:
            got = coll.get(("ns",), key)
            assert got is not None, f"acknowledged {key} lost"
            np.testing.assert_allclose(got.vector, expected_vector(key), rtol=1e-5)


def _last_segment(root: Path) -> Path:
    return sorted((root / "collections" / "m" / "shard-0000" / "wal").glob("*.wal"))[-1]


def _write_some(root: Path, n: int) -> None:
    with memcluster.open(root, Config(background=False)) as db:
        coll = db.create_collection("m", dim=4, metric="dot")
        for i in range(n):
            coll.put(("ns",), f"k{i}", vector=[1.0, float(i), 0.0, 0.0])


def test_a_torn_tail_is_cut_and_the_rest_recovered(tmp_path: Path) -> None:
    _write_some(tmp_path, 20)
    segment = _last_segment(tmp_path)
    size = segment.stat().st_size
    with segment.open("r+b") as f:
        f.truncate(size - 7)  # the last record is torn
    with memcluster.open(tmp_path, Config(background=False)) as db:
        coll = db.collection("m")
        assert coll.count() == 19
        coll.put(("ns",), "after", vector=[1.0, 0.0, 0.0, 0.0])
    with memcluster.open(tmp_path, Config(background=False)) as db:
        assert db.collection("m").count() == 20


def test_a_flipped_bit_in_the_middle_is_reported(tmp_path: Path) -> None:
    _write_some(tmp_path, 20)
    segment = _last_segment(tmp_path)
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x10
    segment.write_bytes(bytes(data))
    with pytest.raises(memcluster.CorruptionError, match=r"wal: .*\.wal"):
        memcluster.open(tmp_path, Config(background=False))
