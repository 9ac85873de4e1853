"""The nemesis's ``tamper-blob`` against each node's real blob store (the host's chaos route and
the upload replaced by the store they call): the target's copy is changed while the fault is
held and is the owner's bytes again after the heal; a node with no copy is recorded as
skipped; the run refuses the kind without the data workload."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from kmnode.chaos import nemesis as nemesis_module
from kmnode.chaos.faults import data_dir
from kmnode.chaos.history import HistoryRecorder
from kmnode.chaos.nemesis import OPT_IN_KINDS, Nemesis, available_kinds
from kmnode.chaos.runner import RunConfig
from kmnode.client import ApiError
from kmnode.config import ClusterConfig, NodeSpec
from kmnode.host.blob_store import BlobStore

CIPHERTEXT = bytes(range(256)) * 4
DIGEST = hashlib.sha256(CIPHERTEXT).hexdigest()


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ClusterConfig:
    config = ClusterConfig.default(3).model_copy(update={"state_dir": tmp_path})

    def store(node: str) -> BlobStore:
        return BlobStore(data_dir(config, node))

    def api(self: Nemesis, node: str, path: str, body: dict[str, Any] | None = None) -> Any:
        assert path == "/v1/chaos/tamper-blob" and body == {"digest": DIGEST}
        if not store(node).tamper(DIGEST):
            raise ApiError(node, 409, "refused", "this node holds no blob")
        return {"tampered": DIGEST}

    def upload(spec: NodeSpec, digest: str, data: bytes, timeout: float = 30.0) -> bool:
        return store(spec.name).put(digest, data)

    monkeypatch.setattr(Nemesis, "_api", api)
    monkeypatch.setattr(nemesis_module, "upload_blob", upload)
    for node in ("km1", "km2"):  # km3 was replaced: it never got a copy
        store(node).put(DIGEST, CIPHERTEXT)
    return config


def blob_on(cfg: ClusterConfig, node: str) -> bytes | None:
    return BlobStore(data_dir(cfg, node)).get(DIGEST)


def test_the_targets_blob_is_changed_while_held_and_restored_by_the_heal(
    cfg: ClusterConfig,
) -> None:
    recorder = HistoryRecorder()
    nem = Nemesis(cfg, 1, ("tamper-blob",), recorder, lambda _l: None, 1, blob=(DIGEST, CIPHERTEXT))
    for node in ("km1", "km2"):
        nem.names = [node]  # the seeded choice of target, pinned
        heal = nem.inject("tamper-blob")
        held = blob_on(cfg, node)
        assert held is not None and held != CIPHERTEXT and len(held) == len(CIPHERTEXT)
        heal()
        assert blob_on(cfg, node) == CIPHERTEXT
    faults = recorder.history().faults()
    assert [(f.phase, f.target) for f in faults] == [
        ("start", "km1"), ("stop", "km1"), ("start", "km2"), ("stop", "km2"),
    ]  # fmt: skip
    assert all("skipped" not in f.detail for f in faults)


def test_a_node_without_a_copy_is_recorded_as_skipped(cfg: ClusterConfig) -> None:
    recorder = HistoryRecorder()
    nem = Nemesis(cfg, 1, ("tamper-blob",), recorder, lambda _l: None, 1, blob=(DIGEST, CIPHERTEXT))
    nem.names = ["km3"]
    nem.inject("tamper-blob")()
    start = recorder.history().faults()[0]
    assert "no blob" in start.detail["skipped"]
    assert blob_on(cfg, "km3") is None  # the heal does not give it one either


def test_tamper_blob_is_named_only_and_needs_the_data_workload(cfg: ClusterConfig) -> None:
    assert "tamper-blob" in OPT_IN_KINDS and "tamper-blob" not in available_kinds(cfg)
    nem = Nemesis(cfg, 1, ("tamper-blob",), HistoryRecorder(), lambda _l: None, 1)
    with pytest.raises(ValueError, match="needs the data workload"):
        nem.inject("tamper-blob")
    with pytest.raises(ValueError, match="drop --no-data"):
        RunConfig(seed=1, faults=("tamper-blob",), data=False)
