"""Fixtures shared across test packages."""

from __future__ import annotations

import getpass
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
