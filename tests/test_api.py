"""The public surface: what `import memcluster` offers is pinned."""

from __future__ import annotations

import inspect

import memcluster
import memcluster.client.sync


def test_public_names_are_pinned() -> None:
    assert sorted(memcluster.__all__) == [
        "AlreadyExists",
        "AsyncClient",
        "AsyncCollection",
        "CapacityExceeded",
        "Client",
        "Collection",
        "CollectionConfig",
        "CollectionExists",
        "CollectionInfo",
        "CollectionNotFound",
        "CollectionStats",
        "Config",
        "Consistency",
        "CorruptionError",
        "CursorExpired",
        "Database",
        "DimensionMismatch",
        "Durability",
        "Event",
        "EventOp",
        "Eviction",
        "FatalError",
        "Hit",
        "InvalidArgument",
        "InvalidFilter",
        "InvalidMetadata",
        "InvalidName",
        "InvalidState",
        "InvalidVector",
        "LeaseExpired",
        "MemclusterError",
        "Memory",
        "Metric",
        "NotFound",
        "NotLeader",
        "Overloaded",
        "Page",
        "PayloadTooLarge",
        "PermissionDenied",
        "ProtocolError",
        "RequestError",
        "RetryableError",
        "ShardUnavailable",
        "StaleToken",
        "StorageError",
        "Timeout",
        "Unauthenticated",
        "Unreachable",
        "VersionConflict",
        "connect",
        "is_retryable",
        "open",
    ]
    for name in memcluster.__all__:
        assert hasattr(memcluster, name), name


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(fn)
        for name, fn in vars(cls).items()
        if callable(fn) and not name.startswith("_")
    }


def test_remote_collections_have_the_embedded_signatures() -> None:
    """Same names, parameters, defaults and return annotations on all three collection types
    (the async one returns the same types from coroutines)."""
    embedded = _public_methods(memcluster.Collection)
    del embedded["feed_reader"]  # the server's hook under subscribe(), not client API
    for cls in (memcluster.client.sync.Collection, memcluster.AsyncCollection):
        remote = _public_methods(cls)
        for name, sig in embedded.items():
            assert name in remote, (cls, name)
            assert list(remote[name].parameters.values()) == list(sig.parameters.values()), (
                cls,
                name,
            )
            if cls is not memcluster.AsyncCollection or name not in ("iter", "subscribe"):
                assert remote[name].return_annotation == sig.return_annotation, (cls, name)


def test_clients_have_the_embedded_database_methods() -> None:
    embedded = _public_methods(memcluster.Database)
    shared = [
        "create_collection",
        "collection",
        "list_collections",
        "drop_collection",
        "grant_lease",
        "keepalive",
        "revoke",
        "acquire_lock",
        "release_lock",
        "lock",
        "acquire_semaphore",
        "release_semaphore",
        "incr",
        "counter",
    ]
    for cls in (memcluster.Client, memcluster.AsyncClient):
        remote = _public_methods(cls)
        for name in shared:
            params = list(embedded[name].parameters.values())
            assert list(remote[name].parameters.values()) == params, (cls, name)
