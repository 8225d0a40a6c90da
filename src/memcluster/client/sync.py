"""The synchronous SDK: a thin facade over :class:`memcluster.client.remote.AsyncClient`.

``memcluster.connect(url)`` returns a :class:`Client`. It owns a private event loop on a
daemon thread and runs each call of the async client there, so the network code exists once
(no copied sync implementation) and the sync client works from any thread, including inside
a program that runs its own event loop::

    import memcluster
    with memcluster.connect("http://127.0.0.1:7700") as db:
        coll = db.collection("memories")
        coll.put(("team-a", "agent-7"), "m1", text="...", vector=vec)
        hits = coll.search(vec, k=10)

The collections have the embedded ``memcluster.open()`` collections' methods, arguments,
results and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

import uvloop

from memcluster.client.blackboard import Blackboard
from memcluster.client.remote import AsyncClient, AsyncCollection, Namespace
from memcluster.core import api
from memcluster.core.api import Consistency
from memcluster.core.errors import StaleToken
from memcluster.core.types import (
    Ack,
    CollectionConfig,
    CollectionInfo,
    Durability,
    Event,
    Eviction,
    Memory,
    Message,
    Metric,
    Page,
    SearchResult,
    Sharding,
)

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever on a daemon thread; ``run`` blocks on one coroutine."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="memcluster-client", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def connect(
    url: str,
    *,
    api_key: str | None = None,
    timeout_s: float = 30.0,
    retries: int = 3,
    verify: bool | str = True,
    pool: int = 4,
) -> Client:
    """Connect to a server: ``http://HOST:7700`` (HTTP API) or ``mc://HOST:7701`` (binary).

    Nothing is sent until the first call. ``retries`` applies to retryable errors only;
    ``verify`` is False or a CA file for self-signed TLS (``https://``, ``mcs://``).
    """
    return Client(
        url, api_key=api_key, timeout_s=timeout_s, retries=retries, verify=verify, pool=pool
    )


class Client:
    """A synchronous connection to a server. Thread-safe. Use as a context manager."""

    def __init__(self, url: str, **options: Any) -> None:
        self._runner = _LoopThread()
        try:
            self._async = self._runner.run(_make_client(url, options))
        except BaseException:
            self._runner.close()
            raise
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def session(self) -> str | None:
        """The session token this client carries for ``consistency="session"`` reads (see
        ``memcluster.core.session``); set it to continue another client's session."""
        return self._async.session

    @session.setter
    def session(self, token: str | None) -> None:
        self._async.session = token

    def close(self) -> None:
        """Close the connections and stop the client's thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._runner.run(self._async.close())
        self._runner.close()

    @property
    def url(self) -> str:
        return self._async.url

    def health(self) -> api.Health:
        """The node's liveness and readiness."""
        return self._runner.run(self._async.health())

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
        """Create a collection; see ``memcluster.Database.create_collection``."""
        coll = self._runner.run(
            self._async.create_collection(
                name,
                dim,
                metric,
                shards,
                ttl_s=ttl_s,
                capacity_items=capacity_items,
                capacity_bytes=capacity_bytes,
                namespace_capacity_items=namespace_capacity_items,
                eviction=eviction,
                durability=durability,
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
            )
        )
        return Collection(self._runner, coll)

    def collection(self, name: str) -> Collection:
        """The existing collection ``name``; CollectionNotFound if there is none."""
        return Collection(self._runner, self._runner.run(self._async.collection(name)))

    def list_collections(self) -> list[str]:
        """Names of every collection, sorted."""
        return self._runner.run(self._async.list_collections())

    def drop_collection(self, name: str) -> None:
        """Delete collection ``name`` and all its data."""
        self._runner.run(self._async.drop_collection(name))

    # -- coordination (see memcluster.Database for the semantics) -----------------------------

    def grant_lease(self, ttl_s: float) -> int:
        """A lease that ends ``ttl_s`` seconds from now unless kept alive; its id."""
        return self._runner.run(self._async.grant_lease(ttl_s))

    def keepalive(self, lease: int) -> float:
        """Extend ``lease`` by its TTL; returns the new expiry. LeaseExpired if it ended."""
        return self._runner.run(self._async.keepalive(lease))

    def revoke(self, lease: int) -> None:
        """End ``lease`` now, releasing everything held under it."""
        self._runner.run(self._async.revoke(lease))

    def acquire_lock(
        self, name: str, ttl_s: float = 10.0, timeout_s: float = 30.0, lease: int | None = None
    ) -> int:
        """Wait (FIFO) for lock ``name``; returns its fencing token."""
        return self._runner.run(self._async.acquire_lock(name, ttl_s, timeout_s, lease))

    def release_lock(self, name: str, token: int) -> None:
        """Release lock ``name``; StaleToken if ``token`` no longer holds it."""
        self._runner.run(self._async.release_lock(name, token))

    @contextlib.contextmanager
    def lock(
        self, name: str, ttl_s: float = 10.0, timeout_s: float = 30.0, lease: int | None = None
    ) -> Iterator[int]:
        """``with client.lock("deploy") as token:`` acquire, yield the token, release."""
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
        """Wait (FIFO) for one of ``permits`` permits of semaphore ``name``; its token."""
        return self._runner.run(
            self._async.acquire_semaphore(name, permits, ttl_s, timeout_s, lease)
        )

    def release_semaphore(self, name: str, token: int) -> None:
        """Give back a permit; StaleToken if it is no longer held."""
        self._runner.run(self._async.release_semaphore(name, token))

    def incr(self, key: str, delta: int = 1) -> int:
        """Atomically add ``delta`` to counter ``key``; returns the new value."""
        return self._runner.run(self._async.incr(key, delta))

    def counter(self, key: str) -> int:
        """The value of counter ``key`` (0 if never incremented)."""
        return self._runner.run(self._async.counter(key))

    def publish(self, topic: str, payload: Any) -> int:
        """Send ``payload`` (any JSON value) to the subscribers of ``topic``; its seq."""
        return self._runner.run(self._async.publish(topic, payload))

    def subscribe(
        self,
        topic: str,
        cursor: str | None = None,
        group: str | None = None,
        idle_timeout_s: float | None = None,
    ) -> Iterator[Message]:
        """The messages of ``topic``, as a blocking iterator."""
        yield from _iterate(
            self._runner, self._async.subscribe(topic, cursor, group, idle_timeout_s)
        )

    def blackboard(self, collection: str, board: Sequence[str]) -> Blackboard:
        """The namespace ``board`` of ``collection`` as a blackboard."""
        return Blackboard(self, collection, board)


def _iterate(runner: _LoopThread, items: AsyncIterator[T]) -> Iterator[T]:
    """Drive an async generator of the client's loop from this thread, item by item."""
    generator = cast(AsyncGenerator[T, None], items)
    try:
        while True:
            try:
                yield runner.run(_next(generator))
            except StopAsyncIteration:
                return
    finally:
        runner.run(generator.aclose())


async def _next(items: AsyncGenerator[T, None]) -> T:
    return await anext(items)


async def _make_client(url: str, options: dict[str, Any]) -> AsyncClient:
    # Built on the loop thread: its locks and connections belong to that loop.
    return AsyncClient(url, **options)


class Collection:
    """A collection on a server, with the embedded Collection's methods."""

    def __init__(self, runner: _LoopThread, coll: AsyncCollection) -> None:
        self._runner = runner
        self._run = runner.run
        self._async = coll

    @property
    def name(self) -> str:
        return self._async.name

    @property
    def config(self) -> CollectionConfig:
        return self._async.config

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
        """Insert or replace one memory; returns its new version."""
        return self._run(
            self._async.put(namespace, key, text, vector, metadata, ttl_s, if_version, fence, lease)
        )

    def put_many(
        self,
        memories: Sequence[Memory],
        idempotency_key: str | None = None,
        fence: tuple[str, int] | None = None,
        ack: Ack | str | None = None,
        w: int | None = None,
    ) -> list[int]:
        """Write a batch; returns the versions in input order. ``ack``, ``w``: see the
        embedded ``put_many``."""
        return self._run(self._async.put_many(memories, idempotency_key, fence, ack, w))

    def get(
        self,
        namespace: Namespace,
        key: str,
        consistency: Consistency | str = Consistency.STRONG,
        r: int | None = None,
    ) -> Memory | None:
        """The memory at (namespace, key) with its vector, or None. ``consistency``, ``r``:
        see the embedded ``get``."""
        return self._run(self._async.get(namespace, key, consistency, r))

    def delete(self, namespace: Namespace, key: str, fence: tuple[str, int] | None = None) -> bool:
        """Delete the memory at (namespace, key); True if it existed."""
        return self._run(self._async.delete(namespace, key, fence))

    def delete_where(
        self, namespace: Namespace | None = None, filter: Mapping[str, Any] | None = None
    ) -> int:
        """Delete every matching memory; returns how many."""
        return self._run(self._async.delete_where(namespace, filter))

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
        """The ``k`` memories most similar to ``vector``, best first; see
        ``memcluster.Collection.search``."""
        return self._run(
            self._async.search(
                vector,
                k,
                namespace,
                filter,
                include_vectors,
                consistency,
                nprobe,
                allow_partial,
                r,
            )
        )

    def count(
        self, namespace: Namespace | None = None, filter: Mapping[str, Any] | None = None
    ) -> int:
        """How many live memories match."""
        return self._run(self._async.count(namespace, filter))

    def list(
        self,
        namespace: Namespace | None = None,
        filter: Mapping[str, Any] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """One page of memories in (namespace, key) order, without vectors."""
        return self._run(self._async.list(namespace, filter, limit, cursor))

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

    def feed_cursor(self) -> str:
        """The change feed's current end: subscribing from it misses nothing after."""
        return self._run(self._async.feed_cursor())

    def subscribe(
        self,
        namespace: Namespace | None = None,
        filter: Mapping[str, Any] | None = None,
        cursor: str | None = None,
        include_vectors: bool = False,
        idle_timeout_s: float | None = None,
    ) -> Iterator[Event]:
        """The change feed, as a blocking iterator (see the embedded ``subscribe``)."""
        yield from _iterate(
            self._runner,
            self._async.subscribe(namespace, filter, cursor, include_vectors, idle_timeout_s),
        )

    def describe(self) -> CollectionInfo:
        """The collection's config and current size."""
        return self._run(self._async.describe())
