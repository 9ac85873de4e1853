"""The data-authorization bench (issue 15) runs end to end on a real 3-node cluster with tiny
counts and prints every figure against its goal. No speed is asserted: the point is that the
bench a maintainer runs still works, and that its JSON holds what RESULTS.md quotes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import dataauth

pytestmark = pytest.mark.timeout(240)

FIGURE_LINES = (
    "token issue p50",
    "token issue p99",
    "tokens/s in flight",
    "compute 1 MiB p50",
)


def test_quick_run_prints_every_figure_against_its_goal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures.json"
    dataauth.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    for label in FIGURE_LINES:
        line = next((x for x in printed.splitlines() if label in x), None)
        assert line is not None, f"{label!r} missing from:\n{printed}"
        assert "goal" in line and ("met" in line or "MISSED" in line), line
    figures = json.loads(out.read_text())
    # Every token asked for was issued, every compute's result reached the user and opened.
    assert figures["single_tokens"] == 10 and figures["many_tokens"] == 40
    assert figures["compute_ok"] == 2 and figures["compute_values_agree"] is True
    figures_shown = ("single_p50_ms", "single_p99_ms", "many_tokens_per_s", "compute_p50_ms")
    for key in (*figures_shown, "plain_commit_p50_ms"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key


def test_the_large_dataset_is_one_mib_of_the_asked_rows() -> None:
    table = dataauth.table_csv(dataauth.LARGE_ROWS, dataauth.LARGE_BYTES)
    assert table.count(b"\n") == dataauth.LARGE_ROWS + 1  # the header too
    assert dataauth.LARGE_BYTES <= len(table) < dataauth.LARGE_BYTES + dataauth.LARGE_ROWS
