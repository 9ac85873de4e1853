"""The simulator: a fault-injecting sweep with zero violations, exact replay, and a checker that
demonstrably catches broken Raft variants."""

from __future__ import annotations

import pytest

import consensus.raft as raft_module
from consensus.raftlog import RaftLog
from consensus.sim.appstate import GENESIS
from consensus.sim.checker import Checker
from consensus.sim.cli import main, sweep
from consensus.sim.memstore import MemStore
from consensus.sim.simulator import SimConfig, Simulation, run_seed
from consensus.types import Entry, HardState, NodeId, NotLeader, Ready, Snapshot

FAULTY = SimConfig()  # faults, crashes with torn writes, membership changes, compaction


@pytest.mark.parametrize(
    ("nodes", "seeds"),
    [(5, range(0, 200)), (3, range(1000, 1050)), (4, range(2000, 2050))],
)
def test_sweep_with_faults_has_no_violations(nodes: int, seeds: range) -> None:
    cfg = SimConfig(nodes=nodes)
    failures = []
    elections = 0
    for seed in seeds:
        result = run_seed(seed, cfg)
        elections += result.elections
        if not result.ok:
            failures.append(result.report())
    assert not failures, "\n\n".join(failures[:2])
    # The faults really did force leader changes (the sweep is not vacuous).
    assert elections > 2 * len(seeds)


def test_same_seed_replays_exactly() -> None:
    one = run_seed(7, FAULTY)
    two = run_seed(7, FAULTY)
    assert one.trace_hash == two.trace_hash
    assert one.events == two.events and one.trace_tail == two.trace_tail
    assert run_seed(8, FAULTY).trace_hash != one.trace_hash


def test_replay_does_not_depend_on_worker_processes() -> None:
    seeds = list(range(30, 34))
    serial = {r.seed: r.trace_hash for r in sweep(seeds, FAULTY, jobs=1)}
    parallel = {r.seed: r.trace_hash for r in sweep(seeds, FAULTY, jobs=2)}
    assert serial == parallel


def test_fault_free_run_commits_and_recovers_at_once() -> None:
    result = run_seed(1, SimConfig(faults=False, chaos_s=5.0))
    assert result.ok
    assert result.committed > 50
    assert result.recovery_s is not None and result.recovery_s < 1.0


def _first_failure(cfg: SimConfig, seeds: range) -> str | None:
    for seed in seeds:
        result = run_seed(seed, cfg)
        if not result.ok:
            return result.report()
    return None


def test_checker_catches_a_minority_quorum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the strict-majority rule (2 of 4 "wins"): the simulator must notice."""

    def half(n: int) -> int:
        return max(1, n // 2) if n % 2 == 0 else n // 2 + 1

    monkeypatch.setattr("consensus.raft.quorum", half)
    monkeypatch.setattr("consensus.quorum.quorum", half)
    report = _first_failure(SimConfig(nodes=4), range(0, 60))
    assert report is not None, "a 2-of-4 quorum went unnoticed"
    assert "seed" in report and "replay:" in report
    assert "leader" in report or "safety" in report


def test_checker_catches_a_log_up_to_date_check_that_always_says_yes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(RaftLog, "is_up_to_date", lambda self, i, t: True)
    report = _first_failure(SimConfig(nodes=5), range(0, 60))
    assert report is not None
    assert "completeness" in report or "safety" in report


def test_liveness_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: raft_module.RaftCore, data: bytes) -> tuple[int, int]:
        raise NotLeader("")

    monkeypatch.setattr(raft_module.RaftCore, "propose", refuse)
    result = Simulation(3, SimConfig(chaos_s=2.0, liveness_s=3.0, faults=False)).run()
    assert not result.ok
    assert result.violations[0].startswith("liveness")


# -- the checker on hand-made observations -----------------------------------------------------


def _log(terms: list[int]) -> RaftLog:
    return RaftLog(Snapshot(), tuple(Entry(t, i + 1) for i, t in enumerate(terms)))


def test_checker_flags_two_leaders_in_one_term() -> None:
    c = Checker()
    c.on_leader("a", 3, _log([1]))
    c.on_leader("a", 3, _log([1]))  # the same leader seen twice is fine
    assert not c.violations
    c.on_leader("b", 3, _log([1]))
    assert c.violations and "election safety" in c.violations[0]


def test_checker_flags_log_mismatch_and_divergent_apply() -> None:
    c = Checker()
    c.on_persist("a", (Entry(2, 5, data=b"x"),), _log([1, 1, 1, 1, 2]))
    c.on_persist("b", (Entry(2, 5, data=b"y"),), _log([1, 1, 1, 1, 2]))
    assert "log matching" in c.violations[-1]
    c2 = Checker()
    c2.on_apply("a", 0, GENESIS, Entry(1, 1, data=b"x"))
    c2.on_apply("b", 0, GENESIS, Entry(1, 1, data=b"y"))
    assert "state machine safety" in c2.violations[-1]


def test_checker_flags_missing_committed_entry_in_later_leader() -> None:
    c = Checker()
    c.on_commit("a", (Entry(1, 1), Entry(1, 2)), leader_term=1)
    c.on_leader("b", 2, _log([1]))  # b lacks index 2, committed in term 1
    assert c.violations and "leader completeness" in c.violations[0]


def test_checker_flags_stale_read() -> None:
    c = Checker()
    who: NodeId = "a"
    c.on_read(who, b"r", index=4, min_index=5)
    assert "stale read" in c.violations[0]


def test_cli_prints_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seeds", "3", "--start", "5", "--nodes", "3"]) == 0
    out = capsys.readouterr().out
    assert "seeds run: 3" in out and "violations: 0" in out and "sim-s/wall-s" in out


def test_memstore_torn_write_keeps_a_prefix_of_records() -> None:
    store = MemStore()
    rd = Ready(
        hard_state=HardState(term=2, vote="a", commit=1),
        entries=(Entry(2, 1), Entry(2, 2), Entry(2, 3)),
    )
    assert MemStore.record_count(rd) == 4
    store.write(rd, keep=2)  # crash mid-write: two entries made it, the hard state did not
    loaded = store.load()
    assert [e.index for e in loaded.entries] == [1, 2]
    assert loaded.hard_state == HardState()
    store.write(rd)
    assert store.load().hard_state.vote == "a"
    # A conflicting append replaces the tail.
    store.write(Ready(entries=(Entry(3, 2),)))
    assert [(e.index, e.term) for e in store.load().entries] == [(1, 2), (2, 3)]
