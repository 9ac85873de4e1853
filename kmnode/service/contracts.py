"""Confidential contracts in the service enclave: committed operations in, sealed results out.

The KM enclave process hands this enclave the committed contract operations (deploys and
calls) in their contract-sequence order (``ContractOp.seq``); every node's service enclave
executes every one of them, so results and state roots can be compared across nodes. What
this module decides, from its own state only:

* order: an operation is executed only if it is the next one (``seq == position + 1``); a gap
  or a replay is refused, and nothing moves;
* keys: the contract-input key (to open callers' sealed arguments) and each contract's state
  key arrive boxed from the pinned KM enclave (``ServiceEnclave.accept_contract_keys``); a
  held key is never replaced by other bytes;
* arguments: they open only with the contract-input key, and only if the caller and nonce
  sealed inside are the committed call's (sealed arguments cut from one call and pasted into
  another are refused, identically on every node);
* state: through the internal cache to the host's store, verified on every miss; a tampered
  record halts execution (``halted`` says why) before any result that depends on it leaves;
* the rollback anchor: after every ``checkpoint_every`` operations the roots are computed (the
  cache written back first) and the host is asked to keep a copy of the store; a committed
  checkpoint whose roots differ halts execution too, and the cache is dropped. A restarted
  enclave restores from a kept copy whose roots equal a committed checkpoint, then replays.

Results are for the caller alone: encrypted under the reply key the caller sealed with its
arguments (or, for arguments that did not open, boxed to the caller's X25519 key); a keyed digest of
each outcome, equal on every node and meaningless to anyone without the key, lets nodes'
outputs be compared.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nacl.public import PrivateKey

from kmnode.contracts.cache import CacheConfig, CacheStats
from kmnode.contracts.envelope import EnvelopeError, open_call, report_of, seal_result
from kmnode.contracts.executor import Executor, ExecutorHalted
from kmnode.contracts.sealed_state import StateSealer, TamperError
from kmnode.contracts.verified import HostStore, VerifiedBacking, state_root
from kmnode.contracts.vm import ContractError

#: Roots kept per checkpoint computed (the newest few: a committed checkpoint arrives after
#: the enclave reached it, usually just after).
ROOTS_KEPT = 8
#: The state-key generation contracts use (a contract's state key is not rotated).
STATE_GENERATION = 1


class ContractStore(HostStore, Protocol):
    """The host's store as this enclave uses it: records, and kept copies (checkpoints)."""

    def checkpoint(self, seq: int) -> None: ...

    def restore(self, seq: int) -> bool: ...

    def records(self, contract: str | None = None) -> Iterator[tuple[str, bytes, bytes]]: ...


class OrderError(Exception):
    """An operation out of order (a gap, or one executed already): nothing was executed."""


class NeedKeys(Exception):
    """An operation needs a key this enclave does not hold yet (the KM side provisions it,
    then sends the operation again)."""


class Halted(Exception):
    """Execution stopped; the message says why and what repairs it."""


@dataclass(frozen=True)
class Operation:
    """One committed contract operation as the KM enclave process hands it over."""

    seq: int
    kind: str  # deploy | call
    contract: str
    function: str = ""
    args: str = ""  # base64 sealed box
    caller: str = ""
    caller_box_key: str = ""  # hex
    nonce: str = ""
    fuel: int = 0
    code: str = ""  # base64 wasm (deploy)


@dataclass(frozen=True)
class Outcome:
    """What an operation did, as it may leave the enclave: the result sealed to its caller,
    and a digest equal on every node that computed the same outcome."""

    seq: int
    status: str  # ok | reverted | trapped | refused | deployed
    sealed: bytes = b""
    digest: str = ""
    fuel_used: int = 0

    def __repr__(self) -> str:
        return f"Outcome(seq={self.seq}, {self.status}, fuel_used={self.fuel_used})"


@dataclass(frozen=True)
class Deployed:
    name: str
    code: str  # base64
    deployed_seq: int


@dataclass
class _Keys:
    input: PrivateKey | None = None
    input_bytes: bytes = b""
    state: dict[str, bytes] = field(default_factory=dict)


class ContractRuntime:
    """One service enclave's contract execution (see the module docstring)."""

    def __init__(self, store: ContractStore, cache: CacheConfig, checkpoint_every: int) -> None:
        self._store = store
        self._cache_config = cache
        self.checkpoint_every = checkpoint_every
        self._keys = _Keys()
        self._sealers: dict[str, StateSealer] = {}
        #: Contracts whose code the VM refused at deploy (calls to them are refused alike).
        self._broken: dict[str, str] = {}
        self.position = 0
        self.halted = ""
        self.restores = 0
        #: Roots computed at checkpoint operations, and committed roots not yet reached.
        self.roots_at: dict[int, dict[str, str]] = {}
        self._expected: dict[int, dict[str, str]] = {}
        self._executor = self._fresh_executor()

    # --- keys -------------------------------------------------------------------------------

    def install_keys(self, input_key: bytes, state: Mapping[str, bytes]) -> list[str]:
        """Take the contract keys (``ServiceEnclave`` opened and checked their box). A key held
        already with other bytes is refused, and nothing changes."""
        if len(input_key) != 32 or any(len(k) != 32 for k in state.values()):
            raise ValueError("contract keys are 32 bytes")
        if self._keys.input_bytes and not hmac.compare_digest(self._keys.input_bytes, input_key):
            raise ValueError("the contract-input key is already held with other bytes")
        for name, key in state.items():
            held = self._keys.state.get(name)
            if held is not None and not hmac.compare_digest(held, key):
                raise ValueError(f"the state key of {name!r} is already held with other bytes")
        if not self._keys.input_bytes:
            self._keys.input, self._keys.input_bytes = PrivateKey(input_key), input_key
        self._keys.state.update(state)
        return sorted(self._keys.state)

    def _sealer(self, contract: str) -> StateSealer:
        sealer = self._sealers.get(contract)
        if sealer is None:
            key = self._keys.state.get(contract)
            if key is None:
                raise NeedKeys(f"no state key for contract {contract!r}")
            sealer = self._sealers[contract] = StateSealer(contract, key, STATE_GENERATION)
        return sealer

    def _fresh_executor(self) -> Executor:
        return Executor(VerifiedBacking(self._store, self._sealer), self._cache_config)

    # --- executing --------------------------------------------------------------------------

    def execute(self, op: Operation) -> Outcome:
        """Execute the next operation. ``OrderError``, ``NeedKeys`` and ``Halted`` mean it was
        not executed (the position stays)."""
        if self.halted:
            raise Halted(self.halted)
        if op.seq != self.position + 1:
            raise OrderError(f"operation {op.seq} is not the next one ({self.position + 1})")
        outcome = self._deploy(op) if op.kind == "deploy" else self._call(op)
        self.position = op.seq
        if op.seq % self.checkpoint_every == 0:
            self._checkpoint(op.seq)
        return outcome

    def _deploy(self, op: Operation) -> Outcome:
        self._sealer(op.contract)  # the state key must be here before anything is stored
        try:
            self._executor.deploy(op.contract, base64.b64decode(op.code, validate=True))
            status = "deployed"
        except (ContractError, ValueError) as exc:
            # Every node's VM refuses the same code alike: its calls are refused alike too.
            self._broken[op.contract] = f"the contract's code was refused: {exc}"
            status = "refused"
        return Outcome(op.seq, status, digest=self._digest({"seq": op.seq, "status": status}))

    def _call(self, op: Operation) -> Outcome:
        if self._keys.input is None:
            raise NeedKeys("no contract-input key")
        self._sealer(op.contract)
        report: dict[str, object] = {
            "seq": op.seq,
            "contract": op.contract,
            "function": op.function,
        }
        args, reply_key = self._open_args(op)
        broken = self._broken.get(op.contract)
        if args is None:
            report |= {"status": "refused", "error": "the arguments were not sealed for this call"}
        elif broken is not None:
            report |= {"status": "refused", "error": broken}
        else:
            try:
                result = self._executor.execute(op.contract, op.function, args, op.caller, op.fuel)
            except ExecutorHalted as exc:
                self.halted = str(exc)
                raise Halted(self.halted) from None
            except ContractError as exc:
                report |= {"status": "refused", "error": str(exc)}
            else:
                report |= report_of(result)
        status = str(report["status"])
        sealed = seal_result(reply_key, op.caller_box_key, _canonical(report))
        fuel = report.get("fuel_used", 0)
        return Outcome(
            op.seq, status, sealed, self._digest(report), fuel if isinstance(fuel, int) else 0
        )

    def _open_args(self, op: Operation) -> tuple[bytes | None, bytes | None]:
        """(arguments, reply key) of the call if sealed for it (``envelope.open_call``);
        (None, None) otherwise: the same answer on every node."""
        assert self._keys.input is not None
        try:
            opened = open_call(self._keys.input, op.args, op.caller, op.nonce)
        except EnvelopeError:
            return None, None
        return opened.args, opened.reply_key

    def _digest(self, report: Mapping[str, object]) -> str:
        """A keyed digest of an outcome: equal across nodes for equal outcomes, and nothing
        to whoever lacks the contract-input key (a guessable result stays unguessable)."""
        key = hashlib.blake2b(self._keys.input_bytes, person=b"kmsim-outcome").digest()
        return hashlib.blake2b(_canonical(report), key=key, digest_size=16).hexdigest()

    # --- the rollback anchor ----------------------------------------------------------------

    def roots(self) -> dict[str, str]:
        """Every deployed contract's root now (the cache written back first)."""
        roots = {name: root.hex() for name, root in self._executor.roots().items()}
        for name in self._broken:
            roots[name] = state_root(name, ()).hex()
        return dict(sorted(roots.items()))

    def _checkpoint(self, seq: int) -> None:
        roots = self.roots()
        self.roots_at[seq] = roots
        for old in sorted(self.roots_at)[:-ROOTS_KEPT]:
            del self.roots_at[old]
        self._store.checkpoint(seq)
        expected = self._expected.pop(seq, None)
        if expected is not None:
            self._compare(seq, expected)

    def check(self, seq: int, committed: Mapping[str, str]) -> None:
        """A committed checkpoint: compare now if this enclave computed roots at ``seq``,
        when it gets there if it has not yet (its results until then do not depend on it)."""
        if seq > self.position:
            self._expected[seq] = dict(committed)
        elif seq in self.roots_at:
            self._compare(seq, committed)

    def _compare(self, seq: int, committed: Mapping[str, str]) -> None:
        ours = self.roots_at[seq]
        differing = sorted(
            n for n in ours.keys() | committed.keys() if ours.get(n) != committed.get(n)
        )
        if differing and not self.halted:
            self.halted = (
                f"the state roots of {', '.join(map(repr, differing))} after operation {seq} "
                "differ from the committed checkpoint: resync from a peer (kmctl contracts "
                "resync NODE)"
            )
            self._executor.cache.drop()

    def restore(
        self,
        checkpoints: Sequence[tuple[int, Mapping[str, str]]],
        contracts: list[Deployed],
        from_genesis: bool,
    ) -> None:
        """Start over from the newest kept copy of the host's store whose roots equal a
        committed checkpoint (``checkpoints``, newest first), or from nothing when every
        operation since the first is still kept (``from_genesis``). Clears ``halted`` if it
        succeeds; sets it, naming why, if nothing verifies."""
        self.restores += 1
        self.halted = ""
        self._broken.clear()
        self.roots_at.clear()
        self._expected.clear()
        for seq, committed in checkpoints:
            if self._restore_to(seq, committed, contracts):
                return
        if from_genesis:
            self._executor = self._fresh_executor()
            self.position = 0
            for contract, hidden, _record in list(self._store.records()):
                self._store.put_many(contract, {hidden: None})
            return
        self.position = 0
        self.halted = (
            "no copy of the contract state in the host's store matches a committed "
            "checkpoint: resync from a peer (kmctl contracts resync NODE)"
        )

    def _restore_to(
        self, seq: int, committed: Mapping[str, str], contracts: list[Deployed]
    ) -> bool:
        if not self._store.restore(seq):
            return False
        executor = self._fresh_executor()
        by_contract: dict[str, list[tuple[bytes, bytes]]] = {}
        for contract, hidden, record in self._store.records():
            by_contract.setdefault(contract, []).append((hidden, record))
        live = [c for c in contracts if c.deployed_seq <= seq]
        if set(by_contract) - {c.name for c in live}:
            return False
        roots: dict[str, str] = {}
        self._broken.clear()
        try:
            for deployed in live:
                try:
                    executor.deploy(deployed.name, base64.b64decode(deployed.code))
                except (ContractError, ValueError) as exc:
                    self._broken[deployed.name] = f"the contract's code was refused: {exc}"
                root = executor.backing.adopt(deployed.name, by_contract.get(deployed.name, []))
                roots[deployed.name] = root.hex()
        except TamperError:
            return False
        if roots != dict(committed):
            return False
        self._executor = executor
        self.position = seq
        self.roots_at[seq] = dict(sorted(roots.items()))
        return True

    # --- views ------------------------------------------------------------------------------

    def contracts(self) -> list[str]:
        """The contracts this enclave has deployed (those whose code was refused too)."""
        return sorted({*self._executor.names(), *self._broken})

    def cache_stats(self) -> CacheStats:
        return self._executor.cache.stats

    @property
    def cache_config(self) -> CacheConfig:
        return self._cache_config

    def __repr__(self) -> str:
        return f"ContractRuntime(position={self.position}, halted={bool(self.halted)})"


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


__all__ = [
    "ContractRuntime",
    "ContractStore",
    "Deployed",
    "Halted",
    "NeedKeys",
    "Operation",
    "OrderError",
    "Outcome",
]
