"""The stable hash that places a memory on a shard.

The embedded engine and the cluster use this one function, so a collection's data can move
from one process to many without rehashing. It must never change for an existing format
version: a golden test pins its values.

The hash is the first 8 bytes (little-endian) of BLAKE2b over the namespace parts and the key,
each UTF-8 encoded and followed by a 0x1F unit separator (which names cannot contain, see
``validation``); the shard is that number modulo the shard count.

Collections sharded by namespace (``shard_key="namespace"`` or ``"namespace:N"``) use
:func:`namespace_hash` instead: the same bytes over the namespace parts alone, hashed with the
BLAKE2b personalisation ``b"mc-namespace"`` so that it never equals a :func:`key_hash`
(``namespace_hash(("a", "b"))`` and ``key_hash(("a",), "b")`` hash the same bytes).
"""

from __future__ import annotations

import hashlib

SEPARATOR = "\x1f"


def key_hash(namespace: tuple[str, ...], key: str) -> int:
    """A 64-bit stable hash of (namespace, key)."""
    joined = SEPARATOR.join((*namespace, key)) + SEPARATOR
    digest = hashlib.blake2b(joined.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def shard_of(namespace: tuple[str, ...], key: str, shards: int) -> int:
    """The shard in [0, shards) that holds (namespace, key)."""
    return key_hash(namespace, key) % shards


NAMESPACE_PERSON = b"mc-namespace"
"""BLAKE2b personalisation of :func:`namespace_hash` (part of the format: never change it)."""


def namespace_hash(parts: tuple[str, ...]) -> int:
    """A 64-bit stable hash of namespace parts (a whole namespace or its first N parts).

    BLAKE2b-64 (personalised ``b"mc-namespace"``) over each part UTF-8 encoded and followed
    by 0x1F, read little-endian. Pinned by a golden test like :func:`key_hash`.
    """
    joined = "".join(part + SEPARATOR for part in parts)
    digest = hashlib.blake2b(joined.encode(), digest_size=8, person=NAMESPACE_PERSON).digest()
    return int.from_bytes(digest, "little")
