"""The network SDK core: :class:`AsyncClient`, over HTTP (``http://``, ``https://``) or the
binary protocol (``mc://``, ``mcs://`` for TLS).

Its collections have the same methods, arguments, results and errors as the embedded
``memcluster.open()`` ones, as coroutines::

    async with memcluster.AsyncClient("mc://127.0.0.1:7701") as client:
        coll = await client.create_collection("memories", dim=384)
        await coll.put(("team-a", "agent-7"), "m1", text="...", vector=vec)
        hits = await coll.search(vec, k=10, namespace=("team-a",))

The synchronous :class:`memcluster.client.sync.Client` (what ``memcluster.connect()`` returns)
is a thin facade that runs this client on a private event loop.

Both transports pool connections (HTTP keep-alive; several multiplexed binary connections),
apply ``timeout_s`` to every request, and retry up to ``retries`` times, with exponential
backoff, exactly the errors that :func:`memcluster.is_retryable` says may succeed later
(unreachable node, timeout, overload). A retried write may have been applied the first time:
``put_many(..., idempotency_key=...)`` makes the retry return the first result instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import quote, urlsplit

import httpx
import msgspec
import numpy as np

from memcluster.core import api, session, validation
from memcluster.core.api import OPERATIONS, Consistency
from memcluster.core.config import Config
from memcluster.core.errors import (
    InvalidArgument,
    MemclusterError,
    StaleToken,
    Timeout,
    Unreachable,
    error_from_wire,
    is_retryable,
)
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
from memcluster.shard.sharding import config_fields
from memcluster.transport.connection import Connection

T = TypeVar("T")
Namespace = tuple[str, ...] | Sequence[str]

_json_encoder = msgspec.json.Encoder(enc_hook=api.json_enc_hook)
_json_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_error_decoder = msgspec.json.Decoder(api.ErrorBody)


def _json_decoder(type_: type[T]) -> msgspec.json.Decoder[T]:
    decoder = _json_decoders.get(type_)
    if decoder is None:
        decoder = _json_decoders[type_] = msgspec.json.Decoder(type_)
    return decoder


class _Transport(Protocol):
    async def call(
        self,
        kind: str,
        collection: str | None,
        body: msgspec.Struct,
        reply: type[T],
        timeout_s: float | None = None,
    ) -> T: ...
    def stream(
        self, kind: str, collection: str | None, body: msgspec.Struct, item: type[T]
    ) -> AsyncIterator[T]: ...
    async def close(self) -> None: ...


class _HttpTransport:
    """JSON over HTTP/1.1 with keep-alive (httpx)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout_s: float,
        verify: ssl.SSLContext,
        pool: int,
    ) -> None:
        self._where = base_url
        headers = {"content-type": "application/json"}
        if api_key is not None:
            headers["authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=timeout_s,
            verify=verify,
            # HTTP/1.1 carries one request per connection at a time, and an acquire holds
            # its connection while it waits: allow many, keep a few alive.
            limits=httpx.Limits(max_connections=16 * pool, max_keepalive_connections=2 * pool),
        )

    async def call(
        self,
        kind: str,
        collection: str | None,
        body: msgspec.Struct,
        reply: type[T],
        timeout_s: float | None = None,
    ) -> T:
        op = OPERATIONS[kind]
        path = op.path.format(collection=quote(collection or "", safe=""))
        content = None if op.method in ("GET", "DELETE") else _encode(_json_encoder, body)
        try:
            response = await self._client.request(
                op.method,
                path,
                content=content,
                timeout=httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s,
            )
        except httpx.TimeoutException:
            raise Timeout(f"http: no reply to {kind} from {self._where} in time") from None
        except httpx.TransportError as exc:
            raise Unreachable(
                f"http: cannot reach {self._where} ({type(exc).__name__}: {exc});"
                " is the server running?"
            ) from None
        if response.status_code >= 400:
            raise _http_error(response, self._where)
        return _json_decoder(reply).decode(response.content)

    async def stream(
        self, kind: str, collection: str | None, body: msgspec.Struct, item: type[T]
    ) -> AsyncIterator[T]:
        """Server-Sent Events: the body's fields go in the query string, JSON-encoded."""
        op = OPERATIONS[kind]
        path = op.path.format(collection=quote(collection or "", safe=""))
        params = {
            name: value if isinstance(value, str) else _json_encoder.encode(value).decode()
            for name in body.__struct_fields__
            if (value := getattr(body, name)) is not None
        }
        decoder = _json_decoder(item)
        try:
            async with self._client.stream(
                "GET", path, params=params, timeout=httpx.Timeout(None, connect=10.0)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _http_error(response, self._where)
                kind_of, data = "message", []
                async for line in response.aiter_lines():
                    if line.startswith(":"):
                        continue
                    if line:
                        field, _, value = line.partition(":")
                        value = value.removeprefix(" ")
                        if field == "event":
                            kind_of = value
                        elif field == "data":
                            data.append(value)
                        continue
                    # An event whose data is empty is not dispatched (the SSE spec): the
                    # server's keepalive comment comes with an empty "data:" line.
                    text = "\n".join(data)
                    if text and kind_of == "error":
                        error = _error_decoder.decode(text)
                        raise error_from_wire(error.code, error.message, error.details)
                    if text:
                        yield decoder.decode(text)
                    kind_of, data = "message", []
        except httpx.TransportError as exc:
            raise Unreachable(
                f"http: subscription to {self._where} lost ({type(exc).__name__}: {exc})"
            ) from None

    async def close(self) -> None:
        await self._client.aclose()


def _http_error(response: httpx.Response, where: str) -> MemclusterError:
    try:
        error = _error_decoder.decode(response.content)
    except msgspec.DecodeError:
        return MemclusterError(
            f"http: {response.status_code} from {where} without an error body:"
            f" {response.text[:200]!r}"
        )
    return error_from_wire(error.code, error.message, error.details)


class _BinaryTransport:
    """The binary protocol over a few multiplexed connections, opened lazily, reopened when
    they drop."""

    def __init__(
        self,
        host: str,
        port: int,
        api_key: str | None,
        timeout_s: float,
        tls: ssl.SSLContext | None,
        pool: int,
    ) -> None:
        self._host, self._port = host, port
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._tls = tls
        self._conns: list[Connection | None] = [None] * pool
        self._opening: list[asyncio.Lock] = [asyncio.Lock() for _ in range(pool)]
        self._next = 0

    async def _connection(self) -> Connection:
        i = self._next
        self._next = (i + 1) % len(self._conns)
        conn = self._conns[i]
        if conn is not None and not conn.closed:
            return conn
        async with self._opening[i]:
            conn = self._conns[i]
            if conn is None or conn.closed:
                conn = self._conns[i] = await Connection.open(
                    self._host,
                    self._port,
                    api_key=self._api_key,
                    ssl=self._tls,
                    connect_timeout_s=self._timeout_s,
                )
            return conn

    async def call(
        self,
        kind: str,
        collection: str | None,
        body: msgspec.Struct,
        reply: type[T],
        timeout_s: float | None = None,
    ) -> T:
        op = OPERATIONS[kind]
        request: msgspec.Struct = body
        if collection is not None:
            fields = {f: getattr(body, f) for f in body.__struct_fields__}
            request = op.request(collection=collection, **fields)
        conn = await self._connection()
        try:
            return await conn.request(kind, request, reply, timeout_s=timeout_s or self._timeout_s)
        except (TypeError, msgspec.EncodeError) as exc:
            raise InvalidArgument(f"request cannot be encoded: {exc}") from None

    async def stream(
        self, kind: str, collection: str | None, body: msgspec.Struct, item: type[T]
    ) -> AsyncIterator[T]:
        """On a connection of its own: a slow subscriber must not hold up other requests."""
        op = OPERATIONS[kind]
        request = body
        if collection is not None:
            fields = {f: getattr(body, f) for f in body.__struct_fields__}
            request = op.request(collection=collection, **fields)
        conn = await Connection.open(
            self._host,
            self._port,
            api_key=self._api_key,
            ssl=self._tls,
            connect_timeout_s=self._timeout_s,
        )
        try:
            async for value in conn.stream(kind, request, item):
                yield value
        finally:
            await conn.close()

    async def close(self) -> None:
        for conn in self._conns:
            if conn is not None:
                await conn.close()


def _encode(encoder: msgspec.json.Encoder, body: msgspec.Struct) -> bytes:
    try:
        return encoder.encode(body)
    except (TypeError, msgspec.EncodeError) as exc:
        raise InvalidArgument(f"request cannot be encoded: {exc}") from None


def _fence(fence: object) -> Any:
    """A list from JSON-minded callers is accepted as the (name, token) tuple."""
    return tuple(fence) if isinstance(fence, list) else fence


def _tls_context(verify: bool | str) -> ssl.SSLContext:
    """System CAs (True), a CA file (str), or no verification at all (False)."""
    context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _as_namespace(value: object, *, allow_empty: bool = False) -> Any:
    """The namespace as a tuple, after the same shape check the engine makes (so a string is
    not split into characters); the server checks the rest."""
    if value is None and allow_empty:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        validation.namespace(value, Config())  # raises InvalidName, as embedded
    return tuple(cast(Sequence[str], value))


class AsyncClient:
    """A connection to a memcluster server. Use as ``async with``; safe for many tasks."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        retry_backoff_s: float = 0.05,
        verify: bool | str = True,
        pool: int = 4,
    ) -> None:
        """``url`` is ``http(s)://HOST:PORT`` (the HTTP API) or ``mc(s)://HOST:PORT`` (the
        binary protocol, faster). ``verify`` is False or a CA file for self-signed TLS.
        ``pool``: binary connections (each multiplexes many requests); over HTTP, up to 16x as
        many connections and 2x kept alive."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "mc", "mcs") or not parts.hostname:
            raise InvalidArgument(
                f"url {url!r} is not a memcluster address: use http://HOST:7700 or mc://HOST:7701"
            )
        validation.int_in_range("retries", retries, 0, 100)
        self.url = url
        self.session: str | None = None
        """The session token of this client's writes and session reads, sent with every
        ``consistency="session"`` read (see ``memcluster.core.session``); None until a
        cluster returned one."""
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff_s = retry_backoff_s
        self._transport: _Transport
        if parts.scheme in ("http", "https"):
            self._transport = _HttpTransport(
                f"{parts.scheme}://{parts.netloc}", api_key, timeout_s, _tls_context(verify), pool
            )
        else:
            tls = _tls_context(verify) if parts.scheme == "mcs" else None
            self._transport = _BinaryTransport(
                parts.hostname, parts.port or 7701, api_key, timeout_s, tls, pool
            )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection. Idempotent."""
        await self._transport.close()

    async def _call(
        self,
        kind: str,
        collection: str | None,
        body: msgspec.Struct,
        reply: type[T],
        wait_s: float = 0.0,
    ) -> T:
        """Send one operation; retry what may succeed later (never an acquire or an incr,
        whose effect would double). ``wait_s``: how long the server may block on purpose."""
        op = OPERATIONS[kind]
        timeout_s = self._timeout_s + wait_s if wait_s else None
        attempt = 0
        while True:
            try:
                return await self._transport.call(kind, collection, body, reply, timeout_s)
            except MemclusterError as exc:
                if not op.retry or not is_retryable(exc) or attempt >= self._retries:
                    raise
            await asyncio.sleep(self._backoff_s * 2**attempt)
            attempt += 1

    async def health(self) -> api.Health:
        """The node's liveness and readiness."""
        return await self._call("health", None, api.Empty(), api.Health)

    async def create_collection(
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
    ) -> AsyncCollection:
        """Create a collection; see ``memcluster.Database.create_collection``. The centroids
        of ``sample`` are computed here, on the client, and only they are sent."""
        fields: dict[str, Any] = {
            "name": name,
            "dim": dim,
            "metric": metric,
            "shards": shards,
            "ttl_s": ttl_s,
            "capacity_items": capacity_items,
            "capacity_bytes": capacity_bytes,
            "namespace_capacity_items": namespace_capacity_items,
            "eviction": eviction,
            "durability": durability,
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
        }
        try:
            config = msgspec.convert(fields, CollectionConfig)
        except msgspec.ValidationError as exc:
            raise InvalidArgument(f"collection config: {exc}") from None
        info = await self._call("collections.create", None, config, CollectionInfo)
        return AsyncCollection(self, info.config)

    async def collection(self, name: str) -> AsyncCollection:
        """The existing collection ``name``; CollectionNotFound if there is none."""
        validation.collection_name(name)
        info = await self._call("collections.describe", name, api.Empty(), CollectionInfo)
        return AsyncCollection(self, info.config)

    async def list_collections(self) -> list[str]:
        """Names of every collection, sorted."""
        reply = await self._call("collections.list", None, api.Empty(), api.CollectionList)
        return reply.collections

    async def drop_collection(self, name: str) -> None:
        """Delete collection ``name`` and all its data; CollectionNotFound if there is none."""
        validation.collection_name(name)
        await self._call("collections.drop", name, api.Empty(), api.Empty)

    # -- coordination (see memcluster.Database for the semantics) -----------------------------

    async def grant_lease(self, ttl_s: float) -> int:
        """A lease that ends ``ttl_s`` seconds from now unless kept alive; its id."""
        return (
            await self._call("leases.grant", None, api.LeaseBody(ttl_s=ttl_s), api.LeaseReply)
        ).lease

    async def keepalive(self, lease: int) -> float:
        """Extend ``lease`` by its TTL; returns the new expiry. LeaseExpired if it ended."""
        reply = await self._call(
            "leases.keepalive", None, api.LeaseRef(lease=lease), api.KeepaliveReply
        )
        return reply.expires_at

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now, releasing everything held under it."""
        await self._call("leases.revoke", None, api.LeaseRef(lease=lease), api.Empty)

    async def acquire_lock(
        self, name: str, ttl_s: float = 10.0, timeout_s: float = 30.0, lease: int | None = None
    ) -> int:
        """Wait (FIFO) for lock ``name``; returns its fencing token (see Database)."""
        body = api.LockBody(name=name, ttl_s=ttl_s, timeout_s=timeout_s, lease=lease)
        reply = await self._call("locks.acquire", None, body, api.TokenReply, _wait(timeout_s))
        return reply.token

    async def release_lock(self, name: str, token: int) -> None:
        """Release lock ``name``; StaleToken if ``token`` no longer holds it."""
        await self._call("locks.release", None, api.ReleaseBody(name=name, token=token), api.Empty)

    @contextlib.asynccontextmanager
    async def lock(
        self, name: str, ttl_s: float = 10.0, timeout_s: float = 30.0, lease: int | None = None
    ) -> AsyncIterator[int]:
        """``async with client.lock("deploy") as token:`` acquire, yield the token, release."""
        token = await self.acquire_lock(name, ttl_s, timeout_s, lease)
        try:
            yield token
        finally:
            with contextlib.suppress(StaleToken):
                await self.release_lock(name, token)

    async def acquire_semaphore(
        self,
        name: str,
        permits: int,
        ttl_s: float = 10.0,
        timeout_s: float = 30.0,
        lease: int | None = None,
    ) -> int:
        """Wait (FIFO) for one of ``permits`` permits of semaphore ``name``; its token."""
        body = api.SemaphoreBody(
            name=name, permits=permits, ttl_s=ttl_s, timeout_s=timeout_s, lease=lease
        )
        reply = await self._call("semaphores.acquire", None, body, api.TokenReply, _wait(timeout_s))
        return reply.token

    async def release_semaphore(self, name: str, token: int) -> None:
        """Give back a permit; StaleToken if it is no longer held."""
        body = api.ReleaseBody(name=name, token=token)
        await self._call("semaphores.release", None, body, api.Empty)

    async def incr(self, key: str, delta: int = 1) -> int:
        """Atomically add ``delta`` to counter ``key``; returns the new value."""
        body = api.CounterBody(key=key, delta=delta)
        return (await self._call("counters.incr", None, body, api.CounterReply)).value

    async def counter(self, key: str) -> int:
        """The value of counter ``key`` (0 if never incremented)."""
        body = api.CounterKey(key=key)
        return (await self._call("counters.get", None, body, api.CounterReply)).value

    # -- topics ------------------------------------------------------------------------------

    async def publish(self, topic: str, payload: Any) -> int:
        """Send ``payload`` (any JSON value) to the subscribers of ``topic``; its seq."""
        body = api.PublishBody(topic=topic, payload=payload)
        return (await self._call("topics.publish", None, body, api.PublishReply)).seq

    async def subscribe(
        self,
        topic: str,
        cursor: str | None = None,
        group: str | None = None,
        idle_timeout_s: float | None = None,
    ) -> AsyncIterator[Message]:
        """The messages of ``topic`` (see the embedded ``subscribe``)."""
        body = api.TopicBody(topic=topic, cursor=cursor, group=group)
        messages = cast(
            AsyncGenerator[Message, None],
            self._transport.stream("topics.subscribe", None, body, Message),
        )
        try:
            while True:
                try:
                    yield await asyncio.wait_for(anext(messages), idle_timeout_s)
                except (StopAsyncIteration, TimeoutError):
                    return
        finally:
            await messages.aclose()


def _wait(timeout_s: object) -> float:
    """How long the server may hold an acquire, for the request's own deadline."""
    return float(timeout_s) if isinstance(timeout_s, int | float) and timeout_s > 0 else 0.0


class AsyncCollection:
    """A collection on a server; the embedded Collection's methods, as coroutines."""

    def __init__(self, client: AsyncClient, config: CollectionConfig) -> None:
        self._client = client
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    async def _call(self, kind: str, body: msgspec.Struct, reply: type[T]) -> T:
        return await self._client._call(kind, self.config.name, body, reply)

    async def put(
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
        """Insert or replace one memory; returns its new version (see the embedded ``put``)."""
        memory = Memory(
            namespace=_as_namespace(namespace),
            key=key,
            text=text,
            vector=vector,
            metadata=cast(dict[str, Any], {} if metadata is None else metadata),
            ttl_s=ttl_s,
            if_version=if_version,
            lease=lease,
        )
        return (await self.put_many([memory], fence=fence))[0]

    async def put_many(
        self,
        memories: Sequence[Memory],
        idempotency_key: str | None = None,
        fence: tuple[str, int] | None = None,
        ack: Ack | str | None = None,
        w: int | None = None,
    ) -> list[int]:
        """Write a batch atomically against rejection; returns the versions in input order.
        ``ack``, ``w``: see the embedded ``put_many``."""
        if not memories:
            return []
        body = api.PutBody(
            memories=list(memories),
            idempotency_key=idempotency_key,
            fence=_fence(fence),
            ack=msgspec.UNSET if ack is None else validation.enum_value("ack", ack, Ack),
            w=msgspec.UNSET if w is None else validation.int_in_range("w", w, 1, 1 << 16),
        )
        reply = await self._call("put", body, api.PutReply)
        self._keep(reply.session)
        return reply.versions

    def _keep(self, token: str | msgspec.UnsetType) -> None:
        if isinstance(token, str):
            self._client.session = session.combine(self._client.session, token)

    def _token(self, level: Consistency) -> str | None:
        return self._client.session if level is Consistency.SESSION else None

    async def get(
        self,
        namespace: Namespace,
        key: str,
        consistency: Consistency | str = Consistency.STRONG,
        r: int | None = None,
    ) -> Memory | None:
        """The memory at (namespace, key) with its vector, or None. ``consistency``, ``r``:
        see the embedded ``get``."""
        level = validation.enum_value("consistency", consistency, Consistency)
        body = api.GetBody(
            namespace=_as_namespace(namespace),
            key=key,
            consistency=level,
            session=self._token(level),
            r=None if r is None else validation.int_in_range("r", r, 1, 1 << 16),
        )
        reply = await self._call("get", body, api.GetReply)
        self._keep(reply.session)
        api.vectors_to_numpy(reply.memory)
        return reply.memory

    async def delete(
        self, namespace: Namespace, key: str, fence: tuple[str, int] | None = None
    ) -> bool:
        """Delete the memory at (namespace, key); True if it existed."""
        body = api.DeleteBody(namespace=_as_namespace(namespace), key=key, fence=_fence(fence))
        return (await self._call("delete", body, api.DeleteReply)).deleted

    def _scope(
        self, namespace: Namespace | None, filter: Mapping[str, Any] | None
    ) -> api.ScopeBody:
        return api.ScopeBody(
            namespace=_as_namespace(namespace, allow_empty=True),
            filter=None if filter is None else dict(filter),
        )

    async def delete_where(
        self, namespace: Namespace | None = None, filter: Mapping[str, Any] | None = None
    ) -> int:
        """Delete every matching memory; returns how many."""
        reply = await self._call("delete_where", self._scope(namespace, filter), api.CountReply)
        return reply.count

    async def search(
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
        level = validation.enum_value("consistency", consistency, Consistency)
        token = self._token(level)
        if r is not None:
            validation.int_in_range("r", r, 1, 1 << 16)
        body = api.SearchBody(
            vector=vector,
            k=k,
            namespace=_as_namespace(namespace, allow_empty=True),
            filter=None if filter is None else dict(filter),
            include_vectors=include_vectors,
            consistency=level,
            session=msgspec.UNSET if token is None else token,
            # Sent only when given: a default search keeps the bytes of older versions.
            nprobe=msgspec.UNSET if nprobe is None else nprobe,
            allow_partial=allow_partial if allow_partial else msgspec.UNSET,
            r=msgspec.UNSET if r is None else r,
        )
        reply = await self._call("search", body, api.SearchReply)
        self._keep(reply.session)
        for hit in reply.hits:
            api.vectors_to_numpy(hit.memory)
        return SearchResult(
            reply.hits,
            reply.missing_shards,
            None if reply.session is msgspec.UNSET else reply.session,
        )

    async def count(
        self, namespace: Namespace | None = None, filter: Mapping[str, Any] | None = None
    ) -> int:
        """How many live memories match."""
        return (await self._call("count", self._scope(namespace, filter), api.CountReply)).count

    async def list(
        self,
        namespace: Namespace | None = None,
        filter: Mapping[str, Any] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """One page of memories in (namespace, key) order, without vectors."""
        body = api.ListBody(
            namespace=_as_namespace(namespace, allow_empty=True),
            filter=None if filter is None else dict(filter),
            limit=limit,
            cursor=cursor,
        )
        return await self._call("list", body, Page)

    async def iter(
        self, namespace: Namespace | None = None, filter: Mapping[str, Any] | None = None
    ) -> AsyncIterator[Memory]:
        """Every matching memory, page by page."""
        cursor: str | None = None
        while True:
            page = await self.list(namespace, filter, cursor=cursor)
            for memory in page.items:
                yield memory
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def feed_cursor(self) -> str:
        """The change feed's current end (see the embedded ``feed_cursor``)."""
        return (await self._call("feed_cursor", api.Empty(), api.CursorReply)).cursor

    async def subscribe(
        self,
        namespace: Namespace | None = None,
        filter: Mapping[str, Any] | None = None,
        cursor: str | None = None,
        include_vectors: bool = False,
        idle_timeout_s: float | None = None,
    ) -> AsyncIterator[Event]:
        """The change feed (see the embedded ``subscribe``): an async iterator of events.

        A dropped connection raises Unreachable: subscribe again with the last event's
        cursor to continue with no gap and no duplicate."""
        body = api.SubscribeBody(
            namespace=_as_namespace(namespace, allow_empty=True),
            filter=None if filter is None else dict(filter),
            cursor=cursor,
            include_vectors=include_vectors,
        )
        events = cast(
            AsyncGenerator[Event, None],
            self._client._transport.stream("subscribe", self.config.name, body, Event),
        )
        try:
            while True:
                try:
                    event = await asyncio.wait_for(anext(events), idle_timeout_s)
                except (StopAsyncIteration, TimeoutError):
                    return
                if event.vector is not None:
                    event = msgspec.structs.replace(
                        event, vector=np.asarray(event.vector, dtype=np.float32)
                    )
                yield event
        finally:
            await events.aclose()

    async def describe(self) -> CollectionInfo:
        """The collection's config and current size."""
        return await self._call("collections.describe", api.Empty(), CollectionInfo)
