"""The rolling path to a new KM build, on real processes started by `kmctl up`: governance
allows the new release's measurements, each member in turn is replaced by a fresh node of the
new build (`kmctl members replace`), which attests to the old members, joins, and receives the
master secret over the attested channel; the cluster serves throughout, and every key
generation proves the same MAC on the new build as on the old."""

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

from attest.identity import EnclaveRole
from kmnode.enclave_code import RELEASE_VARIABLE, current_identity, release_identity

from .harness import REPO, write_config

pytestmark = pytest.mark.timeout(400)

NEW_RELEASE = "2: a changed enclave module"
CHALLENGE = "c0ffee" * 4


def kmctl(config: Path, *args: str, release: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != RELEASE_VARIABLE}
    if release is not None:
        env[RELEASE_VARIABLE] = release
    return subprocess.run(
        [sys.executable, "-m", "kmnode.cli", "-c", str(config), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout) if result.stdout.strip().startswith(("{", "[")) else None


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    path = write_config(tmp_path)
    try:
        yield path
    finally:
        kmctl(path, "down")


def macs(config: Path, node: str) -> dict[int, str]:
    found = {}
    for generation in (1, 2):
        ok(kmctl(config, "keys", "release", "db", "--to", node, "--generation", str(generation)))
        proof = ok(kmctl(config, "prove", "db", "--generation", str(generation),
                         "--challenge", CHALLENGE, "--node", node, "--json"))  # fmt: skip
        found[generation] = proof["mac"]
    return found


def test_members_replaced_one_by_one_move_the_cluster_to_a_new_build(config: Path) -> None:
    ok(kmctl(config, "up"))
    ok(kmctl(config, "keys", "create", "db"))
    ok(kmctl(config, "keys", "rotate", "db"))
    before = macs(config, "km2")
    old_km = current_identity(EnclaveRole.KM).measurement.hex()
    new = {role: release_identity(role, NEW_RELEASE).measurement.hex() for role in EnclaveRole}
    for role in EnclaveRole:
        ok(kmctl(config, "policy", "allow", "--role", role.value, new[role]))
    # While the upgrade runs, the new build must accept the old members it joins through.
    data = yaml.safe_load(config.read_text())
    data["policy"]["km_measurements"] = ["@current", old_km]
    config.write_text(yaml.safe_dump(data))

    for name in ("km1", "km2", "km3"):
        ok(kmctl(config, "members", "replace", name, "--json", release=NEW_RELEASE))
        status = ok(kmctl(config, "status", "--json"))
        assert all(n["state"] == "ready" for n in status["nodes"]), status
    for name in ("km1", "km2", "km3"):
        shown = ok(kmctl(config, "attest", "show", name, "--json"))
        assert shown["identity"]["measurement"] == new[EnclaveRole.KM]
    assert macs(config, "km2") == before
    assert macs(config, "km3") == before
