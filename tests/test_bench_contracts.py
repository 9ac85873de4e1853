"""bench/contracts.py in a tiny configuration: every figure comes out well-formed (never how
fast anything is), the two VMs do the same transfer, and the store's process is gone after."""

from __future__ import annotations

import json
import multiprocessing
import random
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import contracts as bench
from kmnode.contracts.cache import CacheConfig
from kmnode.contracts.verified import MemoryHostStore

TINY = bench.Settings(
    accounts=200,
    calls=20,
    warmup=400,
    rounds=2,
    sizes=(0, 64, 256),
    sweep_budget_bytes=2048,
    cliff_entries=512,
    evm_calls=20,
)


def test_every_figure_is_reported_against_its_baseline(tmp_path: Path) -> None:
    lines, results = bench.run(TINY, "process", False, bench.FIGURES, tmp_path)
    text = "\n".join(lines)
    for heading in ("1. calls/s", "2. the sweep", "3. the enclave-memory cliff"):
        assert heading in text
    # Uniform, Zipf, the cliff, and the EVM (or, without the bench extra, why it is missing).
    assert text.count("goal >=") >= 3
    assert text.count("goal >=") >= 4 or "4. against an EVM: not measured: py-evm" in text
    assert multiprocessing.active_children() == []  # the store's process was stopped

    for figure in results["cache"]:
        assert len(figure["baseline"]) == len(figure["candidate"]) == TINY.rounds
        assert figure["ratio"] > 0
        for window in figure["candidate"] + figure["baseline"]:
            assert window["calls"] == TINY.calls and window["not_ok"] == 0
            assert window["seconds"] >= window["backing_s"] >= window["host_s"] >= 0
        assert all(w["hits"] == 0 for w in figure["baseline"])  # max_entries=0: no hits
        assert any(w["hits"] > 0 for w in figure["candidate"])
    sweep = results["sweep"]
    assert [(p["distribution"], p["max_entries"]) for p in sweep] == [
        (d, s) for d in bench.DISTRIBUTIONS for s in TINY.sizes
    ]
    assert all(0.0 <= p["hit_ratio"] <= 1.0 and p["per_s"] > 0 for p in sweep)
    # The cache that holds every account, its footprint swept across the budget: within it
    # (0.5x, 1x) the warmed cache never faults; past it every window pays page swaps, and the
    # modelled rate falls below the one within.
    cliff = results["cliff"]
    points = cliff["points"]
    assert [round(p["multiple"], 2) for p in points] == list(bench.CLIFF_MULTIPLES)
    assert len({p["footprint_bytes"] for p in points}) == 1
    for point in points:
        assert len(point["windows"]) == TINY.rounds
        past = point["multiple"] > 1.0
        for window in point["windows"]:
            assert window["not_ok"] == 0 and window["misses"] == 0  # every account cached
            assert (window["page_faults"] > 0) == past
            assert window["swap_cycles"] == window["page_faults"] * 40_000
    assert cliff["drops"][-1] > 1.0
    assert "3. the enclave-memory cliff" in text and "drop past the budget" in text
    assert json.loads(json.dumps(results))["settings"]["accounts"] == TINY.accounts


def test_the_sweep_is_drawn(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is in the bench extra (CI installs it)")
    tiny = bench.Settings(**{**asdict(TINY), "rounds": 1})
    bench.run(tiny, "memory", False, ("sweep",), tmp_path)
    png = (tmp_path / "contracts-sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_the_evm_and_our_vm_end_with_the_same_balances() -> None:
    pytest.importorskip("eth", reason="py-evm is in the bench extra")
    evm = bench.EvmToken(20)
    ours = bench.token(MemoryHostStore(), bench.Sealers(), "t", CacheConfig(), 20)
    work = bench.pairs(20, 50, "zipf", seed=3)
    for payer, payee in work:
        evm_result = evm.transfer(payer, payee, 1)
        call = bench.Transfer(bench.account(payer), bench.account(payee))
        our_result = ours.executor.execute("t", "transfer", call.args, call.caller)
        assert evm_result is not None and our_result.status == "ok"
        assert int.from_bytes(evm_result, "big") == int.from_bytes(our_result.result, "little")
    for index in range(20):
        got = ours.executor.execute("t", "balance", bench.account(index).encode(), "anyone")
        assert evm.balance(index) == int.from_bytes(got.result, "little")
    # Overdrawn: the EVM transfer reverts and nothing moves.
    before = evm.balance(0), evm.balance(1)
    assert evm.transfer(0, 1, bench.START_BALANCE * 2) is None
    assert (evm.balance(0), evm.balance(1)) == before


def test_the_same_seed_gives_the_same_transfers_and_zipf_keeps_its_hot_accounts() -> None:
    assert bench.transfers(500, 30, "zipf", 1) == bench.transfers(500, 30, "zipf", 1)
    assert bench.transfers(500, 30, "uniform", 1) != bench.transfers(500, 30, "uniform", 2)
    first, second = (bench.picks(500, 3000, "zipf", random.Random(seed)) for seed in (1, 2))
    assert max(set(first), key=first.count) == max(
        set(second), key=second.count
    )  # the most chosen account is the same whatever the seed
    assert all(0 <= i < 500 for i in bench.picks(500, 1000, "uniform", random.Random(4)))


def test_rounds_alternate_which_runs_first() -> None:
    order: list[str] = []

    def runner(name: str) -> Callable[[int], bench.Window]:
        def run(number: int) -> bench.Window:
            order.append(name)
            return bench.Window(1, 1.0, 0, 0, 0.0, 0.0, 0, 0, 0)

        return run

    windows = bench.alternated([runner("a"), runner("b")], 3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert [len(w) for w in windows] == [3, 3]


def test_the_evm_transfer_jumps_only_onto_jumpdests() -> None:
    code, offset, targets = bench.EVM_TRANSFER, 0, []
    while offset < len(code):  # walk the instructions, skipping each PUSH's data
        op = code[offset]
        width = op - 0x5F if 0x60 <= op <= 0x7F else 0
        if op == 0x61:  # PUSH2: what the assembler emits for a label
            targets.append(int.from_bytes(code[offset + 1 : offset + 3], "big"))
        offset += 1 + width
    assert len(targets) == 3  # @transfer and @fail twice
    assert all(code[target] == bench.OPCODES["JUMPDEST"] for target in targets)
