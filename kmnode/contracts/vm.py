"""The contract VM: WebAssembly run by wasmtime, with fuel metering, deterministic.

Every node's service enclave executes every committed call, in log order, and the results and
state roots are compared across nodes, so a call must do exactly the same thing everywhere:
the same instructions, the same fuel, a trap at the same point. Hence:

* fuel metering (``Config.consume_fuel``): each call gets a budget; wasm instructions and the
  host functions below cost fuel, and running out traps (``out of fuel``) at the same
  instruction on every node;
* NaN canonicalisation, and no threads: the sources of nondeterminism wasm leaves open;
* nothing survives a call but what it writes to its storage: each call sees the memory of a
  fresh instance. A module that can keep nothing else (no mutable global, no table, no passive
  data: ``wasm_shape.resettable``) keeps one instance, whose memory is put back to its bytes
  right after instantiation before every call (instantiating was half a call's cost); any
  other gets a fresh instance per call. Memory is capped (``MAX_MEMORY_BYTES``);
* imports only from the host functions below (``env``); a module importing anything else is
  refused at deploy, so a contract reaches nothing but its own storage.

The ABI, for contracts written in any language that compiles to wasm (the examples are
hand-written .wat, so no toolchain is needed): an exported function takes nothing and returns
an i32, 0 for success and any other value to revert (its writes are dropped, like a trap).
It reads its arguments and its caller's name with ``args_copy``/``caller_copy`` (length, and a
copy if it fits: one host call; or ``args_len`` then ``args_read``, and ``caller_len`` then
``caller_read``), its storage with ``storage_read`` (value length, or -1 if
absent; copies only if it fits), ``storage_write`` and ``storage_remove``, says what it
returns with ``set_result`` and what happened with ``emit``; ``fuel_left`` tells it its
budget. A call's writes go to the ``Storage`` it is given; the caller (the executor) commits
them only if the call succeeded.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from wasmtime import (
    Caller,
    Config,
    Engine,
    ExitTrap,
    Func,
    FuncType,
    Instance,
    Linker,
    Memory,
    Module,
    Store,
    Trap,
    Val,
    ValType,
    WasmtimeError,
    wat2wasm,
)

from kmnode.contracts.storage import Storage, StorageLimitError, check_key, check_value
from kmnode.contracts.wasm_shape import resettable

#: The largest contract a deploy may carry (wasm binary or text).
MAX_CODE_BYTES = 256 * 1024
#: The most linear memory a call may use.
MAX_MEMORY_BYTES = 16 * 1024 * 1024
#: Fuel a call gets unless it asks for less; the most it may ask for.
DEFAULT_FUEL = 10_000_000
MAX_FUEL = 100_000_000
#: What a call may hand back: its result, and its events (how many, how long each).
MAX_RESULT_BYTES = 64 * 1024
MAX_EVENTS = 16
MAX_EVENT_BYTES = 1024
#: Fuel the host functions cost: a call, and each byte they copy (a storage access costs
#: more, since behind it sits the cache, and possibly the host).
FUEL_PER_HOST_CALL = 100
FUEL_PER_STORAGE_CALL = 1_000
FUEL_PER_BYTE = 1
#: Compiled modules kept per VM (compiling costs milliseconds; a call a few microseconds).
MODULE_CACHE = 64

I32, I64 = ValType.i32(), ValType.i64()


class ContractError(Exception):
    """A contract cannot be deployed or called as given (the message says why)."""


@dataclass(frozen=True)
class CallResult:
    """What one call did. ``status``: ``ok``; ``reverted`` (it returned ``code`` != 0);
    ``trapped`` (``error`` says why: out of fuel, a wasm trap, a host function refused).
    Only an ``ok`` call's writes may be committed."""

    status: Literal["ok", "reverted", "trapped"]
    fuel_used: int
    result: bytes = b""
    events: tuple[bytes, ...] = ()
    code: int = 0
    error: str = ""

    def __repr__(self) -> str:  # results and events are the caller's, not for logs
        return (
            f"CallResult({self.status}, fuel_used={self.fuel_used}, code={self.code}, "
            f"result={len(self.result)} bytes, events={len(self.events)}, error={self.error!r})"
        )


class _Refused(Exception):
    """A host function refuses (a limit, a bad pointer): the call traps with this reason."""


@dataclass
class _Call:
    """The state of one call, which the host functions read and change."""

    store: Store
    storage: Storage
    args: bytes
    caller: bytes
    #: The instance's memory (looked up once per instance, not once per host call), its
    #: address (it never moves: ``memory_may_move`` is off) and the least size it has had in
    #: this call (memory only grows; ``_bounds`` asks again when that is not enough).
    memory: Memory | None = None
    base: int = 0
    size: int = 0
    result: bytes = b""
    events: list[bytes] = field(default_factory=list)
    #: What the storage raised that is not the contract's doing (the host tampered with
    #: state, say): the call is unwound and ``ContractVM.call`` raises it.
    failure: Exception | None = None


def _engine() -> Engine:
    config = Config()
    config.consume_fuel = True
    config.cranelift_nan_canonicalization = True
    config.wasm_threads = False
    config.wasm_relaxed_simd = False
    # A linear memory stays where it was mapped (growing within its reservation), so the
    # host functions may keep its address for a whole call (``_bounds``).
    config.memory_may_move = False
    return Engine(config)


class ContractVM:
    """Deploy checks and calls of contracts on one engine (one per service enclave)."""

    def __init__(self) -> None:
        self._engine = _engine()
        self._modules: OrderedDict[str, Module] = OrderedDict()
        #: Instances kept between calls, for modules that can keep nothing else (``_Warm``).
        self._warm: OrderedDict[str, _Warm | None] = OrderedDict()
        #: Whether to keep instances at all (off: a fresh instance per call, the reference).
        self.reuse_instances = True
        # One linker for every call: its host functions work on the call in progress (calls
        # run one at a time), so a call costs a store and an instance, not a linker.
        self._current: _Call | None = None
        self._linker = Linker(self._engine)
        for name, (params, results, make) in _HOST_FUNCTIONS.items():
            self._linker.define_func(
                "env", name, FuncType(params, results), make(self._state), True
            )

    def _state(self) -> _Call:
        if self._current is None:
            raise _Refused("no call is in progress")
        return self._current

    # --- deploy ---------------------------------------------------------------------------------

    def check(self, code: bytes) -> str:
        """Refuse a contract that may not run (``ContractError``); else its code id (SHA-256)."""
        self._module(code)
        return hashlib.sha256(code).hexdigest()

    def _module(self, code: bytes) -> Module:
        code_id = hashlib.sha256(code).hexdigest()
        module = self._modules.get(code_id)
        if module is not None:
            self._modules.move_to_end(code_id)
            return module
        if not 0 < len(code) <= MAX_CODE_BYTES:
            raise ContractError(f"contract code is 1 to {MAX_CODE_BYTES} bytes, not {len(code)}")
        try:
            module = (
                Module(self._engine, code)
                if code.startswith(b"\0asm")
                else Module(self._engine, code.decode("utf-8"))
            )
        except (WasmtimeError, UnicodeDecodeError) as exc:
            raise ContractError(f"not a valid WebAssembly module: {_first_line(exc)}") from None
        for imported in module.imports:
            if imported.module != "env" or imported.name not in _HOST_FUNCTIONS:
                raise ContractError(
                    f"contract imports {imported.module}.{imported.name}: only the host "
                    f"functions env.{{{', '.join(sorted(_HOST_FUNCTIONS))}}} exist"
                )
        if "memory" not in {e.name for e in module.exports}:
            raise ContractError("contract exports no memory")
        self._modules[code_id] = module
        if len(self._modules) > MODULE_CACHE:
            self._modules.popitem(last=False)
        return module

    # --- call -----------------------------------------------------------------------------------

    def call(
        self,
        code: bytes,
        function: str,
        args: bytes,
        caller: str,
        storage: Storage,
        fuel: int = DEFAULT_FUEL,
    ) -> CallResult:
        """Run ``function`` of ``code`` once; never raises for what the contract does (a trap,
        a revert, a refused host call are results), only ``ContractError`` for a call that
        cannot start (bad code, no such function, a fuel budget out of range), and whatever
        ``storage`` raised (the call is abandoned: e.g. a ``TamperError`` from state the host
        changed)."""
        if not 0 < fuel <= MAX_FUEL:
            raise ContractError(f"fuel is 1 to {MAX_FUEL}, not {fuel}")
        module = self._module(code)
        warm = self._warm_instance(code, module) if self.reuse_instances else None
        if warm is not None:
            state = self._current = _Call(warm.store, storage, args, caller.encode(), warm.memory)
            warm.store.set_fuel(fuel)
            try:
                result = self._run_warm(warm, function, state, fuel)
            finally:
                self._current = None
                if not warm.intact():
                    self._warm.pop(hashlib.sha256(code).hexdigest(), None)
        else:
            store = _store(self._engine, fuel)
            state = self._current = _Call(store, storage, args, caller.encode())
            try:
                result = self._run(module, function, state, fuel)
            finally:
                self._current = None
        if state.failure is not None:
            # Not a result: what the call read cannot be trusted (e.g. ``TamperError``), so
            # nothing of it may be emitted; the executor stops and says why.
            raise state.failure
        return result

    def _warm_instance(self, code: bytes, module: Module) -> _Warm | None:
        """The kept instance of a resettable module, its memory put back as it was right
        after instantiation (None: a fresh instance per call, see ``wasm_shape``)."""
        code_id = hashlib.sha256(code).hexdigest()
        if code_id in self._warm:
            self._warm.move_to_end(code_id)
            warm = self._warm[code_id]
            if warm is None or warm.reset():
                return warm
        binary = code if code.startswith(b"\0asm") else bytes(wat2wasm(code.decode("utf-8")))
        warm = None
        if resettable(binary):
            store = _store(self._engine, MAX_FUEL)
            try:
                instance = self._linker.instantiate(store, module)
            except (Trap, WasmtimeError):
                warm = None  # its start function traps: the slow path reports it per call
            else:
                warm = _Warm(store, instance)
        self._warm[code_id] = warm
        if len(self._warm) > MODULE_CACHE:
            self._warm.popitem(last=False)
        return warm

    def _run_warm(self, warm: _Warm, function: str, state: _Call, fuel: int) -> CallResult:
        export = warm.function(function)
        return self._invoke(export, state, fuel)

    def _run(self, module: Module, function: str, state: _Call, fuel: int) -> CallResult:
        store = state.store
        try:
            instance = self._linker.instantiate(store, module)
            exports = instance.exports(store)
        except (Trap, WasmtimeError) as exc:
            return CallResult("trapped", fuel - store.get_fuel(), error=_first_line(exc))
        memory = exports.get("memory")
        state.memory = memory if isinstance(memory, Memory) else None
        return self._invoke(_checked_export(exports.get(function), function, store), state, fuel)

    def _invoke(self, export: Func, state: _Call, fuel: int) -> CallResult:
        store = state.store
        try:
            code_returned = export(store)
        except (Trap, ExitTrap, WasmtimeError) as exc:
            return CallResult("trapped", fuel - store.get_fuel(), error=_trap_reason(exc))
        used = fuel - store.get_fuel()
        assert isinstance(code_returned, int)
        if code_returned != 0:
            return CallResult("reverted", used, code=code_returned)
        return CallResult("ok", used, state.result, tuple(state.events))


def _store(engine: Engine, fuel: int) -> Store:
    store = Store(engine)
    store.set_limits(memory_size=MAX_MEMORY_BYTES, instances=1, tables=1, memories=1)
    store.set_fuel(fuel)
    return store


def _checked_export(export: object, function: str, store: Store) -> Func:
    """The exported function ``function``, if it takes nothing and returns an i32."""
    if not isinstance(export, Func) or function == "memory":
        raise ContractError(f"contract exports no function {function!r}")
    kind = export.type(store)
    if [str(t) for t in kind.params] or [str(t) for t in kind.results] != ["i32"]:
        raise ContractError(f"{function!r} must take nothing and return an i32")
    return export


class _Warm:
    """One kept instance of a resettable module (``wasm_shape.resettable``): a call can leave
    nothing in it but its memory, which ``reset`` puts back to the bytes it held right after
    instantiation. Its store is used for nothing else."""

    def __init__(self, store: Store, instance: Instance) -> None:
        self.store = store
        self._exports = instance.exports(store)
        memory = self._exports.get("memory")
        assert isinstance(memory, Memory)  # checked at deploy
        self.memory = memory
        self._pristine = bytes(memory.read(store, 0, memory.data_len(store)))
        self._functions: dict[str, Func | ContractError] = {}

    def intact(self) -> bool:
        """False if the memory grew (it cannot shrink back: the instance is dropped)."""
        return self.memory.data_len(self.store) == len(self._pristine)

    def reset(self) -> bool:
        """Put the memory back; False if that is impossible (then the instance is dropped)."""
        if not self.intact():
            return False
        self.memory.write(self.store, self._pristine, 0)
        return True

    def function(self, name: str) -> Func:
        found = self._functions.get(name)
        if found is None:
            try:
                found = _checked_export(self._exports.get(name), name, self.store)
            except ContractError as exc:
                found = exc
            self._functions[name] = found
        if isinstance(found, ContractError):
            raise found
        return found


# --- the host functions ---------------------------------------------------------------------


def _bounds(state: _Call, caller: Caller, end: int) -> int:
    """The address of the contract's linear memory, if bytes up to ``end`` lie within it
    (``_Refused`` otherwise). The address is taken once a call, as the memory never moves;
    the size is asked again only when the one known is too small (memory only grows)."""
    memory = state.memory
    if memory is None:
        raise _Refused("the contract has no memory export")
    if not state.base:
        state.base = ctypes.addressof(memory.data_ptr(caller).contents)
    if end > state.size:
        state.size = memory.data_len(caller)
    return state.base if end <= state.size else 0


def _read(state: _Call, caller: Caller, ptr: int, length: int, most: int, what: str) -> bytes:
    if length < 0 or length > most:
        raise _Refused(f"{what} of {length} bytes (at most {most})")
    base = _bounds(state, caller, ptr + length)
    if ptr < 0 or not base:
        raise _Refused(f"{what} lies outside the contract's memory")
    return ctypes.string_at(base + ptr, length)


def _write(state: _Call, caller: Caller, ptr: int, data: bytes) -> None:
    base = _bounds(state, caller, ptr + len(data))
    if ptr < 0 or not base:
        raise _Refused("a copy into the contract's memory lies outside it")
    ctypes.memmove(base + ptr, data, len(data))


def _charge(state: _Call, fuel: int) -> None:
    left = state.store.get_fuel()
    if fuel > left:
        state.store.set_fuel(0)
        raise _Refused("out of fuel")
    state.store.set_fuel(left - fuel)


#: A host function; one that returns a value returns a ``Val`` of its declared type (wasmtime-py
#: then skips converting a Python int: about 4 µs a host call).
HostFunction = Callable[..., object]


Current = Callable[[], _Call]
HostMaker = Callable[[Current], HostFunction]


def _host(
    make: Callable[[Callable[[], _Call]], HostFunction],
) -> Callable[[Current], HostFunction]:
    """A host function whose refusals trap the call (with the reason), never escape it."""

    def bound(current: Current) -> HostFunction:
        inner = make(current)

        def guarded(caller: Caller, *args: int) -> object:
            try:
                return inner(caller, *args)
            except (_Refused, StorageLimitError) as exc:
                raise Trap(f"host refused: {exc}") from None
            except Exception as exc:  # the storage broke, not the contract: stop the call
                current().failure = exc
                raise Trap("storage failed") from None

        return guarded

    return bound


def _input(pick: Callable[[_Call], bytes]) -> tuple[HostMaker, HostMaker]:
    """The two host functions of one of the call's inputs (its arguments, its caller's name):
    its length, and a copy of it into the contract's memory."""

    @_host
    def length(current: Current) -> HostFunction:
        def input_len(caller: Caller) -> Val:
            state = current()
            _charge(state, FUEL_PER_HOST_CALL)
            return Val.i32(len(pick(state)))

        return input_len

    @_host
    def read(current: Current) -> HostFunction:
        def input_read(caller: Caller, ptr: int) -> None:
            state = current()
            data = pick(state)
            _charge(state, FUEL_PER_HOST_CALL + FUEL_PER_BYTE * len(data))
            _write(state, caller, ptr, data)

        return input_read

    return length, read


def _input_copy(pick: Callable[[_Call], bytes]) -> HostMaker:
    """One host call for an input: its length, and a copy of it if it fits in ``cap`` bytes
    (as ``storage_read`` does): half the host calls of ``*_len`` then ``*_read``."""

    @_host
    def copy(current: Current) -> HostFunction:
        def input_copy(caller: Caller, ptr: int, cap: int) -> Val:
            state = current()
            data = pick(state)
            _charge(state, FUEL_PER_HOST_CALL)
            if len(data) <= cap:
                _charge(state, FUEL_PER_BYTE * len(data))
                _write(state, caller, ptr, data)
            return Val.i32(len(data))

        return input_copy

    return copy


_args_len, _args_read = _input(lambda state: state.args)
_caller_len, _caller_read = _input(lambda state: state.caller)
_args_copy = _input_copy(lambda state: state.args)
_caller_copy = _input_copy(lambda state: state.caller)


@_host
def _storage_read(current: Current) -> HostFunction:
    def storage_read(caller: Caller, key_ptr: int, key_len: int, out: int, cap: int) -> Val:
        state = current()
        _charge(state, FUEL_PER_STORAGE_CALL + FUEL_PER_BYTE * max(key_len, 0))
        key = _read(state, caller, key_ptr, key_len, 256, "a storage key")
        check_key(key)
        value = state.storage.get(key)
        if value is None:
            return Val.i32(-1)
        if len(value) <= cap:
            _charge(state, FUEL_PER_BYTE * len(value))
            _write(state, caller, out, value)
        return Val.i32(len(value))

    return storage_read


@_host
def _storage_write(current: Current) -> HostFunction:
    def storage_write(caller: Caller, key_ptr: int, key_len: int, ptr: int, length: int) -> None:
        state = current()
        _charge(state, FUEL_PER_STORAGE_CALL + FUEL_PER_BYTE * (max(key_len, 0) + max(length, 0)))
        key = _read(state, caller, key_ptr, key_len, 256, "a storage key")
        value = _read(state, caller, ptr, length, 64 * 1024, "a storage value")
        check_key(key)
        check_value(value)
        state.storage.set(key, value)

    return storage_write


@_host
def _storage_remove(current: Current) -> HostFunction:
    def storage_remove(caller: Caller, key_ptr: int, key_len: int) -> None:
        state = current()
        _charge(state, FUEL_PER_STORAGE_CALL + FUEL_PER_BYTE * max(key_len, 0))
        key = _read(state, caller, key_ptr, key_len, 256, "a storage key")
        check_key(key)
        state.storage.delete(key)

    return storage_remove


@_host
def _set_result(current: Current) -> HostFunction:
    def set_result(caller: Caller, ptr: int, length: int) -> None:
        state = current()
        _charge(state, FUEL_PER_HOST_CALL + FUEL_PER_BYTE * max(length, 0))
        state.result = _read(state, caller, ptr, length, MAX_RESULT_BYTES, "a result")

    return set_result


@_host
def _emit(current: Current) -> HostFunction:
    def emit(caller: Caller, ptr: int, length: int) -> None:
        state = current()
        _charge(state, FUEL_PER_HOST_CALL + FUEL_PER_BYTE * max(length, 0))
        if len(state.events) >= MAX_EVENTS:
            raise _Refused(f"more than {MAX_EVENTS} events")
        state.events.append(_read(state, caller, ptr, length, MAX_EVENT_BYTES, "an event"))

    return emit


@_host
def _fuel_left(current: Current) -> HostFunction:
    def fuel_left(caller: Caller) -> Val:
        state = current()
        _charge(state, FUEL_PER_HOST_CALL)
        return Val.i64(int(state.store.get_fuel()))

    return fuel_left


#: name -> (parameters, results, the function for one call's state).
_HOST_FUNCTIONS: dict[
    str, tuple[list[ValType], list[ValType], Callable[[Current], HostFunction]]
] = {
    "args_len": ([], [I32], _args_len),
    "args_read": ([I32], [], _args_read),
    "caller_len": ([], [I32], _caller_len),
    "caller_read": ([I32], [], _caller_read),
    "args_copy": ([I32, I32], [I32], _args_copy),
    "caller_copy": ([I32, I32], [I32], _caller_copy),
    "storage_read": ([I32, I32, I32, I32], [I32], _storage_read),
    "storage_write": ([I32, I32, I32, I32], [], _storage_write),
    "storage_remove": ([I32, I32], [], _storage_remove),
    "set_result": ([I32, I32], [], _set_result),
    "emit": ([I32, I32], [], _emit),
    "fuel_left": ([], [I64], _fuel_left),
}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _trap_reason(exc: BaseException) -> str:
    """A trap's reason without wasmtime's backtrace (which names addresses, not behaviour)."""
    text = str(exc)
    if "all fuel consumed" in text or "out of fuel" in text:
        return "out of fuel"
    for line in text.splitlines():
        if "host refused:" in line:
            return line[line.index("host refused:") :].strip()[:300]
    for line in text.splitlines():  # wasmtime's own traps: "wasm trap: integer divide by zero"
        if "wasm trap:" in line:
            return line[line.index("wasm trap:") :].strip()[:300]
    return _first_line(exc)


__all__ = [
    "DEFAULT_FUEL",
    "MAX_CODE_BYTES",
    "MAX_FUEL",
    "CallResult",
    "ContractError",
    "ContractVM",
]
