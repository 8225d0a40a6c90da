"""Subscriptions across a cluster: change feeds and topics read from the nodes that hold them.

The server reads a subscription through a non-blocking reader (``poll``, ``listen``; see
:class:`memcluster.node.service.FeedReaderLike`). On a cluster node the data is often
elsewhere, so the readers here pull it from other nodes:

* :class:`StreamReader` follows one binary-protocol stream on the node's event loop and
  buffers its items for ``poll``. When the stream breaks with a retryable error (the node
  went away, the shard moved), it opens it again where it stopped, with the cursor of the last
  item delivered, at whatever node ``open`` then picks, so no item is lost or repeated.
* :class:`MergedFeed` is a collection's change feed: one reader per node holding some of its
  shards, merged. Each event's cursor is rebuilt from the merged positions (a seq per shard),
  so resuming from any event's cursor misses nothing on any shard.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec

from memcluster.core.errors import MemclusterError, ShardUnavailable, is_retryable
from memcluster.core.types import Event
from memcluster.shard.feed import decode_cursor, encode_cursor

log = logging.getLogger("memcluster.query")

REOPEN_DEADLINE_S = 30.0
"""How long a broken stream keeps trying to reopen before the subscription fails."""

Opener = Callable[[str | None], AsyncIterator[Any]]
"""Opens the stream from a cursor (None: from where the subscription began)."""


class StreamReader:
    """A remote stream as a non-blocking reader. ``cursor_of(item)`` gives the cursor to
    resume after ``item``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        open_stream: Opener,
        cursor: str | None,
        cursor_of: Callable[[Any], str],
    ) -> None:
        self._loop = loop
        self._open = open_stream
        self._cursor = cursor
        self._cursor_of = cursor_of
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._listeners: set[Callable[[], None]] = set()
        self._error: BaseException | None = None
        self._task = asyncio.run_coroutine_threadsafe(self._pump(), loop)

    async def _pump(self) -> None:
        broken_since: float | None = None
        while True:
            try:
                async with contextlib.aclosing(self._open(self._cursor)) as items:  # type: ignore[type-var]
                    async for item in items:
                        broken_since = None
                        with self._lock:
                            self._items.append(item)
                            self._cursor = self._cursor_of(item)
                            listeners = list(self._listeners)
                        for listener in listeners:
                            listener()
                return
            except MemclusterError as exc:
                now = time.monotonic()
                broken_since = broken_since or now
                if not is_retryable(exc) or now - broken_since > REOPEN_DEADLINE_S:
                    self._fail(exc)
                    return
                log.info("subscription stream broke (%s); reopening", exc)
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: report it to the subscriber, not silently
                self._fail(exc)
                return

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._error = exc
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def poll(self) -> list[Any]:
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
        self._loop.call_soon_threadsafe(self._task.cancel)


class MergedFeed:
    """A collection's change feed over readers that each cover some of its shards."""

    def __init__(self, collection: str, positions: Sequence[int]) -> None:
        self.collection = collection
        self.positions = list(positions)
        self._readers: list[Any] = []
        self._next = 0

    def add(self, reader: Any) -> None:
        self._readers.append(reader)

    @property
    def cursor(self) -> str:
        return encode_cursor(self.collection, self.positions)

    def listen(self, callback: Callable[[], None]) -> None:
        for reader in self._readers:
            reader.listen(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        for reader in self._readers:
            reader.unlisten(callback)

    def poll(self) -> list[Event]:
        for _ in range(len(self._readers)):
            reader = self._readers[self._next]
            self._next = (self._next + 1) % len(self._readers)
            events = reader.poll()
            if events:
                return [self._rebase(e) for e in events]
        return []

    def _rebase(self, event: Event) -> Event:
        """The event with a cursor of the merged positions (its own reader only knows its
        shards' positions)."""
        own = decode_cursor(event.cursor, self.collection, len(self.positions))
        self.positions[event.shard] = own[event.shard]
        return msgspec.structs.replace(event, cursor=self.cursor)


def unavailable(collection: str, shard: int, node: str) -> ShardUnavailable:
    return ShardUnavailable(
        f"shard {collection}/{shard:04d} is unavailable: its node {node} is down (no heartbeat"
        " within the lease TTL); it returns with that node"
    )
