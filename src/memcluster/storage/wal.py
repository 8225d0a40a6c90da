"""The write-ahead log of a shard replica: segmented, append-only, CRC-checked, group-committed.

Every write to a shard is a :class:`~memcluster.core.codec.Record` (one or more operations
taking consecutive sequence numbers). The shard appends the record here before applying it, and
acknowledges it only once :meth:`Wal.sync` says it is durable (with durability ``fsync``).
After a crash, the shard loads its newest snapshot and replays :meth:`Wal.records` after the
snapshot's sequence number. Two implementations share the :class:`Wal` protocol:
:class:`FileWal` (the real one, described below) and :class:`MemoryWal` (its in-memory twin for
tests of the layers above).

Directory layout
----------------

A WAL is a directory of segment files, each named after the sequence number of its first
record, zero-padded to 20 digits so that name order is sequence order::

    wal/
      00000000000000000001.wal     records 1 .. 4710       (sealed: fsynced, never written again)
      00000000000000004711.wal     records 4711 ..         (the newest segment: appends go here)

Files whose names do not match ``<20 digits>.wal`` are ignored.

Segment format, version 1
-------------------------

All integers are little-endian::

    segment = header frame*
    header  = magic "MCWAL001" (8 bytes)  first_seq (u64)            16 bytes
    frame   = length (u32)  crc (u32)  payload (length bytes)
    payload = codec.encode_record(record)                            msgpack, see core/codec.py

* ``crc`` is the CRC-32C (Castagnoli) of ``payload`` alone.
* ``1 <= length <= Config.wal_record_bytes_max``; a larger record is refused by
  :meth:`Wal.append` with ``PayloadTooLarge``, so a larger length on disk is damage.
* ``first_seq`` in the header equals the number in the file name and the ``seq`` of the
  segment's first record.
* Records consume consecutive sequence numbers, across segments too: a record's ``seq`` is the
  previous record's ``last_seq + 1`` (``last_seq = seq + len(ops) - 1``; a record holds at least
  one operation). A break in this chain between records whose CRCs are valid is corruption.
* A segment rolls over once it has reached ``Config.wal_segment_bytes``; the check runs before
  each append, so a segment exceeds that size by at most one frame.

The magic names the version. A change to any of the above needs a new magic and a reader for
the old one; ``tests/golden/wal-v1`` pins this version byte for byte.

Writing and durability
----------------------

* ``append`` encodes the record and hands the frame to the OS with one ``os.write`` on the
  newest segment (opened ``O_APPEND``). It returns a position token: the number of frame bytes
  appended through this object, so tokens increase with every append. Nothing is durable yet.
* ``sync(token)`` returns once every frame up to ``token`` is durable. Group commit: the first
  thread needing an fsync becomes the leader, records the current token, and fsyncs the newest
  segment without holding the lock; threads arriving meanwhile wait on a condition variable
  and are covered by that fsync or lead the next one. A thread whose token is already covered
  returns at once, without a syscall. So N concurrent writers cost far fewer than N fsyncs.
* Rolling over (when the newest segment is full, or after ``roll()``): fsync the old segment,
  create the new one (``O_EXCL``), write its header, fsync the directory. Hence only the newest
  segment can ever hold bytes that are not durable, and a segment's directory entry is durable
  before any record in it is acknowledged.
* ``truncate_before(seq)`` unlinks the oldest segments whose records all have ``seq <= seq``,
  oldest first, then fsyncs the directory; a crash in between leaves a suffix of the log. The
  newest segment is deleted only when ``roll()`` sealed it (the shard rolls before each
  snapshot, so a snapshot drops all the log it covers); a WAL left empty reopens with
  ``last_seq`` 0 and accepts any first seq, which the shard takes from its snapshot.
* Fail-stop: after any failed write, fsync, create or unlink, the WAL is failed and every later
  call raises ``StorageError``. An fsync that failed is never retried, because the kernel may
  have dropped the dirty pages and a second fsync could report success for lost data (the
  PostgreSQL "fsyncgate" lesson). The cure is to close the WAL and reopen it, which rebuilds
  the state from what is really on disk.

Crash behaviour
---------------

A crash (of the process or of the machine) can leave, in the newest segment only:

1. a torn tail: the last frames partly written, or followed by zeros (the file size reached
   the disk but the data blocks did not);
2. a newest segment that is shorter than its header, all zeros, or holds a header and no
   complete frame (the crash hit while it was being created).

Every older segment was fsynced before its successor was created, so damage anywhere else is
corruption, not a crash.

Recovery rules (``FileWal.open``)
---------------------------------

``open`` reads and validates every segment in order before the WAL takes writes:

* In a segment that is not the newest, any bad frame (a short frame header; a length of 0,
  over ``wal_record_bytes_max`` or past the end of the file; a CRC mismatch) raises
  ``CorruptionError`` naming the segment file and the byte offset, e.g.
  ``wal: crc mismatch in segment 00000000000000000001.wal at offset 4096``.
* In the newest segment, a bad frame at offset X is a torn tail only if no valid frame (a
  plausible length and a matching CRC) starts anywhere after X. The scan tries every offset;
  runs of zeros, the usual tail, are rejected in bulk with numpy. A torn tail is cut off: the
  file is truncated to X and fsynced, and a warning goes to the ``memcluster.wal`` logger. If a
  valid frame follows, the bad frame is damage in the middle of the log (a flipped bit) and
  raises ``CorruptionError``: damage is reported, never skipped. The scan's CRC work is bounded
  (by 4 bytes per byte of tail, at least 64 MiB); past that bound it gives up with
  ``CorruptionError`` rather than guess.
* A frame with a matching CRC whose payload does not decode, a record without operations, or
  a break in the sequence chain (within or between segments) raises ``CorruptionError``
  anywhere: a matching CRC proves the writer produced those bytes, so no crash explains them.
* A bad magic, or a header whose ``first_seq`` differs from the file name, raises
  ``CorruptionError``. A newest segment shorter than its header, with an all-zero header and
  no valid frame after it, or left without records after cutting its torn tail, is removed
  (then the directory is fsynced); the segment before it becomes the newest.
* Finally the newest segment and the directory are fsynced, so records that the previous
  process wrote but never synced are durable before anyone replays and serves them.

Known limit: the OS may write back unsynced pages out of order, so a power loss can leave a hole
of zeros followed by valid frames that no fsync covered (so were never acknowledged under
durability ``fsync``). Recovery reports that as corruption rather than dropping them silently;
it is more likely with durability ``batch`` or ``none``, whose unsynced tails are longer.

Reading
-------

``records(after_seq)`` reads the segments from disk with a buffered file, parsing frames out of
a memoryview, and yields the records with ``last_seq > after_seq``; segments entirely at or
below ``after_seq`` are skipped unread. :func:`read_segment` reads one segment file without
repairing anything (for ``memcluster inspect wal``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Protocol

import crc32c
import msgspec
import numpy as np

from memcluster.core import codec
from memcluster.core.codec import Record
from memcluster.core.config import Config
from memcluster.core.errors import CorruptionError, InvalidState, PayloadTooLarge, StorageError
from memcluster.storage.files import fsync_path

__all__ = [
    "FRAME_HEADER_BYTES",
    "HEADER_BYTES",
    "MAGIC",
    "FileWal",
    "MemoryWal",
    "Wal",
    "read_segment",
    "segment_name",
]

log = logging.getLogger("memcluster.wal")

MAGIC: Final = b"MCWAL001"
"""The first 8 bytes of every segment of format version 1."""
_HEADER: Final = struct.Struct("<8sQ")
_FRAME: Final = struct.Struct("<II")
_U32: Final = struct.Struct("<I")
HEADER_BYTES: Final = _HEADER.size
"""Size of a segment header: magic and first_seq (16)."""
FRAME_HEADER_BYTES: Final = _FRAME.size
"""Size of a frame header: length and crc (8)."""

_SEGMENT_NAME: Final = re.compile(r"(\d{20})\.wal")
_READ_CHUNK_BYTES: Final = 1 << 20
"""How much ``records()`` reads from a segment at a time."""
_SCAN_CHUNK_BYTES: Final = 256 << 10
"""How many candidate offsets the torn-tail scan examines per numpy pass."""
_SCAN_CRC_BYTES_MIN: Final = 64 << 20
"""Lower bound of the torn-tail scan's CRC budget (see "Recovery rules")."""


def segment_name(first_seq: int) -> str:
    """The file name of the segment whose first record has sequence ``first_seq``."""
    return f"{first_seq:020d}.wal"


class Wal(Protocol):
    """An append-only log of records, durable on request.

    Sequence numbers: records are appended in ``seq`` order, each starting right after the
    previous one's ``last_seq``. Errors: ``StorageError`` when the disk failed (then the WAL
    is failed and every later call raises it again; reopen to recover), ``CorruptionError``
    when stored bytes are damaged, ``InvalidState`` after ``close()``. Concurrency: every
    method may be called from any thread, concurrently with the others, except that
    ``records()`` must not overlap a ``truncate_before()`` that deletes the segments it reads.
    """

    @property
    def last_seq(self) -> int:
        """``last_seq`` of the last appended record; 0 if the log holds no record.

        After a reopen it is the last record on disk. It can fall below a snapshot's sequence
        (even to 0) only if ``truncate_before`` ran and a crash then lost every record of the
        newest segment; the shard therefore resumes at ``max(snapshot seq, last_seq)``.
        """
        ...

    def append(self, record: Record) -> int:
        """Hand ``record`` to the OS, not yet durable; return its position token.

        Tokens increase with every append. ``record.seq`` must be ``last_seq + 1`` (any
        ``seq >= 1`` when the log is empty) and ``record.ops`` non-empty: both are asserted,
        as they are the caller's invariants. Rolls over to a new segment first when the
        current one reached ``wal_segment_bytes``. Raises ``PayloadTooLarge`` (the WAL stays
        usable) when the encoded record exceeds ``wal_record_bytes_max``; ``StorageError`` on
        an OS error, after which the WAL is failed.
        """
        ...

    def sync(self, token: int) -> None:
        """Block until every record up to ``token`` (a value ``append`` returned) is durable.
        Returns at once for a token already durable, even after ``close()``.

        Group commit: concurrent callers share one fsync; a caller whose token is already
        covered returns at once without a syscall. Raises ``StorageError`` when the fsync
        fails (the WAL is failed: those records may be lost, so they must not be acknowledged).
        """
        ...

    def sync_all(self) -> None:
        """``sync`` of the latest token: everything appended so far becomes durable."""
        ...

    def roll(self) -> None:
        """Make everything durable and seal the current segment; the next append starts a
        new one."""
        ...

    def truncate_before(self, seq: int) -> None:
        """Delete the whole segments whose records all have ``seq <= seq`` (after a snapshot
        covering ``seq``). Records above ``seq`` are never lost; some at or below it may stay.
        The newest segment is deleted only if ``roll()`` sealed it and it is covered."""
        ...

    def records(self, after_seq: int = 0) -> Iterator[Record]:
        """Every record with ``last_seq > after_seq``, in sequence order (for replay).

        The first record may start at or below ``after_seq`` when it holds several
        operations; the caller skips the operations it has already applied. Usability is
        checked at the call; the iterator raises ``CorruptionError`` on damage it reads.
        """
        ...

    def bytes_total(self) -> int:
        """The size of the log on disk: the sum of its segments' sizes, headers included."""
        ...

    def first_seq(self) -> int:
        """The lowest seq ``records()`` can still return (``last_seq + 1`` when empty): what
        truncation has left of the log's history."""
        ...

    def close(self) -> None:
        """Make everything durable and release the files. Idempotent; every other call
        afterwards raises ``InvalidState``. On a failed WAL it releases the files and raises
        ``StorageError``."""
        ...


# -- reading segments ----------------------------------------------------------------------


class _BadFrameError(Exception):
    """A frame that fails its framing or CRC check: damage, or in the newest segment a torn
    tail. Internal; callers turn it into a ``CorruptionError`` or a repair."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"{reason} at offset {offset}")
        self.offset = offset
        self.reason = reason


def _corruption(name: str, bad: _BadFrameError) -> CorruptionError:
    return CorruptionError(f"wal: {bad.reason} in segment {name} at offset {bad.offset}")


def _read_header(f: BinaryIO, name: str) -> int:
    """Validate the segment header at the file's position 0 and return ``first_seq``."""
    header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        raise CorruptionError(
            f"wal: short header in segment {name} at offset 0 ({len(header)} bytes)"
        )
    magic, first_seq = _HEADER.unpack(header)
    if magic != MAGIC:
        raise CorruptionError(f"wal: bad magic {magic!r} in segment {name} at offset 0")
    match = _SEGMENT_NAME.fullmatch(name)
    if match is not None and int(match[1]) != first_seq:
        raise CorruptionError(
            f"wal: header of segment {name} says first_seq {first_seq}, unlike its name"
        )
    return int(first_seq)


def _iter_frames(f: BinaryIO, size: int, record_bytes_max: int) -> Iterator[tuple[int, memoryview]]:
    """Yield ``(offset, payload)`` for each frame in ``[HEADER_BYTES, size)``.

    ``f`` must be positioned at ``HEADER_BYTES``. Reads in chunks of ``_READ_CHUNK_BYTES``;
    a payload is a memoryview into an immutable chunk, valid after the next step. Raises
    ``_BadFrameError`` at the first frame that fails its checks.
    """
    buf = b""
    view = memoryview(buf)
    pos = 0  # index in buf of file offset `off`
    off = HEADER_BYTES
    while off < size:
        if size - off < FRAME_HEADER_BYTES:
            raise _BadFrameError(off, "short frame header")
        if len(buf) - pos < FRAME_HEADER_BYTES:
            buf, pos = _refill(f, buf, pos, FRAME_HEADER_BYTES, size - off, off)
            view = memoryview(buf)
        length, crc = _FRAME.unpack_from(buf, pos)
        if length == 0 or length > record_bytes_max:
            raise _BadFrameError(off, f"bad frame length {length}")
        need = FRAME_HEADER_BYTES + length
        if need > size - off:
            raise _BadFrameError(off, f"frame of length {length} past end of file")
        if len(buf) - pos < need:
            buf, pos = _refill(f, buf, pos, need, size - off, off)
            view = memoryview(buf)
        payload = view[pos + FRAME_HEADER_BYTES : pos + need]
        if crc32c.crc32c(payload) != crc:
            raise _BadFrameError(off, "crc mismatch")
        yield off, payload
        pos += need
        off += need


def _refill(
    f: BinaryIO, buf: bytes, pos: int, need: int, remaining: int, off: int
) -> tuple[bytes, int]:
    """Return a new chunk starting at ``buf[pos]`` holding at least ``need`` bytes."""
    rest = buf[pos:]
    want = min(max(_READ_CHUNK_BYTES, need), remaining) - len(rest)
    more = f.read(want)
    if len(more) < want:  # the file shrank under us
        raise _BadFrameError(off, "unexpected end of file")
    return rest + more, 0


def _iter_records(
    f: BinaryIO, name: str, first_seq: int, size: int, config: Config
) -> Iterator[tuple[int, Record]]:
    """Yield ``(offset, record)`` for a segment whose header was read, checking the chain.

    Raises ``_BadFrameError`` for framing and CRC damage, ``CorruptionError`` for the rest.
    """
    expected = first_seq
    for off, payload in _iter_frames(f, size, config.wal_record_bytes_max):
        try:
            record = codec.decode_record(payload)
        except msgspec.DecodeError as exc:
            raise CorruptionError(
                f"wal: undecodable record in segment {name} at offset {off} "
                f"(its crc matches): {exc}"
            ) from exc
        if record.seq != expected:
            raise CorruptionError(
                f"wal: seq gap in segment {name} at offset {off}: "
                f"expected seq {expected}, found {record.seq}"
            )
        if not record.ops:
            raise CorruptionError(
                f"wal: record without operations in segment {name} at offset {off}"
            )
        expected = record.last_seq + 1
        yield off, record


def read_segment(path: Path, config: Config) -> Iterator[tuple[int, Record]]:
    """Yield ``(offset, record)`` for every frame of one segment file, repairing nothing.

    Raises ``CorruptionError`` at the first bad header, frame or sequence break, including a
    torn tail (which ``FileWal.open`` would cut off).
    """
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        first_seq = _read_header(f, path.name)
        try:
            yield from _iter_records(f, path.name, first_seq, size, config)
        except _BadFrameError as bad:
            raise _corruption(path.name, bad) from None


class _ScanGaveUpError(Exception):
    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


def _find_valid_frame(data: bytes, start: int, record_bytes_max: int) -> int | None:
    """The smallest offset ``>= start`` in ``data`` where a whole valid frame begins, or None.

    A candidate needs a length in ``[1, record_bytes_max]`` that fits in ``data``; only those
    are CRC-checked. The lengths at all offsets are computed with numpy a chunk at a time, so
    zero runs cost no Python per byte. Raises ``_ScanGaveUpError`` past the CRC budget.
    """
    n = len(data)
    last = n - FRAME_HEADER_BYTES - 1  # the last offset where a 1-byte frame fits
    if last < start or data.count(0, start) == n - start:
        return None
    arr = np.frombuffer(data, dtype=np.uint8)
    view = memoryview(data)
    budget = max(_SCAN_CRC_BYTES_MIN, 4 * n)
    for lo in range(start, last + 1, _SCAN_CHUNK_BYTES):
        hi = min(lo + _SCAN_CHUNK_BYTES, last + 1)  # candidate offsets [lo, hi)
        m = hi - lo
        b = arr[lo : hi + 3].astype(np.uint32)
        lengths = b[:m] | (b[1 : m + 1] << 8) | (b[2 : m + 2] << 16) | (b[3 : m + 3] << 24)
        room = (n - FRAME_HEADER_BYTES - lo) - np.arange(m, dtype=np.int64)
        plausible = (lengths >= 1) & (lengths <= np.minimum(room, record_bytes_max))
        for i in np.flatnonzero(plausible).tolist():
            off = lo + i
            length = int(lengths[i])
            budget -= length
            if budget < 0:
                raise _ScanGaveUpError(off)
            (crc,) = _U32.unpack_from(data, off + 4)
            body = view[off + FRAME_HEADER_BYTES : off + FRAME_HEADER_BYTES + length]
            if crc32c.crc32c(body) == crc:
                return off
    return None


# -- the file implementation ---------------------------------------------------------------


@dataclass(slots=True)
class _Segment:
    first_seq: int
    path: Path
    size: int
    """Bytes of valid data: what this process wrote or recovery validated."""


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    while written < len(data):  # a regular file writes short only when the disk fills up
        written += os.write(fd, memoryview(data)[written:])


def _remove_segment(directory: Path, path: Path, why: str) -> None:
    try:
        path.unlink()
        fsync_path(directory)
    except OSError as exc:
        raise StorageError(f"wal: cannot remove segment {path.name}: {exc}") from exc
    log.warning("wal: removed segment %s: %s", path.name, why)


def _recover(directory: Path, config: Config) -> tuple[list[_Segment], int]:
    """Validate and repair the segments of ``directory`` (see "Recovery rules").

    Returns the segments, oldest first, and the ``last_seq`` of the last record (0 if none).
    """
    names = sorted(p.name for p in directory.iterdir() if _SEGMENT_NAME.fullmatch(p.name))
    segments: list[_Segment] = []
    last_seq = 0
    for i, name in enumerate(names):
        path = directory / name
        newest = i == len(names) - 1
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if newest and _unborn(f, size, config):
                f.close()
                _remove_segment(directory, path, "created by a crash, holds no record")
                break
            f.seek(0)
            first_seq = _read_header(f, name)
            if segments and first_seq != last_seq + 1:
                raise CorruptionError(
                    f"wal: seq gap before segment {name}: it starts at seq {first_seq}, "
                    f"the segment before it ends at seq {last_seq}"
                )
            records = 0
            try:
                for _off, record in _iter_records(f, name, first_seq, size, config):
                    last_seq = record.last_seq
                    records += 1
                end = size
            except _BadFrameError as bad:
                if not newest:
                    raise _corruption(name, bad) from None
                _cut_torn_tail(f, path, size, bad, config)
                end = bad.offset
        if records == 0:
            if not newest:
                raise CorruptionError(f"wal: segment {name} holds no record but is not the newest")
            _remove_segment(directory, path, "holds no complete record")
            break
        segments.append(_Segment(first_seq, path, end))
    return segments, last_seq


def _unborn(f: BinaryIO, size: int, config: Config) -> bool:
    """Whether the newest segment is a crash while creating it: shorter than a header, or an
    all-zero header with no valid frame after it."""
    if size < HEADER_BYTES:
        return True
    header = f.read(HEADER_BYTES)
    if header != bytes(HEADER_BYTES):
        return False
    data = header + f.read(size - HEADER_BYTES)
    try:
        return _find_valid_frame(data, HEADER_BYTES, config.wal_record_bytes_max) is None
    except _ScanGaveUpError:
        return False


def _cut_torn_tail(f: BinaryIO, path: Path, size: int, bad: _BadFrameError, config: Config) -> None:
    """Truncate the newest segment at ``bad.offset`` if nothing valid follows, else raise."""
    f.seek(bad.offset)
    tail = f.read(size - bad.offset)
    try:
        found = _find_valid_frame(tail, 1, config.wal_record_bytes_max)
    except _ScanGaveUpError as gave_up:
        raise CorruptionError(
            f"wal: {bad.reason} in segment {path.name} at offset {bad.offset}, and the scan for "
            f"a valid frame after it gave up at offset {bad.offset + gave_up.offset}: cannot "
            f"tell a torn tail from damage"
        ) from None
    if found is not None:
        raise CorruptionError(
            f"wal: {bad.reason} in segment {path.name} at offset {bad.offset}; a valid frame "
            f"follows at offset {bad.offset + found}, so this is damage, not a torn write"
        )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, bad.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"wal: cannot truncate torn tail of segment {path.name}: {exc}") from exc
    log.warning(
        "wal: torn tail in segment %s: %s at offset %d; cut %d bytes",
        path.name,
        bad.reason,
        bad.offset,
        size - bad.offset,
    )


class FileWal:
    """The WAL as a directory of segment files (see the module docstring).

    Locking: ``_lock`` (under the condition ``_cond``) guards every field; ``append`` holds it
    for the write, ``sync`` never holds it during an fsync.
    """

    def __init__(
        self, directory: Path, config: Config, segments: list[_Segment], last_seq: int
    ) -> None:
        """Use :meth:`open`."""
        self._dir = directory
        self._config = config
        self._segments = segments
        """Oldest first; the last one is the newest, where appends go."""
        self._fd: int | None = None
        """Open for appending to the newest segment; None after ``roll()`` or when empty."""
        self._last_seq = last_seq
        self._bytes_total = sum(s.size for s in segments)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._written = 0
        """The latest token: frame bytes appended through this object."""
        self._synced = 0
        """Every token up to this one is durable."""
        self._syncing = False
        """A group-commit leader is running an fsync."""
        self._failure: str | None = None
        self._closed = False

    @classmethod
    def open(cls, path: Path, config: Config) -> FileWal:
        """Open (creating if missing) the WAL in directory ``path``, running recovery.

        Raises ``CorruptionError`` on damage recovery must not repair, ``StorageError`` on an
        OS error.
        """
        try:
            if not path.is_dir():
                path.mkdir(parents=True)
                fsync_path(path.parent)
            segments, last_seq = _recover(path, config)
            wal = cls(path, config, segments, last_seq)
            if segments:
                fd = os.open(segments[-1].path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                try:
                    os.fsync(fd)  # bytes a crashed process wrote but never synced
                    fsync_path(path)
                except BaseException:
                    os.close(fd)
                    raise
                wal._fd = fd
        except OSError as exc:
            raise StorageError(f"wal: cannot open {path}: {exc}") from exc
        return wal

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def append(self, record: Record) -> int:
        assert record.ops, "a record holds at least one operation"
        payload = codec.encode_record(record)
        length = len(payload)
        if length > self._config.wal_record_bytes_max:
            raise PayloadTooLarge(
                f"wal: record of {length} bytes exceeds wal_record_bytes_max "
                f"({self._config.wal_record_bytes_max})"
            )
        frame = _FRAME.pack(length, crc32c.crc32c(payload)) + payload
        with self._lock:
            self._check_usable()
            assert record.seq == self._last_seq + 1 or (self._last_seq == 0 and record.seq >= 1), (
                f"wal: append of seq {record.seq} after last_seq {self._last_seq}"
            )
            if self._fd is None or self._segments[-1].size >= self._config.wal_segment_bytes:
                self._start_segment(record.seq)
            assert self._fd is not None
            try:
                _write_all(self._fd, frame)
            except OSError as exc:
                raise self._fail(f"write to segment {self._segments[-1].path.name}", exc) from exc
            self._segments[-1].size += len(frame)
            self._bytes_total += len(frame)
            self._written += len(frame)
            self._last_seq = record.last_seq
            return self._written

    def sync(self, token: int) -> None:
        if token <= self._synced and self._failure is None:
            # Covered: no lock, no syscall. Also after close(), which synced everything: a
            # writer whose commit races a close (a shard handed over) learns it is durable.
            return
        with self._cond:
            while True:
                self._check_usable()
                if token <= self._synced:
                    return
                if not self._syncing:
                    break
                self._cond.wait()
            assert token <= self._written, f"wal: sync of token {token} never returned by append"
            assert self._fd is not None, "unsynced bytes live in the open newest segment"
            # This thread leads the next group: it fsyncs everything appended so far. The fd
            # is duplicated because a concurrent rollover may close the original.
            target = self._written
            name = self._segments[-1].path.name
            try:
                fd = os.dup(self._fd)
            except OSError as exc:
                raise self._fail(f"dup of segment {name}", exc) from exc
            self._syncing = True
        error: OSError | None = None
        try:
            os.fsync(fd)
        except OSError as exc:
            error = exc
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
            with self._cond:
                self._syncing = False
                if error is not None:
                    self._fail(f"fsync of segment {name}", error)
                elif target > self._synced:
                    self._synced = target
                self._cond.notify_all()
        if error is not None:
            raise StorageError(f"wal: fsync of segment {name} failed: {error}") from error

    def sync_all(self) -> None:
        self.sync(self._written)

    def roll(self) -> None:
        with self._lock:
            self._check_usable()
            self._seal()

    def truncate_before(self, seq: int) -> None:
        with self._lock:
            self._check_usable()
            n = 0
            while n + 1 < len(self._segments) and self._segments[n + 1].first_seq - 1 <= seq:
                n += 1
            if n + 1 == len(self._segments) and self._fd is None and self._last_seq <= seq:
                n += 1  # the newest segment was sealed by roll() and is covered too
            doomed = self._segments[:n]
            del self._segments[:n]
            self._bytes_total -= sum(s.size for s in doomed)
        if not doomed:
            return
        # Unlinking oldest first leaves a suffix of the log whenever a crash interrupts us.
        try:
            for segment in doomed:
                segment.path.unlink()
            fsync_path(self._dir)
        except OSError as exc:
            with self._lock:
                raise self._fail("deletion of old segments", exc) from exc

    def records(self, after_seq: int = 0) -> Iterator[Record]:
        with self._lock:
            self._check_usable()
            segments = [_Segment(s.first_seq, s.path, s.size) for s in self._segments]
        return self._read(segments, after_seq)

    def _read(self, segments: list[_Segment], after_seq: int) -> Iterator[Record]:
        expected: int | None = None
        for i, segment in enumerate(segments):
            if i + 1 < len(segments) and segments[i + 1].first_seq - 1 <= after_seq:
                continue  # every record in it is at or below after_seq
            name = segment.path.name
            if expected is not None and segment.first_seq != expected:
                raise CorruptionError(f"wal: seq gap before segment {name}")
            try:
                with segment.path.open("rb") as f:
                    first_seq = _read_header(f, name)
                    if first_seq != segment.first_seq:
                        raise CorruptionError(f"wal: header of segment {name} changed")
                    for _off, record in _iter_records(
                        f, name, first_seq, segment.size, self._config
                    ):
                        expected = record.last_seq + 1
                        if record.last_seq > after_seq:
                            yield record
            except _BadFrameError as bad:
                raise _corruption(name, bad) from None
            except OSError as exc:
                raise StorageError(f"wal: cannot read segment {name}: {exc}") from exc

    def bytes_total(self) -> int:
        return self._bytes_total

    def first_seq(self) -> int:
        with self._lock:
            return self._segments[0].first_seq if self._segments else self._last_seq + 1

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True  # from here on, every other call raises InvalidState
            while self._syncing:
                self._cond.wait()
            fd, self._fd = self._fd, None
            pending = self._written > self._synced
            failure = self._failure
        if fd is not None:
            try:
                if pending and failure is None:
                    os.fsync(fd)
                    self._synced = self._written
            except OSError as exc:
                with self._lock:
                    self._fail("fsync at close", exc)
                raise StorageError(f"wal: fsync at close failed: {exc}") from exc
            finally:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if failure is not None:
            raise StorageError(f"wal: closed after an earlier failure: {failure}")

    # -- internals (lock held) ---------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise StorageError(
                f"wal: refusing to continue after an earlier failure ({self._failure}); "
                f"reopen the WAL to recover"
            )
        if self._closed:
            raise InvalidState("wal: closed")

    def _fail(self, what: str, exc: OSError) -> StorageError:
        """Record the first failure (every later call raises) and return the error to raise."""
        message = f"{what} failed: {exc}"
        if self._failure is None:
            self._failure = message
            log.error("wal: %s; the WAL refuses every further call", message)
        self._cond.notify_all()
        return StorageError(f"wal: {message}")

    def _seal(self) -> None:
        """fsync and close the newest segment; the next append starts a new one."""
        if self._fd is None:
            return
        fd = self._fd
        try:
            os.fsync(fd)
        except OSError as exc:
            raise self._fail(f"fsync of segment {self._segments[-1].path.name}", exc) from exc
        self._fd = None
        with contextlib.suppress(OSError):
            os.close(fd)  # its data is durable; a group-commit leader holds its own dup
        self._synced = self._written
        self._cond.notify_all()

    def _start_segment(self, first_seq: int) -> None:
        self._seal()
        path = self._dir / segment_name(first_seq)
        try:
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise self._fail(f"creation of segment {path.name}", exc) from exc
        try:
            _write_all(fd, _HEADER.pack(MAGIC, first_seq))
            fsync_path(self._dir)
        except OSError as exc:
            os.close(fd)
            raise self._fail(f"creation of segment {path.name}", exc) from exc
        self._fd = fd
        self._segments.append(_Segment(first_seq, path, HEADER_BYTES))
        self._bytes_total += HEADER_BYTES


# -- the in-memory twin --------------------------------------------------------------------


class MemoryWal:
    """The in-memory twin of :class:`FileWal`, for tests of the layers above.

    Same semantics, segments and sizes included (``bytes_total`` counts what the files would
    hold). The "disk" is the synced prefix: :meth:`crash` simulates a power loss and a reopen,
    dropping every record not yet synced; before a crash, ``records()`` returns everything
    appended. :meth:`fail` simulates a failed fsync. Tokens count appended records.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._segments: list[list[tuple[int, Record]]] = []
        """Oldest first: (token, record) pairs."""
        self._sizes: list[int] = []
        """The bytes each segment would take on disk."""
        self._sealed = False
        self._last_seq = 0
        self._written = 0
        self._synced = 0
        self._failed = False
        self._closed = False

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def append(self, record: Record) -> int:
        assert record.ops, "a record holds at least one operation"
        length = len(codec.encode_record(record))
        if length > self._config.wal_record_bytes_max:
            raise PayloadTooLarge(
                f"wal: record of {length} bytes exceeds wal_record_bytes_max "
                f"({self._config.wal_record_bytes_max})"
            )
        with self._lock:
            self._check_usable()
            assert record.seq == self._last_seq + 1 or (self._last_seq == 0 and record.seq >= 1), (
                f"wal: append of seq {record.seq} after last_seq {self._last_seq}"
            )
            if (
                self._sealed
                or not self._segments
                or self._sizes[-1] >= self._config.wal_segment_bytes
            ):
                self._synced = self._written  # a rollover fsyncs the old segment
                self._segments.append([])
                self._sizes.append(HEADER_BYTES)
                self._sealed = False
            self._written += 1
            self._segments[-1].append((self._written, record))
            self._sizes[-1] += FRAME_HEADER_BYTES + length
            self._last_seq = record.last_seq
            return self._written

    def sync(self, token: int) -> None:
        with self._lock:
            if token <= self._synced and not self._failed:
                return  # durable already (also after close, as FileWal)
            self._check_usable()
            assert token <= self._written, f"wal: sync of token {token} never returned by append"
            self._synced = max(self._synced, token)

    def sync_all(self) -> None:
        self.sync(self._written)

    def roll(self) -> None:
        with self._lock:
            self._check_usable()
            self._synced = self._written
            self._sealed = True

    def truncate_before(self, seq: int) -> None:
        with self._lock:
            self._check_usable()
            n = 0
            while n + 1 < len(self._segments) and self._segments[n + 1][0][1].seq - 1 <= seq:
                n += 1
            if n + 1 == len(self._segments) and self._sealed and self._last_seq <= seq:
                n += 1
            del self._segments[:n]
            del self._sizes[:n]

    def records(self, after_seq: int = 0) -> Iterator[Record]:
        with self._lock:
            self._check_usable()
            found = [r for s in self._segments for _, r in s if r.last_seq > after_seq]
        return iter(found)

    def bytes_total(self) -> int:
        return sum(self._sizes)

    def first_seq(self) -> int:
        with self._lock:
            for segment in self._segments:
                if segment:
                    return segment[0][1].seq
            return self._last_seq + 1

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._failed:
                self._synced = self._written
        if self._failed:
            raise StorageError("wal: closed after an earlier failure")

    def crash(self) -> None:
        """Simulate a power loss and a reopen: keep only synced records; the WAL is open
        (even if it was closed or failed) and appends continue in the newest segment."""
        with self._lock:
            for i, segment in enumerate(self._segments):
                kept = [(t, r) for t, r in segment if t <= self._synced]
                dropped = segment[len(kept) :]
                self._segments[i] = kept
                self._sizes[i] -= sum(
                    FRAME_HEADER_BYTES + len(codec.encode_record(r)) for _, r in dropped
                )
            while self._segments and not self._segments[-1]:
                self._segments.pop()
                self._sizes.pop()
            self._last_seq = self._segments[-1][-1][1].last_seq if self._segments else 0
            self._sealed = False
            self._failed = False
            self._closed = False

    def fail(self) -> None:
        """Simulate a failed fsync: every later call raises ``StorageError``."""
        with self._lock:
            self._failed = True

    def _check_usable(self) -> None:
        if self._failed:
            raise StorageError("wal: refusing to continue after an earlier (simulated) failure")
        if self._closed:
            raise InvalidState("wal: closed")
