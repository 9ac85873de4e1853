"""The mosquitto broker of a compose deployment: one account per node, and what each may do.

Each node publishes under its own name only (``{prefix}/{cluster}/{node}/...``, the layout of
``kmnode.host.mqtt``) and to the parties' topics (a data user's results, an owner's requests),
so a compromised node's host cannot forge another node's events or audit records on the bus.
One read-only account (``READER``) is for subscribers (``kmctl events``, dashboards). Anonymous
clients are refused.

``mosquitto_passwd`` is not needed: the password file is written here in mosquitto's own
PBKDF2-SHA512 format (``$7$iterations$salt$hash``, base64 with padding, 12-byte salt, 64-byte
hash), the format mosquitto 2.0 reads and writes by default (its ``password_mosq.c``). The
passwords are 256-bit random tokens, so the iteration count (mosquitto's default, 101) is not
what protects them; it only costs each CONNECT.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from kmnode.config import ClusterConfig

PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
HASH_BYTES = 64
#: The subscribers' account. A dot cannot occur in a node name, so it never collides with one.
READER = "events.reader"
MQTT_PORT = 1883


@dataclass(frozen=True)
class MqttAccount:
    """A broker account. The password and salt never appear in a repr (or a log line)."""

    user: str
    password: str = field(repr=False)
    salt: bytes = field(repr=False)

    @classmethod
    def new(cls, user: str) -> MqttAccount:
        return cls(user, secrets.token_urlsafe(32), os.urandom(SALT_BYTES))


def password_hash(password: str, salt: bytes, iterations: int = PBKDF2_ITERATIONS) -> str:
    """mosquitto's ``$7$`` hash of ``password``: PBKDF2-HMAC-SHA512 over its UTF-8 bytes."""
    if len(salt) != SALT_BYTES:
        raise ValueError(f"mosquitto takes a {SALT_BYTES}-byte salt, not {len(salt)} bytes")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    encode = base64.b64encode
    return f"$7${iterations}${encode(salt).decode()}${encode(digest).decode()}"


def password_file(accounts: Iterable[MqttAccount]) -> str:
    return "".join(f"{a.user}:{password_hash(a.password, a.salt)}\n" for a in accounts)


def acl_file(config: ClusterConfig) -> str:
    """Who may publish and subscribe where: each node under its own name and the parties'
    topics, the reader everything of this cluster, nobody anything else."""
    base = f"{config.mqtt.topic_prefix}/{config.cluster}"
    lines = ["# Rendered by `kmctl deploy render compose`; one block per account.", ""]
    for node in config.nodes:
        lines += [
            f"user {node.name}",
            f"topic write {base}/{node.name}/#",
            f"topic write {base}/users/+/results",
            f"topic write {base}/owners/+/requests",
            "",
        ]
    lines += [f"user {READER}", f"topic read {base}/#", ""]
    return "\n".join(lines)


def broker_conf(
    *, password_path: str, acl_path: str, port: int = MQTT_PORT, bind: str | None = None
) -> str:
    """mosquitto.conf: one plain MQTT listener, named accounts only, the ACL, no persistence
    (nothing retained: MQTT is never on the consensus path), logs to stdout."""
    listener = f"listener {port}" + (f" {bind}" if bind else "")
    return "\n".join(
        [
            "# Rendered by `kmctl deploy render compose`.",
            listener,
            "allow_anonymous false",
            f"password_file {password_path}",
            f"acl_file {acl_path}",
            "persistence false",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "",
        ]
    )
