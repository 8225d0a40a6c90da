"""Change feeds and topics across a cluster: cursors, moved memories, stream readers.

Goal: a subscription read through one node from streams to others sees every change once,
keeps its place when the shards it reads move (also when its filter matches nothing for a
long time), outlives any number of stream breaks that each heal, follows shards a split
appends, and hears nothing of memories that only changed shard.

Method: the pieces first, deterministically: cursors; a shard's feed over a delete of a moved
memory; :class:`ShardFollower`; :class:`StreamReader` over a scripted fake stream and a
:class:`ManualClock` (time moves only where the script says); :class:`MergedFeed` over fake
shard readers; the coordination shard closed under a topic reader. Then real ``memcluster
node`` processes (:class:`cluster_util.Cluster`): many subscriptions through one node whose
shards are on another, and a filtered subscription whose shards move away under it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

import memcluster
from cluster_util import Cluster, cluster_fixture
from memcluster.cluster.dataplane import follow_local
from memcluster.cluster.keys import COORDINATION
from memcluster.cluster.wire import ShardFeedItem
from memcluster.core.clock import ManualClock
from memcluster.core.codec import DeleteOp, DeleteReason, Record, decode_record, encode_record
from memcluster.core.config import Config
from memcluster.core.errors import (
    CursorExpired,
    InvalidArgument,
    InvalidState,
    MemclusterError,
    Unreachable,
    WrongNode,
)
from memcluster.core.types import CollectionConfig, Event, EventOp
from memcluster.index.filters import compile_filter
from memcluster.query import feeds
from memcluster.query.feeds import MergedFeed, StreamReader
from memcluster.shard.coord import CoordShard
from memcluster.shard.feed import (
    FeedReader,
    ShardFollower,
    TopicReader,
    decode_cursor,
    encode_cursor,
)
from memcluster.shard.shard import PreparedPut, Shard
from memcluster.storage.wal import MemoryWal

CONFIG = Config(background=False, graph=False)

# -- cursors ------------------------------------------------------------------------------------


def test_a_cursor_of_fewer_shards_reads_the_shards_appended_since_from_their_start() -> None:
    assert decode_cursor(encode_cursor("c", [3, 4]), "c", 4) == [3, 4, 0, 0]
    assert decode_cursor(encode_cursor("c", [3, 4]), "c", 2) == [3, 4]


@pytest.mark.parametrize(
    ("cursor", "match"),
    [
        (encode_cursor("c", [1, 2, 3]), "names 3 shards"),
        (encode_cursor("other", [1, 2]), "belongs to collection 'other'"),
        (encode_cursor("c", [1, -1]), "negative"),
        ("not-a-cursor", "not a change-feed cursor"),
    ],
)
def test_a_cursor_of_more_shards_or_of_another_collection_is_refused(
    cursor: str, match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        decode_cursor(cursor, "c", 2)


def test_an_embedded_feed_resumes_from_a_cursor_made_before_shards_were_added(
    db: memcluster.Database,
) -> None:
    coll = db.create_collection("grown", dim=2, shards=3)
    for i in range(12):
        coll.put(("n",), f"k{i}", vector=[1.0, float(i)])
    events = list(coll.subscribe(cursor=encode_cursor("grown", [0]), idle_timeout_s=0.2))
    assert sorted(e.key for e in events) == sorted(f"k{i}" for i in range(12))


# -- memories moved between shards ----------------------------------------------------------------


def _shard() -> Shard:
    return Shard.open(
        CollectionConfig(name="c", dim=2), CONFIG, MemoryWal(CONFIG), ManualClock(), snapshots=None
    )


def _put(key: str, metadata: bytes = b"{}") -> PreparedPut:
    return PreparedPut(("n",), key, None, np.ones(2, np.float32), metadata, None, None)


def _reader(shard: Shard, flt: dict[str, Any] | None = None) -> FeedReader:
    return FeedReader(
        "c",
        [shard],
        (),
        compile_filter(flt),
        encode_cursor("c", [0]),
        include_vectors=False,
        batch=100,
    )


def test_a_delete_of_a_moved_memory_makes_no_event_but_the_feed_reads_past_it() -> None:
    shard = _shard()
    shard.put([_put("a"), _put("b")])
    with shard.lock:
        record, live = shard.plan_delete([(("n",), "a")], moved=True)
        assert record is not None
        assert live == 1
        assert [op.reason for op in record.ops if isinstance(op, DeleteOp)] == [DeleteReason.MOVED]
        shard.write_planned(record)
    assert shard.delete(("n",), "b")
    reader = _reader(shard)
    assert [(e.op, e.key, e.version) for e in reader.poll()] == [
        (EventOp.PUT, "a", 1),
        (EventOp.PUT, "b", 2),
        (EventOp.DELETE, "b", 4),
    ]
    assert reader.positions == [4]
    assert reader.poll() == []


def test_a_moved_delete_keeps_its_wal_format_and_user_deletes_keep_their_bytes() -> None:
    moved = Record(7, 1.5, [DeleteOp(("n",), "k", DeleteReason.MOVED)])
    assert decode_record(encode_record(moved)) == moved
    user = Record(7, 1.5, [DeleteOp(("n",), "k")])
    # ["d", ["n"], "k", 0] inside [7, 1.5, [...], nil]: the reason is the last field, as before.
    assert encode_record(user).endswith(b"\x91\x94\xa1d\x91\xa1n\xa1k\x00\xc0")


def test_the_embedded_engine_shows_a_move_between_shards_as_a_put_only(
    db: memcluster.Database,
) -> None:
    ranged = db.create_collection(
        "r", dim=2, shards=3, sharding="range", range_field="t", boundaries=[0, 10]
    )
    start = encode_cursor("r", [0, 0, 0])
    ranged.put(("a",), "k", vector=[1, 0], metadata={"t": -5})
    ranged.put(("a",), "k", vector=[1, 0], metadata={"t": 15})  # shard 0 -> shard 2
    assert ranged.delete(("a",), "k")
    events = list(ranged.subscribe(cursor=start, idle_timeout_s=0.2))
    assert sorted(((e.shard, e.op, e.version) for e in events), key=lambda t: (t[0], t[2])) == [
        (0, EventOp.PUT, 1),
        (2, EventOp.PUT, 1),
        (2, EventOp.DELETE, 2),
    ]
    assert decode_cursor(events[-1].cursor, "r", 3)[0] == 2, "shard 0 was read past the move"


def test_a_shard_follower_reports_how_far_it_read_past_its_last_event() -> None:
    shard = _shard()
    follower = ShardFollower(_reader(shard, {"kind": "rare"}), 0)
    shard.put([_put("x1", b'{"kind":"common"}'), _put("x2", b'{"kind":"common"}')])
    assert follower.poll() == [(None, 2)]
    assert follower.poll() == []
    shard.put([_put("r", b'{"kind":"rare"}'), _put("x3", b'{"kind":"common"}')])
    items = follower.poll()
    assert [(e.key if e else None, position) for e, position in items] == [("r", 3), (None, 4)]
    shard.put([_put("r2", b'{"kind":"rare"}')])
    assert [(e.key if e else None, position) for e, position in follower.poll()] == [("r2", 5)]


# -- the stream reader ----------------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, as a node's."""
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join(5)
    running.close()


class Script:
    """A fake stream opener: open number ``i`` plays ``sessions[i]`` (the last one again once
    they run out): ``str`` yields that item, ``float`` moves the clock on by that many
    seconds, an exception is raised, ``"END"`` ends the stream, ``"WAIT"`` waits forever."""

    def __init__(self, clock: ManualClock, sessions: list[list[Any]]) -> None:
        self.clock = clock
        self.sessions = sessions
        self.opened_at: list[str | None] = []

    async def open(self, cursor: str | None) -> AsyncIterator[str]:
        session = self.sessions[min(len(self.opened_at), len(self.sessions) - 1)]
        self.opened_at.append(cursor)
        for step in session:
            if isinstance(step, BaseException):
                raise step
            if isinstance(step, float):
                self.clock.advance(step)
            elif step == "END":
                return
            elif step == "WAIT":
                await asyncio.Event().wait()
            else:
                yield step


def _reader_of(
    loop: asyncio.AbstractEventLoop, sessions: list[list[Any]]
) -> tuple[StreamReader, Script]:
    clock = ManualClock()
    script = Script(clock, sessions)
    reader = StreamReader(loop, script.open, "start", lambda item: item, clock=clock, pause_s=0)
    return reader, script


def _drain(reader: Any, until: Callable[[list[Any]], bool], timeout_s: float = 5.0) -> list[Any]:
    """Poll ``reader`` until the items so far satisfy ``until`` (errors propagate)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while not until(got):
        assert time.monotonic() < deadline, f"timed out; got {got}"
        got.extend(reader.poll())
        time.sleep(0.005)
    return got


def _error_of(reader: StreamReader, timeout_s: float = 5.0) -> BaseException:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reader.poll()
        except Exception as exc:
            return exc
        time.sleep(0.005)
    raise AssertionError("the reader did not fail")


def test_a_stream_that_ends_is_opened_again_from_its_last_item(
    loop: asyncio.AbstractEventLoop,
) -> None:
    reader, script = _reader_of(loop, [["a", "b", "END"], ["c", "WAIT"]])
    assert _drain(reader, lambda got: len(got) >= 3) == ["a", "b", "c"]
    assert script.opened_at == ["start", "b"]
    reader.close()


def test_a_quiet_stream_survives_breaks_further_apart_than_the_deadline(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Three breaks of a stream that carries nothing, each after it had been up for 20 s:
    40 s pass from the first to the last, more than the reopen deadline, yet each break
    healed at once, so the subscription goes on."""
    assert feeds.STREAM_STABLE_S < 20.0 < feeds.REOPEN_DEADLINE_S < 40.0
    broke = Unreachable("connection lost")
    reader, script = _reader_of(loop, [[broke], [20.0, broke], [20.0, broke], ["x", "WAIT"]])
    assert _drain(reader, lambda got: got == ["x"]) == ["x"]
    assert script.opened_at == ["start"] * 4
    reader.close()


def test_a_stream_that_cannot_be_opened_for_the_deadline_fails_with_its_error(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Each attempt fails a second after it began: the 32nd is more than 30 s after the
    first failure, and its error is the subscription's."""
    reader, script = _reader_of(loop, [[1.0, Unreachable("node n2 refused the connection")]])
    error = _error_of(reader)
    assert isinstance(error, Unreachable)
    assert "n2 refused" in str(error)
    assert len(script.opened_at) == feeds.REOPEN_DEADLINE_S + 2


def test_a_non_retryable_error_ends_the_stream_at_once(loop: asyncio.AbstractEventLoop) -> None:
    reader, script = _reader_of(loop, [["a", CursorExpired("gone", oldest_cursor="x")]])
    assert _drain(reader, lambda got: got == ["a"]) == ["a"]
    assert isinstance(_error_of(reader), CursorExpired)
    assert script.opened_at == ["start"]


def test_a_bug_under_a_stream_reaches_the_subscriber_as_a_memcluster_error(
    loop: asyncio.AbstractEventLoop,
) -> None:
    reader, _ = _reader_of(loop, [[msgspec.DecodeError("Input data was truncated")]])
    error = _error_of(reader)
    assert type(error) is MemclusterError
    assert error.code == "internal"
    assert "DecodeError: Input data was truncated" in str(error)


# -- the merged feed ------------------------------------------------------------------------------


class FakeShardReader:
    """A shard's reader whose items a test hands in."""

    def __init__(self, shard: int, position: int) -> None:
        self.shard = shard
        self.start = position
        self.items: list[ShardFeedItem] = []
        self.listeners: list[Callable[[], None]] = []
        self.closed = False
        self.error: MemclusterError | None = None

    def poll(self) -> list[ShardFeedItem]:
        if self.error is not None and not self.items:
            raise self.error
        items, self.items = self.items, []
        return items

    def listen(self, callback: Callable[[], None]) -> None:
        self.listeners.append(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        self.listeners.remove(callback)

    def close(self) -> None:
        self.closed = True


def _event(shard: int, version: int) -> Event:
    return Event(
        collection="c",
        namespace=("n",),
        key=f"k{version}",
        op=EventOp.PUT,
        version=version,
        time=0.0,
        shard=shard,
        cursor="per-shard cursor",
    )


class Shards:
    """The shard readers a MergedFeed opened, and the collection's shard count."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.readers: list[FakeShardReader] = []

    def open(self, shard: int, position: int) -> FakeShardReader:
        assert shard == len(self.readers)
        reader = FakeShardReader(shard, position)
        self.readers.append(reader)
        return reader


def test_a_merged_feed_moves_a_position_on_a_report_without_an_event() -> None:
    shards = Shards(2)
    merged = MergedFeed("c", [5, 1], shards.open, lambda: shards.count)
    assert [(r.shard, r.start) for r in shards.readers] == [(0, 5), (1, 1)]
    shards.readers[0].items = [ShardFeedItem(None, 9)]
    assert merged.poll() == []
    assert merged.positions == [9, 1]
    shards.readers[1].items = [ShardFeedItem(_event(1, 3), 3), ShardFeedItem(None, 6)]
    events = merged.poll()
    assert [(e.shard, e.version) for e in events] == [(1, 3)]
    assert decode_cursor(events[0].cursor, "c", 2) == [9, 3]
    assert merged.positions == [9, 6]
    assert merged.cursor == encode_cursor("c", [9, 6])


def test_a_merged_feed_reads_shards_appended_after_it_began_from_their_start() -> None:
    shards = Shards(2)
    merged = MergedFeed("c", [5, 1], shards.open, lambda: shards.count)

    def callback() -> None:
        pass

    merged.listen(callback)
    shards.count = 3
    assert merged.poll() == []
    new = shards.readers[2]
    assert (new.start, new.listeners) == (0, [callback])
    new.items = [ShardFeedItem(_event(2, 1), 1)]
    events = merged.poll()
    assert [(e.shard, e.version) for e in events] == [(2, 1)]
    assert decode_cursor(events[0].cursor, "c", 3) == [5, 1, 1]
    merged.unlisten(callback)
    assert all(r.listeners == [] for r in shards.readers)
    shards.count = 4
    merged.poll()
    assert len(shards.readers) == 3, "no reader is opened once the subscriber left"


def test_a_merged_feed_stops_every_reader_when_one_fails() -> None:
    shards = Shards(3)
    merged = MergedFeed("c", [0, 0, 0], shards.open, lambda: shards.count)
    shards.readers[1].error = CursorExpired("gone", oldest_cursor="x")
    with pytest.raises(CursorExpired):
        merged.poll()
    assert all(r.closed for r in shards.readers)


# -- topics on a coordination shard that moves away ---------------------------------------------


def _coord() -> CoordShard:
    return CoordShard(MemoryWal(CONFIG), None, CONFIG, ManualClock())


def test_topic_messages_of_a_closed_coordination_shard_raise_invalid_state() -> None:
    coord = _coord()
    coord.publish("t", b'"hello"')
    assert [op.topic for _, _, op in coord.messages(0, 10)] == ["t"]
    coord.close()
    with pytest.raises(InvalidState, match="coordination: closed"):
        coord.messages(0, 10)
    with pytest.raises(InvalidState):
        coord.messages(1, 10)  # nothing newer: still refused, not an empty answer


def test_a_local_topic_stream_ends_with_wrong_node_when_its_shard_closes() -> None:
    coord = _coord()
    first = coord.publish("t", b'"one"')

    got: list[Any] = []

    async def follow() -> None:
        reader = TopicReader(coord, "t", encode_cursor("topic:t", [first - 1]), batch=10)
        async with asyncio.timeout(5):
            async for message in follow_local(reader, idle_check_s=0.05):
                got.append(message.payload)
                coord.close()  # the shard moves away under the subscriber

    with pytest.raises(WrongNode, match="left this node"):
        asyncio.run(follow())
    assert got == ["one"]


# -- real processes -------------------------------------------------------------------------------


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from cluster_fixture(request, tmp_path / "cluster", name="feeds")


class Subscriber(threading.Thread):
    """One subscription from ``start``; it ends when it has ``want`` events, or at the first
    event after :attr:`stop_event` is set, or after ``idle_timeout_s`` without one."""

    def __init__(
        self,
        coll: Any,
        start: str,
        want: int | None = None,
        idle_timeout_s: float = 60.0,
        flt: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(daemon=True, name="subscriber")
        self.coll = coll
        self.start_cursor = start
        self.want = want
        self.idle_timeout_s = idle_timeout_s
        self.flt = flt
        self.events: list[Event] = []
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        events = self.coll.subscribe(
            cursor=self.start_cursor, filter=self.flt, idle_timeout_s=self.idle_timeout_s
        )
        try:
            for event in events:
                if self.stop_event.is_set():
                    return
                self.events.append(event)
                if len(self.events) == self.want:
                    return
        except Exception as exc:  # reported by the test
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            events.close()


def _spread_over_two_nodes(cluster: Cluster, name: str, shards: int) -> tuple[str, str]:
    """Start n1 and n2 and ``name`` with ``shards`` shards: (the node holding more of
    them, the other)."""
    cluster.add_nodes("n1", "n2")
    cluster.client("n1").create_collection(name, dim=2, shards=shards)
    cluster.wait_for(
        lambda: cluster.placed_and_balanced(name, ("n1", "n2")), 30, f"{name} over 2 nodes"
    )
    held = cluster.held(name)
    remote = max(("n1", "n2"), key=lambda node: len(held.get(node, [])))
    return remote, "n2" if remote == "n1" else "n1"


@pytest.mark.slow
def test_many_subscriptions_through_one_node_to_shards_on_another_each_get_every_event(
    cluster: Cluster,
) -> None:
    """Goal: subscriptions do not share a connection's 64 streams. Method: 6 shards over n1
    and n2; through one node, 36 subscriptions (half over HTTP, half over the binary
    protocol) from one cursor, so at least 72 shard streams run from it to the other node;
    then 30 writes. Every subscription must get all 30 events, without error, while all of
    them stay subscribed (one that left would make room for another's stream)."""
    remote, local = _spread_over_two_nodes(cluster, "many", 6)
    subscriptions = 36
    assert subscriptions * len(cluster.held("many")[remote]) > 64
    start = cluster.client(local).collection("many").feed_cursor()
    clients = [cluster.client(local, "http"), cluster.client(local, "binary")]
    subscribers = [Subscriber(clients[i % 2].collection("many"), start) for i in range(36)]
    for subscriber in subscribers:
        subscriber.start()
    writer = cluster.client(remote, "binary").collection("many")
    for i in range(30):
        writer.put(("w",), f"k{i}", vector=[1.0, float(i)])
    try:
        cluster.wait_for(
            lambda: all(len(s.events) >= 30 or s.errors for s in subscribers),
            45,
            "30 events (or an error) at every subscription",
        )
    finally:
        for subscriber in subscribers:
            subscriber.stop_event.set()
        writer.put(("w",), "last", vector=[1.0, 0.0])  # each returns at its next event
        for subscriber in subscribers:
            subscriber.join(30)
    assert [s.errors for s in subscribers if s.errors] == []
    for subscriber in subscribers:
        assert sorted(e.key for e in subscriber.events) == sorted(f"k{i}" for i in range(30))


@pytest.mark.slow
def test_a_filtered_subscription_keeps_its_place_when_its_shards_move_away(
    cluster: Cluster,
) -> None:
    """Goal: a subscription whose filter matched nothing for a while resumes at the shards'
    new node (the new copy's log starts at the transfer's snapshot, after the subscription's
    last event). Method: 4 shards over n1 and n2; a filtered subscription through the node
    holding fewer; 40 writes it does not want; the other node is drained, so its shards move
    to the subscriber's node; then 8 writes it wants, which must all arrive, without error."""
    remote, local = _spread_over_two_nodes(cluster, "moving", 4)
    coll = cluster.client(local, "binary").collection("moving")
    start = coll.feed_cursor()
    subscriber = Subscriber(
        cluster.client(local, "http").collection("moving"), start, want=8, flt={"kind": "rare"}
    )
    subscriber.start()
    for i in range(40):
        coll.put(("w",), f"common{i}", vector=[1.0, float(i)], metadata={"kind": "common"})
    time.sleep(1.0)  # the shard streams report how far they read
    drained = cluster.cli("drain", remote, "--timeout", "60")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    cluster.wait_for(lambda: not cluster.held("moving").get(remote), 30, f"{remote} empty")
    for i in range(8):
        coll.put(("w",), f"rare{i}", vector=[1.0, float(i)], metadata={"kind": "rare"})
    subscriber.join(60)
    assert subscriber.errors == []
    assert sorted(e.key for e in subscriber.events) == sorted(f"rare{i}" for i in range(8))


@pytest.mark.slow
def test_a_topic_subscriber_follows_the_coordination_shard_to_its_new_node(
    cluster: Cluster,
) -> None:
    """Goal: a topic subscription outlives a move of the coordination shard. Method: n1 and
    n2; a subscriber through the node not holding the shard (its stream runs through the
    holder); the holder is drained, so the shard moves under the stream (the holder's reader
    finds its shard closed); messages published afterwards must all arrive, without error."""
    cluster.add_nodes("n1", "n2")
    holder = cluster.wait_for(
        lambda: cluster.shard_map().get(COORDINATION), 15, "the coordination shard placed"
    )
    assert holder is not None
    other = "n2" if holder == "n1" else "n1"
    client = cluster.client(other, "binary")
    reader = cluster.client(other, "http")
    marker = client.publish("news", "marker")
    got: list[Any] = []
    errors: list[str] = []

    def follow() -> None:
        cursor = encode_cursor("topic:news", [marker])
        try:
            for message in reader.subscribe("news", cursor=cursor, idle_timeout_s=60):
                got.append(message.payload)
                if len(got) == 3:
                    return
        except Exception as exc:  # reported by the test
            errors.append(f"{type(exc).__name__}: {exc}")

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    client.publish("news", "before")
    cluster.wait_for(lambda: got == ["before"], 15, "the first message")
    drained = cluster.cli("drain", holder, "--timeout", "60")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    cluster.wait_for(lambda: cluster.shard_map().get(COORDINATION) == other, 30, "the shard moved")
    client.publish("news", "after 1")
    client.publish("news", "after 2")
    follower.join(45)
    assert errors == []
    assert got == ["before", "after 1", "after 2"]
