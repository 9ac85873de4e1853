"""kmctl up/down process management with real child processes and stand-in nodes.

The stand-in node is a tiny aiohttp program serving /v1/status on the configured api_port; it
refuses to start unless the first node is already ready, so the order `up` promises is
checked by the children themselves. Every test stops what it starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from kmnode import supervisor
from kmnode.cli import cli
from kmnode.cli.output import CliError
from kmnode.config import (
    ClusterConfig,
    MqttSpec,
    NodeSpec,
    PlatformSpec,
    config_to_yaml,
    load_config,
)
from kmnode.supervisor import ProcessRecord, SupervisorError
from tests.ports import free_port, free_ports

pytestmark = pytest.mark.timeout(120)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]

FAKE_NODE = textwrap.dedent(
    """
    import json, socket, sys, urllib.request
    from pathlib import Path
    from aiohttp import web
    from kmnode.config import load_config

    cfg = load_config(Path(sys.argv[1]))
    name, mode = sys.argv[2], sys.argv[3]
    node, first = cfg.node(name), cfg.nodes[0]
    print(f"fake {name} starting in mode {mode}", flush=True)
    if mode == "die":
        print("fatal: cannot open the data directory", flush=True)
        sys.exit(4)
    if name != first.name and mode != "resume":
        url = f"http://{first.host}:{first.api_port}/v1/status"
        try:
            status = json.load(urllib.request.urlopen(url, timeout=2))
        except OSError as exc:
            print(f"first node not serving: {exc}", flush=True)
            sys.exit(5)
        if not status["ready"]:
            print("started before the first node was ready", flush=True)
            sys.exit(5)
    for i in range(15):
        print(f"fake log line {i}", flush=True)
    everyone = [n.name for n in cfg.nodes]

    def quorum():
        # A resumed member is ready only once every other member's port accepts connections.
        for other in cfg.nodes:
            try:
                socket.create_connection((other.host, other.api_port), timeout=0.2).close()
            except OSError:
                return False
        return True

    async def status(request):
        ready = mode == "ok" or (mode == "resume" and quorum())
        return web.json_response({
            "node": name, "ready": ready, "leader": first.name if ready else None,
            "role": "leader" if name == first.name else "follower", "term": 1,
            "commit": 1, "applied": 1, "peers": {}, "service": {"running": True},
            "members": everyone if mode == "resume" else [name],
            "voters": everyone if mode == "resume" else [name],
        })

    app = web.Application()
    app.router.add_get("/v1/status", status)
    web.run_app(app, host=node.host, port=node.api_port, print=None, access_log=None)
    """
)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[ClusterConfig]:
    ports = iter(free_ports(6))  # a peer and an API port per node
    nodes = [
        NodeSpec(
            name=f"km{i}",
            peer_port=next(ports),
            api_port=next(ports),
            platform=PlatformSpec(id=f"platform-{i}"),
        )
        for i in (1, 2, 3)
    ]
    config = ClusterConfig(
        state_dir=tmp_path / "state", nodes=nodes, mqtt=MqttSpec(url="mqtt://127.0.0.1:1")
    )
    yield config
    supervisor.down(config, grace=1.0)  # whatever a failed test left running


@pytest.fixture
def fake_node(tmp_path: Path) -> Path:
    path = tmp_path / "fake_node.py"
    path.write_text(FAKE_NODE)
    return path


def stand_in(script: Path, **modes: str) -> supervisor.NodeCommand:
    def command(config_file: Path, name: str) -> list[str]:
        return [sys.executable, str(script), str(config_file), name, modes.get(name, "ok")]

    return command


def spawn_sleeper(cfg: ClusterConfig, name: str, argv: list[str] = SLEEPER) -> ProcessRecord:
    _, record = supervisor.spawn(
        name, argv, supervisor.log_path(cfg, name), supervisor.pid_path(cfg, name)
    )
    return record


# --- pid files and down ---------------------------------------------------------------------


def test_pid_file_round_trip_and_identity_of_this_process(tmp_path: Path) -> None:
    me = ProcessRecord.of(os.getpid())
    assert me is not None and me.argv == tuple(
        Path("/proc/self/cmdline").read_text().split("\0")[:-1]
    )
    path = tmp_path / "run" / "x.pid"
    supervisor.write_pid_file(path, me)
    assert path.read_text().splitlines()[0] == str(os.getpid())
    assert supervisor.read_pid_file(path) == me
    assert supervisor.is_ours(me)
    assert not supervisor.is_ours(ProcessRecord(me.pid, me.start_ticks + 1, me.argv))
    path.write_text("garbage")
    assert supervisor.read_pid_file(path) is None


def test_down_stops_a_recorded_process_and_removes_its_pid_file(cfg: ClusterConfig) -> None:
    record = spawn_sleeper(cfg, "km1")
    assert supervisor.running(cfg) == {"km1": record}
    outcomes = supervisor.down(cfg)
    assert [(o.name, o.pid, o.result) for o in outcomes] == [("km1", record.pid, "stopped")]
    assert wait_gone(record.pid)
    assert not supervisor.pid_path(cfg, "km1").exists()
    assert supervisor.running(cfg) == {}


def test_down_never_signals_a_pid_that_is_not_the_recorded_process(cfg: ClusterConfig) -> None:
    stranger = subprocess.Popen(SLEEPER)
    try:
        real = ProcessRecord.of(stranger.pid)
        assert real is not None
        other_argv = ProcessRecord(real.pid, real.start_ticks, ("python", "-m", "kmnode.cli"))
        recycled = ProcessRecord(real.pid, real.start_ticks - 1, real.argv)
        supervisor.write_pid_file(supervisor.pid_path(cfg, "km1"), other_argv)
        supervisor.write_pid_file(supervisor.pid_path(cfg, "km2"), recycled)
        outcomes = supervisor.down(cfg, grace=0.5)
        assert [o.result for o in outcomes] == ["not ours", "not ours"]
        assert alive(stranger.pid)
        assert not list(supervisor.run_dir(cfg).glob("*.pid"))
    finally:
        stranger.kill()
        stranger.wait(10)


def test_down_kills_what_ignores_sigterm(cfg: ClusterConfig) -> None:
    stubborn = [
        sys.executable,
        "-c",
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring', flush=True)\n"
        "time.sleep(60)",
    ]
    record = spawn_sleeper(cfg, "km1", stubborn)
    deadline = time.monotonic() + 10
    while "ignoring" not in supervisor.log_path(cfg, "km1").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    outcomes = supervisor.down(cfg, grace=0.5)
    assert [o.result for o in outcomes] == ["killed"]
    assert wait_gone(record.pid)


def test_down_leaves_no_descendant_running(cfg: ClusterConfig) -> None:
    parent = [
        sys.executable,
        "-c",
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)",
    ]
    record = spawn_sleeper(cfg, "km1", parent)
    log = supervisor.log_path(cfg, "km1")
    deadline = time.monotonic() + 10
    while not log.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(log.read_text().split()[0])
    assert alive(grandchild)
    supervisor.down(cfg)
    assert wait_gone(record.pid)
    assert wait_gone(grandchild)


def test_stale_and_broken_pid_files_are_cleaned_up(cfg: ClusterConfig) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    record = ProcessRecord.of(proc.pid) or ProcessRecord(proc.pid, 1, ("x",))
    proc.wait(10)
    supervisor.write_pid_file(supervisor.pid_path(cfg, "km1"), record)
    supervisor.pid_path(cfg, "km2").write_text("not a pid file")
    outcomes = supervisor.down(cfg)
    assert [(o.name, o.result) for o in outcomes] == [("km1", "gone")]
    assert not list(supervisor.run_dir(cfg).glob("*.pid"))


def test_up_and_down_refuse_to_run_concurrently(cfg: ClusterConfig, fake_node: Path) -> None:
    with supervisor.exclusive(cfg):
        with pytest.raises(SupervisorError, match="another kmctl up or down is running"):
            supervisor.down(cfg)
        with pytest.raises(SupervisorError, match="another kmctl up or down is running"):
            supervisor.up(cfg, command=stand_in(fake_node))
    assert supervisor.down(cfg) == []


# --- up -------------------------------------------------------------------------------------


def test_up_starts_nodes_in_order_is_idempotent_and_down_stops_all(
    cfg: ClusterConfig, fake_node: Path
) -> None:
    seen: list[tuple[str, str]] = []
    result = supervisor.up(
        cfg, timeout=20, progress=lambda n, m: seen.append((n, m)), command=stand_in(fake_node)
    )
    assert result.started == ["km1", "km2", "km3"]
    joined = [n for n, m in seen if m.startswith("joined")]
    assert joined == ["km1", "km2", "km3"]
    effective = load_config(result.config_file)
    assert effective.nodes == cfg.nodes and effective.state_dir == cfg.state_dir
    records = supervisor.running(cfg)
    assert sorted(records) == ["km1", "km2", "km3"]
    for name, record in records.items():
        assert record.argv[-2:] == (name, "ok")

    again = supervisor.up(cfg, timeout=20, command=stand_in(fake_node))
    assert again.already_up
    assert supervisor.running(cfg) == records

    outcomes = supervisor.down(cfg)
    assert sorted((o.name, o.result) for o in outcomes) == [
        ("km1", "stopped"),
        ("km2", "stopped"),
        ("km3", "stopped"),
    ]
    assert all(wait_gone(r.pid) for r in records.values())
    assert supervisor.running(cfg) == {}


def test_up_starts_a_resuming_cluster_without_waiting_node_by_node(
    cfg: ClusterConfig, fake_node: Path
) -> None:
    seen: list[tuple[str, str]] = []
    modes = {n.name: "resume" for n in cfg.nodes}
    result = supervisor.up(
        cfg,
        timeout=20,
        progress=lambda n, m: seen.append((n, m)),
        command=stand_in(fake_node, **modes),
    )
    assert result.started == ["km1", "km2", "km3"]
    assert ("km1", "resuming: needs km2, km3 for a quorum") in seen
    assert sorted(n for n, m in seen if m.startswith("joined")) == ["km1", "km2", "km3"]


def test_up_restarts_only_the_missing_node(cfg: ClusterConfig, fake_node: Path) -> None:
    supervisor.up(cfg, timeout=20, command=stand_in(fake_node))
    before = supervisor.running(cfg)
    os.kill(before["km2"].pid, signal.SIGKILL)
    assert wait_gone(before["km2"].pid)
    result = supervisor.up(cfg, timeout=20, command=stand_in(fake_node))
    assert result.started == ["km2"]
    after = supervisor.running(cfg)
    assert after["km1"] == before["km1"] and after["km3"] == before["km3"]


def test_up_timeout_names_the_node_shows_its_log_and_stops_everything(
    cfg: ClusterConfig, fake_node: Path
) -> None:
    with pytest.raises(SupervisorError) as info:
        supervisor.up(cfg, timeout=3, command=stand_in(fake_node, km2="never"))
    message = info.value.message
    assert message.startswith("km2 was not ready after 3s (last seen: running, waiting for")
    assert "fake log line 14" in message and "fake log line 4\n" not in message
    assert len([line for line in message.splitlines() if line.startswith("  | ")]) == 10
    assert info.value.exit_code == 3
    assert supervisor.running(cfg) == {}
    assert not list(supervisor.run_dir(cfg).glob("*.pid"))


def test_up_reports_a_node_that_exits(cfg: ClusterConfig, fake_node: Path) -> None:
    with pytest.raises(SupervisorError) as info:
        supervisor.up(cfg, timeout=20, command=stand_in(fake_node, km1="die"))
    assert "km1 exited" in info.value.message and "with code 4" in info.value.message
    assert "fatal: cannot open the data directory" in info.value.message
    assert supervisor.running(cfg) == {}


def test_up_notices_an_already_running_node_dying_while_it_waits(
    cfg: ClusterConfig, fake_node: Path
) -> None:
    config_file = supervisor.write_effective_config(cfg)
    proc, _ = supervisor.spawn(
        "km1",
        stand_in(fake_node, km1="never")(config_file, "km1"),
        supervisor.log_path(cfg, "km1"),
        supervisor.pid_path(cfg, "km1"),
    )
    killer = threading.Timer(1.0, proc.kill)
    killer.start()
    try:
        with pytest.raises(SupervisorError) as info:
            supervisor.up(cfg, timeout=60, command=stand_in(fake_node))
    finally:
        killer.cancel()
        proc.kill()
        proc.wait(10)
    assert info.value.message.startswith("km1 exited with an unknown code before it was ready")
    assert supervisor.running(cfg) == {}


def test_up_refuses_a_port_in_use_before_starting_anything(
    cfg: ClusterConfig, fake_node: Path
) -> None:
    node = cfg.nodes[1]
    with socket.socket() as blocker:
        blocker.bind((node.host, node.api_port))
        blocker.listen()
        with pytest.raises(SupervisorError) as info:
            supervisor.up(cfg, timeout=20, command=stand_in(fake_node))
    assert f"cannot start km2: 127.0.0.1:{node.api_port} (api_port) is unavailable" in str(
        info.value.message
    )
    assert not list(supervisor.run_dir(cfg).glob("*.pid"))


def test_up_with_embedded_broker_and_down_stops_it(cfg: ClusterConfig, fake_node: Path) -> None:
    local = cfg.model_copy(
        update={
            "nodes": cfg.nodes[:1],
            "mqtt": cfg.mqtt.model_copy(update={"url": None, "embedded_port": free_port()}),
        }
    )
    result = supervisor.up(local, timeout=20, command=stand_in(fake_node))
    assert result.started == ["broker", "km1"]
    broker = supervisor.running(local)["broker"]
    assert broker.argv[1:3] == ("-m", "kmnode.host.broker")
    outcomes = supervisor.down(local)
    assert [o.name for o in outcomes] == ["km1", "broker"]
    assert wait_gone(broker.pid)
    assert supervisor.running(local) == {}


# --- the commands ---------------------------------------------------------------------------


def test_kmctl_up_status_down(
    cfg: ClusterConfig, fake_node: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "node_command", stand_in(fake_node))
    path = tmp_path / "cluster.yaml"
    path.write_text(config_to_yaml(cfg))
    runner = CliRunner()
    first = runner.invoke(cli, ["-c", str(path), "up", "-n", "2", "--timeout", "20"])
    assert first.exit_code == 0, first.stderr
    assert "km2: joined" in first.stderr
    assert "ready" in first.stdout
    again = runner.invoke(cli, ["-c", str(path), "up", "-n", "2"])
    assert again.exit_code == 0 and "already up" in again.stderr
    status = runner.invoke(cli, ["-c", str(path), "status", "--json"])
    assert status.exit_code == 0
    assert '"km3"' not in status.stdout  # the effective config has two nodes
    stopped = runner.invoke(cli, ["-c", str(path), "down"])
    assert stopped.exit_code == 0
    assert "km1 (pid " in stopped.stdout and "stopped" in stopped.stdout
    after = runner.invoke(cli, ["-c", str(path), "status"])
    assert after.exit_code == 3  # no node answers
    nothing = runner.invoke(cli, ["-c", str(path), "down"])
    assert "nothing to stop" in nothing.stdout


def test_kmctl_up_failure_is_one_error_with_exit_3(
    cfg: ClusterConfig, fake_node: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "node_command", stand_in(fake_node, km1="die"))
    path = tmp_path / "cluster.yaml"
    path.write_text(config_to_yaml(cfg))
    result = CliRunner().invoke(cli, ["-c", str(path), "up"])
    assert result.exit_code == 3
    assert isinstance(result.exception, SystemExit)
    assert "kmctl: error: km1 exited" in result.stderr
    assert not isinstance(result.exception, CliError)


@pytest.mark.parametrize("module", ["kmnode.supervisor", "kmnode.client", "kmnode.cli"])
def test_modules_import_in_any_order(module: str) -> None:
    root = Path(supervisor.__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=root, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()


# --- nodes in network namespaces -------------------------------------------------------------


def test_node_command_for_wraps_only_nodes_with_a_namespace(cfg: ClusterConfig) -> None:
    config_file = Path("/state/cluster.yaml")
    assert supervisor.node_command_for(cfg, config_file, "km1") == supervisor.node_command(
        config_file, "km1"
    )
    nodes = [cfg.nodes[0].model_copy(update={"netns": "kmsim-km1"}), *cfg.nodes[1:]]
    in_ns = cfg.model_copy(update={"nodes": nodes})
    argv = supervisor.node_command_for(in_ns, config_file, "km1")
    assert Path(argv[0]).name == "ip" and argv[1:4] == ["netns", "exec", "kmsim-km1"]
    assert argv[4:] == supervisor.node_command(config_file, "km1")
    with pytest.raises(KeyError, match="km9"):
        supervisor.node_command_for(cfg, config_file, "km9")


def test_spawn_records_what_ip_netns_exec_becomes(cfg: ClusterConfig, tmp_path: Path) -> None:
    """A stand-in for `ip` that, like `ip netns exec NS CMD`, execs CMD in place after a
    moment: the pid file must name CMD (what /proc shows for the rest of the process's life),
    never the short-lived `ip` argv, or `down` would take the node for a stranger."""
    fake_ip = tmp_path / "bin" / "ip"
    fake_ip.parent.mkdir()
    fake_ip.write_text('#!/bin/sh\nshift 3\nsleep 0.3\nexec "$@"\n')
    fake_ip.chmod(0o755)
    _, record = supervisor.spawn(
        "km1",
        [str(fake_ip), "netns", "exec", "kmsim-km1", *SLEEPER],
        supervisor.log_path(cfg, "km1"),
        supervisor.pid_path(cfg, "km1"),
    )
    assert record.argv == tuple(SLEEPER)
    assert supervisor.running(cfg) == {"km1": record}
    outcomes = supervisor.down(cfg)
    assert [(o.name, o.result) for o in outcomes] == [("km1", "stopped")]
    assert wait_gone(record.pid)


def test_a_large_log_is_rotated_when_a_node_starts_and_old_ones_are_capped(tmp_path: Path) -> None:
    log = tmp_path / "km1.log"
    assert not supervisor.rotate_log(log, max_bytes=10)  # nothing to rotate
    for run in range(7):
        log.write_text(f"run {run}\n" * 3)
        assert supervisor.rotate_log(log, max_bytes=10, keep=3)
    assert not log.exists()
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["km1.log.1", "km1.log.2", "km1.log.3"]
    assert (tmp_path / "km1.log.1").read_text().startswith("run 6")
    assert (tmp_path / "km1.log.3").read_text().startswith("run 4")
    log.write_text("small\n")
    assert not supervisor.rotate_log(log, max_bytes=1000)
    assert log.read_text() == "small\n"
