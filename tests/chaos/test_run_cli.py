"""`kmctl chaos run` reporting and `kmctl chaos sweep` bookkeeping, with the cluster and the
run replaced by stand-ins: what a violation prints; one fresh state directory per seed, the
cluster always stopped, a run that breaks down recorded as that seed's violation while the
sweep goes on, and the table written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kmnode import supervisor
from kmnode.chaos import runner
from kmnode.chaos.checker import CheckOutcome, CheckResult, Violation
from kmnode.chaos.history import Operation
from kmnode.cli import cli
from kmnode.cli.output import EXIT_FAILURE, EXIT_REFUSED, EXIT_USAGE
from kmnode.config import ClusterConfig, config_to_yaml


def outcome(out_dir: Path) -> runner.RunOutcome:
    checks = {
        "no-lost-ops": CheckOutcome(True, "none lost"),
        "recovery": CheckOutcome(True, "2 heals", figure=1.25),
    }
    result = CheckResult(True, checks, {"release": {"ok": 7, "info": 1}}, {"kill": 2})
    out_dir.mkdir(parents=True, exist_ok=True)
    return runner.RunOutcome(result, out_dir / "history.jsonl", out_dir / "final.json", [], 0.5)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []
    monkeypatch.setattr(supervisor, "up", lambda cfg, **_: seen.append(("up", cfg.state_dir)))
    monkeypatch.setattr(supervisor, "down", lambda cfg, **_: seen.append(("down", cfg.state_dir)))

    def fake_run(cfg: ClusterConfig, config: runner.RunConfig, out: Path, log: Any) -> Any:
        seen.append(("run", config.seed))
        if config.seed == 2:
            raise runner.RunError("the cluster did not converge in 60s: leader/term ...")
        return outcome(out)

    monkeypatch.setattr(runner, "run", fake_run)
    return seen


def sweep(tmp_path: Path, *args: str) -> Any:
    config = tmp_path / "cluster.yaml"
    config.write_text(config_to_yaml(ClusterConfig.default(3)))
    return CliRunner().invoke(
        cli, ["-c", str(config), "chaos", "sweep", "--out", str(tmp_path / "out"), *args]
    )


def test_a_broken_run_is_recorded_and_the_sweep_goes_on(
    tmp_path: Path, calls: list[tuple[str, Any]]
) -> None:
    result = sweep(tmp_path, "--seeds", "3", "--duration", "5", "--json")
    assert result.exit_code == EXIT_FAILURE, result.output
    assert "seeds [2]" in result.output
    assert [c for c in calls if c[0] == "run"] == [("run", 1), ("run", 2), ("run", 3)]
    ups = [c[1] for c in calls if c[0] == "up"]
    assert ups == [c[1] for c in calls if c[0] == "down"]  # every cluster started was stopped
    assert len(set(ups)) == 3 and all(str(tmp_path / "out") in str(p) for p in ups)
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "sweep.jsonl").read_text().splitlines()
    ]
    assert [r["seed"] for r in rows] == [1, 2, 3]
    assert rows[0]["valid"] and rows[0]["ops"] == 8 and rows[0]["worst_recovery_s"] == 1.25
    assert not rows[1]["valid"] and "did not converge" in rows[1]["error"]
    table = (tmp_path / "out" / "sweep.md").read_text().splitlines()
    assert len(table) == 5 and table[3].startswith("| 2 | 3 | - |")
    assert json.loads((tmp_path / "out" / "seed-1" / "report.json").read_text())["valid"]


def test_an_unknown_fault_kind_stops_before_any_cluster_starts(
    tmp_path: Path, calls: list[tuple[str, Any]]
) -> None:
    result = sweep(tmp_path, "--seeds", "2", "--faults", "kill,meteor")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "meteor" in result.output and calls == []


def test_a_violation_prints_the_seed_the_history_and_the_first_violating_operation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = Operation(
        id=41, process="c2", kind="read", args={"key": "k1"}, node="km3", outcome="ok",
        invoke_index=80, invoke_time=5.0, complete_index=83, complete_time=5.2,
        value={"generation": 1},
    )  # fmt: skip
    later = dataclasses.replace(stale, id=57, invoke_index=120, complete_index=121)
    checks = {
        "no-lost-ops": CheckOutcome(True, "none lost"),
        "linearizable-keys": CheckOutcome(
            False, "2 violations", Violation("stale: 'k1' seen at g1 after g2", later), 2
        ),
        "identical-keys": CheckOutcome(
            False, "1 violation", Violation("stale: 'k1' seen at g1 ...", stale), 1
        ),
    }
    result = CheckResult(False, checks, {"read": {"ok": 3}}, {"partition": 1})

    def fake_run(cfg: ClusterConfig, config: runner.RunConfig, out: Path, log: Any) -> Any:
        return runner.RunOutcome(result, out / "history.jsonl", out / "final.json", [], 0.7)

    monkeypatch.setattr(runner, "run", fake_run)
    config = tmp_path / "cluster.yaml"
    config.write_text(config_to_yaml(ClusterConfig.default(3)))
    out = tmp_path / "run"
    args = ["-c", str(config), "chaos", "run", "--seed", "99", "--out", str(out)]
    shown = CliRunner().invoke(cli, args)
    assert shown.exit_code == EXIT_REFUSED, shown.output
    assert "INVALID (seed 99)" in shown.output
    assert str(out / "history.jsonl") in shown.output
    first = shown.output.split("first violation:", 1)[1]
    assert '"id": 41' in first and '"id": 57' not in first  # the earlier in the history
    assert "recovery after the final heal: 0.70s" in shown.output

    as_json = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)
    assert as_json["seed"] == 99 and as_json["valid"] is False
    assert as_json["first_violation"]["op"]["id"] == 41
