"""The predetermined operations a service enclave runs over a dataset (the built-ins).

An owner allows operations by name and checksum, a grant names them, a token binds one with
the digest of its parameters (``params_digest``), and the service enclave runs it here
(``run_op``). What an operation computes is part of its checksum (``OpSpec.checksum``), so an
operation that computes something else gets another checksum, and an owner's allowlist stops
covering it.

Every run is deterministic: the same table, parameters and limits give the same bytes on every
node (canonical JSON; sums by ``math.fsum``, which is exact whatever the order, and floats
rounded to 12 significant digits). Refusals are ``OpRefused`` with a short reason code.

How small groups are kept out of results (``Limits.min_group_size``, k below). Per-query rules
cannot stop every differencing attack across queries (that is what a grant's number of uses
bounds), but no single result names a group of fewer than k rows:

* the **group rule**: every aggregate is over the whole table, and a table of fewer than k
  rows is refused (``group-too-small``); ``psi_size`` also refuses a list of fewer than k
  *distinct* items (repeating one item does not make a group);
* the **cell rule**: a count of some rows of a group of N (``count`` of a column's non-empty
  cells, ``threshold_count``, a ``histogram`` bin, ``psi_size``) is reported only if it is at
  least k *and* at most N - k, and as ``null`` otherwise. The upper bound because N is one
  ``count`` away: "97 of 100 are above t" says "3 are not", which the other side of the
  threshold would have been suppressed for. For ``psi_size`` N is the number of distinct items
  (the intersection is never reported as 0 when it is not: ``null`` says "suppressed");
* the **histogram's rest**: the rows a histogram leaves unreported (null bins and the rows
  outside the edges: N minus the reported bins) are, when between 1 and k - 1, a small group
  one subtraction away, so the smallest reported bin is suppressed too, which makes the rest
  at least k.

``export`` (raw rows) is the one operation of kind ``export``: refused for ``high`` privacy
datasets (``privacy``), and like every result bounded by ``Limits.max_result_bytes``.
"""

from __future__ import annotations

import hashlib
import json
import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from kmnode.dataauth.table import MAX_CELL_CHARS, MAX_COLUMNS, Table, TableError

Privacy = Literal["low", "high"]
OpKind = Literal["aggregate", "export"]
RefusalReason = Literal[
    "unknown-op",
    "bad-params",
    "privacy",
    "group-too-small",
    "result-too-large",
    "bad-data",
    "op-failed",
]
MAX_PSI_ITEMS = 10_000
MAX_EDGES = 64
_SIGNIFICANT_DIGITS = 12


class OpRefused(ValueError):
    """An operation that did not run, or whose result is not released; ``reason`` says why in
    a short code, the message in words (never a cell's content nor a parameter's value)."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason: RefusalReason = reason
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What a result may reveal: the smallest group reported, the largest result released."""

    min_group_size: int = 5
    max_result_bytes: int = 4096

    def __post_init__(self) -> None:
        if self.min_group_size < 1 or self.max_result_bytes < 1:
            raise ValueError("min_group_size and max_result_bytes are at least 1")


# --- parameters ---------------------------------------------------------------------------

Column = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class CountParams(_Params):
    column: Column | None = None


class ColumnParams(_Params):
    column: Column


class HistogramParams(_Params):
    column: Column
    edges: list[float] = Field(min_length=2, max_length=MAX_EDGES)

    @field_validator("edges")
    @classmethod
    def _increasing(cls, edges: list[float]) -> list[float]:
        if any(a >= b for a, b in pairwise(edges)):
            raise ValueError("edges must be strictly increasing")
        return edges


class ThresholdParams(_Params):
    column: Column
    threshold: float
    above: bool = True


class PsiParams(_Params):
    column: Column
    items: list[Annotated[str, StringConstraints(max_length=MAX_CELL_CHARS)]] = Field(
        max_length=MAX_PSI_ITEMS
    )


class ExportParams(_Params):
    columns: list[Column] | None = Field(default=None, min_length=1, max_length=MAX_COLUMNS)

    @field_validator("columns")
    @classmethod
    def _unique(cls, columns: list[str] | None) -> list[str] | None:
        if columns is not None and len(set(columns)) != len(columns):
            raise ValueError("a column is named twice")
        return columns


# --- the operations -----------------------------------------------------------------------


def _group(size: int, limits: Limits, what: str = "rows") -> None:
    if size < limits.min_group_size:
        raise OpRefused(
            "group-too-small", f"fewer than {limits.min_group_size} {what} (the minimum group)"
        )


def _cell(count: int, group: int, limits: Limits) -> int | None:
    k = limits.min_group_size
    return count if k <= count <= group - k else None


def _numeric(table: Table, column: str) -> tuple[float, ...]:
    with _reading():
        return table.numeric(column)


def _column(table: Table, name: str) -> tuple[str, ...]:
    with _reading():
        return table.column(name)


@contextmanager
def _reading() -> Iterator[None]:
    """A table that cannot be read as the operation needs (no such column, not numbers) is
    ``bad-data``; the ``TableError`` names a row and a column, never a cell."""
    try:
        yield
    except TableError as e:
        raise OpRefused("bad-data", str(e)) from None


def _rounded(value: float) -> float:
    return float(f"{value:.{_SIGNIFICANT_DIGITS}g}") + 0.0  # + 0.0: no "-0.0"


def _fsum(values: tuple[float, ...]) -> float:
    try:
        return math.fsum(values)
    except OverflowError:
        raise OpRefused("bad-data", "the sum of the column overflows") from None


def _count(table: Table, p: CountParams, limits: Limits) -> object:
    _group(table.rows, limits)
    if p.column is None:
        return table.rows
    cells = _column(table, p.column)
    return _cell(len(cells) - cells.count(""), table.rows, limits)


def _sum(table: Table, p: ColumnParams, limits: Limits) -> object:
    _group(table.rows, limits)
    return _rounded(_fsum(_numeric(table, p.column)))


def _mean(table: Table, p: ColumnParams, limits: Limits) -> object:
    _group(table.rows, limits)
    values = _numeric(table, p.column)
    return _rounded(_fsum(values) / len(values))


def _histogram(table: Table, p: HistogramParams, limits: Limits) -> object:
    _group(table.rows, limits)
    values = sorted(_numeric(table, p.column))
    edges = p.edges
    starts = [bisect_left(values, e) for e in edges[:-1]] + [bisect_right(values, edges[-1])]
    counts = [b - a for a, b in pairwise(starts)]
    shown = [_cell(c, table.rows, limits) for c in counts]
    rest = table.rows - sum(c for c in shown if c is not None)
    if 0 < rest < limits.min_group_size and any(c is not None for c in shown):
        smallest = min((c, i) for i, c in enumerate(shown) if c is not None)[1]
        shown[smallest] = None
    return {"counts": shown, "edges": edges}


def _threshold_count(table: Table, p: ThresholdParams, limits: Limits) -> object:
    _group(table.rows, limits)
    values = _numeric(table, p.column)
    t = p.threshold
    above = sum(1 for v in values if v > t)
    return _cell(above if p.above else len(values) - above, table.rows, limits)


def _psi_size(table: Table, p: PsiParams, limits: Limits) -> object:
    _group(table.rows, limits)
    items = set(p.items)
    _group(len(items), limits, "distinct items")
    common = items.intersection(_column(table, p.column))
    return _cell(len(common), len(items), limits)


def _export(table: Table, p: ExportParams, limits: Limits) -> object:
    names = list(table.header) if p.columns is None else p.columns
    columns = [_column(table, name) for name in names]
    # Each cell takes at least its length and two quotes in the JSON: refuse before building a
    # result that cannot be released.
    if sum(len(cell) + 2 for column in columns for cell in column) > limits.max_result_bytes:
        raise _too_large(limits)
    return {"columns": names, "rows": [list(row) for row in zip(*columns, strict=True)]}


def _too_large(limits: Limits) -> OpRefused:
    return OpRefused("result-too-large", f"the result exceeds {limits.max_result_bytes} bytes")


# --- the registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """A built-in operation: what it is called, what it computes, what it takes."""

    name: str
    version: int
    kind: OpKind
    computes: str
    params: type[BaseModel]
    run: Callable[[Table, Any, Limits], object] = field(repr=False, compare=False)
    checksum: str = field(init=False)

    def __post_init__(self) -> None:
        text = f"kmsim-builtin-op\0{self.name}\0{self.version}\0{self.computes}"
        object.__setattr__(self, "checksum", hashlib.sha256(text.encode()).hexdigest())


_MIN = "refused below min_group_size rows"
_CELL = "a count c of a group of N reported only if min_group_size <= c <= N - min_group_size"
BUILTIN_OPS: Mapping[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec(
            "count", 1, "aggregate",
            f"the number of rows; with column, of its non-empty cells ({_CELL}); {_MIN}",
            CountParams, _count,
        ),
        OpSpec(
            "sum", 1, "aggregate",
            f"math.fsum of column as finite floats, 12 significant digits; {_MIN}",
            ColumnParams, _sum,
        ),
        OpSpec(
            "mean", 1, "aggregate",
            f"math.fsum of column as finite floats / rows, 12 significant digits; {_MIN}",
            ColumnParams, _mean,
        ),
        OpSpec(
            "histogram", 1, "aggregate",
            "counts of column's finite floats in [edges[i], edges[i+1]), the last bin closed, "
            f"{_CELL}, and the smallest reported bin suppressed if the unreported rows are "
            f"fewer than min_group_size but not 0; {_MIN}",
            HistogramParams, _histogram,
        ),
        OpSpec(
            "threshold_count", 1, "aggregate",
            f"the number of column's finite floats > threshold (above) or <= it; {_CELL}; {_MIN}",
            ThresholdParams, _threshold_count,
        ),
        OpSpec(
            "psi_size", 1, "aggregate",
            "the number of distinct items equal to a cell of column; refused below "
            f"min_group_size distinct items; {_CELL} with N the distinct items; {_MIN}",
            PsiParams, _psi_size,
        ),
        OpSpec(
            "export", 1, "export",
            "the cells of columns (all, in header order, by default) row by row; low privacy only",
            ExportParams, _export,
        ),
    )
}  # fmt: skip


# --- entry points -------------------------------------------------------------------------


def rounded(value: float) -> float:
    """A float result as every operation reports it (``_SIGNIFICANT_DIGITS`` significant
    digits), so two summation orders cannot give two results."""
    return _rounded(value)


def canonical_json(value: object) -> bytes:
    """The one JSON text of ``value``: sorted keys, no spaces, no NaN or infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def params_digest(params: Mapping[str, object]) -> str:
    """The sha256 (hex) of ``params`` as canonical JSON: what a token binds, and what the
    service enclave recomputes from the parameters it is given."""
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise OpRefused("bad-params", "parameters are a JSON object")
    try:
        return hashlib.sha256(canonical_json(dict(params))).hexdigest()
    except (ValueError, TypeError, RecursionError):
        raise OpRefused("bad-params", "parameters are not plain finite JSON") from None


def validate_params(name: str, params: Mapping[str, object]) -> dict[str, object]:
    """``params`` for operation ``name`` as JSON with every default filled in, or
    ``OpRefused`` (``unknown-op``, ``bad-params``). Send (and digest) what this returns: two
    spellings of the same parameters then bind the same digest."""
    spec = _spec(name)
    return _validated(spec, params).model_dump(mode="json")


def run_op(
    name: str,
    table: Table,
    params: Mapping[str, object],
    privacy: Privacy,
    limits: Limits,
) -> bytes:
    """Run operation ``name`` over ``table``: ``{"op", "version", "value"}`` as canonical JSON
    bytes, or ``OpRefused``. Checks, in order: the operation exists, the dataset's privacy
    allows it, its parameters, then the rules of the module docstring and the result's size."""
    spec = _spec(name)
    if privacy not in ("low", "high") or (spec.kind == "export" and privacy != "low"):
        raise OpRefused("privacy", f"{spec.name} is not allowed on {_shown(privacy)} data")
    value = spec.run(table, _validated(spec, params), limits)
    result = canonical_json({"op": spec.name, "version": spec.version, "value": value})
    if len(result) > limits.max_result_bytes:
        raise _too_large(limits)
    return result


def _spec(name: str) -> OpSpec:
    spec = BUILTIN_OPS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise OpRefused("unknown-op", f"no built-in operation {_shown(name)}")
    return spec


def _validated(spec: OpSpec, params: Mapping[str, object]) -> BaseModel:
    if not isinstance(params, Mapping):
        raise OpRefused("bad-params", "parameters are a JSON object")
    try:
        return spec.params.model_validate(dict(params))
    except ValidationError as e:
        where = "; ".join(
            f"{'.'.join(str(part)[:40] for part in error['loc']) or 'parameters'}: {error['msg']}"
            for error in e.errors(include_url=False, include_input=False, include_context=False)[:3]
        )
        raise OpRefused("bad-params", f"{spec.name}: {where}") from None


def _shown(value: object) -> str:
    """A name from a caller as a message shows it: cut short, never a whole input."""
    return repr(value[:32]) if isinstance(value, str) else f"<{type(value).__name__}>"
