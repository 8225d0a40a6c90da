"""Metadata filters: a Mongo-style JSON object, validated and compiled once, then evaluated
over every slot of a shard's :class:`~memcluster.index.metadata.MetadataColumns` with numpy.

Grammar
    ::

        filter    = {entry, ...}                         implicit AND of the entries
        entry     = path: condition
                  | "$and": [filter, ...]                non-empty list
                  | "$or":  [filter, ...]                non-empty list
                  | "$not": filter                       negation
                  | "$created_at" | "$updated_at": condition   numbers only
        condition = scalar                               same as {"$eq": scalar}
                  | {op: operand, ...}                   AND of the operators
        op        = $eq $ne $gt $gte $lt $lte $in $nin $exists $not
        scalar    = string | number | bool | null

    A path names a metadata field, dotted for nested objects (``"a.b"``); no part may be
    empty or start with ``$``. ``None`` and ``{}`` match every memory (:attr:`Filter.is_empty`).

Semantics (MongoDB's, except where noted)
    ========================  ==========================================================
    ``$eq: v``                same type and equal. int and float compare numerically; a
                              bool is not a number (``true`` does not equal ``1``).
    ``$eq: null``             the field is null or missing.
    ``$ne``, ``$nin``         exactly ``not $eq``, ``not $in``: they match missing fields.
    ``$gt $gte $lt $lte``     numbers with numbers, strings with strings (by code point);
                              any other stored type never matches.
    ``$in: [v, ...]``         any ``$eq`` matches (so ``null`` in the list matches missing).
    ``$exists: b``            the path holds anything (null, object, list included) == b.
    ``$not: {op...}``         the negated AND of the operators; matches missing fields.
    lists                     a list matches an operator when any element does
                              (``$ne``/``$nin``: when no element equals). Each operator of a
                              condition is tested on its own, as in MongoDB without
                              ``$elemMatch``: ``{"$gt": 1, "$lt": 5}`` matches ``[0, 9]``.
                              Elements that are objects or lists never match a scalar.
    objects                   present (``$exists``), equal to no scalar. Use dotted paths.
    system fields             ``$created_at``, ``$updated_at``: seconds since the epoch;
                              ``$eq $ne $gt $gte $lt $lte $in $nin $not`` with numbers.
    ========================  ==========================================================

    Not supported, rejected with a message saying what to use: whole-list or whole-object
    equality (``{"$eq": [1, 2]}``), regular expressions, ``$elemMatch``, ``$size``, ``$type``.
    Numbers are compared as float64: ints beyond 2**53 lose precision (see metadata).

Limits
    Every operand is validated before anything runs; a bad filter raises
    :class:`~memcluster.core.errors.InvalidFilter` naming the path and operator and saying what
    is allowed. At most ``depth_max`` (32) levels of nesting (the top object is level 1; each
    ``$and``/``$or``/``$not`` element and field-level ``$not`` adds one), ``clauses_max``
    (1,000) clauses (each operator test and each ``$and``/``$or``/``$not``), and
    ``in_values_max`` (10,000) values per ``$in``/``$nin`` list.

Evaluation
    :meth:`Filter.evaluate` walks the compiled tree once; each leaf is one or a few vectorized
    passes over the slots of one path: numbers by numpy comparisons on the float64 column,
    strings by one lookup of the operand in the path's dictionary (``$eq``), or by a boolean
    table over the dictionary's codes (``$in`` and ranges; a range tests each distinct string
    once, in C via ``map``), list elements by the same tests over the flattened element arrays
    followed by a scatter onto their slots. ``$and``/``$or`` stop early once the result is all
    False/True. Nothing is cached between calls.

Cost (2-core dev machine, 200k slots; run ``python -m memcluster.index.filters``)
    The 3-clause filter ``{"speaker": s, "session": {"$gte": k}, "$or": [{"tags": t},
    {"topic": {"$in": [...]}}]}`` with a 3-element ``tags`` list in every slot: about 1.5 ms.
    ``$eq`` on a string: 0.1 ms; number ranges: 0.1 ms per clause; ``$in`` over 400k list
    elements: 1.5 ms. The slow case is a range over a high-cardinality string path (each
    distinct string is compared once): about 15 ms with 200k distinct strings.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, assert_never

import numpy as np
from numpy.typing import NDArray

from memcluster.core.errors import InvalidFilter
from memcluster.index.metadata import MetadataColumns, PathColumn, StringDictionary, TypedArrays

__all__ = [
    "FILTER_CLAUSES_MAX",
    "FILTER_DEPTH_MAX",
    "FILTER_IN_VALUES_MAX",
    "Filter",
    "compile_filter",
]

FILTER_DEPTH_MAX: Final = 32
"""Default deepest nesting of filter objects."""
FILTER_CLAUSES_MAX: Final = 1_000
"""Default largest number of clauses (operator tests and logical operators)."""
FILTER_IN_VALUES_MAX: Final = 10_000
"""Default longest ``$in``/``$nin`` list."""

_FIELD_OPERATORS: Final = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists")
_TOP_LEVEL: Final = ("$and", "$or", "$not", "$created_at", "$updated_at")


class _Cmp(enum.Enum):
    EQ = "$eq"
    GT = "$gt"
    GTE = "$gte"
    LT = "$lt"
    LTE = "$lte"


_RANGE_OPS: Final = {"$gt": _Cmp.GT, "$gte": _Cmp.GTE, "$lt": _Cmp.LT, "$lte": _Cmp.LTE}


class _System(enum.Enum):
    CREATED_AT = "$created_at"
    UPDATED_AT = "$updated_at"


_Scalar = str | float | bool | None
"""An operand after compilation: numbers are floats, everything else as given."""


# -- the compiled tree --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class _All:
    """Matches every slot."""


@dataclass(frozen=True, slots=True, eq=False)
class _And:
    children: tuple[_Node, ...]


@dataclass(frozen=True, slots=True, eq=False)
class _Or:
    children: tuple[_Node, ...]


@dataclass(frozen=True, slots=True, eq=False)
class _Not:
    child: _Node


@dataclass(frozen=True, slots=True, eq=False)
class _Compare:
    """``path op value``; ``value`` None only with EQ (null or missing)."""

    path: str
    op: _Cmp
    value: _Scalar


@dataclass(frozen=True, slots=True, eq=False)
class _In:
    """``path`` equals one of the values, split by type."""

    path: str
    numbers: NDArray[np.float64]
    strings: tuple[str, ...]
    bools: tuple[bool, ...]
    null: bool


@dataclass(frozen=True, slots=True, eq=False)
class _Exists:
    path: str


@dataclass(frozen=True, slots=True, eq=False)
class _SystemCompare:
    field: _System
    op: _Cmp
    value: float


@dataclass(frozen=True, slots=True, eq=False)
class _SystemIn:
    field: _System
    values: NDArray[np.float64]


_Node = _All | _And | _Or | _Not | _Compare | _In | _Exists | _SystemCompare | _SystemIn


# -- the public API -----------------------------------------------------------------------


class Filter:
    """A validated, compiled filter. Immutable; safe to share and to evaluate concurrently
    with other evaluations (not with writes to the columns)."""

    __slots__ = ("_root", "clauses", "is_empty", "paths")

    def __init__(self, root: _Node, paths: frozenset[str], clauses: int) -> None:
        self._root = root
        self.is_empty = isinstance(root, _All)
        """True when the filter matches every memory (``None``, ``{}``, ``{"$and": [{}]}``)."""
        self.paths = paths
        """The metadata paths the filter reads (system fields excluded)."""
        self.clauses = clauses
        """How many operator tests and logical operators the filter has."""

    def evaluate(self, columns: MetadataColumns, n: int) -> NDArray[np.bool_]:
        """Which of the slots ``[0, n)`` match: a fresh bool array of length ``n``.

        Slots that are empty in ``columns`` (never set, or cleared) are False, as are slots at
        or beyond ``columns.capacity``. Raises ValueError if ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"filter: slot count must be >= 0, got {n}")
        out = np.zeros(n, dtype=np.bool_)
        m = min(n, columns.capacity)
        if m > 0:
            np.logical_and(_evaluate(self._root, columns, m), columns.occupied[:m], out=out[:m])
        return out

    def __repr__(self) -> str:
        return f"Filter(paths={sorted(self.paths)}, clauses={self.clauses})"


def compile_filter(
    spec: Mapping[str, Any] | None,
    *,
    depth_max: int = FILTER_DEPTH_MAX,
    clauses_max: int = FILTER_CLAUSES_MAX,
    in_values_max: int = FILTER_IN_VALUES_MAX,
) -> Filter:
    """Validate ``spec`` completely and compile it.

    ``None`` and ``{}`` give the empty filter. Raises InvalidFilter for anything the module
    docstring's grammar does not allow; nothing is evaluated before validation passed.
    """
    compiler = _Compiler(depth_max, clauses_max, in_values_max)
    root: _Node = _All() if spec is None else compiler.filter(spec, 1, "")
    return Filter(root, frozenset(compiler.paths), compiler.clauses)


# -- compilation --------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | bool | int | float)


def _where(where: str) -> str:
    return f"filter (in {where})" if where else "filter"


class _Compiler:
    """One compilation: validates as it builds, counts clauses, collects paths."""

    def __init__(self, depth_max: int, clauses_max: int, in_values_max: int) -> None:
        self.depth_max = depth_max
        self.clauses_max = clauses_max
        self.in_values_max = in_values_max
        self.clauses = 0
        self.paths: set[str] = set()

    def _clause(self, where: str) -> None:
        self.clauses += 1
        if self.clauses > self.clauses_max:
            raise InvalidFilter(
                f"{_where(where)}: more than {self.clauses_max} clauses; "
                "split the query or use $in for many values of one field"
            )

    def _depth(self, depth: int, where: str) -> None:
        if depth > self.depth_max:
            raise InvalidFilter(
                f"{_where(where)}: nested deeper than {self.depth_max} levels; "
                "flatten the $and/$or/$not nesting"
            )

    def filter(self, spec: Any, depth: int, where: str) -> _Node:
        self._depth(depth, where)
        if not isinstance(spec, Mapping):
            raise InvalidFilter(
                f"{_where(where)}: a filter must be an object such as "
                f'{{"field": value}}, got {_json_type(spec)}'
            )
        nodes: list[_Node] = []
        for key, value in spec.items():
            if not isinstance(key, str):
                raise InvalidFilter(
                    f"{_where(where)}: keys must be strings, got {key!r} ({type(key).__name__})"
                )
            inner = f"{where}.{key}" if where else key
            if key in ("$and", "$or"):
                self._clause(where)
                children = self._filter_list(key, value, depth, inner)
                nodes.append(_and(children) if key == "$and" else _or(children))
            elif key == "$not":
                self._clause(where)
                nodes.append(_not(self.filter(value, depth + 1, inner)))
            elif key in ("$created_at", "$updated_at"):
                nodes.append(self._system(_System(key), value, depth, where))
            elif key.startswith("$"):
                raise InvalidFilter(
                    f"{_where(where)}: unknown top-level operator {key!r}; allowed: "
                    f"{', '.join(_TOP_LEVEL)} or a field path (field operators such as "
                    '$eq go inside a condition: {"field": {"$eq": 1}})'
                )
            else:
                self._check_path(key, where)
                self.paths.add(key)
                nodes.append(self._condition(key, value, depth, where))
        return _and(nodes)

    def _filter_list(self, op: str, value: Any, depth: int, where: str) -> list[_Node]:
        if not isinstance(value, list | tuple) or not value:
            raise InvalidFilter(
                f"{_where(where)}: {op} needs a non-empty array of filter objects, "
                f"got {_json_type(value)}{' (empty)' if isinstance(value, list | tuple) else ''}"
            )
        return [self.filter(item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value)]

    def _check_path(self, path: str, where: str) -> None:
        if not path:
            raise InvalidFilter(
                f"{_where(where)}: empty field path; name a metadata field such as 'topic' or 'a.b'"
            )
        for part in path.split("."):
            if not part:
                raise InvalidFilter(
                    f"{_where(where)}: field path {path!r} has an empty part; "
                    "write nested fields as 'a.b'"
                )
            if part.startswith("$"):
                raise InvalidFilter(
                    f"{_where(where)}: field path {path!r} has a part starting with '$'; "
                    "operators go inside a condition, not in a path"
                )

    def _condition(self, path: str, value: Any, depth: int, where: str) -> _Node:
        if _is_scalar(value):
            return self._operator(path, "$eq", value, depth, where, system=False)
        if isinstance(value, list | tuple):
            raise InvalidFilter(
                f"{_where(where)}: {path!r}: an array is not a condition; to match any of "
                f'several values use {{"{path}": {{"$in": [...]}}}}'
            )
        if not isinstance(value, Mapping):
            raise InvalidFilter(
                f"{_where(where)}: {path!r}: unsupported condition type "
                f"{_json_type(value)}; use a string, number, bool, null or an operator object"
            )
        return _and(self._operators(path, value, depth, where, system=False))

    def _operators(
        self, path: str, ops: Mapping[Any, Any], depth: int, where: str, *, system: bool
    ) -> list[_Node]:
        if not ops:
            raise InvalidFilter(
                f"{_where(where)}: {path!r}: empty condition {{}}; give a value or operators "
                'such as {"$eq": 1} (whole-object equality is not supported)'
            )
        keys = list(ops)
        for key in keys:
            if not isinstance(key, str):
                raise InvalidFilter(
                    f"{_where(where)}: {path!r}: keys must be strings, got {key!r} "
                    f"({type(key).__name__})"
                )
        dollar = [key for key in keys if key.startswith("$")]
        if not dollar:
            raise InvalidFilter(
                f"{_where(where)}: {path!r}: a nested object is not a condition; use dotted "
                f'paths to match nested fields: {{"{path}.{keys[0]}": ...}}'
            )
        if len(dollar) != len(keys):
            plain = next(key for key in keys if not key.startswith("$"))
            raise InvalidFilter(
                f"{_where(where)}: {path!r}: condition mixes operators with the field "
                f"{plain!r}; use only operators here, and dotted paths for nested fields"
            )
        return [
            self._operator(path, op, operand, depth, where, system) for op, operand in ops.items()
        ]

    def _system(self, field: _System, value: Any, depth: int, where: str) -> _Node:
        name = field.value
        if _is_number(value):
            return self._operator(name, "$eq", value, depth, where, system=True)
        if not isinstance(value, Mapping):
            raise InvalidFilter(
                f"{_where(where)}: {name} takes a number (seconds since the epoch) or an "
                f'operator object such as {{"$gte": 1700000000}}, got {_json_type(value)}'
            )
        return _and(self._operators(name, value, depth, where, system=True))

    def _operator(
        self, path: str, op: str, operand: Any, depth: int, where: str, system: bool
    ) -> _Node:
        self._clause(where)
        context = f"{_where(where)}: {path!r} {op}"
        match op:
            case "$eq" | "$ne":
                value = self._operand(context, operand, system=system, allow="eq")
                node: _Node = (
                    _SystemCompare(_System(path), _Cmp.EQ, _as_float(value))
                    if system
                    else _Compare(path, _Cmp.EQ, value)
                )
                return _not(node) if op == "$ne" else node
            case "$gt" | "$gte" | "$lt" | "$lte":
                value = self._operand(context, operand, system=system, allow="range")
                cmp = _RANGE_OPS[op]
                if system:
                    return _SystemCompare(_System(path), cmp, _as_float(value))
                return _Compare(path, cmp, value)
            case "$in" | "$nin":
                node = self._in(context, path, operand, system)
                return _not(node) if op == "$nin" else node
            case "$exists":
                if system:
                    raise InvalidFilter(
                        f"{context}: system fields always exist; use a comparison such as "
                        '{"$gte": 1700000000}'
                    )
                if not isinstance(operand, bool):
                    raise InvalidFilter(f"{context} needs true or false, got {_json_type(operand)}")
                return _Exists(path) if operand else _not(_Exists(path))
            case "$not":
                self._depth(depth + 1, where)
                if not isinstance(operand, Mapping):
                    raise InvalidFilter(
                        f"{context} takes an operator object such as "
                        f'{{"$not": {{"$gt": 3}}}}, got {_json_type(operand)}'
                    )
                return _not(_and(self._operators(path, operand, depth + 1, where, system=system)))
            case _:
                allowed = [*_FIELD_OPERATORS, "$not"]
                if system:
                    allowed.remove("$exists")
                hint = ""
                if op in ("$and", "$or"):
                    hint = f" ({op} goes at the top level of a filter, around field conditions)"
                raise InvalidFilter(
                    f"{_where(where)}: {path!r}: unknown operator {op!r}; allowed: "
                    f"{', '.join(allowed)}{hint}"
                )

    def _operand(self, context: str, operand: Any, *, system: bool, allow: str) -> _Scalar:
        """Validate and normalise one scalar operand (numbers become floats)."""
        if system:
            if not _is_number(operand):
                raise InvalidFilter(
                    f"{context} needs a number (seconds since the epoch), got {_json_type(operand)}"
                )
        elif allow == "range":
            if not (_is_number(operand) or isinstance(operand, str)):
                raise InvalidFilter(
                    f"{context} needs a number or a string, got {_json_type(operand)}"
                )
        elif not _is_scalar(operand):
            extra = ""
            if isinstance(operand, list | tuple):
                extra = "; whole-array equality is not supported, use $in for any of several"
            raise InvalidFilter(
                f"{context} needs a string, number, bool or null, got {_json_type(operand)}{extra}"
            )
        if _is_number(operand):
            return self._finite(context, operand)
        assert operand is None or isinstance(operand, str | bool)
        return operand

    def _finite(self, context: str, number: int | float) -> float:
        try:
            value = float(number)
        except OverflowError:
            raise InvalidFilter(
                f"{context}: the number {number} is too large; numbers are compared as float64"
            ) from None
        if not math.isfinite(value):
            raise InvalidFilter(
                f"{context}: NaN and infinity cannot be compared; use a finite number"
            )
        return value

    def _in(self, context: str, path: str, operand: Any, system: bool) -> _Node:
        if not isinstance(operand, list | tuple):
            raise InvalidFilter(f"{context} needs an array of values, got {_json_type(operand)}")
        if len(operand) > self.in_values_max:
            raise InvalidFilter(
                f"{context} has {len(operand)} values, over the limit of {self.in_values_max}"
            )
        numbers: list[float] = []
        strings: list[str] = []
        bools: set[bool] = set()
        null = False
        for item in operand:
            if system and not _is_number(item):
                raise InvalidFilter(
                    f"{context} needs an array of numbers, got an element of type "
                    f"{_json_type(item)}"
                )
            if not _is_scalar(item):
                raise InvalidFilter(
                    f"{context} elements must be strings, numbers, bools or null, got "
                    f"{_json_type(item)}"
                )
            if item is None:
                null = True
            elif isinstance(item, bool):
                bools.add(item)
            elif isinstance(item, str):
                strings.append(item)
            else:
                numbers.append(self._finite(context, item))
        array = np.unique(np.array(numbers, dtype=np.float64))
        if system:
            return _SystemIn(_System(path), array)
        return _In(path, array, tuple(dict.fromkeys(strings)), tuple(sorted(bools)), null)


def _as_float(value: _Scalar) -> float:
    assert isinstance(value, float)
    return value


def _and(nodes: list[_Node]) -> _Node:
    """AND of ``nodes``, dropping match-everything children."""
    kept = [node for node in nodes if not isinstance(node, _All)]
    if not kept:
        return _All()
    return kept[0] if len(kept) == 1 else _And(tuple(kept))


def _or(nodes: list[_Node]) -> _Node:
    """OR of ``nodes``: match-everything if any child is."""
    if any(isinstance(node, _All) for node in nodes):
        return _All()
    return nodes[0] if len(nodes) == 1 else _Or(tuple(nodes))


def _not(node: _Node) -> _Node:
    return node.child if isinstance(node, _Not) else _Not(node)


# -- evaluation ---------------------------------------------------------------------------
#
# Every function below returns a fresh array that its caller may modify in place.


def _evaluate(node: _Node, columns: MetadataColumns, m: int) -> NDArray[np.bool_]:
    """The mask of ``node`` over slots ``[0, m)``, ``m <= columns.capacity``, ignoring
    whether slots are occupied (the caller ANDs with that)."""
    match node:
        case _All():
            return np.ones(m, dtype=np.bool_)
        case _And(children):
            acc = _evaluate(children[0], columns, m)
            for child in children[1:]:
                if not acc.any():
                    break
                acc &= _evaluate(child, columns, m)
            return acc
        case _Or(children):
            acc = _evaluate(children[0], columns, m)
            for child in children[1:]:
                if acc.all():
                    break
                acc |= _evaluate(child, columns, m)
            return acc
        case _Not(child):
            acc = _evaluate(child, columns, m)
            np.logical_not(acc, out=acc)
            return acc
        case _Compare() | _In():
            return _field(columns.column(node.path), m, node)
        case _Exists(path):
            column = columns.column(path)
            if column is None:
                return np.zeros(m, dtype=np.bool_)
            return column.present[:m].copy()
        case _SystemCompare(field, op, value):
            return _compare_numbers(_system_column(columns, field)[:m], op, value)
        case _SystemIn(field, values):
            return np.isin(_system_column(columns, field)[:m], values)
        case _:
            assert_never(node)


def _system_column(columns: MetadataColumns, field: _System) -> NDArray[np.float64]:
    match field:
        case _System.CREATED_AT:
            return columns.created_at
        case _System.UPDATED_AT:
            return columns.updated_at
        case _:
            assert_never(field)


def _compare_numbers(values: NDArray[np.float64], op: _Cmp, x: float) -> NDArray[np.bool_]:
    match op:
        case _Cmp.EQ:
            equal: NDArray[np.bool_] = values == x
            return equal
        case _Cmp.GT:
            return values > x
        case _Cmp.GTE:
            return values >= x
        case _Cmp.LT:
            return values < x
        case _Cmp.LTE:
            return values <= x
        case _:
            assert_never(op)


_StringTest = int | NDArray[np.bool_] | None
"""How to test string codes: equal to one code, look up in a table indexed by code (with one
extra False entry at the end, which code -1 reads), or None: no string can match."""


def _string_test(strings: StringDictionary, test: _Compare | _In) -> _StringTest:
    if isinstance(test, _In):
        codes = [c for s in test.strings if (c := strings.lookup(s)) is not None]
        if len(codes) <= 1:
            return codes[0] if codes else None
        table = np.zeros(len(strings) + 1, dtype=np.bool_)
        table[codes] = True
        return table
    x = test.value
    if not isinstance(x, str):
        return None
    if test.op is _Cmp.EQ:
        return strings.lookup(x)
    # v op x for every distinct v, as x's reflected comparison mapped in C.
    match test.op:
        case _Cmp.GT:
            compare = x.__lt__
        case _Cmp.GTE:
            compare = x.__le__
        case _Cmp.LT:
            compare = x.__gt__
        case _Cmp.LTE:
            compare = x.__ge__
        case _:
            assert_never(test.op)
    table = np.zeros(len(strings) + 1, dtype=np.bool_)
    table[: len(strings)] = np.fromiter(map(compare, strings.values), np.bool_, len(strings))
    return table


def _strings_mask(
    values: TypedArrays, length: int, string_test: _StringTest
) -> NDArray[np.bool_] | None:
    if values.codes is None or string_test is None:
        return None
    codes = values.codes[:length]
    if isinstance(string_test, int):
        equal: NDArray[np.bool_] = codes == string_test
        return equal
    looked_up: NDArray[np.bool_] = string_test[codes]
    return looked_up


def _typed_mask(
    values: TypedArrays, length: int, test: _Compare | _In, string_test: _StringTest
) -> NDArray[np.bool_] | None:
    """Positions ``[0, length)`` of ``values`` whose scalar satisfies ``test``, or None when
    none can (missing fields are the caller's business)."""
    if isinstance(test, _Compare):
        x = test.value
        if x is None:
            return None if values.nulls is None else values.nulls[:length].copy()
        if isinstance(x, bool):
            return None if values.bools is None else values.bools[:length] == int(x)
        if isinstance(x, float):
            return None if values.num is None else _compare_numbers(values.num[:length], test.op, x)
        return _strings_mask(values, length, string_test)
    parts: list[NDArray[np.bool_]] = []
    if test.numbers.size and values.num is not None:
        parts.append(np.isin(values.num[:length], test.numbers))
    strings = _strings_mask(values, length, string_test)
    if strings is not None:
        parts.append(strings)
    if test.bools and values.bools is not None:
        bools = values.bools[:length]
        parts.append(bools >= 0 if len(test.bools) == 2 else bools == int(test.bools[0]))
    if test.null and values.nulls is not None:
        parts.append(values.nulls[:length].copy())
    if not parts:
        return None
    acc = parts[0]
    for part in parts[1:]:
        acc |= part
    return acc


def _matches_missing(test: _Compare | _In) -> bool:
    if isinstance(test, _In):
        return test.null
    return test.op is _Cmp.EQ and test.value is None


def _field(column: PathColumn | None, m: int, test: _Compare | _In) -> NDArray[np.bool_]:
    """The mask of one field test over slots ``[0, m)``: scalars, then list elements
    scattered onto their slots, then missing slots if the test matches missing."""
    if column is None:
        return np.full(m, _matches_missing(test), dtype=np.bool_)
    string_test = _string_test(column.strings, test)
    mask = _typed_mask(column.values, m, test, string_test)
    if mask is None:
        mask = np.zeros(m, dtype=np.bool_)
    lists = column.lists
    if lists is not None and lists.size > lists.dead:
        elements = _typed_mask(lists.values, lists.size, test, string_test)
        if elements is not None:
            # Dead elements hold nothing, so every hit names a live slot (>= 0).
            hits = lists.slots[: lists.size][elements]
            mask[hits[hits < m]] = True
    if _matches_missing(test):
        mask |= ~column.present[:m]
    return mask


def _benchmark(slots: int = 200_000, repeats: int = 50) -> None:
    """Time the module docstring's 3-clause filter over ``slots`` random memories."""
    import time

    rng = np.random.default_rng(0)
    columns = MetadataColumns(slots)
    speakers = [f"speaker-{i}" for i in range(50)]
    topics = [f"topic-{i}" for i in range(500)]
    tags = [f"tag-{i}" for i in range(100)]
    started = time.perf_counter()
    for slot in range(slots):
        columns.set(
            slot,
            {
                "speaker": speakers[rng.integers(50)],
                "session": int(rng.integers(100)),
                "topic": topics[rng.integers(500)],
                "tags": [tags[i] for i in rng.integers(100, size=3)],
            },
            created_at=float(slot),
            updated_at=float(slot),
        )
    loaded = time.perf_counter() - started
    spec = {
        "speaker": "speaker-7",
        "session": {"$gte": 30},
        "$or": [{"tags": "tag-3"}, {"topic": {"$in": ["topic-1", "topic-2", "topic-3"]}}],
    }
    broad = {"session": {"$gte": 1}, "$or": [{"tags": {"$ne": "tag-3"}}, {"topic": "x"}]}
    print(f"loaded {slots} slots in {loaded:.1f} s; columns use {columns.nbytes() / 1e6:.1f} MB")
    for name, query in (("selective", spec), ("broad", broad)):
        compiled = compile_filter(query)
        started = time.perf_counter()
        for _ in range(repeats):
            matched = int(compiled.evaluate(columns, slots).sum())
        per_call_ms = (time.perf_counter() - started) / repeats * 1e3
        print(f"{name}: {per_call_ms:.2f} ms per evaluate, {matched} matches")


if __name__ == "__main__":
    _benchmark()
