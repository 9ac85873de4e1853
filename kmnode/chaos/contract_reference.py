"""The reference the contract check replays committed calls through: the plain executor.

The nodes run the same VM behind their internal cache, the host's store and its checks; the
reference runs it with no cache at all (``max_entries=0``: every read goes to the backing,
every committed write is written through) over a dict, under a state key of its own. So a
difference between what a node answered and what the reference computes is a fault of the
cache, the store, the verification, the ordering or the sealing: exactly what the chaos run
stresses. Its answers take the shape of the report a service enclave seals to the caller
(``kmnode.service.contracts``), minus the fields naming the operation.
"""

from __future__ import annotations

import secrets
from typing import Any

from kmnode.chaos.contract_calls import ContractCall
from kmnode.contracts.cache import CacheConfig
from kmnode.contracts.envelope import report_of
from kmnode.contracts.executor import Executor
from kmnode.contracts.sealed_state import StateSealer
from kmnode.contracts.verified import MemoryHostStore, VerifiedBacking
from kmnode.contracts.vm import ContractError

#: The report fields a reference answer fills (an executed call: all; a refused one: two).
REPORT_FIELDS = ("status", "code", "fuel_used", "result", "events", "error")


class ReferenceExecutor:
    """One contract, deployed from ``code``, executing calls in the order they are given."""

    def __init__(self, contract: str, code: bytes) -> None:
        key = secrets.token_bytes(32)
        backing = VerifiedBacking(MemoryHostStore(), lambda name: StateSealer(name, key, 1))
        self.contract = contract
        self._executor = Executor(backing, CacheConfig(max_entries=0))
        self._executor.deploy(contract, code)

    def execute(self, call: ContractCall) -> dict[str, Any]:
        """The report a service enclave would seal for ``call`` (its writes stay only if ok)."""
        try:
            result = self._executor.execute(
                call.contract, call.function, call.args_bytes(), call.caller, call.fuel
            )
        except ContractError as exc:
            return {"status": "refused", "error": str(exc)}
        return report_of(result)

    def __repr__(self) -> str:
        return f"ReferenceExecutor({self.contract})"


__all__ = ["REPORT_FIELDS", "ReferenceExecutor"]
