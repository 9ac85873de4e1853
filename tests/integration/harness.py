"""A real cluster for tests: node processes on 127.0.0.1, an embedded broker, an MQTT capture.

Every port is free when chosen; every wait is bounded; ``close`` kills whatever is left (node
processes, their service enclaves, the broker) so a failing test leaves nothing running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from kmnode.chaos.capture import MqttCapture as ChaosCapture
from kmnode.config import ClusterConfig, load_config
from kmnode.host.broker import (
    BrokerAddress,
    broker_address,
    start_embedded_broker,
    stop_broker,
)
from kmnode.host.mqtt import unpack_records
from kmnode.identity import (
    DEV_IDENTITY,
    IdentityKeys,
    PublicIdentity,
    Role,
    dev_key_path,
    sign_request,
)
from tests.ports import free_ports

REPO = Path(__file__).resolve().parents[2]


def until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if predicate():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class MqttCapture(ChaosCapture):
    """Every message under one topic filter at the broker on 127.0.0.1:``port``."""

    def __init__(self, port: int, topic: str) -> None:
        super().__init__(BrokerAddress("127.0.0.1", port, False), [topic])

    def json_on(self, suffix: str) -> list[dict[str, Any]]:
        """Every record on topics ending in ``suffix``; coalesced audit messages unpacked."""
        return [
            json.loads(record)
            for t, p in list(self.messages)
            if t.endswith(suffix)
            for record in unpack_records(p)
        ]


#: The roles of the cluster's test operator: it may do anything the API offers.
ADMIN_ROLES: list[Role] = ["admin", "operator", "auditor"]


def cluster_admin(root: Path) -> IdentityKeys:
    """The test operator of the cluster in ``root``: made on first use where `kmctl up` keeps
    the development profile's admin, so kmctl signs as it by default on this cluster too."""
    path = dev_key_path(root / "state")
    if not path.exists():
        IdentityKeys.generate(DEV_IDENTITY).save(path)
    return IdentityKeys.load(path)


def write_config(
    root: Path,
    nodes: int = 3,
    mqtt_url: str | None = None,
    admin: bool = False,
    more: list[PublicIdentity] | None = None,
    contracts: dict[str, int] | None = None,
) -> Path:
    """``root/cluster.yaml``: the embedded defaults with free ports on 127.0.0.1, state under
    ``root/state`` and a fast Raft tick, for a cluster of its own. No identities (`kmctl up`
    then runs the development profile) unless ``admin``: then ``cluster_admin(root)``."""
    data = ClusterConfig.default(nodes).model_dump(mode="json")
    ports = iter(free_ports(2 * len(data["nodes"]) + 1))
    for node in data["nodes"]:
        node["peer_port"], node["api_port"] = next(ports), next(ports)
    data["state_dir"] = str(root / "state")
    data["mqtt"]["embedded_port"] = next(ports)
    data["mqtt"]["url"] = mqtt_url
    data["raft"]["tick_ms"] = 25
    data["contracts"].update(contracts or {})
    if admin:
        listed = [cluster_admin(root).public(ADMIN_ROLES), *(more or [])]
        data["identities"] = [i.model_dump(mode="json") for i in listed]
        data["governance"] = {"chaos": True}  # as the development profile has it
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class LocalCluster:
    def __init__(
        self,
        root: Path,
        nodes: int = 3,
        mqtt_url: str | None = None,
        identities: list[PublicIdentity] | None = None,
        contracts: dict[str, int] | None = None,
    ) -> None:
        self.root = root
        # Started node by node, not by `kmctl up`: the cluster names its admin itself.
        self.config_path = write_config(
            root, nodes, mqtt_url, admin=True, more=identities, contracts=contracts
        )
        self.config = load_config(self.config_path)
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.broker: subprocess.Popen[bytes] | None = None
        self.capture: MqttCapture | None = None

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.config.nodes]

    def start_broker_and_capture(self) -> MqttCapture:
        """The embedded broker (unless cluster.yaml names an external one), and a capture."""
        address = broker_address(self.config.mqtt)
        if self.config.mqtt.url is None:
            self.broker = start_embedded_broker(address.port, self.logs / "broker.log")
        self.capture = MqttCapture(address.port, f"{self.config.mqtt.topic_prefix}/#")
        self.capture.start()
        return self.capture

    def start(self, name: str, env: dict[str, str] | None = None) -> None:
        with (self.logs / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "kmnode.host.run", "-c", str(self.config_path), name],
                cwd=REPO,
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def up(self, timeout: float = 60.0) -> None:
        """Start every node (the first alone, then each joiner in turn) until all are ready."""
        for name in self.names:
            self.start(name)
            self.wait_ready(name, timeout)

    def api(
        self,
        name: str,
        method: str,
        path: str,
        body: Any = None,
        signer: IdentityKeys | Literal["admin"] | None = "admin",
    ) -> tuple[int, Any]:
        """One request to ``name``'s API, signed as the test admin (or ``signer``; None:
        unsigned), as kmctl sends it."""
        if body is None and method == "POST":
            body = {}  # a POST is JSON, even an empty one (the API refuses anything else)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        keys = cluster_admin(self.root) if signer == "admin" else signer
        if keys is not None:
            headers.update(sign_request(keys, method, path, data or b""))
        return self.send(name, method, path, data, headers)

    def send(
        self, name: str, method: str, path: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, Any]:
        """A request exactly as given (to replay or tamper with a signed one)."""
        node = self.config.node(name)
        request = urllib.request.Request(
            f"http://{node.host}:{node.api_port}{path}", data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def status(self, name: str) -> dict[str, Any] | None:
        try:
            code, body = self.api(name, "GET", "/v1/status")
        except (OSError, ValueError):
            return None
        return body if code == 200 else None

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        def ready() -> bool:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}: {self.log_tail(name)}")
            status = self.status(name)
            return bool(status and status["ready"])

        until(ready, timeout, f"{name} to be ready")

    def leader(self, among: list[str] | None = None, timeout: float = 20.0) -> str:
        found: list[str] = []

        def has_leader() -> bool:
            for name in among or self.names:
                status = self.status(name)
                if status and status.get("role") == "leader" and status["ready"]:
                    found.append(name)
                    return True
            return False

        until(has_leader, timeout, "a leader")
        return found[-1]

    def leader_call(
        self,
        method: str,
        path: str,
        body: Any = None,
        signer: IdentityKeys | Literal["admin"] | None = "admin",
    ) -> tuple[int, Any]:
        """Call the leader, following one 421 redirect (as kmctl does)."""
        name = self.leader()
        code, reply = self.api(name, method, path, body, signer)
        if code == 421 and reply.get("leader"):
            code, reply = self.api(reply["leader"], method, path, body, signer)
        return code, reply

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(15)

    def stop(self, name: str) -> None:
        self.kill(name, signal.SIGTERM)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def kmctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """kmctl on this cluster's file, as an operator runs it (a process of its own)."""
        return subprocess.run(
            [sys.executable, "-m", "kmnode.cli", "-c", str(self.config_path), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def close(self) -> None:
        stop_all(self.procs.values())
        if self.capture is not None:
            self.capture.stop()
        if self.broker is not None:
            stop_broker(self.broker)


def stop_all(procs: Iterable[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM every process still running, then SIGKILL what has not exited after ``grace``."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def running(
    root: Path,
    nodes: int = 3,
    identities: list[PublicIdentity] | None = None,
    contracts: dict[str, int] | None = None,
) -> Iterator[LocalCluster]:
    """A cluster of ``nodes`` up (with the embedded broker and an MQTT capture), stopped on
    leaving, whatever happens: what every module-scoped cluster fixture starts with."""
    cluster = LocalCluster(root, nodes=nodes, identities=identities, contracts=contracts)
    try:
        cluster.start_broker_and_capture()
        cluster.up()
        yield cluster
    finally:
        cluster.close()
