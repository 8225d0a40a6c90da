"""Input validation at the edge: every check that turns bad input into a clear error.

Each function either returns the value in its canonical form (a namespace as a tuple, a vector
as contiguous float32, metadata as JSON bytes) or raises an error of the tree whose message
names the field and says what to fix. Nothing is written before validation has passed for the
whole request, so a rejected batch leaves no trace.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from memcluster.core.config import Config
from memcluster.core.errors import (
    DimensionMismatch,
    InvalidArgument,
    InvalidMetadata,
    InvalidName,
    InvalidVector,
    PayloadTooLarge,
)
from memcluster.core.types import Metric

E = TypeVar("E", bound=enum.Enum)
Vector = npt.NDArray[np.float32]
Matrix = npt.NDArray[np.float32]

_COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f]")
_json = msgspec.json.Encoder()
METADATA_DEPTH_MAX = 16


def collection_name(name: object) -> str:
    """A collection name: 1-64 of letters, digits, ``_ . -``, starting with a letter or digit."""
    if not isinstance(name, str) or not _COLLECTION_NAME.fullmatch(name):
        raise InvalidName(
            f"collection name {name!r} is invalid: use 1-64 letters, digits, '_', '.' or '-',"
            " starting with a letter or digit"
        )
    return name


def _name_part(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidName(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidName(f"{what} must not be empty")
    if len(value.encode()) > limit:
        raise InvalidName(f"{what} is {len(value.encode())} bytes; the limit is {limit}")
    if _CONTROL.search(value):
        raise InvalidName(f"{what} {value!r} contains a control character (0x00-0x1f)")
    return value


def namespace(value: object, config: Config, *, allow_empty: bool = False) -> tuple[str, ...]:
    """A namespace: a tuple (or list) of 1..namespace_depth_max non-empty strings.

    ``allow_empty`` accepts ``()`` and None, as a search or list prefix meaning "everything".
    """
    if value is None and allow_empty:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidName(
            f"namespace must be a tuple of strings such as ('team-a', 'agent-7'), got {value!r}"
        )
    parts = tuple(value)
    if not parts and not allow_empty:
        raise InvalidName("namespace must have at least one part, such as ('agent-7',)")
    if len(parts) > config.namespace_depth_max:
        raise InvalidName(
            f"namespace has {len(parts)} parts; the limit is {config.namespace_depth_max}"
        )
    for i, part in enumerate(parts):
        _name_part(part, f"namespace part {i}", config.namespace_part_bytes_max)
    return parts


def key(value: object, config: Config) -> str:
    """A memory key: a non-empty string without control characters."""
    return _name_part(value, "key", config.key_bytes_max)


def text(value: object, config: Config) -> str | None:
    """Memory text: None or a string of at most ``text_bytes_max`` UTF-8 bytes."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"text must be a string or None, got {type(value).__name__}")
    size = len(value.encode())
    if size > config.text_bytes_max:
        raise PayloadTooLarge(f"text is {size} bytes; the limit is {config.text_bytes_max}")
    return value


def _check_json_value(value: Any, path: str, depth: int) -> None:
    if depth > METADATA_DEPTH_MAX:
        raise InvalidMetadata(f"metadata nests deeper than {METADATA_DEPTH_MAX} at {path!r}")
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidMetadata(f"metadata {path!r} is {value}; only finite numbers are JSON")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json_value(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        _check_object(value, path, depth + 1)
        return
    raise InvalidMetadata(
        f"metadata {path!r} holds a {type(value).__name__}; use JSON values only"
        " (string, number, bool, null, list, object)"
    )


def _check_object(obj: Mapping[Any, Any], prefix: str, depth: int) -> None:
    for name, item in obj.items():
        if not isinstance(name, str) or not name:
            raise InvalidMetadata(f"metadata keys must be non-empty strings, got {name!r}")
        if name.startswith("$") or "." in name:
            raise InvalidMetadata(
                f"metadata key {name!r} may not start with '$' or contain '.'"
                " (filters use them for operators and nested paths)"
            )
        _check_json_value(item, f"{prefix}.{name}" if prefix else name, depth)


def metadata(value: object, config: Config) -> bytes:
    """Metadata as compact JSON bytes: a JSON object of JSON values, at most
    ``metadata_bytes_max`` bytes encoded."""
    if value is None:
        return b"{}"
    if not isinstance(value, Mapping):
        raise InvalidMetadata(f"metadata must be a JSON object (dict), got {type(value).__name__}")
    _check_object(value, "", 0)
    encoded = _json.encode(value)
    if len(encoded) > config.metadata_bytes_max:
        raise PayloadTooLarge(
            f"metadata is {len(encoded)} bytes as JSON; the limit is {config.metadata_bytes_max}"
        )
    return encoded


def int_in_range(name: str, value: object, lo: int, hi: int) -> int:
    """An int in [lo, hi] (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgument(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def enum_value(name: str, value: object, enum_type: type[E]) -> E:
    """``value`` as a member of ``enum_type``; InvalidArgument listing the choices otherwise."""
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_type)
        raise InvalidArgument(f"{name} is {value!r}; use one of {choices}") from None


def ttl(value: object) -> float | None:
    """A time to live: None or a positive finite number of seconds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"ttl_s must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"ttl_s must be a positive finite number of seconds, got {value}")
    return float(value)


def if_version(value: object) -> int | None:
    """A conditional version: None, 0 (only if absent) or a positive version."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"if_version must be an int >= 0 (0 = only if absent), got {value!r}")
    return value


def vectors(values: Sequence[Any], dim: int, metric: Metric, *, what: str = "vector") -> Matrix:
    """Vectors as one contiguous (n, dim) float32 matrix; normalised rows under cosine.

    Each value may be any sequence of numbers or a numpy array. The checks run on the whole
    matrix at once, so a batch costs one numpy pass, not a Python loop per number.
    """
    n = len(values)
    out = np.empty((n, dim), dtype=np.float32)
    for i, value in enumerate(values):
        if value is None:
            raise InvalidVector(f"{what} {i} is missing; every memory needs a vector of {dim}")
        try:
            row = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidVector(f"{what} {i} is not a sequence of numbers: {exc}") from None
        if row.ndim != 1:
            raise InvalidVector(f"{what} {i} must be one-dimensional, got shape {row.shape}")
        if row.shape[0] != dim:
            raise DimensionMismatch(
                f"{what} {i} has {row.shape[0]} dimensions; the collection has dim={dim}",
                expected=dim,
                actual=int(row.shape[0]),
            )
        out[i] = row
    return _finish(out, metric, what)


def query_vector(value: object, dim: int, metric: Metric) -> Vector:
    """One query vector, validated like a stored one."""
    if value is None:
        raise InvalidVector(f"search needs a query vector of {dim} numbers")
    row: Vector = vectors([value], dim, metric, what="query vector")[0]
    return row


def _finish(out: Matrix, metric: Metric, what: str) -> Matrix:
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise InvalidVector(f"{what} {bad} holds NaN or infinite values; use finite numbers")
    if metric is Metric.COSINE:
        norms = np.linalg.norm(out, axis=1)
        if (norms == 0).any():
            bad = int(np.flatnonzero(norms == 0)[0])
            raise InvalidVector(
                f"{what} {bad} is all zeros, which has no direction under the cosine metric"
            )
        out /= norms[:, None]
    return out
