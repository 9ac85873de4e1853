"""Benchmark: the contract VM and the service enclave's internal cache (issue 14's figures).

Every figure is measured against its baseline in the same run, in rounds that alternate which
of the two goes first (the 2-core machine is shared and its speed drifts), and reported as the
median over the rounds with the ratio of the medians:

1. **cache vs none**: token transfers through an ``Executor`` whose internal cache holds most
   of the 10,000 pre-minted accounts against one with ``max_entries=0``, account choice uniform
   and Zipf(0.99). A miss takes the node's real path: the verified backing opens the sealed
   record that the host's ``ContractStore`` (SQLite) sends back over a socketpair from another
   process. Where the time goes is printed with it: the VM and the cache, sealing and opening
   (``VerifiedBacking``), and the host's round trips.
2. **the sweep**: hit ratio and calls/s against ``max_entries`` (a PNG), with the calls/s the
   EPC model gives for a fixed budget that the larger caches outgrow (the cliff as a curve).
3. **the enclave-memory cliff**: one cache that holds every account, its modelled enclave
   footprint (``kmnode.contracts.epc``: the hash table as a native enclave lays it out) at
   0.5x, 1x, 1.5x, 2x and 4x an EPC budget (``CacheConfig.epc_budget_bytes``; a resident page
   costs nothing, one swapped in 40,000 cycles), uniform access, each point against the one
   within the budget. The modelled time is the measured time plus the modelled swap cycles at
   this CPU's cycle rate.
4. **against an EVM**: the token's ``transfer`` on ``ContractVM`` (wasmtime) against the same
   ERC20-style transfer on py-evm (hand-assembled bytecode, Shanghai rules, the balances in
   its journaled state over an in-memory database). Both sides run execution alone: no
   signatures, no blocks, no state-root computation.

    python -m bench.contracts                  # full run (several minutes on 2 cores)
    python -m bench.contracts --quick          # smoke run: fewer calls, sizes, rounds
    python -m bench.contracts --fsync --only cache   # figure 1, the host's store fsyncing
    python -m bench.contracts --out DIR        # the PNG and JSON into DIR (default bench/results)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import random
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bench.machine import cpu_model, cpu_probe_ms
from kmnode.contracts.cache import CacheConfig
from kmnode.contracts.epc import footprint_bytes
from kmnode.contracts.executor import Executor
from kmnode.contracts.sealed_state import StateSealer
from kmnode.contracts.verified import HostStore, MemoryHostStore, VerifiedBacking
from kmnode.ring.ocall import cycles_per_second

if TYPE_CHECKING:
    from eth.abc import MessageAPI, StateAPI, TransactionContextAPI
    from eth_typing import Address
else:
    Address = bytes

ROOT = Path(__file__).resolve().parent.parent
TOKEN = (ROOT / "examples" / "contracts" / "token.wat").read_bytes()
RESULTS = Path(__file__).resolve().parent / "results"
OWNER = "owner"
#: Every account's balance before the run: transfers of 1 never run one dry.
START_BALANCE = 10**9
ZIPF_S = 0.99
#: What the cache figure holds: enough of 10,000 accounts for a uniform hit ratio >= 0.75.
CACHED_ENTRIES = 8192
#: The issue's goals.
GOAL_UNIFORM = 2.5
GOAL_UNIFORM_HIT = 0.75
GOAL_ZIPF = 2.0
GOAL_CLIFF = 2.0
#: The cliff figure's points: the cache's modelled footprint over the EPC budget.
CLIFF_MULTIPLES = (0.5, 1.0, 1.5, 2.0, 4.0)
GOAL_EVM = 2.0

Distribution = Literal["uniform", "zipf"]
StoreKind = Literal["process", "memory"]
DISTRIBUTIONS: tuple[Distribution, ...] = ("uniform", "zipf")


# --- the workload -------------------------------------------------------------------------------


def account(index: int) -> str:
    return f"acct-{index:05d}"


def balance_key(name: str) -> bytes:
    """The token contract's storage key of an account's balance (see token.wat)."""
    return b"b:" + name.encode()


@functools.cache
def zipf_table(accounts: int) -> tuple[list[int], list[float]]:
    """Zipf(0.99) over ``accounts``: who is hot (a ranking fixed for the run, shuffled so the
    hot accounts are not neighbours in name order) and the cumulative weights of the ranks."""
    ranking = list(range(accounts))
    random.Random(accounts).shuffle(ranking)
    weights = itertools.accumulate(1 / (rank**ZIPF_S) for rank in range(1, accounts + 1))
    return ranking, list(weights)


def picks(accounts: int, count: int, distribution: Distribution, rng: random.Random) -> list[int]:
    """``count`` account indexes, uniform or Zipf(0.99) (the same accounts hot every time)."""
    if distribution == "uniform":
        return [rng.randrange(accounts) for _ in range(count)]
    ranking, cumulative = zipf_table(accounts)
    return rng.choices(ranking, cum_weights=cumulative, k=count)


def pairs(
    accounts: int, count: int, distribution: Distribution, seed: int
) -> list[tuple[int, int]]:
    """``count`` (payer, payee) account indexes chosen by ``distribution`` (same seed, same
    pairs): the same transfers for every configuration and for both VMs."""
    chosen = picks(accounts, 2 * count, distribution, random.Random(seed))
    return list(zip(chosen[::2], chosen[1::2], strict=True))


@dataclass(frozen=True)
class Transfer:
    """One call of the token's ``transfer``: the caller pays 1 to ``payee``."""

    caller: str
    payee: str

    @property
    def args(self) -> bytes:
        return (1).to_bytes(8, "little") + self.payee.encode()


def transfers(accounts: int, count: int, distribution: Distribution, seed: int) -> list[Transfer]:
    return [Transfer(account(a), account(b)) for a, b in pairs(accounts, count, distribution, seed)]


# --- the host's store, in another process -------------------------------------------------------


def _serve_store(path: str, fsync: bool, sock: socket.socket) -> None:
    """The child process: the host's ``ContractStore`` answering on its end of the pair until
    the parent closes its end."""
    from kmnode.host.contract_store import ContractStore

    with ContractStore(Path(path), fsync=fsync) as store:
        store.serve(sock).join()


@contextlib.contextmanager
def host_store(kind: StoreKind, fsync: bool) -> Iterator[HostStore]:
    """The host's store as the service enclave reaches it. ``process``: the node's real miss
    path, a ``ContractStore`` on SQLite in a child process behind a socketpair and the
    ``StoreClient``; ``memory``: a dict in this process (no round trip, for comparison)."""
    if kind == "memory":
        yield MemoryHostStore()
        return
    from kmnode.contracts.store_wire import StoreClient

    with tempfile.TemporaryDirectory(prefix="kmsim-bench-contracts-") as tmp:
        ours, theirs = socket.socketpair()
        child = multiprocessing.get_context("spawn").Process(
            target=_serve_store, args=(str(Path(tmp) / "contracts.sqlite3"), fsync, theirs)
        )
        child.start()
        theirs.close()
        client = StoreClient(ours, timeout=60.0)
        try:
            yield client
        finally:
            client.close()
            child.join(30)
            if child.is_alive():
                child.terminate()
                child.join(10)


# --- timing the miss path -----------------------------------------------------------------------


@dataclass
class Clock:
    """Seconds spent in the backing (sealing, opening, checking, and the host within it) and
    in the host's store alone (its round trips)."""

    backing_s: float = 0.0
    host_s: float = 0.0
    host_calls: int = 0


class TimedStore:
    """A ``HostStore`` that adds each round trip's time to a ``Clock``."""

    def __init__(self, inner: HostStore, clock: Clock) -> None:
        self._inner = inner
        self._clock = clock

    def get(self, contract: str, hidden: bytes) -> bytes | None:
        start = time.perf_counter()
        try:
            return self._inner.get(contract, hidden)
        finally:
            self._clock.host_s += time.perf_counter() - start
            self._clock.host_calls += 1

    def put_many(self, contract: str, records: Mapping[bytes, bytes | None]) -> None:
        start = time.perf_counter()
        try:
            self._inner.put_many(contract, records)
        finally:
            self._clock.host_s += time.perf_counter() - start
            self._clock.host_calls += 1


class TimedBacking(VerifiedBacking):
    """The verified backing, its loads and write-backs timed into a ``Clock``."""

    def __init__(
        self, store: HostStore, sealer: Callable[[str], StateSealer], clock: Clock
    ) -> None:
        super().__init__(TimedStore(store, clock), sealer)
        self.clock = clock

    def load(self, contract: str, key: bytes) -> bytes | None:
        start = time.perf_counter()
        try:
            return super().load(contract, key)
        finally:
            self.clock.backing_s += time.perf_counter() - start

    def store(self, contract: str, writes: Mapping[bytes, bytes | None]) -> None:
        start = time.perf_counter()
        try:
            super().store(contract, writes)
        finally:
            self.clock.backing_s += time.perf_counter() - start


class Sealers:
    """Each contract's ``StateSealer``, made once (a fixed bench key: the KM flow is not what
    is measured here)."""

    def __init__(self) -> None:
        self._key = hashlib.sha256(b"kmsim bench contracts").digest()
        self._made: dict[str, StateSealer] = {}

    def __call__(self, contract: str) -> StateSealer:
        sealer = self._made.get(contract)
        if sealer is None:
            sealer = self._made[contract] = StateSealer(contract, self._key, 1)
        return sealer


# --- a token with pre-minted accounts -----------------------------------------------------------


@dataclass
class Token:
    """One token contract on one executor, its accounts minted."""

    contract: str
    executor: Executor
    clock: Clock
    accounts: int


def token(
    store: HostStore, sealers: Sealers, contract: str, config: CacheConfig, accounts: int
) -> Token:
    """Deploy the token as ``contract``, init it, and mint ``accounts`` balances. The balances
    reach the host as write-back batches of the verified backing, exactly what minting them
    call by call would write back, without 10,000 calls per configuration; the cache starts
    empty (``warm`` fills it)."""
    clock = Clock()
    executor = Executor(TimedBacking(store, sealers, clock), config)
    executor.deploy(contract, TOKEN)
    if executor.execute(contract, "init", b"", OWNER).status != "ok":
        raise RuntimeError("the token's init failed")
    executor.cache.flush()
    balance = START_BALANCE.to_bytes(8, "little")
    for start in range(0, accounts, 2048):
        batch = {
            balance_key(account(i)): balance for i in range(start, min(accounts, start + 2048))
        }
        executor.backing.store(contract, batch)
    return Token(contract, executor, clock, accounts)


def warm(token: Token, indexes: Iterable[int]) -> None:
    """Fill the cache as calls touching these accounts in this order would: read (never
    write) their balances through one call view that is then aborted (what a call read stays
    cached, whatever becomes of the call)."""
    if token.executor.cache.config.max_entries == 0:
        return
    with token.executor.cache.calling(token.contract) as view:
        for index in indexes:
            view.get(balance_key(account(index)))


@dataclass(frozen=True)
class Window:
    """What one measured run of calls did."""

    calls: int
    seconds: float
    hits: int
    misses: int
    backing_s: float
    host_s: float
    host_calls: int
    swap_cycles: int
    not_ok: int
    page_faults: int = 0

    @property
    def per_s(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    @property
    def hit_ratio(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def modelled_per_s(self, hz: float) -> float:
        """Calls/s had each modelled page swap taken its cycles at ``hz``."""
        seconds = self.seconds + self.swap_cycles / hz
        return self.calls / seconds if seconds > 0 else 0.0


def run_calls(token: Token, calls: Sequence[Transfer]) -> Window:
    """Execute ``calls`` (then write back what they left dirty, as the next batch would)."""
    executor, contract = token.executor, token.contract
    before, clock = executor.cache.stats, token.clock
    backing_s, host_s, host_calls = clock.backing_s, clock.host_s, clock.host_calls
    not_ok = 0
    start = time.perf_counter()
    for call in calls:
        if executor.execute(contract, "transfer", call.args, call.caller).status != "ok":
            not_ok += 1
    executor.cache.flush()
    seconds = time.perf_counter() - start
    after = executor.cache.stats
    return Window(
        calls=len(calls),
        seconds=seconds,
        hits=after.hits - before.hits,
        misses=after.misses - before.misses,
        backing_s=clock.backing_s - backing_s,
        host_s=clock.host_s - host_s,
        host_calls=clock.host_calls - host_calls,
        swap_cycles=after.modelled_swap_cycles - before.modelled_swap_cycles,
        not_ok=not_ok,
        page_faults=after.modelled_page_faults - before.modelled_page_faults,
    )


def alternated(runners: Sequence[Callable[[int], Window]], rounds: int) -> list[list[Window]]:
    """``rounds`` windows of each runner (called with the round number), the order reversed
    every other round so neither always runs first. Each window starts from a collected heap
    and runs without the cyclic garbage collector: otherwise one runner's garbage (py-evm
    makes a lot) is collected during the other's window, and the collector's passes over the
    large live heaps of both (a trie, a cache of every account) are what gets measured."""
    out: list[list[Window]] = [[] for _ in runners]
    for number in range(rounds):
        order = range(len(runners)) if number % 2 == 0 else reversed(range(len(runners)))
        for index in order:
            gc.collect()
            gc.disable()
            try:
                out[index].append(runners[index](number))
            finally:
                gc.enable()
    return out


def median_window(windows: Sequence[Window]) -> Window:
    """The window of median calls/s (its other counters go with it)."""
    ranked = sorted(windows, key=lambda w: w.per_s)
    return ranked[len(ranked) // 2]


# --- figures 1 to 3 -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    accounts: int = 10_000
    calls: int = 2_000
    warmup: int = 30_000
    rounds: int = 5
    sizes: tuple[int, ...] = (0, 1024, 2048, 4096, 6144, 8192, 10_240, 16_384)
    #: About 5,600 accounts' nodes with their bucket array: mid-sweep.
    sweep_budget_bytes: int = 512 << 10
    cliff_entries: int = 16_384
    evm_calls: int = 2_000
    seed: int = 14


@dataclass
class Compared:
    """One figure against its baseline: the windows of both, medians, the ratio."""

    name: str
    baseline: list[Window]
    candidate: list[Window]
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        base = statistics.median(w.per_s for w in self.baseline)
        return statistics.median(w.per_s for w in self.candidate) / base if base else 0.0


def _runner(
    token: Token, settings: Settings, distribution: Distribution
) -> Callable[[int], Window]:
    def run(number: int) -> Window:
        seed = settings.seed * 1000 + number
        return run_calls(token, transfers(token.accounts, settings.calls, distribution, seed))

    return run


def _warmed(
    store: HostStore,
    sealers: Sealers,
    name: str,
    config: CacheConfig,
    settings: Settings,
    distribution: Distribution,
) -> Token:
    """A token whose cache is in its steady state: every account read once (so no first-touch
    miss is left for the measured windows, which then show what the cache's size does), then
    ``settings.warmup`` reads drawn as the calls will be (so the LRU order is theirs)."""
    made = token(store, sealers, name, config, settings.accounts)
    rng = random.Random(settings.seed)
    everyone = list(range(settings.accounts))
    rng.shuffle(everyone)
    warm(made, everyone + picks(settings.accounts, settings.warmup, distribution, rng))
    return made


def cache_vs_none(
    store: HostStore, sealers: Sealers, settings: Settings, distribution: Distribution
) -> Compared:
    """Figure 1: the cache holding ``CACHED_ENTRIES`` (of ``settings.accounts``) against none."""
    entries = min(CACHED_ENTRIES, settings.sizes[-1])
    cached = _warmed(
        store, sealers, f"cached-{distribution}", CacheConfig(max_entries=entries), settings,
        distribution,
    )  # fmt: skip
    none = _warmed(
        store, sealers, f"none-{distribution}", CacheConfig(max_entries=0), settings, distribution
    )
    base, cand = alternated(
        [_runner(none, settings, distribution), _runner(cached, settings, distribution)],
        settings.rounds,
    )
    return Compared(f"{distribution}, max_entries {entries} vs 0", base, cand)


@dataclass(frozen=True)
class SweepPoint:
    distribution: Distribution
    max_entries: int
    per_s: float
    hit_ratio: float
    modelled_per_s: float


def sweep(
    store: HostStore, sealers: Sealers, settings: Settings, distribution: Distribution, hz: float
) -> list[SweepPoint]:
    """Figure 2: every size in ``settings.sizes``, alternated round by round; the EPC model
    with ``sweep_budget_bytes`` gives each point's modelled calls/s too."""
    tokens = [
        _warmed(
            store,
            sealers,
            f"sweep-{distribution}-{size}",
            CacheConfig(max_entries=size, epc_budget_bytes=settings.sweep_budget_bytes),
            settings,
            distribution,
        )
        for size in settings.sizes
    ]
    windows = alternated([_runner(t, settings, distribution) for t in tokens], settings.rounds)
    points = []
    for size, runs in zip(settings.sizes, windows, strict=True):
        points.append(
            SweepPoint(
                distribution,
                size,
                statistics.median(w.per_s for w in runs),
                statistics.median(w.hit_ratio for w in runs),
                statistics.median(w.modelled_per_s(hz) for w in runs),
            )
        )
    return points


@dataclass
class CliffPoint:
    """One budget of the cliff figure: the cache's footprint over it, and its windows."""

    multiple: float
    budget_bytes: int
    footprint_bytes: int
    windows: list[Window]


@dataclass
class Cliff:
    """Figure 3: the same cache under each budget; ``points[0]`` is within its budget."""

    cache_bytes: int
    points: list[CliffPoint]


def cliff_footprint(sealers: Sealers, settings: Settings) -> int:
    """The modelled footprint of a cache holding every account once warmed (what the cliff's
    caches will have: transfers only rewrite balances in place), found by building one over a
    store in this process."""
    probe = token(
        MemoryHostStore(), sealers, "epc-probe", CacheConfig(max_entries=settings.cliff_entries),
        settings.accounts,
    )  # fmt: skip
    warm(probe, range(settings.accounts))
    return probe.executor.cache.stats.modelled_footprint_bytes


def cliff(store: HostStore, sealers: Sealers, settings: Settings) -> Cliff:
    """Figure 3: one cache per multiple in ``CLIFF_MULTIPLES``, each holding every account
    (``cliff_entries``) under an EPC budget of its footprint over the multiple; uniform
    access, the windows alternated round by round."""
    footprint = cliff_footprint(sealers, settings)
    budgets = [round(footprint / multiple) for multiple in CLIFF_MULTIPLES]
    tokens = []
    for multiple, budget in zip(CLIFF_MULTIPLES, budgets, strict=True):
        config = CacheConfig(max_entries=settings.cliff_entries, epc_budget_bytes=budget)
        tokens.append(_warmed(store, sealers, f"epc-{multiple}x", config, settings, "uniform"))
    windows = alternated([_runner(t, settings, "uniform") for t in tokens], settings.rounds)
    points = []
    for budget, made, runs in zip(budgets, tokens, windows, strict=True):
        actual = made.executor.cache.stats.modelled_footprint_bytes
        points.append(CliffPoint(actual / budget, budget, actual, runs))
    return Cliff(tokens[0].executor.cache.stats.bytes, points)


# --- figure 4: against an EVM -------------------------------------------------------------------

#: The opcodes the transfer below uses (Shanghai).
OPCODES = {
    "ADD": 0x01, "SUB": 0x03, "LT": 0x10, "EQ": 0x14, "AND": 0x16, "SHR": 0x1C, "SHA3": 0x20,
    "CALLER": 0x33, "CALLDATALOAD": 0x35, "MSTORE": 0x52, "SLOAD": 0x54, "SSTORE": 0x55,
    "JUMPI": 0x57, "JUMPDEST": 0x5B, "DUP1": 0x80, "DUP2": 0x81, "DUP3": 0x82, "DUP4": 0x83,
    "SWAP1": 0x90, "LOG3": 0xA3, "RETURN": 0xF3, "REVERT": 0xFD,
}  # fmt: skip
TRANSFER_SELECTOR = bytes.fromhex("a9059cbb")  # transfer(address,uint256)
TRANSFER_TOPIC = bytes.fromhex("ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef")


def assemble(program: Sequence[str]) -> bytes:
    """EVM bytecode from mnemonics: ``OP``, ``PUSHn value``, ``:label`` (a JUMPDEST) and
    ``@label`` (PUSH2 of the label's offset), labels resolved in a first pass."""

    def size(item: str) -> int:
        if item.startswith("@"):
            return 3
        if item.startswith("PUSH"):
            return 1 + int(item.split()[0][4:])
        return 1

    labels: dict[str, int] = {}
    offset = 0
    for item in program:
        if item.startswith(":"):
            labels[item[1:]] = offset
        offset += size(item)
    out = bytearray()
    for item in program:
        if item.startswith(":"):
            out.append(OPCODES["JUMPDEST"])
        elif item.startswith("@"):
            out += b"\x61" + labels[item[1:]].to_bytes(2, "big")
        elif item.startswith("PUSH"):
            op, value = item.split()
            width = int(op[4:])
            out += bytes([0x5F + width]) + int(value, 0).to_bytes(width, "big")
        else:
            out.append(OPCODES[item])
    return bytes(out)


#: ERC20's ``transfer(to, amount)`` as solc lays it out: balances in a mapping at slot 0
#: (``keccak(address . 0)``), the selector dispatched, an underflow and an overflow check, a
#: ``Transfer`` log, and (as token.wat does) the caller's new balance returned.
EVM_TRANSFER = assemble([
    "PUSH1 0", "CALLDATALOAD", "PUSH1 0xe0", "SHR", "PUSH4 0xa9059cbb", "EQ", "@transfer",
    "JUMPI", ":fail", "PUSH1 0", "DUP1", "REVERT",
    ":transfer",  # the caller's slot: keccak(caller . 0)
    "CALLER", "PUSH1 0", "MSTORE", "PUSH1 0", "PUSH1 0x20", "MSTORE", "PUSH1 0x40", "PUSH1 0",
    "SHA3", "DUP1", "SLOAD", "PUSH1 0x24", "CALLDATALOAD",  # [from_slot, from, amount]
    "DUP1", "DUP3", "LT", "@fail", "JUMPI",  # from < amount: revert
    "DUP1", "DUP3", "SUB", "DUP4", "SSTORE",  # balance[caller] = from - amount
    "PUSH1 4", "CALLDATALOAD", f"PUSH20 {2**160 - 1:#x}", "AND", "PUSH1 0", "MSTORE",
    "PUSH1 0x40", "PUSH1 0", "SHA3",  # [from_slot, from, amount, to_slot]
    "DUP1", "SLOAD", "DUP3", "ADD",  # [..., to_slot, to + amount]
    "DUP3", "DUP2", "LT", "@fail", "JUMPI",  # overflow: revert
    "SWAP1", "SSTORE",  # balance[to] += amount
    "PUSH1 0", "MSTORE",  # Transfer(caller, to, amount)
    "PUSH1 4", "CALLDATALOAD", "CALLER", f"PUSH32 0x{TRANSFER_TOPIC.hex()}", "PUSH1 0x20",
    "PUSH1 0", "LOG3",
    "DUP2", "SLOAD", "PUSH1 0", "MSTORE", "PUSH1 0x20", "PUSH1 0", "RETURN",
])  # fmt: skip


class EvmUnavailable(RuntimeError):
    """py-evm is not installed or does not work here (the message says why)."""


def evm_address(index: int) -> Address:
    return Address((index + 1).to_bytes(20, "big"))


class EvmToken:
    """The ERC20-style transfer on py-evm: a Shanghai state over an in-memory database, the
    contract's code and ``accounts`` balances set and persisted (a trie, as a node's would
    be), then each transfer applied as a message, its changes locked in as a transaction's."""

    CONTRACT = Address(b"\xc0" * 20)

    def __init__(self, accounts: int) -> None:
        try:
            from eth.db.atomic import AtomicDB
            from eth.vm.chain_context import ChainContext
            from eth.vm.forks.shanghai import ShanghaiVM
            from eth.vm.message import Message
            from eth.vm.transaction_context import BaseTransactionContext
        except ImportError as exc:
            raise EvmUnavailable(f"py-evm does not import: {exc}") from None
        self._message: type[MessageAPI] = Message
        self._context: type[TransactionContextAPI] = BaseTransactionContext
        header = ShanghaiVM.create_genesis_header(gas_limit=30_000_000, timestamp=1, difficulty=0)
        self.state: StateAPI = ShanghaiVM.build_state(AtomicDB(), header, ChainContext(1))
        self.state.set_code(self.CONTRACT, EVM_TRANSFER)
        for index in range(accounts):
            self.state.set_storage(self.CONTRACT, self.slot(index), START_BALANCE)
        self.state.persist()

    @staticmethod
    def slot(index: int) -> int:
        """Where solc keeps ``balanceOf[account]`` for a mapping at slot 0."""
        from eth_utils.crypto import keccak

        return int.from_bytes(keccak(evm_address(index).rjust(32, b"\0") + bytes(32)), "big")

    def transfer(self, sender: int, to: int, amount: int) -> bytes | None:
        """The caller's new balance (32 bytes), or None if the transfer reverted."""
        caller = evm_address(sender)
        data = TRANSFER_SELECTOR + evm_address(to).rjust(32, b"\0") + amount.to_bytes(32, "big")
        message = self._message(  # type: ignore[call-arg]
            gas=100_000, to=self.CONTRACT, sender=caller, value=0, data=data, code=EVM_TRANSFER
        )
        context = self._context(gas_price=1, origin=caller)
        computation = self.state.computation_class.apply_message(self.state, message, context)
        self.state.lock_changes()
        return None if computation.is_error else bytes(computation.output)

    def balance(self, index: int) -> int:
        return self.state.get_storage(self.CONTRACT, self.slot(index))


def _rate(run: Callable[[], int], count: int) -> Window:
    start = time.perf_counter()
    not_ok = run()
    seconds = time.perf_counter() - start
    return Window(count, seconds, 0, 0, 0.0, 0.0, 0, 0, not_ok)


def vm_vs_evm(settings: Settings) -> Compared:
    """Figure 4: the same uniform transfers on py-evm and on our VM (the executor over a store
    in this process, its cache holding every account: the VM's cost, not the host's)."""
    evm = EvmToken(settings.accounts)
    sealers = Sealers()
    ours = token(
        MemoryHostStore(), sealers, "vm", CacheConfig(max_entries=2 * settings.accounts),
        settings.accounts,
    )  # fmt: skip
    warm(ours, range(settings.accounts))

    def run_evm(number: int) -> Window:
        work = pairs(
            settings.accounts, settings.evm_calls, "uniform", settings.seed * 1000 + number
        )
        return _rate(lambda: sum(evm.transfer(a, b, 1) is None for a, b in work), len(work))

    def run_ours(number: int) -> Window:
        seed = settings.seed * 1000 + number
        return run_calls(ours, transfers(settings.accounts, settings.evm_calls, "uniform", seed))

    base, cand = alternated([run_evm, run_ours], settings.rounds)
    return Compared("ContractVM (wasmtime) vs py-evm", base, cand)


# --- the report ---------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def median_rate(windows: Sequence[Window], rate: Callable[[Window], float]) -> float:
    return statistics.median(rate(w) for w in windows)


def split_line(label: str, window: Window) -> str:
    """Where a window's time went, in µs per call: the VM and the cache (everything outside
    the backing), sealing and opening (the backing less the host), the host's round trips."""
    per_call = 1e6 / window.calls
    vm = (window.seconds - window.backing_s) * per_call
    seal = (window.backing_s - window.host_s) * per_call
    host = window.host_s * per_call
    trips = window.host_calls / window.calls
    return (
        f"    {label:28} {window.seconds * per_call:7.0f} µs/call = VM+cache {vm:6.0f}"
        f" + seal/open {seal:5.0f} + host {host:6.0f} ({trips:.2f} round trips/call,"
        f" {1e6 * window.host_s / max(window.host_calls, 1):.0f} µs each)"
    )


def report_cache(figures: Sequence[Compared]) -> list[str]:
    lines = ["1. calls/s with the internal cache against none (max_entries=0):"]
    for figure in figures:
        distribution = figure.name.split(",")[0]
        cached = median_rate(figure.candidate, lambda w: w.per_s)
        none = median_rate(figure.baseline, lambda w: w.per_s)
        hit = median_rate(figure.candidate, lambda w: w.hit_ratio)
        goal = GOAL_UNIFORM if distribution == "uniform" else GOAL_ZIPF
        ok = figure.ratio >= goal and (distribution != "uniform" or hit >= GOAL_UNIFORM_HIT)
        hit_goal = f" at a hit ratio >= {GOAL_UNIFORM_HIT}" if distribution == "uniform" else ""
        lines += [
            f"  {figure.name}: {cached:,.0f} vs {none:,.0f} calls/s, hit ratio {hit:.3f}: "
            f"{figure.ratio:.2f}x (goal >= {goal}x{hit_goal}: {verdict(ok)})",
            split_line("with the cache", median_window(figure.candidate)),
            split_line("without", median_window(figure.baseline)),
        ]
    return lines


def entries_within(budget_bytes: int) -> int:
    """The most accounts a sweep cache (``max_entries`` = its accounts) holds whose modelled
    footprint fits ``budget_bytes``: where the sweep plot draws the budget."""
    entry = len(balance_key(account(0))) + 8
    low, high = 0, budget_bytes  # a node takes more than a byte: high never fits
    while low + 1 < high:
        middle = (low + high) // 2
        if footprint_bytes(middle, [entry] * middle) <= budget_bytes:
            low = middle
        else:
            high = middle
    return low


def report_sweep(points: Sequence[SweepPoint], budget: int) -> list[str]:
    lines = [
        f"2. the sweep (modelled: with an EPC budget of {budget // 1024} KiB, about "
        f"{entries_within(budget):,} accounts' table, 40,000 cycles per page swap):",
        f"  {'distribution':12} {'max_entries':>11} {'hit ratio':>9} {'calls/s':>9} "
        f"{'modelled':>9}",
    ]
    for p in points:
        lines.append(
            f"  {p.distribution:12} {p.max_entries:11,} {p.hit_ratio:9.3f} {p.per_s:9,.0f} "
            f"{p.modelled_per_s:9,.0f}"
        )
    return lines


def cliff_drop(figure: Cliff, point: CliffPoint, hz: float) -> float:
    """How many times fewer calls/s (modelled) ``point`` makes than the cache within its
    budget: the windows of every point at or under 1x together (the same work, no faults
    once warm: pooled, one slow point does not set the baseline)."""
    within = [w for p in figure.points if p.multiple <= 1.0 for w in p.windows]
    base = median_rate(within, lambda w: w.modelled_per_s(hz))
    past = median_rate(point.windows, lambda w: w.modelled_per_s(hz))
    return base / past if past else 0.0


def cliff_goal_multiple(figure: Cliff, hz: float) -> float | None:
    """The smallest multiple at which the drop reaches the goal, if one does."""
    return next(
        (p.multiple for p in figure.points if cliff_drop(figure, p, hz) >= GOAL_CLIFF), None
    )


def report_cliff(figure: Cliff, hz: float) -> list[str]:
    first = figure.points[0]
    lines = [
        f"3. the enclave-memory cliff: one cache of {figure.cache_bytes / 1024:.0f} KiB of keys "
        f"and values (every account), {first.footprint_bytes / 1024:.0f} KiB modelled in the "
        f"enclave, uniform, at {hz / 1e9:.2f} GHz:",
        f"  {'footprint/budget':>16} {'budget':>9} {'measured':>9} {'faults':>7} {'swap':>6} "
        f"{'modelled':>9} {'drop':>6}",
    ]
    for point in figure.points:
        windows = point.windows
        lines.append(
            f"  {point.multiple:15.2f}x {point.budget_bytes / 1024:5.0f} KiB "
            f"{median_rate(windows, lambda w: w.per_s):7,.0f}/s "
            f"{median_rate(windows, lambda w: w.page_faults / w.calls):7.2f} "
            f"{median_rate(windows, lambda w: 1e6 * w.swap_cycles / w.calls / hz):4.0f}us "
            f"{median_rate(windows, lambda w: w.modelled_per_s(hz)):7,.0f}/s "
            f"{cliff_drop(figure, point, hz):5.2f}x"
        )
    # Why the drop is what it is: the swaps add a time per call that does not depend on how
    # long the call takes, so the drop reaches the goal only for calls no longer than it.
    last = figure.points[-1]
    within = [w for p in figure.points if p.multiple <= 1.0 for w in p.windows]
    call_us = 1e6 / median_rate(within, lambda w: w.per_s)
    swap_us = 1e6 * median_rate(last.windows, lambda w: w.swap_cycles / w.calls) / hz
    reached = cliff_goal_multiple(figure, hz)
    where = f"first at {reached:.2f}x" if reached else f"not by {last.multiple:.2f}x"
    return [
        *lines,
        "  (faults: page faults per call; swap: their modelled time per call; drop: against "
        "the rows within the budget, their windows pooled)",
        f"  drop past the budget: {cliff_drop(figure, last, hz):.2f}x at {last.multiple:.2f}x "
        f"(goal >= {GOAL_CLIFF}x: {verdict(reached is not None)}, {where})",
        f"  at {last.multiple:.2f}x the swaps add {swap_us:.0f} us a call to a call of "
        f"{call_us:.0f} us: a drop of {GOAL_CLIFF}x needs calls of at most "
        f"{swap_us / (GOAL_CLIFF - 1):.0f} us",
    ]


def report_evm(figure: Compared | str) -> list[str]:
    if isinstance(figure, str):
        return [f"4. against an EVM: not measured: {figure}"]
    ours = median_rate(figure.candidate, lambda w: w.per_s)
    evm = median_rate(figure.baseline, lambda w: w.per_s)
    return [
        "4. the token transfer on our VM against an ERC20 transfer on py-evm (uniform, "
        "execution only):",
        f"  ContractVM (wasmtime, executor, cache holding every account) {ours:7,.0f} calls/s",
        f"  py-evm (Shanghai, journaled state over an in-memory trie)   {evm:7,.0f} calls/s",
        f"  ratio {figure.ratio:.2f}x (goal >= {GOAL_EVM}x: {verdict(figure.ratio >= GOAL_EVM)})",
        split_line("ours", median_window(figure.candidate)),
    ]


# --- the plot -----------------------------------------------------------------------------------


def plot_sweep(points: Sequence[SweepPoint], budget_entries: float, path: Path) -> None:
    """Hit ratio and calls/s (measured; modelled with the EPC budget) against ``max_entries``,
    one panel per distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(DISTRIBUTIONS), figsize=(11, 4.2), sharey=True)
    top = 1.1 * max(max(p.per_s, p.modelled_per_s) for p in points)
    for panel, distribution in zip(panels, DISTRIBUTIONS, strict=True):
        mine = [p for p in points if p.distribution == distribution]
        sizes = [p.max_entries for p in mine]
        panel.plot(sizes, [p.per_s for p in mine], "o-", label="calls/s (measured)")
        panel.plot(sizes, [p.modelled_per_s for p in mine], "s--", label="calls/s (EPC model)")
        panel.axvline(budget_entries, color="grey", linestyle=":", label="EPC budget (model)")
        panel.set_ylim(0, top)
        panel.set_xlabel("cache size (max_entries)")
        panel.set_title(f"{distribution} over the accounts")
        ratio_axis = panel.twinx()
        ratio_axis.plot(sizes, [p.hit_ratio for p in mine], "^-", color="tab:green")
        ratio_axis.set_ylim(0, 1.05)
        ratio_axis.set_ylabel("hit ratio", color="tab:green")
    panels[0].set_ylabel("token transfers per second")
    panels[0].legend(loc="lower left", fontsize="small")
    figure.suptitle("Contract executor: internal cache size against hit ratio and throughput")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- main ---------------------------------------------------------------------------------------

QUICK = Settings(calls=300, rounds=3, sizes=(0, 2048, 8192, 16_384), evm_calls=300)
Figure = Literal["cache", "sweep", "cliff", "evm"]
FIGURES: tuple[Figure, ...] = ("cache", "sweep", "cliff", "evm")


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "cpu_probe_ms": round(cpu_probe_ms(), 2),
    }


def run(
    settings: Settings,
    store_kind: StoreKind,
    fsync: bool,
    only: Sequence[Figure],
    out: Path,
    echo: bool = False,
) -> tuple[list[str], dict[str, Any]]:
    """Every figure asked for: the report's lines (printed as each figure is done if
    ``echo``) and the results (for JSON)."""
    hz = cycles_per_second()
    info = machine()
    where = (
        f"ContractStore (SQLite, fsync {'on' if fsync else 'off'}) in another process over a "
        "socketpair"
        if store_kind == "process"
        else "a dict in this process (no round trip)"
    )
    report = Report(echo)
    machine_line = (
        f"machine: nproc {info['nproc']}, {info['cpu']}, Python {info['python']}, "
        f"cycle counter {hz / 1e9:.2f} GHz, cpu probe {info['cpu_probe_ms']} ms"
    )
    workload = (
        f"{settings.accounts:,} accounts, {settings.calls:,} transfers per window, "
        f"{settings.rounds} rounds alternated, medians"
    )
    report.add([machine_line, f"host store: {where}; {workload}"])
    results: dict[str, Any] = {"machine": info, "settings": asdict(settings), "fsync": fsync}
    results["store"], results["cycles_per_second"] = store_kind, hz
    sealers = Sealers()
    with host_store(store_kind, fsync) as store:
        if "cache" in only:
            figures = [cache_vs_none(store, sealers, settings, d) for d in DISTRIBUTIONS]
            report.add(report_cache(figures))
            results["cache"] = [asdict(f) | {"ratio": f.ratio} for f in figures]
        if "sweep" in only:
            points = [p for d in DISTRIBUTIONS for p in sweep(store, sealers, settings, d, hz)]
            report.add(report_sweep(points, settings.sweep_budget_bytes))
            png = out / "contracts-sweep.png"
            try:
                plot_sweep(points, entries_within(settings.sweep_budget_bytes), png)
                report.add([f"  plot: {png}"])
            except ImportError:
                report.add(["  plot: not drawn (matplotlib is in the bench extra: .[bench])"])
            results["sweep"] = [asdict(p) for p in points]
        if "cliff" in only:
            figure = cliff(store, sealers, settings)
            report.add(report_cliff(figure, hz))
            results["cliff"] = asdict(figure) | {
                "drops": [cliff_drop(figure, p, hz) for p in figure.points],
                "goal_multiple": cliff_goal_multiple(figure, hz),
            }
    if "evm" in only:
        try:
            evm = vm_vs_evm(settings)
        except EvmUnavailable as exc:
            report.add(report_evm(str(exc)))
            results["evm"] = {"unavailable": str(exc)}
        else:
            report.add(report_evm(evm))
            results["evm"] = asdict(evm) | {"ratio": evm.ratio}
    return report.lines, results


class Report:
    """The report's lines, printed as they are added when ``echo`` (a full run takes minutes:
    each figure shows as soon as it is measured)."""

    def __init__(self, echo: bool) -> None:
        self.lines: list[str] = []
        self._echo = echo

    def add(self, lines: Iterable[str]) -> None:
        added = list(lines)
        if self._echo:
            print("\n".join(added), flush=True)
        self.lines += added


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls, sizes and rounds")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 5, quick 3)")
    parser.add_argument("--calls", type=int, help="transfers per measured window")
    parser.add_argument(
        "--out",
        type=Path,
        help="where the PNG and JSON go (default bench/results; a quick run's: a temp dir, so a "
        "smoke run never replaces the committed figures)",
    )
    parser.add_argument(
        "--store", choices=["process", "memory"], default="process", help="the host's store"
    )
    parser.add_argument("--fsync", action="store_true", help="the host's store fsyncs batches")
    parser.add_argument("--only", choices=FIGURES, nargs="+", default=list(FIGURES))
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.rounds:
        settings = Settings(**(asdict(settings) | {"rounds": max(1, args.rounds)}))
    if args.calls:
        settings = Settings(**(asdict(settings) | {"calls": max(1, args.calls)}))
    out = args.out or (
        Path(tempfile.gettempdir()) / "kmsim-bench-contracts" if args.quick else RESULTS
    )
    out.mkdir(parents=True, exist_ok=True)
    _, results = run(settings, args.store, args.fsync, args.only, out, echo=True)
    name = "contracts-results-fsync.json" if args.fsync else "contracts-results.json"
    (out / name).write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {out / name}")


if __name__ == "__main__":
    main()
