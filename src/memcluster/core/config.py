"""One configuration object holding every limit of a memcluster process.

Every bound (sizes, counts, intervals) lives here, with its unit in its name, so that a reader
finds all the knobs in one place and a test can shrink them. Collection-level settings (dim,
metric, capacity, TTL) are in :class:`memcluster.core.types.CollectionConfig`; this object is
process-wide.
"""

from __future__ import annotations

import os

import msgspec

from memcluster.core.types import Durability


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """Process-wide limits and tuning. All fields have safe defaults."""

    # -- input limits (a request over one gets a clear 4xx, never a partial write) -------------
    dim_max: int = 4096
    """Largest vector dimension a collection may have."""
    key_bytes_max: int = 512
    """Largest key, UTF-8 encoded."""
    namespace_depth_max: int = 8
    """Most parts a namespace tuple may have."""
    namespace_part_bytes_max: int = 128
    """Largest namespace part, UTF-8 encoded."""
    text_bytes_max: int = 1 << 20
    """Largest memory text, UTF-8 encoded."""
    metadata_bytes_max: int = 64 << 10
    """Largest metadata object, JSON encoded."""
    metadata_paths_max: int = 4_096
    """Most distinct metadata paths (keys, dotted for nested objects) a shard keeps filter
    columns for. Each costs memory per slot, so keys made of ids (UUIDs as keys) must not grow
    them without bound: put such values in a field instead."""
    batch_items_max: int = 10_000
    """Most memories in one put_many."""
    search_k_max: int = 10_000
    """Largest k a search may ask for."""
    list_limit_max: int = 10_000
    """Largest page a list may return."""
    collections_max: int = 1_000
    """Most collections in one database."""
    shards_max: int = 1_024
    """Most shards a collection may have."""

    # -- write-ahead log -----------------------------------------------------------------------
    durability: Durability = Durability.FSYNC
    """Default acknowledgement level for collections that do not set their own."""
    wal_segment_bytes: int = 64 << 20
    """A WAL segment rolls over once it reaches this size."""
    wal_record_bytes_max: int = 64 << 20
    """Largest single WAL record; larger lengths found on disk are treated as damage."""
    wal_batch_sync_interval_s: float = 0.05
    """With durability ``batch``, how often the background step fsyncs the log."""

    # -- snapshots -----------------------------------------------------------------------------
    snapshot_wal_bytes: int = 256 << 20
    """Take a snapshot once this many WAL bytes were written since the last one."""
    snapshots_kept: int = 2
    """How many snapshots to keep on disk (the newest ones)."""

    # -- vector index --------------------------------------------------------------------------
    graph: bool = True
    """Use the hnswlib graph. False swaps in its exact in-memory twin (same code paths, exact
    answers): for deterministic tests, or tiny collections."""
    hnsw_m: int = 16
    """hnswlib M: graph degree. Higher = better recall, more memory."""
    hnsw_ef_construction: int = 100
    """hnswlib ef_construction: build-time beam width."""
    hnsw_ef_search: int = 64
    """hnswlib ef at query time (raised to k when k is larger)."""
    hnsw_threads: int = max(1, (os.cpu_count() or 2) - 1)
    """Threads hnswlib may use to insert a chunk while writes arrive. One core is left to the
    writers, so that background indexing does not slow ingest down."""
    seal_idle_s: float = 0.5
    """After this long without a write, background indexing uses every core."""
    exact_items_max: int = 10_000
    """A shard with at most this many live memories is searched exactly, without the graph."""
    exact_filter_items_max: int = 8_000
    """A filtered search whose filter matches at most this many memories scans them exactly;
    above it, the graph is asked for k / selectivity * ``hnsw_overfetch_factor`` candidates."""
    seal_chunk_items: int = 1_024
    """How many fresh writes one background step moves from the exact buffer into the graph."""
    search_threads: int = os.cpu_count() or 2
    """Threads that search a collection's shards in parallel."""
    hnsw_overfetch_factor: float = 2.0
    """A filtered graph search asks for k / selectivity * this many candidates."""

    # -- background work -----------------------------------------------------------------------
    background: bool = True
    """Run the maintenance thread (indexing, TTL sweeps, snapshots, batch fsync). Tests that
    drive maintenance by hand turn it off."""
    maintenance_interval_s: float = 0.05
    """How often the maintenance thread wakes when it has nothing to do."""
    expire_batch_items_max: int = 10_000
    """Most expired memories deleted by one sweep record."""

    # -- idempotency ---------------------------------------------------------------------------
    idempotency_keys_max: int = 100_000
    """Batch idempotency keys remembered per shard (oldest forgotten first)."""

    # -- change feed ---------------------------------------------------------------------------
    feed_buffer_events: int = 10_000
    """Recent changes each shard keeps in memory for live subscribers; older ones are read
    back from the WAL."""
    feed_retention_events: int = 1_000_000
    """Changes each shard keeps in its WAL for subscribers resuming from a cursor, beyond what
    recovery needs (whole segments: up to one ``wal_segment_bytes`` more). A cursor older
    than that gets CursorExpired."""
    feed_batch_events: int = 1_000
    """Most changes one read of a subscription takes from a shard."""

    # -- coordination (leases, locks, semaphores, counters) ----------------------------------
    lease_ttl_max_s: float = 7 * 86_400.0
    """Longest TTL a lease (or a lock's or permit's implicit lease) may have."""
    lock_wait_max_s: float = 3_600.0
    """Longest ``timeout_s`` an acquire may wait."""
    coord_waiters_max: int = 1_024
    """Blocked acquires a server serves at once (each waits on a thread of its own pool)."""

    # -- cluster -------------------------------------------------------------------------------
    node_lease_ttl_s: float = 5.0
    """A node's membership lease in etcd: it is renewed every third of this, and a node that
    stops renewing is declared down once it expires."""

    # -- server --------------------------------------------------------------------------------
    request_bytes_max: int = 64 << 20
    """Largest HTTP request body and binary protocol frame (a full batch of 10,000 memories of
    384 floats is about 40 MiB of JSON)."""
    request_threads: int = 64
    """Engine calls a server runs at once. Many, so that concurrent writers share an fsync."""
    connection_in_flight_max: int = 256
    """Requests served at once per binary connection; past it the server stops reading that
    connection (backpressure) until one finishes."""
    http_concurrency_max: int = 4_096
    """HTTP requests and connections served at once; past it the server answers 503."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM, how long in-flight requests may take to finish before connections close."""
