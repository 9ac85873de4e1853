"""Fault injection on a real 3-node cluster on 127.0.0.1, started as `kmctl up` starts it.

The nodes run under the supervisor (pid files), so the process and disk faults of
kmnode.chaos.faults find them exactly as `kmctl chaos` does; link rules go through each node's
`/v1/chaos/...` API. Each test leaves the cluster healed and converged for the next one; the
fixture stops every process it started (`supervisor.down`) whatever happens.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kmnode import supervisor
from kmnode.chaos import faults
from kmnode.chaos.faults import FaultError
from kmnode.chaos.history import History
from kmnode.cli.chaos_cmds import chaos
from kmnode.cli.context import CliContext

from .harness import LocalCluster, until

pytestmark = pytest.mark.timeout(300)


class SupervisedCluster(LocalCluster):
    """The harness's config and API helpers, with processes owned by the supervisor."""

    def up(self, timeout: float = 60.0) -> None:
        supervisor.up(self.config, timeout=timeout)

    def close(self) -> None:
        supervisor.down(self.config, grace=5.0)
        super().close()

    def others(self, name: str) -> list[str]:
        return [n for n in self.names if n != name]

    def chaos(self, name: str, path: str, body: Any = None) -> Any:
        code, reply = self.api(name, "POST", f"/v1/chaos/{path}", body if body else {})
        assert code == 200, (name, path, body, reply)
        return reply

    def partition(self, a: str, b: str, one_way: bool = False) -> None:
        self.chaos(a, "rules", {"peer": b, "partition": True})
        if not one_way:
            self.chaos(b, "rules", {"peer": a, "partition": True})

    def heal_all(self) -> None:
        for name in self.names:
            self.chaos(name, "heal")

    def converged(self, timeout: float = 30.0) -> str:
        """Wait until every node is ready, names the same leader in the same term and has
        applied the same index; returns the leader."""
        seen: list[str] = []

        def agree() -> bool:
            statuses = [self.status(n) for n in self.names]
            if not all(s and s["ready"] for s in statuses):
                return False
            views = {(s["leader"], s["term"], s["commit"], s["applied"]) for s in statuses if s}
            if len(views) != 1:
                return False
            seen.append(statuses[0]["leader"] if statuses[0] else "")
            return True

        until(agree, timeout, "all nodes to agree on leader, term and applied index", 0.1)
        return seen[-1]

    def create_key(self, name: str, among: list[str] | None = None) -> None:
        """Create a key through a leader among ``among``, retrying (bounded) while leadership
        moves: a timed-out attempt may commit later, so "exists" (409) on a retry is success.
        """
        answers: list[tuple[int, Any]] = []
        for _ in range(10):
            leader = self.leader(among, timeout=30)
            code, reply = self.api(leader, "POST", "/v1/keys", {"name": name})
            answers.append((code, reply))
            if code == 201 or (code == 409 and len(answers) > 1):
                return
            if code not in (421, 503, 504):
                break
        raise AssertionError(f"could not create key {name}: {answers}")

    def release_all(self, key: str) -> list[dict[str, Any]]:
        code, reply = self.leader_call(
            "POST", f"/v1/keys/{key}/release", {"node": "all", "timeout": 20}
        )
        assert code == 200, reply
        releases: list[dict[str, Any]] = reply["releases"]
        return releases

    def fingerprints(self, key: str) -> set[str]:
        """Each node's fingerprint of generation 1 (equal ones prove equal key bytes)."""
        found = set()
        for name in self.names:
            code, reply = self.api(name, "GET", f"/v1/keys/{key}?linearizable=1")
            assert code == 200, (name, reply)
            found.add(reply["fingerprints"]["1"])
        return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisedCluster]:
    c = SupervisedCluster(tmp_path_factory.mktemp("faults"), nodes=3)
    try:
        c.up()
        c.converged()
        yield c
    finally:
        c.close()


# --- links -------------------------------------------------------------------------------------


def test_leader_partitioned_from_both_followers_is_replaced_then_rejoins(
    cluster: SupervisedCluster,
) -> None:
    old = cluster.converged()
    followers = cluster.others(old)
    try:
        for follower in followers:
            cluster.partition(old, follower)
        new = cluster.leader(among=followers, timeout=30)
        assert new in followers
        cluster.create_key("during-partition", among=followers)  # the majority commits
    finally:
        cluster.heal_all()
    assert cluster.converged() in cluster.names
    assert cluster.status(old)["role"] in ("follower", "leader")  # type: ignore[index]
    code, reply = cluster.api(old, "GET", "/v1/keys/during-partition?linearizable=1")
    assert code == 200 and reply["generation"] == 1, reply
    shown = cluster.api(old, "GET", "/v1/chaos/rules")[1]
    assert shown["rules"] == {}
    assert {p: s["dropped"] > 0 for p, s in shown["stats"].items()} == {f: True for f in followers}


def test_one_way_partition_keeps_the_cluster_committing(cluster: SupervisedCluster) -> None:
    leader = cluster.converged()
    follower = cluster.others(leader)[0]
    cluster.partition(leader, follower, one_way=True)  # the leader's messages to it are lost
    try:
        cluster.create_key("one-way")
    finally:
        cluster.heal_all()
    cluster.converged()
    code, reply = cluster.api(follower, "GET", "/v1/keys/one-way?linearizable=1")
    assert code == 200 and reply["generation"] == 1, reply


def test_releases_succeed_with_30_percent_loss_on_every_link(cluster: SupervisedCluster) -> None:
    cluster.converged()
    for name in cluster.names:
        for peer in cluster.others(name):
            cluster.chaos(name, "rules", {"peer": peer, "drop": 0.3, "delay_ms": 2})
    try:
        cluster.create_key("lossy")
        releases = cluster.release_all("lossy")
        assert {r["node"] for r in releases} == set(cluster.names)
        assert all(r["status"] == "provisioned" for r in releases), releases
        dropped = sum(
            s["dropped"]
            for name in cluster.names
            for s in cluster.api(name, "GET", "/v1/chaos/rules")[1]["stats"].values()
        )
        assert dropped > 0
    finally:
        cluster.heal_all()
    cluster.converged()
    assert len(cluster.fingerprints("lossy")) == 1


def test_crashed_service_enclave_is_restarted_by_the_next_release(
    cluster: SupervisedCluster,
) -> None:
    leader = cluster.converged()
    node = cluster.others(leader)[0]
    cluster.create_key("after-crash")
    pid = cluster.chaos(node, "service-crash")["killed"]
    until(lambda: not cluster.status(node)["service"]["running"], 10, "service down")  # type: ignore[index]
    code, reply = cluster.leader_call(
        "POST", "/v1/keys/after-crash/release", {"node": node, "timeout": 20}
    )
    assert code == 200 and reply["releases"][0]["status"] == "provisioned", reply
    assert cluster.status(node)["service"]["running"]  # type: ignore[index]
    assert isinstance(pid, int)


# --- processes ---------------------------------------------------------------------------------


def test_kill_and_restart_a_follower_then_pause_the_leader(cluster: SupervisedCluster) -> None:
    cfg = cluster.config
    leader = cluster.converged()
    victim = cluster.others(leader)[0]
    done = faults.kill(cfg, victim)
    assert done.fault == "kill" and victim not in supervisor.running(cfg)
    cluster.create_key("while-down", among=cluster.others(victim))  # two of three commit
    assert faults.restart(cfg, victim, timeout=60).detail["ready"] is True
    cluster.converged()
    code, reply = cluster.api(victim, "GET", "/v1/keys/while-down?linearizable=1")
    assert code == 200, reply

    paused = cluster.converged()
    faults.pause(cfg, paused)
    try:
        new = cluster.leader(among=cluster.others(paused), timeout=30)
        assert new != paused
    finally:
        assert faults.resume(cfg, paused).detail["was_stopped"] is True
    cluster.converged()


# --- disks -------------------------------------------------------------------------------------


def test_disk_faults_on_a_stopped_follower(cluster: SupervisedCluster) -> None:
    cfg = cluster.config
    victim = cluster.others(cluster.converged())[0]
    faults.kill(cfg, victim)
    with pytest.raises(FaultError, match="is running"):
        faults.torn_tail(cfg, cluster.others(victim)[0])
    # A torn tail is what a crash leaves: the node truncates it and catches up.
    faults.torn_tail(cfg, victim)
    faults.restart(cfg, victim, timeout=60)
    cluster.converged()

    faults.kill(cfg, victim)
    data = faults.data_dir(cfg, victim)
    backup = cluster.root / f"{victim}-backup"
    shutil.copytree(data, backup)
    flipped = faults.flip_byte(cfg, victim, "middle")
    with pytest.raises(FaultError, match=f"at offset {flipped.detail['record_offset']}"):
        faults.restart(cfg, victim, timeout=60)
    restore(backup, data)
    faults.tamper_sealed(cfg, victim)
    with pytest.raises(FaultError, match="exited") as refused:
        faults.restart(cfg, victim, timeout=60)
    assert "SealedDataCorrupt" in str(refused.value) or "fails authentication" in str(refused.value)
    restore(backup, data)
    faults.restart(cfg, victim, timeout=60)
    cluster.converged()


def test_node_with_a_corrupted_mid_log_refuses_to_start_and_a_fresh_node_replaces_it(
    cluster: SupervisedCluster,
) -> None:
    """The first node of cluster.yaml on purpose: started from an empty directory it would
    found a second cluster, unless the replacement marks the directory to join."""
    cfg = cluster.config
    cluster.converged()
    victim = cluster.names[0]
    cluster.create_key("before-damage")
    faults.kill(cfg, victim)
    flipped = faults.flip_byte(cfg, victim, "middle")
    with pytest.raises(FaultError, match=f"at offset {flipped.detail['record_offset']}") as no:
        faults.restart(cfg, victim, timeout=60)
    assert f"kmctl chaos replace {victim}" in str(no.value)  # the log says what to do

    # The two others go on without it.
    survivors = cluster.others(victim)
    cluster.create_key("while-broken", among=survivors)

    done = faults.replace(cfg, victim, timeout=60)
    assert Path(done.detail["old_data"]).is_dir()  # kept for inspection
    leader = cluster.converged()
    code, members = cluster.api(leader, "GET", "/v1/members?linearizable=1")
    assert code == 200, members
    assert sorted(members["voters"]) == sorted(cluster.names)
    assert sorted(m["name"] for m in members["members"]) == sorted(cluster.names)
    # Same master secret: every node, the replaced one too, derives the same key bytes.
    for key in ("before-damage", "while-broken"):
        assert len(cluster.fingerprints(key)) == 1
    assert {r["status"] for r in cluster.release_all("while-broken")} == {"provisioned"}
    code, status = cluster.api(victim, "GET", "/v1/status")
    assert code == 200 and status["cluster"] == cluster.status(leader)["cluster"]  # type: ignore[index]


def restore(backup: Path, data: Path) -> None:
    shutil.rmtree(data)
    shutil.copytree(backup, data)


# --- a hostile host ------------------------------------------------------------------------------


def test_a_poisoned_host_stops_no_node_and_gets_no_5xx(cluster: SupervisedCluster) -> None:
    """The target's host feeds garbage into its enclave's circuit, its own API and every peer
    port for a while, as the `poison` nemesis does; meanwhile the cluster keeps committing. No
    node stops, nothing answers with a 5xx or an internal failure, no node logs a traceback,
    and afterwards every node agrees and keys are still identical everywhere."""
    cluster.converged()
    victim = cluster.others(cluster.leader())[0]
    logs = {n: supervisor.log_path(cluster.config, n) for n in cluster.names}
    offsets = {n: path.stat().st_size for n, path in logs.items()}
    pid = faults.live_pid(cluster.config, victim)
    started = cluster.chaos(victim, "poison", {"enabled": True, "seed": 5, "rate": 100})
    assert started["enabled"] is True and started["seed"] == 5
    try:
        for i in range(3):  # the cluster works while one host is hostile
            cluster.create_key(f"poisoned-{i}")
            time.sleep(0.5)
    finally:
        stopped = cluster.chaos(victim, "poison", {"enabled": False})
    stats = stopped["stats"]
    assert stopped["enabled"] is False
    assert set(stats["sent"]) == {"enclave_bytes", "enclave_typed", "api_calls", "http", "peer"}
    assert stats["problems"] == []
    assert not any(kind.startswith("http:5") for kind in stats["answers"]), stats["answers"]
    assert faults.live_pid(cluster.config, victim) == pid
    cluster.converged()
    cluster.create_key("after-poison")
    assert len(cluster.fingerprints("after-poison")) == 1
    for name, path in logs.items():
        with path.open("rb") as log:
            log.seek(offsets[name])
            assert b"Traceback" not in log.read(), f"{name} logged a traceback while poisoned"


def test_kmctl_chaos_poison_turns_a_host_hostile_and_reports_what_it_sent(
    cluster: SupervisedCluster,
) -> None:
    name = cluster.names[-1]
    context = CliContext(cluster.config_path)
    on = CliRunner().invoke(chaos, ["poison", name, "--on", "--seed", "3"], obj=context)
    assert on.exit_code == 0 and "host poisoning its inputs (seed 3, 40/s)" in on.output
    time.sleep(1.0)
    off = CliRunner().invoke(chaos, ["poison", name, "--off"], obj=context)
    assert off.exit_code == 0 and f"{name}: poison stopped; sent " in off.output, off.output
    assert off.output.rstrip().endswith("findings: none"), off.output
    bad = CliRunner().invoke(chaos, ["poison", name, "--on", "--rate", "0"], obj=context)
    assert bad.exit_code == 2 and "--rate" in bad.output


def test_poison_refuses_bad_settings_and_changes_nothing(cluster: SupervisedCluster) -> None:
    name = cluster.names[0]
    before = cluster.chaos(name, "poison", {"enabled": False})
    for body, field in (
        ({"enabled": "yes"}, "enabled"),
        ({"enabled": True, "seed": -1}, "seed"),
        ({"enabled": True, "seed": True}, "seed"),
        ({"enabled": True, "rate": 0}, "rate"),
        ({"enabled": True, "rate": 1e9}, "rate"),
    ):
        code, reply = cluster.api(name, "POST", "/v1/chaos/poison", body)
        assert (code, reply.get("field")) == (400, field), (body, reply)
    assert cluster.chaos(name, "poison", {"enabled": False}) == before  # nothing ran
    code, reply = cluster.api(name, "POST", "/v1/chaos/poison", {"enabled": True}, signer=None)
    assert code == 401


# --- a whole seeded run ------------------------------------------------------------------------


def test_seeded_chaos_run_is_judged_valid(cluster: SupervisedCluster) -> None:
    cluster.converged()
    out = cluster.root / "run"
    result = CliRunner().invoke(
        chaos,
        ["run", "--seed", "11", "--duration", "14", "--interval", "1.5", "--out", str(out),
         "--json"],
        obj=CliContext(cluster.config_path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["valid"] is True, report["checks"]
    assert set(report["checks"]) >= {"release-committed", "identical-keys", "no-lost-ops"}
    history = History.load(out / "history.jsonl")
    started = [f for f in history.faults() if f.phase == "start"]
    assert started and len(started) == len([f for f in history.faults() if f.phase == "stop"])
    assert sum(report["stats"].get("release", {}).values()) > 0
    cluster.converged()
