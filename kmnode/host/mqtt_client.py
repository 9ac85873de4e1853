"""One way to open an MQTT connection, for the node's publisher and for kmctl's readers
(`events`, the chaos capture, the dashboard): the broker's address, TLS for ``mqtts://``, and
the credentials a broker with accounts wants (the rendered compose deployment gives each node
one): ``KMSIM_MQTT_USERNAME`` and the password in the file ``KMSIM_MQTT_PASSWORD_FILE`` (a file,
so the password is in no process listing nor environment dump). Neither set: anonymous.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import aiomqtt

from kmnode.host.broker import BrokerAddress

USERNAME_VARIABLE = "KMSIM_MQTT_USERNAME"
PASSWORD_FILE_VARIABLE = "KMSIM_MQTT_PASSWORD_FILE"


class MqttCredentialsError(RuntimeError):
    """The password file named by the environment cannot be read."""


def credentials() -> tuple[str | None, str | None]:
    """(username, password) from the environment; (None, None) when no account is set."""
    username = os.environ.get(USERNAME_VARIABLE) or None
    path = os.environ.get(PASSWORD_FILE_VARIABLE)
    if not path:
        return username, None
    try:
        password = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise MqttCredentialsError(
            f"{PASSWORD_FILE_VARIABLE}={path}: cannot read it ({exc.strerror or exc})"
        ) from None
    return username, password


def mqtt_client(
    address: BrokerAddress, identifier: str, *, timeout: float, keepalive: int = 60
) -> aiomqtt.Client:
    username, password = credentials()
    return aiomqtt.Client(
        address.host,
        address.port,
        identifier=identifier,
        username=username,
        password=password,
        clean_session=True,
        keepalive=keepalive,
        timeout=timeout,
        tls_context=ssl.create_default_context() if address.tls else None,
    )
