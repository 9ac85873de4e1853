"""A chaos run with the data workload needs an identity that may own a dataset and compute on
it; without one it says so and runs without it, instead of failing at its first grant, and a
run that names tamper-blob (which needs the dataset) is refused before it starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmnode.chaos.runner import RunConfig, RunError, data_unavailable, run
from kmnode.config import ClusterConfig
from kmnode.identity import IdentityKeys
from tests.ports import free_ports

KEYS = IdentityKeys.generate("ops")


def listed(*roles: str, state_dir: Path | None = None) -> ClusterConfig:
    update: dict[str, object] = {"identities": [KEYS.public(list(roles))]}  # type: ignore[arg-type]
    if state_dir is not None:
        update["state_dir"] = state_dir
        # Free ports: a cluster `kmctl up` left running on the defaults is not this one.
        ports = iter(free_ports(6))
        nodes = [
            n.model_copy(update={"peer_port": next(ports), "api_port": next(ports)})
            for n in ClusterConfig.default().nodes
        ]
        update["nodes"] = nodes
    return ClusterConfig.default().model_copy(update=update)


def test_the_roles_decide() -> None:
    assert data_unavailable(listed("owner", "user"), KEYS) == ""
    assert "lacks the owner or user role" in data_unavailable(listed("admin", "user"), KEYS)
    assert "lacks" in data_unavailable(listed("owner"), KEYS)
    assert data_unavailable(ClusterConfig.default(), KEYS) == ""  # not listed: dev profile
    assert "no signing identity" in data_unavailable(ClusterConfig.default(), None)


def test_without_the_roles_the_run_says_so_or_refuses_tamper_blob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "ops.key"
    KEYS.save(key)
    monkeypatch.setenv("KMSIM_IDENTITY", str(key))
    cfg = listed("admin", "operator", "user", state_dir=tmp_path / "state")
    with pytest.raises(RunError, match="tamper-blob needs the data workload, which cannot run"):
        run(cfg, RunConfig(seed=1, faults=("tamper-blob",)), tmp_path / "out")
    said: list[str] = []
    config = RunConfig(seed=1, faults=(), converge_timeout=0.5)
    with pytest.raises(RunError, match="not up"):  # no cluster here: it stops at the start
        run(cfg, config, tmp_path / "out", said.append)
    assert any(line.startswith("data: not run ('ops'") for line in said), said
