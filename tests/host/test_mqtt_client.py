"""MQTT credentials for brokers with accounts: a username and a password read from a file
named by the environment (never the password itself in the environment); none: anonymous."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmnode.host.broker import BrokerAddress
from kmnode.host.mqtt_client import MqttCredentialsError, credentials, mqtt_client


def test_no_account_is_anonymous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMSIM_MQTT_USERNAME", raising=False)
    monkeypatch.delenv("KMSIM_MQTT_PASSWORD_FILE", raising=False)
    assert credentials() == (None, None)


def test_the_password_comes_from_its_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("KMSIM_MQTT_USERNAME", "km1")
    monkeypatch.setenv("KMSIM_MQTT_PASSWORD_FILE", str(secret))
    assert credentials() == ("km1", "s3cret")
    client = mqtt_client(BrokerAddress("127.0.0.1", 1883, False), "probe", timeout=1.0)
    assert client._client._username == b"km1"  # what paho will send in CONNECT


def test_an_unreadable_password_file_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KMSIM_MQTT_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(MqttCredentialsError, match="KMSIM_MQTT_PASSWORD_FILE=.*missing"):
        credentials()
