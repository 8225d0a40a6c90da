"""A node's data plane: the node-to-node operations it serves, its connections to the other
nodes, the shard moves it carries out, and keeping its shards in line with the shard map.

* :class:`Peers` keeps one binary-protocol connection per other node for requests,
  reconnecting on use after a loss, and opens one per subscription stream.
* :class:`DataPlane` serves the operations of :mod:`memcluster.cluster.wire` from the node's
  :class:`~memcluster.cluster.host.ShardHost`, and follows the shard map: it opens the shards
  the map gives this node, activates the ones moved here, and drops the ones moved away.

A move (DESIGN.md §6, "catch-up and transfer") is driven by the controller and carried out by
the target: :meth:`DataPlane.pull` copies the source's newest snapshot file by file, applies
the source's WAL after it until the copy is close, asks the source to freeze the shard
(writes refused from then on, so the router sends them again), applies the last records,
fsyncs and reports back. The controller then switches the owner in etcd with a transaction;
when that fails it unfreezes the source and the target drops its copy. A frozen shard whose
move never finished unfreezes itself after ``move_timeout_s``, but only by winning an etcd
transaction that also makes any late switch fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import numpy as np

from memcluster.cluster import wire
from memcluster.cluster.coordinator import Compare, Coordinator, Put
from memcluster.cluster.host import ShardHost, ShardId, State, shard_name
from memcluster.cluster.keys import COORDINATION, ShardAssignment, assignment_key, encode
from memcluster.cluster.multi import MultiDriver
from memcluster.cluster.replicas import EpochHistory, ReplicaDriver
from memcluster.cluster.shardmap import ShardMap, Snapshot
from memcluster.core import validation
from memcluster.core.codec import PutOp, Record, decode_record, encode_record
from memcluster.core.config import Config
from memcluster.core.errors import (
    CollectionNotFound,
    InvalidState,
    MemclusterError,
    ShardUnavailable,
    Unreachable,
    WrongNode,
)
from memcluster.core.types import CollectionConfig, Memory, Replication, Sharding
from memcluster.index.filters import compile_filter
from memcluster.replication.leader import Ack
from memcluster.shard.coord import CoordShard
from memcluster.shard.feed import FeedReader, ShardFollower
from memcluster.shard.shard import Shard
from memcluster.shard.sharding import Sharder
from memcluster.storage.snapshot import FileWriter
from memcluster.transport.connection import Connection

log = logging.getLogger("memcluster.dataplane")

T = TypeVar("T")

TRANSFER_CHUNK_BYTES = 4 << 20
TAIL_RECORDS = 512
TAIL_BYTES = 8 << 20
"""At most this much WAL per catch-up reply (one record may exceed it)."""
REHOME_TIMEOUT_S = 300.0
"""A shard frozen for a rehome that long without the layout switching takes writes back
(by an etcd txn the switch would then lose)."""
CLOSE_ENOUGH_OPS = 256
"""A move freezes the source once the copy is this close behind."""


def _move_file(source: Path, target: Path) -> None:
    """A snapshot file written by moving a staged transfer file into place."""
    os.replace(source, target)


class Peers:
    """One shared binary connection per peer endpoint (``mc://HOST:PORT``) for requests,
    opened on first use, and one connection per stream (a slow subscriber must hold up
    nothing else). Use from the event loop only."""

    def __init__(self, *, api_key: str | None = None, max_frame_bytes: int) -> None:
        self._conns: dict[str, Connection] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._api_key = api_key
        self._max_frame_bytes = max_frame_bytes

    async def get(self, url: str, purpose: str = "requests") -> Connection:
        slot = f"{url}#{purpose}"
        conn = self._conns.get(slot)
        if conn is not None and not conn.closed:
            return conn
        lock = self._opening.setdefault(slot, asyncio.Lock())
        async with lock:
            conn = self._conns.get(slot)
            if conn is None or conn.closed:
                parts = urlsplit(url)
                if parts.hostname is None or parts.port is None:
                    raise Unreachable(f"peer address {url!r} is not mc://HOST:PORT")
                conn = await Connection.open(
                    parts.hostname,
                    parts.port,
                    api_key=self._api_key,
                    connect_timeout_s=2.0,
                    max_frame_bytes=self._max_frame_bytes,
                )
                self._conns[slot] = conn
            return conn

    async def request(
        self, url: str, kind: str, body: Any, reply: type[T], timeout_s: float | None = 30.0
    ) -> T:
        try:
            conn = await self.get(url)
        except Unreachable as exc:
            exc.sent = False  # no connection: the request never left
            raise
        return await conn.request(kind, body, reply, timeout_s=timeout_s)

    async def stream(self, url: str, kind: str, body: Any, item: type[T]) -> AsyncIterator[T]:
        """The items of stream ``kind`` at the peer, on a connection of its own, opened here
        and closed when the stream ends or its consumer leaves. On a shared connection the
        server would run only its ``max_streams`` (64) and refuse the rest, and a consumer
        falling behind would stall every other stream on it."""
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise Unreachable(f"peer address {url!r} is not mc://HOST:PORT")
        conn = await Connection.open(
            parts.hostname,
            parts.port,
            api_key=self._api_key,
            connect_timeout_s=2.0,
            max_frame_bytes=self._max_frame_bytes,
        )
        try:
            async with contextlib.aclosing(conn.stream(kind, body, item)) as items:
                async for value in items:
                    yield value
        finally:
            await conn.close()

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()


Handler = Callable[[Any], Awaitable[msgspec.Struct]]
StreamHandler = Callable[[Any], AsyncIterator[Any]]


async def follow_local(reader: Any, idle_check_s: float = 1.0) -> AsyncIterator[Any]:
    """The items of a local non-blocking reader as an async stream: poll, then wait for a
    wake-up from a writer (or ``idle_check_s``). A shard closed under the reader (it moved
    away) ends the stream with WrongNode, so the subscriber reopens it at its new node."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify() -> None:
        with contextlib.suppress(RuntimeError):  # the loop may be gone
            loop.call_soon_threadsafe(wake.set)

    reader.listen(notify)
    try:
        while True:
            wake.clear()
            try:
                items = await loop.run_in_executor(None, reader.poll)
            except InvalidState as exc:
                raise WrongNode(f"the subscription's shard left this node ({exc})") from None
            for item in items:
                yield item
            if not items:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), idle_check_s)
    finally:
        reader.unlisten(notify)


class DataPlane:
    """Serves :mod:`~memcluster.cluster.wire` operations and keeps the host in line with the
    map. Create and run it on the node's event loop."""

    def __init__(
        self,
        host: ShardHost,
        shard_map: ShardMap,
        coord: Coordinator,
        peers: Peers,
        config: Config,
        *,
        node_id: str,
        move_timeout_s: float = 30.0,
        lease_valid: Callable[[], bool] = lambda: True,
    ) -> None:
        self.host = host
        self.map = shard_map
        self.coord = coord
        self.peers = peers
        self.config = config
        self.node_id = node_id
        self.move_timeout_s = move_timeout_s
        self.lease_valid = lease_valid
        """Whether this node's etcd lease is certainly alive (strong reads need it)."""
        self._pool = ThreadPoolExecutor(
            max_workers=config.request_threads, thread_name_prefix="memcluster-peer"
        )
        self._pulling: set[ShardId] = set()
        self.replicas: dict[ShardId, ReplicaDriver] = {}
        """The drivers of the replicated shards held here."""
        self.multis: dict[ShardId, MultiDriver] = {}
        """The drivers of the ``replication="multi"`` shards held here."""
        self._revisions: dict[ShardId, int] = {}
        self._resyncing: set[ShardId] = set()
        # Replication requests never wait behind writes that wait for them (on other nodes).
        self._repl_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="memcluster-repl")
        self._sharders: dict[str, tuple[CollectionConfig, Sharder]] = {}
        self._sync_needed = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        h = self.host
        self.local: dict[str, tuple[type[msgspec.Struct], Callable[[Any], msgspec.Struct]]] = {
            "shard.put": (wire.ShardPut, self._put),
            "shard.get": (wire.ShardGet, self._get),
            "shard.locate": (wire.ShardLocate, self._locate),
            "shard.delete_versions": (wire.ShardDeleteVersions, self._delete_versions),
            "shard.delete": (wire.ShardDelete, self._delete),
            "shard.search": (wire.ShardSearch, self._search),
            "shard.count": (wire.ShardScope, self._count),
            "shard.delete_where": (wire.ShardScope, self._delete_where),
            "shard.list": (wire.ShardList, self._list),
            "shard.stats": (
                wire.ShardScope,
                lambda b: wire.ShardStats(h.stats([(b.collection, n) for n in b.shards])),
            ),
            "shard.transfer_begin": (
                wire.ShardRef,
                lambda b: wire.TransferBegin(*h.transfer_begin((b.collection, b.shard))),
            ),
            "shard.transfer_read": (
                wire.TransferRead,
                lambda b: wire.Chunk(h.transfer_read(b.transfer, b.name, b.offset, b.size)),
            ),
            "shard.transfer_end": (wire.TransferRef, self._transfer_end),
            "shard.tail": (wire.Tail, self._tail),
            "shard.freeze": (
                wire.ShardRef,
                lambda b: wire.Seq(h.freeze((b.collection, b.shard))),
            ),
            "shard.rehome_finish": (wire.Rehome, self._rehome_finish),
            "shard.import": (wire.Import, self._import),
            "shard.sample": (wire.Sample, self._sample),
            "coord.check_fence": (wire.FenceCheck, self._check_fence),
            "coord.leases_alive": (wire.Leases, self._leases_alive),
        }
        """The blocking operations: served on the pool, or called in-process by the router
        (on its request thread) for shards held here."""
        self.handlers: dict[str, tuple[type[msgspec.Struct], Handler]] = {
            kind: (body, self._blocking(fn)) for kind, (body, fn) in self.local.items()
        }
        self.handlers.update(
            {
                "repl.append": (
                    wire.ReplAppend,
                    self._on_repl(lambda b: self._driver(b).on_append(b)),
                ),
                "repl.status": (
                    wire.ReplStatus,
                    self._on_repl(lambda b: self._driver(b).on_status(b)),
                ),
                "repl.history": (wire.ShardRef, self._on_repl(self._history)),
                "repl.ack": (wire.ReplAck, self._on_repl(lambda b: self._driver(b).on_ack(b))),
                "repl.info": (
                    wire.Empty,
                    self._on_repl(
                        lambda _: wire.ReplicaInfos(
                            [d.info() for d in list(self.replicas.values())]
                            + [d.info() for d in list(self.multis.values())]
                        )
                    ),
                ),
                "multi.push": (
                    wire.MultiPush,
                    self._on_repl(lambda b: self._multi(b).on_push(b)),
                ),
                "multi.pull": (
                    wire.MultiPull,
                    self._on_repl(lambda b: self._multi(b).on_pull(b)),
                ),
                "repl.resync": (wire.ReplResync, self._resync_handler),
                "shard.unfreeze": (wire.ShardRef, self._unfreeze),
                "shard.pull": (wire.Pull, self._pull_handler),
                "shard.abort": (wire.ShardRef, self._abort),
                "shard.rehome": (wire.Rehome, self._rehome),
            }
        )
        self.streams: dict[str, tuple[type[msgspec.Struct], StreamHandler]] = {
            "shard.subscribe": (wire.ShardSubscribe, self.subscribe),
        }

    def _blocking(self, fn: Callable[[Any], msgspec.Struct]) -> Handler:
        async def run(body: Any) -> msgspec.Struct:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, functools.partial(fn, body))

        return run

    def _on_repl(self, fn: Callable[[Any], msgspec.Struct]) -> Handler:
        async def run(body: Any) -> msgspec.Struct:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._repl_pool, functools.partial(fn, body))

        return run

    def _driver(
        self, b: wire.ReplAppend | wire.ReplAck | wire.ReplStatus | wire.ShardRef
    ) -> ReplicaDriver:
        driver = self.replicas.get((b.collection, b.shard))
        if driver is None:
            raise WrongNode(
                f"this node holds no replica of shard {shard_name((b.collection, b.shard))}"
            )
        return driver

    def _multi(self, b: wire.MultiPush | wire.MultiPull) -> MultiDriver:
        driver = self.multis.get((b.collection, b.shard))
        if driver is None:
            raise WrongNode(
                f"this node holds no replica of shard {shard_name((b.collection, b.shard))}"
            )
        return driver

    def _history(self, b: wire.ShardRef) -> wire.History:
        history = self._driver(b).history
        return wire.History(list(history.epochs), history.adopted)

    def stop(self) -> None:
        """Stop following the map (on the loop); :meth:`close` afterwards, off the loop."""
        self._stop.set()
        for driver in self.replicas.values():
            driver.close()
        for multi in self.multis.values():
            multi.close()

    def close(self) -> None:
        """Wait for the operations running on the pool; blocking: call it off the loop."""
        self._stop.set()
        for driver in list(self.replicas.values()):
            driver.close()
        for multi in list(self.multis.values()):
            multi.close()
        self._pool.shutdown(wait=True)
        self._repl_pool.shutdown(wait=True)

    # -- data operations (run on the pool) -----------------------------------------------------

    def _scope(self, namespace: tuple[str, ...], flt: Mapping[str, Any] | None) -> Any:
        prefix = validation.namespace(namespace, self.config, allow_empty=True)
        return prefix, compile_filter(flt)

    def _put(self, b: wire.ShardPut) -> wire.ShardPutReply:
        config = self._config_of(b.collection)
        if config.sharding is not Sharding.HASH:
            self._check_placement(config, b.batches)
        seqs: dict[int, int] = {}
        ack = None if b.ack is None else Ack(b.ack)
        versions = self.host.put(
            b.collection, b.batches, b.idempotency_key, b.fence, b.version_floors, seqs, ack, b.w
        )
        return wire.ShardPutReply(versions, seqs)

    def _sharder(self, config: CollectionConfig) -> Sharder:
        cached = self._sharders.get(config.name)
        if cached is None or cached[0] != config:
            cached = (config, Sharder(config))
            self._sharders[config.name] = cached
        return cached[1]

    def _check_placement(self, config: CollectionConfig, batches: Mapping[int, Any]) -> None:
        """Range and vector shards take only the memories the config places on them: a
        router with an older config (before a split) is told to route again."""
        sharder = self._sharder(config)
        for shard, memories in batches.items():
            vectors = validation.vectors([m.vector for m in memories], config.dim, config.metric)
            placed = sharder.place(
                [m.namespace for m in memories],
                [m.key for m in memories],
                vectors,
                [m.metadata for m in memories],
            )
            if any(p != shard for p in placed):
                raise WrongNode(
                    f"shard {config.name}/{shard:04d} does not hold some of these memories"
                    " under the collection's current layout: route again"
                )

    def _get(self, b: wire.ShardGet) -> wire.ShardGetReply:
        seqs: dict[int, int] = {}
        found: Memory | None = None
        for n in b.shards:
            need = None if b.session is None else b.session.get(n, 0)
            shard_id = (b.collection, n)
            memory = self.host.get(shard_id, b.namespace, b.key, eventual=b.eventual, session=need)
            if b.session is not None:
                seqs[n] = self.host.any_reader(shard_id).applied_seq
            if memory is not None:
                found = memory
                break
        stamp = None
        if len(b.shards) == 1 and b.eventual:
            shard = self.host.any_reader((b.collection, b.shards[0]))
            stamp = shard.stamp_of(b.namespace, b.key)
        return wire.ShardGetReply(found, seqs, stamp)

    def _locate(self, b: wire.ShardLocate) -> wire.Located:
        found: dict[int, list[tuple[int, int, float]]] = {}
        for n in b.shards:
            where = self.host.locate((b.collection, n), b.keys)
            found[n] = [(i, v, t) for i, (v, t) in enumerate(where) if v]
        return wire.Located(found)

    def _delete_versions(self, b: wire.ShardDeleteVersions) -> wire.ShardCount:
        return wire.ShardCount(
            sum(self.host.delete_versions((b.collection, n), d) for n, d in b.deletes.items())
        )

    def _delete(self, b: wire.ShardDelete) -> wire.ShardCount:
        return wire.ShardCount(
            sum(self.host.delete((b.collection, n), keys, b.fence) for n, keys in b.deletes.items())
        )

    def _search(self, b: wire.ShardSearch) -> wire.ShardHits:
        prefix, flt = self._scope(b.namespace, b.filter)
        shards = [(b.collection, n) for n in b.shards]
        config = self._config_of(b.collection)
        query = validation.query_vector(b.vector, config.dim, config.metric)
        hits = self.host.search(
            shards, query, b.k, prefix, flt, b.include_vectors, b.eventual, b.session
        )
        seqs = {}
        if b.session is not None:
            seqs = {n: self.host.any_reader((b.collection, n)).applied_seq for n in b.shards}
        return wire.ShardHits(hits, seqs)

    def _config_of(self, collection: str) -> CollectionConfig:
        config = self.map.current.collections.get(collection)
        if config is None:
            raise CollectionNotFound(f"no collection named {collection!r}")
        return config

    def _count(self, b: wire.ShardScope) -> wire.ShardCount:
        prefix, flt = self._scope(b.namespace, b.filter)
        return wire.ShardCount(self.host.count([(b.collection, n) for n in b.shards], prefix, flt))

    def _delete_where(self, b: wire.ShardScope) -> wire.ShardCount:
        prefix, flt = self._scope(b.namespace, b.filter)
        shards = [(b.collection, n) for n in b.shards]
        return wire.ShardCount(self.host.delete_where(shards, prefix, flt))

    def _list(self, b: wire.ShardList) -> wire.ShardItems:
        prefix, flt = self._scope(b.namespace, b.filter)
        shards = [(b.collection, n) for n in b.shards]
        return wire.ShardItems(self.host.list_page(shards, prefix, flt, b.after, b.limit))

    def feed_reader(self, b: wire.ShardSubscribe) -> FeedReader:
        """A reader of one shard held here (WrongNode if it is not), from ``b.cursor``."""
        shard = self.host.reader((b.collection, b.shard))
        config = self._config_of(b.collection)
        shards: list[Shard | None] = [None] * max(config.shards, b.shard + 1)
        shards[b.shard] = shard
        prefix, flt = self._scope(b.namespace, b.filter)
        return FeedReader(
            b.collection,
            shards,
            prefix,
            flt,
            b.cursor,
            include_vectors=b.include_vectors,
            batch=self.config.feed_batch_events,
        )

    async def subscribe(self, b: wire.ShardSubscribe) -> AsyncIterator[wire.ShardFeedItem]:
        """Shard ``b.shard``'s feed from ``b.cursor``: its events, and how far it was read
        past the last of them (see :class:`~memcluster.shard.feed.ShardFollower`)."""
        reader = await self._run(self.feed_reader, b)
        async for event, position in follow_local(ShardFollower(reader, b.shard)):
            yield wire.ShardFeedItem(event, position)

    # -- resharding ----------------------------------------------------------------------------

    def _placement(self, config: CollectionConfig, puts: list[PutOp]) -> list[int]:
        if not puts:
            return []
        dim = config.dim
        vectors = np.frombuffer(b"".join(p.vector for p in puts), dtype="<f4").reshape(-1, dim)
        return self._sharder(config).place(
            [p.namespace for p in puts],
            [p.key for p in puts],
            vectors,
            [msgspec.json.decode(p.metadata) for p in puts],
        )

    async def _rehome(self, b: wire.Rehome) -> wire.Rehomed:
        """Freeze the shard and copy each memory that ``b.config`` places elsewhere to its
        shard (it stays here too until :meth:`_rehome_finish`)."""
        shard_id = (b.config.name, b.shard)
        await self._run(self.host.freeze, shard_id, b.config)
        source = self.host.reader(shard_id)
        puts = await self._run(source.live_puts)
        floor = source.version_high
        placed = await self._run(self._placement, b.config, puts)
        moving: dict[int, list[PutOp]] = {}
        for put, target in zip(puts, placed, strict=True):
            if target != b.shard:
                moving.setdefault(target, []).append(put)
        snap = self.map.current
        for target, ops in sorted(moving.items()):
            owner = snap.owner(b.config.name, target)
            if owner is None or owner not in snap.nodes:
                raise ShardUnavailable(f"shard {b.config.name}/{target:04d} has no live node")
            step = self.config.batch_items_max
            for start in range(0, len(ops), step):
                body = wire.Import(
                    collection=b.config.name,
                    shard=target,
                    record=encode_record(Record(1, 0.0, list(ops[start : start + step]))),
                    version_floor=floor,
                )
                if owner == self.node_id:
                    await self._run(self._import, body)
                else:
                    url = snap.nodes[owner].peer_url
                    await self.peers.request(url, "shard.import", body, wire.Done)
        return wire.Rehomed({t: len(ops) for t, ops in moving.items()})

    def _rehome_finish(self, b: wire.Rehome) -> wire.Done:
        """``b.config`` is in force: delete what it places elsewhere, serve writes again."""
        shard_id = (b.config.name, b.shard)
        shard = self.host.reader(shard_id)
        puts = shard.live_puts()
        placed = self._placement(b.config, puts)
        gone = [(p.namespace, p.key) for p, t in zip(puts, placed, strict=True) if t != b.shard]
        shard.delete_moved(gone)
        self.host.activate(shard_id)
        log.info("shard %s: %d memories now live elsewhere", shard_name(shard_id), len(gone))
        return wire.Done()

    def _import(self, b: wire.Import) -> wire.Done:
        ops = decode_record(b.record).ops
        puts = [op for op in ops if isinstance(op, PutOp)]
        self.host.writer((b.collection, b.shard)).import_puts(puts, b.version_floor)
        return wire.Done()

    def _sample(self, b: wire.Sample) -> wire.SampleReply:
        shard = self.host.reader((b.collection, b.shard))
        puts = shard.live_puts()
        rng = np.random.default_rng(0)
        chosen = [puts[i] for i in sorted(rng.permutation(len(puts))[: b.size].tolist())]
        dim = self._config_of(b.collection).dim
        raw = b"".join(p.vector for p in chosen)
        vectors = np.frombuffer(raw, dtype="<f4").reshape(-1, dim)
        values: list[float] = []
        if b.field is not None:
            for p in chosen:
                value = msgspec.json.decode(p.metadata).get(b.field)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    values.append(float(value))
        return wire.SampleReply(vectors, values, len(puts))

    def _leases_alive(self, b: wire.Leases) -> wire.Leases:
        coord = self.host.coordination()
        return wire.Leases([lease for lease in b.leases if coord.lease_alive(lease)])

    async def reap_leases(self) -> None:
        """Delete the memories of ended leases from the shards held here, asking the
        coordination shard's node which leases are alive (also after restarts)."""
        shards = self.host.active_shards()
        referenced = sorted(set().union(*(s.leases() for s in shards)) if shards else set())
        if not referenced:
            return
        snap = self.map.current
        owner = snap.owner(*COORDINATION)
        if owner is None or owner not in snap.nodes:
            return  # cannot tell: a lease's memories stay until it can
        body = wire.Leases(referenced)
        if owner == self.node_id:
            alive = await self._run(self._leases_alive, body)
        else:
            url = snap.nodes[owner].peer_url
            alive = await self.peers.request(url, "coord.leases_alive", body, wire.Leases)
        living = set(alive.leases)
        for shard in shards:
            await self._run(shard.reap_leases, living)

    def _check_fence(self, b: wire.FenceCheck) -> wire.Done:
        self.host.coordination().check_fence(b.lock, b.token)
        return wire.Done()

    def _transfer_end(self, b: wire.TransferRef) -> wire.Done:
        self.host.transfer_end(b.transfer)
        return wire.Done()

    def _tail(self, b: wire.Tail) -> wire.TailReply:
        records, applied = self.host.tail((b.collection, b.shard), b.after, b.limit)
        encoded: list[bytes] = []
        size = 0
        for record in records:  # keep the reply well under the frame limit
            data = encode_record(record)
            if encoded and size + len(data) > TAIL_BYTES:
                break
            encoded.append(data)
            size += len(data)
        return wire.TailReply(encoded, applied)

    # -- moves ---------------------------------------------------------------------------------

    async def _unfreeze(self, b: wire.ShardRef) -> wire.Done:
        """The controller gave the move up: serve writes again if the map still says so."""
        snap = await self.map.refresh()
        if snap.owner(b.collection, b.shard) == self.node_id:
            self.host.activate((b.collection, b.shard))
        return wire.Done()

    async def _abort(self, b: wire.ShardRef) -> wire.Done:
        """The controller gave the move up: drop the copy, unless etcd says it is ours after
        all (a switch that committed although the controller heard an error)."""
        shard_id = (b.collection, b.shard)
        snap = await self.map.refresh()
        if snap.owner(*shard_id) == self.node_id:
            self.host.activate(shard_id)
        elif self.host.states().get(shard_id) in (State.INCOMING, State.READY):
            await self._run(self.host.drop, shard_id)
        return wire.Done()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _pull_handler(self, b: wire.Pull) -> wire.Done:
        await self.pull(b.config, b.shard, b.source)
        return wire.Done()

    async def pull(
        self, config: CollectionConfig | None, number: int, source: str, *, freeze: bool = True
    ) -> int:
        """Copy shard ``number`` of ``config`` (None: the coordination shard) from the node at
        ``source`` (see the module docstring). On success the copy here is READY and as new as
        the frozen source; without ``freeze`` (a replica, which replication then keeps up to
        date), nearly as new, and the source keeps serving. Returns the seq copied up to."""
        shard_id: ShardId = COORDINATION if config is None else (config.name, number)
        if shard_id in self._pulling:
            raise InvalidState(f"shard {shard_name(shard_id)} is being pulled here already")
        self._pulling.add(shard_id)
        ref = wire.ShardRef(collection=shard_id[0], shard=shard_id[1])
        started = time.monotonic()
        try:
            begin = await self.peers.request(
                source, "shard.transfer_begin", ref, wire.TransferBegin
            )
            # Chunks go straight to a staging directory, so a large shard does not have to
            # fit in memory; the snapshot store then moves the files into place.
            staging = self.host.staging_dir()
            files: dict[str, FileWriter] = {}
            try:
                for name, size in begin.files.items():
                    path = staging / name
                    with path.open("wb") as out:
                        for offset in range(0, size, TRANSFER_CHUNK_BYTES):
                            chunk = await self.peers.request(
                                source,
                                "shard.transfer_read",
                                wire.TransferRead(
                                    transfer=begin.transfer,
                                    name=name,
                                    offset=offset,
                                    size=TRANSFER_CHUNK_BYTES,
                                ),
                                wire.Chunk,
                            )
                            await self._run(out.write, chunk.data)
                    files[name] = functools.partial(_move_file, path)
            finally:
                with contextlib.suppress(MemclusterError):
                    await self.peers.request(
                        source,
                        "shard.transfer_end",
                        wire.TransferRef(transfer=begin.transfer),
                        wire.Done,
                    )
            try:
                await self._run(self.host.install_snapshot, shard_id, config, begin.seq, files)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            applied = begin.seq
            while True:  # catch up while the source keeps taking writes
                applied, behind = await self._catch_up(source, shard_id, applied)
                if behind <= CLOSE_ENOUGH_OPS:
                    break
            if freeze:
                final = await self.peers.request(source, "shard.freeze", ref, wire.Seq)
                while applied < final.seq:
                    applied, _ = await self._catch_up(source, shard_id, applied)
            await self._run(self.host.ready, shard_id)
            log.info(
                "pulled shard %s from %s: snapshot seq %d, %d files, up to seq %d in %.2f s",
                shard_name(shard_id),
                source,
                begin.seq,
                len(files),
                applied,
                time.monotonic() - started,
            )
            return applied
        except BaseException:
            with contextlib.suppress(Exception):
                await self._run(self.host.drop, shard_id)
            raise
        finally:
            self._pulling.discard(shard_id)

    # -- replicated shards -----------------------------------------------------------------

    async def _resync_handler(self, b: wire.ReplResync) -> wire.Done:
        self._resync((b.collection, b.shard), b.source)
        return wire.Done()

    def _resync(self, shard_id: ShardId, source: str) -> None:
        """Copy a replica again from its leader at ``source`` (any thread; runs on the loop)."""
        loop = self._loop
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._resync_shard(shard_id, source), loop)

    async def _resync_shard(self, shard_id: ShardId, source: str) -> None:
        if shard_id in self._resyncing or shard_id in self._pulling:
            return
        config = self.map.current.collections.get(shard_id[0])
        if config is None and shard_id != COORDINATION:
            return
        self._resyncing.add(shard_id)
        try:
            driver = self.replicas.pop(shard_id, None)
            if driver is not None:
                driver.close()
            self._revisions.pop(shard_id, None)
            ref = wire.ShardRef(collection=shard_id[0], shard=shard_id[1])
            history = await self.peers.request(source, "repl.history", ref, wire.History)
            await self._run(self.host.drop, shard_id)
            applied = await self.pull(config, shard_id[1], source, freeze=False)
            hosted = self.host.hosted(shard_id)
            assert hosted is not None
            mine = EpochHistory(hosted.path / "epochs.json")
            await self._run(mine.replace, history.epochs, applied)
            await self._run(mine.adopt, history.adopted)
            await self._run(self.host.set_state, shard_id, State.FOLLOWER)
            log.info(
                "shard %s: copied again from %s up to seq %d", shard_name(shard_id), source, applied
            )
        except MemclusterError as exc:
            log.warning("shard %s: copying it again failed: %s", shard_name(shard_id), exc)
        finally:
            self._resyncing.discard(shard_id)
            self._sync_needed.set()

    async def _sync_replica(
        self, snap: Snapshot, shard_id: ShardId, assignment: ShardAssignment, state: State | None
    ) -> None:
        """Keep a replicated shard's replica here in line with its map entry."""
        if self.node_id not in assignment.replicas:
            driver = self.replicas.pop(shard_id, None)
            if driver is not None:
                driver.close()
            self._revisions.pop(shard_id, None)
            if state is not None and state is not State.INCOMING:
                await self._run(self.host.drop, shard_id)
            return
        if shard_id in self._pulling or shard_id in self._resyncing:
            return
        if state is None:
            if shard_id == COORDINATION:
                await self._run(self.host.open_coordination, State.FOLLOWER)
            else:
                config = snap.collections[shard_id[0]]
                await self._run(self.host.open, config, shard_id[1], State.FOLLOWER)
        revision = snap.shard_revisions.get(shard_id, 0)
        driver = self.replicas.get(shard_id)
        if driver is None:
            hosted = self.host.hosted(shard_id)
            if hosted is None:
                return
            shard = hosted.shard
            on_role: Callable[[bool], None] = lambda leading: None  # noqa: E731
            if isinstance(shard, CoordShard):
                coord_shard = shard
                # Waiting acquires go to the new leader once this one stops leading.
                on_role = lambda leading: coord_shard.handover(not leading)  # noqa: E731
            assert isinstance(shard, Shard | CoordShard)
            coll = snap.collections.get(shard_id[0])
            driver = ReplicaDriver(
                node_id=self.node_id,
                shard_id=shard_id,
                hosted=hosted,
                shard=shard,
                assignment=assignment,
                revision=revision,
                ack=Ack.ALL if coll is None else Ack(coll.ack.value),
                on_role=on_role,
                chain=coll is not None and coll.replication is Replication.CHAIN,
                cluster=self.map.cluster,
                coord=self.coord,
                peer_url=self._peer_url,
                request=self.peers.request,
                resync=self._resync,
                loop=asyncio.get_running_loop(),
                lease_valid=lambda: self.lease_valid(),
            )
            self.replicas[shard_id] = driver
            if isinstance(shard, CoordShard):
                shard.replicated = driver.wait
        if self._revisions.get(shard_id) != revision:
            self._revisions[shard_id] = revision
            new_state = await self._run(driver.update, assignment, revision)
            # Off the loop: the shard's lock may be held by a writer waiting for acks.
            await self._run(self.host.set_state, shard_id, new_state)
        down = frozenset(n for n in assignment.replicas if n not in snap.nodes)
        await self._run(driver.nodes_down, down)

    @staticmethod
    def _is_multi(snap: Snapshot, shard_id: ShardId) -> bool:
        config = snap.collections.get(shard_id[0])
        return config is not None and config.replication is Replication.MULTI

    async def _sync_multi(
        self, snap: Snapshot, shard_id: ShardId, assignment: ShardAssignment, state: State | None
    ) -> None:
        """Keep a ``multi`` shard's replica here in line with its map entry. Every replica
        takes writes; one leaving this node first stops taking them and pushes what only it
        holds to the others."""
        if self.node_id not in assignment.replicas:
            driver = self.multis.get(shard_id)
            self._revisions.pop(shard_id, None)
            if driver is not None:
                await self._run(self.host.set_state, shard_id, State.FOLLOWER)
                driver.update(assignment, snap.shard_revisions.get(shard_id, 0))
                if not await driver.flush(10.0):  # peers may pull from it meanwhile
                    log.warning(
                        "shard %s leaves this node before every peer had all it holds;"
                        " what only it held is lost unless a peer pulled it",
                        shard_name(shard_id),
                    )
                self.multis.pop(shard_id, None)
                driver.close()
            if state is not None and state is not State.INCOMING:
                await self._run(self.host.drop, shard_id)
            return
        if shard_id in self._pulling:
            return
        config = snap.collections[shard_id[0]]
        if state is None:
            await self._run(self.host.open, config, shard_id[1], State.FOLLOWER)
        revision = snap.shard_revisions.get(shard_id, 0)
        driver = self.multis.get(shard_id)
        if driver is None:
            hosted = self.host.hosted(shard_id)
            if hosted is None or not isinstance(hosted.shard, Shard):
                return
            driver = MultiDriver(
                node_id=self.node_id,
                shard_id=shard_id,
                hosted=hosted,
                shard=hosted.shard,
                assignment=assignment,
                revision=revision,
                ack=config.ack.value,
                cluster=self.map.cluster,
                coord=self.coord,
                peer_url=self._peer_url,
                request=self.peers.request,
                loop=asyncio.get_running_loop(),
            )
            self.multis[shard_id] = driver
        if self._revisions.get(shard_id) != revision:
            self._revisions[shard_id] = revision
            new_state = driver.update(assignment, revision)
            await self._run(self.host.set_state, shard_id, new_state)
        driver.nodes_down(frozenset(n for n in assignment.replicas if n not in snap.nodes))

    async def _resign(self, shard_id: ShardId) -> None:
        """This node restarted as the leader of a replicated shard: it may have lost writes
        a follower has (and followers may hold writes it never acknowledged), so it does not
        lead on in the same epoch; it hands the choice to the controller's failover, which
        asks every replica how far it is (this one included)."""
        key = assignment_key(self.map.cluster, shard_id)
        kv = await self.coord.get(key)
        if kv is None:
            return
        current = msgspec.json.decode(kv.value, type=ShardAssignment)
        if current.leader != self.node_id:
            return
        resigned = msgspec.structs.replace(current, epoch=current.epoch + 1, leader=None)
        if await self.coord.txn([Compare(key, kv.mod_revision)], [Put(key, encode(resigned))]):
            log.info(
                "shard %s: restarted as its leader; a failover chooses the next",
                shard_name(shard_id),
            )

    def _peer_url(self, node: str) -> str | None:
        info = self.map.current.nodes.get(node)
        return None if info is None else info.peer_url

    async def _catch_up(self, source: str, shard_id: ShardId, applied: int) -> tuple[int, int]:
        """Apply one batch of the source's WAL after ``applied``: (new applied, ops behind)."""
        tail = await self.peers.request(
            source,
            "shard.tail",
            wire.Tail(collection=shard_id[0], shard=shard_id[1], after=applied, limit=TAIL_RECORDS),
            wire.TailReply,
        )
        records = [decode_record(r) for r in tail.records]
        if records:
            applied = await self._run(self.host.apply, shard_id, records)
        return applied, tail.applied - applied

    # -- following the map ---------------------------------------------------------------------

    async def run(self) -> None:
        """Open the shards held on disk that the map still gives this node, then keep the host
        in line with every change of the map until :meth:`close`."""
        await self.map.loaded.wait()
        self._loop = asyncio.get_running_loop()
        snap = self.map.current
        for shard_id in self.host.on_disk():
            assignment = snap.shards.get(shard_id)
            if assignment is None:
                continue
            multi = self._is_multi(snap, shard_id)
            if (len(assignment.replicas) > 1 or multi) and self.node_id not in assignment.replicas:
                # Replaced while this node was down: the copy here is stale.
                await self._run(self.host.drop, shard_id)
            elif multi:  # its driver makes it active
                await self._run(self.host.reopen, shard_id, State.FOLLOWER)
            elif len(assignment.replicas) > 1:
                await self._run(self.host.reopen, shard_id, State.FOLLOWER)  # until the driver says
                if assignment.leader == self.node_id:
                    await self._resign(shard_id)
            elif assignment.leader == self.node_id:
                await self._run(self.host.reopen, shard_id)
        self.map.listen(lambda _: self._sync_needed.set())
        self._sync_needed.set()
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sync_needed.wait(), 1.0)
            if self._stop.is_set():
                return
            self._sync_needed.clear()
            try:
                await self._sync(self.map.current)
            except MemclusterError as exc:
                log.warning("data plane: following the shard map: %s; retrying", exc)
            try:
                await self.reap_leases()
            except MemclusterError as exc:
                log.info("data plane: lease reaping skipped this round: %s", exc)

    async def _sync(self, snap: Snapshot) -> None:
        states = self.host.states()
        for shard_id, assignment in snap.shards.items():
            state = states.get(shard_id)
            if self._is_multi(snap, shard_id):
                await self._sync_multi(snap, shard_id, assignment, state)
            elif len(assignment.replicas) > 1 or shard_id in self.replicas:
                await self._sync_replica(snap, shard_id, assignment, state)
            elif assignment.leader == self.node_id:
                if state is None and shard_id not in self._pulling:
                    if assignment.epoch > 1:
                        log.warning(
                            "shard %s (epoch %d) is assigned here but its data is not: "
                            "opening it empty",
                            shard_name(shard_id),
                            assignment.epoch,
                        )
                    if shard_id == COORDINATION:
                        await self._run(self.host.open_coordination)
                    else:
                        config = snap.collections[shard_id[0]]
                        await self._run(self.host.open, config, shard_id[1])
                elif state is State.READY:
                    self.host.activate(shard_id)
            elif state in (State.ACTIVE, State.FROZEN):
                await self._run(self.host.drop, shard_id)
        for shard_id, state in states.items():
            if shard_id not in snap.shards and state is not State.INCOMING:
                driver = self.replicas.pop(shard_id, None)
                if driver is not None:
                    driver.close()
                multi = self.multis.pop(shard_id, None)
                if multi is not None:
                    multi.close()
                await self._run(self.host.drop, shard_id)  # its collection was dropped
        now = time.monotonic()
        for shard_id, (since, rehoming) in self.host.frozen().items():
            if rehoming is not None and snap.collections.get(shard_id[0]) == rehoming:
                # The controller switched the layout: finish the rehome here (it may have
                # died before telling us; finishing twice is harmless).
                await self._run(
                    self._rehome_finish, wire.Rehome(config=rehoming, shard=shard_id[1])
                )
            elif now - since > (REHOME_TIMEOUT_S if rehoming else self.move_timeout_s):
                await self._reclaim(shard_id)

    async def _reclaim(self, shard_id: ShardId) -> None:
        """A move froze this shard and never finished: take it back by an etcd txn that bumps
        the epoch, so a late switch (conditioned on the old revision) fails."""
        key = assignment_key(self.map.cluster, shard_id)
        kv = await self.coord.get(key)
        if kv is None:
            return
        current = msgspec.json.decode(kv.value, type=ShardAssignment)
        if current.leader != self.node_id:
            return
        bumped = msgspec.structs.replace(current, epoch=current.epoch + 1)
        if await self.coord.txn([Compare(key, kv.mod_revision)], [Put(key, encode(bumped))]):
            log.warning("shard %s: a move stalled; serving writes again", shard_name(shard_id))
            self.host.activate(shard_id)
