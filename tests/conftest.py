"""Fixtures shared across test packages."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmnode.host.broker import answers_mqtt
from tests.host import BrokerUnderTest
from tests.ports import free_port
from tests.requirements import unavailable

# Tests read kmctl's tables as a person sees them; the automatic plain output into a pipe
# (which CliRunner and subprocesses are) has tests of its own (tests/test_cli_output.py).
os.environ.setdefault("KMSIM_OUTPUT", "table")


def find_mosquitto() -> str:
    """Debian puts mosquitto in /usr/sbin, which a non-root PATH may lack."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        unavailable(
            "MOSQUITTO",
            "mosquitto is not installed (not on PATH nor in /usr/sbin)",
            "apt-get install mosquitto",
        )
    assert found is not None
    return found


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[int]:
    binary = find_mosquitto()
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    # `user` = ourselves: run as root, mosquitto would otherwise switch to a 'mosquitto' user.
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"user {getpass.getuser()}\n"
    )
    log_path = tmp_path / "mosquitto.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        for _ in range(200):  # at most ~20 s
            if proc.poll() is not None or answers_mqtt("127.0.0.1", port):
                break
            time.sleep(0.1)
        if proc.poll() is not None or not answers_mqtt("127.0.0.1", port):
            pytest.fail(f"mosquitto did not start on port {port}:\n{log_path.read_text()}")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerUnderTest]:
    """An embedded amqtt broker on a free 127.0.0.1 port, stopped after the test."""
    under_test = BrokerUnderTest(free_port(), tmp_path / "broker.log")
    try:
        under_test.start()
        yield under_test
    finally:
        under_test.stop()


#: Markers by where a test lives (``pytest -m unit`` is the fast subset: see the README).
_MARKERS = {
    "unit": "pure and in-process tests (the fast subset)",
    "integration": "real node processes on 127.0.0.1 (tests/integration)",
    "chaos": "the chaos tooling and seeded chaos runs (tests/chaos)",
    "slow": "a test module that takes more than a few seconds on its own",
}
#: Modules outside tests/integration and tests/chaos that start clusters or run long.
_SLOW_MODULES = frozenset(
    {
        "test_bench_contracts.py",
        "test_bench_contracts_cluster.py",
        "test_bench_dataauth.py",
        "test_bench_recovery.py",
        "test_cli_contracts.py",
        "test_enclave_identity.py",
        "test_deploy.py",
        "test_sim.py",
    }
)


def pytest_configure(config: pytest.Config) -> None:
    for name, description in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by its directory: integration, chaos, else unit; and slow modules."""
    for item in items:
        parts = item.path.parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        elif "chaos" in parts:
            item.add_marker(pytest.mark.chaos)
        else:
            item.add_marker(pytest.mark.unit)
        if item.path.name in _SLOW_MODULES or "integration" in parts:
            item.add_marker(pytest.mark.slow)
