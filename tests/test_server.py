"""The server as a process: restart, kill -9, concurrency, start-up errors, auth and TLS.

Every test talks to a real ``memcluster serve`` child over loopback sockets.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import trustme

import memcluster
from memcluster import Memory
from server_util import ServerProcess

DIM = 8


def _vector(rng: random.Random) -> list[float]:
    return [rng.uniform(-1, 1) for _ in range(DIM)]


@pytest.mark.parametrize("scheme", ["http", "mc"])
def test_restart_keeps_every_acknowledged_write(tmp_path: Path, scheme: str) -> None:
    server = ServerProcess(tmp_path / "data")
    url = server.http_url if scheme == "http" else server.mc_url
    rng = random.Random(1)
    with memcluster.connect(url) as db:
        coll = db.create_collection("m", dim=DIM, shards=2)
        for i in range(50):
            coll.put(("a",), f"k{i}", text=f"t{i}", vector=_vector(rng), metadata={"i": i})
        coll.put_many(
            [Memory(namespace=("b",), key=f"b{i}", vector=_vector(rng)) for i in range(200)]
        )
        coll.delete(("a",), "k0")
    assert server.stop() == 0
    server = ServerProcess(tmp_path / "data")
    try:
        url = server.http_url if scheme == "http" else server.mc_url
        with memcluster.connect(url) as db:
            coll = db.collection("m")
            assert coll.count() == 249
            got = coll.get(("a",), "k7")
            assert got is not None
            assert (got.text, got.metadata) == ("t7", {"i": 7})
            assert coll.get(("a",), "k0") is None
    finally:
        server.stop()


_LOAD = """
import sys, memcluster
from memcluster import Memory
url, worker = sys.argv[1], int(sys.argv[2])
with memcluster.connect(url, retries=0) as db:
    coll = db.collection("m")
    i = 0
    while True:
        if i % 2:
            coll.put(("w", str(worker)), f"k{i}", vector=[1.0, float(i)] + [0.0] * 6)
        else:
            coll.put_many([Memory(namespace=("w", str(worker)), key=f"k{i}.{j}",
                                  vector=[float(j), 1.0] + [0.0] * 6) for j in range(5)])
        print(f"acked {i}", flush=True)
        i += 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["http", "mc"])
def test_kill_9_during_a_write_load_loses_no_acknowledged_write(
    tmp_path: Path, scheme: str
) -> None:
    """Goal: an acknowledged write survives SIGKILL of the server.

    Method: four client processes write as fast as they can and print each acknowledged
    write; the server gets SIGKILL mid-load; after a restart every acknowledged key is there.
    """
    server = ServerProcess(tmp_path / "data")
    url = server.http_url if scheme == "http" else server.mc_url
    with memcluster.connect(url) as db:
        db.create_collection("m", dim=DIM, shards=2)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _LOAD, url, str(w)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for w in range(4)
    ]
    outputs: list[list[str]] = [[] for _ in workers]
    readers = [
        threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True)
        for p, out in zip(workers, outputs, strict=True)
    ]
    for r in readers:
        r.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and min(len(out) for out in outputs) < 20:
        time.sleep(0.05)
    server.kill()
    acked: dict[int, int] = {}
    for w, proc in enumerate(workers):
        proc.wait(60)
        readers[w].join(60)
        assert proc.stdout is not None
        proc.stdout.close()
        lines = [line for line in outputs[w] if line.startswith("acked ")]
        acked[w] = int(lines[-1].split()[1]) if lines else -1
    assert min(acked.values()) >= 19, acked
    server = ServerProcess(tmp_path / "data")
    try:
        with memcluster.connect(server.mc_url) as db:
            coll = db.collection("m")
            for w, last in acked.items():
                for i in range(last + 1):
                    if i % 2:
                        assert coll.get(("w", str(w)), f"k{i}") is not None, (w, i)
                    else:
                        for j in range(5):
                            assert coll.get(("w", str(w)), f"k{i}.{j}") is not None, (w, i, j)
    finally:
        server.stop()


def test_many_concurrent_clients_on_both_protocols(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data")
    errors: list[BaseException] = []
    try:
        with memcluster.connect(server.mc_url) as db:
            db.create_collection("m", dim=DIM, shards=2)

        def worker(n: int) -> None:
            url = server.mc_url if n % 2 else server.http_url
            rng = random.Random(n)
            try:
                with memcluster.connect(url) as client:
                    coll = client.collection("m")
                    for i in range(25):
                        coll.put((f"w{n}",), f"k{i}", vector=_vector(rng))
                        hits = coll.search(_vector(rng), k=3, namespace=(f"w{n}",))
                        assert 1 <= len(hits) <= 3
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with memcluster.connect(server.http_url) as db:
            assert db.collection("m").count() == 16 * 25
    finally:
        server.stop()


def test_a_second_server_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data")
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "memcluster.cli.main",
                "serve",
                "--data",
                str(tmp_path / "data"),
                "--http-port",
                "0",
                "--peer-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert "in use by another process" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        server.stop()


def test_a_port_in_use_is_a_clear_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "memcluster.cli.main",
                "serve",
                "--data",
                str(tmp_path / "d"),
                "--http-port",
                str(port),
                "--peer-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert "--http-port" in result.stderr


def test_sigterm_finishes_in_flight_requests_and_exits_cleanly(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data")
    rng = random.Random(3)
    results: list[object] = []
    with memcluster.connect(server.mc_url) as db:
        coll = db.create_collection("m", dim=DIM)
        big = [Memory(namespace=("a",), key=f"k{i}", vector=_vector(rng)) for i in range(5000)]

        def write() -> None:
            try:
                results.append(coll.put_many(big))
            except BaseException as exc:
                results.append(exc)

        t = threading.Thread(target=write)
        t.start()
        time.sleep(0.3)  # the batch has reached the server (it may already be acknowledged)
        assert server.stop() == 0
        t.join()
    assert isinstance(results[0], list), results
    server = ServerProcess(tmp_path / "data")
    try:
        with memcluster.connect(server.http_url) as db:
            assert db.collection("m").count() == 5000
    finally:
        server.stop()


def _keys_file(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "keys": [
                    {"name": "ops", "key": "admin-key-0123456789", "role": "admin"},
                    {
                        "name": "agent",
                        "key": "agent-key-0123456789",
                        "role": "write",
                        "namespaces": [["team-a"]],
                    },
                    {"name": "viewer", "key": "viewer-key-0123456789", "role": "read"},
                ]
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> object:
    tmp = tmp_path_factory.mktemp("auth")
    server = ServerProcess(tmp / "data", "--api-keys", str(_keys_file(tmp / "keys.json")))
    yield server
    server.stop()


@pytest.mark.parametrize("scheme", ["http", "mc"])
def test_api_keys_allow_and_deny_by_role_and_namespace(secured: ServerProcess, scheme: str) -> None:
    url = secured.http_url if scheme == "http" else secured.mc_url
    name = f"auth-{scheme}"
    with pytest.raises(memcluster.Unauthenticated), memcluster.connect(url) as anonymous:
        anonymous.list_collections()
    with (
        pytest.raises(memcluster.Unauthenticated),
        memcluster.connect(url, api_key="wrong-key-0123456789") as wrong,
    ):
        wrong.list_collections()
    with memcluster.connect(url, api_key="admin-key-0123456789") as admin:
        admin.create_collection(name, dim=DIM)
    with memcluster.connect(url, api_key="agent-key-0123456789") as agent:
        coll = agent.collection(name)
        assert coll.put(("team-a", "x"), "k", vector=[1.0] * DIM) == 1
        with pytest.raises(memcluster.PermissionDenied, match="team-a"):
            coll.put(("team-b",), "k", vector=[1.0] * DIM)
        with pytest.raises(memcluster.PermissionDenied, match="namespace"):
            coll.search([1.0] * DIM)
        assert len(coll.search([1.0] * DIM, namespace=("team-a",))) == 1
        with pytest.raises(memcluster.PermissionDenied, match="admin"):
            agent.drop_collection(name)
    with memcluster.connect(url, api_key="viewer-key-0123456789") as viewer:
        coll = viewer.collection(name)
        assert coll.count() == 1
        with pytest.raises(memcluster.PermissionDenied, match="write"):
            coll.put(("team-a",), "k2", vector=[1.0] * DIM)
    # Health needs no key (probes).
    assert httpx.get(secured.http_url + "/v1/health").status_code == 200


def test_http_status_codes_for_auth(secured: ServerProcess) -> None:
    url = secured.http_url + "/v1/collections"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"x-api-key": "viewer-key-0123456789"}).status_code == 200
    denied = httpx.post(
        url,
        headers={"authorization": "Bearer viewer-key-0123456789"},
        json={"name": "x", "dim": 4},
    )
    assert denied.status_code == 403
    assert denied.json()["code"] == "permission_denied"


def test_tls_serves_both_protocols(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path, ca_path = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    server = ServerProcess(
        tmp_path / "data", "--tls-cert", str(cert_path), "--tls-key", str(key_path)
    )
    try:
        assert server.http_url.startswith("https://")
        assert server.mc_url.startswith("mcs://")
        for url in (server.http_url, server.mc_url):
            with memcluster.connect(url, verify=str(ca_path)) as db:
                assert db.health().status == "ok"
        with (
            pytest.raises(memcluster.Unreachable),
            memcluster.connect(server.http_url, retries=0) as untrusted,
        ):
            untrusted.list_collections()
    finally:
        server.stop()


def test_unreachable_server_raises_unreachable_after_retries(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for url in (f"http://127.0.0.1:{port}", f"mc://127.0.0.1:{port}"):
        with memcluster.connect(url, retries=1) as db, pytest.raises(memcluster.Unreachable):
            db.list_collections()


def _serve(data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "memcluster.cli.main",
            "serve",
            "--data",
            str(data),
            "--http-port",
            "0",
            "--peer-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unreadable_data_is_a_clear_start_up_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = _serve(not_a_dir)
    assert result.returncode == 2
    assert "is a file" in result.stderr
    assert "Traceback" not in result.stderr

    server = ServerProcess(tmp_path / "data")
    with memcluster.connect(server.mc_url) as db:
        coll = db.create_collection("m", dim=DIM)
        for i in range(20):
            coll.put(("a",), f"k{i}", text="x" * 100, vector=[1.0] * DIM)
    server.stop()
    segment = next((tmp_path / "data" / "collections" / "m").glob("shard-0000/wal/*.wal"))
    raw = bytearray(segment.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    segment.write_bytes(bytes(raw))
    result = _serve(tmp_path / "data")
    assert result.returncode == 2
    assert "crc mismatch" in result.stderr
    assert "Traceback" not in result.stderr
