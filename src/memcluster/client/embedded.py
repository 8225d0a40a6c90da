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

A collection's memories are spread over its shards by :func:`memcluster.core.hashing.shard_of`,
the hash the cluster uses, and results are merged across shards (top-k by score, ties by
namespace and key).
"""

from __future__ import annotations

import base64
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
from memcluster.core.codec import from_json, to_json
from memcluster.core.config import Config
from memcluster.core.errors import (
    CollectionExists,
    CollectionNotFound,
    InvalidArgument,
    InvalidState,
    LeaseExpired,
    PayloadTooLarge,
    StaleToken,
)
from memcluster.core.hashing import shard_of
from memcluster.core.types import (
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
)
from memcluster.index.filters import Filter, compile_filter
from memcluster.shard.coord import CoordShard
from memcluster.shard.feed import FeedReader, TopicReader, encode_cursor
from memcluster.shard.maintenance import Maintained, Maintainer
from memcluster.shard.shard import PreparedPut, Shard
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
        return self._coord.publish(topic, _encode_payload(payload, self.config))

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
    ) -> Collection:
        """Create a collection of ``dim``-dimensional vectors; CollectionExists if it exists.

        ``shards`` spreads memories over that many shards (by hash of namespace and key).
        ``capacity_items``/``capacity_bytes``/``namespace_capacity_items`` bound its size, with
        ``eviction`` saying what a full collection does ("none" rejects writes). ``ttl_s`` is the
        default time to live of memories written without their own.
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


def _encode_payload(payload: Any, config: Config) -> bytes:
    try:
        data = msgspec.json.encode(payload)
    except (TypeError, msgspec.EncodeError) as exc:
        raise InvalidArgument(f"payload is not JSON: {exc}") from None
    if len(data) > config.metadata_bytes_max:
        raise PayloadTooLarge(
            f"payload is {len(data)} bytes of JSON; the limit is {config.metadata_bytes_max}"
        )
    return data


def _encode_cursor(after: tuple[tuple[str, ...], str]) -> str:
    return base64.urlsafe_b64encode(msgspec.msgpack.encode(after)).decode()


def _decode_cursor(cursor: str) -> tuple[tuple[str, ...], str]:
    try:
        ns, key = msgspec.msgpack.decode(
            base64.urlsafe_b64decode(cursor.encode()), type=tuple[tuple[str, ...], str]
        )
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise InvalidArgument(
            "cursor is not valid: pass the next_cursor of a previous page unchanged"
        ) from None
    return ns, key


class Collection:
    """A named set of memories. Get one from ``db.create_collection()`` or ``db.collection()``."""

    def __init__(self, db: Database, config: CollectionConfig, path: Path) -> None:
        self._db = db
        self.config = config
        self.path = path
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

    def _locate(self, namespace: Namespace, key: str) -> tuple[Shard, tuple[str, ...], str]:
        """Validate (namespace, key) and find the shard that holds it."""
        self._db._check_open()
        ns = validation.namespace(namespace, self._db.config)
        k = validation.key(key, self._db.config)
        return self._shards[shard_of(ns, k, len(self._shards))], ns, k

    # -- writes --------------------------------------------------------------------------------

    def _prepare(self, memories: Sequence[Memory]) -> list[PreparedPut]:
        cfg = self._db.config
        matrix = validation.vectors(
            [m.vector for m in memories], self.config.dim, self.config.metric
        )
        prepared: list[PreparedPut] = []
        seen: dict[tuple[tuple[str, ...], str], int] = {}
        for i, m in enumerate(memories):
            namespace = validation.namespace(m.namespace, cfg)
            key = validation.key(m.key, cfg)
            if (namespace, key) in seen:
                raise InvalidArgument(
                    f"memories {seen[(namespace, key)]} and {i} have the same namespace and key"
                    f" {namespace}/{key!r}; a batch writes each memory once"
                )
            seen[(namespace, key)] = i
            prepared.append(
                PreparedPut(
                    namespace=namespace,
                    key=key,
                    text=validation.text(m.text, cfg),
                    vector=matrix[i],
                    metadata=validation.metadata(m.metadata, cfg),
                    ttl_s=validation.ttl(m.ttl_s),
                    if_version=validation.if_version(m.if_version),
                    lease=self._db._live_lease(m.lease),
                )
            )
        return prepared

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
    ) -> list[int]:
        """Write a batch; returns the versions in input order.

        The whole batch is validated and checked (versions, capacity) on every shard before
        anything is written: a rejected batch writes nothing. Retrying with the same
        ``idempotency_key`` returns the first call's versions without writing twice.
        ``fence=(lock, token)``: written only while ``token`` holds the lock (see
        ``Database.acquire_lock``); StaleToken otherwise, and nothing is written.
        """
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
        prepared = self._prepare(memories)
        by_shard: dict[int, list[int]] = {}
        for i, p in enumerate(prepared):
            by_shard.setdefault(shard_of(p.namespace, p.key, len(self._shards)), []).append(i)
        versions = [0] * len(prepared)
        tokens: list[tuple[Shard, int]] = []
        with ExitStack() as stack:
            plans = []
            for shard_no in sorted(by_shard):
                shard = self._shards[shard_no]
                stack.enter_context(shard.lock)
                positions = by_shard[shard_no]
                plan = shard.plan_put([prepared[i] for i in positions], idempotency_key)
                plans.append((shard, positions, plan))
            for shard, positions, plan in plans:
                if isinstance(plan, list):
                    got = plan
                else:
                    token, got = shard.write_planned(plan)
                    tokens.append((shard, token))
                for i, version in zip(positions, got, strict=True):
                    versions[i] = version
        for shard, token in tokens:
            shard.commit(token)
        return versions

    def delete(self, namespace: Namespace, key: str, fence: tuple[str, int] | None = None) -> bool:
        """Delete the memory at (namespace, key); True if it existed. ``fence``: as in put."""
        shard, ns, k = self._locate(namespace, key)
        with self._fenced(fence):
            return shard.delete(ns, k)

    def delete_where(
        self, namespace: Namespace | None = None, filter: Mapping[str, Any] | None = None
    ) -> int:
        """Delete every memory under the namespace prefix matching the filter; returns how many.

        With neither argument it empties the collection.
        """
        prefix, flt = self._scope(namespace, filter)
        return sum(shard.delete_where(prefix, flt) for shard in self._shards)

    # -- reads ---------------------------------------------------------------------------------

    def _scope(
        self, namespace: Namespace | None, filter: Mapping[str, Any] | None
    ) -> tuple[tuple[str, ...], Filter]:
        self._db._check_open()
        prefix = validation.namespace(namespace, self._db.config, allow_empty=True)
        return prefix, compile_filter(filter)

    def get(self, namespace: Namespace, key: str) -> Memory | None:
        """The memory at (namespace, key) with its vector, or None if absent or expired."""
        shard, ns, k = self._locate(namespace, key)
        return shard.get(ns, k)

    def search(
        self,
        vector: Any,
        k: int = 10,
        namespace: Namespace | None = None,
        filter: Mapping[str, Any] | None = None,
        include_vectors: bool = False,
        consistency: Consistency | str = Consistency.STRONG,
    ) -> list[Hit]:
        """The ``k`` memories most similar to ``vector``, best first.

        ``namespace`` restricts the search to a namespace prefix (``("team-a",)`` covers
        ``("team-a", "agent-7")``); ``filter`` is a metadata filter such as
        ``{"speaker": "Alice", "session": {"$gte": 3}}``, which may also bound
        ``$created_at``/``$updated_at``. Scores are higher-is-better (see Metric).
        ``consistency`` is accepted for the same signature as the cluster's clients: one
        process holds the only copy, so every level reads the latest write.
        """
        cfg = self._db.config
        validation.int_in_range("k", k, 1, cfg.search_k_max)
        validation.enum_value("consistency", consistency, Consistency)
        prefix, flt = self._scope(namespace, filter)
        query = validation.query_vector(vector, self.config.dim, self.config.metric)
        if len(self._shards) == 1:
            return self._shards[0].search(query, k, prefix, flt, include_vectors)
        hits: list[Hit] = []
        for found in self._db._pool.map(
            lambda shard: shard.search(query, k, prefix, flt, include_vectors), self._shards
        ):
            hits.extend(found)
        hits.sort(key=lambda h: (-h.score, h.memory.namespace, h.memory.key))
        return hits[:k]

    def count(
        self, namespace: Namespace | None = None, filter: Mapping[str, Any] | None = None
    ) -> int:
        """How many live memories are under the namespace prefix and match the filter."""
        prefix, flt = self._scope(namespace, filter)
        return sum(shard.count(prefix, flt) for shard in self._shards)

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
        after = None if cursor is None else _decode_cursor(cursor)
        items: list[Memory] = []
        for shard in self._shards:
            items.extend(shard.list_page(prefix, flt, after, limit + 1))
        items.sort(key=lambda m: (m.namespace, m.key))
        more = len(items) > limit
        items = items[:limit]
        next_cursor = _encode_cursor((items[-1].namespace, items[-1].key)) if more else None
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
