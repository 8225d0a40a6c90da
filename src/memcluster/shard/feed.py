"""Reading a collection's change feed: per-shard positions, filters, cursors.

A subscription follows every shard of a collection from a position, a seq per shard. Its
**cursor** is that vector, encoded::

    cursor = base64url(msgpack([collection, [seq of shard 0, seq of shard 1, ...]]))

Resuming with a cursor delivers every change after those positions, in each shard's order,
with no gap and no duplicate. This holds while the shards still retain those changes (the
newest ``feed_buffer_events`` in memory, up to ``feed_retention_events`` in the WAL).
Changes of different shards are independent and have no common order. A cursor may hold
fewer positions than the collection has shards: a cluster's range split appends shards, and
the ones an older cursor does not name are read from their start (seq 0).

:class:`FeedReader` is the non-blocking core: :meth:`FeedReader.poll` returns the next
events. The embedded iterator and the server's stream wait for a wake-up between polls; a
shard calls every listener after it applies a record. A filter applies to puts, through the
same compiled filter and columns as searches. Deletes, expiries and evictions carry no
metadata, so a subscription delivers them for every memory under its namespace prefix.
A delete with reason ``MOVED`` (the memory went to another shard of the collection, where
its put is an event) delivers nothing; the reader's position moves past it all the same.

:class:`ShardFollower` reads one shard for a reader on another node: besides the events it
reports how far it read, so that a filtered subscription whose events are rare still keeps
its place (see :mod:`memcluster.query.feeds`).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any, assert_never

import msgspec
import numpy as np

from memcluster.core.codec import DeleteOp, DeleteReason, PutOp
from memcluster.core.errors import CursorExpired, InvalidArgument
from memcluster.core.types import Event, EventOp, Message
from memcluster.index.filters import Filter
from memcluster.index.metadata import MetadataColumns
from memcluster.shard.coord import CoordShard
from memcluster.shard.shard import Change, Shard

_meta_decoder = msgspec.json.Decoder(dict[str, Any])
_payload_decoder = msgspec.json.Decoder()


def _delete_event(reason: DeleteReason) -> EventOp | None:
    """The event a delete makes; None: no event (the memory still exists elsewhere)."""
    match reason:
        case DeleteReason.USER:
            return EventOp.DELETE
        case DeleteReason.EXPIRED:
            return EventOp.EXPIRE
        case DeleteReason.EVICTED:
            return EventOp.EVICT
        case DeleteReason.MOVED:
            return None
        case _:
            assert_never(reason)


def encode_cursor(collection: str, positions: Sequence[int]) -> str:
    raw = msgspec.msgpack.encode((collection, list(positions)))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, collection: str, shards: int) -> list[int]:
    """The positions of ``cursor`` for a collection of ``shards`` shards (a position of 0 for
    each shard it does not name: shards appended since it was made); InvalidArgument if it
    is not one of this collection's cursors, or names more shards than it has."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        name, positions = msgspec.msgpack.decode(raw, type=tuple[str, list[int]])
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise InvalidArgument(
            "cursor is not a change-feed cursor: pass an event's cursor unchanged"
        ) from None
    if name != collection:
        raise InvalidArgument(
            f"cursor belongs to collection {name!r}, not to {collection!r}: pass a cursor of"
            f" this collection's feed"
        )
    if len(positions) > shards:
        raise InvalidArgument(
            f"cursor names {len(positions)} shards of collection {collection!r}, which has"
            f" {shards}: pass an event's cursor unchanged"
        )
    if min(positions, default=0) < 0:
        raise InvalidArgument("cursor holds a negative position: pass an event's cursor unchanged")
    return positions + [0] * (shards - len(positions))


class FeedReader:
    """Follows a collection's shards from a cursor, filtering; non-blocking. A None in
    ``shards`` is a shard this reader skips (its position stays the cursor's)."""

    def __init__(
        self,
        collection: str,
        shards: Sequence[Shard | None],
        prefix: tuple[str, ...],
        flt: Filter,
        cursor: str | None,
        *,
        include_vectors: bool,
        batch: int,
    ) -> None:
        self.collection = collection
        self._shards = list(shards)
        self._prefix = prefix
        self._filter = flt
        self._include_vectors = include_vectors
        self._batch = batch
        if cursor is None:
            self.positions = [0 if s is None else s.applied_seq for s in self._shards]
        else:
            self.positions = decode_cursor(cursor, collection, len(self._shards))
        self._next_shard = 0

    @property
    def cursor(self) -> str:
        """Where this reader stands: resume here to miss nothing."""
        return encode_cursor(self.collection, self.positions)

    def listen(self, callback: Callable[[], None]) -> None:
        for shard in self._shards:
            if shard is not None:
                shard.listen(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        for shard in self._shards:
            if shard is not None:
                shard.unlisten(callback)

    def poll(self) -> list[Event]:
        """The next events (possibly none), from the shards in turn. CursorExpired (with the
        oldest cursor that still works) when a position fell out of retention."""
        for _ in range(len(self._shards)):
            i = self._next_shard
            self._next_shard = (i + 1) % len(self._shards)
            shard = self._shards[i]
            if shard is None:  # read elsewhere (a cluster node reads the shards it holds)
                continue
            try:
                changes = shard.changes(self.positions[i], self._batch)
            except CursorExpired as exc:
                oldest = list(self.positions)
                oldest[i] = shard.oldest_seq() - 1
                raise CursorExpired(
                    str(exc), oldest_cursor=encode_cursor(self.collection, oldest)
                ) from None
            if changes:
                return self._events(i, changes)
        return []

    def _events(self, shard: int, changes: list[Change]) -> list[Event]:
        prefix, n = self._prefix, len(self._prefix)
        wanted = [c for c in changes if c[2].namespace[:n] == prefix and _delivered(c[2])]
        metadata: list[dict[str, Any] | None] = [
            _meta_decoder.decode(op.metadata) if isinstance(op, PutOp) else None
            for _, _, op in wanted
        ]
        keep = np.ones(len(wanted), dtype=bool)
        if not self._filter.is_empty and wanted:
            columns = MetadataColumns(len(wanted))
            for j, ((_, _, op), meta) in enumerate(zip(wanted, metadata, strict=True)):
                if isinstance(op, PutOp):
                    assert meta is not None
                    columns.set(j, meta, op.created_at, op.updated_at)
            is_put = np.array([isinstance(op, PutOp) for _, _, op in wanted], dtype=bool)
            keep = ~is_put | self._filter.evaluate(columns, len(wanted))
        events = []
        positions = list(self.positions)
        for (seq, ts, op), meta, ok in zip(wanted, metadata, keep.tolist(), strict=True):
            if not ok:
                continue
            positions[shard] = seq
            events.append(_event(self.collection, shard, seq, ts, op, meta, positions, self))
        self.positions[shard] = changes[-1][0]
        return events


def _delivered(op: PutOp | DeleteOp) -> bool:
    return not isinstance(op, DeleteOp) or _delete_event(op.reason) is not None


def _event(
    collection: str,
    shard: int,
    seq: int,
    ts: float,
    op: PutOp | DeleteOp,
    meta: dict[str, Any] | None,
    positions: list[int],
    reader: FeedReader,
) -> Event:
    cursor = encode_cursor(collection, positions)
    if isinstance(op, DeleteOp):
        kind = _delete_event(op.reason)
        assert kind is not None, "moves are left out before"
        return Event(
            collection=collection,
            namespace=op.namespace,
            key=op.key,
            op=kind,
            version=seq,
            time=ts,
            shard=shard,
            cursor=cursor,
        )
    vector = np.frombuffer(op.vector, dtype="<f4").copy() if reader._include_vectors else None
    return Event(
        collection=collection,
        namespace=op.namespace,
        key=op.key,
        op=EventOp.PUT,
        version=seq,
        time=ts,
        shard=shard,
        cursor=cursor,
        text=op.text,
        metadata=meta,
        vector=vector,
    )


class ShardFollower:
    """One shard of a :class:`FeedReader` (whose other shards are None), read for a reader on
    another node. Its items are ``(event, position)``: ``position`` is the shard's seq after
    the item. A poll that read changes past its last event (filtered out, under another
    namespace, moved away) ends with ``(None, position)``. So the remote reader keeps its
    place although nothing matched: reopened at another node after the shard moved, it
    resumes from there, not from its last event, which the new copy's log (starting at the
    transfer's snapshot) may not reach."""

    def __init__(self, reader: FeedReader, shard: int) -> None:
        self.reader = reader
        self.shard = shard

    def listen(self, callback: Callable[[], None]) -> None:
        self.reader.listen(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        self.reader.unlisten(callback)

    def poll(self) -> list[tuple[Event | None, int]]:
        before = self.reader.positions[self.shard]
        events = self.reader.poll()
        items: list[tuple[Event | None, int]] = [(e, e.version) for e in events]
        position = self.reader.positions[self.shard]
        if position > (events[-1].version if events else before):
            items.append((None, position))
        return items


class TopicReader:
    """Follows one topic of the coordination shard from a cursor; non-blocking.

    A topic cursor is ``encode_cursor("topic:" + topic, [seq])``: messages of every topic
    share the coordination shard's seq, and the reader skips the other topics'.
    """

    def __init__(self, coord: CoordShard, topic: str, cursor: str | None, batch: int) -> None:
        self.topic = topic
        self._coord = coord
        self._name = f"topic:{topic}"
        self._batch = batch
        if cursor is None:
            self.position = coord.state.applied_seq
        else:
            self.position = decode_cursor(cursor, self._name, 1)[0]

    def listen(self, callback: Callable[[], None]) -> None:
        self._coord.listen(callback)

    def unlisten(self, callback: Callable[[], None]) -> None:
        self._coord.unlisten(callback)

    def poll(self) -> list[Message]:
        try:
            found = self._coord.messages(self.position, self._batch)
        except CursorExpired as exc:
            oldest = encode_cursor(self._name, [self._coord.oldest_seq() - 1])
            raise CursorExpired(str(exc), oldest_cursor=oldest) from None
        out = [
            Message(
                topic=op.topic,
                payload=_payload_decoder.decode(op.payload),
                seq=seq,
                time=ts,
                cursor=encode_cursor(self._name, [seq]),
            )
            for seq, ts, op in found
            if op.topic == self.topic
        ]
        if found:
            self.position = found[-1][0]
        return out
