"""The embedded broker process and broker addresses from cluster.yaml."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kmnode.config import MqttSpec
from kmnode.host.broker import (
    BrokerAddress,
    BrokerStartError,
    answers_mqtt,
    broker_address,
    parse_mqtt_url,
    start_embedded_broker,
    stop_broker,
)
from tests.ports import free_port

pytestmark = pytest.mark.timeout(60)


def test_start_serves_mqtt_on_loopback_and_stop_is_clean(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "logs" / "broker.log"
    proc = start_embedded_broker(port, log_path)
    try:
        assert proc.poll() is None
        assert answers_mqtt("127.0.0.1", port)
    finally:
        code = stop_broker(proc)
    assert code == 0  # SIGTERM is a clean shutdown, not a kill
    assert not answers_mqtt("127.0.0.1", port)
    text = log_path.read_text()
    assert f"listening on 127.0.0.1:{port}" in text
    assert "ERROR" not in text  # the readiness probe is a real MQTT client, not a bare socket

    # The same log file again: readiness is judged on what this start wrote, not the last one.
    proc = start_embedded_broker(port, log_path)
    assert stop_broker(proc) == 0
    assert log_path.read_text().count("listening on") == 2


def test_port_in_use_fails_with_the_broker_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(BrokerStartError) as failure:
            start_embedded_broker(port, tmp_path / "broker.log")
    message = str(failure.value)
    assert f"127.0.0.1:{port} exited with code 1" in message
    assert "address already in use" in message


def test_not_ready_in_time_is_stopped_and_reported(tmp_path: Path) -> None:
    with pytest.raises(BrokerStartError, match=r"not ready after 0s; end of .*broker\.log"):
        start_embedded_broker(free_port(), tmp_path / "broker.log", timeout=0)


def test_stop_kills_a_process_that_ignores_sigterm() -> None:
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        assert stop_broker(proc, timeout=0.5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def test_broker_module_refuses_a_bad_port() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kmnode.host.broker", "--port", "70000"],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert b"--port 70000 is not a TCP port" in result.stderr


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://localhost", BrokerAddress("localhost", 1883, False)),
        ("mqtt://10.0.0.5:1884", BrokerAddress("10.0.0.5", 1884, False)),
        ("mqtt://broker.example:1884/", BrokerAddress("broker.example", 1884, False)),
        ("mqtts://broker.example", BrokerAddress("broker.example", 8883, True)),
    ],
)
def test_parse_mqtt_url(url: str, expected: BrokerAddress) -> None:
    assert parse_mqtt_url(url) == expected


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://broker:1883", "scheme must be mqtt:// or mqtts://"),
        ("broker:1883", "scheme must be mqtt:// or mqtts://"),
        ("mqtt://", "no host"),
        ("mqtt://:1883", "no host"),
        ("mqtt://broker:99999", "out of range"),
        ("mqtt://broker:port", "bad MQTT URL"),
        ("mqtt://broker:0", "port 0"),
        ("mqtt://user:secret@broker", "credentials in the URL are not supported"),
        ("mqtt://broker/topic", "only mqtt://host:port"),
        ("mqtt://broker?x=1", "only mqtt://host:port"),
    ],
)
def test_parse_mqtt_url_errors_name_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match="bad MQTT URL") as failure:
        parse_mqtt_url(url)
    assert problem in str(failure.value)


def test_broker_address_from_config() -> None:
    assert broker_address(MqttSpec()) == BrokerAddress("127.0.0.1", 18830, False)
    assert broker_address(MqttSpec(embedded_port=2000)) == BrokerAddress("127.0.0.1", 2000, False)
    assert broker_address(MqttSpec(url="mqtt://mosq:1884")) == BrokerAddress("mosq", 1884, False)
