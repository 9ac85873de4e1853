"""The built-in operations compute what they say, the same bytes on every node, and release
nothing about a group smaller than the minimum, nor raw rows of high-privacy data."""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmnode.dataauth.ops import (
    BUILTIN_OPS,
    Limits,
    OpRefused,
    OpSpec,
    params_digest,
    run_op,
    validate_params,
)
from kmnode.dataauth.table import Table, parse_table

K = 5
LIMITS = Limits(min_group_size=K, max_result_bytes=4096)
MARKER = "SECRET-VALUE-5be1"
finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


def _table(columns: Mapping[str, Sequence[object]]) -> Table:
    names = list(columns)
    rows = zip(*(columns[name] for name in names), strict=True)
    lines = [",".join(names), *(",".join(map(str, row)) for row in rows)]
    return parse_table(("\n".join(lines) + "\n").encode())


def _numbers(values: Sequence[float]) -> Table:
    return _table({"v": [repr(v) for v in values]})


def _value(
    name: str, table: Table, params: Mapping[str, object], limits: Limits = LIMITS
) -> object:
    result = run_op(name, table, params, "high", limits)
    decoded = json.loads(result)
    assert decoded["op"] == name and decoded["version"] == BUILTIN_OPS[name].version
    return decoded["value"]


def _refused(name: str, table: Table, params: Mapping[str, object], privacy: str = "high") -> str:
    with pytest.raises(OpRefused) as caught:
        run_op(name, table, params, privacy, LIMITS)  # type: ignore[arg-type]
    return caught.value.reason


def _rounded(value: float) -> float:
    return float(f"{value:.12g}") + 0.0


def _shown(count: int, group: int) -> int | None:
    return count if K <= count <= group - K else None


# --- what the aggregates compute -----------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(values=st.lists(finite, min_size=K, max_size=60), seed=st.integers(0, 2**32))
def test_sum_and_mean_are_exact_sums_rounded_whatever_the_row_order(
    values: list[float], seed: int
) -> None:
    table = _numbers(values)
    assert _value("sum", table, {"column": "v"}) == _rounded(math.fsum(values))
    mean = _value("mean", table, {"column": "v"})
    assert mean == _rounded(statistics.fmean(values))
    assert math.isclose(mean, statistics.fmean(values), rel_tol=1e-11, abs_tol=1e-300)
    shuffled = values[:]
    random.Random(seed).shuffle(shuffled)
    for op in ("sum", "mean"):
        one = run_op(op, table, {"column": "v"}, "high", LIMITS)
        assert run_op(op, _numbers(shuffled), {"column": "v"}, "low", LIMITS) == one


@st.composite
def histograms(draw: st.DrawFn) -> tuple[list[float], list[float]]:
    values = draw(st.lists(st.integers(-20, 20).map(float) | finite, min_size=K, max_size=80))
    edges = sorted(set(draw(st.lists(st.integers(-25, 25).map(float), min_size=2, max_size=8))))
    if len(edges) < 2:
        edges = [-1.0, 1.0]
    return values, edges


@settings(max_examples=300, deadline=None)
@given(case=histograms())
def test_a_histogram_counts_every_row_in_range_and_hides_small_groups(
    case: tuple[list[float], list[float]],
) -> None:
    values, edges = case
    n = len(values)
    last = len(edges) - 2
    true = [
        sum(1 for v in values if edges[i] <= v < edges[i + 1] or (i == last and v == edges[-1]))
        for i in range(len(edges) - 1)
    ]
    assert sum(true) == sum(1 for v in values if edges[0] <= v <= edges[-1])
    got = _value("histogram", _numbers(values), {"column": "v", "edges": edges})
    assert isinstance(got, dict) and got["edges"] == edges
    counts = got["counts"]
    assert [c for c in counts if c is not None] == [
        t for c, t in zip(counts, true, strict=True) if c is not None
    ]
    primary = {i for i, t in enumerate(true) if _shown(t, n) is None}
    suppressed = {i for i, c in enumerate(counts) if c is None}
    assert primary <= suppressed and len(suppressed - primary) <= 1
    hidden = n - sum(c for c in counts if c is not None)  # null bins and rows out of range
    assert hidden == 0 or hidden >= K  # what is left to subtract is no small group either
    if suppressed - primary:  # the one extra bin is there only to make the hidden rest large
        (extra,) = suppressed - primary
        assert 0 < hidden - true[extra] < K


def test_a_histogram_reports_each_bin_of_at_least_the_minimum() -> None:
    values = [1] * 6 + [2] * 7 + [3] * 5 + [9] * 2  # 20 rows: bins [0,2) [2,3) [3,3.5]
    table = _table({"x": values})
    got = _value("histogram", table, {"column": "x", "edges": [0, 2, 3, 3.5]})
    # 2 rows outside the edges would be one subtraction away: the smallest bin goes too
    assert got == {"counts": [6, 7, None], "edges": [0.0, 2.0, 3.0, 3.5]}
    got = _value("histogram", table, {"column": "x", "edges": [0, 2, 3, 10]})
    assert got == {"counts": [6, 7, 7], "edges": [0.0, 2.0, 3.0, 10.0]}
    got = _value("histogram", table, {"column": "x", "edges": [0, 1.5, 4, 10]})
    # [4, 10] holds 2 rows: null; and the smallest other bin too, or 20 - 12 - 6 would say 2
    assert got == {"counts": [None, 12, None], "edges": [0.0, 1.5, 4.0, 10.0]}
    assert _value("histogram", table, {"column": "x", "edges": [0, 100]}) == {
        "counts": [None],  # all 20 of 20: the other side of the bin is empty
        "edges": [0.0, 100.0],
    }


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(-10, 10), min_size=K, max_size=40), t=st.integers(-12, 12))
def test_threshold_counts_both_sides_and_hides_a_small_side(values: list[int], t: int) -> None:
    table = _table({"x": values})
    above = _value("threshold_count", table, {"column": "x", "threshold": t})
    below = _value("threshold_count", table, {"column": "x", "threshold": t, "above": False})
    n_above = sum(1 for v in values if v > t)
    assert above == _shown(n_above, len(values))
    assert below == _shown(len(values) - n_above, len(values))
    assert (above is None) == (below is None)  # one side small means the other is one away
    if above is not None:
        assert above + below == len(values)  # type: ignore[operator]


@settings(max_examples=200, deadline=None)
@given(
    column=st.lists(st.sampled_from("abcdefghij"), min_size=K, max_size=40),
    items=st.lists(st.sampled_from("abcdefghijklmnopqrstuvwxyz"), max_size=40),
)
def test_psi_size_is_the_set_intersection_when_it_hides_no_small_group(
    column: list[str], items: list[str]
) -> None:
    table = _table({"name": column})
    distinct = set(items)
    if len(distinct) < K:
        assert _refused("psi_size", table, {"column": "name", "items": items}) == "group-too-small"
        return
    got = _value("psi_size", table, {"column": "name", "items": items})
    assert got == _shown(len(distinct & set(column)), len(distinct))


def test_psi_size_counts_distinct_items_so_repeating_one_is_no_group() -> None:
    table = _table({"name": list("abcdefghij")})
    assert _refused("psi_size", table, {"column": "name", "items": ["a"] * 50}) == "group-too-small"
    items = list("abcdefghij") + list("klmnopqrst")  # 10 of 20 are in the table
    assert _value("psi_size", table, {"column": "name", "items": items}) == 10
    assert _value("psi_size", table, {"column": "name", "items": items[:14]}) is None  # 10 of 14


def test_count_counts_rows_or_non_empty_cells() -> None:
    table = _table({"x": [1] * 12, "note": ["a"] * 6 + [""] * 6})
    assert _value("count", table, {}) == 12
    assert _value("count", table, {"column": None}) == 12
    assert _value("count", table, {"column": "note"}) == 6
    assert _value("count", table, {"column": "x"}) is None  # 12 of 12: the rest is empty
    assert _value("count", table, {"column": "x"}, Limits(min_group_size=1)) is None
    small = _table({"id": range(10), "note": ["a"] * 9 + [""]})
    assert _value("count", small, {"column": "note"}, Limits(min_group_size=1)) == 9


def test_the_result_is_canonical_json_and_the_same_bytes_in_any_row_order() -> None:
    tenths = [0.1, 0.2, 0.3, 0.4, 0.5]
    table = _table({"b": [1, 2, 3, 4, 5], "a": tenths})
    assert run_op("mean", table, {"column": "b"}, "high", LIMITS) == (
        b'{"op":"mean","value":3.0,"version":1}'
    )
    # fsum, then 12 significant digits: 1.5 (a left-to-right float sum is 1.5000000000000002)
    expected = b'{"op":"sum","value":1.5,"version":1}'
    assert run_op("sum", table, {"column": "a"}, "high", LIMITS) == expected
    assert run_op("sum", _table({"a": tenths[::-1]}), {"column": "a"}, "high", LIMITS) == expected


def test_export_gives_raw_rows_of_low_privacy_data_only() -> None:
    table = _table({"name": ["ann", "bob"], "pay": [10, 20]})
    low = json.loads(run_op("export", table, {}, "low", LIMITS))
    assert low["value"] == {"columns": ["name", "pay"], "rows": [["ann", "10"], ["bob", "20"]]}
    some = json.loads(run_op("export", table, {"columns": ["pay"]}, "low", LIMITS))
    assert some["value"] == {"columns": ["pay"], "rows": [["10"], ["20"]]}
    with pytest.raises(OpRefused) as caught:
        run_op("export", table, {}, "high", LIMITS)
    assert caught.value.reason == "privacy" and "ann" not in str(caught.value)


# --- every refusal -------------------------------------------------------------------------

TABLE = _table({"x": list(range(10)), "name": list("abcdefghij"), "note": ["n"] * 9 + ["?"]})


@pytest.mark.parametrize(
    ("op", "params", "privacy", "reason"),
    [
        ("median", {"column": "x"}, "high", "unknown-op"),
        ("", {}, "high", "unknown-op"),
        ("export", {}, "high", "privacy"),
        ("export", {"columns": ["x"]}, "secret", "privacy"),
        ("mean", {"column": "x"}, "medium", "privacy"),
        ("mean", {}, "high", "bad-params"),
        ("mean", {"column": "x", "extra": 1}, "high", "bad-params"),
        ("mean", {"column": "1x"}, "high", "bad-params"),
        ("mean", {"column": 7}, "high", "bad-params"),
        ("count", {"column": ""}, "high", "bad-params"),
        ("histogram", {"column": "x", "edges": [1]}, "high", "bad-params"),
        ("histogram", {"column": "x", "edges": [1, 1]}, "high", "bad-params"),
        ("histogram", {"column": "x", "edges": [2, 1]}, "high", "bad-params"),
        ("histogram", {"column": "x", "edges": list(range(65))}, "high", "bad-params"),
        ("histogram", {"column": "x", "edges": [0, float("nan")]}, "high", "bad-params"),
        ("histogram", {"column": "x", "edges": [0, float("inf")]}, "high", "bad-params"),
        ("histogram", {"column": "x", "edges": "0,1"}, "high", "bad-params"),
        ("threshold_count", {"column": "x", "threshold": True}, "high", "bad-params"),
        ("threshold_count", {"column": "x", "threshold": "3"}, "high", "bad-params"),
        ("threshold_count", {"column": "x", "threshold": 3, "above": 1}, "high", "bad-params"),
        ("threshold_count", {"column": "x", "threshold": 10**400}, "high", "bad-params"),
        ("psi_size", {"column": "name", "items": ["a"] * 10_001}, "high", "bad-params"),
        ("psi_size", {"column": "name", "items": ["a" * 257] * 5}, "high", "bad-params"),
        ("psi_size", {"column": "name", "items": "abcdef"}, "high", "bad-params"),
        ("export", {"columns": []}, "low", "bad-params"),
        ("export", {"columns": ["x", "x"]}, "low", "bad-params"),
        ("mean", {"column": "missing"}, "high", "bad-data"),
        ("mean", {"column": "name"}, "high", "bad-data"),
        ("histogram", {"column": "note", "edges": [0, 1]}, "high", "bad-data"),
        ("psi_size", {"column": "missing", "items": list("abcdefghij")}, "high", "bad-data"),
        ("export", {"columns": ["missing"]}, "low", "bad-data"),
        ("export", {}, "low", "result-too-large"),
    ],
)
def test_every_refusal_has_its_reason(
    op: str, params: dict[str, object], privacy: str, reason: str
) -> None:
    limits = Limits(max_result_bytes=100) if reason == "result-too-large" else LIMITS
    with pytest.raises(OpRefused) as caught:
        run_op(op, TABLE, params, privacy, limits)  # type: ignore[arg-type]
    assert caught.value.reason == reason


def test_params_that_are_not_an_object_are_bad_params() -> None:
    for params in (None, [("column", "x")], "column=x"):
        with pytest.raises(OpRefused) as caught:
            run_op("mean", TABLE, params, "high", LIMITS)  # type: ignore[arg-type]
        assert caught.value.reason == "bad-params"


@pytest.mark.parametrize(
    ("op", "params"),
    [
        ("count", {}),
        ("count", {"column": "x"}),
        ("sum", {"column": "x"}),
        ("mean", {"column": "x"}),
        ("histogram", {"column": "x", "edges": [0, 10]}),
        ("threshold_count", {"column": "x", "threshold": 0}),
        ("psi_size", {"column": "x", "items": ["0", "1", "2", "3", "4", "5"]}),
    ],
)
def test_every_aggregate_refuses_a_table_smaller_than_the_minimum(
    op: str, params: dict[str, object]
) -> None:
    small = _table({"x": [0, 1, 2, 3]})
    assert _refused(op, small, params) == "group-too-small"
    assert _refused(op, _table({"x": []}), params) == "group-too-small"
    run_op(op, small, params, "high", Limits(min_group_size=4))  # at the minimum: it runs


def test_a_sum_that_overflows_is_bad_data_not_infinity() -> None:
    table = _numbers([1.7e308] * 6)
    assert _refused("sum", table, {"column": "v"}) == "bad-data"
    assert _refused("mean", table, {"column": "v"}) == "bad-data"


@pytest.mark.parametrize("cell", ["nan", "inf", "-inf", "1e999", "", "x"])
def test_a_non_finite_cell_is_bad_data(cell: str) -> None:
    table = _table({"id": range(7), "v": ["1"] * 6 + [cell]})
    for op, params in (("mean", {}), ("threshold_count", {"threshold": 0})):
        with pytest.raises(OpRefused, match="row 8, column 'v'") as caught:
            run_op(op, table, {"column": "v", **params}, "high", LIMITS)
        assert caught.value.reason == "bad-data"


def test_a_result_over_the_size_limit_is_refused() -> None:
    table = _numbers([float(i) for i in range(100)])
    edges = [float(e) for e in range(0, 101, 2)]
    params = {"column": "v", "edges": edges}
    assert len(run_op("histogram", table, params, "high", Limits(max_result_bytes=10_000))) > 200
    with pytest.raises(OpRefused) as caught:
        run_op("histogram", table, params, "high", Limits(max_result_bytes=200))
    assert caught.value.reason == "result-too-large"
    wide = _table({"blob": ["y" * 200] * 30})  # the export is refused before it is built
    with pytest.raises(OpRefused, match="exceeds 4096 bytes"):
        run_op("export", wide, {}, "low", LIMITS)


def test_limits_are_positive() -> None:
    for bad in ({"min_group_size": 0}, {"max_result_bytes": 0}, {"min_group_size": -5}):
        with pytest.raises(ValueError):
            Limits(**bad)


def test_no_cell_nor_parameter_value_in_a_refusal() -> None:
    table = _table({"v": ["1"] * 6 + [MARKER]})
    refusals = []
    for op, params in (
        ("mean", {"column": "v"}),
        ("psi_size", {"column": "v", "items": [MARKER + "x" * 300]}),
        ("psi_size", {"column": "v", "items": MARKER}),
        ("threshold_count", {"column": "v", "threshold": MARKER}),
        ("export", {"columns": [MARKER]}),
    ):
        with pytest.raises(OpRefused) as caught:
            run_op(op, table, params, "low", LIMITS)
        refusals.append(f"{caught.value} {caught.value!r} {caught.value.message}")
    assert all(MARKER not in told for told in refusals), refusals


# --- parameters, digests, checksums --------------------------------------------------------


def test_a_params_digest_is_of_canonical_json() -> None:
    one = params_digest({"column": "x", "edges": [0, 1.5]})
    assert one == params_digest({"edges": [0, 1.5], "column": "x"})
    assert one == hashlib.sha256(b'{"column":"x","edges":[0,1.5]}').hexdigest()
    assert one != params_digest({"column": "x", "edges": [0, 1.6]})
    for bad in ({"t": float("nan")}, {"t": float("inf")}, {1: "x"}, {"t": object()}, ["x"]):
        with pytest.raises(OpRefused) as caught:
            params_digest(bad)  # type: ignore[arg-type]
        assert caught.value.reason == "bad-params"


def test_validated_params_spell_the_same_parameters_one_way() -> None:
    short = validate_params("threshold_count", {"column": "x", "threshold": 3})
    full = validate_params("threshold_count", {"above": True, "threshold": 3.0, "column": "x"})
    assert short == full == {"column": "x", "threshold": 3.0, "above": True}
    assert params_digest(short) == params_digest(full)
    assert validate_params("count", {}) == {"column": None}
    assert validate_params("export", {}) == {"columns": None}
    assert run_op("threshold_count", TABLE, short, "high", LIMITS) == run_op(
        "threshold_count", TABLE, {"column": "x", "threshold": 3}, "high", LIMITS
    )
    for name, params, reason in (
        ("nope", {}, "unknown-op"),
        ("mean", {"column": "x", "y": 1}, "bad-params"),
    ):
        with pytest.raises(OpRefused) as caught:
            validate_params(name, params)
        assert caught.value.reason == reason


def test_each_operation_has_its_own_checksum_of_what_it_computes() -> None:
    assert set(BUILTIN_OPS) == {
        "count", "sum", "mean", "histogram", "threshold_count", "psi_size", "export"
    }  # fmt: skip
    assert [s.name for s in BUILTIN_OPS.values() if s.kind == "export"] == ["export"]
    checksums = {spec.checksum for spec in BUILTIN_OPS.values()}
    assert len(checksums) == len(BUILTIN_OPS)
    mean = BUILTIN_OPS["mean"]
    text = f"kmsim-builtin-op\0mean\0{mean.version}\0{mean.computes}"
    assert mean.checksum == hashlib.sha256(text.encode()).hexdigest()
    changed = OpSpec("mean", 1, "aggregate", mean.computes + " ", mean.params, mean.run)
    assert changed.checksum != mean.checksum
    bumped = OpSpec("mean", 2, "aggregate", mean.computes, mean.params, mean.run)
    assert bumped.checksum not in checksums


#: Owners' allowlists and grants name these: a change to what an operation computes must come
#: with a new version (and a new line here), never silently under an old checksum.
PINNED = {
    ("count", 1): "f6763c5d17290d0fa35536248258ec05fa904a4160e92f841e03fb60dfc97e66",
    ("sum", 1): "0057accd4f217dad0ff1cba8b29083e0a64758ec0f68b0857c351daaf279692a",
    ("mean", 1): "3580e6e9a7c3443f3231afc1681b3a8c5fd83f5b26ae47c4cee3abe5c7391249",
    ("histogram", 1): "7f76486b966862cf4d805239f581c9786f756b995d02ede5fa711992194489f5",
    ("threshold_count", 1): "dc45e524e2da583aea4aafba9c16ca0fc3bae28a5773f9aeecd4f9319bacbc03",
    ("psi_size", 1): "90effc2d9cee85dfd3213dce039d9e848c9c0b3279e7a5d40d019e00b452f224",
    ("export", 1): "fba0ea2e65a17ff33f6fb049ba244e995aa1e09a767c0dd530514965070e27c1",
}


def test_the_checksums_are_pinned() -> None:
    assert {(s.name, s.version): s.checksum for s in BUILTIN_OPS.values()} == PINNED
