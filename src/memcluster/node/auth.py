"""API keys: who may call which operation on which namespaces.

Authentication is off by default (local use). ``memcluster serve --api-keys FILE`` turns it on;
the file is JSON::

    {"keys": [
        {"name": "ops",     "key": "mc-admin-...", "role": "admin"},
        {"name": "agent-7", "key": "mc-agent-...", "role": "write",
         "namespaces": [["team-a", "agent-7"]]},
        {"name": "viewer",  "key": "mc-read-...",  "role": "read"}
    ]}

Roles are ordered: ``read`` (health, list and describe collections, get, search, count, list)
< ``write`` (plus put, delete, delete_where) < ``admin`` (plus create and drop collections).
A key with ``namespaces`` may touch only memories under one of those prefixes: each written or
read memory's namespace must start with one, and a search, count, list or delete_where must
pass a ``namespace`` inside one. Without a key a request gets 401 (Unauthenticated); outside
its rights, 403 (PermissionDenied). ``/v1/health`` needs no key, for probes.

Over HTTP the key goes in ``Authorization: Bearer KEY`` (or ``X-API-Key: KEY``); over the
binary protocol, in the handshake.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

from memcluster.core.api import Operation
from memcluster.core.errors import InvalidArgument, PermissionDenied, Unauthenticated


class Role(enum.IntEnum):
    """What a key may do; each role includes the ones below it."""

    READ = 1
    WRITE = 2
    ADMIN = 3


class ApiKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One entry of the API key file."""

    key: str
    role: str
    name: str = ""
    namespaces: list[tuple[str, ...]] | None = None
    """Namespace prefixes this key is limited to; None = every namespace."""


class KeyFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[ApiKey]


class Principal(msgspec.Struct, frozen=True):
    """The caller of a request, once authenticated."""

    name: str
    role: Role
    namespaces: tuple[tuple[str, ...], ...] | None


ANONYMOUS = Principal("anonymous", Role.ADMIN, None)
"""The caller when authentication is off: may do everything."""


def load_keys(path: Path) -> list[ApiKey]:
    """Read and check an API key file; InvalidArgument says what is wrong with it."""
    try:
        keys = msgspec.json.decode(path.read_bytes(), type=KeyFile).keys
    except OSError as exc:
        raise InvalidArgument(f"api keys: cannot read {path}: {exc.strerror}") from None
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"api keys: {path} is not a valid key file: {exc}") from None
    for entry in keys:
        if entry.role.upper() not in Role.__members__:
            raise InvalidArgument(
                f"api keys: key {entry.name!r} has role {entry.role!r}; use read, write or admin"
            )
        if len(entry.key) < 16:
            raise InvalidArgument(f"api keys: key {entry.name!r} is shorter than 16 characters")
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Auth:
    """Checks requests against the configured keys. ``Auth(None)`` allows everything."""

    def __init__(self, keys: Sequence[ApiKey] | None) -> None:
        self.enabled = keys is not None
        # Keys are looked up by digest, so the comparison does not leak the key's prefix.
        self._by_digest = {
            _digest(k.key): Principal(
                k.name or "unnamed",
                Role[k.role.upper()],
                None if k.namespaces is None else tuple(tuple(ns) for ns in k.namespaces),
            )
            for k in keys or ()
        }

    def authenticate(self, key: str | None) -> Principal:
        """The principal of ``key``; Unauthenticated when keys are on and it is absent/unknown."""
        if not self.enabled:
            return ANONYMOUS
        if not key:
            raise Unauthenticated(
                "this server requires an API key: send 'Authorization: Bearer KEY' over HTTP,"
                " or api_key= in the SDK"
            )
        principal = self._by_digest.get(_digest(key))
        if principal is None:
            raise Unauthenticated("unknown API key; check the key you were given")
        return principal

    def authorize_internal(self, principal: Principal, kind: str) -> None:
        """Node-to-node operations need an admin key without namespace limits (the key the
        nodes of a cluster share)."""
        if principal.role < Role.ADMIN or principal.namespaces is not None:
            raise PermissionDenied(
                f"{kind} is a node-to-node operation: it needs an admin key without namespace"
                f" limits; key {principal.name!r} is not one"
            )

    def authorize(
        self,
        principal: Principal,
        kind: str,
        op: Operation,
        namespaces: Iterable[tuple[str, ...] | None],
    ) -> None:
        """PermissionDenied unless ``principal`` may run ``kind`` touching ``namespaces``.

        ``namespaces`` are the exact namespaces a write or read touches, or the prefix a scoped
        operation covers (None: the whole collection).
        """
        needed = Role.ADMIN if op.admin else Role.WRITE if op.write else Role.READ
        if principal.role < needed:
            raise PermissionDenied(
                f"{kind} needs the {needed.name.lower()} role; key {principal.name!r} has"
                f" {principal.role.name.lower()}"
            )
        allowed = principal.namespaces
        if allowed is None:
            return
        for ns in namespaces:
            if ns is None:
                raise PermissionDenied(
                    f"key {principal.name!r} is limited to namespaces {list(allowed)}: pass a"
                    f" namespace inside one of them to {kind}"
                )
            if not any(ns[: len(prefix)] == prefix for prefix in allowed):
                raise PermissionDenied(
                    f"key {principal.name!r} may not {kind} in namespace {list(ns)}; it is"
                    f" limited to {[list(p) for p in allowed]}"
                )
