"""Snapshots: a shard's whole state at one sequence number, written atomically.

On-disk format (version 1)::

    snapshots/
      00000000000000001234/          one snapshot; the name is its seq (20 digits)
        MANIFEST                     b"MCSNAP01" + u32 crc32c(body) + u64 len(body) + body
        state.bin                    the shard's state (format owned by the shard)
        graph.hnsw                   optional: the saved hnswlib graph
      00000000000000005678.tmp/      a snapshot being written (ignored, removed on open)

MANIFEST's body is msgpack ``{"seq": int, "files": {name: [size, crc32c]}}``; every file is
checked against it on load, so a damaged file is detected rather than half-loaded.

Crash behaviour: files are written into ``<seq>.tmp/`` and fsynced, the directory is fsynced,
renamed to ``<seq>/`` and the parent directory fsynced. A crash at any point leaves either no
snapshot of that seq or a complete one. On load, the newest snapshot that verifies wins; a
damaged one is reported in the log and the next older one is tried, which is why the shard
keeps two and drops the WAL only before the older one.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import crc32c
import msgspec

from memcluster.core.errors import CorruptionError, StorageError
from memcluster.storage.files import fsync_path

MAGIC = b"MCSNAP01"
_HEADER = struct.Struct("<8sIQ")
log = logging.getLogger("memcluster.snapshot")

FileWriter = bytes | Callable[[Path], None]
"""A file's content, or a function that writes the file at the given path itself."""


class Manifest(msgspec.Struct, frozen=True):
    seq: int
    files: dict[str, tuple[int, int]]


def _file_crc(path: Path) -> tuple[int, int]:
    crc = 0
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = crc32c.crc32c(chunk, crc)
            size += len(chunk)
    return size, crc


def _write_file(path: Path, content: bytes) -> None:
    with path.open("wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


class SnapshotStore:
    """The snapshots of one shard, in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob("*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)

    def seqs(self) -> list[int]:
        """Sequence numbers of the complete snapshots on disk, oldest first."""
        return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit())

    def path(self, seq: int) -> Path:
        return self.root / f"{seq:020d}"

    def write(self, seq: int, files: dict[str, FileWriter]) -> Path:
        """Write a snapshot of ``seq`` atomically; raises StorageError on an OS error."""
        final = self.path(seq)
        tmp = self.root / f"{seq:020d}.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            entries: dict[str, tuple[int, int]] = {}
            for name, content in files.items():
                target = tmp / name
                if isinstance(content, bytes):
                    _write_file(target, content)
                    entries[name] = (len(content), crc32c.crc32c(content))
                else:
                    content(target)
                    fsync_path(target)
                    entries[name] = _file_crc(target)
            body = msgspec.msgpack.encode(Manifest(seq=seq, files=entries))
            _write_file(
                tmp / "MANIFEST", _HEADER.pack(MAGIC, crc32c.crc32c(body), len(body)) + body
            )
            fsync_path(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_path(self.root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"snapshot: writing seq {seq} in {self.root} failed: {exc}") from exc
        return final

    def verify(self, seq: int) -> Manifest:
        """The manifest of snapshot ``seq`` after checking every file; CorruptionError if not."""
        where = self.path(seq)
        try:
            raw = (where / "MANIFEST").read_bytes()
        except OSError as exc:
            raise CorruptionError(f"snapshot: {where}/MANIFEST unreadable: {exc}") from exc
        if len(raw) < _HEADER.size:
            raise CorruptionError(f"snapshot: {where}/MANIFEST is truncated")
        magic, crc, length = _HEADER.unpack_from(raw)
        body = raw[_HEADER.size :]
        if magic != MAGIC or length != len(body) or crc32c.crc32c(body) != crc:
            raise CorruptionError(f"snapshot: {where}/MANIFEST fails its magic, length or crc")
        manifest = msgspec.msgpack.decode(body, type=Manifest)
        for name, (size, file_crc) in manifest.files.items():
            try:
                actual = _file_crc(where / name)
            except OSError as exc:
                raise CorruptionError(f"snapshot: {where}/{name} unreadable: {exc}") from exc
            if actual != (size, file_crc):
                raise CorruptionError(
                    f"snapshot: {where}/{name} has size/crc {actual}, manifest says"
                    f" {(size, file_crc)}"
                )
        return manifest

    def latest(self) -> Manifest | None:
        """The newest snapshot that verifies, or None when there is none.

        A damaged snapshot is logged and skipped; the caller checks that the WAL still reaches
        back to the one returned (it does when at most the newest was damaged).
        """
        for seq in reversed(self.seqs()):
            try:
                return self.verify(seq)
            except CorruptionError as exc:
                log.error("%s; trying an older snapshot", exc)
        return None

    def prune(self, keep: int) -> None:
        """Delete all but the ``keep`` newest snapshots."""
        seqs = self.seqs()
        for seq in seqs[: max(0, len(seqs) - keep)]:
            shutil.rmtree(self.path(seq), ignore_errors=True)
        fsync_path(self.root)
