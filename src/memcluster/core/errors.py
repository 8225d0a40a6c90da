"""The one error tree of memcluster.

Every error memcluster raises on purpose is a subclass of :class:`MemclusterError`. The tree
says whose fault an error is and whether retrying can help::

    MemclusterError
    ├── RequestError                 the caller must change the request; never retried
    │   ├── InvalidArgument          400  malformed input
    │   │   ├── InvalidName          400  collection name, namespace part or key
    │   │   ├── InvalidVector        400  NaN/inf, zero vector under cosine, not 1-d
    │   │   │   └── DimensionMismatch  400  vector length != collection dim
    │   │   ├── InvalidMetadata      400  not a JSON object of JSON values
    │   │   └── InvalidFilter        400  unknown operator, wrong operand type
    │   ├── PayloadTooLarge          413  text, metadata, batch or record over its limit
    │   ├── NotFound                 404
    │   │   ├── CollectionNotFound   404
    │   │   └── LeaseExpired         404  the lease ended (revoked or not kept alive)
    │   ├── AlreadyExists            409
    │   │   └── CollectionExists     409
    │   ├── VersionConflict          409  if_version did not match (carries expected/actual)
    │   ├── StaleToken               409  a fencing token no longer holds its lock
    │   ├── CursorExpired            410  a change-feed cursor older than the retention window
    │   ├── CapacityExceeded         507  full collection with eviction "none"
    │   ├── InvalidState             409  e.g. the database is closed
    │   ├── Unauthenticated          401  no API key, or an unknown one
    │   ├── PermissionDenied         403  the API key's role or namespaces do not allow it
    │   └── ProtocolError            400  bytes on the binary protocol that are not a frame
    ├── RetryableError               the same request may succeed later
    │   ├── NotLeader                421  carries a hint: where the leader is
    │   ├── ShardUnavailable         503
    │   ├── WrongNode                421  this node does not hold the shard (any more): route again
    │   ├── Timeout                  504
    │   ├── Overloaded               429
    │   └── Unreachable              503  the node refused or dropped the connection
    └── FatalError                   the system is damaged; never retried
        ├── CorruptionError          500  a CRC mismatch or a gap in the log
        └── StorageError             500  a failed fsync/write: the shard stops taking writes

:data:`ERROR_TABLE` is the one table mapping every concrete class to its retryability, its
HTTP status and its wire code; :func:`is_retryable` reads it, and a test checks that every
class in this module has a row. Messages name the subsystem and the facts, and say what to do:
``wal: crc mismatch in segment 00000000000000000001.wal at offset 4096``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple


class MemclusterError(Exception):
    """Base of every error memcluster raises on purpose."""

    @property
    def code(self) -> str:
        """The machine-readable wire code of this error (see :data:`ERROR_TABLE`)."""
        return ERROR_TABLE[type(self)].code


# -- the caller's fault -------------------------------------------------------------------


class RequestError(MemclusterError):
    """The request cannot succeed as it is; the message says what to change."""


class InvalidArgument(RequestError):
    """A malformed argument."""


class InvalidName(InvalidArgument):
    """A collection name, namespace part or key is empty, too long or badly formed."""


class InvalidVector(InvalidArgument):
    """A vector holds NaN or infinite values, is not one-dimensional, or is zero under cosine."""


class DimensionMismatch(InvalidVector):
    """A vector's length differs from the collection's ``dim``."""

    def __init__(self, message: str, *, expected: int, actual: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class InvalidMetadata(InvalidArgument):
    """Metadata is not a JSON object of JSON values."""


class InvalidFilter(InvalidArgument):
    """A filter uses an unknown operator or an operand of the wrong type."""


class PayloadTooLarge(RequestError):
    """Text, metadata, a batch or a whole record is over its configured limit."""


class NotFound(RequestError):
    """The named thing does not exist."""


class CollectionNotFound(NotFound):
    """No collection has this name."""


class LeaseExpired(NotFound):
    """The lease does not exist any more: it was revoked, or it expired without a keepalive.

    Whatever it held (locks, permits, memories) is gone; grant a new lease and start over.
    """


class AlreadyExists(RequestError):
    """The thing to create exists already."""


class CollectionExists(AlreadyExists):
    """A collection of this name exists already."""


class VersionConflict(RequestError):
    """A conditional write's ``if_version`` did not match the stored version.

    ``expected`` is what the caller asked for (0 = "absent"); ``actual`` is the stored
    version (0 when the memory does not exist).
    """

    def __init__(self, message: str, *, expected: int, actual: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class StaleToken(RequestError):
    """A fencing token (or permit token) no longer holds its lock: it was released, or its
    lease expired and the lock may have a newer holder. The write or release was refused."""


class CursorExpired(RequestError):
    """A change-feed cursor points before the oldest event still retained.

    ``oldest_cursor`` resumes from the oldest retained event (events in between are lost to
    this subscriber: re-read the current state with ``list()`` first).
    """

    def __init__(self, message: str, *, oldest_cursor: str | None = None) -> None:
        super().__init__(message)
        self.oldest_cursor = oldest_cursor


class CapacityExceeded(RequestError):
    """A collection (or namespace) is full and its eviction policy is ``none``."""


class InvalidState(RequestError):
    """The object cannot serve requests in its current state (for example, it is closed)."""


class Unauthenticated(RequestError):
    """The server requires an API key and the request carried none, or an unknown one."""


class PermissionDenied(RequestError):
    """The API key's role or namespace prefixes do not cover this request."""


class ProtocolError(RequestError):
    """Bytes received on the binary protocol do not form a valid frame or handshake."""


# -- retryable ----------------------------------------------------------------------------


class RetryableError(MemclusterError):
    """The same request may succeed if sent again later (or elsewhere)."""


class NotLeader(RetryableError):
    """This replica is not the shard's leader; ``leader_hint`` names the one to ask."""

    def __init__(self, message: str, *, leader_hint: str | None = None) -> None:
        super().__init__(message)
        self.leader_hint = leader_hint


class ShardUnavailable(RetryableError):
    """The shard has no replica able to serve the request right now."""


class WrongNode(RetryableError):
    """The node asked does not hold the shard (it moved, or is not yet open there): look the
    owner up in the shard map again and resend. Nodes and the SDK do this themselves."""


class Timeout(RetryableError):
    """The operation did not finish within its deadline."""


class Overloaded(RetryableError):
    """A bounded queue is full; back off and retry."""


class Unreachable(RetryableError):
    """The node could not be reached, or the connection dropped before the reply came.

    A write that was sent may or may not have been applied: retry it with an idempotency key
    (``put_many``) or a conditional version to make the retry safe.
    """

    sent = True
    """False when no connection could be opened: nothing was sent, so even a write that is
    not idempotent may be sent again (a node-to-node router uses this during failovers)."""


# -- fatal --------------------------------------------------------------------------------


class FatalError(MemclusterError):
    """Stored data is damaged or the disk failed; retrying cannot help."""


class CorruptionError(FatalError):
    """Stored bytes fail their checksum or break the log's sequence."""


class StorageError(FatalError):
    """A write or fsync failed; the shard refuses further writes until reopened."""


class ErrorInfo(NamedTuple):
    """One row of the error table."""

    retryable: bool
    http_status: int
    code: str


ERROR_TABLE: dict[type[MemclusterError], ErrorInfo] = {
    MemclusterError: ErrorInfo(False, 500, "internal"),
    RequestError: ErrorInfo(False, 400, "bad_request"),
    InvalidArgument: ErrorInfo(False, 400, "invalid_argument"),
    InvalidName: ErrorInfo(False, 400, "invalid_name"),
    InvalidVector: ErrorInfo(False, 400, "invalid_vector"),
    DimensionMismatch: ErrorInfo(False, 400, "dimension_mismatch"),
    InvalidMetadata: ErrorInfo(False, 400, "invalid_metadata"),
    InvalidFilter: ErrorInfo(False, 400, "invalid_filter"),
    PayloadTooLarge: ErrorInfo(False, 413, "payload_too_large"),
    NotFound: ErrorInfo(False, 404, "not_found"),
    CollectionNotFound: ErrorInfo(False, 404, "collection_not_found"),
    LeaseExpired: ErrorInfo(False, 404, "lease_expired"),
    AlreadyExists: ErrorInfo(False, 409, "already_exists"),
    CollectionExists: ErrorInfo(False, 409, "collection_exists"),
    VersionConflict: ErrorInfo(False, 409, "version_conflict"),
    StaleToken: ErrorInfo(False, 409, "stale_token"),
    CursorExpired: ErrorInfo(False, 410, "cursor_expired"),
    CapacityExceeded: ErrorInfo(False, 507, "capacity_exceeded"),
    InvalidState: ErrorInfo(False, 409, "invalid_state"),
    Unauthenticated: ErrorInfo(False, 401, "unauthenticated"),
    PermissionDenied: ErrorInfo(False, 403, "permission_denied"),
    ProtocolError: ErrorInfo(False, 400, "protocol_error"),
    RetryableError: ErrorInfo(True, 503, "retryable"),
    NotLeader: ErrorInfo(True, 421, "not_leader"),
    ShardUnavailable: ErrorInfo(True, 503, "shard_unavailable"),
    WrongNode: ErrorInfo(True, 421, "wrong_node"),
    Timeout: ErrorInfo(True, 504, "timeout"),
    Overloaded: ErrorInfo(True, 429, "overloaded"),
    Unreachable: ErrorInfo(True, 503, "unreachable"),
    FatalError: ErrorInfo(False, 500, "fatal"),
    CorruptionError: ErrorInfo(False, 500, "corruption"),
    StorageError: ErrorInfo(False, 500, "storage"),
}


def is_retryable(exc: BaseException) -> bool:
    """Whether sending the same request again may succeed.

    Only errors of the tree can be retryable; anything else (a bug, ``KeyboardInterrupt``)
    is not.
    """
    if not isinstance(exc, MemclusterError):
        return False
    return ERROR_TABLE[type(exc)].retryable


_BY_CODE: dict[str, type[MemclusterError]] = {info.code: cls for cls, info in ERROR_TABLE.items()}

_DETAIL_FIELDS = ("expected", "actual", "leader_hint", "oldest_cursor")


def error_details(exc: MemclusterError) -> dict[str, Any]:
    """The structured fields of ``exc`` (``expected``/``actual``, ``leader_hint``), for the wire."""
    return {name: getattr(exc, name) for name in _DETAIL_FIELDS if hasattr(exc, name)}


def error_from_wire(code: str, message: str, details: Mapping[str, Any]) -> MemclusterError:
    """Rebuild the exception a server reported, so remote clients raise what embedded raises.

    An unknown code (a newer server) becomes the nearest known base: a plain MemclusterError.
    """
    cls = _BY_CODE.get(code, MemclusterError)
    if cls in (VersionConflict, DimensionMismatch):
        try:
            return cls(message, expected=int(details["expected"]), actual=int(details["actual"]))
        except (KeyError, TypeError, ValueError):
            return cls.__mro__[1](message)  # type: ignore[no-any-return]
    if cls is CursorExpired:
        oldest = details.get("oldest_cursor")
        return CursorExpired(message, oldest_cursor=oldest if isinstance(oldest, str) else None)
    if cls is NotLeader:
        hint = details.get("leader_hint")
        return NotLeader(message, leader_hint=hint if isinstance(hint, str) else None)
    return cls(message)
