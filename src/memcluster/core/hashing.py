"""The stable hash that places a memory on a shard.

The embedded engine and the cluster use this one function, so a collection's data can move
from one process to many without rehashing. It must never change for an existing format
version: a golden test pins its values.

The hash is the first 8 bytes (little-endian) of BLAKE2b over the namespace parts and the key,
each UTF-8 encoded and followed by a 0x1F unit separator (which names cannot contain, see
``validation``); the shard is that number modulo the shard count.
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
