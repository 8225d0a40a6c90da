"""The shards one cluster node holds, and what it does with them.

A node keeps each shard the shard map assigns it under its data directory::

    DATA/shards/{collection}/{NNNN}/config.json   the collection's config (to reopen it)
    DATA/shards/{collection}/{NNNN}/wal/          the shard's WAL segments
    DATA/shards/{collection}/{NNNN}/snapshots/    its snapshots

Every method here is blocking (a WAL fsync, a graph search): the node calls them on its
request threads. A hosted shard is in one of three states::

    INCOMING --ready()--> READY --the map names this node--> ACTIVE --freeze()--> FROZEN
    (being copied in)     (caught up,                         (serves     (reads only: the
                           waits for the switch)               reads and    shard is being
                                                               writes)      handed over)

    FROZEN --unfreeze() (the handover failed)--> ACTIVE
    any --drop()--> gone (the map names another node; the directory is deleted)

Writes check the state under the shard's own lock (``Shard.write_gate``), so a write either
lands before :meth:`ShardHost.freeze` returns the final sequence number, and the new owner
copies it, or is refused with ``WrongNode`` and sent again by the router to the new owner.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from memcluster.cluster.keys import COORDINATION
from memcluster.core import validation
from memcluster.core.clock import Clock
from memcluster.core.codec import Record, from_json, to_json
from memcluster.core.config import Config
from memcluster.core.errors import InvalidArgument, InvalidState, WrongNode
from memcluster.core.types import CollectionConfig, Hit, Memory
from memcluster.index.filters import Filter
from memcluster.replication.leader import Ack
from memcluster.shard.coord import CoordShard
from memcluster.shard.maintenance import Maintainer
from memcluster.shard.prepare import prepare_puts
from memcluster.shard.shard import Shard
from memcluster.storage.files import fsync_path
from memcluster.storage.snapshot import FileWriter, SnapshotStore
from memcluster.storage.wal import FileWal

log = logging.getLogger("memcluster.host")

ShardId = tuple[str, int]
R = TypeVar("R")


def shard_name(shard: ShardId) -> str:
    """``collection/NNNN`` (or ``coordination``): how errors and logs name a shard."""
    return "coordination" if shard == COORDINATION else f"{shard[0]}/{shard[1]:04d}"


class Replica(Protocol):
    name: str
    """What the host needs of a shard to serve and transfer it: a collection's
    :class:`~memcluster.shard.shard.Shard` or the :class:`~memcluster.shard.coord.CoordShard`."""

    lock: threading.Lock
    write_gate: Callable[[], None] | None

    @property
    def applied_seq(self) -> int: ...
    def snapshot(self) -> int | None: ...
    def records_after(self, after_seq: int, limit: int) -> list[Record]: ...
    def apply_records(self, records: Sequence[Record]) -> None: ...
    def close(self) -> None: ...
    def maintain(self) -> bool: ...
    def stats(self) -> Mapping[str, int]: ...


SESSION_WAIT_S = 0.5
"""How long a replica waits to catch up with a session before the leader answers instead."""


class State(enum.Enum):
    INCOMING = "incoming"
    READY = "ready"
    ACTIVE = "active"
    FROZEN = "frozen"
    FOLLOWER = "follower"
    """A replica of a replicated shard whose leader is elsewhere: takes only the leader's
    records; serves eventual reads."""


class Replication(Protocol):
    """What a replicated shard's driver offers the host (``cluster.replicas``)."""

    def wait(self, seq: int, ack: Ack | None = None, w: int | None = None) -> None:
        """Block until the write that ended at ``seq`` is acknowledged as ``ack`` (default:
        the collection's) asks, or held by ``w`` replicas (``multi`` shards); WrongNode
        (leadership moved) or Timeout if it cannot be."""
        ...

    def barrier(self) -> None:
        """Block until every write applied here is acknowledged (strong reads at the leader
        then never see a write that a failover could still lose)."""
        ...

    def serves_strong(self) -> bool:
        """Whether this replica answers strong reads (the leader; a chain's tail)."""
        ...


class Hosted:
    """One shard this node holds."""

    def __init__(
        self, shard_id: ShardId, config: CollectionConfig | None, shard: Replica, path: Path
    ):
        self.id = shard_id
        self.config = config
        self.shard = shard
        self.path = path
        self.state = State.INCOMING
        self.frozen_at = 0.0
        self.rehoming: CollectionConfig | None = None
        """While frozen for a rehome: the layout the memories are being placed by."""
        self.replication: Replication | None = None
        """Set for a replicated shard's replica."""
        shard.write_gate = self._gate

    def replicated(self, seq: int, ack: Ack | None = None, w: int | None = None) -> None:
        """Wait until the write that ended at ``seq`` may be acknowledged."""
        if self.replication is not None:
            self.replication.wait(seq, ack, w)

    def _gate(self) -> None:
        if self.state is not State.ACTIVE:
            raise WrongNode(
                f"shard {shard_name(self.id)} is {self.state.value} on this node: route again"
            )


def _checked_lease(lease: object) -> int:
    """The lease id of a memory, which the router checked alive before sending it here."""
    if lease is None:
        return 0
    if isinstance(lease, bool) or not isinstance(lease, int) or lease < 1:
        raise InvalidArgument(f"lease is {lease!r}; pass an id that grant_lease returned")
    return lease


class ShardHost:
    """The shards of one node. Thread-safe."""

    def __init__(self, root: Path, config: Config, clock: Clock) -> None:
        self.root = root
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._shards: dict[ShardId, Hosted] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=config.search_threads, thread_name_prefix="memcluster-shards"
        )
        self._transfers: dict[str, Path] = {}
        root.mkdir(parents=True, exist_ok=True)
        self._lock_file = (root / "LOCK").open("a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise InvalidState(
                f"data directory {root.parent} is in use by another process; stop it or use"
                " another directory"
            ) from None
        shutil.rmtree(root / ".transfers", ignore_errors=True)
        self._maintainer: Maintainer | None = None
        if config.background:
            self._maintainer = Maintainer(
                lambda: [h.shard for h in self._all() if h.state is not State.INCOMING], config
            )
            self._maintainer.start()

    def close(self) -> None:
        if self._maintainer is not None:
            self._maintainer.stop()
        self._pool.shutdown(wait=True)
        with self._lock:
            hosted, self._shards = list(self._shards.values()), {}
        for h in hosted:
            h.shard.close()
        self._lock_file.close()

    def _all(self) -> list[Hosted]:
        with self._lock:
            return list(self._shards.values())

    def _path(self, shard_id: ShardId) -> Path:
        if shard_id == COORDINATION:
            return self.root.parent / "coordination"
        return self.root / validation.collection_name(shard_id[0]) / f"{shard_id[1]:04d}"

    # -- what is held --------------------------------------------------------------------------

    def on_disk(self) -> list[ShardId]:
        """Shards with a directory here (held before a restart), sorted."""
        found = []
        for coll in sorted(self.root.iterdir()) if self.root.exists() else []:
            if coll.name.startswith(".") or not coll.is_dir():
                continue
            for entry in sorted(coll.iterdir()):
                if entry.name.isdigit() and (entry / "config.json").exists():
                    found.append((coll.name, int(entry.name)))
        if (self._path(COORDINATION) / "wal").exists():
            found.append(COORDINATION)
        return found

    def states(self) -> dict[ShardId, State]:
        with self._lock:
            return {sid: h.state for sid, h in self._shards.items()}

    def active_shards(self) -> list[Shard]:
        """The collection shards serving writes here (for the lease reaper)."""
        return [
            h.shard for h in self._all() if h.state is State.ACTIVE and isinstance(h.shard, Shard)
        ]

    def data_bytes(self) -> int:
        """Bytes of memories held (live data, as the shards count them)."""
        return sum(h.shard.stats()["bytes"] for h in self._all() if isinstance(h.shard, Shard))

    def _get(self, shard_id: ShardId, *states: State) -> Hosted:
        with self._lock:
            h = self._shards.get(shard_id)
        if h is None:
            raise WrongNode(f"this node does not hold shard {shard_name(shard_id)}: route again")
        if h.state not in states:
            raise WrongNode(
                f"shard {shard_name(shard_id)} is {h.state.value} on this node: route again"
            )
        return h

    def _data(self, shard_id: ShardId, *states: State) -> Shard:
        shard = self._get(shard_id, *states).shard
        assert isinstance(shard, Shard), shard_id
        return shard

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        """A shard dropped (closed) under a read or write in flight: the caller routes again."""
        try:
            yield
        except InvalidState as exc:
            raise WrongNode(
                f"the shard left this node during the request ({exc}): route again"
            ) from None

    def reader(self, shard_id: ShardId) -> Shard:
        """A shard held here for reading (ACTIVE or FROZEN, or a chain's tail), else
        WrongNode. A replicated shard's leader first waits until what it holds is
        acknowledged."""
        h = self._get(shard_id, State.ACTIVE, State.FROZEN, State.FOLLOWER)
        if h.state is State.FOLLOWER and (
            h.replication is None or not h.replication.serves_strong()
        ):
            raise WrongNode(f"shard {shard_name(shard_id)} is a follower on this node: route again")
        if h.replication is not None:
            h.replication.barrier()
        assert isinstance(h.shard, Shard), shard_id
        return h.shard

    def any_reader(self, shard_id: ShardId, session: int = 0) -> Shard:
        """A shard held here for an eventual read: any replica, followers too. With
        ``session`` (a seq), only once it has applied that seq: it waits up to
        ``SESSION_WAIT_S`` for it, then refuses with WrongNode (the leader answers)."""
        shard = self._data(shard_id, State.ACTIVE, State.FROZEN, State.FOLLOWER)
        deadline = time.monotonic() + SESSION_WAIT_S
        while shard.applied_seq < session:
            if time.monotonic() > deadline:
                raise WrongNode(
                    f"shard {shard_name(shard_id)}: this replica is at seq {shard.applied_seq},"
                    f" the session needs {session}: read at the leader"
                )
            time.sleep(0.002)
        return shard

    def hosted(self, shard_id: ShardId) -> Hosted | None:
        with self._lock:
            return self._shards.get(shard_id)

    def set_state(self, shard_id: ShardId, state: State) -> None:
        """Make a held shard leader (ACTIVE) or FOLLOWER of its replica set."""
        with self._lock:
            h = self._shards.get(shard_id)
        if h is None:
            return
        with h.shard.lock:
            h.state = state

    def writer(self, shard_id: ShardId) -> Shard:
        """A shard held here for writing (ACTIVE), else WrongNode."""
        return self._data(shard_id, State.ACTIVE)

    def coordination(self) -> CoordShard:
        """The coordination shard, if this node holds it (else WrongNode). Replicated: only
        while this node's lease is certainly valid and what it holds is acknowledged."""
        h = self._get(COORDINATION, State.ACTIVE)
        if h.replication is not None:
            h.replication.barrier()
        assert isinstance(h.shard, CoordShard)
        return h.shard

    # -- lifecycle of one shard ----------------------------------------------------------------

    def open(self, config: CollectionConfig, number: int, state: State = State.ACTIVE) -> None:
        """Open (or create empty) the shard here in ``state``; a no-op if it is held."""
        shard_id = (config.name, number)
        with self._lock:
            if shard_id in self._shards:
                return
        path = self._path(shard_id)
        if not (path / "config.json").exists():
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_bytes(to_json(config))
            fsync_path(path)
            fsync_path(path.parent)
        self._install(shard_id, config, path, state)

    def open_coordination(self, state: State = State.ACTIVE) -> None:
        """Open (or create empty) the coordination shard here; a no-op if it is held."""
        with self._lock:
            if COORDINATION in self._shards:
                return
        self._install(COORDINATION, None, self._path(COORDINATION), state)

    def _install(
        self, shard_id: ShardId, config: CollectionConfig | None, path: Path, state: State
    ) -> None:
        shard: Replica
        if config is None:
            shard = CoordShard.open(path, self.config, self._clock)
        else:
            wal = FileWal.open(path / "wal", self.config)
            shard = Shard.open(
                config,
                self.config,
                wal,
                self._clock,
                snapshots=SnapshotStore(path / "snapshots"),
                name=shard_name(shard_id),
            )
        hosted = Hosted(shard_id, config, shard, path)
        hosted.state = state
        with self._lock:
            if shard_id in self._shards:
                shard.close()
                return
            self._shards[shard_id] = hosted
        log.info("opened shard %s (%s)", shard_name(shard_id), state.value)

    def reopen(self, shard_id: ShardId, state: State = State.ACTIVE) -> None:
        """Open a shard found on disk (after a restart) in ``state``."""
        path = self._path(shard_id)
        config: CollectionConfig | None = None
        if shard_id != COORDINATION:
            config = from_json((path / "config.json").read_bytes(), CollectionConfig)
        self._install(shard_id, config, path, state)

    def activate(self, shard_id: ShardId) -> None:
        """The map names this node: a READY (or FROZEN) shard starts serving writes."""
        with self._lock:
            h = self._shards.get(shard_id)
            if h is None:
                return
        with h.shard.lock:
            if h.state in (State.READY, State.FROZEN):
                h.state = State.ACTIVE
                h.rehoming = None
                log.info("shard %s is active here", shard_name(shard_id))
        if isinstance(h.shard, CoordShard):
            h.shard.handover(False)

    def drop(self, shard_id: ShardId) -> None:
        """Stop holding the shard and delete its files (it lives elsewhere now)."""
        with self._lock:
            h = self._shards.pop(shard_id, None)
        if h is not None:
            h.shard.close()
        path = self._path(shard_id)
        if path.exists():
            grave = path.with_name(f".dropped-{path.name}-{uuid.uuid4().hex[:8]}")
            path.rename(grave)
            shutil.rmtree(grave, ignore_errors=True)
            log.info("dropped shard %s", shard_name(shard_id))

    # -- handing a shard over (source side) ----------------------------------------------------

    def transfer_begin(self, shard_id: ShardId) -> tuple[str, int, dict[str, int]]:
        """Snapshot the shard and pin the snapshot's files for a transfer:
        (transfer id, snapshot seq (0: none, start from an empty shard), file sizes)."""
        h = self._get(shard_id, State.ACTIVE, State.FROZEN)
        seq = h.shard.snapshot() or 0
        transfer = uuid.uuid4().hex
        pinned = self.root / ".transfers" / transfer
        pinned.mkdir(parents=True)
        files: dict[str, int] = {}
        if seq:
            source = h.path / "snapshots" / f"{seq:020d}"
            for f in sorted(source.iterdir()):
                if f.name != "MANIFEST":
                    os.link(f, pinned / f.name)  # a later snapshot's pruning cannot delete it
                    files[f.name] = f.stat().st_size
        with self._lock:
            self._transfers[transfer] = pinned
        return transfer, seq, files

    def transfer_read(self, transfer: str, name: str, offset: int, size: int) -> bytes:
        with self._lock:
            pinned = self._transfers.get(transfer)
        if pinned is None or "/" in name or name.startswith("."):
            raise InvalidArgument(f"no transfer {transfer!r} with a file {name!r}")
        with (pinned / name).open("rb") as f:
            f.seek(offset)
            return f.read(size)

    def transfer_end(self, transfer: str) -> None:
        with self._lock:
            pinned = self._transfers.pop(transfer, None)
        if pinned is not None:
            shutil.rmtree(pinned, ignore_errors=True)

    def tail(self, shard_id: ShardId, after_seq: int, limit: int) -> tuple[list[Record], int]:
        """WAL records after ``after_seq`` (at most ``limit``) and the shard's applied seq."""
        shard = self._get(shard_id, State.ACTIVE, State.FROZEN).shard
        applied = shard.applied_seq
        return shard.records_after(after_seq, limit), applied

    def freeze(self, shard_id: ShardId, rehoming: CollectionConfig | None = None) -> int:
        """Refuse writes from now on; returns the last seq written (the handover's end).
        ``rehoming``: frozen to place the memories by this layout (not for a move)."""
        h = self._get(shard_id, State.ACTIVE, State.FROZEN)
        with h.shard.lock:
            h.state = State.FROZEN
            h.frozen_at = time.monotonic()
            h.rehoming = rehoming
            seq = h.shard.applied_seq
        if isinstance(h.shard, CoordShard):
            h.shard.handover(True)  # waiting acquires ask the new holder
        return seq

    def frozen(self) -> dict[ShardId, tuple[float, CollectionConfig | None]]:
        """Frozen shards: since when (monotonic), and the layout of a rehome (None: a move)."""
        return {h.id: (h.frozen_at, h.rehoming) for h in self._all() if h.state is State.FROZEN}

    # -- taking a shard over (target side) -----------------------------------------------------

    def staging_dir(self) -> Path:
        """A new empty directory for the files of an incoming transfer (same filesystem as
        the shards, so they move into place; emptied at restart)."""
        path = self.root / ".transfers" / f"in-{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        return path

    def install_snapshot(
        self,
        shard_id: ShardId,
        config: CollectionConfig | None,
        seq: int,
        files: Mapping[str, FileWriter],
    ) -> None:
        """Start an INCOMING copy of the shard from a transferred snapshot (replacing any
        leftover copy here); ``config`` is None for the coordination shard."""
        with self._lock:
            held = self._shards.get(shard_id)
        if held is not None:
            raise InvalidState(f"shard {shard_name(shard_id)} is held here already")
        self.drop(shard_id)
        path = self._path(shard_id)
        path.mkdir(parents=True)
        if config is not None:
            (path / "config.json").write_bytes(to_json(config))
        if seq:
            SnapshotStore(path / "snapshots").write(seq, dict(files))
        fsync_path(path)
        fsync_path(path.parent)
        self._install(shard_id, config, path, State.INCOMING)

    def apply(self, shard_id: ShardId, records: Sequence[Record]) -> int:
        """Apply shipped records to an INCOMING copy; returns its applied seq."""
        replica = self._get(shard_id, State.INCOMING).shard
        replica.apply_records(records)
        return replica.applied_seq

    def ready(self, shard_id: ShardId) -> None:
        h = self._get(shard_id, State.INCOMING)
        with h.shard.lock:
            h.state = State.READY

    # -- the data operations -------------------------------------------------------------------

    def put(
        self,
        collection: str,
        batches: Mapping[int, Sequence[Memory]],
        idempotency_key: str | None,
        fence: tuple[str, int] | None = None,
        version_floors: Mapping[int, int] | None = None,
        seqs: dict[int, int] | None = None,
        ack: Ack | None = None,
        w: int | None = None,
    ) -> dict[int, list[int]]:
        """Write each shard's memories; returns each shard's versions in input order.
        ``version_floors``: per shard, a version its new versions must exceed. ``seqs``, if
        given, receives each shard's applied seq after the write (for session tokens).

        Atomic on this node: every batch is checked (versions, capacity) under all the shards'
        locks before any is written."""
        hosted = [self._get((collection, n), State.ACTIVE) for n in sorted(batches)]
        prepared = {}
        for h in hosted:
            assert h.config is not None
            prepared[h.id[1]], _ = prepare_puts(
                batches[h.id[1]], h.config, self.config, _checked_lease
            )
        out: dict[int, list[int]] = {}
        tokens: list[tuple[Shard, int]] = []
        written: list[tuple[Hosted, int]] = []
        with ExitStack() as stack:
            plans = []
            for h in hosted:
                shard = h.shard
                assert isinstance(shard, Shard)
                stack.enter_context(shard.lock)
                h._gate()
                floor = (version_floors or {}).get(h.id[1], 0)
                plan = shard.plan_put(prepared[h.id[1]], idempotency_key, fence, floor)
                plans.append((h, shard, plan))
            for h, shard, plan in plans:
                number = h.id[1]
                if isinstance(plan, list):
                    out[number] = plan  # a resend: the first write may still be replicating
                else:
                    token, out[number] = shard.write_planned(plan)
                    tokens.append((shard, token))
                written.append((h, shard.applied_seq))
        with self._serving():
            for shard, token in tokens:
                shard.commit(token)
        for h, seq in written:
            h.replicated(seq, ack, w)
            if seqs is not None:
                seqs[h.id[1]] = seq
        return out

    def get(
        self,
        shard_id: ShardId,
        namespace: tuple[str, ...],
        key: str,
        *,
        eventual: bool = False,
        session: int | None = None,
    ) -> Memory | None:
        if session is not None:
            shard = self.any_reader(shard_id, session)
        else:
            shard = self.any_reader(shard_id) if eventual else self.reader(shard_id)
        with self._serving():
            return shard.get(namespace, key)

    def delete(
        self,
        shard_id: ShardId,
        keys: Sequence[tuple[tuple[str, ...], str]],
        fence: tuple[str, int] | None = None,
    ) -> int:
        """Delete these memories from one shard; returns how many existed."""
        h = self._get(shard_id, State.ACTIVE)
        shard = h.shard
        assert isinstance(shard, Shard)
        with self._serving():
            count = sum(shard.delete(ns, key, fence) for ns, key in keys)
        h.replicated(shard.applied_seq)
        return count

    def locate(
        self, shard_id: ShardId, keys: Sequence[tuple[tuple[str, ...], str]]
    ) -> list[tuple[int, float]]:
        shard = self.reader(shard_id)
        with self._serving():
            return shard.locate(keys)

    def delete_versions(
        self, shard_id: ShardId, items: Sequence[tuple[tuple[str, ...], str, int]]
    ) -> int:
        h = self._get(shard_id, State.ACTIVE)
        shard = h.shard
        assert isinstance(shard, Shard)
        with self._serving():
            count = shard.delete_versions(items)
        h.replicated(shard.applied_seq)
        return count

    def _each(
        self,
        shards: Sequence[ShardId],
        call: Callable[[Shard], R],
        eventual: bool = False,
        session: Mapping[int, int] | None = None,
    ) -> list[R]:
        if session is not None:
            readers = [self.any_reader(s, session.get(s[1], 0)) for s in shards]
        else:
            readers = [self.any_reader(s) if eventual else self.reader(s) for s in shards]
        with self._serving():
            if len(readers) == 1:
                return [call(readers[0])]
            return list(self._pool.map(call, readers))

    def search(
        self,
        shards: Sequence[ShardId],
        query: npt.NDArray[np.float32],
        k: int,
        prefix: tuple[str, ...],
        flt: Filter,
        include_vectors: bool,
        eventual: bool = False,
        session: Mapping[int, int] | None = None,
    ) -> list[Hit]:
        """The global top-k of these shards (by score, ties by namespace and key); with
        ``eventual``, from followers too, without waiting for acknowledgements."""
        hits: list[Hit] = []

        def search(shard: Shard) -> list[Hit]:
            return shard.search(query, k, prefix, flt, include_vectors)

        for found in self._each(shards, search, eventual, session):
            hits.extend(found)
        hits.sort(key=lambda h: (-h.score, h.memory.namespace, h.memory.key))
        return hits[:k]

    def count(self, shards: Sequence[ShardId], prefix: tuple[str, ...], flt: Filter) -> int:
        return sum(self._each(shards, lambda s: s.count(prefix, flt)))

    def delete_where(self, shards: Sequence[ShardId], prefix: tuple[str, ...], flt: Filter) -> int:
        held = [self._get(s, State.ACTIVE) for s in shards]
        count = sum(self._each(shards, lambda s: s.delete_where(prefix, flt)))
        for h in held:
            assert isinstance(h.shard, Shard)
            h.replicated(h.shard.applied_seq)
        return count

    def list_page(
        self,
        shards: Sequence[ShardId],
        prefix: tuple[str, ...],
        flt: Filter,
        after: tuple[tuple[str, ...], str] | None,
        limit: int,
    ) -> list[Memory]:
        items: list[Memory] = []
        for page in self._each(shards, lambda s: s.list_page(prefix, flt, after, limit)):
            items.extend(page)
        items.sort(key=lambda m: (m.namespace, m.key))
        return items[:limit]

    def stats(self, shards: Sequence[ShardId]) -> dict[int, dict[str, int]]:
        """Sizes and last seqs (a chain's tail answers too: its log is the head's)."""
        states = (State.ACTIVE, State.FROZEN, State.FOLLOWER)
        return {s[1]: dict(self._get(s, *states).shard.stats()) for s in shards}
