"""Encodings: the operation records that the WAL stores and replication ships, and JSON.

A :class:`Record` is one atomic write to one shard: a list of operations that consume
consecutive sequence numbers starting at ``Record.seq`` (operation ``i`` has sequence
``seq + i``). Records are msgpack-encoded as arrays (field order is the format; append new
fields at the end with defaults, never reorder):

    Record   = [seq, ts, ops, idem]
    PutOp    = ["p", namespace, key, text, vector, metadata, created_at, updated_at, expires_at]
    DeleteOp = ["d", namespace, key, reason]

``vector`` is the raw little-endian float32 bytes; ``metadata`` is the memory's metadata as
UTF-8 JSON bytes (validated and size-checked once, at the edge, and never re-encoded). Every
decision that depends on time (timestamps, expiry, which memories to evict) is made once by the
writer and recorded, so replaying the log on any replica reaches the same state.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec


class DeleteReason(enum.IntEnum):
    """Why a delete happened (the change feed reports it)."""

    USER = 0
    EXPIRED = 1
    EVICTED = 2


class PutOp(msgspec.Struct, frozen=True, array_like=True, tag="p"):
    """Insert or replace one memory."""

    namespace: tuple[str, ...]
    key: str
    text: str | None
    vector: bytes
    metadata: bytes
    created_at: float
    updated_at: float
    expires_at: float | None


class DeleteOp(msgspec.Struct, frozen=True, array_like=True, tag="d"):
    """Remove one memory (a no-op when it is absent)."""

    namespace: tuple[str, ...]
    key: str
    reason: DeleteReason = DeleteReason.USER


Op = PutOp | DeleteOp


class Record(msgspec.Struct, frozen=True, array_like=True):
    """One atomic write to a shard: ``ops`` take sequences ``seq .. seq + len(ops) - 1``."""

    seq: int
    ts: float
    ops: list[Op]
    idem: str | None = None
    """The idempotency key of the batch, if the caller gave one."""

    @property
    def last_seq(self) -> int:
        return self.seq + len(self.ops) - 1


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Record)
_json_encoder = msgspec.json.Encoder()


def encode_record(record: Record) -> bytes:
    """The msgpack bytes of a record."""
    return _record_encoder.encode(record)


def decode_record(payload: bytes | memoryview) -> Record:
    """Parse a record; raises ``msgspec.DecodeError`` on malformed bytes."""
    return _record_decoder.decode(payload)


def to_json(value: Any) -> bytes:
    """JSON bytes of any msgspec-encodable value."""
    return _json_encoder.encode(value)


def from_json(data: bytes | str, type_: Any = Any) -> Any:
    """Parse JSON into ``type_`` (validated); raises ``msgspec.ValidationError``/``DecodeError``."""
    return msgspec.json.decode(data, type=type_)
