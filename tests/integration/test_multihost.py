"""Nodes as if on three machines (issue 17): each binds its own loopback address (127.0.0.2,
127.0.0.3, 127.0.0.4) and keeps its own state directory, so its own simulated hardware. A node
whose platforms another vendor root certified cannot join, and says what to do; once every
machine imported the first one's vendor root (`kmctl hardware export|import`), the cluster
forms and releases work. Each platform's secrets stay in its own directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kmnode.config import ClusterConfig
from kmnode.host.broker import start_embedded_broker, stop_broker
from kmnode.identity import IdentityKeys, Role
from tests.ports import free_ports

from .harness import REPO, stop_all, until

pytestmark = pytest.mark.timeout(240)

ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
ADMIN_ROLES: list[Role] = ["admin", "operator", "auditor"]


class Machines:
    """Three state directories, one per "machine", sharing one cluster description."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.admin = IdentityKeys.generate("admin")
        self.admin_key = root / "admin.key"
        self.admin.save(self.admin_key)
        data = ClusterConfig.default(3).model_dump(mode="json")
        ports = iter(free_ports(2 * len(ADDRESSES) + 1))
        for node, address in zip(data["nodes"], ADDRESSES, strict=True):
            node["host"] = address
            node["peer_port"], node["api_port"] = next(ports), next(ports)
        data["mqtt"]["embedded_port"] = next(ports)
        data["raft"]["tick_ms"] = 25
        data["identities"] = [self.admin.public(ADMIN_ROLES).model_dump(mode="json")]
        self.names = [n["name"] for n in data["nodes"]]
        self.configs: dict[str, Path] = {}
        for name in self.names:
            machine = root / f"machine-{name}"
            machine.mkdir()
            own = {**data, "state_dir": str(machine / "state")}
            self.configs[name] = machine / "cluster.yaml"
            self.configs[name].write_text(yaml.safe_dump(own))
        self.broker = start_embedded_broker(data["mqtt"]["embedded_port"], root / "broker.log")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, name: str) -> Path:
        return self.configs[name].parent / "node.log"

    def start(self, name: str) -> None:
        with self.log(name).open("ab") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "kmnode.host.run", "-c", str(self.configs[name]), name],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def kmctl(self, on: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kmnode.cli", "-c", str(self.configs[on]),
             "--as", str(self.admin_key), *args],
            cwd=REPO,
            env={**os.environ},
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip

    def ok(self, on: str, *args: str) -> Any:
        result = self.kmctl(on, *args)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout) if result.stdout.lstrip().startswith("{") else None

    def ready(self, name: str) -> bool:
        proc = self.procs[name]
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited: {self.log(name).read_text()[-2000:]}")
        result = self.kmctl(name, "status", "--json")
        if not result.stdout.strip():
            return False
        row = next(n for n in json.loads(result.stdout)["nodes"] if n["node"] == name)
        return bool(row["state"] == "ready")

    def close(self) -> None:
        stop_all(self.procs.values(), grace=15.0)
        stop_broker(self.broker)


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Machines]:
    m = Machines(tmp_path)
    try:
        yield m
    finally:
        m.close()


def test_three_machines_form_a_cluster_once_they_share_the_vendor_root(
    machines: Machines,
) -> None:
    km1, km2, km3 = machines.names
    machines.start(km1)
    until(lambda: machines.ready(km1), 60, "km1 founding the cluster on 127.0.0.2")

    # km3's machine has a vendor root of its own: the join fails, and says how to fix it.
    machines.start(km3)
    assert machines.procs[km3].wait(60) != 0
    refused = machines.log(km3).read_text()
    assert "not signed by the vendor root" in refused and "kmctl hardware import" in refused

    exported = machines.root / "vendor.json"
    machines.ok(km1, "hardware", "export", str(exported))
    assert exported.stat().st_mode & 0o777 == 0o600
    machines.ok(km2, "hardware", "import", str(exported))
    other_root = machines.kmctl(km3, "hardware", "import", str(exported))
    assert other_root.returncode != 0 and "another vendor root" in other_root.stderr
    machines.ok(km3, "hardware", "import", str(exported), "--replace")
    roots = {machines.ok(n, "hardware", "show", "--json")["vendor_root"] for n in machines.names}
    assert len(roots) == 1

    for name in (km2, km3):
        machines.start(name)
    for name in (km2, km3):
        until(lambda n=name: machines.ready(n), 90, f"{name} joining")  # type: ignore[misc]
    members = machines.ok(km2, "members", "list", "--json")
    assert {m["host"] for m in members["members"]} == set(ADDRESSES)

    machines.ok(km1, "keys", "create", "shared")
    released = machines.ok(km1, "keys", "release", "shared", "--all", "--json")
    assert {r["status"] for r in released["releases"]} == {"provisioned"}
    proofs = {
        machines.ok(n, "prove", "shared", "--generation", "1", "--challenge", "abcd",
                    "--node", n, "--json")["mac"]
        for n in machines.names
    }  # fmt: skip
    assert len(proofs) == 1
    # Each machine holds only its own platform's secrets.
    for name in machines.names:
        store = machines.configs[name].parent / "state" / "hardware" / "platforms"
        assert sorted(p.name for p in store.glob("*.seed")) == [f"platform-{name[-1]}.seed"]
