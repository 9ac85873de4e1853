"""`kmctl chaos` against the real chaos routes: one aiohttp server per node on 127.0.0.1 (its
own thread and loop), each with its own FaultRules, so the tests see which node got which rule.
Process and disk faults run on stand-in processes and files in a temp dir."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from consensus.storage import DurableLog
from consensus.types import Entry, EntryType, HardState
from kmnode.chaos import faults
from kmnode.cli.chaos_cmds import chaos
from kmnode.cli.context import CliContext
from kmnode.cli.output import EXIT_FAILURE, EXIT_REFUSED, EXIT_USAGE
from kmnode.config import ClusterConfig, config_to_yaml
from kmnode.host.chaos_api import add_chaos_routes
from kmnode.host.faults import RingStall
from kmnode.linkfaults import FaultRules, LinkRule, LocalLinkRules
from kmnode.supervisor import ProcessRecord, pid_path, write_pid_file
from tests.ports import free_ports

pytestmark = pytest.mark.timeout(60)

NAMES = ("km1", "km2", "km3")


async def no_service() -> int | None:
    """The stand-in nodes run no service enclave: there is nothing to crash."""
    return None


@dataclass
class FakeNode:
    rules: FaultRules
    stall: RingStall


class Nodes:
    """The chaos API of three nodes (only km1 and km2 are started unless asked)."""

    def __init__(self, root: Path, running: tuple[str, ...]) -> None:
        data = ClusterConfig.default(3).model_dump(mode="json")
        ports = iter(free_ports(2 * len(data["nodes"])))
        for node in data["nodes"]:
            node["api_port"], node["peer_port"] = next(ports), next(ports)
        data["state_dir"] = str(root / "state")
        self.config = ClusterConfig.model_validate(data)
        self.config_path = root / "cluster.yaml"
        self.config_path.write_text(config_to_yaml(self.config))
        self.nodes = {name: FakeNode(FaultRules(1), RingStall()) for name in running}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runners: list[web.AppRunner] = []

    async def _serve(self, name: str) -> None:
        node = self.nodes[name]
        app = web.Application()
        peers = [n for n in NAMES if n != name]
        add_chaos_routes(app, LocalLinkRules(node.rules), node.stall, no_service, lambda: peers)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.config.node(name).api_port).start()
        self.runners.append(runner)

    def start(self) -> None:
        self.thread.start()
        for name in self.nodes:
            asyncio.run_coroutine_threadsafe(self._serve(name), self.loop).result(10)

    def stop(self) -> None:
        for runner in self.runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def kmctl(self, *args: str) -> Result:
        return CliRunner().invoke(chaos, list(args), obj=CliContext(self.config_path))

    def rules(self, name: str) -> dict[str, LinkRule]:
        return self.nodes[name].rules.rules()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    cluster = Nodes(tmp_path, ("km1", "km2"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_partition_two_way_and_one_way(nodes: Nodes) -> None:
    result = nodes.kmctl("partition", "km1", "km2")
    assert result.exit_code == 0, result.output
    assert result.output == "partitioned km1 <-> km2\n"
    assert nodes.rules("km1") == {"km2": LinkRule(partition=True)}
    assert nodes.rules("km2") == {"km1": LinkRule(partition=True)}
    assert nodes.kmctl("heal").output == "healed all links (skipped km3: not running)\n"
    assert nodes.rules("km1") == nodes.rules("km2") == {}
    result = nodes.kmctl("partition", "km2", "km1", "--one-way", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == [
        {"node": "km2", "peer": "km1", "rule": LinkRule(partition=True).to_dict()}
    ]
    assert nodes.rules("km1") == {} and set(nodes.rules("km2")) == {"km1"}


def test_delay_drop_duplicate_compose_on_a_link(nodes: Nodes) -> None:
    assert nodes.kmctl("delay", "km1", "km2", "--ms", "20", "--jitter-ms", "5").output == (
        "delaying km1 <-> km2 by 20 ms ± 5 ms\n"
    )
    assert nodes.kmctl("drop", "km1", "km2", "--percent", "30", "--one-way").output == (
        "dropping 30% of km1 -> km2\n"
    )
    assert nodes.kmctl("duplicate", "km2", "km1", "--percent", "10").exit_code == 0
    assert nodes.rules("km1") == {
        "km2": LinkRule(drop=0.3, delay_ms=20, jitter_ms=5, duplicate=0.1)
    }
    assert nodes.rules("km2") == {"km1": LinkRule(delay_ms=20, jitter_ms=5, duplicate=0.1)}
    shown = nodes.kmctl("rules", "km1", "km3")
    assert shown.output == ("km1: km2: drop 30%, delay 20±5 ms, duplicate 10%\nkm3: not running\n")
    assert json.loads(nodes.kmctl("rules", "--json").output)["km2"]["rules"]["km1"] == (
        LinkRule(delay_ms=20, jitter_ms=5, duplicate=0.1).to_dict()
    )


def test_heal_one_node_or_one_link(nodes: Nodes) -> None:
    nodes.kmctl("partition", "km1", "km2")
    nodes.kmctl("partition", "km1", "km3", "--one-way")
    assert nodes.kmctl("heal", "km1", "km2").output == "healed km1 <-> km2\n"
    assert nodes.rules("km1") == {"km3": LinkRule(partition=True)} and nodes.rules("km2") == {}
    nodes.kmctl("partition", "km1", "km2")
    result = nodes.kmctl("heal", "km1")
    assert result.output == "healed every link of km1 (skipped km3: not running)\n"
    assert nodes.rules("km1") == nodes.rules("km2") == {}


def test_usage_errors_and_unreachable_nodes(nodes: Nodes) -> None:
    for args, message in [
        (("partition", "km1", "km1"), "two different nodes"),
        (("partition", "km1", "km9"), "km9"),
        (("drop", "km1", "km2", "--percent", "150"), "150"),
        (("delay", "km1", "km2"), "--ms"),
        (("corrupt", "km1"), "exactly one of"),
        (("corrupt", "km1", "--sealed", "--torn-tail"), "exactly one of"),
        (("ring-stall", "km1"), "--on"),
    ]:
        result = nodes.kmctl(*args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert message in result.output, (args, result.output)
    assert nodes.rules("km1") == {}
    result = nodes.kmctl("partition", "km1", "km3")  # km3's API is not running
    assert result.exit_code == EXIT_FAILURE and "km3" in result.output
    assert "not reachable" in result.output


def test_ring_stall_and_service_crash(nodes: Nodes) -> None:
    assert nodes.kmctl("ring-stall", "km2", "--on").output == "km2: service ring stalled\n"
    assert nodes.nodes["km2"].stall.stalled
    assert nodes.kmctl("ring-stall", "km2", "--off").output == "km2: service ring draining again\n"
    assert not nodes.nodes["km2"].stall.stalled
    result = nodes.kmctl("service-crash", "km1")  # the stand-in has no service enclave
    assert result.exit_code == EXIT_REFUSED
    assert "service enclave is not running" in result.output


def stand_in(cfg: ClusterConfig, name: str) -> subprocess.Popen[bytes]:
    """A sleeping process recorded in ``name``'s pid file, as `kmctl up` records a node."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    for _ in range(200):
        record = ProcessRecord.of(proc.pid)
        if record is not None and record.argv:
            write_pid_file(pid_path(cfg, name), record)
            return proc
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("stand-in process never showed its argv")


def test_process_faults_on_a_recorded_process(nodes: Nodes) -> None:
    cfg = nodes.config
    proc = stand_in(cfg, "km3")
    try:
        assert nodes.kmctl("pause", "km3").output == f"paused km3 (pid {proc.pid}) with SIGSTOP\n"
        resumed = json.loads(nodes.kmctl("resume", "km3", "--json").output)
        assert resumed["was_stopped"] is True and resumed["fault"] == "resume"
        result = nodes.kmctl("corrupt", "km3", "--torn-tail")
        assert result.exit_code == EXIT_REFUSED and "km3 is running" in result.output
        result = nodes.kmctl("restart", "km3")
        assert result.exit_code == EXIT_REFUSED and "kill it first" in result.output
        assert nodes.kmctl("kill", "km3").output == f"killed km3 (pid {proc.pid}) with SIGKILL\n"
        assert proc.wait(10) == -9
        result = nodes.kmctl("kill", "km3")
        assert result.exit_code == EXIT_REFUSED and "km3 is not running" in result.output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_corrupt_a_stopped_nodes_log(nodes: Nodes) -> None:
    cfg = nodes.config
    with DurableLog.open(faults.raft_dir(cfg, "km2"), fsync=False) as log:
        for i in range(1, 11):
            log.append([Entry(1, i, EntryType.NORMAL, b"y" * 30)], HardState(1, "km1", i))
    result = nodes.kmctl("corrupt", "km2", "--flip-byte", "middle", "--json")
    assert result.exit_code == 0, result.output
    done: dict[str, Any] = json.loads(result.output)
    assert done["fault"] == "flip-byte" and done["where"] == "middle"
    assert Path(done["file"]).name.startswith("wal-")
    result = nodes.kmctl("corrupt", "km2", "--flip-byte", "tail")
    assert result.exit_code == EXIT_REFUSED
    assert f"already damaged at offset {done['record_offset']}" in result.output
    line = nodes.kmctl("corrupt", "km1", "--torn-tail").output
    assert "has no Raft log segments" in line
    result = nodes.kmctl("corrupt", "km2", "--sealed")
    assert result.exit_code == EXIT_REFUSED and "no sealed state" in result.output
