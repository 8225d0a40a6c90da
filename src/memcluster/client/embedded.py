"""The embedded database: memcluster in the agent's own process, no server, no network.

``memcluster.open(path)`` returns a :class:`Database`; its collections have the same methods,
arguments, results and errors as the network clients' (names may grow, never change)::

    import memcluster
    with memcluster.open("./data") as db:
        coll = db.create_collection("memories", dim=384, metric="cosine", shards=4)
        coll.put(namespace=("team-a", "agent-7"), key="m1", text="...", vector=vec)
        hits = coll.search(vector=q, k=10, namespace=("team-a",), filter={"speaker": "Alice"})

Data directory layout::

    DIR/LOCK                                   held (flock) by the process that has DIR open
    DIR/collections/NAME/config.json           the CollectionConfig, written atomically
    DIR/collections/NAME/shard-0000/wal/       that shard's WAL segments
    DIR/collections/NAME/shard-0000/snapshots/ its snapshots
    DIR/coordination/{wal,snapshots}/          leases, locks, semaphores, counters

A collection's memories are spread over its shards by a
:class:`~memcluster.shard.sharding.Sharder` (hash, range or vector sharding; the hash is
:func:`memcluster.core.hashing.shard_of`, the one the cluster uses), reads touch only the
shards it says may hold a match, and results are merged across shards (top-k by score, ties
by namespace and key).

Under range and vector sharding a key may live in any shard and moves when its field or
vector changes: a put locks every shard of the collection, finds the memory wherever it is,
checks ``if_version`` against that, writes the new shard's record, syncs it (as the
durability level asks), then writes the delete in the old shard. The two records are in
different WALs: a crash between them can leave both copies, never none; reads then return
the newest (by ``updated_at``; ``count`` counts both) and the next put or delete of the key
removes the other. Reads over several shards are not one snapshot: a search racing a move
may miss the memory or see it twice (duplicates are dropped, newest kept). The change feed
shows a move as a put in the new shard only: the old copy's delete is recorded with reason
``MOVED``, which the feed skips.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import msgspec

from memcluster.client.blackboard import Blackboard
from memcluster.core import validation
from memcluster.core.api import Consistency
from memcluster.core.clock import Clock, SystemClock
from memcluster.core.codec import Record, from_json, to_json
from memcluster.core.config import Config
from memcluster.core.errors import (
    CollectionExists,
    CollectionNotFound,
    InvalidArgument,
    InvalidState,
    LeaseExpired,
    PayloadTooLarge,
    StaleToken,
    VersionConflict,
)
from memcluster.core.types import (
    Ack,
    CollectionConfig,
    CollectionInfo,
    CollectionStats,
    Durability,
    Event,
    Eviction,
    Hit,
    Memory,
    Message,
    Metric,
    Page,
    SearchResult,
    Sharding,
)
from memcluster.index.filters import Filter, compile_filter
from memcluster.shard.coord import CoordShard
from memcluster.shard.feed import FeedReader, TopicReader, encode_cursor
from memcluster.shard.maintenance import Maintained, Maintainer
from memcluster.shard.prepare import (
    decode_list_cursor,
    encode_list_cursor,
    payload_json,
    prepare_puts,
)
from memcluster.shard.shard import Key, PreparedPut, Shard
from memcluster.shard.sharding import Sharder, check_config, config_fields
from memcluster.storage.files import fsync_path
from memcluster.storage.snapshot import SnapshotStore
from memcluster.storage.wal import FileWal

log = logging.getLogger("memcluster")

Namespace = tuple[str, ...] | Sequence[str]


def open(
    path: str | os.PathLike[str], config: Config | None = None, *, clock: Clock | None = None
) -> Database:
    """Open (creating if needed) the database in directory ``path``.

    Only one process may have a directory open; a second gets InvalidState. Recovery (snapshot
    plus WAL replay) runs here, so every acknowledged write is back when this returns.
    """
    return Database(Path(path), config or Config(), clock or SystemClock())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    fsync_path(path.parent)


class Database:
    """An open data directory and its collections. Thread-safe. Use as a context manager."""

    def __init__(self, path: Path, config: Config, clock: Clock) -> None:
        self.path = path
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        path.mkdir(parents=True, exist_ok=True)
        self._lock_file = (path / "LOCK").open("a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise InvalidState(
                f"data directory {path} is in use by another process; stop it or use another"
                " directory"
            ) from None
        self._lock_file.truncate(0)
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()
        self._collections: dict[str, Collection] = {}
        # Searches fan out over shards on these threads: hnswlib and numpy release the GIL.
        self._pool = ThreadPoolExecutor(
            max_workers=config.search_threads, thread_name_prefix="memcluster-search"
        )
        root = path / "collections"
        root.mkdir(exist_ok=True)
        try:
            self._coord = CoordShard.open(path / "coordination", config, clock)
            for entry in sorted(root.iterdir()):
                if entry.name.startswith(".") or not (entry / "config.json").exists():
                    continue
                coll_config = from_json((entry / "config.json").read_bytes(), CollectionConfig)
                self._collections[coll_config.name] = Collection(self, coll_config, entry)
        except BaseException:
            self._close_all()
            raise
        self._reaper = _LeaseReaper(self)
        self._maintainer: Maintainer | None = None
        if config.background:
            self._maintainer = Maintainer(self._maintained, config)
            self._maintainer.start()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Database:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop background work, sync every WAL and release the directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._maintainer is not None:
            self._maintainer.stop()
        self._close_all()

    def _close_all(self) -> None:
        self._pool.shutdown(wait=True)
        for coll in self._collections.values():
            coll._close()
        if hasattr(self, "_coord"):
            self._coord.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidState(f"database {self.path} is closed; open it again")

    def _all_shards(self) -> list[Shard]:
        with self._lock:
            return [s for c in self._collections.values() for s in c._shards]

    def _maintained(self) -> list[Maintained]:
        return [self._coord, self._reaper, *self._all_shards()]

    def _live_lease(self, lease: object) -> int:
        """A memory's ``lease`` option as the id to record (0: none), checked alive."""
        if lease is None:
            return 0
        if isinstance(lease, bool) or not isinstance(lease, int) or lease < 1:
            raise InvalidArgument(f"lease is {lease!r}; pass an id that grant_lease returned")
        if not self._coord.lease_alive(lease):
            raise LeaseExpired(
                f"lease {lease} does not exist or has expired: grant a new one with"
                " grant_lease(ttl_s)"
            )
        return lease

    def maintain(self) -> None:
        """Run background work (indexing, TTL sweeps, snapshots) to completion, now.

        The background thread does this on its own; call it when ``Config(background=False)``
        or to make sure every fresh write is in the graph before measuring.
        """
        self._check_open()
        for shard in self._maintained():
            while shard.maintain():
                pass

    # -- coordination: leases, locks, semaphores, counters ------------------------------------

    def grant_lease(self, ttl_s: float) -> int:
        """A lease that ends ``ttl_s`` seconds from now unless kept alive; returns its id.

        Locks and permits acquired with ``lease=`` are released when it ends: an agent's
        hold on shared state dies with the agent.
        """
        self._check_open()
        return self._coord.grant_lease(ttl_s)

    def keepalive(self, lease: int) -> float:
        """Extend ``lease`` by its TTL from now; returns the new expiry (seconds since the
        epoch). LeaseExpired if it has already ended."""
        self._check_open()
        return self._coord.keepalive(lease)

    def revoke(self, lease: int) -> None:
        """End ``lease`` now, releasing everything held under it."""
        self._check_open()
        self._coord.revoke(lease)

    def acquire_lock(
        self, name: str, ttl_s: float = 10.0, timeout_s: float = 30.0, lease: int | None = None
    ) -> int:
        """Wait, first come first served, for lock ``name``; returns its **fencing token**.

        Tokens grow with every grant, across restarts. Pass ``fence=(name, token)`` to writes
        made under the lock: the store refuses them (StaleToken) once the token no longer
        holds it. The lock is held until ``release_lock``, or until ``ttl_s`` passes (or
        ``lease`` ends, when given). Timeout if not granted within ``timeout_s``.
        """
        self._check_open()
        return self._coord.acquire_lock(name, ttl_s, timeout_s, lease)

    def release_lock(self, name: str, token: int) -> None:
        """Release lock ``name``; StaleToken if ``token`` no longer holds it."""
        self._check_open()
        self._coord.release_lock(name, token)

    # -- topics --------------------------------------------------------------------------------

    def publish(self, topic: str, payload: Any) -> int:
        """Send ``payload`` (any JSON value) to every subscriber of ``topic``; returns its seq.

        Topics are durable: messages are kept like change-feed events
        (``feed_retention_events``), so a subscriber resumes from a cursor with no gap."""
        self._check_open()
        return self._coord.publish(topic, payload_json(payload, self.config))

    def subscribe(
        self,
        topic: str,
        cursor: str | None = None,
        group: str | None = None,
        idle_timeout_s: float | None = None,
    ) -> Iterator[Message]:
        """The messages of ``topic``, as they are published: from now (``cursor=None``) or
        right after a message's ``cursor``. Blocks between messages; ends when the database
        closes or after ``idle_timeout_s`` without one. Consumer groups (``group``) are not
        supported yet."""
        reader = self.topic_reader(topic, cursor, group)
        wake = threading.Event()
        reader.listen(wake.set)
        try:
            yield from _follow(reader.poll, wake, lambda: self._closed, idle_timeout_s)
        finally:
            reader.unlisten(wake.set)

    def topic_reader(
        self, topic: str, cursor: str | None = None, group: str | None = None
    ) -> TopicReader:
        """The non-blocking reader under :meth:`subscribe`, for servers."""
        self._check_open()
        validation.key(topic, self.config)
        if group is not None:
            raise InvalidArgument("consumer groups are not supported yet: subscribe without group=")
        return TopicReader(self._coord, topic, cursor, self.config.feed_batch_events)

    def blackboard(self, collection: str, board: Sequence[str]) -> Blackboard:
        """The namespace ``board`` of ``collection`` as a blackboard (see
        :mod:`memcluster.client.blackboard`): watch it, or register knowledge sources."""
        return Blackboard(self, collection, board)

    @contextlib.contextmanager
    def lock(
        self, name: str, ttl_s: float = 10.0, timeout_s: float = 30.0, lease: int | None = None
    ) -> Iterator[int]:
        """``with db.lock("deploy") as token:`` acquire, yield the fencing token, release."""
        token = self.acquire_lock(name, ttl_s, timeout_s, lease)
        try:
            yield token
        finally:
            with contextlib.suppress(StaleToken):
                self.release_lock(name, token)

    def acquire_semaphore(
        self,
        name: str,
        permits: int,
        ttl_s: float = 10.0,
        timeout_s: float = 30.0,
        lease: int | None = None,
    ) -> int:
        """Wait (first come, first served) for one of ``permits`` permits of semaphore
        ``name``; returns the permit's token. Held like a lock (see ``acquire_lock``)."""
        self._check_open()
        return self._coord.acquire_semaphore(name, permits, ttl_s, timeout_s, lease)

    def release_semaphore(self, name: str, token: int) -> None:
        """Give back a permit; StaleToken if it is no longer held."""
        self._check_open()
        self._coord.release_semaphore(name, token)

    def incr(self, key: str, delta: int = 1) -> int:
        """Atomically add ``delta`` to counter ``key`` (absent = 0); returns the new value."""
        self._check_open()
        return self._coord.incr(key, delta)

    def counter(self, key: str) -> int:
        """The value of counter ``key`` (0 if never incremented)."""
        self._check_open()
        return self._coord.counter(key)

    # -- collections ---------------------------------------------------------------------------

    def create_collection(
        self,
        name: str,
        dim: int,
        metric: Metric | str = Metric.COSINE,
        shards: int = 1,
        *,
        ttl_s: float | None = None,
        capacity_items: int | None = None,
        capacity_bytes: int | None = None,
        namespace_capacity_items: int | None = None,
        eviction: Eviction | str = Eviction.NONE,
        durability: Durability | str | None = None,
        sharding: Sharding | str = Sharding.HASH,
        shard_key: str = "key",
        range_field: str | None = None,
        boundaries: Sequence[float] | None = None,
        centroids: Any = None,
        sample: Any = None,
        nprobe: int | None = None,
        split_items: int | None = None,
        train_after: int | None = None,
        replication_factor: int = 1,
        replication: str = "leader",
        ack: str = "all",
    ) -> Collection:
        """Create a collection of ``dim``-dimensional vectors; CollectionExists if it exists.

        ``capacity_items``/``capacity_bytes``/``namespace_capacity_items`` bound its size, with
        ``eviction`` saying what a full collection does ("none" rejects writes). ``ttl_s`` is the
        default time to live of memories written without their own.

        ``shards`` spreads memories over that many shards, as ``sharding`` says (the fields are
        documented on :class:`~memcluster.core.types.CollectionConfig`)::

            # hash (default): even spread by (namespace, key); or keep each agent's memories
            # on one shard, so a search under ("team-a", "agent-7") touches only that shard
            db.create_collection("m", dim=384, shards=8, shard_key="namespace:2")
            # range: by a number in the metadata; a filter on it searches only its shards
            db.create_collection("log", dim=384, shards=3, sharding="range",
                                 range_field="day", boundaries=[100, 200])  # <100, <200, rest
            # vector: by nearest centroid, k-means of a sample of your vectors (n x dim);
            # searches probe the 2 nearest shards unless they pass nprobe=0 (all)
            db.create_collection("docs", dim=384, shards=16, sharding="vector",
                                 sample=vectors[:5000], nprobe=2)

        ``centroids`` (shards x dim) may be given instead of ``sample``. A config whose fields
        do not fit together is refused with InvalidArgument saying what to change.

        In a cluster the layout can also grow: ``split_items=N`` splits a range shard holding
        more than N memories at its median, and ``train_after=N`` (vector sharding without
        centroids) learns the centroids by k-means once N memories arrived, and
        ``replication_factor=3`` keeps each shard on 3 nodes: a leader and followers it streams
        its log to, with ``ack`` saying when a write is acknowledged ("all" in-sync replicas,
        "majority", or "leader" alone). When the leader's node dies, a follower holding every
        acknowledged write takes over.
        """
        coll_config = self._make_config(
            name=name,
            dim=dim,
            metric=metric,
            shards=shards,
            ttl_s=ttl_s,
            capacity_items=capacity_items,
            capacity_bytes=capacity_bytes,
            namespace_capacity_items=namespace_capacity_items,
            eviction=eviction,
            durability=durability,
            **config_fields(
                metric=metric,
                shards=shards,
                sharding=sharding,
                shard_key=shard_key,
                range_field=range_field,
                boundaries=boundaries,
                centroids=centroids,
                sample=sample,
                nprobe=nprobe,
                split_items=split_items,
                train_after=train_after,
                replication_factor=replication_factor,
                replication=replication,
                ack=ack,
            ),
        )
        return self.create_collection_from(coll_config)

    def create_collection_from(self, config: CollectionConfig) -> Collection:
        """Create a collection from a whole config (what a server receives); see above."""
        self._check_open()
        coll_config = self._make_config(**msgspec.structs.asdict(config))
        name = coll_config.name
        with self._lock:
            if name in self._collections:
                raise CollectionExists(f"collection {name!r} exists already; use db.collection()")
            if len(self._collections) >= self.config.collections_max:
                raise InvalidArgument(
                    f"this database holds {self.config.collections_max} collections, the limit"
                )
            where = self.path / "collections" / name
            if where.exists():
                shutil.rmtree(where)
            where.mkdir(parents=True)
            _write_atomic(where / "config.json", to_json(coll_config))
            fsync_path(where.parent)
            coll = Collection(self, coll_config, where)
            self._collections[name] = coll
            return coll

    def _make_config(self, **fields: Any) -> CollectionConfig:
        validation.collection_name(fields["name"])
        validation.int_in_range("dim", fields["dim"], 1, self.config.dim_max)
        validation.int_in_range("shards", fields["shards"], 1, self.config.shards_max)
        for limit in ("capacity_items", "capacity_bytes", "namespace_capacity_items"):
            if fields[limit] is not None:
                validation.int_in_range(limit, fields[limit], 1, 2**63 - 1)
        fields["ttl_s"] = validation.ttl(fields["ttl_s"])
        try:
            config: CollectionConfig = msgspec.convert(fields, CollectionConfig)
        except msgspec.ValidationError as exc:
            raise InvalidArgument(f"collection config: {exc}") from None
        config = check_config(config)
        if config.replication_factor > 1:
            raise InvalidArgument(
                f"replication_factor={config.replication_factor} keeps copies on other nodes,"
                " which a cluster does (memcluster up / memcluster node); one process has one"
                " copy: leave replication_factor at 1"
            )
        if config.split_items is not None or config.train_after is not None:
            raise InvalidArgument(
                "split_items and train_after change a collection's layout as it grows, which a"
                " cluster does (memcluster up / memcluster node); one process keeps its layout"
                " fixed: give boundaries or centroids instead"
            )
        return config

    def collection(self, name: str) -> Collection:
        """The existing collection ``name``; CollectionNotFound if there is none."""
        self._check_open()
        with self._lock:
            coll = self._collections.get(name)
        if coll is None:
            raise CollectionNotFound(
                f"no collection named {name!r}; db.list_collections() lists them, "
                "db.create_collection() makes one"
            )
        return coll

    def list_collections(self) -> list[str]:
        """Names of every collection, sorted."""
        self._check_open()
        with self._lock:
            return sorted(self._collections)

    def drop_collection(self, name: str) -> None:
        """Delete collection ``name`` and all its data; CollectionNotFound if there is none."""
        self._check_open()
        with self._lock:
            coll = self._collections.pop(name, None)
            if coll is None:
                raise CollectionNotFound(f"no collection named {name!r} to drop")
        coll._close()
        graveyard = coll.path.with_name(f".dropped-{name}-{os.getpid()}-{id(coll)}")
        coll.path.rename(graveyard)
        fsync_path(graveyard.parent)
        shutil.rmtree(graveyard, ignore_errors=True)


T = TypeVar("T")


def _follow(
    poll: Callable[[], list[T]],
    wake: threading.Event,
    closed: Callable[[], bool],
    idle_timeout_s: float | None,
) -> Iterator[T]:
    """Yield what ``poll`` returns, waiting on ``wake`` (set by a listener) in between."""
    idle_since = time.monotonic()
    while not closed():
        items = poll()
        if not items:
            wake.clear()
            items = poll()  # something arrived between the poll and the clear
        if items:
            yield from items
            idle_since = time.monotonic()
            continue
        wait_s = 0.5
        if idle_timeout_s is not None:
            left = idle_timeout_s - (time.monotonic() - idle_since)
            if left <= 0:
                return
            wait_s = min(wait_s, left)
        wake.wait(wait_s)


class _LeaseReaper:
    """Deletes the memories of leases that ended, from the background step (and after a
    restart, since it compares what shards reference with the leases alive)."""

    name = "lease reaper"

    def __init__(self, db: Database) -> None:
        self._db = db

    def maintain(self) -> bool:
        shards = self._db._all_shards()
        referenced = set().union(*(shard.leases() for shard in shards)) if shards else set()
        if not referenced:
            return False
        alive = {lease for lease in referenced if self._db._coord.lease_alive(lease)}
        more = False
        for shard in shards:
            more |= shard.reap_leases(alive) >= self._db.config.expire_batch_items_max
        return more


def _newest(items: list[T], memory_of: Callable[[T], Memory]) -> list[T]:
    """``items`` with one per (namespace, key): the newest memory by ``updated_at`` (two
    copies exist only after a crash in the middle of a move, or in a read racing a move)."""
    best: dict[Key, T] = {}
    for item in items:
        m = memory_of(item)
        seen = best.get((m.namespace, m.key))
        if seen is None or memory_of(seen).updated_at < m.updated_at:
            best[(m.namespace, m.key)] = item
    return list(best.values()) if len(best) < len(items) else items


class Collection:
    """A named set of memories. Get one from ``db.create_collection()`` or ``db.collection()``."""

    def __init__(self, db: Database, config: CollectionConfig, path: Path) -> None:
        self._db = db
        self.config = config
        self.path = path
        self._sharder = Sharder(config)
        self._shards: list[Shard] = []
        try:
            for i in range(config.shards):
                where = path / f"shard-{i:04d}"
                wal = FileWal.open(where / "wal", db.config)
                self._shards.append(
                    Shard.open(
                        config,
                        db.config,
                        wal,
                        db._clock,
                        snapshots=SnapshotStore(where / "snapshots"),
                        name=f"{config.name}/shard-{i:04d}",
                    )
                )
        except BaseException:
            self._close()
            raise

    @property
    def name(self) -> str:
        return self.config.name

    def _close(self) -> None:
        for shard in self._shards:
            shard.close()

    def _locate(self, namespace: Namespace, key: str) -> tuple[Shard | None, tuple[str, ...], str]:
        """Validate (namespace, key) and find the shard that holds it (None: it may be in any
        shard, under range and vector sharding)."""
        self._db._check_open()
        ns = validation.namespace(namespace, self._db.config)
        k = validation.key(key, self._db.config)
        shard_no = self._sharder.key_shard(ns, k)
        return None if shard_no is None else self._shards[shard_no], ns, k

    def _holders(self, keys: Sequence[Key]) -> list[dict[int, tuple[int, float, float]]]:
        """Per key: {shard: (version, 0 if expired; created_at; updated_at)} of the shards that
        have a slot for it. Caller holds every shard's lock."""
        found: list[dict[int, tuple[int, float, float]]] = [{} for _ in keys]
        for shard_no, shard in enumerate(self._shards):
            for where, info in zip(found, shard.located(keys), strict=True):
                if info is not None:
                    where[shard_no] = info
        return found

    @staticmethod
    def _current(holders: dict[int, tuple[int, float, float]]) -> int | None:
        """The shard of the live copy (the newest by updated_at, ties: the lowest shard)."""
        live = [(-info[2], shard_no) for shard_no, info in holders.items() if info[0]]
        return min(live)[1] if live else None

    # -- writes --------------------------------------------------------------------------------

    def _prepare(self, memories: Sequence[Memory]) -> tuple[list[PreparedPut], list[int]]:
        """The validated batch and the shard of each memory."""
        prepared, matrix = prepare_puts(
            memories, self.config, self._db.config, self._db._live_lease
        )
        targets = self._sharder.place(
            [p.namespace for p in prepared],
            [p.key for p in prepared],
            matrix,
            [m.metadata for m in memories],
        )
        return prepared, targets

    def put(
        self,
        namespace: Namespace,
        key: str,
        text: str | None = None,
        vector: Any = None,
        metadata: Mapping[str, Any] | None = None,
        ttl_s: float | None = None,
        if_version: int | None = None,
        fence: tuple[str, int] | None = None,
        lease: int | None = None,
    ) -> int:
        """Insert or replace the memory at (namespace, key); returns its new version.

        ``if_version=0`` writes only if the memory is absent, ``if_version=N`` only if its
        version is N (else VersionConflict). ``ttl_s`` makes it expire (default: the
        collection's ``ttl_s``). ``fence=(lock, token)`` writes only while ``token`` holds
        the lock (else StaleToken). ``lease`` attaches the memory to a lease
        (``db.grant_lease``): it is deleted when the lease ends, so an agent's working memory
        dies with the agent. Acknowledged after fsync unless the collection's durability says
        otherwise.
        """
        memory = Memory(
            # Validated in put_many; a list is accepted as a tuple.
            namespace=cast(
                tuple[str, ...], tuple(namespace) if isinstance(namespace, list) else namespace
            ),
            key=key,
            text=text,
            vector=vector,
            metadata=cast(dict[str, Any], {} if metadata is None else metadata),
            ttl_s=ttl_s,
            if_version=if_version,
            lease=lease,
        )
        return self.put_many([memory], fence=fence)[0]

    def put_many(
        self,
        memories: Sequence[Memory],
        idempotency_key: str | None = None,
        fence: tuple[str, int] | None = None,
        ack: Ack | str | None = None,
        w: int | None = None,
    ) -> list[int]:
        """Write a batch; returns the versions in input order.

        The whole batch is validated and checked (versions, capacity) on every shard before
        anything is written: a rejected batch writes nothing. Retrying with the same
        ``idempotency_key`` returns the first call's versions without writing twice.
        ``fence=(lock, token)``: written only while ``token`` holds the lock (see
        ``Database.acquire_lock``); StaleToken otherwise, and nothing is written.
        ``ack`` ("all", "majority", "leader") overrides the collection's acknowledgement
        policy for this write in a cluster; ``w`` (a ``replication="multi"`` collection in a
        cluster) acknowledges once that many replicas hold it. One process has one copy.
        """
        if ack is not None:
            validation.enum_value("ack", ack, Ack)
        if w is not None:
            validation.int_in_range("w", w, 1, 1)
        self._db._check_open()
        with self._fenced(fence):
            return self._put_many(memories, idempotency_key)

    def _fenced(self, fence: tuple[str, int] | None) -> contextlib.AbstractContextManager[None]:
        if fence is None:
            return contextlib.nullcontext()
        if (
            not isinstance(fence, tuple | list)
            or len(fence) != 2
            or not isinstance(fence[0], str)
            or isinstance(fence[1], bool)
            or not isinstance(fence[1], int)
        ):
            raise InvalidArgument(
                f"fence is {fence!r}; pass (lock name, token) as acquire_lock returned it"
            )
        return self._db._coord.fenced(fence[0], fence[1])

    def _put_many(self, memories: Sequence[Memory], idempotency_key: str | None) -> list[int]:
        cfg = self._db.config
        if len(memories) > cfg.batch_items_max:
            raise PayloadTooLarge(
                f"batch has {len(memories)} memories; the limit is {cfg.batch_items_max}: split it"
            )
        if not memories:
            return []
        if idempotency_key is not None:
            validation.key(idempotency_key, cfg)
        prepared, targets = self._prepare(memories)
        by_shard: dict[int, list[int]] = {}
        for i, shard_no in enumerate(targets):
            by_shard.setdefault(shard_no, []).append(i)
        keyed = self._sharder.keyed
        versions = [0] * len(prepared)
        tokens: list[tuple[Shard, int]] = []
        with ExitStack() as stack:
            # Keyed: the target shards, in order. Otherwise every shard (in order): the
            # memory may be anywhere, and must end up in its target shard only.
            for shard_no in sorted(by_shard) if keyed else range(len(self._shards)):
                stack.enter_context(self._shards[shard_no].lock)
            holders: list[dict[int, tuple[int, float, float]]] = []
            conflicts: dict[int, tuple[int, int]] = {}
            if not keyed:
                holders = self._holders([(p.namespace, p.key) for p in prepared])
                prepared, conflicts = self._moved(prepared, targets, holders)
            plans = {
                shard_no: self._shards[shard_no].plan_put(
                    [prepared[i] for i in positions], idempotency_key
                )
                for shard_no, positions in sorted(by_shard.items())
            }
            deletes = self._move_deletes(prepared, targets, holders, conflicts, plans)
            # Puts before deletes: a crash between two shards' records then leaves two copies
            # (reads take the newest) rather than none.
            for shard_no, plan in plans.items():
                shard = self._shards[shard_no]
                if isinstance(plan, list):
                    got = plan
                else:
                    token, got = shard.write_planned(plan)
                    tokens.append((shard, token))
                for i, version in zip(by_shard[shard_no], got, strict=True):
                    versions[i] = version
            if deletes:
                # A move: the new copy is durable (as durable as the collection asks) before
                # the old one is deleted, so no crash loses both. Only moves pay this fsync
                # under the locks.
                for shard, token in tokens:
                    shard.commit(token)
            for shard_no, record in deletes:
                token, _ = self._shards[shard_no].write_planned(record)
                tokens.append((self._shards[shard_no], token))
        for shard, token in tokens:
            shard.commit(token)
        return versions

    def _moved(
        self,
        prepared: list[PreparedPut],
        targets: list[int],
        holders: list[dict[int, tuple[int, float, float]]],
    ) -> tuple[list[PreparedPut], dict[int, tuple[int, int]]]:
        """Range and vector sharding: the batch with each memory that moves in from another
        shard stripped of ``if_version`` (its target shard would compare it with "absent") and
        given its creation time; and {item: (expected, actual)} of the moves whose
        ``if_version`` does not match the current version."""
        out = list(prepared)
        conflicts: dict[int, tuple[int, int]] = {}
        for i, (p, target) in enumerate(zip(prepared, targets, strict=True)):
            current = self._current(holders[i])
            if current is None or current == target:
                continue  # the target shard checks if_version itself
            version, created, _ = holders[i][current]
            if p.if_version is not None and p.if_version != version:
                conflicts[i] = (p.if_version, version)
            out[i] = msgspec.structs.replace(p, if_version=None, created_at=created)
        return out, conflicts

    def _move_deletes(
        self,
        prepared: list[PreparedPut],
        targets: list[int],
        holders: list[dict[int, tuple[int, float, float]]],
        conflicts: dict[int, tuple[int, int]],
        plans: Mapping[int, list[int] | Record],
    ) -> list[tuple[int, Record]]:
        """The delete records (shard, record) that remove moved memories from their old
        shards, planned before anything is written; VersionConflict for a failed move.

        An item whose target shard has seen the idempotency key was written already: it
        raises no conflict and only removes copies older than its target's (left by a crash
        between the records of the first call)."""
        keys: dict[int, list[Key]] = {}
        for i, (p, target) in enumerate(zip(prepared, targets, strict=True)):
            if not holders or not holders[i]:
                continue
            replayed = isinstance(plans[target], list)
            if not replayed and i in conflicts:
                expected, actual = conflicts[i]
                raise VersionConflict(
                    f"{self.name}: {p.namespace}/{p.key!r} is at version {actual}, the write"
                    f" expected {expected} (0 = absent); read it again and retry with its"
                    " current version",
                    expected=expected,
                    actual=actual,
                )
            if replayed and self._current(holders[i]) not in (None, target):
                continue  # moved on since the first call: leave it
            for shard_no in holders[i]:
                if shard_no != target:
                    keys.setdefault(shard_no, []).append((p.namespace, p.key))
        out: list[tuple[int, Record]] = []
        for shard_no, shard_keys in sorted(keys.items()):
            plan = plans.get(shard_no)
            after = plan if isinstance(plan, Record) else None
            record, _ = self._shards[shard_no].plan_delete(shard_keys, after, moved=True)
            if record is not None:
                out.append((shard_no, record))
        return out

    def delete(self, namespace: Namespace, key: str, fence: tuple[str, int] | None = None) -> bool:
        """Delete the memory at (namespace, key); True if it existed. ``fence``: as in put."""
        shard, ns, k = self._locate(namespace, key)
        with self._fenced(fence):
            if shard is not None:
                return shard.delete(ns, k)
            return self._delete_anywhere(ns, k)

    def _delete_anywhere(self, namespace: tuple[str, ...], key: str) -> bool:
        """Delete (namespace, key) from every shard that holds it, under all their locks."""
        tokens: list[tuple[Shard, int]] = []
        live = 0
        with ExitStack() as stack:
            for shard in self._shards:
                stack.enter_context(shard.lock)
            plans = [(shard, shard.plan_delete([(namespace, key)])) for shard in self._shards]
            for shard, (record, n) in plans:
                live += n
                if record is not None:
                    tokens.append((shard, shard.write_planned(record)[0]))
        for shard, token in tokens:
            shard.commit(token)
        return live > 0

    def delete_where(
        self, namespace: Namespace | None = None, filter: Mapping[str, Any] | None = None
    ) -> int:
        """Delete every memory under the namespace prefix matching the filter; returns how many.

        With neither argument it empties the collection.
        """
        prefix, flt = self._scope(namespace, filter)
        shards = self._sharder.search_shards(prefix, filter)
        return sum(self._shards[i].delete_where(prefix, flt) for i in shards)

    # -- reads ---------------------------------------------------------------------------------

    def _scope(
        self, namespace: Namespace | None, filter: Mapping[str, Any] | None
    ) -> tuple[tuple[str, ...], Filter]:
        self._db._check_open()
        prefix = validation.namespace(namespace, self._db.config, allow_empty=True)
        return prefix, compile_filter(filter)

    def get(
        self,
        namespace: Namespace,
        key: str,
        consistency: Consistency | str = Consistency.STRONG,
        r: int | None = None,
    ) -> Memory | None:
        """The memory at (namespace, key) with its vector, or None if absent or expired.

        In a cluster (see :class:`~memcluster.core.api.Consistency`): "strong" reads at the
        shard's leader, "session" sees this client's writes, "eventual" reads any replica,
        and "quorum" reads ``r`` replicas of a ``replication="multi"`` collection (None: a
        majority) and returns the newest. One process has one copy, always up to date."""
        validation.enum_value("consistency", consistency, Consistency)
        if r is not None:
            validation.int_in_range("r", r, 1, 1)
        shard, ns, k = self._locate(namespace, key)
        if shard is not None:
            return shard.get(ns, k)
        with ExitStack() as stack:
            for each in self._shards:
                stack.enter_context(each.lock)
            current = self._current(self._holders([(ns, k)])[0])
            return None if current is None else self._shards[current].get_held(ns, k)

    def search(
        self,
        vector: Any,
        k: int = 10,
        namespace: Namespace | None = None,
        filter: Mapping[str, Any] | None = None,
        include_vectors: bool = False,
        consistency: Consistency | str = Consistency.STRONG,
        nprobe: int | None = None,
        allow_partial: bool = False,
        r: int | None = None,
    ) -> SearchResult:
        """The ``k`` memories most similar to ``vector``, best first.

        ``namespace`` restricts the search to a namespace prefix (``("team-a",)`` covers
        ``("team-a", "agent-7")``); ``filter`` is a metadata filter such as
        ``{"speaker": "Alice", "session": {"$gte": 3}}``, which may also bound
        ``$created_at``/``$updated_at``. Scores are higher-is-better (see Metric).
        ``consistency`` and ``r`` are as in :meth:`get`: one process holds the only copy, so
        every level reads the latest write.

        Only the shards that may hold a match are searched (see
        :mod:`memcluster.shard.sharding`). Under vector sharding ``nprobe`` shards are probed,
        those whose centroids are nearest the query (None: the collection's ``nprobe``; 0 or
        >= shards: all, exact); fewer is faster and may miss memories. ``allow_partial``:
        answer from the shards that can, listing the others in ``result.missing_shards``
        (embedded, every shard always answers, so it is empty).
        """
        cfg = self._db.config
        validation.int_in_range("k", k, 1, cfg.search_k_max)
        validation.enum_value("consistency", consistency, Consistency)
        if r is not None:
            validation.int_in_range("r", r, 1, 1)
        if nprobe is not None:
            validation.int_in_range("nprobe", nprobe, 0, cfg.shards_max)
        if not isinstance(allow_partial, bool):
            raise InvalidArgument(f"allow_partial must be True or False, got {allow_partial!r}")
        prefix, flt = self._scope(namespace, filter)
        query = validation.query_vector(vector, self.config.dim, self.config.metric)
        shards = [
            self._shards[i] for i in self._sharder.search_shards(prefix, filter, query, nprobe)
        ]
        if len(shards) == 1:
            return SearchResult(shards[0].search(query, k, prefix, flt, include_vectors))
        hits: list[Hit] = []
        for found in self._db._pool.map(
            lambda shard: shard.search(query, k, prefix, flt, include_vectors), shards
        ):
            hits.extend(found)
        if not self._sharder.keyed:
            hits = _newest(hits, lambda h: h.memory)
        hits.sort(key=lambda h: (-h.score, h.memory.namespace, h.memory.key))
        return SearchResult(hits[:k])

    def count(
        self, namespace: Namespace | None = None, filter: Mapping[str, Any] | None = None
    ) -> int:
        """How many live memories are under the namespace prefix and match the filter."""
        prefix, flt = self._scope(namespace, filter)
        shards = self._sharder.search_shards(prefix, filter)
        return sum(self._shards[i].count(prefix, flt) for i in shards)

    def list(
        self,
        namespace: Namespace | None = None,
        filter: Mapping[str, Any] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """One page of memories in (namespace, key) order, without vectors.

        Pass ``page.next_cursor`` back as ``cursor`` for the next page; it is None on the last.
        """
        cfg = self._db.config
        validation.int_in_range("limit", limit, 1, cfg.list_limit_max)
        prefix, flt = self._scope(namespace, filter)
        after = None if cursor is None else decode_list_cursor(cursor)
        items: list[Memory] = []
        for i in self._sharder.search_shards(prefix, filter):
            items.extend(self._shards[i].list_page(prefix, flt, after, limit + 1))
        if not self._sharder.keyed:
            # Each shard returned limit + 1 distinct keys (if it had them), so the union
            # still tells whether there are more.
            items = _newest(items, lambda m: m)
        items.sort(key=lambda m: (m.namespace, m.key))
        more = len(items) > limit
        items = items[:limit]
        next_cursor = encode_list_cursor((items[-1].namespace, items[-1].key)) if more else None
        return Page(items=items, next_cursor=next_cursor)

    def iter(
        self, namespace: Namespace | None = None, filter: Mapping[str, Any] | None = None
    ) -> Iterator[Memory]:
        """Every matching memory, page by page."""
        cursor: str | None = None
        while True:
            page = self.list(namespace, filter, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def subscribe(
        self,
        namespace: Namespace | None = None,
        filter: Mapping[str, Any] | None = None,
        cursor: str | None = None,
        include_vectors: bool = False,
        idle_timeout_s: float | None = None,
    ) -> Iterator[Event]:
        """The change feed: every write applied to the collection, as it happens.

        Yields an :class:`Event` per put, delete, expiry and eviction under the ``namespace``
        prefix (puts also matching ``filter``), in each shard's order. ``cursor=None``
        starts from now; ``event.cursor`` resumes right after that event with no gap and no
        duplicate, while the shards retain it (else CursorExpired, with the oldest cursor).
        Blocks between events; ends when the database closes, or after ``idle_timeout_s``
        without an event (None: never).
        """
        reader = self.feed_reader(namespace, filter, cursor, include_vectors)
        wake = threading.Event()
        reader.listen(wake.set)
        try:
            yield from _follow(reader.poll, wake, lambda: self._db._closed, idle_timeout_s)
        finally:
            reader.unlisten(wake.set)

    def feed_cursor(self) -> str:
        """The change feed's current end: ``subscribe(cursor=...)`` from it misses nothing
        written after this call."""
        self._db._check_open()
        return encode_cursor(self.name, [shard.applied_seq for shard in self._shards])

    def feed_reader(
        self,
        namespace: Namespace | None = None,
        filter: Mapping[str, Any] | None = None,
        cursor: str | None = None,
        include_vectors: bool = False,
    ) -> FeedReader:
        """The non-blocking reader under :meth:`subscribe`, for servers that wait their own
        way (an asyncio event): ``poll()`` for events, ``listen(callback)`` for wake-ups."""
        prefix, flt = self._scope(namespace, filter)
        return FeedReader(
            self.name,
            self._shards,
            prefix,
            flt,
            cursor,
            include_vectors=include_vectors,
            batch=self._db.config.feed_batch_events,
        )

    def describe(self) -> CollectionInfo:
        """The collection's config and its current size."""
        self._db._check_open()
        stats = [shard.stats() for shard in self._shards]
        return CollectionInfo(
            config=self.config,
            stats=CollectionStats(
                items=sum(s["items"] for s in stats),
                bytes=sum(s["bytes"] for s in stats),
                indexed_items=sum(s["indexed_items"] for s in stats),
                last_seq=[s["last_seq"] for s in stats],
            ),
        )
