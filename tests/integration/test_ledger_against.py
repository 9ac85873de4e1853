"""On real processes: a stopped node's ledger verifies with every signature counted, and an
older copy of it put back by its host is caught against a newer signed mark, whether the mark
comes from a file (`kmctl ledger mark`) or from another node's ledger."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from kmnode.cli import cli

from .harness import LocalCluster, running, until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running(tmp_path_factory.mktemp("ledger"), 3) as c:
        yield c


def kmctl(cluster: LocalCluster, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["-c", str(cluster.config_path), "ledger", *args])
    return result.exit_code, result.stdout, result.stderr


def write_and_settle(cluster: LocalCluster, follower: str, keys: list[str]) -> None:
    """Create ``keys``, then wait until the leader's enclave has signed them (it signs within
    ``ledger.sign_interval_s`` = 1 s of an unsigned entry) and ``follower`` has applied all."""
    for key in keys:
        code, reply = cluster.leader_call("POST", "/v1/keys", {"name": key})
        assert code == 201, reply
    time.sleep(2.5)
    leader = cluster.leader()

    def caught_up() -> bool:
        ours, theirs = cluster.status(follower), cluster.status(leader)
        return bool(ours and theirs and ours["applied"] == theirs["commit"])

    until(caught_up, 20, f"{follower} to apply the signed ledger")


def test_an_older_copy_put_back_is_caught_against_a_newer_mark(cluster: LocalCluster) -> None:
    leader = cluster.leader()
    follower = next(n for n in cluster.names if n != leader)
    raft = cluster.config.state_dir / "nodes" / follower / "raft"
    older, newer = cluster.root / "older-raft", cluster.root / "newer-raft"
    write_and_settle(cluster, follower, ["ledger-a", "ledger-b"])
    cluster.stop(follower)
    try:
        code, out, _ = kmctl(cluster, "verify", follower, "--json")
        assert code == 0, out
        report = json.loads(out)
        assert report["signatures"] >= 1 and report["uncounted_signatures"] == 0
        assert report["unsigned_tail"] == 0
        old_end = report["end_index"]
        shutil.copytree(raft, older)  # what a host keeps to put back later

        cluster.start(follower)
        cluster.wait_ready(follower)
        write_and_settle(cluster, follower, ["ledger-c", "ledger-d"])
        cluster.stop(follower)
        mark_file = cluster.root / "mark.json"
        code, _, err = kmctl(cluster, "mark", follower, "-o", str(mark_file))
        assert code == 0, err
        mark_index = json.loads(mark_file.read_text())["index"]
        assert mark_index > old_end

        shutil.move(raft, newer)
        shutil.copytree(older, raft)  # the rollback
        code, out, _ = kmctl(cluster, "verify", follower, "--json")
        assert code == 0, out  # alone, the older copy is a genuine signed prefix
        for reference in (str(mark_file), leader):
            code, out, _ = kmctl(cluster, "verify", follower, "--against", reference, "--force")
            assert code == 1, out
            assert "truncated or rolled back" in out and "before index" in out
        code, out, _ = kmctl(cluster, "verify", follower, "--against", str(mark_file), "--json")
        report = json.loads(out)
        assert report["first_bad_index"] == old_end + 1
    finally:
        if newer.exists():
            shutil.rmtree(raft, ignore_errors=True)
            shutil.move(newer, raft)
        cluster.start(follower)
        cluster.wait_ready(follower)
