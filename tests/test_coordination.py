"""Leases, locks with fencing tokens, semaphores and counters, on all three clients.

The ``store`` fixture runs each test embedded, over HTTP and over the binary protocol against a
real server process. TTL tests use short real TTLs (a few tenths of a second); the state
machine itself is tested deterministically in ``test_coord_state.py``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import memcluster

Store = Any


def _unique(request: pytest.FixtureRequest) -> str:
    """Lock and counter names are database-wide: one per test and client kind."""
    name: str = request.node.name
    return name.replace("[", "-").rstrip("]")


def test_leases_are_granted_kept_alive_and_revoked(store: Store) -> None:
    lease = store.grant_lease(ttl_s=5)
    assert lease > 0
    expires = store.keepalive(lease)
    assert expires > time.time() + 4
    store.revoke(lease)
    with pytest.raises(memcluster.LeaseExpired):
        store.keepalive(lease)
    with pytest.raises(memcluster.LeaseExpired):
        store.revoke(lease)
    with pytest.raises(memcluster.InvalidArgument, match="ttl_s"):
        store.grant_lease(ttl_s=0)


def test_a_lease_not_kept_alive_expires(store: Store) -> None:
    lease = store.grant_lease(ttl_s=0.3)
    time.sleep(0.5)
    with pytest.raises(memcluster.LeaseExpired):
        store.keepalive(lease)


def test_lock_tokens_increase_and_a_held_lock_times_out_others(
    store: Store, request: pytest.FixtureRequest
) -> None:
    name = _unique(request)
    first = store.acquire_lock(name, ttl_s=30, timeout_s=1)
    with pytest.raises(memcluster.Timeout, match=name):
        store.acquire_lock(name, ttl_s=30, timeout_s=0.2)
    store.release_lock(name, first)
    second = store.acquire_lock(name, ttl_s=30, timeout_s=1)
    assert second > first
    with pytest.raises(memcluster.StaleToken):
        store.release_lock(name, first)
    store.release_lock(name, second)


def test_fenced_writes_pass_only_with_the_current_token(
    store: Store, request: pytest.FixtureRequest
) -> None:
    name = _unique(request)
    coll = store.create_collection("fenced", dim=2)
    old = store.acquire_lock(name, ttl_s=0.3, timeout_s=1)
    assert coll.put(("a",), "k", vector=[1, 0], fence=(name, old)) >= 1
    time.sleep(0.5)  # the holder stalls past its TTL: the lock is lost
    new = store.acquire_lock(name, ttl_s=30, timeout_s=1)
    assert new > old
    with pytest.raises(memcluster.StaleToken, match=str(old)):
        coll.put(("a",), "k", text="stale", vector=[1, 0], fence=(name, old))
    with pytest.raises(memcluster.StaleToken):
        coll.delete(("a",), "k", fence=(name, old))
    got = coll.get(("a",), "k")
    assert got is not None
    assert got.text is None  # the stale write left nothing
    coll.put(("a",), "k", text="fresh", vector=[1, 0], fence=(name, new))
    store.release_lock(name, new)
    with pytest.raises(memcluster.StaleToken):
        coll.put_many(
            [memcluster.Memory(namespace=("a",), key="x", vector=[0, 1])], fence=(name, new)
        )
    assert coll.get(("a",), "x") is None


def test_waiters_are_granted_first_come_first_served(
    store: Store, request: pytest.FixtureRequest
) -> None:
    name = _unique(request)
    holder = store.acquire_lock(name, ttl_s=30, timeout_s=1)
    order: list[int] = []
    tokens: dict[int, int] = {}

    def wait(i: int) -> None:
        token = store.acquire_lock(name, ttl_s=30, timeout_s=20)
        order.append(i)
        tokens[i] = token
        store.release_lock(name, token)

    threads = []
    for i in range(4):
        t = threading.Thread(target=wait, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(0.5)  # queue them in a known order (generous: CI machines are loaded)
    store.release_lock(name, holder)
    for t in threads:
        t.join(30)
    assert order == [0, 1, 2, 3]
    assert sorted(tokens.values()) == [tokens[i] for i in range(4)]
    assert tokens[0] > holder


def test_the_lock_context_manager_releases(store: Store, request: pytest.FixtureRequest) -> None:
    name = _unique(request)
    with store.lock(name, ttl_s=30) as token:
        assert token > 0
    again = store.acquire_lock(name, ttl_s=30, timeout_s=0)
    assert again > token
    store.release_lock(name, again)


def test_a_lock_on_a_revoked_lease_is_released(
    store: Store, request: pytest.FixtureRequest
) -> None:
    name = _unique(request)
    lease = store.grant_lease(ttl_s=30)
    token = store.acquire_lock(name, timeout_s=1, lease=lease)
    store.revoke(lease)
    with pytest.raises(memcluster.StaleToken):
        store.release_lock(name, token)
    store.release_lock(name, store.acquire_lock(name, timeout_s=0))
    with pytest.raises(memcluster.LeaseExpired):
        store.acquire_lock(name, timeout_s=0, lease=lease)


def test_semaphores_hold_at_most_n_permits(store: Store, request: pytest.FixtureRequest) -> None:
    name = _unique(request)
    held = [store.acquire_semaphore(name, permits=3, ttl_s=30, timeout_s=1) for _ in range(3)]
    assert len(set(held)) == 3
    with pytest.raises(memcluster.Timeout):
        store.acquire_semaphore(name, permits=3, ttl_s=30, timeout_s=0.2)
    store.release_semaphore(name, held[0])
    fourth = store.acquire_semaphore(name, permits=3, ttl_s=30, timeout_s=1)
    with pytest.raises(memcluster.StaleToken):
        store.release_semaphore(name, held[0])
    for token in [*held[1:], fourth]:
        store.release_semaphore(name, token)


def test_counters_increment_atomically(store: Store, request: pytest.FixtureRequest) -> None:
    key = _unique(request)
    assert store.counter(key) == 0
    assert store.incr(key) == 1
    assert store.incr(key, delta=41) == 42
    assert store.incr(key, delta=-2) == 40
    assert store.counter(key) == 40

    def bump() -> None:
        for _ in range(25):
            store.incr(key)

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert store.counter(key) == 40 + 8 * 25


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s: s.acquire_lock("", timeout_s=0), memcluster.InvalidName),
        (lambda s: s.acquire_lock("x", ttl_s=-1, timeout_s=0), memcluster.InvalidArgument),
        (lambda s: s.acquire_lock("x", timeout_s=-1), memcluster.InvalidArgument),
        (lambda s: s.acquire_semaphore("x", permits=0, timeout_s=0), memcluster.InvalidArgument),
        (lambda s: s.release_lock("never-held", 12345), memcluster.StaleToken),
        (lambda s: s.keepalive(987654321), memcluster.LeaseExpired),
    ],
)
def test_bad_coordination_calls_raise_clear_errors(store: Store, call: Any, error: type) -> None:
    with pytest.raises(error):
        call(store)


def test_memories_on_a_lease_disappear_when_it_ends(store: Store) -> None:
    coll = store.create_collection("working", dim=2, shards=2)
    lease = store.grant_lease(ttl_s=30)
    short = store.grant_lease(ttl_s=0.3)
    for i in range(6):
        coll.put(("agent-7",), f"w{i}", vector=[1, i], lease=lease)
    coll.put_many([memcluster.Memory(namespace=("agent-8",), key="s", vector=[0, 1], lease=short)])
    coll.put(("agent-7",), "keep", vector=[1, 0])
    got = coll.get(("agent-7",), "w0")
    assert got is not None
    assert got.lease == lease
    assert coll.count() == 8
    store.revoke(lease)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and coll.count() > 1:
        time.sleep(0.05)
    assert [m.key for m in coll.iter()] == ["keep"]  # the revoked and the expired lease's
    with pytest.raises(memcluster.LeaseExpired):
        coll.put(("agent-7",), "late", vector=[1, 0], lease=lease)
    assert coll.get(("agent-7",), "late") is None
    # Writing the memory again without the lease detaches it.
    third = store.grant_lease(ttl_s=30)
    coll.put(("a",), "k", vector=[1, 0], lease=third)
    coll.put(("a",), "k", vector=[1, 0])
    store.revoke(third)
    time.sleep(0.3)
    assert coll.get(("a",), "k") is not None


def test_lease_memories_are_reaped_after_a_restart(tmp_path: Any) -> None:
    """The lease ends while the database is closed: reopening deletes its memories."""
    from memcluster.core.clock import ManualClock
    from memcluster.core.config import Config

    clock = ManualClock()
    config = Config(background=False)
    with memcluster.open(tmp_path / "d", config, clock=clock) as db:
        coll = db.create_collection("m", dim=2)
        lease = db.grant_lease(ttl_s=5)
        coll.put(("a",), "k", vector=[1, 0], lease=lease)
    clock.advance(10)
    with memcluster.open(tmp_path / "d", config, clock=clock) as db:
        db.maintain()
        assert db.collection("m").get(("a",), "k") is None
