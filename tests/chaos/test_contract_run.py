"""One short real `kmctl chaos run` with the contract workload on: 3 nodes, a tiny cache (so
the tampered store is read) and frequent checkpoints, the nemesis tampering with a node's
contract state and killing nodes; the run must end VALID with every contract check passing.

It goes through `kmctl chaos sweep --seeds 1`, which starts a fresh cluster on free ports on
127.0.0.1 and stops it whatever happens (as the CI matrix does)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmnode.chaos.contract_evidence import ContractEvidence
from kmnode.chaos.history import History
from tests.chaos.sweeps import sweep_once
from tests.integration.harness import write_config

pytestmark = pytest.mark.timeout(300)

CONTRACT_CHECKS = {
    "contract-results",
    "contract-roots",
    "contract-reference",
    "no-plaintext-contracts",
}
#: Seed 1's schedule starts with tamper-state (fixed by the seed, not by timing).
SEED = 1


def test_a_short_chaos_run_with_contracts_is_valid(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, 3, contracts={"checkpoint_every": 10, "cache_entries": 1, "flush_every": 1}
    )
    sweep = sweep_once(config, tmp_path / "sweep", SEED, "tamper-state,kill")
    run_dir, report = sweep.run_dir, sweep.report
    assert sweep.exit_code == 0 and not sweep.failed(), sweep.output + json.dumps(sweep.failed())
    assert set(report["checks"]) >= CONTRACT_CHECKS
    assert report["stats"]["contract.call"]["ok"] > 0
    assert report["stats"]["contract.deploy"] == {"ok": 1}

    history = History.load(run_dir / "history.jsonl")
    first = history.faults()[0]
    assert (first.fault, first.phase) == ("tamper-state", "start")
    evidence = ContractEvidence.from_json(json.loads((run_dir / "contracts.json").read_text()))
    replayed = int(report["checks"]["contract-reference"]["detail"].split()[0])
    assert replayed > 0 and evidence.committed_calls is not None
    assert replayed <= evidence.committed_calls
    assert {r.node for r in evidence.records} == {"km1", "km2", "km3"}
    # The contract scan searched the cluster's files too, not only MQTT: it leaves out only
    # the client's own record (the history), which the key scan searches as well.
    scanned = {n: scanned_bytes(report["checks"][n]["detail"]) for n in SCANS}
    assert scanned["no-plaintext-contracts"] > scanned["no-plaintext-keys"] // 2, scanned


SCANS = ("no-plaintext-keys", "no-plaintext-contracts")


def scanned_bytes(detail: str) -> int:
    """The bytes a passing scan searched: "N secrets absent from M sources (B B)"."""
    return int(detail.rsplit("(", 1)[1].split()[0])
