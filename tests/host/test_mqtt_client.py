"""MQTT credentials for brokers with accounts: a username and a password read from a file
named by the environment (never the password itself in the environment); none: anonymous."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import socket
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from kmnode.deploy.mosquitto import MqttAccount, password_file
from kmnode.host.broker import BrokerAddress
from kmnode.host.mqtt_client import MqttCredentialsError, credentials, mqtt_client
from tests.conftest import find_mosquitto
from tests.ports import free_port


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


async def test_a_broker_with_accounts_takes_the_account_and_refuses_anonymous(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Against a real mosquitto that has accounts (as the rendered compose deployment runs
    it): the credentials from the environment connect, no credentials are refused."""
    account = MqttAccount.new("km1")
    (tmp_path / "passwd").write_text(password_file([account]))
    (tmp_path / "password").write_text(account.password)
    port = free_port()
    (tmp_path / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {tmp_path}/passwd\n"
        f"persistence false\nuser {getpass.getuser()}\n"
    )
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(tmp_path / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(200):  # at most ~20 s: until it listens (it refuses anonymous probes)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            await asyncio.sleep(0.1)
        address = BrokerAddress("127.0.0.1", port, False)
        monkeypatch.setenv("KMSIM_MQTT_USERNAME", "km1")
        monkeypatch.setenv("KMSIM_MQTT_PASSWORD_FILE", str(tmp_path / "password"))
        async with mqtt_client(address, "with-account", timeout=5.0) as client:
            await client.publish("kmsim/probe", b"ok")
        monkeypatch.delenv("KMSIM_MQTT_USERNAME")
        monkeypatch.delenv("KMSIM_MQTT_PASSWORD_FILE")
        with pytest.raises(aiomqtt.MqttError):
            async with mqtt_client(address, "anonymous", timeout=5.0):
                pass
    finally:
        proc.terminate()
        proc.wait(10)


def test_an_unreadable_password_file_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KMSIM_MQTT_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(MqttCredentialsError, match=r"KMSIM_MQTT_PASSWORD_FILE=.*missing"):
        credentials()
