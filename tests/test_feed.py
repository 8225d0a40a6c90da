"""The change feed: every applied write as an event, filtered, resumable from a cursor.

Runs on all three clients (embedded, HTTP with Server-Sent Events, binary protocol streams).
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest

import memcluster
from memcluster import Memory
from memcluster.core.config import Config
from memcluster.core.types import Event, EventOp
from memcluster.shard.feed import encode_cursor

Store = Any


def _collect(
    coll: Any, out: list[Event], ready: threading.Event, **kwargs: Any
) -> threading.Thread:
    def run() -> None:
        # From the feed's end as of now: nothing written after ready is missed, however
        # late the subscription reaches the server.
        kwargs.setdefault("cursor", coll.feed_cursor())
        events = coll.subscribe(idle_timeout_s=1.5, **kwargs)
        ready.set()
        for event in events:
            out.append(event)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _started(ready: threading.Event) -> None:
    assert ready.wait(10)


def test_subscribers_see_puts_and_deletes_in_order_with_filters(store: Store) -> None:
    coll = store.create_collection("feed", dim=2, shards=2)
    everything: list[Event] = []
    filtered: list[Event] = []
    r1, r2 = threading.Event(), threading.Event()
    t1 = _collect(coll, everything, r1)
    t2 = _collect(coll, filtered, r2, namespace=("team-a",), filter={"kind": "plan"})
    _started(r1)
    _started(r2)
    v1 = coll.put(("team-a", "x"), "p1", text="a plan", vector=[1, 0], metadata={"kind": "plan"})
    coll.put(("team-a", "x"), "f1", vector=[1, 0], metadata={"kind": "fact"})
    coll.put(("team-b",), "p2", vector=[0, 1], metadata={"kind": "plan"})
    coll.delete(("team-a", "x"), "p1")
    t1.join(30)
    t2.join(30)
    assert [(e.op, e.key) for e in everything if e.key == "p1"] == [
        (EventOp.PUT, "p1"),
        (EventOp.DELETE, "p1"),
    ]
    assert sorted(e.key for e in everything if e.op is EventOp.PUT) == ["f1", "p1", "p2"]
    put = next(e for e in everything if e.key == "p1")
    assert (put.collection, put.namespace, put.version) == ("feed", ("team-a", "x"), v1)
    assert (put.text, put.metadata) == ("a plan", {"kind": "plan"})
    # The filter applies to puts; deletes under the prefix always come through.
    assert [(e.op, e.key) for e in filtered] == [(EventOp.PUT, "p1"), (EventOp.DELETE, "p1")]
    for shard in (0, 1):
        versions = [e.version for e in everything if e.shard == shard]
        assert versions == sorted(versions)


def test_resuming_from_cursors_at_random_points_misses_and_repeats_nothing(
    store: Store, seed: int
) -> None:
    """Goal: no gap and no duplicate across reconnects.

    Method: a writer makes 120 changes over 3 shards while a reader takes a random number of
    events, drops the subscription, and resumes from the last cursor it saw, again and
    again. The events received must be exactly the writes, each shard's in seq order."""
    rng = random.Random(seed)
    coll = store.create_collection("resume", dim=2, shards=3)
    received: list[Event] = []
    ready = threading.Event()
    done = threading.Event()

    start = coll.feed_cursor()

    def reader() -> None:
        cursor: str | None = start
        while True:
            take = rng.randint(1, 15)
            events = coll.subscribe(cursor=cursor, idle_timeout_s=1.0)
            ready.set()
            got = 0
            for event in events:
                received.append(event)
                cursor = event.cursor
                got += 1
                if got >= take:
                    break
            events.close()
            if got < take and done.is_set():
                return

    thread = threading.Thread(target=reader)
    thread.start()
    _started(ready)
    written: list[tuple[str, str]] = []
    for i in range(120):
        key = f"k{rng.randint(0, 30)}"
        if rng.random() < 0.2:
            if coll.delete(("a",), key):
                written.append(("delete", key))
        else:
            coll.put(("a",), key, vector=[1, i])
            written.append(("put", key))
    done.set()
    thread.join(60)
    assert not thread.is_alive()
    by_shard: dict[int, list[int]] = {}
    for event in received:
        by_shard.setdefault(event.shard, []).append(event.version)
    for versions in by_shard.values():
        assert versions == sorted(set(versions)), "a gap or duplicate in a shard's order"
    assert sorted((e.op.value, e.key) for e in received) == sorted(written)


def test_expiries_arrive_as_expire_events(store: Store) -> None:
    coll = store.create_collection("ttl", dim=2)
    out: list[Event] = []
    ready = threading.Event()
    thread = _collect(coll, out, ready)
    _started(ready)
    coll.put(("a",), "short", vector=[1, 0], ttl_s=0.2)
    thread.join(30)
    assert [(e.op, e.key) for e in out] == [(EventOp.PUT, "short"), (EventOp.EXPIRE, "short")]


def test_a_bad_cursor_is_refused(store: Store) -> None:
    coll = store.create_collection("bad", dim=2)
    with pytest.raises(memcluster.InvalidArgument, match="cursor"):
        next(iter(coll.subscribe(cursor="not-a-cursor", idle_timeout_s=0.5)))


def test_a_cursor_past_retention_gets_the_oldest_cursor(tmp_path: Path) -> None:
    config = Config(
        background=False,
        feed_buffer_events=5,
        feed_retention_events=5,
        wal_segment_bytes=4096,
        snapshot_wal_bytes=1,
    )
    with memcluster.open(tmp_path / "data", config) as db:
        coll = db.create_collection("m", dim=2)
        coll.put(("a",), "first", vector=[1, 0])
        early = next(iter(coll.subscribe(idle_timeout_s=0.1, cursor=_start_cursor(coll))))
        for i in range(200):
            coll.put_many([Memory(namespace=("a",), key=f"k{i}", text="x" * 200, vector=[1, i])])
        db.maintain()  # snapshot, then truncate the WAL down to the retention window
        with pytest.raises(memcluster.CursorExpired) as info:
            next(iter(coll.subscribe(cursor=early.cursor, idle_timeout_s=0.1)))
        oldest = info.value.oldest_cursor
        assert oldest is not None
        resumed = list(coll.subscribe(cursor=oldest, idle_timeout_s=0.2))
        assert resumed
        assert resumed[-1].key == "k199"
        versions = [e.version for e in resumed]
        assert versions == list(range(versions[0], versions[0] + len(versions)))


def _start_cursor(coll: memcluster.Collection) -> str:
    """The cursor before every change: all shard positions at 0."""
    return encode_cursor(coll.name, [0] * coll.config.shards)


def test_topics_deliver_published_messages_and_resume_from_cursors(store: Store) -> None:
    got: list[Any] = []
    ready = threading.Event()

    # Subscribe from a marker message, so that nothing published after it is missed however
    # late the subscription reaches the server.
    start = encode_cursor("topic:alerts", [store.publish("alerts", "marker")])

    def listen() -> None:
        messages = store.subscribe("alerts", cursor=start, idle_timeout_s=1.5)
        ready.set()
        got.extend(messages)

    thread = threading.Thread(target=listen)
    thread.start()
    _started(ready)
    seqs = [store.publish("alerts", {"n": i, "msg": f"alert {i}"}) for i in range(5)]
    store.publish("other-topic", "not for us")
    thread.join(30)
    assert [m.payload for m in got] == [{"n": i, "msg": f"alert {i}"} for i in range(5)]
    assert [m.seq for m in got] == seqs
    assert all(m.topic == "alerts" for m in got)
    rest = list(store.subscribe("alerts", cursor=got[1].cursor, idle_timeout_s=0.5))
    assert [m.payload["n"] for m in rest] == [2, 3, 4]
    with pytest.raises(memcluster.InvalidArgument, match="groups"):
        next(iter(store.subscribe("alerts", group="workers", idle_timeout_s=0.2)))
    with pytest.raises(memcluster.InvalidArgument, match="JSON"):
        store.publish("alerts", {"bad": object()})
