"""The sharding strategies of a collection: which shard a memory goes to, and which shards a
read must touch. Pure and sans-IO (no locks, no files): the embedded engine and the cluster's
router (``memcluster.query.router``) route with the same functions.

Strategies (``CollectionConfig.sharding``), each modulo ``shards`` where it hashes
    - hash, ``shard_key="key"``: ``shard_of(namespace, key)``, the original placement.
    - hash, ``"namespace"``: ``namespace_hash(namespace)``; ``"namespace:N"``:
      ``namespace_hash(namespace[:N])`` (the whole namespace if it has fewer parts).
    - range: ``bisect_right(boundaries, metadata[range_field])``: shard i holds
      ``[boundaries[i-1], boundaries[i])``.
    - vector: the nearest centroid under the metric (ties: the lowest shard).

    Under hash sharding a key's shard is fixed by its name (``Sharder.keyed``). Under range
    and vector sharding a key may live in any shard and moves when its field or vector
    changes: the engine deletes it from the old shard in the same call that writes it to the
    new one (see ``Collection.put_many``).

Which shards a read touches (:meth:`Sharder.search_shards`)
    The rule is safety first: a shard is skipped only if it cannot hold a match.

    - hash, ``"namespace:N"``: a namespace prefix of at least N parts fixes the first N parts
      of every namespace under it, so one shard; a shorter prefix: every shard.
    - hash, ``"namespace"`` (the whole namespace, as if N were unbounded): every shard. A
      prefix also covers the longer namespaces under it, and those hash anywhere. Choose
      ``"namespace:N"`` when searches name the first N parts.
    - hash, ``"key"``: every shard.
    - range: the filter's top-level constraints on ``range_field`` (a number, ``$eq``,
      ``$gt``, ``$gte``, ``$lt``, ``$lte``, ``$in`` of numbers, and the same inside
      ``$and``) bound the values, and only the shards whose ranges meet the bounds are
      touched. Any other clause (``$or``, ``$not``, ``$ne``, non-numbers, other fields) adds
      no bound, which can only keep more shards.
    - vector: a search probes the ``nprobe`` shards whose centroids are nearest the query
      (the argument, else the config's, else all; 0 or >= shards: all). This one is
      approximate by design: a memory nearer the query than any probed centroid suggests may
      sit in an unprobed shard. ``count``, ``list`` and ``delete_where`` touch every shard.

Cost
    Placement is one pass: a hash per item, one ``searchsorted`` (range) or one float64
    matrix product with the centroids (vector). A vector almost equally near two centroids
    may land on either from one batch to the next (rounding): that only moves it, the
    engine keeps every key in one shard. Search routing is O(shards * dim).
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, assert_never

import msgspec
import numpy as np
import numpy.typing as npt

from memcluster.core import validation
from memcluster.core.errors import InvalidArgument, InvalidMetadata
from memcluster.core.hashing import namespace_hash, shard_of
from memcluster.core.types import Ack, CollectionConfig, Metric, Replication, Sharding

MAX_REPLICATION_FACTOR = 7

__all__ = ["Sharder", "check_config", "config_fields", "kmeans", "parse_shard_key"]

_SHARD_KEY = re.compile(r"namespace:([1-9][0-9]*)")
WHOLE_NAMESPACE = sys.maxsize
"""The depth of ``shard_key="namespace"``: slicing a namespace to it keeps every part."""

Floats = npt.NDArray[np.float64]


def _fail(message: str) -> InvalidArgument:
    return InvalidArgument(f"sharding: {message}")


def parse_shard_key(shard_key: str) -> int | None:
    """How many leading namespace parts a hash ``shard_key`` covers: None for ``"key"``
    (namespace and key), ``WHOLE_NAMESPACE`` for ``"namespace"``, N for ``"namespace:N"``.
    InvalidArgument for anything else."""
    if shard_key == "key":
        return None
    if shard_key == "namespace":
        return WHOLE_NAMESPACE
    match = _SHARD_KEY.fullmatch(shard_key) if isinstance(shard_key, str) else None
    if match is None:
        raise _fail(
            f"shard_key is {shard_key!r}; use 'key' (namespace and key), 'namespace' (the whole"
            " namespace) or 'namespace:N' with N >= 1 (its first N parts), e.g. 'namespace:2'"
        )
    return int(match.group(1))


def check_config(config: CollectionConfig) -> CollectionConfig:
    """``config`` with its sharding fields checked and normalised (numbers as floats).

    Raises InvalidArgument saying what to fix: a field given for another strategy, a missing
    field, boundaries of the wrong count / not ascending / not finite, centroids of the wrong
    shape / not finite / zero under cosine / repeated, a bad ``shard_key``, ``nprobe < 1``.
    """
    try:  # types and enums as msgspec decodes them, for configs built by hand
        config = msgspec.convert(msgspec.structs.asdict(config), CollectionConfig)
    except msgspec.ValidationError as exc:
        raise _fail(f"collection config: {exc}") from None
    if config.shards < 1 or config.dim < 1:
        raise _fail(f"shards ({config.shards}) and dim ({config.dim}) must be at least 1")
    if not 1 <= config.replication_factor <= MAX_REPLICATION_FACTOR:
        raise _fail(
            f"replication_factor is {config.replication_factor}; give 1 (no copies) to"
            f" {MAX_REPLICATION_FACTOR}, at most the number of nodes"
        )
    if config.replication is Replication.MULTI and config.sharding is not Sharding.HASH:
        raise _fail(
            f"replication='multi' needs sharding='hash' (not {config.sharding.value!r}):"
            " range and vector sharding move memories between shards, which needs a single"
            " writer per shard; use replication='leader' or 'chain' with them"
        )
    if config.replication is Replication.CHAIN and config.ack is not Ack.ALL:
        raise _fail(
            f"replication='chain' acknowledges a write once the tail has it (ack='all');"
            f" ack={config.ack.value!r} is for replication='leader'"
        )
    strategy = config.sharding
    extra = {
        "shard_key": config.shard_key != "key",
        "range_field": config.range_field is not None,
        "boundaries": config.boundaries is not None,
        "centroids": config.centroids is not None,
        "nprobe": config.nprobe is not None,
        "range_shards": config.range_shards is not None,
        "split_items": config.split_items is not None,
        "train_after": config.train_after is not None,
    }
    owner = {
        "shard_key": Sharding.HASH,
        "range_field": Sharding.RANGE,
        "boundaries": Sharding.RANGE,
        "centroids": Sharding.VECTOR,
        "nprobe": Sharding.VECTOR,
        "range_shards": Sharding.RANGE,
        "split_items": Sharding.RANGE,
        "train_after": Sharding.VECTOR,
    }
    for name, given in extra.items():
        if given and owner[name] is not strategy:
            raise _fail(
                f"{name} applies to sharding={owner[name].value!r} only, and this collection"
                f" has sharding={strategy.value!r}: remove {name} or change sharding"
            )
    match strategy:
        case Sharding.HASH:
            parse_shard_key(config.shard_key)
            return config
        case Sharding.RANGE:
            return _check_range(config)
        case Sharding.VECTOR:
            return _check_vector(config)
        case _:
            assert_never(strategy)


def _check_range(config: CollectionConfig) -> CollectionConfig:
    field = config.range_field
    example = ", ".join(str(10.0 * (i + 1)) for i in range(min(config.shards - 1, 3)))
    if field is None:
        raise _fail(
            "range sharding needs range_field: the top-level metadata field whose number places"
            " a memory, e.g. range_field='timestamp'"
        )
    if not field or field.startswith("$") or "." in field or re.search(r"[\x00-\x1f]", field):
        raise _fail(
            f"range_field {field!r} is not a metadata field name: use a non-empty top-level"
            " name without '.', a leading '$' or control characters"
        )
    want = config.shards - 1
    if config.boundaries is None:
        raise _fail(
            f"range sharding needs boundaries: shards - 1 = {want} strictly ascending numbers"
            f" (e.g. [{example}]; [] for one shard). Shard i holds values in"
            " [boundaries[i-1], boundaries[i])"
        )
    if len(config.boundaries) != want:
        raise _fail(
            f"boundaries has {len(config.boundaries)} numbers; {config.shards} shards need"
            f" shards - 1 = {want}"
        )
    bounds = [float(b) for b in config.boundaries]
    for i, b in enumerate(bounds):
        if not math.isfinite(b):
            raise _fail(f"boundaries[{i}] is {b}; use finite numbers")
        if i and b <= bounds[i - 1]:
            raise _fail(
                f"boundaries[{i}] = {b} is not above boundaries[{i - 1}] = {bounds[i - 1]}:"
                " they must be strictly ascending (equal ones would leave a shard empty)"
            )
    if config.range_shards is not None and sorted(config.range_shards) != list(
        range(config.shards)
    ):
        raise _fail(
            f"range_shards is {config.range_shards}: it must list each of the {config.shards}"
            " shards once (the shard of each value interval, in value order)"
        )
    if config.split_items is not None and config.split_items < 2:
        raise _fail(f"split_items is {config.split_items}; use an int >= 2, or None")
    return msgspec.structs.replace(config, boundaries=bounds)


def _check_vector(config: CollectionConfig) -> CollectionConfig:
    shards, dim = config.shards, config.dim
    if config.train_after is not None and config.train_after < shards:
        raise _fail(
            f"train_after is {config.train_after}; k-means needs at least shards={shards} memories"
        )
    if config.centroids is None and config.train_after is not None:
        return config  # shard 0 takes everything until the cluster learns the centroids
    if config.centroids is None:
        raise _fail(
            f"vector sharding needs centroids: {shards} rows of dim={dim} numbers; pass"
            " sample= (a few thousand typical vectors) to create_collection to compute them"
            " with k-means, or sharding.kmeans(sample, shards); or, in a cluster,"
            " train_after=N to learn them from the first N memories"
        )
    rows = config.centroids
    if len(rows) != shards:
        raise _fail(f"centroids has {len(rows)} rows; shards={shards} needs one per shard")
    for i, row in enumerate(rows):
        if len(row) != dim:
            raise _fail(f"centroids[{i}] has length {len(row)}; the collection has dim={dim}")
    matrix = np.asarray(rows, dtype=np.float64)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        raise _fail(f"centroids[{int(np.flatnonzero(~finite)[0])}] holds NaN or infinity")
    if config.nprobe is not None and config.nprobe < 1:
        raise _fail(f"nprobe is {config.nprobe}; use an int >= 1, or None to probe every shard")
    if config.metric is Metric.COSINE:
        norms = np.linalg.norm(matrix, axis=1)
        if (norms == 0).any():
            raise _fail(
                f"centroids[{int(np.flatnonzero(norms == 0)[0])}] is all zeros, which has no"
                " direction under the cosine metric"
            )
        matrix = matrix / norms[:, None]
    _, first, inverse = np.unique(matrix, axis=0, return_index=True, return_inverse=True)
    if len(first) < shards:
        dup = int(np.flatnonzero(first[inverse.ravel()] != np.arange(shards))[0])
        same = "equal" if config.metric is not Metric.COSINE else "in the same direction"
        raise _fail(
            f"centroids[{int(first[inverse.ravel()[dup]])}] and centroids[{dup}] are {same}:"
            f" shard {dup} would never receive a memory"
        )
    return msgspec.structs.replace(config, centroids=[[float(x) for x in row] for row in rows])


# -- vectors against centroids -------------------------------------------------------------


def _closeness(vectors: npt.ArrayLike, centers: Floats, metric: Metric) -> Floats:
    """(n, k) scores, higher = nearer: dot products (cosine on normalised rows, dot), or
    ``2 v.c - |c|^2`` under l2, which orders like ``-|v - c|^2``."""
    scores: Floats = np.asarray(vectors, dtype=np.float64) @ centers.T
    if metric is Metric.L2:
        scores = 2.0 * scores - np.einsum("ij,ij->i", centers, centers)[None, :]
    return scores


def _nearest(vectors: npt.ArrayLike, centers: Floats, metric: Metric) -> npt.NDArray[np.intp]:
    """Index of the nearest center of each row; ties go to the lowest index."""
    nearest: npt.NDArray[np.intp] = np.argmax(_closeness(vectors, centers, metric), axis=1)
    return nearest


def kmeans(
    sample: npt.ArrayLike,
    k: int,
    *,
    metric: Metric | str = "cosine",
    seed: int = 0,
    iterations: int = 25,
) -> npt.NDArray[np.float32]:
    """``k`` centroids of ``sample`` (an ``n x dim`` array) for vector sharding, float32.

    k-means++ seeding, then Lloyd iterations that assign each row by the placement rule of
    ``metric`` (so a sample row lands in its cluster's shard) and move each centroid to its
    rows' mean. Under cosine the rows and centroids are normalised (spherical k-means); under
    dot a longer centroid attracts more rows, so normalised embeddings balance better. An
    empty cluster restarts at the row that fits its own centroid worst. Deterministic for a
    ``seed``. InvalidArgument for a sample that is not a finite 2-d array with at least ``k``
    distinct rows (after normalisation under cosine).
    """
    metric = validation.enum_value("metric", metric, Metric)
    validation.int_in_range("k", k, 1, 1 << 20)
    validation.int_in_range("iterations", iterations, 1, 10_000)
    try:
        x = np.array(sample, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"kmeans: sample is not an n x dim array of numbers: {exc}") from None
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InvalidArgument(f"kmeans: sample must be an n x dim array, got shape {x.shape}")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise InvalidArgument(
            f"kmeans: sample row {int(np.flatnonzero(~finite)[0])} holds NaN or infinity"
        )
    if metric is Metric.COSINE:
        norms = np.linalg.norm(x, axis=1)
        if (norms == 0).any():
            raise InvalidArgument(
                f"kmeans: sample row {int(np.flatnonzero(norms == 0)[0])} is all zeros, which"
                " has no direction under cosine"
            )
        x /= norms[:, None]
    distinct = len(np.unique(x, axis=0))
    if distinct < k:
        raise InvalidArgument(
            f"kmeans: the sample has {distinct} distinct rows; {k} centroids need at least {k}:"
            " pass a larger sample"
        )
    rng = np.random.default_rng(seed)
    centers = _kmeans_plus_plus(x, k, rng)
    labels: npt.NDArray[np.intp] | None = None
    for _ in range(iterations):
        new = _nearest(x, centers, metric)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centers = _lloyd_step(x, labels, centers, metric)
    return centers.astype(np.float32)


def _kmeans_plus_plus(x: Floats, k: int, rng: np.random.Generator) -> Floats:
    """k rows of ``x`` by greedy k-means++ (Arthur and Vassilvitskii, 2007): each step draws
    a few candidates with probability proportional to their squared distance from the
    nearest row chosen so far and keeps the one that lowers the total the most, which
    rarely puts two seeds in one cluster."""
    n = x.shape[0]
    tries = 2 + int(math.log(k))
    norms2 = np.einsum("ij,ij->i", x, x)

    def distances(rows: npt.NDArray[np.intp]) -> Floats:  # (len(rows), n), without n x dim
        d: Floats = norms2[rows][:, None] + norms2[None, :] - 2.0 * (x[rows] @ x.T)
        return np.maximum(d, 0.0)

    chosen = [int(rng.integers(n))]
    d2 = distances(np.array(chosen))[0]
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0.0:  # pragma: no cover - excluded by the distinct-rows check
            raise InvalidArgument("kmeans: the sample rows are too close to tell apart")
        candidates = rng.choice(n, size=tries, p=d2 / total)
        options = np.minimum(d2, distances(candidates))
        best = int(np.argmin(options.sum(axis=1)))
        chosen.append(int(candidates[best]))
        d2 = options[best]
    centers: Floats = x[chosen].copy()
    return centers


def _lloyd_step(x: Floats, labels: npt.NDArray[np.intp], centers: Floats, metric: Metric) -> Floats:
    k = centers.shape[0]
    sums = np.zeros_like(centers)
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=k)
    new = centers.copy()
    filled = counts > 0
    new[filled] = sums[filled] / counts[filled, None]
    empty = np.flatnonzero(~filled)
    if len(empty):
        fit = _closeness(x, centers, metric)[np.arange(len(x)), labels]
        new[empty] = x[np.argsort(fit, kind="stable")[: len(empty)]]
    if metric is Metric.COSINE:
        norms = np.linalg.norm(new, axis=1)
        zero = norms == 0  # opposite rows cancelled out: keep the old direction
        new[zero] = centers[zero]
        norms[zero] = 1.0
        new /= norms[:, None]
    return new


# -- the router ------------------------------------------------------------------------------


class Sharder:
    """The routing decisions of one collection (see the module docstring for the rules).

    ``shards``: the shard count. ``keyed``: True when a key's shard depends only on
    (namespace, key) (hash sharding), so a get, delete or conditional put looks in one
    shard; False under range and vector sharding, where a key may be in any shard.
    """

    def __init__(self, config: CollectionConfig) -> None:
        config = check_config(config)
        self.config = config
        self.shards = config.shards
        self.keyed = config.sharding is Sharding.HASH
        self._depth = parse_shard_key(config.shard_key) if self.keyed else None
        self._field = config.range_field or ""
        self._bounds: Floats = np.asarray(config.boundaries or [], dtype=np.float64)
        # The shard of each value interval (splits append shards out of value order).
        self._order = np.asarray(
            config.range_shards if config.range_shards is not None else range(config.shards),
            dtype=np.int64,
        )
        self.trained = config.sharding is not Sharding.VECTOR or config.centroids is not None
        centers = np.asarray(config.centroids or np.zeros((0, config.dim)), dtype=np.float64)
        if config.metric is Metric.COSINE and len(centers):
            centers = centers / np.linalg.norm(centers, axis=1)[:, None]
        self._centers: Floats = centers

    def key_shard(self, namespace: tuple[str, ...], key: str) -> int | None:
        """The shard of (namespace, key) under hash sharding; None under range and vector
        sharding (the key may be in any shard)."""
        if not self.keyed:
            return None
        return self._hash_shard(namespace, key)

    def _hash_shard(self, namespace: tuple[str, ...], key: str) -> int:
        if self._depth is None:
            return shard_of(namespace, key, self.shards)
        return namespace_hash(namespace[: self._depth]) % self.shards

    def place(
        self,
        namespaces: Sequence[tuple[str, ...]],
        keys: Sequence[str],
        vectors: npt.NDArray[np.float32],
        metadata: Sequence[Mapping[str, Any] | None],
    ) -> list[int]:
        """The shard of each memory. ``vectors`` is the validated (n, dim) float32 matrix
        (``core.validation.vectors``: rows normalised under cosine); ``metadata`` the memories'
        metadata objects (None as empty). InvalidMetadata when a memory of a range-sharded
        collection lacks a finite number in ``range_field``."""
        strategy = self.config.sharding
        match strategy:
            case Sharding.HASH:
                return [self._hash_shard(ns, k) for ns, k in zip(namespaces, keys, strict=True)]
            case Sharding.RANGE:
                values = self._range_values(metadata)
                intervals = np.searchsorted(self._bounds, values, side="right")
                placed: list[int] = self._order[intervals].tolist()
                return placed
            case Sharding.VECTOR:
                if len(vectors) == 0:
                    return []
                if not self.trained:
                    return [0] * len(vectors)  # until the centroids are learned
                nearest: list[int] = _nearest(vectors, self._centers, self.config.metric).tolist()
                return nearest
            case _:
                assert_never(strategy)

    def _range_values(self, metadata: Sequence[Mapping[str, Any] | None]) -> Floats:
        field = self._field
        values = np.empty(len(metadata), dtype=np.float64)
        for i, meta in enumerate(metadata):
            value = None if meta is None else meta.get(field)
            if isinstance(value, bool) or not isinstance(value, int | float):
                got = "nothing" if value is None else f"{value!r}"
                raise InvalidMetadata(
                    f"memory {i}: metadata {field!r} holds {got}; this collection is sharded by"
                    f" range of {field!r}, so every memory needs a finite number there"
                )
            try:
                values[i] = value
            except OverflowError:
                values[i] = math.inf
            if not math.isfinite(values[i]):
                raise InvalidMetadata(
                    f"memory {i}: metadata {field!r} is {value!r}; use a finite number"
                    " (float64 range)"
                )
        return values

    def all_shards(self) -> list[int]:
        """Every shard, ascending."""
        return list(range(self.shards))

    def search_shards(
        self,
        namespace: tuple[str, ...] | None,
        filter: Mapping[str, Any] | None,
        query: npt.NDArray[np.float32] | None = None,
        nprobe: int | None = None,
    ) -> list[int]:
        """The shards, ascending, that a read under the ``namespace`` prefix matching
        ``filter`` must touch: a search when ``query`` is given (with ``nprobe`` as in
        ``Collection.search``), a count, list or delete_where otherwise. Never leaves out a
        shard that could hold a match, except the unprobed shards of a vector search."""
        strategy = self.config.sharding
        match strategy:
            case Sharding.HASH:
                depth = self._depth
                if depth is not None and namespace and len(namespace) >= depth:
                    return [namespace_hash(namespace[:depth]) % self.shards]
                return self.all_shards()
            case Sharding.RANGE:
                allowed = self._allowed_by(filter)
                found: list[int] = np.flatnonzero(allowed).tolist()
                return found
            case Sharding.VECTOR:
                if nprobe is not None:
                    validation.int_in_range("nprobe", nprobe, 0, sys.maxsize)
                probe = self.config.nprobe if nprobe is None else nprobe
                if query is None or not probe or probe >= self.shards or not self.trained:
                    return self.all_shards()
                scores = _closeness(query[None, :], self._centers, self.config.metric)[0]
                # Stable sort of -score: the lowest shard first among equally near centroids.
                nearest: list[int] = sorted(np.argsort(-scores, kind="stable")[:probe].tolist())
                return nearest
            case _:
                assert_never(strategy)

    # -- range pruning -------------------------------------------------------------------------

    def _allowed_by(self, flt: Mapping[str, Any] | None) -> npt.NDArray[np.bool_]:
        """Shards whose ranges meet every top-level bound ``flt`` puts on ``range_field``."""
        allowed = np.ones(self.shards, dtype=bool)
        if not isinstance(flt, Mapping):
            return allowed
        for name, condition in flt.items():
            if name == "$and" and isinstance(condition, list):
                for sub in condition:
                    allowed &= self._allowed_by(sub)
            elif name == self._field:
                allowed &= self._allowed_by_condition(condition)
        return allowed

    def _allowed_by_condition(self, condition: Any) -> npt.NDArray[np.bool_]:
        allowed = np.ones(self.shards, dtype=bool)
        if _is_number(condition):
            return self._interval(float(condition), True, float(condition), True)
        if not isinstance(condition, Mapping):
            return allowed  # a string, bool, null or list: no numeric bound
        lo, lo_closed, hi, hi_closed = -math.inf, True, math.inf, True
        for op, operand in condition.items():
            if op == "$in" and isinstance(operand, list) and all(map(_is_number, operand)):
                points = np.zeros(self.shards, dtype=bool)
                for value in operand:
                    points |= self._interval(float(value), True, float(value), True)
                allowed &= points
                continue
            if not _is_number(operand):
                continue  # $ne, $nin, $exists, $not, non-numbers: no bound
            x = float(operand)
            if op in ("$eq", "$gt", "$gte") and (x > lo or (x == lo and op == "$gt")):
                lo, lo_closed = x, op != "$gt"
            if op in ("$eq", "$lt", "$lte") and (x < hi or (x == hi and op == "$lt")):
                hi, hi_closed = x, op != "$lt"
        return allowed & self._interval(lo, lo_closed, hi, hi_closed)

    def _interval(
        self, lo: float, lo_closed: bool, hi: float, hi_closed: bool
    ) -> npt.NDArray[np.bool_]:
        """Mask of the shards holding some value in the interval from lo to hi."""
        mask = np.zeros(self.shards, dtype=bool)
        if lo > hi or (lo == hi and not (lo_closed and hi_closed)):
            return mask
        first = int(np.searchsorted(self._bounds, lo, side="right"))
        # The last shard: that of hi itself if it is in, else that of the values just below.
        last = int(np.searchsorted(self._bounds, hi, side="right" if hi_closed else "left"))
        mask[self._order[first : last + 1]] = True
        return mask


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def config_fields(
    *,
    metric: Metric | str,
    shards: int,
    sharding: Sharding | str,
    shard_key: str,
    range_field: str | None,
    boundaries: npt.ArrayLike | None,
    centroids: npt.ArrayLike | None,
    sample: npt.ArrayLike | None,
    nprobe: int | None,
    split_items: int | None = None,
    train_after: int | None = None,
    replication_factor: int = 1,
    replication: str = "leader",
    ack: str = "all",
) -> dict[str, Any]:
    """The sharding fields of a ``CollectionConfig`` from ``create_collection``'s arguments
    (embedded and remote alike): arrays as lists of floats, and ``centroids`` computed from
    ``sample`` with :func:`kmeans` (one centroid per shard, under ``metric``)."""
    if sample is not None:
        if centroids is not None:
            raise _fail("pass centroids or sample (to compute them), not both")
        if validation.enum_value("sharding", sharding, Sharding) is not Sharding.VECTOR:
            raise _fail("sample= computes the centroids of sharding='vector'; add that, or drop it")
        validation.int_in_range("shards", shards, 1, 1 << 20)
        centroids = kmeans(sample, shards, metric=metric)
    return {
        "sharding": sharding,
        "shard_key": shard_key,
        "range_field": range_field,
        "boundaries": _as_list(boundaries, "boundaries", 1),
        "centroids": _as_list(centroids, "centroids", 2),
        "nprobe": nprobe,
        "split_items": split_items,
        "train_after": train_after,
        "replication_factor": replication_factor,
        "replication": replication,
        "ack": ack,
    }


def _as_list(value: npt.ArrayLike | None, name: str, ndim: int) -> Any:
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        if ndim == 2 and isinstance(value, Sequence):
            with contextlib.suppress(TypeError, ValueError):  # rows of unequal lengths:
                rows = [np.asarray(row, dtype=np.float64) for row in value]
                if all(row.ndim == 1 for row in rows):  # check_config says which is wrong
                    return [row.tolist() for row in rows]
        raise _fail(f"{name} must be numbers in {ndim} dimension(s): {exc}") from None
    if array.ndim != ndim:
        shape = "a list of numbers" if ndim == 1 else "a shards x dim array"
        raise _fail(f"{name} must be {shape}, got shape {array.shape}")
    return array.tolist()
