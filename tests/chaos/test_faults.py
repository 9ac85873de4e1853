"""Fault injection without a cluster: the seeded link rules, the chaos API on a real aiohttp
server on 127.0.0.1, and disk faults on data directories in a temp dir."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from attest.errors import SealedDataCorrupt
from consensus.segments import encode_record, read_records
from consensus.storage import CorruptLogError, DurableLog
from consensus.types import Entry, EntryType, HardState
from kmnode.chaos import faults
from kmnode.chaos.faults import FaultError
from kmnode.chaos.history import HistoryRecorder
from kmnode.chaos.runner import RunConfig, record_outcome
from kmnode.client import ApiError, NodeUnreachable
from kmnode.config import ClusterConfig, config_to_yaml
from kmnode.datadir import SEALED_STATE
from kmnode.errors import KmsimError
from kmnode.host.chaos_api import add_chaos_routes
from kmnode.host.faults import RingStall
from kmnode.host.node import KMNode, NodeStartError
from kmnode.km.loader import load_km_enclave
from kmnode.km.service_link import crash_child, kill_child
from kmnode.linkfaults import Decision, FaultRuleError, FaultRules, LinkRule, LocalLinkRules
from kmnode.supervisor import ProcessRecord, pid_path, write_pid_file

pytestmark = pytest.mark.timeout(60)

# --- the rules engine --------------------------------------------------------------------------


def draws(seed: int | None, rule: LinkRule, count: int, peer: str = "b") -> list[Decision]:
    rules = FaultRules(seed)
    rules.set(peer, rule)
    return [rules.decide(peer) for _ in range(count)]


MIXED = LinkRule(drop=0.3, delay_ms=20, jitter_ms=10, duplicate=0.1)


def test_same_seed_same_decisions_other_seed_others() -> None:
    assert draws(42, MIXED, 500) == draws(42, MIXED, 500)
    assert draws(42, MIXED, 500) != draws(43, MIXED, 500)


def test_exact_counts_for_a_fixed_seed_within_bounds() -> None:
    rules = FaultRules(seed=42)
    rules.set("b", MIXED)
    decisions = [rules.decide("b") for _ in range(10_000)]
    dropped = sum(d.drop for d in decisions)
    duplicated = sum(d.duplicate for d in decisions)
    # Pinned for seed 42 (a change in the drawing order shows up here), and plausible:
    # within 4 standard deviations of 10,000 * p.
    assert (dropped, duplicated) == (2979, 694)
    assert abs(dropped - 3000) < 4 * math.sqrt(10_000 * 0.3 * 0.7)
    assert abs(duplicated - 0.1 * 7021) < 4 * math.sqrt(7021 * 0.1 * 0.9)
    assert rules.stats_dict() == {"b": {"dropped": 2979, "delayed": 7021, "duplicated": 694}}
    delays = [d.delay for d in decisions if not d.drop]
    assert all(0.010 <= d <= 0.030 for d in delays)
    assert all(d.delay == 0 and not d.duplicate for d in decisions if d.drop)


def test_links_draw_independently_of_each_other() -> None:
    """Sends to c interleaved with sends to b must not change b's decisions."""
    alone = draws(5, MIXED, 200, "b")
    rules = FaultRules(5)
    rules.set("b", MIXED)
    rules.set("c", MIXED)
    mixed = []
    for _ in range(200):
        rules.decide("c")
        mixed.append(rules.decide("b"))
    assert mixed == alone


def test_partition_drops_everything_and_no_rule_passes_everything() -> None:
    rules = FaultRules(1)
    rules.set("b", LinkRule(partition=True, delay_ms=5))
    assert all(rules.decide("b") == Decision(drop=True) for _ in range(100))
    assert all(rules.decide("c") == Decision() for _ in range(100))
    assert rules.stats_dict() == {"b": {"dropped": 100, "delayed": 0, "duplicated": 0}}


def test_certain_and_impossible_probabilities() -> None:
    assert all(d.drop for d in draws(None, LinkRule(drop=1.0), 100))
    assert not any(d.drop or d.duplicate for d in draws(None, LinkRule(delay_ms=1), 100))
    assert all(d.duplicate for d in draws(None, LinkRule(duplicate=1.0), 100))


def test_set_clear_and_noop_rules() -> None:
    rules = FaultRules(0)
    rules.set("b", LinkRule(drop=0.5))
    rules.set("c", LinkRule(partition=True))
    assert set(rules.rules()) == {"b", "c"}
    rules.clear("b")
    assert set(rules.rules()) == {"c"}
    rules.set("c", LinkRule())  # a rule that does nothing is no rule
    assert rules.rules() == {}
    rules.set("b", LinkRule(drop=0.5))
    rules.clear()
    assert rules.rules() == {}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"drop": 1.5}, "drop"),
        ({"drop": -0.1}, "drop"),
        ({"drop": math.nan}, "drop"),
        ({"duplicate": 2}, "duplicate"),
        ({"delay_ms": -1}, "delay_ms"),
        ({"delay_ms": math.inf}, "delay_ms"),
        ({"jitter_ms": 10**9}, "jitter_ms"),
        ({"drop": "0.3"}, "drop"),
        ({"drop": True}, "drop"),
        ({"partition": 1}, "partition"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(FaultRuleError) as caught:
        LinkRule(**kwargs)
    assert caught.value.field == field and repr(field) in str(caught.value)


def test_update_refuses_unknown_fields() -> None:
    with pytest.raises(FaultRuleError, match="'loss' is not a rule field"):
        LinkRule().updated({"loss": 0.1})
    assert LinkRule(drop=0.2).updated({"delay_ms": 5}) == LinkRule(drop=0.2, delay_ms=5)


async def test_ring_stall_blocks_until_lifted() -> None:
    stall = RingStall()
    await asyncio.wait_for(stall.wait_running(), 1)
    stall.set(True)
    waiter = asyncio.create_task(stall.wait_running())
    await asyncio.sleep(0.01)
    assert stall.stalled and not waiter.done()
    stall.set(False)
    await asyncio.wait_for(waiter, 1)
    assert stall.stalls == 1


# --- the chaos API -----------------------------------------------------------------------------


class Service:
    """Stands in for ServiceLink: a real child process, so service-crash really kills."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def crash(self) -> int | None:
        """As the KM enclave process does for its service enclave child."""
        return crash_child(self.pid if self.running else None)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)


class Api:
    def __init__(self, client: TestClient[Any, Any], rules: FaultRules, stall: RingStall) -> None:
        self.client, self.rules, self.stall = client, rules, stall

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = await self.client.request(method, path, json=body)
        return response.status, await response.json()


@pytest.fixture
def service() -> Any:
    svc = Service()
    yield svc
    svc.close()


@pytest.fixture
async def api(service: Service) -> AsyncIterator[Api]:
    rules, stall = FaultRules(3), RingStall()
    app = web.Application()
    add_chaos_routes(app, LocalLinkRules(rules), stall, service.crash, lambda: ["km2", "km3"])
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1", port=0))
    await client.start_server()
    try:
        yield Api(client, rules, stall)
    finally:
        await client.close()


async def test_set_show_and_heal_rules(api: Api) -> None:
    assert await api.call("POST", "/v1/chaos/rules", {"peer": "km2", "drop": 0.3}) == (
        200,
        {"peer": "km2", "rule": LinkRule(drop=0.3).to_dict()},
    )
    # Fields not given keep their value: delay is added to the drop rule.
    status, body = await api.call("POST", "/v1/chaos/rules", {"peer": "km2", "delay_ms": 15})
    assert status == 200 and body["rule"]["drop"] == 0.3 and body["rule"]["delay_ms"] == 15
    await api.call("POST", "/v1/chaos/rules", {"peer": "km3", "partition": True})
    api.rules.decide("km3")
    status, shown = await api.call("GET", "/v1/chaos/rules")
    assert status == 200
    assert shown["rules"] == {
        "km2": LinkRule(drop=0.3, delay_ms=15).to_dict(),
        "km3": LinkRule(partition=True).to_dict(),
    }
    assert shown["stats"] == {"km3": {"dropped": 1, "delayed": 0, "duplicated": 0}}
    assert shown["seed"] == 3 and shown["ring_stalled"] is False
    assert await api.call("POST", "/v1/chaos/heal", {"peer": "km2"}) == (200, {"healed": ["km2"]})
    assert set(api.rules.rules()) == {"km3"}
    assert await api.call("POST", "/v1/chaos/heal") == (200, {"healed": ["km3"]})
    assert api.rules.rules() == {}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chaos/rules", {"peer": "km2", "drop": 1.5}, "drop"),
        ("/v1/chaos/rules", {"peer": "km2", "delay_ms": -5}, "delay_ms"),
        ("/v1/chaos/rules", {"peer": "km2", "jitter_ms": "lots"}, "jitter_ms"),
        ("/v1/chaos/rules", {"peer": "km2", "duplicate": None}, "duplicate"),
        ("/v1/chaos/rules", {"peer": "km2", "partition": "yes"}, "partition"),
        ("/v1/chaos/rules", {"peer": "km2", "lossy": True}, "lossy"),
        ("/v1/chaos/rules", {"peer": "km9", "drop": 0.1}, "peer"),
        ("/v1/chaos/rules", {"drop": 0.1}, "peer"),
        ("/v1/chaos/heal", {"peer": "nobody"}, "peer"),
        ("/v1/chaos/ring-stall", {"stalled": "on"}, "stalled"),
        ("/v1/chaos/ring-stall", {}, "stalled"),
    ],
)
async def test_bad_input_is_400_naming_the_field_and_changes_nothing(
    api: Api, path: str, body: dict[str, Any], field: str
) -> None:
    await api.call("POST", "/v1/chaos/rules", {"peer": "km2", "delay_ms": 7})
    before = api.rules.rules()
    status, answer = await api.call("POST", path, body)
    assert status == 400
    assert answer["code"] == "bad_request" and answer["field"] == field
    assert repr(field) in answer["error"]
    assert api.rules.rules() == before and not api.stall.stalled


async def test_body_must_be_a_json_object(api: Api) -> None:
    response = await api.client.post("/v1/chaos/rules", data=b"{nope")
    assert response.status == 400 and "not valid JSON" in (await response.json())["error"]
    status, answer = await api.call("POST", "/v1/chaos/rules", [1, 2])
    assert status == 400 and "JSON object" in answer["error"]
    assert api.rules.rules() == {}


async def test_ring_stall_on_and_off(api: Api) -> None:
    assert await api.call("POST", "/v1/chaos/ring-stall", {"stalled": True}) == (
        200,
        {"stalled": True},
    )
    assert api.stall.stalled and (await api.call("GET", "/v1/chaos/rules"))[1]["ring_stalled"]
    assert await api.call("POST", "/v1/chaos/ring-stall", {"stalled": False}) == (
        200,
        {"stalled": False},
    )
    assert not api.stall.stalled


async def test_service_crash_kills_the_child_then_refuses(api: Api, service: Service) -> None:
    assert (await api.call("POST", "/v1/chaos/service-crash"))[0] == 409
    service.start()
    pid = service.pid
    assert await api.call("POST", "/v1/chaos/service-crash") == (200, {"killed": pid})
    assert service.proc is not None and service.proc.wait(10) == -9
    status, answer = await api.call("POST", "/v1/chaos/service-crash")
    assert status == 409 and answer["code"] == "refused"


def test_kill_child_never_signals_a_process_that_is_not_our_child() -> None:
    assert not kill_child(1)


# --- disk faults -------------------------------------------------------------------------------


def cluster_in(tmp_path: Path) -> ClusterConfig:
    return ClusterConfig.default(3).model_copy(update={"state_dir": tmp_path / "state"})


def write_log(cfg: ClusterConfig, node: str, count: int = 20) -> None:
    with DurableLog.open(faults.raft_dir(cfg, node), fsync=False) as log:
        for i in range(1, count + 1):
            log.append([Entry(1, i, EntryType.NORMAL, b"x" * 40)], HardState(1, "km1", i))


def last_index(cfg: ClusterConfig, node: str) -> int:
    with DurableLog.open(faults.raft_dir(cfg, node), fsync=False) as log:
        return log.last_index


def test_torn_tail_is_truncated_by_the_next_open(tmp_path: Path) -> None:
    cfg = cluster_in(tmp_path)
    write_log(cfg, "km2")
    done = faults.torn_tail(cfg, "km2")
    path = Path(done.detail["file"])
    assert path.stat().st_size == done.detail["offset"] > done.detail["record_offset"]
    assert done.fault == "torn-tail" and done.node == "km2"
    # Only the half-written record goes: every complete record (possibly acknowledged) stays.
    assert done.detail["torn_bytes"] > 0
    assert last_index(cfg, "km2") == 20
    assert path.stat().st_size == done.detail["record_offset"]


def test_flipped_byte_in_the_middle_is_corruption_at_that_offset(tmp_path: Path) -> None:
    cfg = cluster_in(tmp_path)
    write_log(cfg, "km1")
    done = faults.flip_byte(cfg, "km1", "middle")
    with pytest.raises(CorruptLogError) as caught:
        DurableLog.open(faults.raft_dir(cfg, "km1"), fsync=False)
    assert caught.value.offset == done.detail["record_offset"]
    assert str(caught.value.path) == done.detail["file"]
    assert f"at offset {done.detail['record_offset']}" in str(caught.value)


def test_flipped_byte_at_the_tail_is_a_torn_write(tmp_path: Path) -> None:
    cfg = cluster_in(tmp_path)
    write_log(cfg, "km1")
    done = faults.flip_byte(cfg, "km1", "tail")
    assert done.summary.endswith(", tail)") and done.detail["where"] == "tail"
    assert last_index(cfg, "km1") == 20
    assert Path(done.detail["file"]).stat().st_size == done.detail["record_offset"]


async def test_tampered_sealed_state_fails_to_unseal_and_the_node_refuses_to_start(
    tmp_path: Path,
) -> None:
    cfg = cluster_in(tmp_path)
    enclave = load_km_enclave(cfg, "km1")
    enclave.genesis()
    sealed = faults.data_dir(cfg, "km1") / SEALED_STATE
    sealed.parent.mkdir(parents=True)
    sealed.write_bytes(enclave.sealed_state())
    load_km_enclave(cfg, "km1").restore_sealed_state(sealed.read_bytes())  # intact: fine
    done = faults.tamper_sealed(cfg, "km1")
    assert done.detail == {"file": str(sealed), "offset": sealed.stat().st_size - 1}
    with pytest.raises(SealedDataCorrupt):
        load_km_enclave(cfg, "km1").restore_sealed_state(sealed.read_bytes())
    cfg_path = tmp_path / "cluster.yaml"
    cfg_path.write_text(config_to_yaml(cfg))
    node = KMNode(cfg, cfg_path, "km1")
    # The KM enclave process refuses the blob; the host stops what it started and says why.
    with pytest.raises(NodeStartError, match=r"SealedDataCorrupt|sealed"):
        await node.start()
    assert not node.km.running and node.km._rings == []  # the circuit's memfds are closed


def test_disk_faults_refuse_a_running_node_and_missing_files(tmp_path: Path) -> None:
    cfg = cluster_in(tmp_path)
    write_log(cfg, "km3", count=0)  # only the initial hard state
    with pytest.raises(FaultError, match="nothing in the middle"):
        faults.flip_byte(cfg, "km3", "middle")
    with pytest.raises(FaultError, match="no Raft log segments"):
        faults.torn_tail(cfg, "km2")
    with pytest.raises(FaultError, match="no sealed state"):
        faults.tamper_sealed(cfg, "km2")
    with pytest.raises(KeyError):
        faults.torn_tail(cfg, "km9")
    # A live process behind km3's pid file: this test process itself.
    me = ProcessRecord.of(os.getpid())
    assert me is not None
    write_pid_file(pid_path(cfg, "km3"), me)
    for fault in (faults.torn_tail, faults.tamper_sealed, faults.flip_byte):
        with pytest.raises(FaultError, match="km3 is running"):
            fault(cfg, "km3")


def test_process_faults_need_a_live_recorded_process(tmp_path: Path) -> None:
    cfg = cluster_in(tmp_path)
    for fault in (faults.kill, faults.pause, faults.resume):
        with pytest.raises(FaultError, match="km1 is not running"):
            fault(cfg, "km1")
    # A pid file naming a process that has since exited (pid reuse must not be signalled).
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    record = ProcessRecord.of(proc.pid)
    proc.wait(10)
    if record is not None:
        write_pid_file(pid_path(cfg, "km1"), record)
    with pytest.raises(FaultError, match="not running"):
        faults.kill(cfg, "km1")


def test_pause_resume_and_kill_a_recorded_process(tmp_path: Path) -> None:
    cfg = cluster_in(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = None
        for _ in range(200):  # until exec has happened and /proc shows the argv
            record = ProcessRecord.of(proc.pid)
            if record is not None and record.argv:
                break
            time.sleep(0.01)
        assert record is not None
        write_pid_file(pid_path(cfg, "km2"), record)
        assert faults.pause(cfg, "km2").detail["signal"] == "SIGSTOP"
        assert faults.resume(cfg, "km2").detail["was_stopped"] is True
        assert faults.resume(cfg, "km2").detail["was_stopped"] is False
        done = faults.kill(cfg, "km2")
        assert done.to_dict() == {
            "fault": "kill",
            "node": "km2",
            "summary": f"killed km2 (pid {proc.pid}) with SIGKILL",
            "pid": proc.pid,
            "signal": "SIGKILL",
        }
        assert proc.wait(10) == -9
        with pytest.raises(FaultError, match="not running"):
            faults.kill(cfg, "km2")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --- the runner's outcome classification -------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "outcome"),
    [
        (None, "ok"),
        (ApiError("km1", 409, "refused", "exists"), "fail"),
        (ApiError("km1", 400, "bad_request", "bad"), "fail"),
        (ApiError("km1", 503, "not_ready", "no leader"), "fail"),
        (ApiError("km1", 503, "unavailable", "dropped"), "info"),
        (ApiError("km1", 504, "timeout", "may still commit"), "info"),
        (NodeUnreachable("km1", "127.0.0.1:1"), "fail"),
        (KmsimError("did not answer within 10s", 3), "info"),
    ],
)
def test_runner_fails_an_op_only_when_the_cluster_certainly_did_not_act(
    raised: Exception | None, outcome: str
) -> None:
    recorder = HistoryRecorder(clock=iter(range(100)).__next__)
    handle = recorder.invoke("c0", "key.create", {"key": "k"}, "km1")

    def call() -> Any:
        if raised is not None:
            raise raised
        return {"key": "k", "generation": 1}

    record_outcome(handle, call, lambda answer: {"generation": answer["generation"]})
    (op,) = recorder.history().operations()
    assert op.outcome == outcome
    assert op.value == ({"generation": 1} if outcome == "ok" else None)


def test_run_config_refuses_unknown_faults() -> None:
    with pytest.raises(ValueError, match="unknown fault kinds"):
        RunConfig(seed=1, faults=("partition", "meteor"))
    assert RunConfig(seed=1).faults is None  # every kind the cluster supports


def _one_node(tmp_path: Path) -> tuple[ClusterConfig, Path]:
    cfg = ClusterConfig.default(1)
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = {"peer_port": a.getsockname()[1], "api_port": b.getsockname()[1]}
    spec = cfg.nodes[0].model_copy(update=ports)
    cfg = cfg.model_copy(update={"state_dir": tmp_path / "state", "nodes": [spec]})
    path = tmp_path / "cluster.yaml"
    path.write_text(config_to_yaml(cfg))
    return cfg, path


@pytest.mark.timeout(120)
async def test_a_log_record_the_host_changed_stops_the_node_at_start(tmp_path: Path) -> None:
    """The host edits a committed command in km1's Raft log and fixes the record's checksum;
    the KM enclave process refuses the log (its tag fails) and the node does not start."""
    cfg, path = _one_node(tmp_path)
    node = KMNode(cfg, path, "km1")
    await node.start()
    await node.stop()
    segment = sorted(faults.raft_dir(cfg, "km1").glob("wal-*.log"))[0]
    records, damage = read_records(segment.read_bytes())
    assert damage is None and any(b"cluster.init" in p for _, p in records)
    segment.write_bytes(
        b"".join(encode_record(p.replace(b'"demo"', b'"evil"')) for _, p in records)
    )
    node = KMNode(cfg, path, "km1")
    with pytest.raises(NodeStartError, match="fails authentication"):
        await node.start()
