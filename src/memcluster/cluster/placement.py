"""Shard placement: which node holds which shard, planned without I/O.

The controller (one node at a time, elected through etcd) reads membership and the shard
map, calls :func:`plan`, and carries the actions out. It writes each assignment to etcd in a
transaction conditioned on the revision it read, and moves data over the binary protocol. The
planner is a pure function of its input, so tests drive it through thousands of random
clusters.

Rules, in order (one replica per shard here; issue 6 adds replica sets):

1. **A new shard** (no assignment yet) goes to the eligible node holding the fewest shards
   (ties: the smaller node id). Eligible: alive and not draining.
2. **A draining node's shards move** to the least-loaded eligible node.
3. **Balance.** While the most-loaded eligible node holds more than one shard over the least
   loaded, one of its shards moves there.
4. **A down node's shards stay where they are.** With one replica the data is only there: they
   are unavailable until the node returns (replication brings failover).

At most ``moves_max`` moves are planned at once, since each one copies a shard. Assignments are
never planned onto a node that is down or draining. A balanced, fully assigned map plans
nothing, so the plan is stable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import assert_never

import msgspec

ShardId = tuple[str, int]
"""(collection, shard number)."""


class Assign(msgspec.Struct, frozen=True):
    """Place a shard that has no node yet (it starts empty there)."""

    shard: ShardId
    node: str


class Move(msgspec.Struct, frozen=True):
    """Copy a shard from ``source`` to ``target`` (snapshot plus WAL tail), then switch."""

    shard: ShardId
    source: str
    target: str
    reason: str
    """"drain" or "balance"."""


Action = Assign | Move


class Plan(msgspec.Struct, frozen=True):
    actions: list[Action]
    unavailable: list[ShardId]
    """Shards whose node is down: reported to callers as unavailable, not moved."""


def plan(
    owners: Mapping[ShardId, str | None],
    alive: Set[str],
    draining: Set[str] = frozenset(),
    *,
    moves_max: int = 4,
) -> Plan:
    """The next actions for the shard map ``owners`` (shard -> node, None if unplaced)."""
    eligible = sorted(alive - draining)
    load: dict[str, int] = dict.fromkeys(eligible, 0)
    for node in owners.values():
        if node in load:
            load[node] += 1
    actions: list[Action] = []
    unavailable = sorted(s for s, n in owners.items() if n is not None and n not in alive)

    def least_loaded(exclude: str | None = None) -> str | None:
        candidates = [n for n in eligible if n != exclude]
        return min(candidates, key=lambda n: (load[n], n)) if candidates else None

    for shard in sorted(s for s, n in owners.items() if n is None):
        node = least_loaded()
        if node is None:
            break
        actions.append(Assign(shard, node))
        load[node] += 1
    moves = 0
    drained = sorted(
        (s, n) for s, n in owners.items() if n is not None and n in draining and n in alive
    )
    for shard, source in drained:
        if moves >= moves_max:
            break
        target = least_loaded()
        if target is None:
            break
        actions.append(Move(shard, source, target, "drain"))
        load[target] += 1
        moves += 1
    moving = {a.shard for a in actions if isinstance(a, Move)}
    while moves < moves_max and len(eligible) > 1:
        heavy = max(eligible, key=lambda n: (load[n], n))
        light = least_loaded()
        if light is None or load[heavy] - load[light] <= 1:
            break
        candidates = sorted(s for s, n in owners.items() if n == heavy and s not in moving)
        if not candidates:
            break
        shard = candidates[-1]
        actions.append(Move(shard, heavy, light, "balance"))
        moving.add(shard)
        load[heavy] -= 1
        load[light] += 1
        moves += 1
    return Plan(actions=actions, unavailable=unavailable)


def apply(
    owners: Mapping[ShardId, str | None], actions: Sequence[Action]
) -> dict[ShardId, str | None]:
    """The shard map after ``actions`` completed (what the controller writes to etcd)."""
    out = dict(owners)
    for action in actions:
        match action:
            case Assign():
                assert out[action.shard] is None, f"{action.shard} is placed already"
                out[action.shard] = action.node
            case Move():
                assert out[action.shard] == action.source, f"{action.shard} moved meanwhile"
                out[action.shard] = action.target
            case _:
                assert_never(action)
    return out
