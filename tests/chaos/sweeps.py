"""One seeded real chaos run through `kmctl chaos sweep --seeds 1`, as the short run tests of
each workload make it: a fresh cluster on free ports on 127.0.0.1, stopped whatever happens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from kmnode.cli import cli


@dataclass(frozen=True)
class Sweep:
    output: str
    exit_code: int
    report: dict[str, Any]
    run_dir: Path

    def failed(self) -> dict[str, Any]:
        """The checks that did not pass, with their details."""
        return {n: c["detail"] for n, c in self.report["checks"].items() if not c["valid"]}


def sweep_once(config: Path, out: Path, seed: int, faults: str) -> Sweep:
    """Seed ``seed``'s run of 10 s, a fault every 1.5 s of the kinds ``faults`` names."""
    result = CliRunner().invoke(
        cli,
        ["-c", str(config), "chaos", "sweep", "--seeds", "1", "--first-seed", str(seed),
         "--duration", "10", "--interval", "1.5", "--faults", faults, "--out", str(out),
         "--json"],
    )  # fmt: skip
    run_dir = out / f"seed-{seed}"
    report = json.loads((run_dir / "report.json").read_text())
    return Sweep(result.output, result.exit_code, report, run_dir)
