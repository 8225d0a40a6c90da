"""A reference evaluator for metadata filters: plain recursive Python over one document.

It states the semantics of :mod:`memcluster.index.filters` as directly as possible, with no
columns, codes or numpy, so that the property tests can compare the vectorized engine with it
slot by slot. It assumes the filter is valid (the engine's compiler checks that) and that
metadata keys contain no ``"."``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

_MISSING = object()

_RANGES: dict[str, Callable[[Any, Any], Any]] = {
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}


def matches(
    spec: Mapping[str, Any] | None,
    metadata: Mapping[str, Any],
    created_at: float,
    updated_at: float,
) -> bool:
    """Whether a memory with this metadata and these timestamps matches the filter ``spec``."""
    if spec is None:
        return True
    system = {"$created_at": float(created_at), "$updated_at": float(updated_at)}
    return _filter(spec, metadata, system)


def _filter(spec: Mapping[str, Any], doc: Mapping[str, Any], system: dict[str, float]) -> bool:
    for key, value in spec.items():
        if key == "$and":
            ok = all(_filter(item, doc, system) for item in value)
        elif key == "$or":
            ok = any(_filter(item, doc, system) for item in value)
        elif key == "$not":
            ok = not _filter(value, doc, system)
        elif key in system:
            ok = _condition(system[key], value)
        else:
            ok = _condition(_resolve(doc, key), value)
        if not ok:
            return False
    return True


def _resolve(doc: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path, or ``_MISSING``. Lists are not traversed."""
    current: Any = doc
    for part in path.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return _MISSING
        current = current[part]
    return current


def _condition(value: Any, condition: Any) -> bool:
    if not isinstance(condition, Mapping):
        return _eq(value, condition)
    return all(_operator(value, op, operand) for op, operand in condition.items())


def _operator(value: Any, op: str, operand: Any) -> bool:
    if op == "$eq":
        return _eq(value, operand)
    if op == "$ne":
        return not _eq(value, operand)
    if op == "$in":
        return any(_eq(value, item) for item in operand)
    if op == "$nin":
        return not any(_eq(value, item) for item in operand)
    if op == "$exists":
        return (value is not _MISSING) is bool(operand)
    if op == "$not":
        return not _condition(value, operand)
    compare = _RANGES[op]
    return any(_ordered(element, operand, compare) for element in _elements(value))


def _elements(value: Any) -> list[Any]:
    """What an operator is tested against: a list's elements, or the value itself."""
    if value is _MISSING:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _eq(value: Any, operand: Any) -> bool:
    if operand is None and value is _MISSING:
        return True
    return any(_scalar_eq(element, operand) for element in _elements(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float(number: float) -> float:
    try:
        return float(number)
    except OverflowError:
        return math.inf if number > 0 else -math.inf


def _scalar_eq(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return _as_float(a) == _as_float(b)
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return False


def _ordered(a: Any, b: Any, compare: Callable[[Any, Any], Any]) -> bool:
    if _is_number(a) and _is_number(b):
        return bool(compare(_as_float(a), _as_float(b)))
    if isinstance(a, str) and isinstance(b, str):
        return bool(compare(a, b))
    return False
