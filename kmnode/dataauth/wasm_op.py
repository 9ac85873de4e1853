"""Data operations written in WebAssembly, run by the contract VM (issue 15).

Besides the built-in operations, an operator may register a module (``data.op_register``); a
dataset's owner allows it by name, and every token for it binds its checksum (sha256 of the
module), so a changed module is another operation, as in Ocean's allowlist by checksum. The
owner's trust is in that code: it sees the column it is given and its one number comes back
to the user, so the owner allows only code it has read.

The ABI (``examples/dataops/variance.wat``): the contract VM's host functions with no storage
(an operation keeps nothing); the exported ``run`` takes nothing and returns 0 on success; its
input (``args_copy``) is one numeric column as little-endian f64 in row order; its result
(``set_result``) is one little-endian f64. Before the code runs, a column of fewer rows than
the dataset's minimum group is refused, as for every aggregate; fuel bounds the work; a trap, a
revert or a result of another shape is ``op-failed``, and the result is reported rounded like
the built-ins' (``ops.rounded``).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from kmnode.contracts.vm import ContractError, ContractVM
from kmnode.dataauth.ops import Limits, OpRefused, canonical_json, rounded
from kmnode.dataauth.table import Table, TableError

#: The exported function an operation runs, and the fuel one run may use.
ENTRY = "run"
OP_FUEL = 50_000_000
#: The largest module an operator may register (bytes of wasm).
MAX_OP_CODE_BYTES = 40 * 1024


class WasmOpParams(BaseModel):
    """A WebAssembly operation's parameters: the column it reads."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    column: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class _NoStorage:
    """An operation's storage: nothing to read, nothing kept (a write is refused)."""

    def get(self, key: bytes) -> bytes | None:
        return None

    def set(self, key: bytes, value: bytes) -> None:
        raise OpRefused("op-failed", "a data operation keeps no storage")

    def delete(self, key: bytes) -> None:
        raise OpRefused("op-failed", "a data operation keeps no storage")


def checksum(code: bytes) -> str:
    """What a token binds for a WebAssembly operation: the module's sha256 (hex)."""
    return hashlib.sha256(code).hexdigest()


def validate_wasm_params(params: Mapping[str, object]) -> dict[str, object]:
    try:
        return WasmOpParams.model_validate(dict(params)).model_dump(mode="json")
    except (ValidationError, TypeError) as exc:
        raise OpRefused(
            "bad-params", f"a WebAssembly operation takes {{'column'}}: {exc}"
        ) from None


def check_module(vm: ContractVM, code: bytes) -> None:
    """Refuse a module that cannot be an operation (``OpRefused`` op-failed)."""
    if not 0 < len(code) <= MAX_OP_CODE_BYTES:
        raise OpRefused("op-failed", f"an operation is 1 to {MAX_OP_CODE_BYTES} bytes of wasm")
    try:
        vm.check(code)
    except ContractError as exc:
        raise OpRefused("op-failed", str(exc)) from None


def run_wasm_op(
    vm: ContractVM,
    code: bytes,
    name: str,
    version: int,
    table: Table,
    params: Mapping[str, object],
    limits: Limits,
) -> bytes:
    """The operation's result as canonical JSON (``{"op","version","value"}``), or
    ``OpRefused`` saying why not."""
    column = str(validate_wasm_params(params)["column"])
    try:
        values = table.numeric(column)
    except TableError as exc:
        raise OpRefused("bad-data", str(exc)) from None
    if len(values) < limits.min_group_size:
        raise OpRefused(
            "group-too-small", f"fewer than {limits.min_group_size} rows (the minimum group)"
        )
    check_module(vm, code)
    args = struct.pack(f"<{len(values)}d", *values)
    try:
        outcome = vm.call(code, ENTRY, args, "", _NoStorage(), OP_FUEL)
    except ContractError as exc:
        raise OpRefused("op-failed", str(exc)) from None
    if outcome.status != "ok":
        why = outcome.error or f"returned {outcome.code}"
        raise OpRefused("op-failed", f"the operation {outcome.status}: {why}")
    if len(outcome.result) != 8:
        raise OpRefused("op-failed", "the operation's result is not one f64")
    (value,) = struct.unpack("<d", outcome.result)
    if not math.isfinite(value):
        raise OpRefused("op-failed", "the operation's result is not a finite number")
    result = canonical_json({"op": name, "version": version, "value": rounded(value)})
    if len(result) > limits.max_result_bytes:
        raise OpRefused("result-too-large", f"over {limits.max_result_bytes} bytes")
    return result
