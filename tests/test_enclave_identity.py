"""Measurements follow the code, and the simulated hardware store keeps identities stable."""

from __future__ import annotations

from pathlib import Path

import pytest

from attest.certs import TcbStatus
from attest.identity import measure_sources
from kmnode.enclave_code import enclave_sources
from kmnode.simhw import HardwareStore, HardwareStoreError


def test_changing_any_byte_or_name_of_enclave_code_changes_the_measurement() -> None:
    sources = enclave_sources(("attest",))
    base = measure_sources(sources)
    assert measure_sources(dict(reversed(list(sources.items())))) == base
    name = sorted(sources)[0]
    edited = {**sources, name: sources[name] + b"\n# patched\n"}
    assert measure_sources(edited) != base
    renamed = {("x" + k if k == name else k): v for k, v in sources.items()}
    assert measure_sources(renamed) != base


def test_measurement_of_a_package_tracks_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "fake_enclave"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = measure_sources(enclave_sources(("fake_enclave",)))
    (package / "__init__.py").write_text("VALUE = 2\n")
    assert measure_sources(enclave_sources(("fake_enclave",))) != before


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
