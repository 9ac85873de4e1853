"""Key release on real node processes: latency, throughput with many in flight, time to ready.

Why this benchmark: a key release is the product's main operation and crosses every layer: the
operator API, two Raft commits (the request, then the outcome) each with an fsync, the commit
reaching the target node, local attestation of the service enclave over its pipe, and key
provisioning. Unit benchmarks of each layer cannot show how they add up, so this one starts a
real cluster exactly as ``kmctl up`` does (``supervisor.up``: broker, first node, each joiner in
turn) on free loopback ports in a temporary state directory, drives it over HTTP, and stops
every process it started again (``supervisor.down``), also on error or Ctrl-C.

Measured:

1. latency of one release at a time (``POST /v1/keys/bench/release {"node": <follower>}`` to
   the leader; it returns once the request and its outcome are committed): p50 and p99, with
   ``raft.fsync`` true (the default) and false;
2. releases per second with many concurrent HTTP clients (one aiohttp session, a connection
   pool as large as the concurrency) against the leader, targets spread over all nodes;
3. time from ``supervisor.up`` to every node reporting ready, for 3 and 5 nodes.

The client shares the machine's cores with the nodes, so the CPU time of the client process and
of every node process (with its service enclave) is measured over each throughput window and
printed, with the machine-wide busy time (/proc/stat) and so what other programs took: a
saturated node means the cluster is the limit; a saturated client would mean the benchmark is.
The CPU cost per release (all of the benchmark's processes together) is the figure that does
not depend on a noisy neighbour.

    python -m bench.release            # full run (about 2 minutes)
    python -m bench.release --quick    # smoke run (about 1 minute)
    python -m bench.release --profile /tmp/prof   # also py-spy every process under load
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from bench.machine import cpu_model, cpu_probe_ms
from bench.ports import free_ports
from kmnode import supervisor
from kmnode.client import default_signer
from kmnode.config import ClusterConfig, NodeSpec
from kmnode.identity import IdentityKeys, sign_request, verify_request
from kmnode.procfs import stat_fields

GOAL_P50_MS = 5.0
GOAL_P99_MS = 25.0
GOAL_RELEASES_PER_S = 2000.0
GOAL_READY_5_S = 3.0

KEY = "bench"
#: Bounds on every wait: a cluster that stops answering fails the run instead of hanging it.
UP_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0
READY_POLL_S = 0.02
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- machine and process accounting ------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is field 3, the state)."""
    return stat_fields(pid)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants: a node is its host process,
    the KM enclave process (a child) and the service enclave (the KM enclave's child)."""
    total = 0.0
    family = [pid]
    for _ in range(3):  # a node is three generations deep at most
        family += [c for parent in list(family) for c in _children(parent) if c not in family]
    for candidate in family:
        fields = _stat(candidate)
        if fields is not None:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores, all processes), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def fsync_floor_ms(directory: Path, count: int = 100) -> float:
    """Median latency of a 200-byte append + fdatasync in ``directory`` (the state dir's disk).

    With ``raft.fsync`` a release needs two commits one after the other (request, outcome),
    each waiting for a durable append on the leader and a follower (in parallel), so about
    twice this is the floor of its latency."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 200)
            start = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return statistics.median(times)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


# --- the cluster -------------------------------------------------------------------------------


#: How each node's host talks to its KM enclave process (``--circuit``; cluster.yaml
#: ``enclave.circuit``): switchless (the default) or ocall, which models a world switch per record.
CIRCUIT = "switchless"
#: Who holds the peer sockets (``--peer-sockets``; cluster.yaml ``enclave.peer_sockets``).
PEER_SOCKETS = "host"
#: Who holds the node's files (``--storage``; cluster.yaml ``enclave.storage``).
STORAGE = "host"


def make_config(state_dir: Path, nodes: int, fsync: bool) -> ClusterConfig:
    """The embedded defaults (as `kmctl up -n N`), on free ports, in ``state_dir``."""
    base = ClusterConfig.default(nodes)
    ports = free_ports(2 * nodes + 1)
    specs = [
        n.model_copy(update={"peer_port": ports[2 * i], "api_port": ports[2 * i + 1]})
        for i, n in enumerate(base.nodes)
    ]
    return base.model_copy(
        update={
            "nodes": specs,
            "state_dir": state_dir,
            "raft": base.raft.model_copy(update={"fsync": fsync}),
            "mqtt": base.mqtt.model_copy(update={"embedded_port": ports[-1]}),
            "enclave": base.enclave.model_copy(
                update={"circuit": CIRCUIT, "peer_sockets": PEER_SOCKETS, "storage": STORAGE}
            ),
        }
    )


def _host_run_command(config_file: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "kmnode.host.run", "-c", str(config_file), name]


def node_command() -> tuple[supervisor.NodeCommand | None, str]:
    """``kmctl node run`` (what ``kmctl up`` runs) when this build has it, else the same node
    process started through its own module (``kmnode.host.run``), which ``node run`` calls."""
    try:
        from kmnode.cli import cli

        if "node" in getattr(cli, "commands", {}):
            return None, "python -m kmnode.cli node run NAME (kmctl node run, as kmctl up does)"
    except ImportError:
        pass
    return _host_run_command, "python -m kmnode.host.run NAME (kmctl node run not wired up)"


def api_url(node: NodeSpec) -> str:
    return f"http://{node.host}:{node.api_port}"


def get_status(node: NodeSpec, timeout: float = 1.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{api_url(node)}/v1/status", timeout=timeout) as response:
            body = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


@dataclass
class ReadyWatch:
    """Polls every node's /v1/status every READY_POLL_S from a thread; records when each node
    first reported ready, independently of supervisor.up's own (backing-off) polling."""

    nodes: list[NodeSpec]
    t0: float
    first_ready: dict[str, float] = field(default_factory=dict)
    all_ready: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + UP_TIMEOUT * (len(self.nodes) + 1)
        while not self._stop.is_set() and time.monotonic() < deadline:
            ready_now = 0
            for node in self.nodes:
                status = get_status(node, timeout=0.5)
                if status is not None and status.get("ready") is True and status.get("leader"):
                    ready_now += 1
                    self.first_ready.setdefault(node.name, time.monotonic() - self.t0)
            if ready_now == len(self.nodes):
                self.all_ready = time.monotonic() - self.t0
                return
            self._stop.wait(READY_POLL_S)

    def wait(self, timeout: float) -> float | None:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.all_ready

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)


@dataclass
class UpTiming:
    up_returned_s: float
    all_ready_s: float
    phases: list[tuple[float, str, str]]
    first_ready: dict[str, float]


@contextlib.contextmanager
def running_cluster(
    root: Path, nodes: int, fsync: bool, command: supervisor.NodeCommand | None, keep: bool
) -> Iterator[tuple[ClusterConfig, UpTiming]]:
    """Start a fresh cluster with supervisor.up; always supervisor.down it afterwards."""
    state_dir = Path(tempfile.mkdtemp(prefix=f"n{nodes}-", dir=root))
    cfg = make_config(state_dir, nodes, fsync)
    phases: list[tuple[float, str, str]] = []
    t0 = time.monotonic()
    watch = ReadyWatch(list(cfg.nodes), t0)

    def progress(name: str, message: str) -> None:
        phases.append((time.monotonic() - t0, name, message))

    try:
        watch.start()
        supervisor.up(cfg, timeout=UP_TIMEOUT, progress=progress, command=command)
        up_returned = time.monotonic() - t0
        all_ready = watch.wait(UP_TIMEOUT)
        if all_ready is None:
            raise RuntimeError(f"{nodes}-node cluster: not every node ready after up returned")
        yield cfg, UpTiming(up_returned, all_ready, phases, dict(watch.first_ready))
    finally:
        watch.stop()
        supervisor.down(cfg)
        if not keep:
            shutil.rmtree(state_dir, ignore_errors=True)


def cluster_pids(cfg: ClusterConfig) -> dict[str, int]:
    """Pid of every node (its service enclave is its child) and of the broker, by name."""
    return {name: record.pid for name, record in supervisor.running(cfg).items()}


def find_leader(cfg: ClusterConfig) -> NodeSpec:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        for node in cfg.nodes:
            status = get_status(node)
            if status and status.get("role") == "leader" and status.get("ready"):
                return node
        time.sleep(0.05)
    raise RuntimeError("no ready leader within 10 s")


# --- load --------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; values need not be sorted."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


#: Whose key signs the bench's requests: the development profile's admin of the cluster
#: under test (set once it is up; None for a build without signed requests).
SIGNER: IdentityKeys | None = None


def signed(method: str, path: str, body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The body's bytes and the headers of a request as `kmctl` sends it: JSON, and signed
    (``kmnode.identity``) when the cluster has identities."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if SIGNER is not None:
        headers.update(sign_request(SIGNER, method, path, data))
    return data, headers


def signing_cost_us(count: int = 500) -> tuple[float, float]:
    """Median µs to sign one release request (the client's cost) and to verify it (what the
    leader's KM enclave does for each), on this machine."""
    if SIGNER is None:
        return 0.0, 0.0
    path, data = f"/v1/keys/{KEY}/release", b'{"node": "km2"}'
    public = SIGNER.public(["operator"])
    signs, verifies = [], []
    for _ in range(count):
        start = time.perf_counter()
        headers = sign_request(SIGNER, "POST", path, data)
        signs.append(time.perf_counter() - start)
        start = time.perf_counter()
        verify_request(
            "POST", path, {k.lower(): v for k, v in headers.items()}, data, lambda _: public
        )
        verifies.append(time.perf_counter() - start)
    return statistics.median(signs) * 1e6, statistics.median(verifies) * 1e6


async def create_key(session: aiohttp.ClientSession, leader: NodeSpec) -> None:
    data, headers = signed("POST", "/v1/keys", {"name": KEY})
    async with session.post(f"{api_url(leader)}/v1/keys", data=data, headers=headers) as response:
        if response.status not in (201, 409):
            raise RuntimeError(f"key create: {response.status} {await response.text()}")


async def release_once(
    session: aiohttp.ClientSession, leader: NodeSpec, target: str
) -> tuple[float, str]:
    """One release; returns (seconds, outcome) where outcome is "provisioned" or an error."""
    start = time.perf_counter()
    path = f"/v1/keys/{KEY}/release"
    data, headers = signed("POST", path, {"node": target})
    async with session.post(f"{api_url(leader)}{path}", data=data, headers=headers) as response:
        body = await response.json(content_type=None)
    elapsed = time.perf_counter() - start
    if response.status != 200:
        return elapsed, f"http {response.status} {body.get('code', '')}"
    statuses = [r.get("status") for r in body.get("releases", [])]
    return elapsed, "provisioned" if statuses == ["provisioned"] else f"status {statuses}"


class RawConnection:
    """One keep-alive HTTP/1.1 connection, for ``--client raw``: the load generator without
    aiohttp's per-request machinery (pool, timeouts, header objects), which made the client
    cost ~0.14 CPU-ms per release, a sixth of the whole cluster's, on the same two cores.

    Only what the operator API answers is handled: a status line, headers with Content-Length,
    a JSON body. Each closed-loop client owns one connection, so no pool is needed.
    """

    def __init__(self, node: NodeSpec) -> None:
        self.node = node
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.node.host, self.node.api_port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        assert self.reader is not None and self.writer is not None
        data, headers = signed("POST", path, body)
        lines = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s:%d\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path.encode(), self.node.host.encode(), self.node.api_port, lines, len(data), data)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at < 0:
            raise RuntimeError(f"no Content-Length in the answer to {path}: {head!r}")
        length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
        return status, json.loads(await self.reader.readexactly(length))


async def release_once_raw(conn: RawConnection, target: str) -> tuple[float, str]:
    """`release_once` over a `RawConnection`."""
    start = time.perf_counter()
    status, body = await conn.post(f"/v1/keys/{KEY}/release", {"node": target})
    elapsed = time.perf_counter() - start
    if status != 200:
        return elapsed, f"http {status} {body.get('code', '')}"
    statuses = [r.get("status") for r in body.get("releases", [])]
    return elapsed, "provisioned" if statuses == ["provisioned"] else f"status {statuses}"


@dataclass
class LatencyResult:
    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    failures: dict[str, int]


async def measure_latency(cfg: ClusterConfig, leader: NodeSpec, count: int) -> LatencyResult:
    followers = [n.name for n in cfg.nodes if n.name != leader.name]
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=1)
    ) as session:
        await create_key(session, leader)
        for i in range(min(20, count)):  # warm-up: connections, code paths
            await release_once(session, leader, followers[i % len(followers)])
        latencies: list[float] = []
        failures: Counter[str] = Counter()
        for i in range(count):
            elapsed, outcome = await release_once(session, leader, followers[i % len(followers)])
            if outcome == "provisioned":
                latencies.append(elapsed * 1000)
            else:
                failures[outcome] += 1
    return LatencyResult(
        count=len(latencies),
        p50_ms=pct(latencies, 0.50),
        p90_ms=pct(latencies, 0.90),
        p99_ms=pct(latencies, 0.99),
        max_ms=max(latencies, default=float("nan")),
        failures=dict(failures),
    )


@dataclass
class ThroughputResult:
    concurrency: int
    seconds: float
    provisioned: int
    per_s: float
    p50_ms: float
    p99_ms: float
    failures: dict[str, int]
    #: CPU used over the window, in cores (1.0 = one core busy all the time).
    client_cpu: float
    #: Each node with its service enclave, and the MQTT broker.
    node_cpu: dict[str, float]
    #: The whole machine, and what processes other than this benchmark's used of it.
    machine_busy: float
    other_cpu: float
    #: CPU (client + cluster) per provisioned release, in milliseconds.
    cpu_ms_per_release: float


async def measure_throughput(
    cfg: ClusterConfig,
    leader: NodeSpec,
    concurrency: int,
    seconds: float,
    profile: Path | None,
    followers_only: bool,
    raw_client: bool = False,
) -> ThroughputResult:
    targets = [n.name for n in cfg.nodes if not followers_only or n.name != leader.name]
    pids = cluster_pids(cfg)
    limit = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    latencies: list[float] = []
    completed = 0  # provisioned, in the window or after it (for CPU per release)
    failures: Counter[str] = Counter()
    counter = itertools.count()
    # Each client stops at the deadline, and in any case after this many requests.
    cap = int(GOAL_RELEASES_PER_S * 10 * seconds / concurrency) + 10
    async with aiohttp.ClientSession(timeout=timeout, connector=limit) as session:
        await create_key(session, leader)
        # Open the pool's connections first so the window measures releases, not handshakes.

        async def warm() -> None:
            async with session.get(f"{api_url(leader)}/v1/status") as response:
                await response.read()

        await asyncio.gather(*(warm() for _ in range(concurrency)))
        deadline = 0.0

        conns = [RawConnection(leader) for _ in range(concurrency if raw_client else 0)]
        await asyncio.gather(*(c.open() for c in conns))

        async def client(conn: RawConnection | None) -> None:
            nonlocal completed
            for _ in range(cap):
                if time.perf_counter() >= deadline:
                    return
                target = targets[next(counter) % len(targets)]
                try:
                    if conn is None:
                        elapsed, outcome = await release_once(session, leader, target)
                    else:
                        elapsed, outcome = await asyncio.wait_for(
                            release_once_raw(conn, target), REQUEST_TIMEOUT
                        )
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                    failures[type(exc).__name__] += 1
                    if conn is not None:
                        return  # the connection is in an unknown state
                    continue
                if outcome == "provisioned":
                    completed += 1
                if time.perf_counter() > deadline:
                    return  # finished after the window: not counted
                if outcome == "provisioned":
                    latencies.append(elapsed * 1000)
                else:
                    failures[outcome] += 1

        spies = [
            start_py_spy(
                profile, pid, seconds, concurrency, "leader" if name == leader.name else name
            )
            for name, pid in pids.items()
        ]
        node_cpu0 = {name: process_cpu_s(pid) for name, pid in pids.items()}
        client_cpu0 = time.process_time()
        busy0 = machine_busy_s()
        start = time.perf_counter()
        deadline = start + seconds
        try:
            await asyncio.gather(*(client(conns[i] if conns else None) for i in range(concurrency)))
        finally:
            for conn in conns:
                conn.close()
        window = time.perf_counter() - start
        client_cpu = time.process_time() - client_cpu0
        busy = machine_busy_s() - busy0
        node_cpu = {
            name: (process_cpu_s(pid) - node_cpu0[name]) / window for name, pid in pids.items()
        }
        for spy in spies:
            stop_py_spy(spy)
    ours = client_cpu / window + sum(node_cpu.values())
    return ThroughputResult(
        concurrency=concurrency,
        seconds=round(window, 2),
        provisioned=len(latencies),
        per_s=len(latencies) / seconds,
        p50_ms=pct(latencies, 0.50),
        p99_ms=pct(latencies, 0.99),
        failures=dict(failures),
        client_cpu=client_cpu / window,
        node_cpu=node_cpu,
        machine_busy=busy / window,
        other_cpu=max(0.0, busy / window - ours),
        cpu_ms_per_release=ours * window * 1000 / max(1, completed),
    )


def start_py_spy(
    profile: Path | None, pid: int, seconds: float, concurrency: int, name: str
) -> subprocess.Popen[bytes] | None:
    """Sample one process (a node with its service enclave, or the broker) with py-spy, if
    asked and installed, while the load runs: one raw profile per process and window."""
    exe = shutil.which("py-spy")
    if profile is None or exe is None:
        return None
    profile.mkdir(parents=True, exist_ok=True)
    out = profile / f"{name}-c{concurrency}.txt"
    argv = [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "50", "-f", "raw"]
    argv += ["--subprocesses"]
    return subprocess.Popen(
        [*argv, "-o", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is None:
        return
    try:
        spy.wait(15)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(5)


# --- phases ------------------------------------------------------------------------------------


@dataclass
class Settings:
    latency_count: int
    concurrencies: list[int]
    seconds: float
    ready_runs: int
    ready_sizes: list[int]
    profile: Path | None
    keep: bool
    followers_only: bool
    raw_client: bool = False


def run_release_phase(
    root: Path, fsync: bool, settings: Settings, command: supervisor.NodeCommand | None
) -> dict[str, Any]:
    global SIGNER
    with running_cluster(root, 3, fsync, command, settings.keep) as (cfg, _timing):
        leader = find_leader(cfg)
        SIGNER = default_signer(cfg)  # the development profile's admin `up` made
        sign_us, verify_us = signing_cost_us()
        if SIGNER is not None:
            print(
                f"  signed requests ({SIGNER.name}): signing {sign_us:.0f} µs per request "
                f"(client), verifying {verify_us:.0f} µs (the leader's KM enclave), medians",
                flush=True,
            )
        # The VM's disk latency drifts (0.1 to 4 ms seen): probe it right before and after.
        disk_before, cpu_before = fsync_floor_ms(cfg.state_dir), cpu_probe_ms()
        latency = asyncio.run(measure_latency(cfg, leader, settings.latency_count))
        disk_after, cpu_after = fsync_floor_ms(cfg.state_dir), cpu_probe_ms()
        print(
            f"  fsync={fsync!s:5}  one at a time: p50 {latency.p50_ms:6.2f} ms  "
            f"p99 {latency.p99_ms:6.2f} ms  (n={latency.count}, failures {latency.failures}); "
            f"fdatasync p50 {disk_before:.2f} ms before, {disk_after:.2f} ms after; "
            f"cpu probe {cpu_before:.1f} / {cpu_after:.1f} ms",
            flush=True,
        )
        loads = []
        for concurrency in settings.concurrencies:
            result = asyncio.run(
                measure_throughput(
                    cfg,
                    leader,
                    concurrency,
                    settings.seconds,
                    settings.profile / f"fsync-{fsync}" if settings.profile else None,
                    settings.followers_only,
                    settings.raw_client,
                )
            )
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(result.node_cpu.items()))
            print(
                f"  fsync={fsync!s:5}  {concurrency:3} in flight: {result.per_s:7.0f} /s  "
                f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms  "
                f"failures {result.failures}\n"
                f"{'':22}CPU in cores: client {result.client_cpu:.2f}, {cpu}; "
                f"machine busy {result.machine_busy:.2f} of {os.cpu_count()}, of which other "
                f"programs {result.other_cpu:.2f}; {result.cpu_ms_per_release:.2f} CPU-ms "
                "per release (client + cluster)",
                flush=True,
            )
            loads.append(result)
    return {
        "fsync": fsync,
        "leader": leader.name,
        "latency": latency.__dict__,
        "fdatasync_ms_before_after": [disk_before, disk_after],
        "cpu_probe_ms_before_after": [cpu_before, cpu_after],
        "throughput": [r.__dict__ for r in loads],
    }


def run_ready_phase(
    root: Path, settings: Settings, command: supervisor.NodeCommand | None
) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    runs = settings.ready_runs
    for nodes in settings.ready_sizes:
        timings: list[UpTiming] = []
        for _ in range(runs):
            with running_cluster(root, nodes, True, command, settings.keep) as (_cfg, timing):
                timings.append(timing)
        median_all = statistics.median(t.all_ready_s for t in timings)
        median_up = statistics.median(t.up_returned_s for t in timings)
        # The run closest to the median, for a per-node breakdown.
        typical = min(timings, key=lambda t: abs(t.all_ready_s - median_all))
        broker = next((s for s, n, m in typical.phases if n == "broker" and "running" in m), 0.0)
        out[nodes] = {
            "runs": [round(t.all_ready_s, 3) for t in timings],
            "median_all_ready_s": median_all,
            "median_up_returned_s": median_up,
            "typical_broker_running_s": broker,
            "typical_first_ready_s": {k: round(v, 3) for k, v in typical.first_ready.items()},
        }
        spawned = {n: t for t, n, m in typical.phases if m.startswith("started (pid")}
        steps = ", ".join(
            f"{k} {spawned.get(k, 0.0):.2f}->{v:.2f}" for k, v in typical.first_ready.items()
        )
        out[nodes]["typical_spawned_s"] = {k: round(v, 3) for k, v in spawned.items()}
        print(
            f"  {nodes} nodes: all ready after {median_all:.2f} s (median of {runs}: "
            f"{', '.join(f'{t.all_ready_s:.2f}' for t in timings)}); supervisor.up returned "
            f"after {median_up:.2f} s\n    typical run (s from up; node spawned->ready): broker "
            f"running {broker:.2f}, {steps}",
            flush=True,
        )
    return out


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer releases, shorter windows")
    parser.add_argument("--releases", type=int, default=500, help="one-at-a-time releases")
    parser.add_argument("--seconds", type=float, default=10.0, help="throughput window")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[64, 256], help="clients in flight"
    )
    parser.add_argument("--ready-runs", type=int, default=5, help="runs per cluster size")
    parser.add_argument(
        "--only", choices=["release", "ready"], help="run one part of the benchmark"
    )
    parser.add_argument(
        "--fsync", choices=["both", "on", "off"], default="both", help="raft.fsync settings"
    )
    parser.add_argument(
        "--targets",
        choices=["all", "followers"],
        default="all",
        help="release targets under load: every node (default) or followers only",
    )
    parser.add_argument(
        "--client",
        choices=["aiohttp", "raw"],
        default="aiohttp",
        help="load generator under load: aiohttp (default) or a minimal keep-alive HTTP/1.1 "
        "client that costs the shared cores less",
    )
    parser.add_argument(
        "--profile", type=Path, help="py-spy every node and the broker under load, into DIR"
    )
    parser.add_argument(
        "--keep", type=Path, help="put the clusters' state dirs (logs) in DIR and keep them"
    )
    parser.add_argument(
        "--circuit",
        choices=["switchless", "ocall"],
        default="switchless",
        help="host <-> KM enclave circuit: switchless (default) or ocall (a modelled world "
        "switch per record the enclave sends)",
    )
    parser.add_argument(
        "--peer-sockets",
        choices=["host", "enclave"],
        default="host",
        help="who holds the peer sockets: the host (default), or the KM enclave process",
    )
    parser.add_argument(
        "--storage",
        choices=["host", "enclave"],
        default="host",
        help="who writes the Raft log and sealed state: the host (default), or the KM enclave "
        "process",
    )
    parser.add_argument("--json", action="store_true", help="also print results as JSON")
    args = parser.parse_args()
    global CIRCUIT, PEER_SOCKETS, STORAGE
    CIRCUIT, PEER_SOCKETS, STORAGE = args.circuit, args.peer_sockets, args.storage
    settings = Settings(
        latency_count=100 if args.quick else max(1, args.releases),
        concurrencies=[64] if args.quick else [max(1, c) for c in args.concurrency],
        seconds=3.0 if args.quick else max(1.0, min(args.seconds, 120.0)),
        ready_runs=2 if args.quick else max(1, args.ready_runs),
        ready_sizes=[3, 5],
        profile=args.profile,
        keep=args.keep is not None,
        followers_only=args.targets == "followers",
        raw_client=args.client == "raw",
    )
    signal.signal(signal.SIGTERM, _interrupt)
    command, command_text = node_command()
    info = machine()
    print(
        f"machine: nproc {info['nproc']}, {info['cpu']}, Python {info['python']}, "
        f"kernel {info['kernel']}; nodes started as: {command_text}",
        flush=True,
    )
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="kmsim-bench-release-", dir=args.keep))
    results: dict[str, Any] = {"machine": info, "settings": settings.__dict__ | {"profile": None}}
    try:
        if args.only in (None, "release"):
            print("releases on a 3-node cluster (defaults: tick 50 ms), leader API:", flush=True)
            results["release"] = [
                run_release_phase(root, fsync, settings, command)
                for fsync in {"both": (True, False), "on": (True,), "off": (False,)}[args.fsync]
            ]
        if args.only in (None, "ready"):
            print("time from supervisor.up (kmctl up) to every node ready:", flush=True)
            results["ready"] = run_ready_phase(root, settings, command)
    finally:
        if not settings.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_verdicts(results)
    if args.json:
        print(json.dumps(results, indent=2, default=str))


def print_verdicts(results: dict[str, Any]) -> None:
    print("goals (issue 5):")
    if "release" in results:
        for phase in results["release"]:
            lat = phase["latency"]
            tag = f"fsync={phase['fsync']!s:5}"
            disk = max(phase["fdatasync_ms_before_after"])
            floor = f" (disk floor ~{2 * disk:.1f} ms)" if phase["fsync"] else ""
            print(
                f"  {tag} p50 {lat['p50_ms']:7.2f} ms  goal <= {GOAL_P50_MS:g} ms   "
                f"{lat['p50_ms'] / GOAL_P50_MS:5.2f}x goal  "
                f"{verdict(lat['p50_ms'] <= GOAL_P50_MS)}{floor}"
            )
            print(
                f"  {tag} p99 {lat['p99_ms']:7.2f} ms  goal <= {GOAL_P99_MS:g} ms  "
                f"{lat['p99_ms'] / GOAL_P99_MS:5.2f}x goal  {verdict(lat['p99_ms'] <= GOAL_P99_MS)}"
            )
            best = max(phase["throughput"], key=lambda r: r["per_s"])
            print(
                f"  {tag} {best['per_s']:7.0f} releases/s ({best['concurrency']} in flight)  "
                f"goal >= {GOAL_RELEASES_PER_S:,.0f}/s  "
                f"{best['per_s'] / GOAL_RELEASES_PER_S:5.2f}x goal  "
                f"{verdict(best['per_s'] >= GOAL_RELEASES_PER_S)}"
            )
    if "ready" in results and 3 in results["ready"]:
        print(
            f"  3-node cluster ready {results['ready'][3]['median_all_ready_s']:5.2f} s  (no goal)"
        )
    if "ready" in results and 5 in results["ready"]:
        ready = results["ready"][5]["median_all_ready_s"]
        print(
            f"  5-node cluster ready {ready:5.2f} s  goal <= {GOAL_READY_5_S:g} s  "
            f"{ready / GOAL_READY_5_S:5.2f}x goal  {verdict(ready <= GOAL_READY_5_S)}"
        )


if __name__ == "__main__":
    main()
