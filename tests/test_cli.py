"""The client commands (``status``, ``collections``, ``put``, ``get``, ``search``, ``import``)
against one real ``memcluster serve`` child, run in-process with click's CliRunner.

Each test works in its own collection, so the tests share the server but not their data.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

import memcluster
from memcluster.cli.main import main
from server_util import ServerProcess

DIM = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("cli") / "data", "--durability", "none")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(params=["http", "mc"])
def url(request: pytest.FixtureRequest, server: ServerProcess) -> str:
    """The server's address on each protocol."""
    return server.http_url if request.param == "http" else server.mc_url


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    """``memcluster ARGS...`` in this process; wide tables so that cells are not wrapped."""
    environment: dict[str, str | None] = {
        "COLUMNS": "200",
        "MEMCLUSTER_URL": None,
        "MEMCLUSTER_API_KEY": None,
    }
    environment.update(env or {})
    return CliRunner().invoke(main, list(args), input=input, env=environment)


def ok(*args: str, input: str | None = None) -> Result:
    result = run(*args, input=input)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def ok_json(*args: str) -> Any:
    return json.loads(ok(*args, "--json").stdout)


def create(url: str, name: str, dim: int = DIM) -> None:
    ok("collections", "create", name, "--dim", str(dim), "--url", url)


def vector(i: int) -> list[float]:
    return [1.0, float(i % 7), float(i % 3), 0.5]


COMMANDS = [
    ("status",),
    ("collections",),
    ("collections", "create"),
    ("collections", "drop"),
    ("put",),
    ("get",),
    ("search",),
    ("import",),
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_of_every_command_explains_it_with_an_example(command: tuple[str, ...]) -> None:
    out = ok(*command, "--help").stdout
    assert "Example" in out
    assert "--url" in out
    assert "--json" in out


def test_status_shows_health_and_every_collection(server: ServerProcess) -> None:
    create(server.http_url, "status-a")
    ok("put", "status-a", "ns", "k", "--vector", "[1, 2, 3, 4]", "--url", server.http_url)

    out = ok("status", "--url", server.http_url).stdout
    assert "ok, ready" in out
    assert "status-a" in out
    for column in ("dim", "metric", "shards", "items", "bytes", "indexed"):
        assert column in out

    doc = ok_json("status", "--url", server.mc_url)
    assert doc["health"]["status"] == "ok"
    assert doc["health"]["ready"] is True
    (info,) = [c for c in doc["collections"] if c["config"]["name"] == "status-a"]
    assert info["config"]["dim"] == DIM
    assert info["stats"]["items"] == 1


@pytest.mark.parametrize("scheme", ["http", "mc"])
def test_status_of_a_server_nobody_runs_exits_1_with_a_clear_message(scheme: str) -> None:
    # A bound socket that does not listen: connections to its port are refused while it lives.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
        result = run("status", "--url", address)
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"memcluster status: cannot reach {address}: is `memcluster serve` running?"
    )
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_url_defaults_to_the_environment(server: ServerProcess) -> None:
    result = run("status", "--json", env={"MEMCLUSTER_URL": server.mc_url})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["health"]["status"] == "ok"


def test_collections_create_list_and_drop(server: ServerProcess) -> None:
    url = server.http_url
    options = "--dim 8 --metric l2 --shards 2 --ttl-s 60 --capacity-items 1000 --eviction lru"
    out = ok("collections", "create", "coll-a", *options.split(), "--url", url).stdout
    assert out == "created collection 'coll-a': dim 8, l2, 2 shard(s)\n"
    info = ok_json("collections", "create", "coll-b", "--dim", "3", "--url", url)
    assert info["config"]["name"] == "coll-b"
    assert info["stats"]["items"] == 0

    listing = ok("collections", "--url", url).stdout
    assert "coll-a" in listing
    assert "coll-b" in listing
    (a,) = [c for c in ok_json("collections", "--url", url) if c["config"]["name"] == "coll-a"]
    assert a["config"] == {
        "name": "coll-a",
        "dim": 8,
        "metric": "l2",
        "shards": 2,
        "sharding": "hash",
        "ttl_s": 60.0,
        "capacity_items": 1000,
        "capacity_bytes": None,
        "namespace_capacity_items": None,
        "eviction": "lru",
        "durability": None,
        "shard_key": "key",
        "range_field": None,
        "boundaries": None,
        "centroids": None,
        "nprobe": None,
        "range_shards": None,
        "split_items": None,
        "train_after": None,
        "replication_factor": 1,
        "replication": "leader",
        "ack": "all",
    }

    refused = run("collections", "drop", "coll-a", "--url", url, input="n\n")
    assert refused.exit_code == 1
    assert "drop collection 'coll-a'" in refused.stderr
    assert "coll-a" in ok("collections", "--url", url).stdout

    confirmed = ok("collections", "drop", "coll-a", "--url", url, input="y\n")
    assert "dropped collection 'coll-a'" in confirmed.stdout
    assert ok_json("collections", "drop", "coll-b", "--yes", "--url", url) == {"dropped": "coll-b"}
    names = [c["config"]["name"] for c in ok_json("collections", "--url", url)]
    assert "coll-a" not in names
    assert "coll-b" not in names


def test_collections_subcommand_takes_the_options_given_to_the_group(
    server: ServerProcess,
) -> None:
    info = ok_json("collections", "--url", server.mc_url, "create", "coll-group", "--dim", "2")
    assert info["config"]["dim"] == 2


def test_put_get_and_search_in_tables_and_json(url: str, tmp_path: Path) -> None:
    name = "pgs-" + url.split(":")[0]
    create(url, name)
    m1 = ["--text", "likes [bold]ramen[/bold]", "--vector", "[1, 0, 0, 0]"]
    m1 += ["--metadata", '{"speaker": "Alice"}']
    put = ok("put", name, "team-a/agent-7", "m1", *m1, "--url", url)
    assert put.stdout == "version 1\n"
    again = ok_json("put", name, "team-a/agent-7", "m1", *m1, "--if-version", "1", "--url", url)
    assert again == {"version": 2}
    ok("put", name, "team-b", "m2", "--vector", "[0, 1, 0, 0]", "--ttl-s", "3600", "--url", url)

    shown = ok("get", name, "team-a/agent-7", "m1", "--url", url).stdout
    assert "likes [bold]ramen[/bold]" in shown  # user text is not read as rich markup
    assert '{"speaker":"Alice"}' in shown
    assert "+00:00" in shown  # ISO times
    got = ok_json("get", name, "team-a/agent-7", "m1", "--url", url)
    assert got["namespace"] == ["team-a", "agent-7"]
    assert (got["key"], got["text"], got["version"]) == ("m1", "likes [bold]ramen[/bold]", 2)
    assert got["metadata"] == {"speaker": "Alice"}
    assert got["created_at"] <= got["updated_at"]
    assert "vector" not in got
    with_vector = ok_json("get", name, "team-b", "m2", "--vectors", "--url", url)
    assert with_vector["vector"] == [0.0, 1.0, 0.0, 0.0]
    assert with_vector["expires_at"] > with_vector["created_at"]

    table = ok("search", name, "--vector", "[1, 0.1, 0, 0]", "-k", "5", "--url", url).stdout
    assert table.index("m1") < table.index("m2")  # best first
    assert "team-a/agent-7" in table
    query = tmp_path / "query.json"
    query.write_text("[0, 1, 0, 0]")
    hits = ok_json("search", name, "--vector", f"@{query}", "--url", url)
    assert [h["memory"]["key"] for h in hits] == ["m2", "m1"]
    assert hits[0]["score"] == pytest.approx(1.0)
    assert "vector" not in hits[0]["memory"]
    scope = ["--namespace", "team-a", "--filter", '{"speaker": "Alice"}']
    scoped = ok_json(
        "search", name, "--vector", "[0, 1, 0, 0]", *scope, "-k", "1", "--vectors", "--url", url
    )
    assert [h["memory"]["key"] for h in scoped] == ["m1"]
    assert scoped[0]["memory"]["vector"] == [1.0, 0.0, 0.0, 0.0]
    none = ok("search", name, "--vector", "[1, 0, 0, 0]", "--namespace", "nobody", "--url", url)
    assert none.stdout == "no matches\n"


def test_get_of_a_missing_key_exits_1(server: ServerProcess) -> None:
    create(server.http_url, "missing")
    result = run("get", "missing", "team-a", "nope", "--url", server.http_url)
    assert result.exit_code == 1
    assert result.stderr == "memcluster get: not found: team-a 'nope' in collection 'missing'\n"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--vector", "[1, 2"),
        ("--vector", '{"a": 1}'),
        ("--vector", '["x"]'),
        ("--vector", "@does-not-exist.json"),
        ("--metadata", "[1, 2]"),
        ("--metadata", "{bad"),
    ],
)
def test_bad_json_option_is_a_usage_error_naming_the_option(option: str, value: str) -> None:
    result = run("put", "any", "ns", "k", option, value, "--url", "http://127.0.0.1:9")
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in result.stderr


def test_server_errors_are_one_line_on_stderr_without_traceback(server: ServerProcess) -> None:
    create(server.http_url, "errors")
    cases = [
        (("put", "nowhere", "ns", "k", "--vector", "[1, 0, 0, 0]"), "collection"),
        (("put", "errors", "ns", "k", "--vector", "[1, 0]"), "dim"),
        (("put", "errors", "ns", "k", "--vector", "[1, 0, 0, 0]", "--if-version", "3"), "version"),
        (("collections", "create", "errors", "--dim", "4"), "errors"),
        (("search", "errors", "--vector", "[1, 0, 0, 0]", "--filter", '{"$nope": 1}'), "nope"),
    ]
    for args, fragment in cases:
        result = run(*args, "--url", server.http_url)
        assert result.exit_code == 1, args
        prefix = "memcluster collections create: " if args[0] == "collections" else ""
        assert result.stderr.startswith(prefix or f"memcluster {args[0]}: "), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert fragment in result.stderr, result.stderr
        assert "Traceback" not in result.output


def write_jsonl(path: Path, n: int, *, bad_line: int | None = None) -> None:
    lines = []
    for i in range(n):
        namespace: str | list[str] = ["team-a", f"agent-{i % 3}"] if i % 2 else f"team-b/x{i % 5}"
        lines.append(
            json.dumps(
                {
                    "namespace": namespace,
                    "key": f"k{i}",
                    "text": f"memory {i}",
                    "vector": vector(i),
                    "metadata": {"i": i},
                }
            )
        )
    if bad_line is not None:
        lines[bad_line - 1] = '{"namespace": "a", "key": 5, "vector": [1, 2, 3, 4]}'
    path.write_text("\n".join(lines) + "\n")


def versions(url: str, collection: str, keys: list[int]) -> list[int]:
    with memcluster.connect(url) as client:
        coll = client.collection(collection)
        found = []
        for i in keys:
            namespace = ("team-a", f"agent-{i % 3}") if i % 2 else ("team-b", f"x{i % 5}")
            memory = coll.get(namespace, f"k{i}")
            assert memory is not None, i
            found.append(memory.version)
        return found


def count(url: str, collection: str) -> int:
    with memcluster.connect(url) as client:
        return client.collection(collection).count()


def last_seqs(url: str, collection: str) -> list[int]:
    """Per shard, the sequence number of the last write: unchanged means nothing was written."""
    with memcluster.connect(url) as client:
        return client.collection(collection).describe().stats.last_seq


def test_import_sends_batches_once_and_a_rerun_writes_nothing(
    server: ServerProcess, tmp_path: Path
) -> None:
    data = tmp_path / "memories.jsonl"
    write_jsonl(data, 1_200)
    args = ("import", str(data), "--collection", "imported", "--batch", "500")

    first = ok(*args, "--create-dim", str(DIM), "--url", server.http_url)
    assert first.stdout.startswith("imported 1,200 memories in ")
    assert first.stdout.endswith("/s)\n")
    assert count(server.http_url, "imported") == 1_200
    sample = [0, 499, 500, 999, 1_000, 1_199]
    # A version is the shard's sequence number of the write that stored the memory.
    written = versions(server.http_url, "imported", sample)
    assert written == [1, 500, 501, 1_000, 1_001, 1_200]
    seqs = last_seqs(server.http_url, "imported")

    again = ok_json(*args, "--url", server.mc_url)
    assert (again["imported"], again["batches"]) == (1_200, 3)
    assert count(server.http_url, "imported") == 1_200
    assert versions(server.http_url, "imported", sample) == written
    assert last_seqs(server.http_url, "imported") == seqs
    got = ok_json("get", "imported", "team-a/agent-1", "k7", "--url", server.http_url)
    assert (got["text"], got["metadata"]) == ("memory 7", {"i": 7})


def test_import_stops_at_a_malformed_line_and_a_fixed_rerun_skips_finished_batches(
    server: ServerProcess, tmp_path: Path
) -> None:
    data = tmp_path / "memories.jsonl"
    write_jsonl(data, 1_200, bad_line=800)
    args = ("import", str(data), "--collection", "half", "--create-dim", str(DIM))

    failed = run(*args, "--url", server.http_url)
    assert failed.exit_code == 1
    assert failed.stderr.startswith(f"memcluster import: {data}: line 800: ")
    assert "`$.key`" in failed.stderr
    assert "500 memories in 1 earlier batch(es) are written" in failed.stderr
    assert (
        "re-run the same command after fixing: finished batches are skipped by their"
        " idempotency keys"
    ) in failed.stderr
    assert count(server.http_url, "half") == 500  # the batch holding line 800 was not sent
    assert last_seqs(server.http_url, "half") == [500]  # one write per memory, none twice

    write_jsonl(data, 1_200)
    ok(*args, "--url", server.http_url)
    assert count(server.http_url, "half") == 1_200
    assert last_seqs(server.http_url, "half") == [1_200]  # the first batch was not sent again
    assert versions(server.http_url, "half", [0, 499, 500, 1_199]) == [1, 500, 501, 1_200]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("not json", "line 2: JSON is malformed"),
        ('{"namespace": "a", "key": "k", "vector": [1, 2]}', "line 2: vector has 2 numbers"),
        ('{"namespace": "a", "key": "k"}', "line 2: Object missing required field `vector`"),
        ('{"namespace": "a", "key": "k", "vector": [1, 1, 1, 1], "extra": 1}', "`extra`"),
        ('{"namespace": "a", "key": "k0", "vector": [1, 1, 1, 1]}', "line 2: a 'k0' is also"),
    ],
)
def test_import_names_the_line_of_each_kind_of_malformed_line(
    server: ServerProcess, tmp_path: Path, line: str, fragment: str
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"namespace": "a", "key": "k0", "vector": [1, 0, 0, 0]}\n' + line + "\n")
    into = ["--collection", "badlines", "--create-dim", str(DIM)]
    result = run("import", str(data), *into, "--url", server.http_url)
    assert result.exit_code == 1
    assert fragment in result.stderr
    assert "nothing was written" in result.stderr


def test_import_into_a_missing_collection_without_create_dim_fails(
    server: ServerProcess, tmp_path: Path
) -> None:
    data = tmp_path / "one.jsonl"
    write_jsonl(data, 1)
    result = run("import", str(data), "--collection", "absent", "--url", server.http_url)
    assert result.exit_code == 1
    assert "collection 'absent' does not exist" in result.stderr


def test_commands_are_registered_on_main() -> None:
    assert isinstance(main, click.Group)
    for name in ("status", "collections", "put", "get", "search", "import", "serve"):
        assert name in main.commands
