"""The SDK's own rules, without a server: URL parsing and which errors it retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

import memcluster
from memcluster.core import api


class _ScriptedTransport:
    """Raises the scripted errors in order, then answers; counts calls."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.calls = 0

    async def call(
        self,
        kind: str,
        collection: str | None,
        body: msgspec.Struct,
        reply: Any,
        timeout_s: float | None = None,
    ) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return api.CollectionList(["m"])

    def stream(
        self, kind: str, collection: str | None, body: msgspec.Struct, item: Any
    ) -> AsyncIterator[Any]:
        raise AssertionError("no streams in these tests")

    async def close(self) -> None:
        pass


def _client(
    errors: list[Exception], retries: int = 3
) -> tuple[memcluster.AsyncClient, _ScriptedTransport]:
    client = memcluster.AsyncClient("mc://127.0.0.1:1", retries=retries, retry_backoff_s=0.001)
    transport = _ScriptedTransport(errors)
    client._transport = transport
    return client, transport


@pytest.mark.parametrize(
    "error",
    [
        memcluster.Unreachable("down"),
        memcluster.Timeout("slow"),
        memcluster.Overloaded("busy"),
        memcluster.ShardUnavailable("moving"),
    ],
)
def test_retryable_errors_are_retried_until_success(error: Exception) -> None:
    client, transport = _client([error, error])
    assert asyncio.run(client.list_collections()) == ["m"]
    assert transport.calls == 3


def test_retries_stop_at_the_limit_and_raise_the_last_error() -> None:
    client, transport = _client([memcluster.Unreachable(str(i)) for i in range(10)], retries=2)
    with pytest.raises(memcluster.Unreachable, match="2"):
        asyncio.run(client.list_collections())
    assert transport.calls == 3


@pytest.mark.parametrize(
    "error",
    [
        memcluster.InvalidArgument("bad"),
        memcluster.VersionConflict("vc", expected=1, actual=2),
        memcluster.PermissionDenied("no"),
        memcluster.CorruptionError("crc"),
    ],
)
def test_other_errors_are_never_retried(error: Exception) -> None:
    client, transport = _client([error])
    with pytest.raises(type(error)):
        asyncio.run(client.list_collections())
    assert transport.calls == 1


def test_acquires_and_increments_are_never_retried() -> None:
    """Resending them after a lost reply could take a second lock or count twice."""
    client, transport = _client([memcluster.Unreachable("lost")])
    with pytest.raises(memcluster.Unreachable):
        asyncio.run(client.incr("k"))
    assert transport.calls == 1
    client, transport = _client([memcluster.Timeout("slow")])
    with pytest.raises(memcluster.Timeout):
        asyncio.run(client.acquire_lock("l"))
    assert transport.calls == 1


@pytest.mark.parametrize("url", ["127.0.0.1:7700", "ftp://x:1", "http://", "mc:///x"])
def test_urls_that_are_not_memcluster_addresses_are_rejected(url: str) -> None:
    with pytest.raises(memcluster.InvalidArgument, match="http://HOST:7700"):
        memcluster.AsyncClient(url)


def test_error_codes_round_trip_to_the_same_classes() -> None:
    from memcluster.core.errors import ERROR_TABLE, error_details, error_from_wire

    for cls in ERROR_TABLE:
        if cls in (memcluster.VersionConflict, memcluster.DimensionMismatch):
            exc: memcluster.MemclusterError = cls("m", expected=1, actual=2)
        elif cls is memcluster.NotLeader:
            exc = memcluster.NotLeader("m", leader_hint="node-2")
        else:
            exc = cls("m")
        back = error_from_wire(exc.code, str(exc), error_details(exc))
        assert type(back) is cls
        assert error_details(back) == error_details(exc)
