"""The CI chaos matrix: seeded 30 s runs on fresh 3- and 5-node clusters, each judged by the
checker, that together inject every kind of fault at least once.

Each run goes through `kmctl chaos sweep --seeds 1` (so the sweep command is exercised as
users run it): a fresh cluster on free ports, the run, the checks (including the plaintext
scan of data directories, logs and MQTT, the recovery bound and the refusal of damaged nodes),
and the cluster stopped whatever happens. The nemesis cycles through a seeded shuffle of all
kinds, so a 30 s run at 1.5 s intervals covers most of them; the last test checks the union.
The run in network namespaces (real partitions) is in test_netns_cluster.py's matrix entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kmnode.chaos.history import History
from kmnode.chaos.nemesis import FAULT_KINDS, NETNS_KINDS, OPT_IN_KINDS
from kmnode.cli import cli

from .harness import write_config

pytestmark = pytest.mark.timeout(600)

#: (nodes, seed): five runs, on 3 and on 5 nodes.
MATRIX = [(3, 1), (3, 2), (3, 3), (5, 4), (5, 5)]
DURATION, INTERVAL = "30", "1.5"
EXPECTED_CHECKS = {
    "release-committed",
    "allowed-measurement",
    "identical-keys",
    "no-lost-ops",
    "linearizable-keys",
    "recovery",
    "converged-after-heal",
    "disk-damage-refused",
    "poison",
    "no-plaintext-keys",
    "governance",
    "contract-results",
    "contract-roots",
    "contract-reference",
    "no-plaintext-contracts",
    "data-tokens",
    "data-determinism",
    "data-results",
    "data-tamper",
    "data-liveness",
    "no-plaintext-data",
}

injected: dict[tuple[int, int], set[str]] = {}


def sweep_one(root: Path, nodes: int, seed: int, *extra: str) -> dict[str, object]:
    """One seeded run through `kmctl chaos sweep`; returns its table row."""
    config = write_config(root, nodes)
    out = root / "sweep"
    result = CliRunner().invoke(
        cli,
        ["-c", str(config), "chaos", "sweep", "--seeds", "1", "--first-seed", str(seed),
         "--duration", DURATION, "--interval", INTERVAL, "--out", str(out), "--json", *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + logs_tail(out / f"seed-{seed}")
    (row,) = json.loads(result.output)["runs"]
    assert (out / "sweep.md").read_text().count("\n") == 3  # header, rule, one row
    return dict(row)


def logs_tail(seed_dir: Path, lines: int = 25) -> str:
    """The end of every node's log: what a failed run in CI leaves to diagnose it by."""
    parts = []
    for log in sorted((seed_dir / "state" / "logs").glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"\n== {log.name}\n" + "\n".join(tail))
    return "".join(parts)


@pytest.mark.parametrize(("nodes", "seed"), MATRIX, ids=[f"{n}nodes-seed{s}" for n, s in MATRIX])
def test_seeded_chaos_run_finds_no_violation(tmp_path: Path, nodes: int, seed: int) -> None:
    row = sweep_one(tmp_path, nodes, seed)
    assert row["valid"] is True and row["violations"] == 0, row
    assert row["nodes"] == nodes and row["ok"] > 0 and row["faults"] >= 5, row
    run_dir = Path(str(row["history"])).parent
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["checks"]) == EXPECTED_CHECKS
    assert all(c["valid"] for c in report["checks"].values()) and report["first_violation"] is None
    history = History.load(run_dir / "history.jsonl")
    final = json.loads((run_dir / "final.json").read_text())
    assert len(final) == nodes  # every node, replaced ones included, reported its state
    started = [f for f in history.faults() if f.phase == "start"]
    assert len(started) == len([f for f in history.faults() if f.phase == "stop"])
    injected[(nodes, seed)] = {f.fault for f in started}


def test_the_matrix_injected_every_fault_kind() -> None:
    """Across the runs above, every kind but the namespace partition (a run of its own) and
    the opt-in kinds (tamper-state: tests/chaos/test_contract_run.py)."""
    assert len(injected) == len(MATRIX), "run the whole module: this test sums the runs above"
    missing = set(FAULT_KINDS) - set(NETNS_KINDS) - set(OPT_IN_KINDS)
    missing -= set().union(*injected.values())
    assert not missing, f"never injected: {sorted(missing)} ({injected})"
