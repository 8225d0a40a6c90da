"""The error tree: one table row per class, retryability by branch."""

from __future__ import annotations

import inspect

import memcluster
from memcluster.core import errors


def _error_classes() -> list[type[errors.MemclusterError]]:
    return [
        obj
        for obj in vars(errors).values()
        if inspect.isclass(obj) and issubclass(obj, errors.MemclusterError)
    ]


def test_every_error_class_has_a_table_row() -> None:
    assert set(_error_classes()) == set(errors.ERROR_TABLE)


def test_retryable_exactly_below_retryable_error() -> None:
    for cls, info in errors.ERROR_TABLE.items():
        assert info.retryable == issubclass(cls, errors.RetryableError), cls


def test_wire_codes_are_unique() -> None:
    codes = [info.code for info in errors.ERROR_TABLE.values()]
    assert len(codes) == len(set(codes))


def test_caller_errors_map_to_4xx_and_fatal_to_5xx() -> None:
    for cls, info in errors.ERROR_TABLE.items():
        if issubclass(cls, errors.RequestError):
            assert 400 <= info.http_status < 500 or info.http_status == 507, cls
        if issubclass(cls, errors.FatalError):
            assert info.http_status == 500


def test_is_retryable_is_false_for_foreign_exceptions() -> None:
    assert not memcluster.is_retryable(ValueError("x"))
    assert memcluster.is_retryable(errors.NotLeader("n1 is not leader", leader_hint="n2"))
    assert not memcluster.is_retryable(errors.CorruptionError("wal: crc mismatch"))


def test_version_conflict_carries_expected_and_actual() -> None:
    exc = errors.VersionConflict("x", expected=3, actual=5)
    assert (exc.expected, exc.actual, exc.code) == (3, 5, "version_conflict")
