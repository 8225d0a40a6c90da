"""Session tokens (``memcluster.core.session``) and a replica's wait for one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memcluster.cluster.host import SESSION_WAIT_S, ShardHost, State
from memcluster.core import session
from memcluster.core.clock import ManualClock
from memcluster.core.config import Config
from memcluster.core.errors import InvalidArgument, WrongNode
from memcluster.core.types import CollectionConfig, Memory

marks = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    st.dictionaries(st.integers(0, 8), st.integers(0, 10**9), max_size=4),
    max_size=3,
)


@given(marks)
def test_a_token_round_trips(m: dict[str, dict[int, int]]) -> None:
    assert session.decode(session.encode(m)) == m


@given(marks, marks)
def test_combining_takes_the_highest_seq_of_each_shard(
    a: dict[str, dict[int, int]], b: dict[str, dict[int, int]]
) -> None:
    both = session.decode(session.combine(session.encode(a), session.encode(b)))
    for coll in {*a, *b}:
        for shard in {*a.get(coll, {}), *b.get(coll, {})}:
            want = max(a.get(coll, {}).get(shard, 0), b.get(coll, {}).get(shard, 0))
            assert both.get(coll, {}).get(shard, 0) == want


def test_merge_and_wanted() -> None:
    token = session.merge(None, "m", {0: 5, 1: 2})
    token = session.merge(token, "m", {0: 3, 2: 9})
    assert session.wanted(token, "m") == {0: 5, 1: 2, 2: 9}
    assert session.wanted(token, "other") == {}
    assert session.combine(None, token) == token
    assert session.wanted(None, "m") == {}


@pytest.mark.parametrize("bad", ["%%%", "AAAA", "bm90IG1zZ3BhY2s"])
def test_a_malformed_token_is_refused_with_advice(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="session token"):
        session.decode(bad)


def test_a_replica_answers_a_session_read_once_it_has_the_seq(tmp_path: Path) -> None:
    """A follower behind the session waits for it (up to SESSION_WAIT_S), answers as soon
    as it has it, and refuses with WrongNode (the router then asks the leader) if it does
    not arrive in time."""
    host = ShardHost(tmp_path / "shards", Config(background=False), ManualClock())
    coll = CollectionConfig(name="m", dim=4)
    try:
        host.open(coll, 0)
        memory = Memory(namespace=("a",), key="k", vector=np.ones(4, dtype=np.float32))
        host.put("m", {0: [memory]}, None)
        host.set_state(("m", 0), State.FOLLOWER)
        assert host.any_reader(("m", 0), session=1).applied_seq == 1
        started = time.monotonic()
        with pytest.raises(WrongNode, match="the session needs 2"):
            host.any_reader(("m", 0), session=2)
        assert time.monotonic() - started >= SESSION_WAIT_S * 0.9
        # The record arrives while the read waits: it answers then.
        host.set_state(("m", 0), State.ACTIVE)  # (here the write comes from this host)
        writer = threading.Timer(0.1, lambda: host.put("m", {0: [memory]}, None))
        writer.start()
        started = time.monotonic()
        assert host.any_reader(("m", 0), session=2).applied_seq == 2
        assert time.monotonic() - started < SESSION_WAIT_S
        writer.join()
    finally:
        host.close()
