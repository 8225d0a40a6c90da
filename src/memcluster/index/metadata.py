"""Columnar metadata of one shard: typed numpy columns per field path, over integer slots.

A shard keeps each memory in an integer slot ``0 <= slot < capacity``. This module stores the
memories' JSON metadata so that :mod:`memcluster.index.filters` can evaluate a filter over
every slot with a few numpy operations, never by looping over memories in Python.

Paths
    A nested object is flattened to dotted paths: ``{"a": {"b": 1}}`` stores ``1`` at
    ``"a.b"`` and records ``"a"`` as present (an object: it matches ``$exists`` and the
    negative operators, never a comparison). Metadata keys should not contain ``"."``: a key
    ``"a.b"`` is the same path as the nested ``a`` -> ``b``, and when one document produces
    the same path twice the later one (in document order) wins. Lists of objects are not
    traversed: ``"a.b"`` does not look inside ``{"a": [{"b": 1}]}``.

Layout per path (a :class:`PathColumn`)
    ``present``   bool[capacity]: the slot holds something at this path (any type).
    ``values``    :class:`TypedArrays` over slots; a path may hold different types in
                  different slots, so each type has its own sub-column, allocated the first
                  time a value of that type arrives:

                  - numbers: ``float64``, NaN where the slot holds no number. int and float
                    compare numerically; ints beyond 2**53 lose precision, and ints beyond
                    the float64 range become +/-inf. NaN stored by a caller compares unequal
                    to everything, as in IEEE 754, so no separate presence mask is needed:
                    every comparison with NaN is false, and the operators that must tell
                    "absent" from "present" (``$exists``, ``$eq: null``) read ``present``.
                  - strings: ``int32`` codes into the path's :class:`StringDictionary`,
                    -1 = no string. Codes are never reused or freed, so the dictionary holds
                    every distinct string ever written at the path (including dead ones);
                    it is rebuilt only if the shard rebuilds its columns from a snapshot.
                  - bools: ``int8`` (-1 = no bool, 0, 1). A bool is not a number:
                    ``True`` does not equal ``1``.
                  - null: a bool mask.

    ``lists``     :class:`ListElements`: the scalar elements of list values, flattened into
                  typed arrays over *elements* plus an int32 array naming each element's
                  slot, so "any element matches" is a vectorized test followed by a scatter
                  onto slots. Elements that are objects or lists are dropped (they can never
                  equal a scalar operand); the slot still counts as present.

    An object, or a value of a non-JSON type, sets only ``present``.

System fields
    ``created_at`` and ``updated_at`` are float64 columns (NaN for empty slots), and
    ``occupied`` marks the slots that :meth:`MetadataColumns.set` filled.

Costs
    ``set`` and ``clear`` are O(fields of the slot): each slot remembers the columns it wrote.
    Memory is about ``capacity * (1 + bytes of each type used)`` per path, so the number of
    distinct paths must stay bounded; :meth:`MetadataColumns.new_paths` lets the writer check
    a document before accepting it.

Not thread-safe: the shard's single writer mutates; readers evaluate between writes.
"""

from __future__ import annotations

import enum
import math
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "Kind",
    "ListElements",
    "MetadataColumns",
    "PathColumn",
    "StringDictionary",
    "TypedArrays",
    "flatten",
    "kind_of",
    "number_to_float",
]

_OBJECT: Final = object()
"""Stands for a nested object in the flattened form of a document."""

_ELEMENTS_MIN: Final = 64
"""Initial element capacity of a path's list store."""
_COMPACT_DEAD_MIN: Final = 1024
"""A list store compacts once it holds at least this many dead elements and they are over
half of it."""
_STRING_OVERHEAD_BYTES: Final = 100
"""Rough per-entry cost of a dictionary string beyond its own object (dict slot, list slot)."""


def number_to_float(value: int | float) -> float:
    """The float64 a number is stored and compared as; ints beyond the float range saturate."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


class Kind(enum.Enum):
    """What one slot holds at one path."""

    NUMBER = "number"
    STRING = "string"
    BOOL = "bool"
    NULL = "null"
    LIST = "list"
    OTHER = "other"
    """A nested object, or a value of a non-JSON type: present, never equal to a scalar."""


def kind_of(value: Any) -> Kind:
    """Classify one metadata value (after flattening)."""
    if value is None:
        return Kind.NULL
    if isinstance(value, bool):
        return Kind.BOOL
    if isinstance(value, int | float):
        return Kind.NUMBER
    if isinstance(value, str):
        return Kind.STRING
    if isinstance(value, list | tuple):
        return Kind.LIST
    return Kind.OTHER


def flatten(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten nested objects to dotted paths, in document order (pre-order).

    An object's own path maps to a private marker (it is present, holds no scalar). When two
    keys produce the same path, the later one wins. Iterative, so deep documents cannot
    exhaust the Python stack.
    """
    out: dict[str, Any] = {}
    stack: list[tuple[str, Iterator[tuple[Any, Any]]]] = [("", iter(metadata.items()))]
    while stack:
        prefix, items = stack[-1]
        for key, value in items:
            path = prefix + str(key)
            if isinstance(value, Mapping):
                out[path] = _OBJECT
                stack.append((path + ".", iter(value.items())))
                break
            out[path] = value
        else:
            stack.pop()
    return out


class StringDictionary:
    """The distinct strings of one path, each with a stable int32 code (its insertion index).

    Append-only: codes are never reused, so a code read from a column stays valid forever.
    """

    __slots__ = ("_codes", "nbytes", "values")

    def __init__(self) -> None:
        self._codes: dict[str, int] = {}
        self.values: list[str] = []
        """``values[code]`` is the string of ``code``. Read-only for callers."""
        self.nbytes = 0
        """Approximate memory held by the dictionary."""

    def __len__(self) -> int:
        return len(self.values)

    def encode(self, value: str) -> int:
        """The code of ``value``, adding it if new."""
        code = self._codes.get(value)
        if code is None:
            code = len(self.values)
            self._codes[value] = code
            self.values.append(value)
            self.nbytes += sys.getsizeof(value) + _STRING_OVERHEAD_BYTES
        return code

    def lookup(self, value: str) -> int | None:
        """The code of ``value``, or None if the path never held it."""
        return self._codes.get(value)


class TypedArrays:
    """Parallel typed arrays over positions ``[0, length)``; a position holds at most one type.

    Each array is allocated on first use, filled with its "absent" value: NaN for ``num``,
    -1 for ``codes`` and ``bools``, False for ``nulls``. Callers read the arrays directly
    (``None`` = no position ever held that type) and mutate only through the methods.
    """

    __slots__ = ("bools", "codes", "length", "nulls", "num")

    def __init__(self, length: int) -> None:
        self.length = length
        self.num: NDArray[np.float64] | None = None
        self.codes: NDArray[np.int32] | None = None
        self.bools: NDArray[np.int8] | None = None
        self.nulls: NDArray[np.bool_] | None = None

    def put(self, position: int, kind: Kind, value: Any, strings: StringDictionary) -> None:
        """Store a scalar of ``kind`` (NUMBER, STRING, BOOL or NULL) at ``position``."""
        match kind:
            case Kind.NUMBER:
                if self.num is None:
                    self.num = np.full(self.length, np.nan, dtype=np.float64)
                self.num[position] = number_to_float(value)
            case Kind.STRING:
                if self.codes is None:
                    self.codes = np.full(self.length, -1, dtype=np.int32)
                self.codes[position] = strings.encode(value)
            case Kind.BOOL:
                if self.bools is None:
                    self.bools = np.full(self.length, -1, dtype=np.int8)
                self.bools[position] = 1 if value else 0
            case Kind.NULL:
                if self.nulls is None:
                    self.nulls = np.zeros(self.length, dtype=np.bool_)
                self.nulls[position] = True
            case Kind.LIST | Kind.OTHER:
                raise AssertionError(f"metadata: {kind} is not a scalar kind")

    def clear(self, position: int, kind: Kind) -> None:
        """Undo :meth:`put` of a scalar of ``kind`` at ``position``."""
        match kind:
            case Kind.NUMBER:
                assert self.num is not None
                self.num[position] = np.nan
            case Kind.STRING:
                assert self.codes is not None
                self.codes[position] = -1
            case Kind.BOOL:
                assert self.bools is not None
                self.bools[position] = -1
            case Kind.NULL:
                assert self.nulls is not None
                self.nulls[position] = False
            case Kind.LIST | Kind.OTHER:
                raise AssertionError(f"metadata: {kind} is not a scalar kind")

    def reset(self, start: int, stop: int) -> None:
        """Make positions ``[start, stop)`` hold nothing."""
        if self.num is not None:
            self.num[start:stop] = np.nan
        if self.codes is not None:
            self.codes[start:stop] = -1
        if self.bools is not None:
            self.bools[start:stop] = -1
        if self.nulls is not None:
            self.nulls[start:stop] = False

    def resize(self, length: int) -> None:
        """Grow to ``length`` positions; the new ones hold nothing."""
        extra = length - self.length
        assert extra >= 0, "TypedArrays only grow"
        if self.num is not None:
            self.num = np.concatenate([self.num, np.full(extra, np.nan, dtype=np.float64)])
        if self.codes is not None:
            self.codes = np.concatenate([self.codes, np.full(extra, -1, dtype=np.int32)])
        if self.bools is not None:
            self.bools = np.concatenate([self.bools, np.full(extra, -1, dtype=np.int8)])
        if self.nulls is not None:
            self.nulls = np.concatenate([self.nulls, np.zeros(extra, dtype=np.bool_)])
        self.length = length

    def compact(self, keep: NDArray[np.bool_], length: int) -> None:
        """Keep only the positions where ``keep`` (over ``[0, len(keep))``) is True, in order,
        then pad to ``length`` positions."""
        kept = int(np.count_nonzero(keep))
        assert kept <= length
        pad = length - kept
        size = len(keep)
        if self.num is not None:
            self.num = np.concatenate([self.num[:size][keep], np.full(pad, np.nan)])
        if self.codes is not None:
            self.codes = np.concatenate([self.codes[:size][keep], np.full(pad, -1, dtype=np.int32)])
        if self.bools is not None:
            self.bools = np.concatenate([self.bools[:size][keep], np.full(pad, -1, dtype=np.int8)])
        if self.nulls is not None:
            self.nulls = np.concatenate([self.nulls[:size][keep], np.zeros(pad, dtype=np.bool_)])
        self.length = length

    def nbytes(self) -> int:
        """Bytes held by the allocated arrays."""
        arrays = (self.num, self.codes, self.bools, self.nulls)
        return sum(a.nbytes for a in arrays if a is not None)


class ListElements:
    """The scalar elements of the list values at one path, flattened over elements.

    Element ``i`` (``0 <= i < size``) belongs to slot ``slots[i]`` (-1 once that slot was
    cleared) and its value is in ``values`` at position ``i``. A slot's elements are the
    contiguous range ``ranges[slot]``. Clearing a slot resets its range (dead elements hold
    nothing, so they match no test); once dead elements are over half of the store, it is
    compacted, which keeps every write O(its elements) amortized.
    """

    __slots__ = ("dead", "ranges", "size", "slots", "values")

    def __init__(self) -> None:
        self.size = 0
        self.dead = 0
        self.slots: NDArray[np.int32] = np.full(_ELEMENTS_MIN, -1, dtype=np.int32)
        self.values = TypedArrays(_ELEMENTS_MIN)
        self.ranges: dict[int, tuple[int, int]] = {}

    def add(self, slot: int, elements: list[tuple[Kind, Any]], strings: StringDictionary) -> None:
        """Append ``slot``'s scalar elements. The slot must hold no elements yet."""
        assert slot not in self.ranges
        if not elements:
            return
        start, stop = self.size, self.size + len(elements)
        if stop > len(self.slots):
            grown = max(2 * len(self.slots), stop)
            self.slots = np.concatenate(
                [self.slots, np.full(grown - len(self.slots), -1, dtype=np.int32)]
            )
            self.values.resize(grown)
        self.slots[start:stop] = slot
        for position, (kind, value) in enumerate(elements, start):
            self.values.put(position, kind, value, strings)
        self.ranges[slot] = (start, stop)
        self.size = stop

    def remove(self, slot: int) -> None:
        """Forget ``slot``'s elements (no-op if it has none)."""
        span = self.ranges.pop(slot, None)
        if span is None:
            return
        start, stop = span
        self.slots[start:stop] = -1
        self.values.reset(start, stop)
        self.dead += stop - start
        if self.dead >= _COMPACT_DEAD_MIN and 2 * self.dead > self.size:
            self._compact()

    def _compact(self) -> None:
        keep = self.slots[: self.size] >= 0
        new_index = np.cumsum(keep) - 1
        for slot, (start, stop) in self.ranges.items():
            new_start = int(new_index[start])
            self.ranges[slot] = (new_start, new_start + stop - start)
        live = self.size - self.dead
        length = max(_ELEMENTS_MIN, 2 * live)
        self.slots = np.concatenate(
            [self.slots[: self.size][keep], np.full(length - live, -1, dtype=np.int32)]
        )
        self.values.compact(keep, length)
        self.size = live
        self.dead = 0

    def nbytes(self) -> int:
        """Bytes held by the arrays (the range map is not counted)."""
        return int(self.slots.nbytes) + self.values.nbytes()


class PathColumn:
    """Everything stored at one path, over slots. Read by filters; mutated only by
    :class:`MetadataColumns`."""

    __slots__ = ("lists", "path", "present", "strings", "values")

    def __init__(self, path: str, capacity: int) -> None:
        self.path = path
        self.present: NDArray[np.bool_] = np.zeros(capacity, dtype=np.bool_)
        self.values = TypedArrays(capacity)
        self.strings = StringDictionary()
        """Shared by the scalar strings and the list elements of this path."""
        self.lists: ListElements | None = None

    def put(self, slot: int, value: Any) -> Kind:
        """Store ``value`` (an empty slot's) and say which kind it went to."""
        kind = kind_of(value)
        self.present[slot] = True
        match kind:
            case Kind.NUMBER | Kind.STRING | Kind.BOOL | Kind.NULL:
                self.values.put(slot, kind, value, self.strings)
            case Kind.LIST:
                elements = [(k, e) for e in value if (k := kind_of(e)) in _SCALAR_KINDS]
                if self.lists is None:
                    self.lists = ListElements()
                self.lists.add(slot, elements, self.strings)
            case Kind.OTHER:
                pass
        return kind

    def remove(self, slot: int, kind: Kind) -> None:
        """Undo :meth:`put` of a value of ``kind`` at ``slot``."""
        self.present[slot] = False
        match kind:
            case Kind.NUMBER | Kind.STRING | Kind.BOOL | Kind.NULL:
                self.values.clear(slot, kind)
            case Kind.LIST:
                assert self.lists is not None
                self.lists.remove(slot)
            case Kind.OTHER:
                pass

    def validate(self, held: Mapping[int, Kind], capacity: int) -> None:
        """Check this column against ``held`` (slot -> kind, from the slots' field lists)."""

        def check(ok: bool | np.bool_, message: str) -> None:
            if not ok:
                raise AssertionError(f"metadata: path {self.path!r}: {message}")

        check(len(self.present) == capacity and self.values.length == capacity, "wrong length")
        expected = np.zeros(capacity, dtype=np.bool_)
        expected[list(held)] = True
        check(np.array_equal(self.present, expected), "present differs from the slots' fields")
        values = self.values
        number = {kind: i for i, kind in enumerate(Kind)}
        kinds = np.full(capacity, -1, dtype=np.int8)
        for slot, kind in held.items():
            kinds[slot] = number[kind]

        def only(kind: Kind) -> NDArray[np.bool_]:
            mask: NDArray[np.bool_] = kinds == number[kind]
            return mask

        if values.num is not None:
            check(np.isnan(values.num[~only(Kind.NUMBER)]).all(), "stale number")
        if values.codes is not None:
            codes = values.codes
            check((codes[only(Kind.STRING)] >= 0).all(), "string slot without a code")
            check((codes[~only(Kind.STRING)] == -1).all(), "stale string code")
            check((codes < len(self.strings)).all(), "code beyond the dictionary")
        if values.bools is not None:
            check((values.bools[only(Kind.BOOL)] >= 0).all(), "bool slot without a bool")
            check((values.bools[~only(Kind.BOOL)] == -1).all(), "stale bool")
        if values.nulls is not None:
            check(np.array_equal(values.nulls, only(Kind.NULL)), "null mask differs")
        list_slots = {slot for slot, kind in held.items() if kind is Kind.LIST}
        lists = self.lists
        if lists is None:
            check(not list_slots, "list values without a list store")
            return
        size = lists.size
        slots = lists.slots[:size]
        check(set(lists.ranges) <= list_slots, "element range of a slot that holds no list")
        check(int(np.count_nonzero(slots == -1)) == lists.dead, "dead count is wrong")
        check((lists.slots[size:] == -1).all(), "element beyond size")
        live = 0
        for slot, (start, stop) in lists.ranges.items():
            check(0 <= start < stop <= size, f"slot {slot}: bad element range")
            check((slots[start:stop] == slot).all(), f"slot {slot}: range holds other slots")
            live += stop - start
        check(live == size - lists.dead, "live elements outside every range")
        dead = np.flatnonzero(slots == -1)
        element_values = lists.values
        if element_values.num is not None:
            check(np.isnan(element_values.num[dead]).all(), "dead element holds a number")
        if element_values.codes is not None:
            check((element_values.codes[dead] == -1).all(), "dead element holds a string")
        if element_values.bools is not None:
            check((element_values.bools[dead] == -1).all(), "dead element holds a bool")
        if element_values.nulls is not None:
            check(not element_values.nulls[dead].any(), "dead element holds null")

    def resize(self, capacity: int) -> None:
        extra = capacity - len(self.present)
        self.present = np.concatenate([self.present, np.zeros(extra, dtype=np.bool_)])
        self.values.resize(capacity)

    def nbytes(self) -> int:
        lists = self.lists.nbytes() if self.lists is not None else 0
        return int(self.present.nbytes) + self.values.nbytes() + self.strings.nbytes + lists


_SCALAR_KINDS: Final = frozenset({Kind.NUMBER, Kind.STRING, Kind.BOOL, Kind.NULL})


class MetadataColumns:
    """Per-path typed columns over slots ``[0, capacity)``. See the module docstring."""

    def __init__(self, capacity: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"metadata: capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.occupied: NDArray[np.bool_] = np.zeros(capacity, dtype=np.bool_)
        """Slots filled by :meth:`set` and not cleared since. Read-only for callers."""
        self.created_at: NDArray[np.float64] = np.full(capacity, np.nan)
        """``$created_at`` per slot, NaN when empty. Read-only for callers."""
        self.updated_at: NDArray[np.float64] = np.full(capacity, np.nan)
        """``$updated_at`` per slot, NaN when empty. Read-only for callers."""
        self._columns: dict[str, PathColumn] = {}
        self._fields: dict[int, tuple[tuple[PathColumn, Kind], ...]] = {}

    def resize(self, capacity: int) -> None:
        """Grow to ``capacity`` slots, keeping every stored value; new slots are empty.

        Raises ValueError when asked to shrink.
        """
        if capacity < self.capacity:
            raise ValueError(
                f"metadata: cannot shrink from {self.capacity} to {capacity} slots; grow only"
            )
        extra = capacity - self.capacity
        if extra == 0:
            return
        self.occupied = np.concatenate([self.occupied, np.zeros(extra, dtype=np.bool_)])
        self.created_at = np.concatenate([self.created_at, np.full(extra, np.nan)])
        self.updated_at = np.concatenate([self.updated_at, np.full(extra, np.nan)])
        for column in self._columns.values():
            column.resize(capacity)
        self.capacity = capacity

    def set(
        self, slot: int, metadata: Mapping[str, Any], created_at: float, updated_at: float
    ) -> None:
        """Replace everything stored for ``slot`` with ``metadata`` and the timestamps.

        ``metadata`` is assumed valid (a JSON object); this never raises for its content.
        Raises IndexError if ``slot`` is outside ``[0, capacity)``.
        """
        self._check_slot(slot)
        self.clear(slot)
        fields: list[tuple[PathColumn, Kind]] = []
        for path, value in flatten(metadata).items():
            column = self._columns.get(path)
            if column is None:
                column = self._columns[path] = PathColumn(path, self.capacity)
            fields.append((column, column.put(slot, value)))
        if fields:
            self._fields[slot] = tuple(fields)
        self.occupied[slot] = True
        self.created_at[slot] = created_at
        self.updated_at[slot] = updated_at

    def clear(self, slot: int) -> None:
        """Make ``slot`` empty: no metadata, no timestamps. O(fields of the slot).

        Raises IndexError if ``slot`` is outside ``[0, capacity)``.
        """
        self._check_slot(slot)
        for column, kind in self._fields.pop(slot, ()):
            column.remove(slot, kind)
        self.occupied[slot] = False
        self.created_at[slot] = np.nan
        self.updated_at[slot] = np.nan

    def column(self, path: str) -> PathColumn | None:
        """The column of ``path``, or None if no slot ever held anything there."""
        return self._columns.get(path)

    def path_count(self) -> int:
        """How many distinct paths have a column (paths are never dropped)."""
        return len(self._columns)

    def new_paths(self, metadata: Mapping[str, Any]) -> list[str]:
        """The paths of ``metadata`` that have no column yet: what :meth:`set` would add.

        For a writer that bounds the number of paths before it accepts a document.
        """
        return [path for path in flatten(metadata) if path not in self._columns]

    def nbytes(self) -> int:
        """Memory used by the columns: exact for numpy arrays, estimated for dictionaries."""
        total = int(self.occupied.nbytes + self.created_at.nbytes + self.updated_at.nbytes)
        return total + sum(column.nbytes() for column in self._columns.values())

    def validate(self) -> None:
        """Check every invariant of the layout; raise AssertionError naming the first broken
        one. O(capacity * paths): for tests, after every step."""

        def check(ok: bool | np.bool_, message: str) -> None:
            if not ok:
                raise AssertionError(f"metadata: {message}")

        arrays = (self.occupied, self.created_at, self.updated_at)
        check(all(len(a) == self.capacity for a in arrays), "slot arrays differ from capacity")
        empty = ~self.occupied
        check(np.isnan(self.created_at[empty]).all(), "an empty slot has a created_at")
        check(np.isnan(self.updated_at[empty]).all(), "an empty slot has an updated_at")
        held: dict[str, dict[int, Kind]] = {path: {} for path in self._columns}
        for slot, fields in self._fields.items():
            check(bool(self.occupied[slot]), f"slot {slot} has fields but is not occupied")
            for column, kind in fields:
                check(self._columns.get(column.path) is column, f"slot {slot}: stray column")
                check(slot not in held[column.path], f"slot {slot} holds {column.path!r} twice")
                held[column.path][slot] = kind
        for path, column in self._columns.items():
            column.validate(held[path], self.capacity)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.capacity:
            raise IndexError(f"metadata: slot {slot} is outside [0, {self.capacity})")
