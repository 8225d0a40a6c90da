"""The HTTP API's edges: every bad request gets its 4xx and a coded error body, nothing is
half-written, and the OpenAPI document describes the routes.

Raw HTTP (httpx) against a real server process, so what is checked is what a client in any
language sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server_util import ServerProcess

BODY_MAX = 256 << 10


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("http") / "data", "--request-bytes-max", str(BODY_MAX)
    )
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        r = client.post("/v1/collections", json={"name": "m", "dim": 3})
        assert r.status_code == 201, r.text
        yield client


def _count(http: httpx.Client) -> int:
    r = http.post("/v1/collections/m/memories/count", json={})
    assert r.status_code == 200, r.text
    count: int = r.json()["count"]
    return count


MEMORY = {"namespace": ["a"], "key": "k", "vector": [1, 2, 3]}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "says"),
    [
        ("POST", "/v1/collections/m/memories", b'{"memories": [', 400, "invalid_argument", "JSON"),
        ("POST", "/v1/collections/m/memories", b"not json", 400, "invalid_argument", "JSON"),
        (
            "POST",
            "/v1/collections/m/memories",
            {"memories": "x"},
            400,
            "invalid_argument",
            "memories",
        ),
        (
            "POST",
            "/v1/collections/m/memories",
            {"memories": [{**MEMORY, "key": 5}]},
            400,
            "invalid_argument",
            "key",
        ),
        (
            "POST",
            "/v1/collections/m/memories",
            {"memories": [{**MEMORY, "colour": "red"}]},
            400,
            "invalid_argument",
            "colour",
        ),
        (
            "POST",
            "/v1/collections/m/memories",
            {"memories": [{**MEMORY, "vector": [1, 2]}]},
            400,
            "dimension_mismatch",
            "3",
        ),
        (
            "POST",
            "/v1/collections/m/memories",
            {"memories": [{**MEMORY, "vector": [1, None, 3]}]},
            400,
            "invalid_vector",
            "vector",
        ),
        (
            "POST",
            "/v1/collections/m/memories",
            b'{"memories": [{"namespace": ["a"], "key": "k", "vector": [NaN, 1, 2]}]}',
            400,
            "invalid_argument",
            "JSON",
        ),
        (
            "POST",
            "/v1/collections/m/memories",
            {"memories": [{**MEMORY, "vector": [1e39, 0, 0]}]},
            400,
            "invalid_vector",
            "vector",
        ),
        (
            "POST",
            "/v1/collections/m/memories",
            {"memories": [MEMORY, {**MEMORY, "key": "k2", "metadata": {"a": {"$x": 1}}}]},
            400,
            "invalid_metadata",
            "metadata",
        ),
        (
            "POST",
            "/v1/collections/m/memories",
            {"memories": [MEMORY, {**MEMORY, "key": "k2", "vector": "abc"}]},
            400,
            "invalid_vector",
            "vector",
        ),
        (
            "POST",
            "/v1/collections/m/memories",
            {"memories": [{**MEMORY, "key": f"k{i}"} for i in range(10_001)]},
            413,
            "payload_too_large",
            "",
        ),
        (
            "POST",
            "/v1/collections/m/memories",
            {"memories": [{**MEMORY, "text": "x" * (BODY_MAX + 1)}]},
            413,
            "payload_too_large",
            "too large",
        ),
        (
            "POST",
            "/v1/collections/nope/memories",
            {"memories": [MEMORY]},
            404,
            "collection_not_found",
            "nope",
        ),
        ("POST", "/v1/collections/m/search", {"vector": [1, 0]}, 400, "dimension_mismatch", ""),
        (
            "POST",
            "/v1/collections/m/search",
            {"vector": [1, 0, 0], "k": "ten"},
            400,
            "invalid_argument",
            "k",
        ),
        (
            "POST",
            "/v1/collections/m/search",
            {"vector": [1, 0, 0], "filter": {"a": {"$bogus": 1}}},
            400,
            "invalid_filter",
            "$bogus",
        ),
        (
            "POST",
            "/v1/collections/m/search",
            {"vector": [1, 0, 0], "consistency": "maybe"},
            400,
            "invalid_argument",
            "consistency",
        ),
        (
            "POST",
            "/v1/collections/m/memories/list",
            {"cursor": "zzz"},
            400,
            "invalid_argument",
            "cursor",
        ),
        (
            "POST",
            "/v1/collections",
            {"name": "bad name", "dim": 3},
            400,
            "invalid_name",
            "collection name",
        ),
        ("POST", "/v1/collections", {"name": "x", "dim": -1}, 400, "invalid_argument", "dim"),
        ("POST", "/v1/collections", {"name": "m", "dim": 3}, 409, "collection_exists", "m"),
        ("GET", "/v1/collections/nope", None, 404, "collection_not_found", "nope"),
        ("DELETE", "/v1/collections/nope", None, 404, "collection_not_found", "nope"),
        ("GET", "/v1/nothing-here", None, 404, "not_found", "/docs"),
        ("PATCH", "/v1/collections/m", None, 405, "method_not_allowed", "PATCH"),
    ],
)
def test_bad_requests_get_a_coded_4xx_and_write_nothing(
    http: httpx.Client, method: str, path: str, body: Any, status: int, code: str, says: str
) -> None:
    before = _count(http)
    if isinstance(body, bytes):
        r = http.request(method, path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.request(method, path, json=body)
    assert r.status_code == status, r.text
    error = r.json()
    assert error["code"] == code, error
    assert says in error["message"], error
    assert _count(http) == before


def test_version_conflict_body_carries_expected_and_actual(http: httpx.Client) -> None:
    path = "/v1/collections/m/memories"
    assert http.post(path, json={"memories": [{**MEMORY, "key": "vc"}]}).status_code == 200
    r = http.post(path, json={"memories": [{**MEMORY, "key": "vc", "if_version": 0}]})
    assert r.status_code == 409
    assert r.json()["details"] == {"expected": 0, "actual": 1}


def test_a_whole_round_of_json_calls(http: httpx.Client) -> None:
    r = http.post(
        "/v1/collections/m/memories",
        json={
            "memories": [
                {
                    "namespace": ["t", "x"],
                    "key": "one",
                    "text": "first",
                    "vector": [1, 0, 0],
                    "metadata": {"kind": "a"},
                },
                {"namespace": ["t", "y"], "key": "two", "vector": [0, 1, 0], "ttl_s": 60},
            ],
            "idempotency_key": "round-1",
        },
    )
    assert r.status_code == 200, r.text
    versions = r.json()["versions"]
    assert len(versions) == 2
    assert versions[1] > versions[0] > 0
    r = http.post("/v1/collections/m/memories/get", json={"namespace": ["t", "x"], "key": "one"})
    memory = r.json()["memory"]
    assert (memory["text"], memory["metadata"], memory["vector"]) == (
        "first",
        {"kind": "a"},
        [1.0, 0.0, 0.0],
    )
    r = http.post(
        "/v1/collections/m/search", json={"vector": [1, 0.1, 0], "k": 1, "namespace": ["t"]}
    )
    assert [h["memory"]["key"] for h in r.json()["hits"]] == ["one"]
    r = http.post("/v1/collections/m/memories/count", json={"filter": {"kind": "a"}})
    assert r.json() == {"count": 1}
    r = http.post("/v1/collections/m/memories/list", json={"namespace": ["t"], "limit": 1})
    page = r.json()
    assert [m["key"] for m in page["items"]] == ["one"]
    assert page["next_cursor"]
    r = http.post("/v1/collections/m/memories/delete", json={"namespace": ["t", "y"], "key": "two"})
    assert r.json() == {"deleted": True}
    r = http.post("/v1/collections/m/memories/get", json={"namespace": ["t", "y"], "key": "two"})
    assert r.json() == {"memory": None}
    r = http.get("/v1/collections/m")
    assert r.json()["config"]["dim"] == 3


def test_health_readiness_and_openapi(http: httpx.Client) -> None:
    health = http.get("/v1/health").json()
    assert health["status"] == "ok"
    assert health["ready"] is True
    assert http.get("/v1/ready").status_code == 200
    doc = http.get("/openapi.json").json()
    paths = doc["paths"]
    for route in (
        "/v1/collections",
        "/v1/collections/{collection}/search",
        "/v1/collections/{collection}/memories",
    ):
        assert route in paths, sorted(paths)
    assert "SearchBody" in str(doc["components"])
    assert http.get("/docs").status_code == 200
