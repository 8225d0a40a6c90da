"""The operations of the public interface, as msgspec Structs shared by every protocol.

Each operation has a **kind** (its name on the binary protocol), a request type and a reply
type; :data:`OPERATIONS` is the table. The HTTP API decodes the same structs from JSON bodies
(with the collection name in the URL path instead of the body), the binary protocol decodes
them from msgpack, and the SDK builds them, so the three cannot drift apart.

Operations on one collection have a ``...Body`` type (what an HTTP request body holds) and a
``...Call`` subclass that adds ``collection`` (what a binary request body holds).

Vectors travel as JSON arrays of numbers over HTTP. Over msgpack, any numpy array is encoded
as extension type 1 (:data:`VECTOR_EXT`): its little-endian float32 bytes. Plain lists are
also accepted on input, so a client in another language need not know the extension.
"""

from __future__ import annotations

import enum
import importlib.metadata
from typing import Any

import msgspec
import numpy as np

from memcluster.core.types import (
    Ack,
    CollectionConfig,
    CollectionInfo,
    Event,
    Hit,
    Memory,
    Message,
    Page,
)

VERSION = importlib.metadata.version("memcluster")
"""memcluster's version, as installed."""

VECTOR_EXT = 1
"""msgpack extension code of a vector: little-endian float32 bytes."""


class Consistency(enum.StrEnum):
    """How fresh a read must be. On a single node every level reads the one copy.

    In a cluster (see DESIGN.md §6): ``strong`` reads at the shard leader and reflects every
    write acknowledged before it; ``session`` reflects the caller's own writes; ``eventual``
    reads any replica; ``quorum`` asks a majority of replicas.
    """

    STRONG = "strong"
    SESSION = "session"
    EVENTUAL = "eventual"
    QUORUM = "quorum"


# -- encoding hooks ----------------------------------------------------------------------------


def enc_hook(obj: Any) -> Any:
    """msgpack: numpy arrays become float32 extension values; numpy scalars become numbers."""
    if isinstance(obj, np.ndarray):
        return msgspec.msgpack.Ext(VECTOR_EXT, np.ascontiguousarray(obj, dtype="<f4").tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON or msgpack")


def ext_hook(code: int, data: memoryview) -> Any:
    """msgpack: extension type 1 becomes a (writable) float32 numpy array."""
    if code == VECTOR_EXT:
        if len(data) % 4:
            raise ValueError(f"vector extension of {len(data)} bytes is not a float32 array")
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    raise ValueError(f"unknown msgpack extension type {code}")


def json_enc_hook(obj: Any) -> Any:
    """JSON: numpy arrays become lists of numbers; numpy scalars become numbers."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON or msgpack")


def vectors_to_numpy(memory: Memory | None) -> None:
    """Turn a decoded memory's JSON vector (a list) into the float32 array embedded returns."""
    if (
        memory is not None
        and memory.vector is not None
        and not isinstance(memory.vector, np.ndarray)
    ):
        memory.vector = np.asarray(memory.vector, dtype=np.float32)


# -- common ------------------------------------------------------------------------------------


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error reply: ``code`` from the error table, a message saying what to fix, and the
    error's structured fields (``expected``/``actual`` of a version conflict, ``leader_hint``)."""

    code: str
    message: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)


class Empty(msgspec.Struct, forbid_unknown_fields=True):
    """No arguments, or nothing to return."""


class Health(msgspec.Struct, kw_only=True):
    """Liveness and readiness of one node."""

    status: str
    """"ok" while the node serves requests, "stopping" during a graceful shutdown."""
    ready: bool
    node: str
    version: str
    collections: int


class CollectionList(msgspec.Struct):
    collections: list[str]


class CollectionRef(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Names a collection (binary protocol bodies of describe and drop)."""

    collection: str


# -- operations on one collection --------------------------------------------------------------


class PutBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    memories: list[Memory]
    idempotency_key: str | None = None
    fence: tuple[str, int] | None = None
    """(lock name, fencing token): written only while the token holds the lock."""
    ack: Ack | msgspec.UnsetType = msgspec.UNSET
    """Replicated collections: when this write is acknowledged (default: the collection's
    ``ack``). Sent only when given."""
    w: int | msgspec.UnsetType = msgspec.UNSET
    """``replication="multi"`` collections: acknowledge once this many replicas hold the
    write (W; overrides ``ack``). Sent only when given."""


class PutCall(PutBody, kw_only=True):
    collection: str


class PutReply(msgspec.Struct):
    versions: list[int]
    session: str | msgspec.UnsetType = msgspec.UNSET
    """In a cluster: the session token including this write (``memcluster.core.session``)."""


class KeyBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    namespace: tuple[str, ...]
    key: str


class KeyCall(KeyBody, kw_only=True):
    collection: str


class GetBody(KeyBody, kw_only=True, omit_defaults=True):
    consistency: Consistency = Consistency.STRONG
    """See :class:`Consistency` (a strong get has the bytes of protocol v1)."""
    session: str | None = None
    """``consistency="session"``: the session token (HTTP: or the Memcluster-Session header)."""
    r: int | None = None
    """``consistency="quorum"`` on ``replication="multi"`` collections: how many replicas
    to read (R; None: a majority)."""


class GetCall(GetBody, kw_only=True):
    collection: str


class DeleteBody(KeyBody, kw_only=True):
    fence: tuple[str, int] | None = None


class DeleteCall(DeleteBody, kw_only=True):
    collection: str


class GetReply(msgspec.Struct):
    memory: Memory | None
    session: str | msgspec.UnsetType = msgspec.UNSET
    """A session read: the token, updated with what it saw."""


class DeleteReply(msgspec.Struct):
    deleted: bool


class ScopeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    namespace: tuple[str, ...] | None = None
    filter: dict[str, Any] | None = None


class ScopeCall(ScopeBody, kw_only=True):
    collection: str


class CountReply(msgspec.Struct):
    count: int


class SearchBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    vector: Any
    k: int = 10
    namespace: tuple[str, ...] | None = None
    filter: dict[str, Any] | None = None
    include_vectors: bool = False
    consistency: Consistency = Consistency.STRONG
    session: str | msgspec.UnsetType | None = msgspec.UNSET
    """``consistency="session"``: the session token (HTTP: or the Memcluster-Session header)."""
    r: int | msgspec.UnsetType | None = msgspec.UNSET
    """``consistency="quorum"`` on ``replication="multi"`` collections: how many replicas
    to read (R; unset or None: a majority). Sent only when given."""
    nprobe: int | msgspec.UnsetType | None = msgspec.UNSET
    """Vector-sharded collections: how many nearest-centroid shards to search (unset or None:
    the collection's ``nprobe``; 0 or >= shards: all of them, an exact plan). Unset fields
    are not sent, so a search without them has the bytes of protocol version 1."""
    allow_partial: bool | msgspec.UnsetType = msgspec.UNSET
    """Answer from the shards that can, listing the others in ``missing_shards``, instead of
    failing when a shard is unavailable (unset: False)."""


class SearchCall(SearchBody, kw_only=True):
    collection: str


class SearchReply(msgspec.Struct):
    hits: list[Hit]
    missing_shards: list[str] = []
    """Shards that did not answer (only with ``allow_partial``), as "collection/NNNN"."""
    session: str | msgspec.UnsetType = msgspec.UNSET
    """A session read: the token, updated with what it saw."""


class ListBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    namespace: tuple[str, ...] | None = None
    filter: dict[str, Any] | None = None
    limit: int = 100
    cursor: str | None = None


class ListCall(ListBody, kw_only=True):
    collection: str


class CursorReply(msgspec.Struct):
    cursor: str


class SubscribeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    namespace: tuple[str, ...] | None = None
    filter: dict[str, Any] | None = None
    cursor: str | None = None
    include_vectors: bool = False


class SubscribeCall(SubscribeBody, kw_only=True):
    collection: str


class PublishBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    topic: str
    payload: Any


class PublishReply(msgspec.Struct):
    seq: int


class TopicBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    topic: str
    cursor: str | None = None
    group: str | None = None


# -- coordination: leases, locks, semaphores, counters (no collection) ------------------------


class LeaseBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    ttl_s: float


class LeaseRef(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    lease: int


class LeaseReply(msgspec.Struct):
    lease: int


class KeepaliveReply(msgspec.Struct):
    expires_at: float


class LockBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    ttl_s: float = 10.0
    timeout_s: float = 30.0
    lease: int | None = None


class SemaphoreBody(LockBody, kw_only=True):
    permits: int


class ReleaseBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    token: int


class TokenReply(msgspec.Struct):
    token: int


class CounterBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    key: str
    delta: int = 1


class CounterKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    key: str


class CounterReply(msgspec.Struct):
    value: int


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the operation table."""

    request: type[msgspec.Struct]
    """The binary protocol body (``...Call``: with the collection name)."""
    body: type[msgspec.Struct]
    """The HTTP request body (``...Body``: the collection is in the path)."""
    reply: type[msgspec.Struct]
    method: str
    path: str
    """HTTP route; ``{collection}`` is the collection name."""
    write: bool = False
    """Changes data (needs the ``write`` role)."""
    admin: bool = False
    """Changes the set of collections (needs the ``admin`` role)."""
    public: bool = False
    """Served without an API key (health probes)."""
    retry: bool = True
    """The SDK may resend it after a retryable error. False for operations whose effect
    would be doubled (an acquire, an increment)."""
    blocking: bool = False
    """May wait long (an acquire): served on its own thread pool, with its own timeout."""
    stream: bool = False
    """Answers with a stream of ``reply`` items (binary: "item" frames; HTTP: Server-Sent
    Events on a GET whose query parameters are the body's fields, JSON-encoded)."""


_C = "/v1/collections/{collection}"

OPERATIONS: dict[str, Operation] = {
    "health": Operation(
        request=Empty, body=Empty, reply=Health, method="GET", path="/v1/health", public=True
    ),
    "collections.list": Operation(
        request=Empty, body=Empty, reply=CollectionList, method="GET", path="/v1/collections"
    ),
    "collections.create": Operation(
        request=CollectionConfig,
        body=CollectionConfig,
        reply=CollectionInfo,
        method="POST",
        path="/v1/collections",
        write=True,
        admin=True,
    ),
    "collections.describe": Operation(
        request=CollectionRef, body=Empty, reply=CollectionInfo, method="GET", path=_C
    ),
    "collections.drop": Operation(
        request=CollectionRef,
        body=Empty,
        reply=Empty,
        method="DELETE",
        path=_C,
        write=True,
        admin=True,
    ),
    "put": Operation(
        request=PutCall,
        body=PutBody,
        reply=PutReply,
        method="POST",
        path=_C + "/memories",
        write=True,
    ),
    "get": Operation(
        request=GetCall, body=GetBody, reply=GetReply, method="POST", path=_C + "/memories/get"
    ),
    "delete": Operation(
        request=DeleteCall,
        body=DeleteBody,
        reply=DeleteReply,
        method="POST",
        path=_C + "/memories/delete",
        write=True,
    ),
    "delete_where": Operation(
        request=ScopeCall,
        body=ScopeBody,
        reply=CountReply,
        method="POST",
        path=_C + "/memories/delete_where",
        write=True,
    ),
    "count": Operation(
        request=ScopeCall,
        body=ScopeBody,
        reply=CountReply,
        method="POST",
        path=_C + "/memories/count",
    ),
    "search": Operation(
        request=SearchCall, body=SearchBody, reply=SearchReply, method="POST", path=_C + "/search"
    ),
    "list": Operation(
        request=ListCall, body=ListBody, reply=Page, method="POST", path=_C + "/memories/list"
    ),
    "feed_cursor": Operation(
        request=CollectionRef, body=Empty, reply=CursorReply, method="GET", path=_C + "/cursor"
    ),
    "subscribe": Operation(
        request=SubscribeCall,
        body=SubscribeBody,
        reply=Event,
        method="GET",
        path=_C + "/subscribe",
        stream=True,
        retry=False,
    ),
}


def _coord(
    path: str,
    body: type[msgspec.Struct],
    reply: type[msgspec.Struct],
    *,
    write: bool = True,
    retry: bool = True,
    blocking: bool = False,
) -> Operation:
    return Operation(
        request=body,
        body=body,
        reply=reply,
        method="POST",
        path=path,
        write=write,
        retry=retry,
        blocking=blocking,
    )


OPERATIONS |= {
    "leases.grant": _coord("/v1/leases/grant", LeaseBody, LeaseReply, retry=False),
    "leases.keepalive": _coord("/v1/leases/keepalive", LeaseRef, KeepaliveReply),
    "leases.revoke": _coord("/v1/leases/revoke", LeaseRef, Empty),
    "locks.acquire": _coord("/v1/locks/acquire", LockBody, TokenReply, retry=False, blocking=True),
    "locks.release": _coord("/v1/locks/release", ReleaseBody, Empty),
    "semaphores.acquire": _coord(
        "/v1/semaphores/acquire", SemaphoreBody, TokenReply, retry=False, blocking=True
    ),
    "semaphores.release": _coord("/v1/semaphores/release", ReleaseBody, Empty),
    "counters.incr": _coord("/v1/counters/incr", CounterBody, CounterReply, retry=False),
    "counters.get": _coord("/v1/counters/get", CounterKey, CounterReply, write=False),
    "topics.publish": _coord("/v1/topics/publish", PublishBody, PublishReply, retry=False),
    "topics.subscribe": Operation(
        request=TopicBody,
        body=TopicBody,
        reply=Message,
        method="GET",
        path="/v1/topics/subscribe",
        stream=True,
        retry=False,
    ),
}
"""Every operation by kind: wire types, HTTP route and the role it needs."""
