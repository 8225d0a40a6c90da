"""Subscriptions across a cluster: change feeds and topics read from the nodes that hold them.

The server reads a subscription through a non-blocking reader (``poll``, ``listen``; see
:class:`memcluster.node.service.FeedReaderLike`). On a cluster node the data is often
elsewhere, so the readers here pull it from other nodes:

* :class:`StreamReader` follows one binary-protocol stream on the node's event loop and
  buffers its items for ``poll``. When the stream breaks with a retryable error (the node
  went away, the shard moved), or ends, it opens it again where it stopped, with the cursor
  of the last item delivered, at whatever node ``open`` then picks, so no item is lost or
  repeated. It gives up after :data:`REOPEN_DEADLINE_S` of failed reopening; a stream that
  stayed up for :data:`STREAM_STABLE_S` ends that count, so a quiet subscription survives
  any number of moves and restarts, each within the deadline.
* :class:`MergedFeed` is a collection's change feed: one reader per shard, merged. A shard's
  stream carries its events and how far the shard was read without one
  (:class:`~memcluster.cluster.wire.ShardFeedItem`), so a filtered subscription whose
  events are rare still keeps its place: reopened at a shard's new node, it resumes from
  there, inside the new copy's log. Each event's cursor is rebuilt from the merged
  positions (a seq per shard, advanced by those reports too), so resuming from any event's
  cursor misses nothing on any shard. Shards appended to the collection after the
  subscription began (a range split) get a reader, from their first change, at the next
  poll.

Each stream to another node has a connection of its own (``Peers.stream``): a subscription
costs one connection per remote shard while it runs. The subscriber only ever sees
MemclusterErrors: the error that made a stream give up, or, for a bug, a
:class:`MemclusterError` naming it (the node logs the traceback).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import msgspec

from memcluster.cluster.wire import ShardFeedItem
from memcluster.core.clock import Clock, SystemClock
from memcluster.core.errors import MemclusterError, Unreachable, is_retryable
from memcluster.core.types import Event
from memcluster.shard.feed import encode_cursor

log = logging.getLogger("memcluster.query")

REOPEN_DEADLINE_S = 30.0
"""How long a broken stream keeps trying to reopen before the subscription fails."""
STREAM_STABLE_S = 5.0
"""A stream that stayed up this long was healthy: its next break starts a new deadline. Longer
than a peer connection's connect timeout (2 s), so an attempt that only waited for a connect
that then failed does not count as up."""
REOPEN_PAUSE_S = 0.2
"""The pause between two attempts to open a stream."""

Opener = Callable[[str | None], AsyncIterator[Any]]
"""Opens the stream from a cursor (None: from where the subscription began)."""


class Reader(Protocol):
    """A non-blocking reader (as :class:`memcluster.node.service.FeedReaderLike`) that can be
    stopped."""

    def poll(self) -> list[Any]: ...
    def listen(self, callback: Callable[[], None]) -> None: ...
    def unlisten(self, callback: Callable[[], None]) -> None: ...
    def close(self) -> None: ...


class StreamReader:
    """A remote stream as a non-blocking reader. ``cursor_of(item)`` gives the cursor to
    resume after ``item``; ``what`` names the stream in logs and errors. The reader stops
    following the stream when its last listener leaves, or on :meth:`close`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        open_stream: Opener,
        cursor: str | None,
        cursor_of: Callable[[Any], str],
        *,
        what: str = "subscription stream",
        clock: Clock | None = None,
        pause_s: float = REOPEN_PAUSE_S,
    ) -> None:
        self._loop = loop
        self._open = open_stream
        self._cursor = cursor
        self._cursor_of = cursor_of
        self._what = what
        self._clock = clock if clock is not None else SystemClock()
        self._pause_s = pause_s
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._listeners: set[Callable[[], None]] = set()
        self._error: MemclusterError | None = None
        self._task = asyncio.run_coroutine_threadsafe(self._pump(), loop)

    async def _pump(self) -> None:
        broken_since: float | None = None  # when this run of failed attempts began
        while True:
            opened = self._clock.monotonic()
            problem: MemclusterError
            try:
                async with contextlib.aclosing(self._open(self._cursor)) as items:  # type: ignore[type-var]
                    async for item in items:
                        broken_since = None
                        self._deliver(item)
                problem = Unreachable(f"{self._what} ended without an error")
            except MemclusterError as exc:
                problem = exc
            except Exception as exc:  # a bug: the subscriber gets an error it can name
                log.exception("%s failed", self._what)
                self._fail(
                    MemclusterError(
                        f"{self._what} failed: {type(exc).__name__}: {exc} (a bug; the node's"
                        " log has the traceback)"
                    )
                )
                return
            now = self._clock.monotonic()
            if broken_since is None or now - opened >= STREAM_STABLE_S:
                broken_since = now  # a break after a healthy stretch: a new deadline
            if not is_retryable(problem) or now - broken_since > REOPEN_DEADLINE_S:
                log.info("%s: giving up: %s", self._what, problem)
                self._fail(problem)
                return
            log.debug("%s broke (%s); reopening it", self._what, problem)
            await asyncio.sleep(self._pause_s)

    def _deliver(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            self._cursor = self._cursor_of(item)
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def _fail(self, exc: MemclusterError) -> None:
        with self._lock:
            self._error = exc
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def poll(self) -> list[Any]:
        """The items received since the last poll; once none are left, the error that ended
        the stream (if one did)."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            if not items and self._error is not None:
                raise self._error
        return items

    def listen(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.add(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.discard(callback)
            idle = not self._listeners
        if idle:  # the subscriber left: stop following the stream
            self.close()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: so is the stream
            self._loop.call_soon_threadsafe(self._task.cancel)


ShardOpener = Callable[[int, int], Reader]
"""``open_shard(shard, position)``: a reader of that shard's :class:`ShardFeedItem` stream,
from that position."""


class MergedFeed:
    """A collection's change feed over one reader per shard (see the module docstring).

    ``positions`` are where the subscription begins, one per shard the collection has now;
    ``open_shard`` makes the readers; ``shard_count()`` is the collection's shard count when
    called (checked at every poll). Poll from one thread at a time."""

    def __init__(
        self,
        collection: str,
        positions: Sequence[int],
        open_shard: ShardOpener,
        shard_count: Callable[[], int],
    ) -> None:
        self.collection = collection
        self.positions = list(positions)
        self._open_shard = open_shard
        self._shard_count = shard_count
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._closed = False
        self._readers = [open_shard(n, p) for n, p in enumerate(self.positions)]
        self._next = 0

    @property
    def cursor(self) -> str:
        return encode_cursor(self.collection, self.positions)

    def listen(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(callback)
            readers = list(self._readers)
        for reader in readers:
            reader.listen(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)
            if not self._listeners:
                self._closed = True  # the readers stop as their last listener leaves
            readers = list(self._readers)
        for reader in readers:
            reader.unlisten(callback)

    def close(self) -> None:
        """Stop every reader (the subscription failed, or nobody will poll any more)."""
        with self._lock:
            self._closed = True
            readers = list(self._readers)
        for reader in readers:
            reader.close()

    def poll(self) -> list[Event]:
        """The next events (possibly none), from the shards in turn. A shard's stream that
        failed raises its error here, and the subscription ends: every reader stops."""
        try:
            readers = self._grow()
            for _ in range(len(readers)):
                n = self._next % len(readers)
                self._next = n + 1
                events = []
                for item in readers[n].poll():
                    event = self._take(n, item)
                    if event is not None:
                        events.append(event)
                if events:
                    return events
        except Exception:
            self.close()
            raise
        return []

    def _grow(self) -> list[Reader]:
        """The readers, with one more for each shard appended to the collection (from seq 0:
        each of its changes came after the subscription's start)."""
        count = self._shard_count()
        with self._lock:
            while not self._closed and len(self._readers) < count:
                n = len(self._readers)
                reader = self._open_shard(n, 0)
                for callback in self._listeners:
                    reader.listen(callback)
                self._readers.append(reader)
                self.positions.append(0)
            return list(self._readers)

    def _take(self, shard: int, item: ShardFeedItem) -> Event | None:
        """Advance the shard's position by ``item``; its event, with a cursor of the merged
        positions (its own reader only knows its shard's), or None."""
        self.positions[shard] = item.position
        if item.event is None:
            return None
        assert item.event.shard == shard, "a shard's stream carries only its events"
        return msgspec.structs.replace(item.event, cursor=self.cursor)
