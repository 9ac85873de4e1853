"""One node's contract executor: committed calls in, results and state roots out.

It ties the VM to the state: each call runs over its own view of the internal cache (whose
misses go through the verified backing to the host's store), and only a call that ended
``ok`` commits its writes; a revert or a trap leaves nothing. A storage failure (the host
tampered with state) is not a result: the executor stops executing, remembers why, and
refuses every later call until it is repaired (``halted``), so nothing computed from state
it cannot trust ever comes out.

Calls must arrive in log order; the executor holds no clock and no randomness, so every node
that executes the same committed calls returns the same results and roots.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kmnode.contracts.cache import CacheConfig, ContractCache
from kmnode.contracts.sealed_state import TamperError
from kmnode.contracts.verified import VerifiedBacking
from kmnode.contracts.vm import DEFAULT_FUEL, CallResult, ContractError, ContractVM


class ExecutorHalted(Exception):
    """The executor stopped: state it read could not be trusted (the reason says how)."""


@dataclass(frozen=True)
class Deployed:
    name: str
    code_id: str


class Executor:
    """Contracts by name, their calls, and the state roots they lead to."""

    def __init__(self, backing: VerifiedBacking, config: CacheConfig | None = None) -> None:
        self.vm = ContractVM()
        self.backing = backing
        self.cache = ContractCache(config or CacheConfig(), backing)
        self._code: dict[str, bytes] = {}
        #: Why execution stopped (a ``TamperError``'s text), or "" while it runs.
        self.halted = ""

    def deploy(self, name: str, code: bytes) -> Deployed:
        """Check and register contract ``name`` (``ContractError`` if it may not run)."""
        if name in self._code:
            raise ContractError(f"a contract named {name!r} exists")
        code_id = self.vm.check(code)
        self._code[name] = code
        return Deployed(name, code_id)

    def execute(
        self,
        contract: str,
        function: str,
        args: bytes,
        caller: str,
        fuel: int = DEFAULT_FUEL,
    ) -> CallResult:
        """Run one committed call; its writes stay only if it ended ``ok``."""
        if self.halted:
            raise ExecutorHalted(self.halted)
        code = self._code.get(contract)
        if code is None:
            raise ContractError(f"no contract named {contract!r}")
        view = self.cache.call(contract)
        try:
            result = self.vm.call(code, function, args, caller, view, fuel)
        except TamperError as exc:
            view.abort()
            self.halted = f"contract state of {contract!r} was tampered with: {exc}"
            raise ExecutorHalted(self.halted) from None
        except BaseException:
            view.abort()
            raise
        if result.status == "ok":
            view.commit()
        else:
            view.abort()
        return result

    def names(self) -> list[str]:
        """The deployed contracts' names."""
        return sorted(self._code)

    def roots(self) -> Mapping[str, bytes]:
        """Every contract's state root after writing back what the cache holds (a checkpoint
        compares them across nodes)."""
        self.cache.flush()
        return {name: self.backing.root(name) for name in sorted(self._code)}

    def __repr__(self) -> str:
        return f"Executor(contracts={len(self._code)}, halted={bool(self.halted)})"


__all__ = ["Deployed", "Executor", "ExecutorHalted"]
