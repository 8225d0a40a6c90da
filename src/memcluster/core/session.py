"""Session tokens: read-your-writes and monotonic reads on replicated collections.

A token records, per collection and shard, the highest sequence number a client has written
or seen there. A read with ``consistency="session"`` carries it; any replica that has applied
those sequence numbers may answer (it waits briefly for them, else the leader answers), so
the client always sees its own acknowledged writes and never goes back in time, while the
reads spread over the replicas. Writes and session reads return the token updated; the
Python SDK keeps it per client and sends it along by itself, HTTP clients pass it in the
``Memcluster-Session`` header (or the ``session`` field of the body) and read the new one
from the same header of the response (or the ``session`` field of the reply).

The token is opaque to clients: ``base64url(msgpack({collection: {shard: seq}}))``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

import msgspec

from memcluster.core.errors import InvalidArgument

HEADER = "Memcluster-Session"
"""The HTTP header a session token travels in, both ways."""

Marks = dict[str, dict[int, int]]

_decoder = msgspec.msgpack.Decoder(Marks)
_encoder = msgspec.msgpack.Encoder()


def encode(marks: Mapping[str, Mapping[int, int]]) -> str:
    raw = _encoder.encode({c: dict(s) for c, s in sorted(marks.items())})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str | None) -> Marks:
    """The marks of ``token`` (empty for None or ""); InvalidArgument for a malformed one."""
    if not token:
        return {}
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return _decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise InvalidArgument(
            f"session token {token[:40]!r} is malformed; pass the token a write or session read"
            " returned, unchanged (or none to start a new session)"
        ) from None


def merge(token: str | None, collection: str, seqs: Mapping[int, int]) -> str:
    """``token`` raised to ``seqs`` for ``collection``'s shards."""
    marks = decode(token)
    mine = marks.setdefault(collection, {})
    for shard, seq in seqs.items():
        if seq > mine.get(shard, 0):
            mine[shard] = seq
    return encode(marks)


def combine(a: str | None, b: str | None) -> str | None:
    """The token covering both (what a client keeps as it gets new ones)."""
    if not a or not b:
        return a or b
    marks = decode(a)
    for collection, seqs in decode(b).items():
        a = merge(encode(marks), collection, seqs)
        marks = decode(a)
    return encode(marks)


def wanted(token: str | None, collection: str) -> dict[int, int]:
    """The seq each shard of ``collection`` must have applied to answer for this session."""
    return dict(decode(token).get(collection, {}))
