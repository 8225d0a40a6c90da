"""Validate a batch of memories into the :class:`PreparedPut` items a shard writes.

The embedded engine, a cluster node's router and the node holding the shard all call
:func:`prepare_puts`, so a memory is checked the same way wherever it is written: one vector
matrix check for the whole batch, then each name, text, metadata and option, with errors that
say which memory is wrong.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from memcluster.core import validation
from memcluster.core.config import Config
from memcluster.core.errors import InvalidArgument, PayloadTooLarge
from memcluster.core.types import CollectionConfig, Memory
from memcluster.shard.shard import PreparedPut


def prepare_puts(
    memories: Sequence[Memory],
    coll: CollectionConfig,
    config: Config,
    lease_of: Callable[[object], int],
) -> tuple[list[PreparedPut], npt.NDArray[np.float32]]:
    """The validated items of ``memories``, and their vectors as one (n, dim) matrix (the
    items' vectors are its rows); ``lease_of`` turns a memory's ``lease`` option into the
    lease id to record (0: none), checking that it is alive."""
    matrix = validation.vectors([m.vector for m in memories], coll.dim, coll.metric)
    prepared: list[PreparedPut] = []
    seen: dict[tuple[tuple[str, ...], str], int] = {}
    for i, m in enumerate(memories):
        namespace = validation.namespace(m.namespace, config)
        key = validation.key(m.key, config)
        if (namespace, key) in seen:
            raise InvalidArgument(
                f"memories {seen[(namespace, key)]} and {i} have the same namespace and key"
                f" {namespace}/{key!r}; a batch writes each memory once"
            )
        seen[(namespace, key)] = i
        prepared.append(
            PreparedPut(
                namespace=namespace,
                key=key,
                text=validation.text(m.text, config),
                vector=matrix[i],
                metadata=validation.metadata(m.metadata, config),
                ttl_s=validation.ttl(m.ttl_s),
                if_version=validation.if_version(m.if_version),
                lease=lease_of(m.lease),
            )
        )
    return prepared, matrix


def payload_json(payload: Any, config: Config) -> bytes:
    """A topic message's payload as JSON bytes, checked against ``metadata_bytes_max``."""
    try:
        data = msgspec.json.encode(payload)
    except (TypeError, msgspec.EncodeError) as exc:
        raise InvalidArgument(f"payload is not JSON: {exc}") from None
    if len(data) > config.metadata_bytes_max:
        raise PayloadTooLarge(
            f"payload is {len(data)} bytes of JSON; the limit is {config.metadata_bytes_max}"
        )
    return data


def encode_list_cursor(after: tuple[tuple[str, ...], str]) -> str:
    """The ``next_cursor`` of a list page: the last (namespace, key) it returned."""
    return base64.urlsafe_b64encode(msgspec.msgpack.encode(after)).decode()


def decode_list_cursor(cursor: str) -> tuple[tuple[str, ...], str]:
    """The (namespace, key) a list page's cursor continues after; InvalidArgument if bad."""
    try:
        ns, key = msgspec.msgpack.decode(
            base64.urlsafe_b64decode(cursor.encode()), type=tuple[tuple[str, ...], str]
        )
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise InvalidArgument(
            "cursor is not valid: pass the next_cursor of a previous page unchanged"
        ) from None
    return ns, key
