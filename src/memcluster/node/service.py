"""The operations a node serves, independent of the protocol that carried them.

The HTTP API and the binary protocol both decode a request into the structs of
:mod:`memcluster.core.api` and call :meth:`Service.run` with the operation's kind, the
collection name (from the URL path or the binary body) and the body. ``run`` checks the
caller's rights, then runs the engine call on a thread pool: engine calls block (an fsync, a
graph search), and hnswlib, numpy and fsync release the GIL, so several run at once and
concurrent writers share one fsync (group commit).

The store is anything with the embedded database's interface (:class:`Store`); the CLI passes
the embedded ``Database`` it opened, so this layer does not depend on the client layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import msgspec

from memcluster.core import api
from memcluster.core.api import OPERATIONS, Consistency, Operation
from memcluster.core.errors import InvalidArgument
from memcluster.core.types import CollectionConfig, CollectionInfo, Hit, Memory, Page
from memcluster.node.auth import Auth, Principal

log = logging.getLogger("memcluster.node")


class StoreCollection(Protocol):
    """The collection methods the service calls (the embedded Collection has them)."""

    config: CollectionConfig

    def put_many(
        self,
        memories: Sequence[Memory],
        idempotency_key: str | None = None,
        fence: tuple[str, int] | None = None,
        ack: str | None = None,
        *,
        w: int | None = None,
    ) -> list[int]: ...
    def get(
        self,
        namespace: tuple[str, ...],
        key: str,
        consistency: str = "strong",
        *,
        r: int | None = None,
    ) -> Memory | None: ...
    def delete(
        self, namespace: tuple[str, ...], key: str, fence: tuple[str, int] | None = None
    ) -> bool: ...
    def delete_where(
        self, namespace: tuple[str, ...] | None = None, filter: Mapping[str, Any] | None = None
    ) -> int: ...
    def count(
        self, namespace: tuple[str, ...] | None = None, filter: Mapping[str, Any] | None = None
    ) -> int: ...
    def search(
        self,
        vector: Any,
        k: int = 10,
        namespace: tuple[str, ...] | None = None,
        filter: Mapping[str, Any] | None = None,
        include_vectors: bool = False,
        consistency: str = "strong",
        nprobe: int | None = None,
        allow_partial: bool = False,
        *,
        r: int | None = None,
    ) -> list[Hit]: ...
    def list(
        self,
        namespace: tuple[str, ...] | None = None,
        filter: Mapping[str, Any] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page: ...
    def describe(self) -> CollectionInfo: ...
    def feed_cursor(self) -> str: ...
    def feed_reader(
        self,
        namespace: tuple[str, ...] | None = None,
        filter: Mapping[str, Any] | None = None,
        cursor: str | None = None,
        include_vectors: bool = False,
    ) -> FeedReaderLike: ...


class FeedReaderLike(Protocol):
    """A change feed or topic, read without blocking (see memcluster.shard.feed)."""

    def poll(self) -> list[Any]: ...
    def listen(self, callback: Callable[[], None]) -> None: ...
    def unlisten(self, callback: Callable[[], None]) -> None: ...


class Store(Protocol):
    """The database methods the service calls (the embedded Database has them)."""

    def create_collection_from(self, config: CollectionConfig) -> StoreCollection: ...
    def collection(self, name: str) -> StoreCollection: ...
    def list_collections(self) -> list[str]: ...
    def drop_collection(self, name: str) -> None: ...
    def grant_lease(self, ttl_s: float) -> int: ...
    def keepalive(self, lease: int) -> float: ...
    def revoke(self, lease: int) -> None: ...
    def acquire_lock(
        self, name: str, ttl_s: float = 10.0, timeout_s: float = 30.0, lease: int | None = None
    ) -> int: ...
    def release_lock(self, name: str, token: int) -> None: ...
    def acquire_semaphore(
        self,
        name: str,
        permits: int,
        ttl_s: float = 10.0,
        timeout_s: float = 30.0,
        lease: int | None = None,
    ) -> int: ...
    def release_semaphore(self, name: str, token: int) -> None: ...
    def incr(self, key: str, delta: int = 1) -> int: ...
    def counter(self, key: str) -> int: ...
    def publish(self, topic: str, payload: Any) -> int: ...
    def topic_reader(
        self, topic: str, cursor: str | None = None, group: str | None = None
    ) -> FeedReaderLike: ...


def _namespaces(kind: str, body: msgspec.Struct) -> Iterator[tuple[str, ...] | None]:
    """The namespaces a request touches, for the API key check."""
    if isinstance(body, api.PutBody):
        for memory in body.memories:
            yield memory.namespace
    elif isinstance(
        body,
        api.KeyBody
        | api.GetBody
        | api.ScopeBody
        | api.SearchBody
        | api.ListBody
        | api.SubscribeBody,
    ):
        yield body.namespace


class Service:
    """Serves every operation of :data:`memcluster.core.api.OPERATIONS` on one store."""

    def __init__(self, store: Store, *, node: str, auth: Auth, threads: int, waiters: int) -> None:
        self.store = store
        self.node = node
        self.auth = auth
        self.stopping = False
        self.feed_idle_check_s = 1.0
        """How often an idle subscription checks whether the server is stopping."""
        self.feed_heartbeat_s = 15.0
        """An idle subscription sends a keepalive this often (and so notices a dead peer)."""
        """Set when a graceful shutdown begins: health reports "stopping", not ready."""
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="memcluster-req")
        # Acquires block until granted or timed out: their own pool, so that waiters cannot
        # take every request thread.
        self._waits = ThreadPoolExecutor(max_workers=waiters, thread_name_prefix="memcluster-wait")
        self._handlers: dict[str, Callable[[str, Any], msgspec.Struct]] = {
            "collections.create": self._create,
            "collections.describe": lambda c, _: self.store.collection(c).describe(),
            "collections.drop": self._drop,
            "put": self._put,
            "get": self._get,
            "delete": self._delete,
            "delete_where": self._delete_where,
            "count": self._count,
            "search": self._search,
            "list": self._list,
            "feed_cursor": lambda c, _: api.CursorReply(self.store.collection(c).feed_cursor()),
            "leases.grant": lambda _, b: api.LeaseReply(self.store.grant_lease(b.ttl_s)),
            "leases.keepalive": lambda _, b: api.KeepaliveReply(self.store.keepalive(b.lease)),
            "leases.revoke": self._revoke,
            "locks.acquire": lambda _, b: api.TokenReply(
                self.store.acquire_lock(b.name, b.ttl_s, b.timeout_s, b.lease)
            ),
            "locks.release": self._release_lock,
            "semaphores.acquire": lambda _, b: api.TokenReply(
                self.store.acquire_semaphore(b.name, b.permits, b.ttl_s, b.timeout_s, b.lease)
            ),
            "semaphores.release": self._release_semaphore,
            "counters.incr": lambda _, b: api.CounterReply(self.store.incr(b.key, b.delta)),
            "counters.get": lambda _, b: api.CounterReply(self.store.counter(b.key)),
            "topics.publish": lambda _, b: api.PublishReply(self.store.publish(b.topic, b.payload)),
        }

    def close(self) -> None:
        """Wait for running engine calls, then stop the pools."""
        self._pool.shutdown(wait=True)
        self._waits.shutdown(wait=True)

    def _revoke(self, _: str, body: api.LeaseRef) -> api.Empty:
        self.store.revoke(body.lease)
        return api.Empty()

    def _release_lock(self, _: str, body: api.ReleaseBody) -> api.Empty:
        self.store.release_lock(body.name, body.token)
        return api.Empty()

    def _release_semaphore(self, _: str, body: api.ReleaseBody) -> api.Empty:
        self.store.release_semaphore(body.name, body.token)
        return api.Empty()

    def health(self) -> api.Health:
        return api.Health(
            status="stopping" if self.stopping else "ok",
            ready=not self.stopping,
            node=self.node,
            version=api.VERSION,
            collections=len(self.store.list_collections()),
        )

    async def run(
        self, principal: Principal, kind: str, collection: str | None, body: msgspec.Struct
    ) -> msgspec.Struct:
        """Serve one request: check rights, run the engine call, return the reply struct.

        Raises the engine's errors unchanged (the protocols map them to statuses and codes).
        """
        op: Operation | None = OPERATIONS.get(kind)
        if op is None:
            raise InvalidArgument(
                f"unknown operation {kind!r}; known operations: {', '.join(OPERATIONS)}"
            )
        if not op.public:
            self.auth.authorize(principal, kind, op, _namespaces(kind, body))
        if kind == "health":
            return self.health()
        if kind == "collections.list":
            return api.CollectionList(self.store.list_collections())
        handler = self._handlers[kind]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._waits if op.blocking else self._pool,
            functools.partial(handler, collection or "", body),
        )

    async def stream(
        self, principal: Principal, kind: str, collection: str, body: msgspec.Struct
    ) -> AsyncIterator[Any]:
        """Open a subscription (a change feed or a topic).

        Rights and the cursor are checked here, before any item (CursorExpired and the like
        are raised by this call); it returns the iterator of events or messages, which
        yields None after every ``feed_heartbeat_s`` without one, for the protocol to send
        a keepalive."""
        op = OPERATIONS[kind]
        assert op.stream
        self.auth.authorize(principal, kind, op, _namespaces(kind, body))
        loop = asyncio.get_running_loop()

        def open_reader() -> tuple[FeedReaderLike, list[Any]]:
            reader: FeedReaderLike
            if isinstance(body, api.SubscribeBody):
                coll = self.store.collection(collection)
                reader = coll.feed_reader(
                    body.namespace, body.filter, body.cursor, body.include_vectors
                )
            else:
                assert isinstance(body, api.TopicBody)
                reader = self.store.topic_reader(body.topic, body.cursor, body.group)
            return reader, reader.poll()

        reader, first = await loop.run_in_executor(self._pool, open_reader)
        return self._follow(reader, first)

    async def _follow(self, reader: FeedReaderLike, first: list[Any]) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def notify() -> None:
            # Called by a writer thread under its shard lock; the loop may be gone.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

        reader.listen(notify)
        try:
            for event in first:
                yield event
            idle_since = loop.time()
            while not self.stopping:
                wake.clear()
                events = await loop.run_in_executor(self._pool, reader.poll)
                for event in events:
                    yield event
                if events:
                    idle_since = loop.time()
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.feed_idle_check_s)
                if loop.time() - idle_since >= self.feed_heartbeat_s:
                    idle_since = loop.time()
                    yield None
        finally:
            reader.unlisten(notify)

    # -- handlers: one engine call each ---------------------------------------------------------

    def _create(self, _: str, config: CollectionConfig) -> CollectionInfo:
        return self.store.create_collection_from(config).describe()

    def _drop(self, collection: str, _: api.Empty) -> api.Empty:
        self.store.drop_collection(collection)
        return api.Empty()

    def _put(self, collection: str, body: api.PutBody) -> api.PutReply:
        coll = self.store.collection(collection)
        ack = None if body.ack is msgspec.UNSET else body.ack
        w = None if body.w is msgspec.UNSET else body.w
        versions = coll.put_many(body.memories, body.idempotency_key, body.fence, ack, w=w)
        token = getattr(versions, "session", None)  # a cluster's Written
        return api.PutReply(list(versions), token or msgspec.UNSET)

    def _get(self, collection: str, body: api.GetBody) -> api.GetReply:
        coll = self.store.collection(collection)
        with_session = getattr(coll, "get_with_session", None)  # a cluster's collection
        if body.consistency is Consistency.SESSION and with_session is not None:
            memory, token = with_session(body.namespace, body.key, body.consistency, body.session)
            return api.GetReply(memory, token or msgspec.UNSET)
        return api.GetReply(coll.get(body.namespace, body.key, body.consistency, r=body.r))

    def _delete(self, collection: str, body: api.DeleteBody) -> api.DeleteReply:
        coll = self.store.collection(collection)
        return api.DeleteReply(coll.delete(body.namespace, body.key, body.fence))

    def _delete_where(self, collection: str, body: api.ScopeBody) -> api.CountReply:
        coll = self.store.collection(collection)
        return api.CountReply(coll.delete_where(body.namespace, body.filter))

    def _count(self, collection: str, body: api.ScopeBody) -> api.CountReply:
        return api.CountReply(self.store.collection(collection).count(body.namespace, body.filter))

    def _search(self, collection: str, body: api.SearchBody) -> api.SearchReply:
        coll = self.store.collection(collection)
        # A cluster's collection takes the session token (one node is always up to date).
        cluster = hasattr(coll, "get_with_session") and isinstance(body.session, str)
        extra: dict[str, Any] = {"token": body.session} if cluster else {}
        hits = coll.search(
            body.vector,
            body.k,
            body.namespace,
            body.filter,
            body.include_vectors,
            body.consistency,
            None if body.nprobe is msgspec.UNSET else body.nprobe,
            body.allow_partial is True,
            r=None if body.r is msgspec.UNSET else body.r,
            **extra,
        )
        token = getattr(hits, "session", None)
        return api.SearchReply(
            list(hits), list(getattr(hits, "missing_shards", ())), token or msgspec.UNSET
        )

    def _list(self, collection: str, body: api.ListBody) -> Page:
        return self.store.collection(collection).list(
            body.namespace, body.filter, body.limit, body.cursor
        )
