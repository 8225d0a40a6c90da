"""Metadata filters: the vectorized engine against hand-written tables and a reference model.

The tables pin the semantics case by case (and check that the model agrees with them). Two
property tests compare the engine with ``filter_model.matches`` (plain recursive Python over
one document) slot by slot, after random sequences of set / clear / resize and with
``MetadataColumns.validate()`` after every step: one draws random nested filters, the other
tries every operator with every value the writes used. Hypothesis runs derandomized, so every
run tests the same examples; a failure prints the falsifying example and a
``@reproduce_failure`` blob. ``FILTER_PROPERTY_EXAMPLES=5000`` (default 200) searches longer.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from typing import Any
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filter_model import matches
from memcluster.core.errors import InvalidFilter
from memcluster.index import metadata as metadata_module
from memcluster.index.filters import FILTER_CLAUSES_MAX, compile_filter
from memcluster.index.metadata import MetadataColumns

# -- the table ----------------------------------------------------------------------------

DOCS: list[dict[str, Any]] = [
    {
        "speaker": "alice",
        "session": 1,
        "score": 0.5,
        "tags": ["x", "y"],
        "flag": True,
        "topic": "a",
    },
    {"speaker": "bob", "session": 2, "score": 1, "tags": ["y"], "flag": False, "topic": None},
    {
        "speaker": "carol",
        "session": 3.0,
        "tags": [],
        "flag": 1,
        "nested": {"level": 2, "name": "n"},
    },
    {"speaker": "Alice", "session": "3", "tags": "x", "flag": None, "nested": {"level": "2"}},
    {},
    {"session": [1, 5], "tags": ["z", 3, True, None, {"x": 1}, ["x"]], "nested": 7, "score": -0.0},
]
"""Slot i holds DOCS[i], created at 100 + 10 i, updated at 200 + 10 i. Slot 6 is never set;
slot 7 is set and then cleared. Neither may ever match."""

ALL = set(range(len(DOCS)))

CASES: list[tuple[str, Mapping[str, Any] | None, set[int]]] = [
    ("none matches everything", None, ALL),
    ("empty object matches everything", {}, ALL),
    ("and of empty objects matches everything", {"$and": [{}, {}]}, ALL),
    ("or with an empty object matches everything", {"$or": [{}, {"speaker": "zed"}]}, ALL),
    ("not of empty object matches nothing", {"$not": {}}, set()),
    # $eq and scalars
    ("string equality is case sensitive", {"speaker": "alice"}, {0}),
    ("explicit $eq", {"speaker": {"$eq": "Alice"}}, {3}),
    ("int equals float", {"session": 3}, {2}),
    ("float equals int", {"score": 1.0}, {1}),
    ("negative zero equals zero", {"score": 0}, {5}),
    ("number does not equal its string", {"session": "3"}, {3}),
    ("list matches when an element equals", {"session": 1}, {0, 5}),
    ("bool true does not equal 1", {"flag": True}, {0}),
    ("number 1 does not equal true", {"flag": 1}, {2}),
    ("bool false", {"flag": False}, {1}),
    ("number 0 does not equal false", {"flag": 0}, set()),
    ("null matches null and missing", {"flag": None}, {3, 4, 5}),
    ("null matches missing everywhere", {"topic": None}, {1, 2, 3, 4, 5}),
    ("null matches a list holding null", {"tags": None}, {4, 5}),
    ("a list element that is a bool", {"tags": True}, {5}),
    ("a list element that is a number", {"tags": 3}, {5}),
    ("true in a list does not equal 1", {"tags": 1}, set()),
    ("scalar or list element", {"tags": "x"}, {0, 3}),
    ("string never seen at the path", {"speaker": "zed"}, set()),
    # $ne
    ("$ne matches missing fields", {"speaker": {"$ne": "alice"}}, {1, 2, 3, 4, 5}),
    ("$ne on a list means no element equals", {"tags": {"$ne": "x"}}, {1, 2, 4, 5}),
    ("$ne true keeps numbers", {"flag": {"$ne": True}}, {1, 2, 3, 4, 5}),
    ("$ne null means present and not null", {"topic": {"$ne": None}}, {0}),
    # ranges
    ("$gt over numbers and list elements", {"session": {"$gt": 1}}, {1, 2, 5}),
    ("$gte and $lt each hold", {"session": {"$gte": 1, "$lt": 2}}, {0, 5}),
    ("operators test list elements separately", {"session": {"$gt": 1, "$lt": 5}}, {1, 2, 5}),
    ("string range never matches numbers", {"session": {"$lte": "3"}}, {3}),
    ("strings order by code point", {"speaker": {"$gt": "alice"}}, {1, 2}),
    ("uppercase sorts before lowercase", {"speaker": {"$lt": "b"}}, {0, 3}),
    ("$lte zero with negative zero", {"score": {"$lte": 0}}, {5}),
    ("number range never matches bools", {"flag": {"$gte": 0}}, {2}),
    ("range on a string path with numbers", {"speaker": {"$gt": 0}}, set()),
    # $in / $nin
    ("$in over strings and null", {"speaker": {"$in": ["alice", "bob", None]}}, {0, 1, 4, 5}),
    ("$in over mixed types", {"session": {"$in": [2, "3"]}}, {1, 3}),
    ("$in bools", {"flag": {"$in": [True, False]}}, {0, 1}),
    ("$in number and null", {"flag": {"$in": [1, None]}}, {2, 3, 4, 5}),
    ("$in over list elements", {"tags": {"$in": ["z", "q"]}}, {5}),
    ("$in empty matches nothing", {"tags": {"$in": []}}, set()),
    ("$nin means no element is in", {"tags": {"$nin": ["x", "y"]}}, {2, 4, 5}),
    ("$nin empty matches everything", {"tags": {"$nin": []}}, ALL),
    ("$nin with null excludes missing", {"topic": {"$nin": [None]}}, {0}),
    # $exists
    ("$exists true", {"topic": {"$exists": True}}, {0, 1}),
    ("$exists false", {"topic": {"$exists": False}}, {2, 3, 4, 5}),
    ("an empty list exists", {"tags": {"$exists": True}}, {0, 1, 2, 3, 5}),
    ("an object exists", {"nested": {"$exists": True}}, {2, 3, 5}),
    # nested paths
    ("dotted path into an object", {"nested.level": 2}, {2}),
    ("dotted path keeps types apart", {"nested.level": "2"}, {3}),
    ("dotted path exists", {"nested.level": {"$exists": True}}, {2, 3}),
    ("dotted path string range", {"nested.name": {"$gte": "n"}}, {2}),
    ("scalar at an object's path elsewhere", {"nested": 7}, {5}),
    ("an object equals no scalar", {"nested": {"$ne": 7}}, {0, 1, 2, 3, 4}),
    ("an object is not null", {"nested": None}, {0, 1, 4}),
    ("lists of objects are not traversed", {"tags.x": {"$exists": True}}, set()),
    # $not
    ("field $not matches what the operators do not", {"session": {"$not": {"$gt": 1}}}, {0, 3, 4}),
    ("field $not of several operators", {"session": {"$not": {"$gte": 1, "$lte": 2}}}, {2, 3, 4}),
    ("double field $not", {"speaker": {"$not": {"$not": {"$eq": "bob"}}}}, {1}),
    ("top-level $not", {"$not": {"speaker": "alice"}}, {1, 2, 3, 4, 5}),
    ("top-level $not of a conjunction", {"$not": {"speaker": "bob", "flag": False}}, ALL - {1}),
    # logical
    ("$or", {"$or": [{"speaker": "alice"}, {"tags": "z"}]}, {0, 5}),
    ("$and", {"$and": [{"session": {"$gte": 1}}, {"session": {"$lte": 2}}]}, {0, 1, 5}),
    ("implicit and", {"speaker": "bob", "flag": False}, {1}),
    ("implicit and with no match", {"speaker": "bob", "flag": True}, set()),
    (
        "the example from the design",
        {"speaker": "alice", "session": {"$gte": 1}, "$or": [{"tags": "x"}, {"topic": "b"}]},
        {0},
    ),
    # system fields
    ("$created_at range", {"$created_at": {"$gte": 120}}, {2, 3, 4, 5}),
    ("$updated_at equality", {"$updated_at": 210}, {1}),
    ("$created_at $in", {"$created_at": {"$in": [100, 150, 999]}}, {0, 5}),
    ("$created_at $ne", {"$created_at": {"$ne": 100}}, {1, 2, 3, 4, 5}),
    ("$created_at $not", {"$created_at": {"$not": {"$lt": 130}}}, {3, 4, 5}),
    ("$created_at $nin", {"$created_at": {"$nin": [100, 110]}}, {2, 3, 4, 5}),
    # unknown paths
    ("unknown path equals nothing", {"nope": 1}, set()),
    ("unknown path $ne matches all", {"nope": {"$ne": 1}}, ALL),
    ("unknown path is null", {"nope": None}, ALL),
    ("unknown path does not exist", {"nope": {"$exists": False}}, ALL),
]


def _table_columns() -> MetadataColumns:
    columns = MetadataColumns(8)
    for slot, doc in enumerate(DOCS):
        columns.set(slot, doc, created_at=100 + 10 * slot, updated_at=200 + 10 * slot)
    columns.set(7, {"speaker": "alice", "tags": ["x"], "nope": 2}, created_at=1, updated_at=2)
    columns.clear(7)
    return columns


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(spec, expected) for _, spec, expected in CASES],
    ids=[c[0] for c in CASES],
)
def test_filter_matches_exactly_the_expected_slots(
    spec: Mapping[str, Any] | None, expected: set[int]
) -> None:
    mask = compile_filter(spec).evaluate(_table_columns(), 8)
    assert set(np.flatnonzero(mask).tolist()) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(spec, expected) for _, spec, expected in CASES],
    ids=[c[0] for c in CASES],
)
def test_reference_model_agrees_with_the_table(
    spec: Mapping[str, Any] | None, expected: set[int]
) -> None:
    """The model is only a useful oracle if it gets the hand-checked cases right too."""
    got = {
        slot
        for slot, doc in enumerate(DOCS)
        if matches(spec, doc, created_at=100 + 10 * slot, updated_at=200 + 10 * slot)
    }
    assert got == expected


# -- invalid filters ----------------------------------------------------------------------


def _nested_and(depth: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"x": 1}
    for _ in range(depth - 1):
        spec = {"$and": [spec]}
    return spec


def _nested_not(depth: int) -> dict[str, Any]:
    condition: dict[str, Any] = {"$eq": 1}
    for _ in range(depth - 1):
        condition = {"$not": condition}
    return {"x": condition}


INVALID: list[tuple[str, Any, str]] = [
    ("not an object", ["x"], "must be an object"),
    ("non-string key", {1: "a"}, "keys must be strings"),
    ("non-string operator key", {"x": {1: 2}}, "keys must be strings"),
    ("unknown field operator", {"x": {"$regex": "a"}}, "$regex"),
    ("unknown top-level operator", {"$nor": [{"x": 1}]}, "$nor"),
    ("field operator at the top level", {"$eq": 1}, "$eq"),
    ("logical operator inside a condition", {"x": {"$and": [{"$gt": 1}]}}, "$and"),
    ("$in not a list", {"x": {"$in": "a"}}, "$in"),
    ("$in element a list", {"x": {"$in": [[1]]}}, "$in"),
    ("$nin element an object", {"x": {"$nin": [{"a": 1}]}}, "$nin"),
    ("$in too long", {"x": {"$in": list(range(10_001))}}, "$in"),
    ("range operand a bool", {"x": {"$gt": True}}, "$gt"),
    ("range operand null", {"x": {"$lt": None}}, "$lt"),
    ("range operand a list", {"x": {"$gte": [1]}}, "$gte"),
    ("range operand an object", {"x": {"$lte": {"a": 1}}}, "$lte"),
    ("$exists not a bool", {"x": {"$exists": 1}}, "$exists"),
    ("$and empty", {"$and": []}, "$and"),
    ("$and not a list", {"$and": {"x": 1}}, "$and"),
    ("$or element not an object", {"$or": [1]}, "$or"),
    ("$or a string", {"$or": "x"}, "$or"),
    ("top-level $not a list", {"$not": [{"x": 1}]}, "$not"),
    ("NaN operand", {"x": {"$gt": math.nan}}, "$gt"),
    ("infinite scalar", {"x": math.inf}, "$eq"),
    ("infinite $in element", {"x": {"$in": [1, -math.inf]}}, "$in"),
    ("number beyond float64", {"x": {"$lt": 10**400}}, "$lt"),
    ("nesting too deep", _nested_and(33), "deeper than 32"),
    ("field $not nesting too deep", _nested_not(33), "deeper than 32"),
    ("too many clauses", {f"f{i}": i for i in range(FILTER_CLAUSES_MAX + 1)}, "1000"),
    ("empty path", {"": 1}, "empty field path"),
    ("empty path part", {"a..b": 1}, "'a..b'"),
    ("leading dot", {".a": 1}, "'.a'"),
    ("trailing dot", {"a.": 1}, "'a.'"),
    ("path part starting with $", {"a.$b": 1}, "'a.$b'"),
    ("nested object as a condition", {"x": {"a": 1}}, "dotted paths"),
    ("operators mixed with fields", {"x": {"$eq": 1, "a": 1}}, "'a'"),
    ("empty condition", {"x": {}}, "'x'"),
    ("list as a condition", {"x": [1, 2]}, "$in"),
    ("whole-list equality", {"x": {"$eq": [1]}}, "$eq"),
    ("whole-object equality", {"x": {"$ne": {"a": 1}}}, "$ne"),
    ("unsupported scalar type", {"x": b"bytes"}, "'x'"),
    ("field $not of a scalar", {"x": {"$not": 3}}, "$not"),
    ("field $not of nothing", {"x": {"$not": {}}}, "'x'"),
    ("system field with a string", {"$created_at": "yesterday"}, "$created_at"),
    ("system field with a bool", {"$created_at": True}, "$created_at"),
    ("system field string range", {"$created_at": {"$gt": "2024"}}, "$gt"),
    ("system field $exists", {"$updated_at": {"$exists": True}}, "$exists"),
    ("system field $in of strings", {"$created_at": {"$in": ["a"]}}, "$in"),
    ("system field null", {"$updated_at": {"$eq": None}}, "$eq"),
    ("error deep inside", {"$or": [{"a": 1}, {"$and": [{"b": {"$size": 2}}]}]}, "$size"),
]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [(spec, fragment) for _, spec, fragment in INVALID],
    ids=[c[0] for c in INVALID],
)
def test_invalid_filter_is_rejected_with_a_message_naming_the_problem(
    spec: Any, fragment: str
) -> None:
    with pytest.raises(InvalidFilter) as raised:
        compile_filter(spec)
    assert fragment in str(raised.value)
    assert str(raised.value).startswith("filter")


def test_filter_at_the_limits_is_accepted() -> None:
    compile_filter(_nested_and(32))
    compile_filter(_nested_not(32))
    compile_filter({f"f{i}": i for i in range(FILTER_CLAUSES_MAX)})
    compile_filter({"x": {"$in": list(range(10_000))}})


def test_limits_can_be_lowered_by_the_caller() -> None:
    with pytest.raises(InvalidFilter, match="deeper than 2"):
        compile_filter(_nested_and(3), depth_max=2)
    with pytest.raises(InvalidFilter, match="more than 2 clauses"):
        compile_filter({"a": 1, "b": 2, "c": 3}, clauses_max=2)
    with pytest.raises(InvalidFilter, match="limit of 2"):
        compile_filter({"a": {"$in": [1, 2, 3]}}, in_values_max=2)


def test_compiled_filter_reports_emptiness_paths_and_clauses() -> None:
    assert compile_filter(None).is_empty
    assert compile_filter({}).is_empty
    assert compile_filter({"$and": [{}]}).is_empty
    compiled = compile_filter({"a.b": 1, "$or": [{"c": {"$gt": 1, "$lt": 3}}], "$created_at": 5})
    assert not compiled.is_empty
    assert compiled.paths == {"a.b", "c"}
    assert compiled.clauses == 5


# -- storage ------------------------------------------------------------------------------


def test_unset_and_cleared_slots_never_match_even_negations() -> None:
    columns = _table_columns()
    for spec in ({"nope": {"$ne": 1}}, {"$not": {"speaker": "alice"}}, {"x": None}, {}, None):
        mask = compile_filter(spec).evaluate(columns, 8)
        assert not mask[6]
        assert not mask[7]


def test_evaluate_beyond_capacity_pads_with_false() -> None:
    columns = MetadataColumns(2)
    columns.set(0, {"a": 1}, 0.0, 0.0)
    columns.set(1, {"a": 1}, 0.0, 0.0)
    assert compile_filter({"a": 1}).evaluate(columns, 5).tolist() == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert compile_filter({"a": 1}).evaluate(columns, 1).tolist() == [True]
    assert compile_filter({"a": 1}).evaluate(columns, 0).tolist() == []
    with pytest.raises(ValueError, match="slot count"):
        compile_filter({"a": 1}).evaluate(columns, -1)


def test_resize_keeps_every_stored_value_and_new_slots_are_empty() -> None:
    columns = MetadataColumns(2)
    columns.set(0, {"n": 1, "s": "x", "b": True, "z": None, "l": ["x", 2], "o": {"k": 1}}, 5.0, 6.0)
    columns.set(1, {"n": 2.5, "l": []}, 7.0, 8.0)
    columns.resize(1000)
    assert columns.capacity == 1000
    cases: list[tuple[dict[str, Any], list[int]]] = [
        ({"n": 1}, [0]),
        ({"n": {"$gt": 2}}, [1]),
        ({"s": "x"}, [0]),
        ({"b": True}, [0]),
        ({"z": None}, [0, 1]),
        ({"l": 2}, [0]),
        ({"l": {"$exists": True}}, [0, 1]),
        ({"o.k": 1}, [0]),
        ({"$created_at": 5}, [0]),
        ({"$updated_at": {"$gte": 6}}, [0, 1]),
    ]
    for spec, expected in cases:
        mask = compile_filter(spec).evaluate(columns, 1000)
        assert np.flatnonzero(mask).tolist() == expected, spec
    columns.set(999, {"n": 1}, 0.0, 0.0)
    assert np.flatnonzero(compile_filter({"n": 1}).evaluate(columns, 1000)).tolist() == [0, 999]
    columns.resize(1000)  # same size: no-op
    with pytest.raises(ValueError, match="grow only"):
        columns.resize(10)


def test_clear_empties_a_slot_and_set_replaces_everything() -> None:
    columns = MetadataColumns(3)
    columns.set(1, {"a": 1, "b": "x", "c": ["y"], "d": {"e": True}}, 1.0, 2.0)
    columns.set(1, {"a": "now a string"}, 3.0, 4.0)
    assert np.flatnonzero(compile_filter({"a": "now a string"}).evaluate(columns, 3)).tolist() == [
        1
    ]
    for spec in ({"a": 1}, {"b": "x"}, {"c": "y"}, {"d": {"$exists": True}}, {"d.e": True}):
        assert not compile_filter(spec).evaluate(columns, 3).any(), spec
    columns.clear(1)
    assert not compile_filter({"a": {"$exists": False}}).evaluate(columns, 3).any()
    assert not compile_filter({"$created_at": {"$ne": 0}}).evaluate(columns, 3).any()
    assert not columns.occupied.any()
    columns.clear(1)  # clearing an empty slot is a no-op
    columns.set(1, {}, 0.0, 0.0)
    assert np.flatnonzero(
        compile_filter({"a": {"$exists": False}}).evaluate(columns, 3)
    ).tolist() == [1]


def test_slot_outside_capacity_is_an_index_error() -> None:
    columns = MetadataColumns(2)
    with pytest.raises(IndexError, match="slot 2"):
        columns.set(2, {}, 0.0, 0.0)
    with pytest.raises(IndexError, match="slot -1"):
        columns.clear(-1)


def test_dotted_metadata_key_is_the_same_path_as_nesting_and_the_later_wins() -> None:
    columns = MetadataColumns(2)
    columns.set(0, {"a.b": 1}, 0.0, 0.0)
    columns.set(1, {"a": {"b": 1}, "a.b": 2}, 0.0, 0.0)
    assert np.flatnonzero(compile_filter({"a.b": 1}).evaluate(columns, 2)).tolist() == [0]
    assert np.flatnonzero(compile_filter({"a.b": 2}).evaluate(columns, 2)).tolist() == [1]


def test_numbers_compare_as_float64_so_huge_ints_lose_precision() -> None:
    columns = MetadataColumns(2)
    columns.set(0, {"n": 2**53 + 1}, 0.0, 0.0)
    columns.set(1, {"n": 10**400}, 0.0, 0.0)
    assert compile_filter({"n": 2**53}).evaluate(columns, 2).tolist() == [True, False]
    assert compile_filter({"n": {"$gt": 1e308}}).evaluate(columns, 2).tolist() == [False, True]


def test_nbytes_counts_columns_and_grows_with_paths() -> None:
    columns = MetadataColumns(1000)
    empty = columns.nbytes()
    assert empty >= 1000 * 17  # occupied + two float64 timestamp columns
    columns.set(0, {"n": 1, "s": "text", "l": ["a", "b"]}, 0.0, 0.0)
    assert columns.nbytes() >= empty + 1000 * (1 + 8) + 1000 * (1 + 4)
    assert columns.path_count() == 3
    assert columns.new_paths({"n": 2, "m": {"k": 1}}) == ["m", "m.k"]


def test_list_store_compacts_after_many_clears_and_keeps_answers() -> None:
    """Goal: list elements stay right across compaction of the element store.
    Method: fill 3,000 slots with lists, clear and rewrite most of them (enough dead elements
    to compact several times), then compare every slot with the reference model."""
    rng = np.random.default_rng(7)
    capacity = 3_000
    columns = MetadataColumns(capacity)
    docs: dict[int, dict[str, Any]] = {}

    def random_doc() -> dict[str, Any]:
        size = int(rng.integers(0, 4))
        return {"l": [str(v) if v % 2 else int(v) for v in rng.integers(0, 6, size=size)]}

    for slot in range(capacity):
        docs[slot] = random_doc()
        columns.set(slot, docs[slot], 0.0, 0.0)
    for _ in range(3):
        for slot in rng.permutation(capacity)[: capacity * 2 // 3].tolist():
            if rng.random() < 0.3:
                columns.clear(slot)
                docs.pop(slot, None)
            else:
                docs[slot] = random_doc()
                columns.set(slot, docs[slot], 0.0, 0.0)
        columns.validate()
    lists = columns.column("l")
    assert lists is not None
    assert lists.lists is not None
    assert lists.lists.dead < lists.lists.size or lists.lists.size == 0
    for spec in ({"l": "1"}, {"l": 2}, {"l": {"$gte": 3}}, {"l": {"$nin": ["3", 4]}}, {"l": None}):
        mask = compile_filter(spec).evaluate(columns, capacity)
        expected = [
            slot in docs and matches(spec, docs[slot], 0.0, 0.0) for slot in range(capacity)
        ]
        assert mask.tolist() == expected, spec


def test_evaluate_returns_a_fresh_array() -> None:
    columns = MetadataColumns(2)
    columns.set(0, {"a": {"b": 1}}, 0.0, 0.0)
    compiled = compile_filter({"a": {"$exists": True}})
    first = compiled.evaluate(columns, 2)
    first[:] = False
    assert compiled.evaluate(columns, 2).tolist() == [True, False]


# -- property: engine == reference model --------------------------------------------------

KEYS = ("a", "b", "c")
PATHS = ("a", "b", "c", "a.b", "b.a", "a.b.c")

# Small value domains, so that random filters often hit random documents; they include the
# traps: int vs float, -0.0, ints beyond 2**53, bools next to 0/1, "" and NUL in strings.
numbers = st.sampled_from([0, 1, -1, 2**53, 2**53 + 1, 0.0, -0.0, 0.5, 1.0, -1.5])
stored_numbers = numbers | st.sampled_from([10**400, 1e308, math.inf])
strings = st.sampled_from(["", "a", "b", "ab", "B", "a\x00"])
filter_scalars = st.none() | st.booleans() | numbers | strings
stored_scalars = st.none() | st.booleans() | stored_numbers | strings

metadata_values = st.recursive(
    stored_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)
    ),
    max_leaves=6,
)
documents = st.dictionaries(st.sampled_from(KEYS), metadata_values, max_size=3)

timestamps = st.sampled_from([0.0, 1.0, 2.5, 1e9])


def filters_over(
    scalars: st.SearchStrategy[Any], paths: st.SearchStrategy[str]
) -> st.SearchStrategy[dict[str, Any]]:
    """Random valid filters whose field operands come from ``scalars``, paths from ``paths``."""
    ordered = scalars.filter(lambda v: isinstance(v, str) or _is_number(v))
    operator_pairs = st.one_of(
        st.tuples(st.sampled_from(["$eq", "$ne"]), scalars),
        st.tuples(st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), ordered),
        st.tuples(st.sampled_from(["$in", "$nin"]), st.lists(scalars, max_size=3)),
        st.tuples(st.just("$exists"), st.booleans()),
    )
    operator_objects = st.lists(operator_pairs, min_size=1, max_size=2).map(dict)
    conditions = st.one_of(
        scalars, operator_objects, operator_objects.map(lambda ops: {"$not": ops})
    )
    system_pairs = st.one_of(
        st.tuples(st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte"]), timestamps),
        st.tuples(st.sampled_from(["$in", "$nin"]), st.lists(timestamps, max_size=2)),
    )
    system_conditions = timestamps | st.lists(system_pairs, min_size=1, max_size=2).map(dict)
    leaves = st.dictionaries(paths, conditions, max_size=2) | st.dictionaries(
        st.sampled_from(["$created_at", "$updated_at"]), system_conditions, min_size=1, max_size=1
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(lambda fs: {"$and": fs}),
            st.lists(inner, min_size=1, max_size=3).map(lambda fs: {"$or": fs}),
            inner.map(lambda f: {"$not": f}),
            st.tuples(inner, leaves).map(lambda pair: {**pair[1], "$or": [pair[0]]}),
        ),
        max_leaves=6,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalars_and_paths(value: Any, prefix: str, out: tuple[list[Any], list[str]]) -> None:
    """Collect the valid filter operands and the dotted paths found in a document value."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            path = f"{prefix}.{key}" if prefix else key
            out[1].append(path)
            _scalars_and_paths(inner, path, out)
    elif isinstance(value, list):
        for element in value:
            _scalars_and_paths(element, prefix, out)
    elif not _is_number(value) or abs(value) <= sys.float_info.max:  # finite, fits float64
        out[0].append(value)


SLOTS_MAX = 8
writes = st.tuples(st.integers(0, SLOTS_MAX - 1), documents, timestamps, timestamps)
operations = st.lists(
    st.one_of(
        writes.map(lambda w: ("set", *w)),
        st.tuples(st.just("clear"), st.integers(0, SLOTS_MAX - 1)),
        st.tuples(st.just("resize"), st.integers(0, 3)),
    ),
    max_size=20,
)

EXAMPLES = int(os.environ.get("FILTER_PROPERTY_EXAMPLES", "200"))


def _property(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        print_blob=True,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


_State = dict[int, tuple[dict[str, Any], float, float]]


def _replay(
    initial: int, ops: list[tuple[Any, ...]]
) -> tuple[MetadataColumns, _State, list[Any], list[str]]:
    """Apply ``ops`` to fresh columns and to a plain dict; also collect the operands (valid
    filter scalars, deduplicated by type and value) and dotted paths the writes used, so
    that filters can be drawn that hit the data."""
    columns = MetadataColumns(initial)
    state: _State = {}
    seen: tuple[list[Any], list[str]] = ([], [])
    for op in ops:
        if op[0] == "set":
            _, slot, doc, created, updated = op
            if slot >= columns.capacity:
                columns.resize(slot + 1)
            columns.set(slot, doc, created, updated)
            state[slot] = (doc, created, updated)
            _scalars_and_paths(doc, "", seen)
        elif op[0] == "clear":
            if op[1] < columns.capacity:
                columns.clear(op[1])
                state.pop(op[1], None)
        else:
            columns.resize(columns.capacity + op[1])
        columns.validate()
    scalars = list({(type(v), v): v for v in seen[0]}.values())
    return columns, state, scalars, sorted(set(seen[1]))


def _check(columns: MetadataColumns, state: _State, spec: Mapping[str, Any], n: int) -> None:
    got = compile_filter(spec).evaluate(columns, n)
    expected = [slot in state and matches(spec, *state[slot]) for slot in range(n)]
    wrong = [slot for slot in range(n) if bool(got[slot]) != expected[slot]]
    assert not wrong, {
        "filter": spec,
        "wrong slots (document, expected)": {
            slot: (state.get(slot), expected[slot]) for slot in wrong
        },
    }


@_property(EXAMPLES)
@given(
    initial=st.integers(0, 4),
    first=st.lists(writes, min_size=3, max_size=SLOTS_MAX),
    ops=operations,
    extra=st.integers(-3, 3),
    compact_often=st.booleans(),
    data=st.data(),
)
def test_vectorized_evaluation_equals_the_reference_model(
    initial: int,
    first: list[tuple[int, dict[str, Any], float, float]],
    ops: list[tuple[Any, ...]],
    extra: int,
    compact_often: bool,
    data: st.DataObject,
) -> None:
    """Goal: the engine and the model agree on every slot, for any documents, filters and
    write history. Method: replay random writes (``first``, then a mix of set, clear and
    resize in ``ops``) on both a MetadataColumns and a dict of documents; draw nested filters
    whose operands and paths are often ones the writes used (so that they match); evaluate
    each over ``capacity + extra`` slots and compare slot by slot (slots never set must be
    False). With ``compact_often`` the list store compacts after a few dead elements."""
    with patch.object(metadata_module, "_COMPACT_DEAD_MIN", 2 if compact_often else 1024):
        columns, state, seen, seen_paths = _replay(initial, [("set", *w) for w in first] + ops)
        scalars = filter_scalars | st.sampled_from(seen) if seen else filter_scalars
        paths = st.sampled_from([*seen_paths, *PATHS])
        specs = data.draw(st.lists(filters_over(scalars, paths), min_size=1, max_size=4), "specs")
        for spec in specs:
            _check(columns, state, spec, max(0, columns.capacity + extra))


@_property(max(1, EXAMPLES // 4))  # each example runs thousands of filters
@given(
    first=st.lists(writes, min_size=3, max_size=SLOTS_MAX),
    ops=operations,
    compact_often=st.booleans(),
)
def test_every_operator_on_every_stored_value_equals_the_reference_model(
    first: list[tuple[int, dict[str, Any], float, float]],
    ops: list[tuple[Any, ...]],
    compact_often: bool,
) -> None:
    """Goal: each operator's edge cases (equal values, bool vs number, null vs missing, list
    elements, stale values of overwritten slots) are hit every time, not by luck. Method:
    after random writes, test every operator with every value the writes ever used, on every
    path they used, alone and under field-level $not, against the model."""
    with patch.object(metadata_module, "_COMPACT_DEAD_MIN", 2 if compact_often else 1024):
        columns, state, seen, seen_paths = _replay(0, [("set", *w) for w in first] + ops)
        n = columns.capacity + 1
        operands = [*seen, None, True, False, 0, "a"]
        for path in [*seen_paths, "missing"]:
            conditions: list[Any] = [{"$exists": True}, {"$in": []}, {"$nin": operands}]
            for i, value in enumerate(operands):
                conditions += [value, {"$ne": value}, {"$in": [value, operands[i - 1]]}]
                conditions.append({"$nin": [value, operands[i - 1]]})
                if isinstance(value, str) or _is_number(value):
                    conditions += [{op: value} for op in ("$gt", "$gte", "$lt", "$lte")]
            for condition in conditions:
                _check(columns, state, {path: condition}, n)
                negated = condition if isinstance(condition, Mapping) else {"$eq": condition}
                _check(columns, state, {path: {"$not": negated}}, n)
