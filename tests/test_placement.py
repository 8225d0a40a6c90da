"""Shard placement: properties of the planner over random clusters (hypothesis), plus tables."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from memcluster.cluster.placement import Assign, Move, ShardId, apply, plan

NODES = [f"n{i}" for i in range(6)]


@st.composite
def clusters(
    draw: st.DrawFn,
) -> tuple[dict[ShardId, str | None], set[str], set[str]]:
    nodes = draw(st.lists(st.sampled_from(NODES), min_size=1, max_size=6, unique=True))
    alive = set(draw(st.lists(st.sampled_from(nodes), max_size=len(nodes), unique=True)))
    draining = set(
        draw(st.lists(st.sampled_from(sorted(alive)) if alive else st.nothing(), unique=True))
    )
    n = draw(st.integers(0, 40))
    owners: dict[ShardId, str | None] = {
        ("c", i): draw(st.one_of(st.none(), st.sampled_from(nodes))) for i in range(n)
    }
    return owners, alive, draining


def _converge(
    owners: dict[ShardId, str | None], alive: set[str], draining: set[str]
) -> dict[ShardId, str | None]:
    for _ in range(200):
        step = plan(owners, alive, draining, moves_max=3)
        if not step.actions:
            return owners
        owners = apply(owners, step.actions)
    raise AssertionError("the plan did not converge")


@settings(max_examples=300)
@given(clusters())
def test_repeated_plans_converge_to_a_balanced_map_on_eligible_nodes(
    cluster: tuple[dict[ShardId, str | None], set[str], set[str]],
) -> None:
    owners, alive, draining = cluster
    final = _converge(owners, alive, draining)
    eligible = alive - draining
    down = {s for s, n in owners.items() if n is not None and n not in alive}
    for shard, node in final.items():
        if shard in down:
            assert node == owners[shard], "a down node's shard was moved"
        elif eligible:
            assert node in eligible, (shard, node)
        else:
            assert node == owners[shard]
    if eligible:
        loads = [sum(1 for n in final.values() if n == e) for e in eligible]
        assert max(loads) - min(loads) <= 1, loads


@settings(max_examples=200)
@given(clusters())
def test_a_converged_map_plans_nothing_and_plans_are_deterministic(
    cluster: tuple[dict[ShardId, str | None], set[str], set[str]],
) -> None:
    owners, alive, draining = cluster
    assert plan(owners, alive, draining) == plan(dict(owners), set(alive), set(draining))
    final = _converge(owners, alive, draining)
    assert plan(final, alive, draining).actions == []


def test_new_shards_spread_evenly_then_a_joining_node_receives_some() -> None:
    owners: dict[ShardId, str | None] = {("c", i): None for i in range(6)}
    step = plan(owners, {"a", "b", "c"})
    assert step.actions == [Assign(("c", i), node) for i, node in enumerate("abcabc")]
    owners = apply(owners, step.actions)
    joined = plan(owners, {"a", "b", "c", "d"})
    assert joined.actions == [Move(("c", 5), "c", "d", "balance")]


def test_a_draining_node_hands_off_everything() -> None:
    owners: dict[ShardId, str | None] = {("c", 0): "a", ("c", 1): "a", ("c", 2): "b"}
    final = _converge(owners, {"a", "b", "c"}, {"a"})
    assert final == {("c", 0): "c", ("c", 1): "b", ("c", 2): "b"}


def test_a_down_node_makes_its_shards_unavailable_not_moved() -> None:
    owners: dict[ShardId, str | None] = {("c", 0): "a", ("c", 1): "b"}
    step = plan(owners, {"b"})
    assert step.unavailable == [("c", 0)]
    assert all(a.shard != ("c", 0) for a in step.actions)


def test_moves_are_bounded_per_round() -> None:
    owners: dict[ShardId, str | None] = {("c", i): "a" for i in range(20)}
    step = plan(owners, {"a", "b", "c"}, moves_max=4)
    assert len([a for a in step.actions if isinstance(a, Move)]) == 4
