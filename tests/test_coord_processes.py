"""Coordination between real processes through a real server: the issue's acceptance tests.

Each worker is a Python process of its own (``subprocess.Popen([sys.executable, "-c",
SCRIPT, ...])``) that uses the sync SDK; workers alternate between the server's HTTP and
binary URLs. Workers report what they did on stdout, one line per event, and the test merges
those lines into one history and checks it. Only processes these tests started are
signalled, always by PID: workers through ``Popen``, servers through ``ServerProcess``.
The state machine behind all this is tested deterministically in ``test_coord_state.py``.
"""

from __future__ import annotations

import itertools
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import memcluster
from server_util import ServerProcess


class Workers:
    """The worker processes of one test; any still running at the end are killed by PID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, script: str, *args: object, stdin: bool = False) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[str], timeout_s: float = 90.0) -> list[str]:
        """The lines ``proc`` printed, once it has exited 0 (AssertionError otherwise)."""
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(
                f"worker {proc.pid} still ran after {timeout_s} s; stderr: {err[-2000:]}"
            ) from None
        assert proc.returncode == 0, f"worker {proc.pid} exited {proc.returncode}: {err[-3000:]}"
        return out.splitlines()

    def output_after_kill(self, proc: subprocess.Popen[str], timeout_s: float = 30.0) -> list[str]:
        """The lines ``proc`` printed, whatever its exit status (its server was killed)."""
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return out.splitlines()

    def outputs(self, timeout_s: float = 90.0) -> list[list[str]]:
        deadline = time.monotonic() + timeout_s
        return [self.output(p, max(1.0, deadline - time.monotonic())) for p in self.procs]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # SIGKILL to this child's PID; it also ends a SIGSTOPped child
            proc.wait(30)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()


@pytest.fixture
def workers() -> Iterator[Workers]:
    group = Workers()
    try:
        yield group
    finally:
        group.stop_all()


def url_for(server: ServerProcess, worker: int) -> str:
    """Even workers speak HTTP, odd ones the binary protocol."""
    return server.http_url if worker % 2 == 0 else server.mc_url


def wait_for_output(proc: subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    """Return once ``proc`` has printed something, without reading it."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, f"worker {proc.pid} printed nothing within {timeout_s} s"


def first_line(proc: subprocess.Popen[str]) -> str:
    """The first line ``proc`` prints. Only for a worker that then waits (on stdin): the
    read may buffer more than one line, which ``communicate()`` would not see."""
    wait_for_output(proc)
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


# -- 1. fenced read-modify-write under a contended lock -----------------------------------------

APPEND = r"""
import sys
import memcluster

url, worker, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with memcluster.connect(url) as client:
    coll = client.collection("fenced_list")
    for r in range(rounds):
        entry = f"w{worker}-{r}"
        token = client.acquire_lock("list", ttl_s=5, timeout_s=60)
        got = coll.get(("shared",), "list")
        entries = [] if got is None else list(got.metadata["entries"])
        entries.append(entry)
        coll.put(
            ("shared",), "list", vector=[1.0, 0.0], metadata={"entries": entries},
            fence=("list", token),
        )
        client.release_lock("list", token)
        print(token, entry, flush=True)
"""


def test_fenced_appends_under_a_contended_lock_lose_nothing_and_never_interleave(
    server: ServerProcess, workers: Workers
) -> None:
    """Goal: a lock plus fenced writes make a read-modify-write safe across processes.
    Method: 6 processes each append 15 entries to one list stored in a memory's metadata,
    each append read-modify-written under lock "list" with a fenced put. A lost update would
    drop an entry, a doubled one would repeat it; each worker's entries must keep its order,
    and the fencing tokens, in list order, must strictly increase."""
    n_workers, rounds = 6, 15
    with memcluster.connect(server.http_url) as client:
        coll = client.create_collection("fenced_list", dim=2)
        coll.put(("shared",), "list", vector=[1.0, 0.0], metadata={"entries": []})
        for w in range(n_workers):
            workers.start(APPEND, url_for(server, w), w, rounds)
        token_of: dict[str, int] = {}
        for lines in workers.outputs():
            assert len(lines) == rounds
            for line in lines:
                token, entry = line.split()
                token_of[entry] = int(token)
        stored = coll.get(("shared",), "list")
    assert stored is not None
    entries: list[str] = stored.metadata["entries"]
    expected = {f"w{w}-{r}" for w in range(n_workers) for r in range(rounds)}
    assert len(entries) == n_workers * rounds
    assert len(set(entries)) == len(entries), "an entry was appended twice"
    assert set(entries) == expected, f"missing: {sorted(expected - set(entries))}"
    for w in range(n_workers):
        assert [e for e in entries if e.startswith(f"w{w}-")] == [
            f"w{w}-{r}" for r in range(rounds)
        ]
    tokens = [token_of[e] for e in entries]
    assert all(a < b for a, b in itertools.pairwise(tokens)), tokens


# -- 2. a paused holder ----------------------------------------------------------------------

PAUSED = r"""
import sys
import memcluster

with memcluster.connect(sys.argv[1]) as client:
    coll = client.collection("paused")
    token = client.acquire_lock("paused", ttl_s=1, timeout_s=10)
    coll.put(("shared",), "value", text="A", vector=[1.0, 0.0], fence=("paused", token))
    print("token", token, flush=True)
    sys.stdin.readline()  # paused (SIGSTOP) here; the test's "go" is read after SIGCONT
    try:
        coll.put(
            ("shared",), "value", text="A after waking", vector=[1.0, 0.0],
            fence=("paused", token),
        )
    except memcluster.StaleToken as exc:
        print("write: stale:", exc, flush=True)
    else:
        print("write: accepted", flush=True)
    try:
        client.release_lock("paused", token)
    except memcluster.StaleToken:
        print("release: stale", flush=True)
    else:
        print("release: accepted", flush=True)
"""


def test_a_holder_paused_past_its_ttl_cannot_write_after_waking(
    server: ServerProcess, workers: Workers
) -> None:
    """Goal: the fencing token stops a holder that stalled (GC pause, SIGSTOP) past its TTL
    from overwriting the work of the holder that came next. Method: worker A takes the lock
    with a 1 s TTL and writes; the test SIGSTOPs it, waits 2 s, takes the lock itself over the
    other protocol and writes; then SIGCONTs A, whose fenced write must raise StaleToken.
    A blocks on stdin before its second write and the test sends "go" after SIGSTOP, so A
    cannot write before it was paused."""
    with memcluster.connect(server.mc_url) as b:
        coll = b.create_collection("paused", dim=2)
        a = workers.start(PAUSED, server.http_url, stdin=True)
        kind, token_a = first_line(a).split()
        assert kind == "token"
        os.kill(a.pid, signal.SIGSTOP)
        assert a.stdin is not None
        a.stdin.write("go\n")
        a.stdin.flush()
        time.sleep(2)
        token_b = b.acquire_lock("paused", ttl_s=30, timeout_s=10)
        assert token_b > int(token_a)
        coll.put(("shared",), "value", text="B", vector=[1.0, 0.0], fence=("paused", token_b))
        os.kill(a.pid, signal.SIGCONT)
        outcome = workers.output(a, timeout_s=30)
        assert outcome[0].startswith("write: stale:"), outcome
        assert token_a in outcome[0], "the error names the stale token"
        assert outcome[1] == "release: stale"
        stored = coll.get(("shared",), "value")
        assert stored is not None
        assert stored.text == "B"
        b.release_lock("paused", token_b)


# -- 3. semaphore ---------------------------------------------------------------------------

SEMAPHORE = r"""
import random
import sys
import time
import memcluster

url, worker, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed * 100 + worker)
with memcluster.connect(url) as client:
    for _ in range(rounds):
        token = client.acquire_semaphore("slots", permits=3, ttl_s=30, timeout_s=60)
        print("acquire", time.monotonic_ns(), token, flush=True)
        time.sleep(rng.uniform(0, 0.02))
        print("release", time.monotonic_ns(), token, flush=True)
        client.release_semaphore("slots", token)
"""


def test_a_semaphore_never_has_more_than_n_holders(
    server: ServerProcess, workers: Workers, seed: int
) -> None:
    """Goal: a semaphore of 3 permits never has 4 holders, across 8 processes.
    Method: each worker logs ``acquire <t> <token>`` right after acquire_semaphore returns and
    ``release <t> <token>`` right before it calls release_semaphore, with time.monotonic_ns
    (CLOCK_MONOTONIC: one clock for every process on the machine). So each logged interval
    lies inside the interval in which the server really counted that permit as held, and if
    more than 3 logged intervals overlap, more than 3 permits were really held at once: the
    check raises no false alarm. Sweeping the merged events in time order (an acquire before
    a release at the same nanosecond, the stricter reading, still sound since both
    permits were held at that instant) counts the holders at every moment. The seed drives
    the workers' sleeps."""
    n_workers, rounds, permits = 8, 10, 3
    for w in range(n_workers):
        workers.start(SEMAPHORE, url_for(server, w), w, rounds, seed)
    events: list[tuple[int, int, int]] = []
    for lines in workers.outputs():
        assert len(lines) == 2 * rounds
        for line in lines:
            what, t_ns, permit = line.split()
            events.append((int(t_ns), 0 if what == "acquire" else 1, int(permit)))
    tokens = [token for _, kind, token in events if kind == 0]
    assert len(set(tokens)) == n_workers * rounds, "every acquire got a token of its own"
    held: set[int] = set()
    most = 0
    for t, kind, token in sorted(events):
        if kind == 0:
            held.add(token)
            assert len(held) <= permits, f"{len(held)} permits held at t={t}: {sorted(held)}"
            most = max(most, len(held))
        else:
            held.remove(token)
    assert not held
    print(f"most permits held at once (as logged): {most}")
    assert most >= 2, "the workers never overlapped: the test checked nothing"


# -- 4. counters ----------------------------------------------------------------------------

COUNTER = r"""
import sys
import memcluster

url, n = sys.argv[1], int(sys.argv[2])
with memcluster.connect(url) as client:
    values = [client.incr("hits", 1 if i % 2 == 0 else 3) for i in range(n)]
print(*values, flush=True)
"""


@pytest.mark.slow
def test_concurrent_increments_from_many_processes_sum_exactly(
    tmp_path: Path, workers: Workers
) -> None:
    """Goal: increments from many processes are atomic and durable. Method: 8 processes
    each add +1 and +3 alternately, 200 times; every increment returns the value it made,
    so with positive deltas the returned values must all differ and the largest be the sum.
    The sum must survive a graceful restart."""
    n_workers, n = 8, 200
    expected = n_workers * (n // 2) * (1 + 3)
    server = ServerProcess(tmp_path / "data")
    try:
        for w in range(n_workers):
            workers.start(COUNTER, url_for(server, w), n)
        returned = [int(v) for lines in workers.outputs() for v in lines[0].split()]
        assert len(returned) == n_workers * n
        assert len(set(returned)) == len(returned), "two increments returned the same value"
        assert max(returned) == expected
        with memcluster.connect(server.mc_url) as client:
            assert client.counter("hits") == expected
    finally:
        assert server.stop() == 0
    server = ServerProcess(tmp_path / "data")
    try:
        with memcluster.connect(server.http_url) as client:
            assert client.counter("hits") == expected
    finally:
        assert server.stop() == 0


# -- 5. tokens across a kill -9 ------------------------------------------------------------------

CHURN = r"""
import sys
import memcluster

with memcluster.connect(sys.argv[1], retries=0) as client:
    while True:
        token = client.acquire_lock("churn", ttl_s=2, timeout_s=10)
        print(token, flush=True)
        client.release_lock("churn", token)
"""


def test_tokens_never_go_backwards_across_a_kill_9(
    tmp_path: Path, workers: Workers, seed: int
) -> None:
    """Goal: fencing tokens only grow, even when the server dies without shutting down.
    Method: the test acquires and releases a lock a few times and keeps a second lock held,
    while a worker acquires and releases a third one as fast as it can and prints each token
    it got; the server is SIGKILLed at a seeded moment and restarted on the same data. The
    next token must exceed every token handed out before, and the lock held at the kill
    must still be held by its token (a token handed out is durable)."""
    rng = random.Random(seed)
    server = ServerProcess(tmp_path / "data")
    try:
        with memcluster.connect(server.mc_url) as client:
            before = []
            for _ in range(5):
                token = client.acquire_lock("deploy", ttl_s=30, timeout_s=5)
                before.append(token)
                client.release_lock("deploy", token)
            held = client.acquire_lock("held", ttl_s=120, timeout_s=5)
            before.append(held)
            churn = workers.start(CHURN, server.http_url)
            wait_for_output(churn)
            time.sleep(rng.uniform(0.05, 0.5))
            server.kill()
        churned = [int(line) for line in workers.output_after_kill(churn)]
    finally:
        server.kill()
    assert churned, "the worker got no token before the kill"
    for tokens in (before, churned):
        assert all(a < b for a, b in itertools.pairwise(tokens)), tokens
    handed_out = [*before, *churned]
    server = ServerProcess(tmp_path / "data")
    try:
        with memcluster.connect(server.http_url) as client:
            after = client.acquire_lock("deploy", ttl_s=30, timeout_s=5)
            assert after > max(handed_out), (after, max(handed_out))
            with pytest.raises(memcluster.Timeout):
                client.acquire_lock("held", ttl_s=30, timeout_s=0)
            client.release_lock("held", held)
            client.release_lock("deploy", after)
            # The worker may have held "churn" at the kill (or been granted it as the server
            # died): that grant is durable too, and ends with its 2 s lease.
            assert client.acquire_lock("churn", ttl_s=30, timeout_s=10) > after
    finally:
        assert server.stop() == 0
