"""The etcd key layout of a memcluster cluster, and the values stored under it.

Every key of cluster ``C`` is under ``/memcluster/C/``, so several clusters can share one etcd::

    /memcluster/C/nodes/{node_id}                 NodeInfo (JSON), put on the node's lease
    /memcluster/C/collections/{name}              CollectionConfig (JSON)
    /memcluster/C/shards/{collection}/{shard:04d} ShardAssignment (JSON): the shard map entry
    /memcluster/C/controller                      the controller's node id (UTF-8), on its lease
    /memcluster/C/draining/{node_id}              present while the node is being drained
    /memcluster/C/coordination                    ShardAssignment of the coordination shard

* **nodes/**: a node registers itself by putting its key on a lease it keeps alive; the
  keepalive is its heartbeat, and the lease's expiry deletes the key: the failure detector.
  The set of keys under ``nodes/`` is the membership.
* **collections/**: one key per collection, written when it is created, deleted when it is
  dropped.
* **shards/**: one key per shard of a collection (``shard`` in [0, SHARDS_MAX), zero-padded
  so that key order is shard order). Each value carries an epoch, the replicas (in chain
  order for chain replication), the leader and the in-sync set. Every change is a txn
  conditioned on the key's ``mod_revision`` as read, and increases the epoch.
* **coordination**: the one coordination shard (leases, locks, semaphores, counters,
  topics) is placed and moved like a collection's shard; its id is :data:`COORDINATION`.
* **draining/**: ``memcluster drain NODE`` puts the node's key here; the controller moves
  every shard off a draining node and places nothing new on it. ``--undo`` deletes the key.
* **controller**: the election key (:func:`~memcluster.cluster.coordinator.campaign`).

Names in keys are checked so that no name can reach into another's range: ``cluster`` and
node ids are 1-64 letters, digits, ``_ . -`` starting with a letter or digit (collection
names follow the same rule, checked by :func:`memcluster.core.validation.collection_name`),
and each prefix ends with ``/``. Values are JSON so that ``etcdctl get`` shows them; they
accept unknown fields, so a node of an older version can read what a newer one wrote.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from memcluster.core.errors import CorruptionError, InvalidArgument, InvalidName
from memcluster.core.validation import collection_name

ROOT = "/memcluster/"
SHARDS_MAX = 10_000
"""Shards per collection: the key's four digits."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
T = TypeVar("T")


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidName(
            f"cluster: {what} {value!r} is invalid: use 1-64 letters, digits, '_', '.' or '-',"
            " starting with a letter or digit"
        )
    return value


def cluster_prefix(cluster: str) -> bytes:
    """``/memcluster/{cluster}/``: every key of the cluster."""
    return f"{ROOT}{_name(cluster, 'cluster name')}/".encode()


def nodes_prefix(cluster: str) -> bytes:
    return cluster_prefix(cluster) + b"nodes/"


def node_key(cluster: str, node_id: str) -> bytes:
    return nodes_prefix(cluster) + _name(node_id, "node id").encode()


def collections_prefix(cluster: str) -> bytes:
    return cluster_prefix(cluster) + b"collections/"


def collection_key(cluster: str, name: str) -> bytes:
    return collections_prefix(cluster) + collection_name(name).encode()


def shards_prefix(cluster: str, collection: str | None = None) -> bytes:
    """The shard map of the whole cluster, or of one collection."""
    prefix = cluster_prefix(cluster) + b"shards/"
    return prefix if collection is None else prefix + collection_name(collection).encode() + b"/"


def shard_key(cluster: str, collection: str, shard: int) -> bytes:
    if not isinstance(shard, int) or not 0 <= shard < SHARDS_MAX:
        raise InvalidArgument(f"cluster: shard {shard!r} is not in [0, {SHARDS_MAX})")
    return shards_prefix(cluster, collection) + f"{shard:04d}".encode()


COORDINATION = ("#coordination", 0)
"""The shard id of the coordination shard (``#`` is in no collection name)."""


def coordination_key(cluster: str) -> bytes:
    return cluster_prefix(cluster) + b"coordination"


def assignment_key(cluster: str, shard: tuple[str, int]) -> bytes:
    """Where a shard's :class:`ShardAssignment` lives: its ``shards/`` key, or
    ``coordination`` for :data:`COORDINATION`."""
    if shard == COORDINATION:
        return coordination_key(cluster)
    return shard_key(cluster, *shard)


def draining_prefix(cluster: str) -> bytes:
    return cluster_prefix(cluster) + b"draining/"


def draining_key(cluster: str, node_id: str) -> bytes:
    return draining_prefix(cluster) + _name(node_id, "node id").encode()


def controller_key(cluster: str) -> bytes:
    return cluster_prefix(cluster) + b"controller"


def _rest(prefix: bytes, key: bytes, what: str) -> str:
    if not key.startswith(prefix):
        raise InvalidArgument(f"cluster: {key!r} is not a {what} key (under {prefix!r})")
    return key[len(prefix) :].decode(errors="replace")


def parse_node_key(cluster: str, key: bytes) -> str:
    """The node id of a ``nodes/`` key."""
    return _name(_rest(nodes_prefix(cluster), key, "node"), "node id")


def parse_collection_key(cluster: str, key: bytes) -> str:
    """The collection name of a ``collections/`` key."""
    return collection_name(_rest(collections_prefix(cluster), key, "collection"))


def parse_shard_key(cluster: str, key: bytes) -> tuple[str, int]:
    """(collection, shard) of a ``shards/`` key."""
    collection, sep, digits = _rest(shards_prefix(cluster), key, "shard").partition("/")
    if not sep or len(digits) != 4 or not digits.isdigit():
        raise InvalidArgument(f"cluster: {key!r} is not a shard key (…/shards/NAME/NNNN)")
    return collection_name(collection), int(digits)


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a node says about itself under ``nodes/{id}``."""

    id: str
    http_url: str
    """The public HTTP API, e.g. ``http://10.0.0.5:8080``."""
    peer_url: str
    """The binary protocol endpoint for other nodes and direct clients, ``mc://HOST:PORT``."""
    started_at: float
    """Seconds since the Unix epoch."""
    data_bytes: int = 0
    """Bytes of shard data the node holds, as last reported."""


class ShardAssignment(msgspec.Struct, frozen=True, kw_only=True):
    """One shard's configuration: the shard map entry under ``shards/{collection}/{shard}``.

    Invariants (checked on construction and decoding): ``epoch`` >= 1; ``replicas`` holds no
    node twice; ``in_sync`` is a subset of ``replicas``; ``leader``, if set, is in ``in_sync``.
    """

    epoch: int
    """Increases with every change; replicas reject messages of a lower epoch."""
    replicas: tuple[str, ...]
    """Node ids holding a replica, in chain order for chain replication."""
    leader: str | None = None
    """The node id accepting writes (the head for chain); None while there is none."""
    in_sync: tuple[str, ...] = ()
    """Replicas that have every acknowledged write: the only candidates for leader."""

    def __post_init__(self) -> None:
        # ValueError, so that msgspec reports a bad stored value as a ValidationError.
        if self.epoch < 1:
            raise ValueError(f"epoch {self.epoch} < 1")
        if len(set(self.replicas)) != len(self.replicas):
            raise ValueError(f"a node twice in replicas {self.replicas}")
        if len(set(self.in_sync)) != len(self.in_sync) or not set(self.in_sync) <= set(
            self.replicas
        ):
            raise ValueError(f"in_sync {self.in_sync} is not a set of replicas {self.replicas}")
        if self.leader is not None and self.leader not in self.in_sync:
            raise ValueError(f"leader {self.leader!r} is not in in_sync {self.in_sync}")


_encoder = msgspec.json.Encoder()


def encode(value: msgspec.Struct) -> bytes:
    """A value for etcd (NodeInfo, ShardAssignment, CollectionConfig): JSON."""
    return _encoder.encode(value)


def decode(raw: bytes, type_: type[T], key: bytes) -> T:
    """Decode the value read at ``key``; CorruptionError (naming the key) if it is not a
    valid ``type_``."""
    try:
        return msgspec.json.decode(raw, type=type_)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise CorruptionError(
            f"cluster: the value at {key.decode(errors='replace')} is not a valid"
            f" {type_.__name__}: {e}"
        ) from e
