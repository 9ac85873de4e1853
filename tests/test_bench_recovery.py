"""The recovery and backup bench (issue 16): its pure parts, and a --quick run on a real 3-node
cluster that loses its sealed state, recovers with 2 of 3 shares, saves a snapshot, loses
every node directory and comes back from the snapshot. No speed is asserted: the point is
that the bench a maintainer runs still works, and that its JSON holds what RESULTS.md quotes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import recovery
from bench.recovery import (
    Floor,
    Reopened,
    Restart,
    Restored,
    Saved,
    is_open,
    is_recovering,
    last,
    recovery_lines,
    snapshot_lines,
    timeline_line,
)

pytestmark = pytest.mark.timeout(240)


def test_a_node_in_recovery_mode_is_neither_open_nor_ready() -> None:
    recovering = {"ready": False, "recovering": True, "has_master_secret": False}
    assert is_recovering(recovering) and not is_open(recovering)
    opened = {"ready": True, "recovering": False, "has_master_secret": True}
    assert is_open(opened) and not is_recovering(opened)
    # Ready without the secret (or a host saying "recovering" while ready) is neither.
    assert not is_open({"ready": True, "has_master_secret": False})
    assert not is_recovering({"ready": True, "recovering": True})
    assert not is_open({}) and not is_recovering({})


def test_a_round_is_as_late_as_its_last_node_and_unknown_if_one_never_got_there() -> None:
    timeline = {"km1": {"api": 2.5, "open": 5.0}, "km2": {"api": 4.0, "open": 5.1}}
    done = Restart(5.2, 5.1, 5.3, 100, timeline)
    assert last(done, "api") == 4.0 and last(done, "open") == 5.1
    assert math.isnan(last(done, "recovering"))
    assert timeline_line(timeline) == "km1 api 2.50 open 5.00; km2 api 4.00 open 5.10"


def test_the_summary_prints_each_figure_with_its_ratio() -> None:
    restart = Restart(5.0, 5.0, 6.0, 5_000, {"km1": {"api": 2.0}})
    reopened = Reopened(0.4, 0.01, 0.02, 0.01, 0.05, 100.0)
    rec = recovery.Recovery(5.5, reopened, 6.0, 5_000, {"km1": {"api": 2.0}})
    lines = "\n".join(recovery_lines([restart], [rec]))
    assert "k-th share -> serving           60 ms   0.01x of a plain restart" in lines
    assert "recovery start -> serving       6,000 ms   1x" in lines
    saved = Saved(2.0, 0.5, 20 * recovery.MIB, 80, 100_000, 100_100, 1.5, 0.8, 0.4, 0.3)
    floor = Floor(0.3, 0.5, 0.25, 0.2, 19 * recovery.MIB)
    restored = Restored(1.0, 3.0, reopened, 4.5, 3, {"km1": {"api": 2.0}})
    lines = "\n".join(snapshot_lines([saved], [restored], [floor]))
    assert "10.0 MiB/s, 50,000 keys/s; 4x of KMState.snapshot()" in lines
    assert "5.0 MiB/s, 25,000 keys/s; 16x of KMState.restore" in lines


def test_quick_run_recovers_and_restores_with_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures.json"
    recovery.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    for label in ("k-th share -> serving", "recovery start -> serving", "save (kmctl",
                  "restore -> every node recovering", "plain restart"):  # fmt: skip
        assert label in printed, f"{label!r} missing from:\n{printed}"
    figures = json.loads(out.read_text())
    (restart,) = figures["restarts"]
    (rec,) = figures["recoveries"]
    (saved,) = figures["saves"]
    (restored,) = figures["restores"]
    # Recovery reopened every node and the probe key proved the MAC it proved before (the
    # bench fails otherwise); the restart's replay covered the ledger's keys.
    assert restart["replayed"] >= figures["settings"]["keys"]
    for key in ("kth_post_s", "open_s", "release_s"):
        assert math.isfinite(rec["reopened"][key]) and rec["reopened"][key] >= 0, key
    assert set(rec["timeline"]) == {"km1", "km2", "km3"}
    assert all("open" in marks for marks in rec["timeline"].values())
    # The snapshot held every key, and the restored cluster has the first, the last and the
    # probe (which proved the MAC it proved before the loss).
    assert saved["keys"] == figures["settings"]["snapshot_keys"]
    assert restored["present"] == 3
    assert saved["chunks"] >= 1 and saved["size"] > 0
    assert all("recovering" in marks for marks in restored["timeline"].values())
