"""Measurements cover the code each enclave really loads, and the simulated hardware store
keeps identities stable."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from attest.certs import TcbStatus
from attest.identity import EnclaveRole, measure_sources
from kmnode.config import ClusterConfig, config_to_yaml
from kmnode.enclave_code import current_identity, enclave_modules, enclave_sources
from kmnode.host.node import KMNode
from kmnode.host.service_output import ServiceOutput
from kmnode.imports import import_closure, module_sources
from kmnode.km.commands import ReleaseRequested
from kmnode.km.loader import load_km_enclave
from kmnode.km.service_link import ServiceLink
from kmnode.km.state import encode_command
from kmnode.km_messages import (
    DataReply,
    ModulesReply,
    ModulesRequest,
    StatusReply,
    StatusRequest,
)
from kmnode.simhw import HardwareStore, HardwareStoreError
from tests.operators import api_call, with_admin
from tests.ports import free_ports

REPO = Path(__file__).resolve().parents[1]


def test_changing_any_byte_or_name_of_enclave_code_changes_the_measurement() -> None:
    sources = enclave_sources(EnclaveRole.SERVICE)
    base = measure_sources(sources)
    assert measure_sources(dict(reversed(list(sources.items())))) == base
    name = sorted(sources)[0]
    edited = {**sources, name: sources[name] + b"\n# patched\n"}
    assert measure_sources(edited) != base
    renamed = {("x" + k if k == name else k): v for k, v in sources.items()}
    assert measure_sources(renamed) != base


def test_the_measured_code_follows_the_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Modules imported directly, through ``from package import module``, relatively, or
    inside a function are measured; one imported only for type checking is not."""
    package = tmp_path / "attest_fake"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "entry.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from attest_fake import helper\n"
        "from . import relative\n"
        "import attest_fake.direct\n"
        "if TYPE_CHECKING:\n"
        "    import attest_fake.typing_only\n"
        "def later():\n"
        "    from attest_fake.lazy import x\n"
    )
    for name in ("helper", "relative", "direct", "typing_only", "lazy"):
        (package / f"{name}.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("kmnode.imports.PROJECT_PACKAGES", ("attest_fake",))
    closure = import_closure(["attest_fake.entry"])
    assert closure == {
        "attest_fake",
        "attest_fake.entry",
        "attest_fake.helper",
        "attest_fake.relative",
        "attest_fake.direct",
        "attest_fake.lazy",
    }
    before = measure_sources(module_sources(closure))
    (package / "lazy.py").write_text("x = 2\n")
    assert measure_sources(module_sources(closure)) != before


def test_both_enclaves_measure_the_modules_the_issue_named() -> None:
    """The pieces a hand-kept list once missed: the keybox and ring writer of the service
    enclave, the consensus types and codec of the KM enclave, the compiled ring."""
    service = enclave_modules(EnclaveRole.SERVICE)
    assert {"attest.keybox", "kmnode.ring", "kmnode.ring._ring"} <= service
    sources = enclave_sources(EnclaveRole.SERVICE)
    assert any(path.startswith("kmnode/ring/_ring") and path.endswith(".so") for path in sources)
    assert {"consensus.types", "consensus.codec", "attest.keybox"} <= enclave_modules(
        EnclaveRole.KM
    )


def _cluster(tmp_path: Path) -> tuple[ClusterConfig, Path]:
    cfg = ClusterConfig.default(3).model_copy(update={"state_dir": tmp_path / "state"})
    path = tmp_path / "cluster.yaml"
    path.write_text(config_to_yaml(cfg))
    return cfg, path


async def _provision_to_a_real_service(tmp_path: Path) -> dict[str, Any]:
    """Start km1's service enclave process, run a release through the KM enclave, have the
    service prove the key, then ask it which project modules it loaded."""
    cfg, path = _cluster(tmp_path)
    km = load_km_enclave(cfg, "km1")
    km.genesis()
    node = cfg.node("km1")
    member = {
        "name": "km1",
        "platform_id": node.platform.id,
        "host": node.host,
        "peer_port": node.peer_port,
        "api_port": node.api_port,
    }
    state = km.state
    state.apply(1, encode_command(
        "cluster.init", cluster="c", policy=state.policy.to_dict(), member=member,
        cluster_id=km.cluster_id,
    ))  # fmt: skip
    state.apply(2, encode_command("key.create", name="db"))
    release = state.apply(3, encode_command("release.request", key="db", node="km1"))
    output = ServiceOutput("km1", lambda _: None)
    output.start()
    link = ServiceLink(path, "km1", output.handoff, tmp_path / "service.log")
    await link.start()
    try:
        challenge = km.new_challenge()
        response = await link.challenge(km.identity.measurement, challenge)
        assert isinstance(release, ReleaseRequested)
        outcome = km.provision(release.release, challenge, response)
        if outcome.ok:
            assert await link.provide_key(outcome.ciphertext, outcome.vouch) == ("db", 1)
            await link.prove("db", 1, b"\x00")
        return {
            "outcome": outcome,
            "measurement": link.measurement,
            "modules": set(await link.modules()),
        }
    finally:
        await link.stop()
        await output.stop()


@pytest.mark.timeout(60)
async def test_the_service_enclave_process_loads_exactly_the_measured_modules(
    tmp_path: Path,
) -> None:
    seen = await _provision_to_a_real_service(tmp_path)
    assert seen["outcome"].ok, seen["outcome"].reason
    assert seen["measurement"] == current_identity(EnclaveRole.SERVICE).measurement.hex()
    assert seen["modules"] == set(enclave_modules(EnclaveRole.SERVICE))


@pytest.mark.timeout(60)
async def test_a_service_enclave_built_with_a_changed_keybox_gets_no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copy the installation, change one comment in attest/keybox.py, and start km1's
    service enclave from the copy: it reports another measurement and is refused."""
    build = tmp_path / "modified"
    for package in ("attest", "consensus", "kmnode"):
        shutil.copytree(
            REPO / package, build / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    keybox = build / "attest" / "keybox.py"
    keybox.write_text(keybox.read_text() + "\n# a modified build\n")
    monkeypatch.chdir(build)  # `python -m` puts the working directory first on the path
    monkeypatch.setenv("PYTHONPATH", str(build))
    seen = await _provision_to_a_real_service(tmp_path)
    assert seen["measurement"] != current_identity(EnclaveRole.SERVICE).measurement.hex()
    assert not seen["outcome"].ok and seen["outcome"].ciphertext == b""
    assert seen["outcome"].reason.startswith("UnknownMeasurement")


async def _run_a_release_on_one_node(
    tmp_path: Path, peer_sockets: str = "host"
) -> tuple[ModulesReply, KMNode]:
    """A one-node cluster through its real host: genesis, a key, a release to the node's
    service enclave; then the KM enclave process says which project modules it loaded."""
    cfg = ClusterConfig.default(1)
    spec = cfg.nodes[0].model_copy(
        update=dict(zip(("peer_port", "api_port"), free_ports(2), strict=True))
    )
    enclave = cfg.enclave.model_copy(update={"peer_sockets": peer_sockets})
    cfg = with_admin(cfg).model_copy(
        update={"state_dir": tmp_path / "state", "nodes": [spec], "enclave": enclave}
    )
    path = tmp_path / "cluster.yaml"
    path.write_text(config_to_yaml(cfg))
    node = KMNode(cfg, path, "km1")
    await node.start()
    try:
        for _ in range(200):
            if (await node.km.call(StatusRequest(), StatusReply)).ready:
                break
            await asyncio.sleep(0.05)
        await node.km.call(api_call("POST", "/v1/keys", {"name": "db"}), DataReply)
        release = api_call("POST", "/v1/keys/db/release", {"node": "km1"})
        done = await node.km.call(release, DataReply)
        assert isinstance(done.data, dict)
        assert [r["status"] for r in done.data["releases"]] == ["provisioned"], done.data
        return await node.km.call(ModulesRequest(), ModulesReply), node
    finally:
        await node.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("peer_sockets", ["host", "enclave"])
async def test_the_km_enclave_process_loads_exactly_the_measured_modules(
    tmp_path: Path, peer_sockets: str
) -> None:
    """The KM enclave runs in a process of its own; after a genesis, a join-free start, a key
    and a release, the project modules that process loaded are exactly the measured set, and
    it is another process than the host's (whoever holds the peer sockets)."""
    modules, node = await _run_a_release_on_one_node(tmp_path, peer_sockets)
    assert modules.pid != os.getpid()
    assert set(modules.modules) == set(enclave_modules(EnclaveRole.KM))
    assert not node.km.running


def test_hardware_store_gives_stable_identities(tmp_path: Path) -> None:
    store = HardwareStore(tmp_path / "hw")
    first = store.platform("p1", TcbStatus.UP_TO_DATE).certificate
    again = HardwareStore(tmp_path / "hw").platform("p1", TcbStatus.UP_TO_DATE).certificate
    assert first == again
    assert store.platform("p2", TcbStatus.UP_TO_DATE).certificate != first


def test_damaged_hardware_store_is_a_clear_error(tmp_path: Path) -> None:
    store = HardwareStore(tmp_path / "hw")
    store.vendor()
    (tmp_path / "hw" / "vendor-root.seed").write_bytes(b"short")
    with pytest.raises(HardwareStoreError, match="damaged"):
        store.vendor()
